//! The HTTP API: routes, shared state, middleware.

pub mod auth;
pub mod conn;
pub mod e2b;
pub mod error;
pub mod interactive;
pub mod json;
pub mod judge0;
pub mod mcp;
pub mod piston;
pub mod playground;
pub mod request_id;
pub mod sandboxes;
pub mod types;
pub mod v1;
pub mod validate;
pub mod ws;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::{DefaultBodyLimit, State};
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use cloude_image::catalog::Catalog;

use crate::config::Config;
use crate::executor::Executor;
use crate::metrics::{Gauges, Metrics};

/// Everything handlers share.
pub struct AppState {
    pub config: Config,
    pub catalog: Catalog,
    pub executor: Arc<Executor>,
    pub metrics: Arc<Metrics>,
    /// Which hypervisor and why (for `/healthz`).
    pub hypervisor: String,
    pub hypervisor_reason: String,
    /// The Judge0-compatible API's store and workers (`None`: its routes answer 404).
    pub judge0: Option<Arc<crate::judge0::Judge0>>,
    /// Sandboxes (`None`: `[sandboxes] enabled = false`, their routes answer 404).
    pub sandboxes: Option<Arc<crate::sandbox::Sandboxes>>,
}

impl AppState {
    /// Largest request body: code, stdin and test cases' expected outputs (each total capped
    /// like stdin) at their limits, JSON-escaped, plus slack.
    pub fn body_limit(&self) -> usize {
        let l = &self.config.limits;
        2 * (l.max_code_bytes + 2 * l.max_stdin_bytes) + 64 * 1024
    }

    pub fn record(&self, endpoint: &str, status: &str, since: Instant) {
        self.metrics.execution(endpoint, status);
        self.metrics.observe("total", since.elapsed());
    }

    fn gauges(&self) -> Gauges {
        Gauges {
            vms_running: self.executor.live_vms(),
            pool_ready: self.executor.pool_ready(),
            queue_length: self.executor.queued(),
            max_vms: self.config.limits.max_concurrent_vms,
            sandboxes: self.sandboxes.as_ref().map_or(0, |s| s.running()),
            sandboxes_paused: self.sandboxes.as_ref().map_or(0, |s| s.paused()),
        }
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let mut routes: Vec<(&str, axum::routing::MethodRouter<Arc<AppState>>)> = vec![
        ("/v1/executions", post(v1::execute)),
        ("/v1/executions/stream", post(v1::execute_stream)),
        ("/v1/languages", get(v1::languages)),
        ("/api/v2/execute", post(piston::execute)),
        ("/api/v2/runtimes", get(piston::runtimes)),
        ("/api/v2/connect", get(piston::connect::connect)),
        ("/v1/executions/ws", get(v1::ws::connect)),
        ("/healthz", get(healthz)),
        ("/metrics", get(metrics)),
    ];
    // The native sandbox routes, each behind the `[auth]` keys (when there are any).
    for (path, method) in sandboxes::routes() {
        let auth = axum::middleware::from_fn_with_state(state.clone(), auth::sandbox_auth);
        routes.push((path, method.layer(auth)));
    }
    routes.extend(e2b::routes());
    // Judge0's routes, each behind its optional API key.
    for (path, method) in judge0::routes() {
        let auth = axum::middleware::from_fn_with_state(state.clone(), judge0::auth);
        routes.push((path, method.layer(auth)));
    }
    let mut r = Router::new();
    // Every route also answers with a trailing slash, as Piston's (Express) and Judge0's (Rails)
    // servers do: published clients ask for `/api/v2/runtimes/`.
    for (path, method) in routes {
        r = r
            .route(path, method.clone())
            .route(&format!("{path}/"), method);
    }
    // The page at `/` (not doubled with a trailing slash: `/` is its own).
    for (path, method) in playground::routes(&state.config.playground) {
        r = r.route(path, method);
    }
    r = r.route(
        "/mcp",
        axum::routing::any(mcp::handle).with_state(state.clone()),
    );
    r.method_not_allowed_fallback(|| async { error::ApiError::method_not_allowed() })
        .fallback(|| async { error::ApiError::not_found() })
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            request_id::middleware,
        ))
        .with_state(state)
}

async fn healthz(State(state): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let g = state.gauges();
    let jail = state.executor.jail();
    let host_rules = state.executor.host_rules();
    Json(serde_json::json!({
        "status": "ok",
        "hypervisor": state.hypervisor,
        "hypervisor_reason": state.hypervisor_reason,
        "vms_running": g.vms_running,
        "pool_ready": g.pool_ready,
        "queue_length": g.queue_length,
        "max_concurrent_vms": g.max_vms,
        "jail": jail.is_some(),
        "jail_detail": jail,
        // tcp transport only (null with vsock: no VM has a network device).
        "host_rules": host_rules.as_ref().map(|(on, _)| *on),
        "host_rules_detail": host_rules.and_then(|(_, d)| d),
        "snapshots": state.executor.snapshots().active(),
        "snapshots_detail": state.executor.snapshots().status(),
        "snapshots_ready": state.executor.snapshots().ready_count(),
        "sandboxes_running": state.sandboxes.as_ref().map(|s| s.running()),
        "sandboxes_paused": state.sandboxes.as_ref().map(|s| s.paused()),
    }))
}

async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(&state.gauges()),
    )
}
