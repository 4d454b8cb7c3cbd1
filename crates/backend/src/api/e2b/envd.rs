//! What E2B's in-VM daemon (envd) serves, for the sandbox the `E2b-Sandbox-Id` header names:
//! processes (`process.Process`), the filesystem (`filesystem.Filesystem`), file bytes
//! (`/files`) and `/health`. Every call needs the sandbox's secret (`X-Access-Token`, or the
//! code interpreter's `E2B-Traffic-Access-Token`), given at creation as `envdAccessToken`.
//!
//! A process is a sandbox process (`Sandboxes::start_proc`): it outlives the stream that
//! started it (E2B's `background=True`, a client that disconnects), and a stream follows its
//! output with `Sandboxes::follow_proc` (short polls that share the sandbox's one agent
//! connection).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use base64::Engine as _;
use cloude_protocol::interactive::Input;
use cloude_protocol::sandbox::{
    validate_sandbox_path, DirEntry, FileOp, ProcStart, SandboxUser, FROM_NOW, MAX_LISTING_ENTRIES,
    SANDBOX_HOME,
};
use cloude_protocol::{StageStatus, StreamKind};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::connect::{self, StreamTx};
use super::E2bError;
use crate::agent::FileAnswer;
use crate::api::sandboxes::sandboxes;
use crate::api::AppState;
use crate::sandbox::{ProcEvent, Sandboxes};

/// A keepalive event after this long without one (E2B's clients ask for 50 s).
const KEEPALIVE_EVERY: Duration = Duration::from_secs(30);
/// Deepest recursive listing (`ListDir` depth).
const MAX_LIST_DEPTH: u32 = 8;
/// Slack on top of the file cap for a multipart body's framing.
const MULTIPART_SLACK_BYTES: usize = 64 * 1024;

pub fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/e2b/process.Process/:method", post(process)),
        ("/e2b/filesystem.Filesystem/:method", post(filesystem)),
        ("/e2b/files", get(read_file).post(write_files)),
        ("/e2b/health", get(health)),
    ]
}

/// The sandbox a call is for, its secret checked.
pub(super) struct Target {
    pub sbx: Arc<Sandboxes>,
    pub id: String,
    pub user: SandboxUser,
}

pub(super) fn target(state: &AppState, headers: &HeaderMap) -> Result<Target, E2bError> {
    let sbx = sandboxes(state)?.clone();
    let id = headers
        .get("e2b-sandbox-id")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| E2bError::bad("the E2b-Sandbox-Id header is required"))?;
    let gone = || {
        E2bError::new(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {id} was not found"),
        )
    };
    if !crate::sandbox::plausible_id(id) {
        return Err(gone());
    }
    let sb = sbx.get(id).map_err(|_| gone())?;
    let token = headers
        .get("x-access-token")
        .or_else(|| headers.get("e2b-traffic-access-token"))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !sb.token_matches(token) {
        return Err(E2bError::new(
            StatusCode::UNAUTHORIZED,
            "the sandbox's access token (X-Access-Token) is missing or wrong",
        ));
    }
    // As E2B's: a paused sandbox's envd does not answer (the SDK's `is_running` is then false).
    if sb.is_paused() {
        return Err(E2bError::new(
            StatusCode::BAD_GATEWAY,
            format!("The sandbox {id} is paused: connect to resume it"),
        ));
    }
    let user = user_of(headers)?;
    Ok(Target {
        sbx,
        id: id.to_string(),
        user,
    })
}

/// The user a call acts as: `Authorization: Basic base64(name:)`, `user` when absent.
fn user_of(headers: &HeaderMap) -> Result<SandboxUser, E2bError> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(SandboxUser::User);
    };
    let name = v
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .map(|s| s.split(':').next().unwrap_or("").to_string())
        .ok_or_else(|| E2bError::bad("Authorization: Basic base64(user:) expected"))?;
    named_user(&name)
}

