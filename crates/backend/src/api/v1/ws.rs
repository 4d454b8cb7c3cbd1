//! `GET /v1/executions/ws`: an execution the client talks to while it runs.
//!
//! The client's first message is an [`ExecutionRequest`] (the `/v1/executions` body; its
//! `stdin`, if any, is the program's first input) within [`START_TIMEOUT`]; then any number of
//! [`WsInput`] messages (`stdin`, `close_stdin`, `signal`). The server sends
//! [`StreamLine`]s: `stage` and `exit` around each stage, `output` as the program writes, and
//! last `result` (the `/v1/executions` answer) or `error`, then closes (1000). A message the
//! server cannot accept is answered with an `error` line and a close with 1008 (policy) or,
//! for a message over [`super::super::ws::MAX_MESSAGE_BYTES`], 1009.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, Method};
use axum::response::Response;
use axum::Extension;
use base64::Engine as _;
use cloude_api::{ExecutionRequest, StreamLine, WsInput};
use cloude_protocol::StreamEvent;

use super::{response, to_job, Utf8Joiner};
use crate::api::interactive::{Run, Step};
use crate::api::request_id::RequestId;
use crate::api::ws::{self, Handover, Socket};
use crate::api::AppState;

/// How long a client may take to send its request after connecting.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

pub async fn connect(
    State(state): State<Arc<AppState>>,
    Extension(rid): Extension<RequestId>,
    handover: Option<Extension<Handover>>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    ws::accept(&method, &headers, handover.as_deref(), move |ws| {
        session(state, rid.0, ws)
    })
}

async fn refuse(ws: &mut Socket, code: u16, error: &str, message: String) {
    refuse_after(ws, code, error, message, None).await
}

/// [`refuse`] for a refusal that may pass: the client is told when to try again.
async fn refuse_after(
    ws: &mut Socket,
    code: u16,
    error: &str,
    message: String,
    retry_after_s: Option<u64>,
) {
    let line = StreamLine::Error {
        error: error.into(),
        message,
        retry_after_s,
    };
    let _ = ws::send_json(ws, &line).await;
    ws::close(ws, code, error).await;
}

async fn session(state: Arc<AppState>, rid: String, mut ws: Socket) {
    let t = Instant::now();
    let first = match tokio::time::timeout(START_TIMEOUT, ws::next_text(&mut ws)).await {
        Err(_) => {
            let m = format!("no request within {} s", START_TIMEOUT.as_secs());
            return refuse(&mut ws, 1008, "request_timeout", m).await;
        }
        Ok(None) => return,
        Ok(Some(Err(e))) => return refuse(&mut ws, 1009, "too_large", e).await,
        Ok(Some(Ok(text))) => text,
    };
    let req: ExecutionRequest = match crate::api::json::decode(first.as_bytes()) {
        Ok(r) => r,
        Err(e) => return refuse(&mut ws, 1008, e.code, e.message).await,
    };
    let job = match to_job(&state, req) {
        Ok(j) => j,
        Err(e) => return refuse(&mut ws, 1008, e.code, e.message).await,
    };
    if !job.tests.is_empty() {
        let m = "test cases are not interactive; POST them to /v1/executions".to_string();
        return refuse(&mut ws, 1008, "invalid_request", m).await;
    }
    let mut run = match Run::start(&state, job.clone()).await {
        Ok(r) => r,
        Err(e) => return refuse_after(&mut ws, 1008, e.code, e.message, e.retry_after).await,
    };
    // One joiner per (stage, stream), as the NDJSON route.
    let mut joiners: [Utf8Joiner; 4] = Default::default();
    loop {
        tokio::select! {
            m = ws::next_text(&mut ws) => match m {
                // The client went away: dropping the run kills its VM.
                None => {
                    state.record("v1_ws", "cancelled", t);
                    return;
                }
                Some(Err(e)) => return refuse(&mut ws, 1009, "too_large", e).await,
                Some(Ok(text)) => {
                    if let Err(m) = input(&mut run, &text).await {
                        return refuse(&mut ws, 1008, "invalid_request", m).await;
                    }
                }
            },
            step = run.next() => {
                let line = match step {
                    Step::Event(ev) => match line_of(ev, &mut joiners) {
                        Some(l) => l,
                        None => continue,
                    },
                    Step::Done(Ok(outcome)) => {
                        let mut resp = response(&job, &rid, outcome);
                        without_output(&mut resp);
                        state.record("v1_ws", resp.status.as_str(), t);
                        let last = StreamLine::Result { result: Box::new(resp) };
                        if let Err(e) = ws::send_json(&mut ws, &last).await {
                            tracing::info!("websocket ended before the result: {e}");
                            return;
                        }
                        return ws::close(&mut ws, 1000, "done").await;
                    }
                    Step::Done(Err(e)) => {
                        return refuse_after(&mut ws, 1011, e.code, e.message, e.retry_after).await
                    }
                };
                if let Err(e) = ws::send_json(&mut ws, &line).await {
                    tracing::info!("websocket ended: {e}");
                    return;
                }
            },
        }
    }
}

