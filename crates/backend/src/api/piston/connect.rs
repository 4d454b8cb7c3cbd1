//! Piston v2's interactive WebSocket, `GET /api/v2/connect`, as Piston's readme documents it
//! and its CLI (`piston run -t`) uses it.
//!
//! The client sends `init` (the `/execute` fields; its stdin is discarded) within
//! [`INIT_TIMEOUT`]; the server answers `runtime`, then per stage `stage`, `data` as the program
//! writes and `exit`; the client may send `data` (stdin only) and `signal` at any time. Close
//! codes: 4000 already initialised, 4001 init timeout, 4002 an `error` message was sent, 4003
//! not yet initialised, 4004 can only write to stdin, 4005 invalid signal, 4999 job completed.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use axum::Extension;
use cloude_protocol::{Bytes, Stage, StageResult, StreamEvent, StreamKind};
use serde_json::{json, Value};

use super::{piston_stage, to_job};
use crate::api::interactive::{Run, Step};
use crate::api::v1::Utf8Joiner;
use crate::api::ws::{self, Handover, Socket};
use crate::api::AppState;

/// Piston's: the `init` message must come within a second of the connection.
pub const INIT_TIMEOUT: Duration = Duration::from_secs(1);

pub async fn connect(
    State(state): State<Arc<AppState>>,
    handover: Option<Extension<Handover>>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    ws::accept(&method, &headers, handover.as_deref(), move |ws| {
        session(state, ws)
    })
}

/// Sends Piston's `error` message and closes with 4002.
async fn fail(ws: &mut Socket, message: &str) {
    let _ = ws::send_json(ws, &json!({"type": "error", "message": message})).await;
    ws::close(ws, 4002, "Notified Error").await;
}

async fn session(state: Arc<AppState>, mut ws: Socket) {
    let first = match tokio::time::timeout(INIT_TIMEOUT, ws::next_text(&mut ws)).await {
        Err(_) => return ws::close(&mut ws, 4001, "Initialization Timeout").await,
        Ok(None) => return,
        Ok(Some(Err(e))) => return fail(&mut ws, &e).await,
        Ok(Some(Ok(t))) => t,
    };
    let mut init: Value = match serde_json::from_str(&first) {
        Ok(v) => v,
        Err(e) => return fail(&mut ws, &e.to_string()).await,
    };
    if init.get("type").and_then(Value::as_str) != Some("init") {
        return ws::close(&mut ws, 4003, "Not yet initialized").await;
    }
    // "the same parameters as the /execute endpoint, except that stdin is discarded"
    if let Some(o) = init.as_object_mut() {
        o.remove("type");
        o.remove("stdin");
    }
    let mut job = match to_job(&state, &init) {
        Ok(j) => j,
        Err(e) => return fail(&mut ws, &e.message).await,
    };
    job.stdin.clear();
    let (language, version) = (job.language.name.clone(), job.language.version.clone());
    let mut run = match Run::start(&state, job).await {
        Ok(r) => r,
        Err(e) => return fail(&mut ws, &e.message).await,
    };
    let runtime = json!({"type": "runtime", "language": language, "version": version});
    if ws::send_json(&mut ws, &runtime).await.is_err() {
        return;
    }
    let mut out = Output::default();
    loop {
        tokio::select! {
            m = ws::next_text(&mut ws) => match m {
                // The client went away: dropping the run kills its VM.
                None => return,
                Some(Err(e)) => return fail(&mut ws, &e).await,
                Some(Ok(text)) => match client_message(&text) {
                    Ok(Client::Init) => return ws::close(&mut ws, 4000, "Already Initialized").await,
                    Ok(Client::Stdin(data)) => {
                        if let Err(e) = run.stdin(data.into_bytes()).await {
                            return fail(&mut ws, &e).await;
                        }
                    }
                    Ok(Client::Signal(n)) => run.signal(n).await,
                    Ok(Client::Other) => {}
                    Err(Refuse::Close(code, reason)) => return ws::close(&mut ws, code, reason).await,
                    Err(Refuse::Error(e)) => return fail(&mut ws, &e).await,
                },
            },
            step = run.next() => match step {
                Step::Event(ev) => {
                    for msg in out.messages(ev) {
                        if ws::send_json(&mut ws, &msg).await.is_err() {
                            return;
                        }
                    }
                }
                Step::Done(Ok(outcome)) => match outcome.result {
                    Ok(resp) => {
                        // A stage that started must end with its `exit` (clients wait for it)
                        // even when its end came only in the final result.
                        for msg in out.unended(&resp) {
                            if ws::send_json(&mut ws, &msg).await.is_err() {
                                return;
                            }
                        }
                        return ws::close(&mut ws, 4999, "Job Completed").await;
                    }
                    Err(e) => return fail(&mut ws, &e.to_string()).await,
                },
                Step::Done(Err(e)) => return fail(&mut ws, &e.message).await,
            },
        }
    }
}