fn named_user(name: &str) -> Result<SandboxUser, E2bError> {
    match name {
        "" | "user" => Ok(SandboxUser::User),
        "root" => Ok(SandboxUser::Root),
        other => Err(E2bError::bad(format!(
            "user {other:?}: a sandbox has the users \"user\" and \"root\""
        ))),
    }
}

fn home(user: SandboxUser) -> &'static str {
    match user {
        SandboxUser::User => SANDBOX_HOME,
        SandboxUser::Root => "/root",
    }
}

/// An absolute, checked path: a relative one is in the user's home, as envd's are.
fn resolve(path: &str, user: SandboxUser) -> Result<String, E2bError> {
    let p = if path.starts_with('/') {
        path.to_string()
    } else if path.is_empty() {
        home(user).to_string()
    } else {
        format!("{}/{}", home(user), path.trim_start_matches("./"))
    };
    validate_sandbox_path(&p).map_err(|e| E2bError::bad(e.to_string()))?;
    Ok(p)
}

async fn body_bytes(body: Body, max: usize) -> Result<bytes::Bytes, E2bError> {
    Ok(crate::api::json::read_body(body, max).await?)
}

// ---------------------------------------------------------------------------------------------
// process.Process

#[derive(Debug, Default, Deserialize)]
struct ProcessConfig {
    cmd: String,
    #[serde(default)]
    args: Vec<String>,
    #[serde(default)]
    envs: HashMap<String, String>,
    cwd: Option<String>,
}

#[derive(Debug, Deserialize)]
struct PtySize {
    cols: u16,
    rows: u16,
}

#[derive(Debug, Deserialize)]
struct Pty {
    size: PtySize,
}

#[derive(Debug, Deserialize)]
struct StartIn {
    process: ProcessConfig,
    tag: Option<String>,
    stdin: Option<bool>,
    pty: Option<Pty>,
}