/// The final answer without the output the client already has from `output` lines: a result
/// must stay one modest message (WebSocket clients cap messages: 1 MiB in Python's
/// `websockets`, 16 MiB frames in tungstenite), whatever the output limit.
fn without_output(resp: &mut cloude_api::ExecutionResponse) {
    for (out, b64) in [
        (&mut resp.stdout, &mut resp.stdout_base64),
        (&mut resp.stderr, &mut resp.stderr_base64),
    ] {
        out.clear();
        *b64 = None;
    }
    if let Some(c) = &mut resp.compile {
        c.stdout.clear();
        c.stderr.clear();
    }
}

/// Applies one client message to the run.
async fn input(run: &mut Run, text: &str) -> Result<(), String> {
    let msg: WsInput = serde_json::from_str(text).map_err(|e| format!("invalid message: {e}"))?;
    match msg {
        WsInput::Stdin { data, data_base64 } => {
            let bytes = match (data, data_base64) {
                (Some(d), None) => d.into_bytes(),
                (None, Some(b)) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| format!("data_base64: {e}"))?,
                _ => return Err("stdin takes exactly one of data and data_base64".into()),
            };
            run.stdin(bytes).await
        }
        WsInput::CloseStdin => {
            run.close_stdin().await;
            Ok(())
        }
        WsInput::Resize { rows, cols } => {
            cloude_protocol::TtySize { rows, cols }
                .validate()
                .map_err(|e| e.to_string())?;
            run.resize(rows, cols).await;
            Ok(())
        }
        WsInput::Signal { signal } => {
            let n = signal
                .number()
                .filter(|n| cloude_protocol::interactive::signal_allowed(*n))
                .ok_or_else(|| format!("{signal:?} is not a signal that can be sent"))?;
            run.signal(n).await;
            Ok(())
        }
    }
}

/// The client's line for one event (`None`: nothing to send yet).
fn line_of(ev: StreamEvent, joiners: &mut [Utf8Joiner; 4]) -> Option<StreamLine> {
    match ev {
        StreamEvent::Started { stage } => Some(StreamLine::Stage { stage }),
        StreamEvent::Output {
            stage,
            stream,
            data,
        } => {
            let idx = usize::from(stage == cloude_protocol::Stage::Run) * 2
                + usize::from(stream == cloude_protocol::StreamKind::Stderr);
            let text = joiners[idx].push(&data.0);
            (!text.is_empty()).then_some(StreamLine::Output {
                stage,
                stream,
                data: text,
            })
        }
        StreamEvent::Ended {
            stage,
            exit_code,
            signal,
            status,
            wall_ms,
            cpu_ms,
            memory_kib,
            ..
        } => Some(StreamLine::Exit {
            stage,
            exit_code,
            signal: signal.map(cloude_api::signal_name),
            signal_number: signal,
            status,
            wall_ms,
            cpu_ms,
            memory_kib,
        }),
        StreamEvent::Result { .. } | StreamEvent::Error { .. } => None,
    }
}
