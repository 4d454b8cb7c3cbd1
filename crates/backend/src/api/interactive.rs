//! One interactive run for the WebSocket faces (Piston's `/api/v2/connect`,
//! `/v1/executions/ws`): admitted like any execution, then its standard input and signals are
//! sent as the client sends them while its events come back. Dropping the [`Run`] (the client
//! went away) kills its VM.

use std::sync::Arc;

use cloude_protocol::interactive::Input;
use cloude_protocol::StreamEvent;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use super::error::ApiError;
use super::AppState;
use crate::executor::{ExecError, Job, Outcome, Talk};

/// Inputs queued for the agent (while the VM starts, or while the program does not read):
/// past it the face stops reading its socket, so the client's sends wait in TCP.
const INPUT_QUEUE: usize = 256;
/// Events queued between the agent and the face.
const EVENT_QUEUE: usize = 64;

/// An interactive run in progress.
pub struct Run {
    input: mpsc::Sender<Input>,
    events: mpsc::Receiver<StreamEvent>,
    done: Option<JoinHandle<Result<Outcome, ExecError>>>,
    stdin_bytes: usize,
    max_stdin_bytes: usize,
}

/// What happened next in a run.
pub enum Step {
    Event(StreamEvent),
    /// The run is over (every event has been returned before this).
    Done(Result<Outcome, ApiError>),
}

impl Run {
    /// Admits `job` (waiting in the queue like any execution) and starts it. The job's stdin is
    /// sent first; the client's follows.
    pub async fn start(state: &Arc<AppState>, mut job: Job) -> Result<Run, ApiError> {
        let (permit, queued) = state.executor.admit().await?;
        let (ev_tx, ev_rx) = mpsc::channel(EVENT_QUEUE);
        let (in_tx, in_rx) = mpsc::channel(INPUT_QUEUE);
        let first = std::mem::take(&mut job.stdin);
        let executor = state.executor.clone();
        let done = tokio::spawn(async move {
            executor
                .execute(
                    permit,
                    job,
                    queued,
                    Talk::Interactive {
                        events: ev_tx,
                        input: in_rx,
                    },
                )
                .await
        });
        let mut run = Run {
            input: in_tx,
            events: ev_rx,
            done: Some(done),
            stdin_bytes: 0,
            max_stdin_bytes: state.config.limits.max_stdin_bytes,
        };
        if !first.is_empty() {
            run.stdin(first)
                .await
                .map_err(|m| ApiError::too_large(Some("stdin".into()), m))?;
        }
        Ok(run)
    }

    /// Sends standard input, within `[limits] max_stdin_bytes` for the whole run.
    pub async fn stdin(&mut self, data: Vec<u8>) -> Result<(), String> {
        self.stdin_bytes = self.stdin_bytes.saturating_add(data.len());
        if self.stdin_bytes > self.max_stdin_bytes {
            return Err(format!(
                "standard input is over {} bytes (limits.max_stdin_bytes)",
                self.max_stdin_bytes
            ));
        }
        let _ = self.input.send(Input::Stdin { data: data.into() }).await;
        Ok(())
    }

    pub async fn close_stdin(&mut self) {
        let _ = self.input.send(Input::CloseStdin).await;
    }

    /// Resizes the run's terminal (size already checked by the face).
    pub async fn resize(&mut self, rows: u16, cols: u16) {
        let _ = self.input.send(Input::Resize { rows, cols }).await;
    }

    /// Sends a signal to the running stage (`signal` already checked by the face).
    pub async fn signal(&mut self, signal: i32) {
        let _ = self.input.send(Input::Signal { signal }).await;
    }

    /// The next event, or the end. Cancel-safe (the faces select on it).
    pub async fn next(&mut self) -> Step {
        if let Some(ev) = self.events.recv().await {
            return Step::Event(ev);
        }
        let Some(done) = &mut self.done else {
            return std::future::pending().await;
        };
        let r = done.await;
        self.done = None;
        Step::Done(match r {
            Ok(r) => r.map_err(super::v1::exec_error),
            Err(e) => Err(ApiError::internal(format!("the run's task failed: {e}"))),
        })
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if let Some(done) = &self.done {
            done.abort();
        }
    }
}