/// `ProcessSelector`: a pid or a tag.
#[derive(Debug, Default, Deserialize)]
struct Selector {
    pid: Option<u32>,
    tag: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SelectIn {
    #[serde(default)]
    process: Selector,
}

#[derive(Debug, Default, Deserialize)]
struct InputIn {
    stdin: Option<String>,
    pty: Option<String>,
}

#[derive(Debug, Deserialize)]
struct SendInputIn {
    #[serde(default)]
    process: Selector,
    #[serde(default)]
    input: InputIn,
}

#[derive(Debug, Deserialize)]
struct SendSignalIn {
    #[serde(default)]
    process: Selector,
    signal: Value,
}

#[derive(Debug, Deserialize)]
struct UpdateIn {
    #[serde(default)]
    process: Selector,
    pty: Option<Pty>,
}

async fn process(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let streaming = matches!(method.as_str(), "Start" | "Connect");
    let body = match body_bytes(body, connect::MAX_MESSAGE_BYTES + 5).await {
        Ok(b) => b,
        Err(e) if streaming => return connect::stream_error(e),
        Err(e) => return connect::unary::<Value>(Err(e)),
    };
    let t = match target(&state, &headers) {
        Ok(t) => t,
        Err(e) if streaming => return connect::stream_error(e),
        Err(e) => return connect::unary::<Value>(Err(e)),
    };
    match method.as_str() {
        "Start" => match connect::parse_stream_request::<StartIn>(&headers, &body) {
            Ok(req) => start(t, req).await,
            Err(e) => connect::stream_error(e),
        },
        "Connect" => match connect::parse_stream_request::<SelectIn>(&headers, &body) {
            Ok(req) => reconnect(t, req.process).await,
            Err(e) => connect::stream_error(e),
        },
        "SendInput" => connect::unary(send_input(&t, &headers, &body).await),
        "SendSignal" => connect::unary(send_signal(&t, &headers, &body).await),
        "CloseStdin" => connect::unary(close_stdin(&t, &headers, &body).await),
        "List" => connect::unary(list(&t).await),
        "Update" => connect::unary(update(&t, &headers, &body).await),
        other => connect::unary::<Value>(Err(E2bError::new(
            StatusCode::NOT_IMPLEMENTED,
            format!("process.Process/{other} is not offered by this server"),
        ))),
    }
}

/// The sandbox process a `Start` asks for, checked.
fn proc_start(req: StartIn, user: SandboxUser) -> Result<ProcStart, E2bError> {
    let cwd = match req.process.cwd.as_deref().filter(|c| !c.is_empty()) {
        None => None,
        Some(c) => Some(resolve(c, user)?),
    };
    let tty = req.pty.as_ref().map(|p| cloude_protocol::TtySize {
        rows: p.size.rows,
        cols: p.size.cols,
    });
    let mut env: Vec<(String, String)> = req.process.envs.into_iter().collect();
    env.sort();
    let start = ProcStart {
        protocol_version: cloude_protocol::PROTOCOL_VERSION,
        argv: std::iter::once(req.process.cmd)
            .chain(req.process.args)
            .collect(),
        env,
        cwd,
        user,
        tag: req.tag,
        // The process outlives its stream: it ends by itself, by a signal, or with the sandbox.
        timeout_ms: 0,
        stdin: req.stdin.unwrap_or(true),
        tty,
    };
    start.validate().map_err(|e| E2bError::bad(e.to_string()))?;
    Ok(start)
}

/// Fuzzing hook: envd messages as `Start` and the path rules read them, never a panic.
pub(super) fn fuzz(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<StartIn>(data) {
        if let Ok(p) = proc_start(req, SandboxUser::User) {
            assert!(!p.argv.is_empty() && p.timeout_ms == 0);
        }
    }
    let _ = serde_json::from_slice::<SendSignalIn>(data);
    let _ = serde_json::from_slice::<SendInputIn>(data);
    if let Ok(s) = std::str::from_utf8(data) {
        for user in [SandboxUser::User, SandboxUser::Root] {
            if let Ok(p) = resolve(s, user) {
                assert!(p.starts_with('/') && validate_sandbox_path(&p).is_ok());
            }
        }
        let _ = named_user(s);
    }
    let mode = data
        .iter()
        .fold(0u32, |a, b| a.rotate_left(8) ^ u32::from(*b));
    assert_eq!(permissions("dir", mode).len(), 10);
}

async fn start(t: Target, req: StartIn) -> Response {
    let tty = req.pty.is_some();
    let start = match proc_start(req, t.user) {
        Ok(s) => s,
        Err(e) => return connect::stream_error(e),
    };
    let pid = match t.sbx.start_proc(&t.id, start).await {
        Ok(p) => p,
        Err(e) => return connect::stream_error(e.into()),
    };
    let (tx, resp) = connect::stream();
    tokio::spawn(follow(t, pid, 0, tty, tx));
    resp
}

async fn reconnect(t: Target, sel: Selector) -> Response {
    let pid = match resolve_pid(&t, &sel).await {
        Ok(p) => p,
        Err(e) => return connect::stream_error(e),
    };
    let (tx, resp) = connect::stream();
    tokio::spawn(follow(t, pid, FROM_NOW, false, tx));
    resp
}

/// Sends a process's events to a stream: `start`, its output as it comes, `end`; then the
/// end of the stream. A client that goes away stops the following, not the process.
async fn follow(t: Target, pid: u32, since: u64, pty: bool, tx: StreamTx) {
    if !tx.send(&json!({"event": {"start": {"pid": pid}}})).await {
        return;
    }
    let b64 = base64::engine::general_purpose::STANDARD;
    let (etx, mut erx) = mpsc::channel(16);
    let mut poller = {
        let (sbx, id) = (t.sbx.clone(), t.id.clone());
        tokio::spawn(async move { sbx.follow_proc(&id, pid, since, &etx).await })
    };
    let mut keepalive = tokio::time::interval(KEEPALIVE_EVERY);
    keepalive.tick().await;
    loop {
        tokio::select! {
            ev = erx.recv() => match ev {
                Some(ProcEvent::Output(c)) => {
                    let key = match (pty, c.stream) {
                        (true, _) => "pty",
                        (false, StreamKind::Stdout) => "stdout",
                        (false, StreamKind::Stderr) => "stderr",
                    };
                    let ev = json!({"event": {"data": {key: b64.encode(&c.data.0)}}});
                    if !tx.send(&ev).await {
                        return;
                    }
                    keepalive.reset();
                }
                // envd has no word for output dropped unread; the stream goes on.
                Some(ProcEvent::Skipped(_)) => {}
                Some(ProcEvent::End(end)) => {
                    if tx.send(&json!({"event": {"end": end_event(end)}})).await {
                        tx.end(None).await;
                    }
                    return;
                }
                None => {
                    let error = match (&mut poller).await {
                        Ok(Err(e)) => e.into(),
                        _ => E2bError::new(StatusCode::INTERNAL_SERVER_ERROR, "following the process failed"),
                    };
                    tx.end(Some(error)).await;
                    return;
                }
            },
            _ = keepalive.tick() => {
                if !tx.send(&json!({"event": {"keepalive": {}}})).await {
                    return;
                }
            }
            () = tx.gone() => return,
        }
    }
}

/// envd's `end` event: the exit code (-1 when a signal ended it), whether it exited, a status
/// line, and an error when a limit stopped it.
fn end_event(end: cloude_protocol::sandbox::ProcEnd) -> Value {
    let (exit, exited, status) = match (end.exit_code, end.signal) {
        (Some(c), _) => (c, true, format!("exit status {c}")),
        (None, Some(s)) => (-1, false, format!("signal: {}", signal_name(s))),
        (None, None) => (-1, false, "ended".to_string()),
    };
    let error = match end.status {
        StageStatus::Ok => None,
        _ => end.message.or_else(|| Some(format!("{:?}", end.status))),
    };
    let mut ev = json!({"exitCode": exit, "exited": exited, "status": status});
    if let Some(e) = error {
        ev["error"] = Value::String(e);
    }
    ev
}

fn signal_name(s: i32) -> &'static str {
    match s {
        libc::SIGKILL => "killed",
        libc::SIGTERM => "terminated",
        libc::SIGINT => "interrupt",
        libc::SIGSEGV => "segmentation fault",
        libc::SIGABRT => "aborted",
        libc::SIGPIPE => "broken pipe",
        _ => "signalled",
    }
}

