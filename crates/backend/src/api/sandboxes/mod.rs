//! The native sandbox API (`/v1/sandboxes`): create, list, show, delete, exec, files, timeout;
//! processes and streamed commands in `procs.rs`, a terminal over a WebSocket in `shell.rs`.
//! The lifecycle is `sandbox.rs`'s; this face only decodes, checks the caps and shapes answers.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Json;
use base64::Engine as _;
use cloude_api::sandbox::{ExecIn, ExecOut, SandboxCreate, SandboxInfo, SandboxList, TimeoutIn};
use cloude_protocol::sandbox::{validate_sandbox_path, ExecRequest, SandboxUser};
use serde::Deserialize;

mod procs;
mod shell;

use super::error::ApiError;
use super::json::{read_body, ApiJson};
use super::AppState;
use crate::sandbox::{plausible_id, Info, SandboxError, Sandboxes};

/// The template when a creation names none (bash, python3 and the Debian userland).
pub const DEFAULT_TEMPLATE: &str = "python";
/// E2B's `code-interpreter-v1`: Python with numpy, pandas, scipy and matplotlib.
pub const CODE_INTERPRETER_TEMPLATE: &str = "python-data";
/// Most metadata keys, and bytes of metadata as JSON.
const MAX_METADATA_KEYS: usize = 64;
const MAX_METADATA_BYTES: usize = 4096;
/// Most environment variables given at creation.
const MAX_ENV: usize = 256;

pub fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/v1/sandboxes", post(create).get(list)),
        ("/v1/sandboxes/:id", get(show).delete(delete)),
        ("/v1/sandboxes/:id/exec", post(exec)),
        ("/v1/sandboxes/:id/exec/stream", post(procs::exec_stream)),
        (
            "/v1/sandboxes/:id/procs",
            post(procs::start_proc).get(procs::list_procs),
        ),
        (
            "/v1/sandboxes/:id/procs/:pid",
            axum::routing::delete(procs::delete_proc),
        ),
        (
            "/v1/sandboxes/:id/procs/:pid/output",
            get(procs::proc_output),
        ),
        (
            "/v1/sandboxes/:id/procs/:pid/input",
            post(procs::proc_input),
        ),
        ("/v1/sandboxes/:id/shell", get(shell::shell)),
        ("/v1/sandboxes/:id/timeout", post(timeout)),
        ("/v1/sandboxes/:id/pause", post(pause)),
        ("/v1/sandboxes/:id/resume", post(resume)),
        (
            "/v1/sandboxes/:id/files",
            get(read_file).put(write_file).delete(delete_file),
        ),
    ]
}

impl From<SandboxError> for ApiError {
    fn from(e: SandboxError) -> Self {
        let msg = e.to_string();
        match e {
            SandboxError::NotFound(_) | SandboxError::Lost(..) | SandboxError::NoFile(_) => {
                ApiError::gone_or_missing(msg)
            }
            SandboxError::Full(_) => ApiError::too_many("sandboxes_full", msg, 5),
            SandboxError::Saturated(l) => l.into(),
            SandboxError::Start(_) => ApiError::unavailable(msg),
            SandboxError::Agent(_) => ApiError::internal(msg),
            SandboxError::Refused(_) => ApiError::bad_request(None, msg),
            SandboxError::TooLarge(_) => ApiError::too_large(None, msg),
            SandboxError::Paused(_) => ApiError::conflict("paused", msg),
        }
    }
}

pub(crate) fn sandboxes(state: &AppState) -> Result<&Arc<Sandboxes>, ApiError> {
    state
        .sandboxes
        .as_ref()
        .ok_or_else(|| ApiError::gone_or_missing("sandboxes are off ([sandboxes] enabled = false)"))
}

/// An id that we could have issued; anything else is 404 without a lookup.
pub(crate) fn checked_id(id: &str) -> Result<&str, ApiError> {
    if plausible_id(id) {
        Ok(id)
    } else {
        Err(ApiError::gone_or_missing(format!(
            "no sandbox {:?}",
            id.chars().take(64).collect::<String>()
        )))
    }
}

