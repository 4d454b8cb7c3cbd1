//! `GET /v1/sandboxes/{id}/shell`: a terminal in a sandbox over a WebSocket (`cloude sandbox
//! shell`). The client's first message is a `ShellIn`, then `WsInput`s; the server sends
//! `ExecLine`s. The program is a sandbox process on a pseudo-terminal, followed with
//! `Sandboxes::follow_proc`; closing the socket kills it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::response::Response;
use cloude_api::sandbox::{ExecLine, ProcIn};
use cloude_api::WsInput;

use super::procs::{chunk_out, exit_out, input_of, proc_start};
use super::{checked_id, sandboxes};
use crate::api::error::ApiError;
use crate::api::ws;
use crate::api::AppState;
use crate::sandbox::{ProcEvent, Sandboxes};

/// How long a shell client may take to send its first message.
const SHELL_START_TIMEOUT: Duration = Duration::from_secs(10);

/// `GET /v1/sandboxes/{id}/shell` (WebSocket): a program on a terminal in the sandbox (default
/// `bash -il`), the client's keys as its input, its output as `output` lines; closing the socket
/// kills it, and it ending closes the socket (1000 after an `exit` line).
pub(super) async fn shell(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    handover: Option<axum::Extension<ws::Handover>>,
    method: axum::http::Method,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let sbx = sandboxes(&state)?.clone();
    let id = checked_id(&id)?.to_string();
    sbx.get(&id)?;
    Ok(ws::accept(
        &method,
        &headers,
        handover.as_deref(),
        move |ws| shell_session(sbx, id, ws),
    ))
}

async fn shell_refuse(ws: &mut ws::Socket, code: u16, error: &str, message: String) {
    let line = ExecLine::Error {
        error: error.into(),
        message,
    };
    let _ = ws::send_json(ws, &line).await;
    ws::close(ws, code, error).await;
}

async fn shell_session(sbx: Arc<Sandboxes>, id: String, mut ws: ws::Socket) {
    let first = match tokio::time::timeout(SHELL_START_TIMEOUT, ws::next_text(&mut ws)).await {
        Err(_) => {
            let m = format!(
                "no first message within {} s",
                SHELL_START_TIMEOUT.as_secs()
            );
            return shell_refuse(&mut ws, 1008, "request_timeout", m).await;
        }
        Ok(None) => return,
        Ok(Some(Err(e))) => return shell_refuse(&mut ws, 1009, "too_large", e).await,
        Ok(Some(Ok(text))) => text,
    };
    let req: cloude_api::sandbox::ShellIn = match crate::api::json::decode(first.as_bytes()) {
        Ok(r) => r,
        Err(e) => return shell_refuse(&mut ws, 1008, e.code, e.message).await,
    };
    let start = (|| {
        let size = req
            .tty
            .unwrap_or(cloude_protocol::TtySize { rows: 24, cols: 80 });
        size.validate()
            .map_err(|e| ApiError::invalid("tty", e.to_string()))?;
        let mut env = req.env.unwrap_or_default();
        env.entry("TERM".into())
            .or_insert_with(|| "xterm-256color".into());
        let mut start = proc_start(ProcIn {
            cmd: None,
            argv: Some(
                req.argv
                    .unwrap_or_else(|| vec!["/bin/bash".into(), "-il".into()]),
            ),
            env: Some(env),
            cwd: req.cwd,
            user: req.user,
            tag: Some("shell".into()),
            stdin: Some(true),
            timeout_ms: None,
        })?;
        start.tty = Some(size);
        Ok::<_, ApiError>(start)
    })();
    let start = match start {
        Ok(s) => s,
        Err(e) => return shell_refuse(&mut ws, 1008, e.code, e.message).await,
    };
    let pid = match sbx.start_proc(&id, start).await {
        Ok(p) => p,
        Err(e) => {
            let e = ApiError::from(e);
            return shell_refuse(&mut ws, 1011, e.code, e.message).await;
        }
    };
    if ws::send_json(&mut ws, &ExecLine::Started { pid })
        .await
        .is_err()
    {
        let _ = sbx.delete_proc(&id, pid).await;
        return;
    }
    let (etx, mut erx) = tokio::sync::mpsc::channel(16);
    let mut poller = {
        let (sbx, id) = (sbx.clone(), id.clone());
        tokio::spawn(async move { sbx.follow_proc(&id, pid, 0, &etx).await })
    };
    loop {
        tokio::select! {
            m = ws::next_text(&mut ws) => match m {
                None => break,
                Some(Err(e)) => {
                    shell_refuse(&mut ws, 1009, "too_large", e).await;
                    break;
                }
                Some(Ok(text)) => {
                    let input = crate::api::json::decode::<WsInput>(text.as_bytes())
                        .and_then(input_of);
                    let sent = match input {
                        Ok(i) => sbx.proc_input(&id, pid, i).await.map_err(ApiError::from),
                        Err(e) => Err(e),
                    };
                    if let Err(e) = sent {
                        shell_refuse(&mut ws, 1008, e.code, e.message).await;
                        break;
                    }
                }
            },
            ev = erx.recv() => match ev {
                Some(ProcEvent::Output(c)) => {
                    if ws::send_json(&mut ws, &ExecLine::Output(chunk_out(c))).await.is_err() {
                        break;
                    }
                }
                Some(ProcEvent::Skipped(_)) => {}
                Some(ProcEvent::End(e)) => {
                    let _ = ws::send_json(&mut ws, &ExecLine::Exit(exit_out(e))).await;
                    ws::close(&mut ws, 1000, "done").await;
                    break;
                }
                None => {
                    let e = match (&mut poller).await {
                        Ok(Err(e)) => ApiError::from(e),
                        _ => ApiError::internal("following the shell failed"),
                    };
                    shell_refuse(&mut ws, 1011, e.code, e.message).await;
                    break;
                }
            },
        }
    }
    // Whatever ended the session, the program goes with it.
    let _ = sbx.delete_proc(&id, pid).await;
}