/// The process a selector names (a tag: the newest running one with it).
async fn resolve_pid(t: &Target, sel: &Selector) -> Result<u32, E2bError> {
    if let Some(pid) = sel.pid {
        return Ok(pid);
    }
    let Some(tag) = &sel.tag else {
        return Err(E2bError::bad("process: a pid or a tag is required"));
    };
    t.sbx
        .list_procs(&t.id)
        .await?
        .into_iter()
        .filter(|p| p.running && p.tag.as_deref() == Some(tag.as_str()))
        .map(|p| p.id)
        .next_back()
        .ok_or_else(|| E2bError::not_found(format!("no running process tagged {tag:?}")))
}

/// A process that is not there (or has ended) is `not_found`, whatever the agent said.
fn proc_error(e: crate::sandbox::SandboxError, pid: u32) -> E2bError {
    match e {
        crate::sandbox::SandboxError::NoFile(_) => {
            E2bError::not_found(format!("process {pid} not found"))
        }
        e => e.into(),
    }
}

async fn send_input(t: &Target, h: &HeaderMap, body: &[u8]) -> Result<Value, E2bError> {
    let req: SendInputIn = connect::parse_unary(h, body)?;
    let pid = resolve_pid(t, &req.process).await?;
    let data = req
        .input
        .stdin
        .or(req.input.pty)
        .ok_or_else(|| E2bError::bad("input: stdin or pty is required"))?;
    let data = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| E2bError::bad(format!("input: not base64: {e}")))?;
    t.sbx
        .proc_input(&t.id, pid, Input::Stdin { data: data.into() })
        .await
        .map_err(|e| proc_error(e, pid))?;
    Ok(json!({}))
}

