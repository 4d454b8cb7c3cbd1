//! E2B's code interpreter (its port 49999): `POST /execute` and `/contexts`. A context is a
//! sandbox process running our own `interpreter.py` (Python, as the sandbox user), tagged
//! `e2b-context:<id>`; an execution is one JSON line on its standard input, and its events are
//! the JSON lines it writes, each carrying the execution's id, forwarded to the client as NDJSON
//! while they come. The process keeps its variables between executions; the default context is
//! started on the first execution that names none.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, post, MethodRouter};
use axum::Json;
use bytes::Bytes;
use cloude_protocol::interactive::Input;
use cloude_protocol::sandbox::{ProcStart, SandboxUser, FROM_NOW, SANDBOX_HOME};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::envd::{target, Target};
use super::E2bError;
use crate::api::AppState;
use crate::sandbox::ProcEvent;

/// Our context program (Python).
const INTERPRETER: &str = include_str!("interpreter.py");
const TAG_PREFIX: &str = "e2b-context:";
const DEFAULT_CONTEXT: &str = "default";
/// Longest event line taken from a context (a large figure as a png).
const MAX_EVENT_LINE_BYTES: usize = 16 << 20;
/// Largest request body (code and its variables).
const MAX_BODY_BYTES: usize = 4 << 20;
/// NDJSON lines queued for a slow client.
const LINE_QUEUE: usize = 64;

static EXECUTIONS: AtomicU64 = AtomicU64::new(1);

pub fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/e2b/execute", post(execute)),
        ("/e2b/contexts", post(create_context).get(list_contexts)),
        ("/e2b/contexts/:id", delete(delete_context)),
        ("/e2b/contexts/:id/restart", post(restart_context)),
    ]
}

async fn json_body<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, E2bError> {
    let b = crate::api::json::read_body(body, MAX_BODY_BYTES).await?;
    serde_json::from_slice(&b).map_err(|e| E2bError::bad(format!("invalid JSON body: {e}")))
}

fn python_only(language: Option<&str>) -> Result<(), E2bError> {
    match language {
        None | Some("python") | Some("python3") => Ok(()),
        Some(other) => Err(E2bError::bad(format!(
            "language {other:?}: this code interpreter runs python only"
        ))),
    }
}

/// Starts a context process; its pid.
async fn start_context(t: &Target, id: &str, cwd: Option<String>) -> Result<u32, E2bError> {
    let start = ProcStart {
        protocol_version: cloude_protocol::PROTOCOL_VERSION,
        argv: vec![
            "python3".into(),
            "-u".into(),
            "-c".into(),
            INTERPRETER.into(),
        ],
        env: vec![("PYTHONUNBUFFERED".into(), "1".into())],
        cwd,
        user: SandboxUser::User,
        tag: Some(format!("{TAG_PREFIX}{id}")),
        timeout_ms: 0,
        stdin: true,
        tty: None,
    };
    Ok(t.sbx.start_proc(&t.id, start).await?)
}

/// The running context `id`: its pid and working directory.
async fn find_context(t: &Target, id: &str) -> Result<Option<(u32, String)>, E2bError> {
    let tag = format!("{TAG_PREFIX}{id}");
    Ok(t.sbx
        .list_procs(&t.id)
        .await?
        .into_iter()
        .filter(|p| p.running && p.tag.as_deref() == Some(tag.as_str()))
        .map(|p| (p.id, p.cwd))
        .next_back())
}

fn context_json(id: &str, cwd: &str) -> Value {
    json!({"id": id, "language": "python", "cwd": cwd})
}

#[derive(Debug, Default, Deserialize)]
struct ContextIn {
    language: Option<String>,
    cwd: Option<String>,
}

