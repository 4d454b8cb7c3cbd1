//! The E2B-compatible face (`/e2b/…`): E2B's published SDKs, pointed at this server with
//! `E2B_API_URL=http://HOST/e2b` and `E2B_SANDBOX_URL=http://HOST/e2b`, work unchanged.
//!
//! - `control.rs`: the control plane (`/sandboxes`, `/v2/sandboxes`: create, get, list, kill,
//!   timeout, pause (the VM frozen), connect (resumes)).
//! - `envd.rs`: what E2B's in-VM daemon (envd) serves, for the sandbox named by the
//!   `E2b-Sandbox-Id` header: `process.Process` and `filesystem.Filesystem` over the Connect
//!   protocol (`connect.rs`), `/files`, `/health`.
//! - `interpreter.rs` (+ `interpreter.py`, our own context program): the code interpreter's
//!   `/execute` and `/contexts` (its port 49999, on the same URL).
//!
//! There is no second lifecycle: every call is an operation of `sandbox::Sandboxes`. A sandbox
//! made here lives for its timeout from creation or the last `set_timeout`, as E2B's do (calls
//! do not extend it). With `[auth] keys` a request must carry one of them (`X-API-KEY`), and a
//! key sees only the sandboxes it made; the sandbox calls (which carry no API key) must carry the
//! sandbox's own secret, given at creation as `envdAccessToken`.

mod connect;
mod control;
mod envd;
mod interpreter;

use std::sync::Arc;

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::Json;

use super::error::ApiError;
use super::AppState;
use crate::sandbox::Sandbox;

/// The envd version we report: the SDK switches its features on by it. 0.5.7 means: default
/// user without an `Authorization` header (0.4.0), `close_stdin` (0.5.2), octet-stream uploads
/// (0.5.7). Gzip bodies (also 0.5.7) are refused with a clear error; file metadata (0.6.2) is
/// not offered, so it is not claimed.
pub const ENVD_VERSION: &str = "0.5.7";
/// `clientID` in every sandbox we describe.
const CLIENT_ID: &str = "cloude";

pub fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    let mut r = control::routes();
    r.extend(envd::routes());
    r.extend(interpreter::routes());
    r
}

/// An error in E2B's shapes: `{code, message}` on the control plane, a Connect error on envd.
#[derive(Debug)]
pub struct E2bError {
    pub status: StatusCode,
    pub message: String,
}

impl E2bError {
    pub fn new(status: StatusCode, message: impl Into<String>) -> Self {
        E2bError {
            status,
            message: message.into(),
        }
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        E2bError::new(StatusCode::NOT_FOUND, message)
    }

    pub fn bad(message: impl Into<String>) -> Self {
        E2bError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl From<ApiError> for E2bError {
    fn from(e: ApiError) -> Self {
        E2bError::new(e.status, e.message)
    }
}

impl From<crate::sandbox::SandboxError> for E2bError {
    fn from(e: crate::sandbox::SandboxError) -> Self {
        ApiError::from(e).into()
    }
}

/// Control-plane errors: `{"code": <status>, "message": …}` (the SDK parses both fields).
impl IntoResponse for E2bError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "code": self.status.as_u16(),
            "message": self.message,
        });
        let mut resp = (self.status, Json(body)).into_response();
        // The SDK retries 429, 502, 503 and 504; ours say when to retry themselves.
        resp.headers_mut().insert(
            "should-retry",
            axum::http::HeaderValue::from_static("false"),
        );
        resp
    }
}

/// The tenant a control-plane request acts for: `None` without `[auth] keys`, else the key's
/// (`api::auth::tenant_of`). A missing or unknown key is refused (401).
pub fn tenant(state: &AppState, headers: &HeaderMap) -> Result<Option<String>, E2bError> {
    crate::api::auth::tenant_of(&state.config.auth, headers)
        .map_err(|m| E2bError::new(StatusCode::UNAUTHORIZED, m))
}

/// Fuzzing hook (`cloude_fuzz::e2b_messages`): Connect envelopes and envd messages.
pub fn fuzz_messages(data: &[u8]) {
    connect::fuzz(data);
    envd::fuzz(data);
}

/// The sandbox `id` if `tenant` may see it (else 404, as if it did not exist).
pub fn owned(
    state: &AppState,
    tenant: &Option<String>,
    id: &str,
) -> Result<Arc<Sandbox>, E2bError> {
    let sbx = super::sandboxes::sandboxes(state)?;
    let missing = || E2bError::not_found(format!("sandbox {id:?} not found"));
    if !crate::sandbox::plausible_id(id) {
        return Err(missing());
    }
    let sb = sbx.get(id).map_err(|_| missing())?;
    if tenant.is_some() && sb.owner() != tenant.as_deref() {
        return Err(missing());
    }
    Ok(sb)
}