async fn send_signal(t: &Target, h: &HeaderMap, body: &[u8]) -> Result<Value, E2bError> {
    let req: SendSignalIn = connect::parse_unary(h, body)?;
    let pid = resolve_pid(t, &req.process).await?;
    let signal = match &req.signal {
        Value::String(s) if s == "SIGNAL_SIGKILL" => libc::SIGKILL,
        Value::String(s) if s == "SIGNAL_SIGTERM" => libc::SIGTERM,
        Value::Number(n) if n.as_i64() == Some(9) || n.as_i64() == Some(15) => {
            n.as_i64().and_then(|n| i32::try_from(n).ok()).unwrap_or(0)
        }
        other => {
            return Err(E2bError::bad(format!(
                "signal {other}: SIGNAL_SIGKILL or SIGNAL_SIGTERM"
            )))
        }
    };
    t.sbx
        .proc_input(&t.id, pid, Input::Signal { signal })
        .await
        .map_err(|e| proc_error(e, pid))?;
    Ok(json!({}))
}

async fn close_stdin(t: &Target, h: &HeaderMap, body: &[u8]) -> Result<Value, E2bError> {
    let req: SelectIn = connect::parse_unary(h, body)?;
    let pid = resolve_pid(t, &req.process).await?;
    t.sbx
        .proc_input(&t.id, pid, Input::CloseStdin)
        .await
        .map_err(|e| proc_error(e, pid))?;
    Ok(json!({}))
}

async fn update(t: &Target, h: &HeaderMap, body: &[u8]) -> Result<Value, E2bError> {
    let req: UpdateIn = connect::parse_unary(h, body)?;
    let pid = resolve_pid(t, &req.process).await?;
    let Some(pty) = req.pty else {
        return Ok(json!({}));
    };
    t.sbx
        .proc_input(
            &t.id,
            pid,
            Input::Resize {
                rows: pty.size.rows,
                cols: pty.size.cols,
            },
        )
        .await
        .map_err(|e| proc_error(e, pid))?;
    Ok(json!({}))
}

async fn list(t: &Target) -> Result<Value, E2bError> {
    let procs = t.sbx.list_procs(&t.id).await?;
    let v: Vec<Value> = procs
        .into_iter()
        .filter(|p| p.running)
        .map(|p| {
            let mut argv = p.argv.into_iter();
            let mut v = json!({
                "pid": p.id,
                "config": {
                    "cmd": argv.next().unwrap_or_default(),
                    "args": argv.collect::<Vec<_>>(),
                    "envs": {},
                    "cwd": p.cwd,
                },
            });
            if let Some(tag) = p.tag {
                v["tag"] = Value::String(tag);
            }
            v
        })
        .collect();
    Ok(json!({ "processes": v }))
}

// ---------------------------------------------------------------------------------------------
// filesystem.Filesystem