async fn create_context(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, E2bError> {
    let t = target(&state, &headers)?;
    let req: ContextIn = json_body(body).await?;
    python_only(req.language.as_deref())?;
    let mut b = [0u8; 8];
    crate::agent::fill_random(&mut b)
        .map_err(|e| E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    let id: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let cwd = req.cwd.unwrap_or_else(|| SANDBOX_HOME.into());
    start_context(&t, &id, Some(cwd.clone())).await?;
    Ok(Json(context_json(&id, &cwd)))
}

async fn list_contexts(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Vec<Value>>, E2bError> {
    let t = target(&state, &headers)?;
    let v = t
        .sbx
        .list_procs(&t.id)
        .await?
        .into_iter()
        .filter(|p| p.running)
        .filter_map(|p| {
            let id = p.tag.as_deref()?.strip_prefix(TAG_PREFIX)?.to_string();
            Some(context_json(&id, &p.cwd))
        })
        .collect();
    Ok(Json(v))
}

async fn delete_context(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let t = target(&state, &headers)?;
    let (pid, _) = find_context(&t, &id)
        .await?
        .ok_or_else(|| E2bError::not_found(format!("no context {id:?}")))?;
    t.sbx.delete_proc(&t.id, pid).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn restart_context(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let t = target(&state, &headers)?;
    let (pid, cwd) = find_context(&t, &id)
        .await?
        .ok_or_else(|| E2bError::not_found(format!("no context {id:?}")))?;
    t.sbx.delete_proc(&t.id, pid).await?;
    start_context(&t, &id, Some(cwd)).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Deserialize)]
struct ExecuteIn {
    code: String,
    context_id: Option<String>,
    language: Option<String>,
    env_vars: Option<std::collections::HashMap<String, String>>,
}

/// `POST /execute`: NDJSON events of one execution, as they come.
async fn execute(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, E2bError> {
    let t = target(&state, &headers)?;
    let req: ExecuteIn = json_body(body).await?;
    if req.context_id.is_none() {
        python_only(req.language.as_deref())?;
    }
    let ctx = req.context_id.as_deref().unwrap_or(DEFAULT_CONTEXT);
    let pid = match find_context(&t, ctx).await? {
        Some((pid, _)) => pid,
        None if ctx == DEFAULT_CONTEXT => start_context(&t, ctx, None).await?,
        None => return Err(E2bError::not_found(format!("no context {ctx:?}"))),
    };
    // Where this execution's events start: what the context writes from now on.
    let since = t
        .sbx
        .read_proc(&t.id, pid, FROM_NOW, Duration::ZERO)
        .await?
        .next;
    let x = EXECUTIONS.fetch_add(1, Ordering::Relaxed);
    let mut line = serde_json::to_vec(&json!({
        "x": x,
        "code": req.code,
        "env": req.env_vars.unwrap_or_default(),
    }))
    .map_err(|e| E2bError::bad(e.to_string()))?;
    line.push(b'\n');
    t.sbx
        .proc_input(&t.id, pid, Input::Stdin { data: line.into() })
        .await?;
    let (tx, rx) = mpsc::channel::<Bytes>(LINE_QUEUE);
    tokio::spawn(follow(t, pid, since, x, tx));
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

fn ndjson(v: &Value) -> Bytes {
    let mut b = serde_json::to_vec(v).unwrap_or_default();
    b.push(b'\n');
    b.into()
}

/// Forwards execution `x`'s events from the context's output; ends after its
/// `end_of_execution` (or with an error event if the context died or output was lost).
async fn follow(t: Target, pid: u32, since: u64, x: u64, tx: mpsc::Sender<Bytes>) {
    let (etx, mut erx) = mpsc::channel(16);
    let mut poller = {
        let (sbx, id) = (t.sbx.clone(), t.id.clone());
        tokio::spawn(async move { sbx.follow_proc(&id, pid, since, &etx).await })
    };
    let error = |name: &str, value: String| {
        ndjson(&json!({"type": "error", "name": name, "value": value, "traceback": ""}))
    };
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let ev = tokio::select! {
            ev = erx.recv() => ev,
            () = tx.closed() => return,
        };
        match ev {
            Some(ProcEvent::Output(c)) => {
                if c.stream == cloude_protocol::StreamKind::Stdout {
                    pending.extend_from_slice(&c.data.0);
                }
            }
            Some(ProcEvent::Skipped(n)) => {
                // The agent's buffer dropped output we had not read: the line in progress is lost.
                pending.clear();
                let msg = format!("{n} bytes of the context's output were dropped");
                if tx.send(error("OutputLost", msg)).await.is_err() {
                    return;
                }
            }
            Some(ProcEvent::End(end)) => {
                let why = end.message.unwrap_or_else(|| {
                    format!("exit code {:?}, signal {:?}", end.exit_code, end.signal)
                });
                let msg = format!("the context's Python process ended: {why}");
                let _ = tx.send(error("ContextDied", msg)).await;
                let _ = tx.send(ndjson(&json!({"type": "end_of_execution"}))).await;
                return;
            }
            None => {
                let why = match (&mut poller).await {
                    Ok(Err(e)) => e.to_string(),
                    _ => "following the context failed".into(),
                };
                let _ = tx.send(error("SandboxError", why)).await;
                return;
            }
        }
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=i).collect();
            let Ok(mut ev) = serde_json::from_slice::<Value>(&line) else {
                // What a subprocess wrote straight to the descriptor: stdout of whoever runs.
                let text = String::from_utf8_lossy(&line).into_owned();
                let ev = json!({"type": "stdout", "text": text, "timestamp": 0});
                if tx.send(ndjson(&ev)).await.is_err() {
                    return;
                }
                continue;
            };
            if ev.get("x").and_then(Value::as_u64) != Some(x) {
                continue;
            }
            if let Some(o) = ev.as_object_mut() {
                o.remove("x");
            }
            let last = ev.get("type").and_then(Value::as_str) == Some("end_of_execution");
            if tx.send(ndjson(&ev)).await.is_err() || last {
                return;
            }
        }
        if pending.len() > MAX_EVENT_LINE_BYTES {
            let msg = format!("an output line over {MAX_EVENT_LINE_BYTES} bytes");
            let _ = tx.send(error("OutputTooLarge", msg)).await;
            return;
        }
    }
}
