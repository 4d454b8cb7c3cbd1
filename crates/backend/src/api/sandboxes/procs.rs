//! Processes that outlive the call (`/v1/sandboxes/{id}/procs…`) and commands whose output
//! streams (`…/exec/stream`), over `Sandboxes`' process calls.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine as _;
use cloude_api::sandbox::{
    ExecIn, ExecLine, OutputChunk, ProcExit, ProcIn, ProcList, ProcOut, ProcOutputOut,
};
use cloude_api::WsInput;
use cloude_protocol::interactive::Input;
use cloude_protocol::sandbox::{
    validate_sandbox_path, ProcChunk, ProcEnd, ProcStart, MAX_PROC_TIMEOUT_MS, MAX_PROC_WAIT_MS,
};
use serde::Deserialize;

use super::{check_env, checked_id, sandboxes, user_of};
use crate::api::error::ApiError;
use crate::api::json::ApiJson;
use crate::api::AppState;
use crate::sandbox::{ProcEvent, SandboxError};

/// `cmd` (run by `/bin/bash -lc`) or `argv`, exactly one.
pub(super) fn argv_of(
    cmd: Option<String>,
    argv: Option<Vec<String>>,
) -> Result<Vec<String>, ApiError> {
    match (cmd, argv) {
        (Some(cmd), None) => Ok(vec!["/bin/bash".into(), "-lc".into(), cmd]),
        (None, Some(argv)) if !argv.is_empty() => Ok(argv),
        _ => Err(ApiError::invalid(
            "cmd",
            "give exactly one of cmd (run by /bin/bash -lc) or argv (non-empty)",
        )),
    }
}

pub(super) fn chunk_out(c: ProcChunk) -> OutputChunk {
    let stream = match c.stream {
        cloude_protocol::StreamKind::Stdout => "stdout",
        cloude_protocol::StreamKind::Stderr => "stderr",
    };
    let data_base64 = std::str::from_utf8(&c.data.0)
        .is_err()
        .then(|| base64::engine::general_purpose::STANDARD.encode(&c.data.0));
    OutputChunk {
        stream: stream.into(),
        text: String::from_utf8_lossy(&c.data.0).into_owned(),
        data_base64,
    }
}

pub(super) fn exit_out(e: ProcEnd) -> ProcExit {
    ProcExit {
        exit_code: e.exit_code,
        signal: e.signal.map(cloude_api::signal_name),
        status: e.status,
        message: e.message,
    }
}

/// A checked process start.
pub(super) fn proc_start(req: ProcIn) -> Result<ProcStart, ApiError> {
    let argv = argv_of(req.cmd, req.argv)?;
    let env: Vec<(String, String)> = req.env.unwrap_or_default().into_iter().collect();
    check_env(&env, "env")?;
    if let Some(c) = &req.cwd {
        validate_sandbox_path(c).map_err(|e| ApiError::invalid("cwd", e.to_string()))?;
    }
    let timeout_ms = req.timeout_ms.unwrap_or(0);
    if timeout_ms > MAX_PROC_TIMEOUT_MS {
        return Err(ApiError::invalid(
            "timeout_ms",
            format!("{timeout_ms} is out of range: at most {MAX_PROC_TIMEOUT_MS} ms"),
        ));
    }
    let start = ProcStart {
        protocol_version: cloude_protocol::PROTOCOL_VERSION,
        argv,
        env,
        cwd: req.cwd,
        user: user_of(req.user.as_deref())?,
        tag: req.tag,
        timeout_ms,
        stdin: req.stdin.unwrap_or(false),
        tty: None,
    };
    start
        .validate()
        .map_err(|e| ApiError::invalid("argv", e.to_string()))?;
    Ok(start)
}

fn proc_error(e: SandboxError, pid: u32) -> ApiError {
    match e {
        SandboxError::NoFile(_) => ApiError::gone_or_missing(format!("no process {pid}")),
        e => e.into(),
    }
}

pub(super) async fn start_proc(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ProcIn>,
) -> Result<Response, ApiError> {
    let sbx = sandboxes(&state)?;
    let id = checked_id(&id)?;
    let start = proc_start(req)?;
    let (tag, argv, cwd) = (start.tag.clone(), start.argv.clone(), start.cwd.clone());
    let pid = sbx.start_proc(id, start).await?;
    let out = ProcOut {
        pid,
        tag,
        argv,
        cwd: cwd.unwrap_or_else(|| cloude_protocol::sandbox::SANDBOX_HOME.into()),
        running: true,
    };
    Ok((StatusCode::CREATED, Json(out)).into_response())
}