/// Fuzzing (`fuzz/fuzz_targets/interactive_messages.rs`): a Piston client's message after
/// `init`; never panics, and a signal it accepts is one the guest may receive.
#[doc(hidden)]
pub fn fuzz_client_message(text: &str) {
    if let Ok(Client::Signal(n)) = client_message(text) {
        assert!(
            cloude_protocol::interactive::signal_allowed(n),
            "signal {n}"
        );
    }
}

/// A client message after `init`.
enum Client {
    Init,
    Stdin(String),
    Signal(i32),
    /// A type Piston ignores.
    Other,
}

enum Refuse {
    Close(u16, &'static str),
    Error(String),
}

fn client_message(text: &str) -> Result<Client, Refuse> {
    let msg: Value = serde_json::from_str(text).map_err(|e| Refuse::Error(e.to_string()))?;
    match msg.get("type").and_then(Value::as_str) {
        Some("init") => Ok(Client::Init),
        Some("data") => {
            if msg.get("stream").and_then(Value::as_str) != Some("stdin") {
                return Err(Refuse::Close(4004, "Can only write to stdin"));
            }
            match msg.get("data") {
                Some(Value::String(s)) => Ok(Client::Stdin(s.clone())),
                _ => Err(Refuse::Error("data must be a string".into())),
            }
        }
        Some("signal") => msg
            .get("signal")
            .and_then(Value::as_str)
            .and_then(cloude_api::signal_number)
            .filter(|n| cloude_protocol::interactive::signal_allowed(*n))
            .map(Client::Signal)
            .ok_or(Refuse::Close(4005, "Invalid signal")),
        _ => Ok(Client::Other),
    }
}

/// Turns the run's events into Piston's messages, keeping each stage's output for its `exit`.
#[derive(Default)]
struct Output {
    joiners: [Utf8Joiner; 2],
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    /// The stage that started and has not ended yet.
    open: Option<Stage>,
}

impl Output {
    /// The `exit` of a stage that started but whose end event never came, from the final
    /// result (logged: the agent should always send the end).
    fn unended(&mut self, resp: &cloude_protocol::RunResponse) -> Vec<Value> {
        let Some(stage) = self.open else {
            return vec![];
        };
        let r = match stage {
            Stage::Compile => resp.compile.as_ref(),
            Stage::Run => resp.run.as_ref(),
        };
        let Some(r) = r else {
            return vec![];
        };
        tracing::warn!(
            stage = stage_name(stage),
            status = ?r.status,
            message = r.message.as_deref().unwrap_or(""),
            "piston connect: the stage's end came only in the final result"
        );
        self.messages(StreamEvent::ended(stage, r))
    }