#[derive(Debug, Deserialize)]
struct PathIn {
    path: String,
    depth: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct MoveIn {
    source: String,
    destination: String,
}

async fn filesystem(
    State(state): State<Arc<AppState>>,
    Path(method): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = async {
        let body = body_bytes(body, connect::MAX_MESSAGE_BYTES).await?;
        let t = target(&state, &headers)?;
        match method.as_str() {
            "Stat" => {
                let req: PathIn = connect::parse_unary(&headers, &body)?;
                let path = resolve(&req.path, t.user)?;
                let a = t
                    .sbx
                    .file_op(&t.id, FileOp::Stat { path })
                    .await
                    .map_err(fs_error)?;
                Ok(json!({ "entry": entry_info(&a.path, &a.entry) }))
            }
            "ListDir" => {
                let req: PathIn = connect::parse_unary(&headers, &body)?;
                let path = resolve(&req.path, t.user)?;
                let depth = req.depth.unwrap_or(1).clamp(1, MAX_LIST_DEPTH);
                Ok(json!({ "entries": list_dir(&t, path, depth).await? }))
            }
            "MakeDir" => {
                let req: PathIn = connect::parse_unary(&headers, &body)?;
                let path = resolve(&req.path, t.user)?;
                let a = t
                    .sbx
                    .file_op(&t.id, FileOp::MakeDir { path, user: t.user })
                    .await
                    .map_err(fs_error)?;
                if !a.created {
                    return Err(E2bError::new(
                        StatusCode::CONFLICT,
                        format!("{}: already exists", a.path),
                    ));
                }
                Ok(json!({ "entry": entry_info(&a.path, &a.entry) }))
            }
            "Move" => {
                let req: MoveIn = connect::parse_unary(&headers, &body)?;
                let from = resolve(&req.source, t.user)?;
                let to = resolve(&req.destination, t.user)?;
                let a = t
                    .sbx
                    .file_op(&t.id, FileOp::Move { from, to })
                    .await
                    .map_err(fs_error)?;
                Ok(json!({ "entry": entry_info(&a.path, &a.entry) }))
            }
            "Remove" => {
                let req: PathIn = connect::parse_unary(&headers, &body)?;
                let path = resolve(&req.path, t.user)?;
                t.sbx.remove(&t.id, path).await.map_err(fs_error)?;
                Ok(json!({}))
            }
            other => Err(E2bError::new(
                StatusCode::NOT_IMPLEMENTED,
                format!("filesystem.Filesystem/{other} is not offered by this server"),
            )),
        }
    }
    .await;
    connect::unary(r)
}

fn fs_error(e: crate::sandbox::SandboxError) -> E2bError {
    e.into()
}

/// A listing `depth` levels deep (at most the agent's listing cap in all).
async fn list_dir(t: &Target, root: String, depth: u32) -> Result<Vec<Value>, E2bError> {
    let mut out = Vec::new();
    let mut level = vec![root];
    for d in 0..depth {
        let mut next = Vec::new();
        for dir in level {
            let listing = match t.sbx.read(&t.id, dir.clone()).await.map_err(fs_error)? {
                FileAnswer::Listing(l) => l,
                FileAnswer::File(_) if d == 0 => {
                    return Err(E2bError::bad(format!("{dir}: not a directory")))
                }
                FileAnswer::File(_) => continue,
            };
            for e in &listing.entries {
                let path = format!("{}/{}", dir.trim_end_matches('/'), e.name);
                if e.kind == "dir" {
                    next.push(path.clone());
                }
                out.push(entry_info(&path, e));
                if out.len() >= MAX_LISTING_ENTRIES {
                    return Ok(out);
                }
            }
        }
        level = next;
    }
    Ok(out)
}

/// envd's `EntryInfo`.
fn entry_info(path: &str, e: &DirEntry) -> Value {
    let kind = match e.kind.as_str() {
        "file" => "FILE_TYPE_FILE",
        "dir" => "FILE_TYPE_DIRECTORY",
        "symlink" => "FILE_TYPE_SYMLINK",
        _ => "FILE_TYPE_UNSPECIFIED",
    };
    let mut v = json!({
        "name": e.name,
        "type": kind,
        "path": path,
        "size": e.size.to_string(),
        "mode": e.mode,
        "permissions": permissions(&e.kind, e.mode),
        "owner": account(e.uid),
        "group": account(e.gid),
        "modifiedTime": rfc3339(e.modified_ms),
    });
    if let Some(t) = &e.target {
        v["symlinkTarget"] = Value::String(t.clone());
    }
    v
}

fn account(id: u32) -> String {
    match id {
        0 => "root".into(),
        1000 => cloude_protocol::sandbox::SANDBOX_USER.into(),
        n => n.to_string(),
    }
}

fn permissions(kind: &str, mode: u32) -> String {
    let mut s = String::with_capacity(10);
    s.push(match kind {
        "dir" => 'd',
        "symlink" => 'l',
        _ => '-',
    });
    for shift in [6u32, 3, 0] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

fn rfc3339(ms: i64) -> String {
    // judge0's timestamp is ISO 8601 in UTC with milliseconds and a `Z`: RFC 3339.
    crate::judge0::timestamp(ms)
}

// ---------------------------------------------------------------------------------------------
// /files and /health

#[derive(Debug, Deserialize)]
struct FileQuery {
    path: Option<String>,
    username: Option<String>,
}

fn query_user(t: &Target, q: &FileQuery) -> Result<SandboxUser, E2bError> {
    match &q.username {
        Some(u) => named_user(u),
        None => Ok(t.user),
    }
}

/// `GET /files?path=`: the file's bytes.
async fn read_file(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
) -> Result<Response, E2bError> {
    let t = target(&state, &headers)?;
    let user = query_user(&t, &q)?;
    let path = resolve(
        q.path
            .as_deref()
            .ok_or_else(|| E2bError::bad("path: required"))?,
        user,
    )?;
    match t.sbx.read(&t.id, path.clone()).await? {
        FileAnswer::File(bytes) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        FileAnswer::Listing(_) => Err(E2bError::bad(format!("{path}: is a directory"))),
    }
}

/// `POST /files?path=`: one file as the body (`application/octet-stream`), or files as
/// multipart parts named `file` (each part's file name is its path when the query has none).
async fn write_files(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<FileQuery>,
    body: Body,
) -> Result<Response, E2bError> {
    let t = target(&state, &headers)?;
    let user = query_user(&t, &q)?;
    if headers
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity")
    {
        return Err(E2bError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "compressed uploads (gzip) are not offered by this server: send the bytes as they are",
        ));
    }
    let max = usize::try_from(t.sbx.config().max_file_bytes).unwrap_or(usize::MAX);
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = body_bytes(body, max.saturating_add(MULTIPART_SLACK_BYTES)).await?;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    if ct.starts_with("multipart/form-data") {
        let boundary =
            multer::parse_boundary(&ct).map_err(|e| E2bError::bad(format!("multipart: {e}")))?;
        let stream = futures_util::stream::once(async move { Ok::<_, std::io::Error>(body) });
        let mut mp = multer::Multipart::new(stream, boundary);
        while let Some(field) = mp
            .next_field()
            .await
            .map_err(|e| E2bError::bad(format!("multipart: {e}")))?
        {
            if field.name() != Some("file") {
                continue;
            }
            let name = field.file_name().map(str::to_string);
            let data = field
                .bytes()
                .await
                .map_err(|e| E2bError::bad(format!("multipart: {e}")))?;
            let path = match (&q.path, name) {
                (Some(p), _) => p.clone(),
                (None, Some(n)) => n,
                (None, None) => {
                    return Err(E2bError::bad("a file part needs a file name or ?path="))
                }
            };
            files.push((resolve(&path, user)?, data.to_vec()));
        }
    } else {
        let path = q
            .path
            .as_deref()
            .ok_or_else(|| E2bError::bad("path: required"))?;
        files.push((resolve(path, user)?, body.to_vec()));
    }
    if files.is_empty() {
        return Err(E2bError::bad(
            "no file in the request (a multipart part named file)",
        ));
    }
    let mut written = Vec::new();
    for (path, data) in files {
        t.sbx.write(&t.id, path.clone(), user, None, data).await?;
        let name = path.rsplit('/').next().unwrap_or("").to_string();
        written.push(json!({"name": name, "type": "file", "path": path}));
    }
    Ok(axum::Json(written).into_response())
}

/// `GET /health`: 204 while the sandbox runs.
async fn health(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<StatusCode, E2bError> {
    target(&state, &headers)?;
    Ok(StatusCode::NO_CONTENT)
}