pub(super) async fn list_procs(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<ProcList>, ApiError> {
    let sbx = sandboxes(&state)?;
    let procs = sbx.list_procs(checked_id(&id)?).await?;
    Ok(Json(ProcList {
        procs: procs
            .into_iter()
            .map(|p| ProcOut {
                pid: p.id,
                tag: p.tag,
                argv: p.argv,
                cwd: p.cwd,
                running: p.running,
            })
            .collect(),
    }))
}

#[derive(Debug, Deserialize)]
pub(super) struct OutputQuery {
    #[serde(default)]
    since: u64,
    #[serde(default)]
    wait_ms: u64,
}

pub(super) async fn proc_output(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, u32)>,
    Query(q): Query<OutputQuery>,
) -> Result<Json<ProcOutputOut>, ApiError> {
    let sbx = sandboxes(&state)?;
    let wait = Duration::from_millis(q.wait_ms.min(MAX_PROC_WAIT_MS));
    let out = sbx
        .read_proc(checked_id(&id)?, pid, q.since, wait)
        .await
        .map_err(|e| proc_error(e, pid))?;
    Ok(Json(ProcOutputOut {
        chunks: out.chunks.into_iter().map(chunk_out).collect(),
        next: out.next,
        skipped: out.skipped,
        exit: out.end.map(exit_out),
    }))
}

/// An input of the WebSocket faces' shape, for a sandbox process.
pub(super) fn input_of(i: WsInput) -> Result<Input, ApiError> {
    Ok(match i {
        WsInput::Stdin { data, data_base64 } => {
            let bytes = match (data, data_base64) {
                (Some(d), None) => d.into_bytes(),
                (None, Some(b)) => base64::engine::general_purpose::STANDARD
                    .decode(b)
                    .map_err(|e| ApiError::invalid("data_base64", e.to_string()))?,
                _ => {
                    return Err(ApiError::invalid(
                        "data",
                        "stdin takes exactly one of data and data_base64",
                    ))
                }
            };
            Input::Stdin { data: bytes.into() }
        }
        WsInput::CloseStdin => Input::CloseStdin,
        WsInput::Signal { signal } => Input::Signal {
            signal: signal
                .number()
                .filter(|n| cloude_protocol::interactive::signal_allowed(*n))
                .ok_or_else(|| {
                    ApiError::invalid(
                        "signal",
                        format!("{signal:?} is not a signal that can be sent"),
                    )
                })?,
        },
        WsInput::Resize { rows, cols } => Input::Resize { rows, cols },
    })
}

pub(super) async fn proc_input(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, u32)>,
    ApiJson(req): ApiJson<WsInput>,
) -> Result<StatusCode, ApiError> {
    let sbx = sandboxes(&state)?;
    let input = input_of(req)?;
    sbx.proc_input(checked_id(&id)?, pid, input)
        .await
        .map_err(|e| proc_error(e, pid))?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn delete_proc(
    State(state): State<Arc<AppState>>,
    Path((id, pid)): Path<(String, u32)>,
) -> Result<StatusCode, ApiError> {
    let sbx = sandboxes(&state)?;
    sbx.delete_proc(checked_id(&id)?, pid)
        .await
        .map_err(|e| proc_error(e, pid))?;
    Ok(StatusCode::NO_CONTENT)
}

fn ndjson_line(l: &ExecLine) -> bytes::Bytes {
    let mut b = serde_json::to_vec(l).unwrap_or_default();
    b.push(b'\n');
    b.into()
}

/// `POST …/exec/stream`: one command whose output streams as NDJSON (`started`, `output`…,
/// `exit`); a client that goes away kills it.
pub(super) async fn exec_stream(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecIn>,
) -> Result<Response, ApiError> {
    let sbx = sandboxes(&state)?.clone();
    let id = checked_id(&id)?.to_string();
    let r = super::exec_request(&state, req)?;
    let stdin = r.stdin.0.clone();
    let start = super::proc_of(r, !stdin.is_empty());
    let pid = sbx.start_proc(&id, start).await?;
    if !stdin.is_empty() {
        sbx.proc_input(&id, pid, Input::Stdin { data: stdin.into() })
            .await?;
        sbx.proc_input(&id, pid, Input::CloseStdin).await?;
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(64);
    tokio::spawn(async move {
        let _ = tx.send(ndjson_line(&ExecLine::Started { pid })).await;
        let (etx, mut erx) = tokio::sync::mpsc::channel(16);
        let mut poller = {
            let (sbx, id) = (sbx.clone(), id.clone());
            tokio::spawn(async move { sbx.follow_proc(&id, pid, 0, &etx).await })
        };
        loop {
            let ev = tokio::select! {
                ev = erx.recv() => ev,
                () = tx.closed() => {
                    // The client went away: so does its command.
                    let _ = sbx.delete_proc(&id, pid).await;
                    return;
                }
            };
            let line = match ev {
                Some(ProcEvent::Output(c)) => ExecLine::Output(chunk_out(c)),
                Some(ProcEvent::Skipped(_)) => continue,
                Some(ProcEvent::End(e)) => {
                    let _ = tx.send(ndjson_line(&ExecLine::Exit(exit_out(e)))).await;
                    let _ = sbx.delete_proc(&id, pid).await;
                    return;
                }
                None => {
                    let e = match (&mut poller).await {
                        Ok(Err(e)) => ApiError::from(e),
                        _ => ApiError::internal("following the command failed"),
                    };
                    let _ = tx
                        .send(ndjson_line(&ExecLine::Error {
                            error: e.code.into(),
                            message: e.message,
                        }))
                        .await;
                    return;
                }
            };
            if tx.send(ndjson_line(&line)).await.is_err() {
                let _ = sbx.delete_proc(&id, pid).await;
                return;
            }
        }
    });
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(body),
    )
        .into_response())
}