    fn messages(&mut self, ev: StreamEvent) -> Vec<Value> {
        match ev {
            StreamEvent::Started { stage } => {
                *self = Output {
                    open: Some(stage),
                    ..Output::default()
                };
                vec![json!({"type": "stage", "stage": stage_name(stage)})]
            }
            StreamEvent::Output { stream, data, .. } => {
                let (i, name, keep) = match stream {
                    StreamKind::Stdout => (0, "stdout", &mut self.stdout),
                    StreamKind::Stderr => (1, "stderr", &mut self.stderr),
                };
                keep.extend_from_slice(&data.0);
                let text = self.joiners[i].push(&data.0);
                if text.is_empty() {
                    return vec![];
                }
                vec![json!({"type": "data", "stream": name, "data": text})]
            }
            StreamEvent::Ended {
                stage,
                exit_code,
                signal,
                status,
                message,
                wall_ms,
                cpu_ms,
                memory_kib,
            } => {
                let r = StageResult {
                    stdout: Bytes(std::mem::take(&mut self.stdout)),
                    stderr: Bytes(std::mem::take(&mut self.stderr)),
                    exit_code,
                    signal,
                    status,
                    message,
                    wall_ms,
                    cpu_ms,
                    memory_kib,
                };
                self.open = None;
                let mut exit = serde_json::to_value(piston_stage(&r)).unwrap_or(json!({}));
                if let Some(o) = exit.as_object_mut() {
                    o.insert("type".into(), "exit".into());
                    o.insert("stage".into(), stage_name(stage).into());
                }
                vec![exit]
            }
            StreamEvent::Result { .. } | StreamEvent::Error { .. } => vec![],
        }
    }
}

fn stage_name(s: Stage) -> &'static str {
    match s {
        Stage::Compile => "compile",
        Stage::Run => "run",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_messages_map_to_piston_close_codes() {
        assert!(matches!(
            client_message(r#"{"type":"data","stream":"stdin","data":"hi\n"}"#),
            Ok(Client::Stdin(s)) if s == "hi\n"
        ));
        assert!(matches!(
            client_message(r#"{"type":"data","stream":"stdout","data":"x"}"#),
            Err(Refuse::Close(4004, _))
        ));
        assert!(matches!(
            client_message(r#"{"type":"signal","signal":"SIGINT"}"#),
            Ok(Client::Signal(2))
        ));
        for bad in [r#""SIGLOST""#, r#""KILL""#, "9", "null"] {
            let m = format!(r#"{{"type":"signal","signal":{bad}}}"#);
            assert!(
                matches!(client_message(&m), Err(Refuse::Close(4005, _))),
                "{m}"
            );
        }
        assert!(matches!(
            client_message(r#"{"type":"init"}"#),
            Ok(Client::Init)
        ));
        assert!(matches!(client_message("{"), Err(Refuse::Error(_))));
        assert!(matches!(
            client_message(r#"{"type":"x"}"#),
            Ok(Client::Other)
        ));
    }

    #[test]
    fn a_stage_whose_end_came_only_in_the_result_still_gets_its_exit() {
        let mut o = Output::default();
        o.messages(StreamEvent::Started { stage: Stage::Run });
        o.messages(StreamEvent::Output {
            stage: Stage::Run,
            stream: StreamKind::Stdout,
            data: Bytes(b"ready\n".to_vec()),
        });
        let result = StageResult {
            stdout: Bytes(vec![]),
            stderr: Bytes(vec![]),
            exit_code: None,
            signal: None,
            status: cloude_protocol::StageStatus::Error,
            message: Some("lost track".into()),
            wall_ms: 1,
            cpu_ms: 1,
            memory_kib: 1,
        };
        let resp = cloude_protocol::RunResponse {
            compile: None,
            run: Some(result),
            tests: vec![],
        };
        let m = o.unended(&resp);
        assert_eq!(m.len(), 1);
        assert_eq!(m[0]["type"], "exit");
        assert_eq!(m[0]["stage"], "run");
        assert_eq!(m[0]["stdout"], "ready\n");
        // Once ended, nothing more.
        assert!(o.unended(&resp).is_empty());
    }

    #[test]
    fn exit_messages_carry_the_stage_output() {
        let mut o = Output::default();
        let m = o.messages(StreamEvent::Started { stage: Stage::Run });
        assert_eq!(m[0], json!({"type": "stage", "stage": "run"}));
        let m = o.messages(StreamEvent::Output {
            stage: Stage::Run,
            stream: StreamKind::Stdout,
            data: Bytes("é".as_bytes()[..1].to_vec()),
        });
        assert!(m.is_empty(), "half a UTF-8 sequence waits for the rest");
        let m = o.messages(StreamEvent::Output {
            stage: Stage::Run,
            stream: StreamKind::Stdout,
            data: Bytes("é".as_bytes()[1..].to_vec()),
        });
        assert_eq!(m[0]["data"], "é");
        let m = o.messages(StreamEvent::Ended {
            stage: Stage::Run,
            exit_code: None,
            signal: Some(9),
            status: cloude_protocol::StageStatus::Ok,
            message: None,
            wall_ms: 5,
            cpu_ms: 1,
            memory_kib: 3,
        });
        assert_eq!(m[0]["type"], "exit");
        assert_eq!(m[0]["stage"], "run");
        assert_eq!(m[0]["signal"], "SIGKILL");
        assert_eq!(m[0]["stdout"], "é");
        assert_eq!(m[0]["code"], Value::Null);
    }
}