fn show_info(i: Info) -> SandboxInfo {
    SandboxInfo {
        id: i.id,
        template: i.template,
        version: i.version,
        state: if i.paused { "paused" } else { "running" }.into(),
        created_at: crate::judge0::timestamp(i.created_ms),
        expires_at: crate::judge0::timestamp(i.expires_ms),
        timeout_s: i.timeout_s,
        memory_mib: i.memory_mib,
        vcpus: i.vcpus,
        metadata: i.metadata,
    }
}

async fn create(
    State(state): State<Arc<AppState>>,
    tenant: Option<axum::Extension<super::auth::Tenant>>,
    ApiJson(req): ApiJson<SandboxCreate>,
) -> Result<Response, ApiError> {
    let owner = tenant.and_then(|t| t.0 .0.clone());
    let info = create_sandbox(&state, req, true, owner).await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// Validates and creates a sandbox (`POST /v1/sandboxes`, the MCP `create_sandbox` tool, E2B's
/// create): killed after its timeout without a call (`idle`) or after its timeout (E2B's),
/// visible to `owner` only when there is one.
pub(crate) async fn create_sandbox(
    state: &AppState,
    req: SandboxCreate,
    idle: bool,
    owner: Option<String>,
) -> Result<SandboxInfo, ApiError> {
    let sbx = sandboxes(state)?;
    let cfg = sbx.config();
    let name = req.template.as_deref().unwrap_or(DEFAULT_TEMPLATE);
    // E2B's default templates: its base image, and its code interpreter's (Python with the data
    // packages, where the catalogue has them).
    let name = match name {
        "base" => DEFAULT_TEMPLATE,
        "code-interpreter-v1"
            if state
                .catalog
                .find(CODE_INTERPRETER_TEMPLATE, None)
                .is_some() =>
        {
            CODE_INTERPRETER_TEMPLATE
        }
        "code-interpreter-v1" => DEFAULT_TEMPLATE,
        other => other,
    };
    let language = state
        .catalog
        .find(name, None)
        .ok_or_else(|| {
            ApiError::invalid(
                "template",
                format!("unknown template {name:?}: a language of GET /v1/languages, or base"),
            )
        })?
        .clone();
    let timeout_s = req.timeout_s.unwrap_or(cfg.default_timeout_s);
    if timeout_s == 0 || timeout_s > cfg.max_timeout_s {
        return Err(ApiError::invalid(
            "timeout_s",
            format!(
                "{timeout_s} is out of range: 1 to {} s ([sandboxes] max_timeout_s)",
                cfg.max_timeout_s
            ),
        ));
    }
    let env: Vec<(String, String)> = req.env.unwrap_or_default().into_iter().collect();
    check_env(&env, "env")?;
    let metadata = req.metadata.unwrap_or_default();
    let meta_bytes = serde_json::to_vec(&metadata).map_or(usize::MAX, |v| v.len());
    if metadata.len() > MAX_METADATA_KEYS || meta_bytes > MAX_METADATA_BYTES {
        return Err(ApiError::too_large(
            Some("metadata".into()),
            format!("metadata: at most {MAX_METADATA_KEYS} keys and {MAX_METADATA_BYTES} bytes"),
        ));
    }
    let info = sbx
        .create(
            &language,
            crate::sandbox::NewSandbox {
                timeout: Duration::from_secs(timeout_s),
                idle,
                env,
                metadata,
                owner,
            },
        )
        .await?;
    Ok(show_info(info))
}

pub(super) fn check_env(env: &[(String, String)], field: &str) -> Result<(), ApiError> {
    if env.len() > MAX_ENV {
        return Err(ApiError::too_large(
            Some(field.into()),
            format!("at most {MAX_ENV} environment variables"),
        ));
    }
    for (k, v) in env {
        if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
            return Err(ApiError::invalid(
                field,
                format!("{k:?}: a name without '=' or NUL, a value without NUL"),
            ));
        }
    }
    Ok(())
}

async fn list(
    State(state): State<Arc<AppState>>,
    tenant: Option<axum::Extension<super::auth::Tenant>>,
) -> Result<Json<SandboxList>, ApiError> {
    let sbx = sandboxes(&state)?;
    let owner = tenant.and_then(|t| t.0 .0.clone());
    Ok(Json(SandboxList {
        sandboxes: sbx
            .list()
            .into_iter()
            .filter(|i| owner.is_none() || i.owner == owner)
            .map(show_info)
            .collect(),
    }))
}

