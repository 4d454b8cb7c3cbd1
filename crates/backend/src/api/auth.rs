//! API keys (`[auth] keys`) of the sandbox faces: each key is a tenant that sees only the
//! sandboxes it made. `tenant_of` reads the key (`X-API-KEY`, or `Authorization: Bearer`);
//! `sandbox_auth` guards `/v1/sandboxes…` with it (E2B's face calls `tenant_of` itself).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::AppState;
use crate::config::AuthConfig;

/// The tenant a request acts for (`None`: no keys are configured).
#[derive(Clone, Debug, Default)]
pub struct Tenant(pub Option<String>);

/// The key's tenant; `Ok(None)` without `[auth] keys`; an error sentence for a missing or
/// unknown key.
pub fn tenant_of(cfg: &AuthConfig, headers: &HeaderMap) -> Result<Option<String>, &'static str> {
    if cfg.keys.is_empty() {
        return Ok(None);
    }
    let given = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .or_else(|| {
            headers
                .get(axum::http::header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
        })
        .ok_or("an API key is required (X-API-KEY or Authorization: Bearer)")?;
    crate::config::key_tenant(&cfg.keys, given)
        .map(Some)
        .ok_or("invalid API key")
}

/// Middleware of `/v1/sandboxes…`: 401 without a valid key (when keys are configured); a
/// sandbox of another tenant is 404, as if it did not exist; the tenant goes into the request's
/// extensions for create and list.
pub async fn sandbox_auth(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let tenant = match tenant_of(&state.config.auth, req.headers()) {
        Ok(t) => t,
        Err(m) => return ApiError::unauthorized(m).into_response(),
    };
    if let (Some(t), Some(sbx)) = (&tenant, &state.sandboxes) {
        let id = req.uri().path().split('/').nth(3).unwrap_or("");
        if crate::sandbox::plausible_id(id) {
            if let Ok(sb) = sbx.get(id) {
                if sb.owner() != Some(t.as_str()) {
                    return ApiError::gone_or_missing(format!("no sandbox {id}")).into_response();
                }
            }
        }
    }
    req.extensions_mut().insert(Tenant(tenant));
    next.run(req).await
}