async fn show(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxInfo>, ApiError> {
    let sbx = sandboxes(&state)?;
    Ok(Json(show_info(sbx.get(checked_id(&id)?)?.info())))
}

async fn delete(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let sbx = sandboxes(&state)?;
    sbx.delete(checked_id(&id)?).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn timeout(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<TimeoutIn>,
) -> Result<Json<SandboxInfo>, ApiError> {
    let sbx = sandboxes(&state)?;
    let max = sbx.config().max_timeout_s;
    if req.timeout_s == 0 || req.timeout_s > max {
        return Err(ApiError::invalid(
            "timeout_s",
            format!("{} is out of range: 1 to {max} s", req.timeout_s),
        ));
    }
    let sb = sbx.get(checked_id(&id)?)?;
    sb.set_timeout(Duration::from_secs(req.timeout_s));
    Ok(Json(show_info(sb.info())))
}

/// `POST /v1/sandboxes/{id}/pause`: its VM frozen until resumed (409 if it is paused already).
async fn pause(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxInfo>, ApiError> {
    let sbx = sandboxes(&state)?;
    let id = checked_id(&id)?;
    sbx.pause(id).await?;
    Ok(Json(show_info(sbx.get(id)?.info())))
}

/// `POST /v1/sandboxes/{id}/resume`: thaws a paused sandbox (a running one answers as it is).
async fn resume(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<SandboxInfo>, ApiError> {
    let sbx = sandboxes(&state)?;
    let id = checked_id(&id)?;
    sbx.resume(id, None).await?;
    Ok(Json(show_info(sbx.get(id)?.info())))
}

pub(super) fn user_of(user: Option<&str>) -> Result<SandboxUser, ApiError> {
    match user {
        None | Some("user") => Ok(SandboxUser::User),
        Some("root") => Ok(SandboxUser::Root),
        Some(u) => Err(ApiError::invalid("user", format!("{u:?}: user or root"))),
    }
}

async fn exec(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<ExecIn>,
) -> Result<Json<ExecOut>, ApiError> {
    Ok(Json(exec_in(&state, &id, req).await?))
}

/// Validates and runs one command in a sandbox (`POST …/exec`): the agent runs it to its end
/// (even if the client goes away).
pub(crate) async fn exec_in(state: &AppState, id: &str, req: ExecIn) -> Result<ExecOut, ApiError> {
    let sbx = sandboxes(state)?;
    let id = checked_id(id)?;
    let agent_req = exec_request(state, req)?;
    let r = sbx.exec(id, agent_req).await?;
    Ok(exec_out(
        &r.stdout.0,
        &r.stderr.0,
        cloude_protocol::sandbox::ProcEnd {
            exit_code: r.exit_code,
            signal: r.signal,
            status: r.status,
            message: r.message,
            wall_ms: r.wall_ms,
            cpu_ms: r.cpu_ms,
            memory_kib: r.memory_kib,
        },
    ))
}

/// [`exec_in`] for callers that may go away (the MCP `run_command` tool): the command is a
/// sandbox process, killed if the caller's future is dropped. No `stdin`.
pub(crate) async fn exec_killable(
    state: &AppState,
    id: &str,
    req: ExecIn,
) -> Result<ExecOut, ApiError> {
    let sbx = sandboxes(state)?;
    let id = checked_id(id)?;
    let r = exec_request(state, req)?;
    if !r.stdin.0.is_empty() {
        return Err(ApiError::invalid("stdin", "not offered here"));
    }
    let cap = r.output_limit_bytes;
    let run = sbx.run_proc(id, proc_of(r, false), cap).await?;
    Ok(exec_out(&run.stdout, &run.stderr, run.end))
}

/// The sandbox process that runs a checked command (its `stdin` is sent separately, so the
/// process keeps standard input open when `stdin` is true).
pub(super) fn proc_of(r: ExecRequest, stdin: bool) -> cloude_protocol::sandbox::ProcStart {
    cloude_protocol::sandbox::ProcStart {
        protocol_version: r.protocol_version,
        argv: r.argv,
        env: r.env,
        cwd: r.cwd,
        user: r.user,
        tag: None,
        timeout_ms: r.timeout_ms,
        stdin,
        tty: None,
    }
}

/// A checked agent command from an exec's body.
pub(super) fn exec_request(state: &AppState, req: ExecIn) -> Result<ExecRequest, ApiError> {
    exec_request_within(&state.config.limits, req)
}

/// [`exec_request`] against `l`.
pub(crate) fn exec_request_within(
    l: &crate::config::Limits,
    req: ExecIn,
) -> Result<ExecRequest, ApiError> {
    let argv = procs::argv_of(req.cmd, req.argv)?;
    let stdin = req.stdin.unwrap_or_default().into_bytes();
    if stdin.len() > l.max_stdin_bytes {
        return Err(ApiError::too_large(
            Some("stdin".into()),
            format!(
                "stdin is over {} bytes (limits.max_stdin_bytes)",
                l.max_stdin_bytes
            ),
        ));
    }
    let env: Vec<(String, String)> = req.env.unwrap_or_default().into_iter().collect();
    check_env(&env, "env")?;
    let timeout_ms = req.timeout_ms.unwrap_or(l.default_timeout_ms);
    if timeout_ms == 0 || timeout_ms > l.max_timeout_ms {
        return Err(ApiError::invalid(
            "timeout_ms",
            format!(
                "{timeout_ms} is out of range: 1 to {} ms (limits.max_timeout_ms)",
                l.max_timeout_ms
            ),
        ));
    }
    if let Some(c) = &req.cwd {
        validate_sandbox_path(c).map_err(|e| ApiError::invalid("cwd", e.to_string()))?;
    }
    let agent_req = ExecRequest {
        protocol_version: cloude_protocol::PROTOCOL_VERSION,
        argv,
        stdin: cloude_protocol::Bytes(stdin),
        env,
        cwd: req.cwd,
        timeout_ms,
        output_limit_bytes: l.output_limit_bytes,
        user: user_of(req.user.as_deref())?,
    };
    agent_req
        .validate()
        .map_err(|e| ApiError::invalid("argv", e.to_string()))?;
    Ok(agent_req)
}

fn exec_out(stdout: &[u8], stderr: &[u8], end: cloude_protocol::sandbox::ProcEnd) -> ExecOut {
    let stdout_base64 = std::str::from_utf8(stdout)
        .is_err()
        .then(|| base64::engine::general_purpose::STANDARD.encode(stdout));
    ExecOut {
        stdout: String::from_utf8_lossy(stdout).into_owned(),
        stderr: String::from_utf8_lossy(stderr).into_owned(),
        stdout_base64,
        exit_code: end.exit_code,
        signal: end.signal.map(cloude_api::signal_name),
        status: end.status,
        message: end.message,
        wall_ms: end.wall_ms,
        cpu_ms: end.cpu_ms,
        memory_kib: end.memory_kib,
    }
}

#[derive(Debug, Deserialize)]
struct FileQuery {
    path: String,
    user: Option<String>,
    /// Octal, e.g. `755`.
    mode: Option<String>,
}

fn checked_path(q: &FileQuery) -> Result<String, ApiError> {
    validate_sandbox_path(&q.path).map_err(|e| ApiError::invalid("path", e.to_string()))?;
    Ok(q.path.clone())
}

async fn read_file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<Response, ApiError> {
    let sbx = sandboxes(&state)?;
    let id = checked_id(&id)?;
    let path = checked_path(&q)?;
    Ok(match sbx.read(id, path).await? {
        crate::agent::FileAnswer::File(data) => {
            ([(header::CONTENT_TYPE, "application/octet-stream")], data).into_response()
        }
        crate::agent::FileAnswer::Listing(l) => Json(l).into_response(),
    })
}

async fn write_file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
    body: Body,
) -> Result<StatusCode, ApiError> {
    let sbx = sandboxes(&state)?;
    let id = checked_id(&id)?;
    let path = checked_path(&q)?;
    let user = user_of(q.user.as_deref())?;
    let mode = match &q.mode {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| ApiError::invalid("mode", format!("{m:?} is not an octal mode")))?,
        ),
    };
    let limit = usize::try_from(sbx.config().max_file_bytes).unwrap_or(usize::MAX);
    let data = read_body(body, limit).await?;
    sbx.write(id, path, user, mode, data.to_vec()).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_file(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<FileQuery>,
) -> Result<StatusCode, ApiError> {
    let sbx = sandboxes(&state)?;
    let id = checked_id(&id)?;
    let path = checked_path(&q)?;
    sbx.remove(id, path).await?;
    Ok(StatusCode::NO_CONTENT)
}
