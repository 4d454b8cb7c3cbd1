//! A request id per HTTP request: in the tracing span, the response header and the body.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

use super::AppState;

pub const HEADER: &str = "x-request-id";
/// Longest client-supplied request id we adopt.
const MAX_CLIENT_ID_LEN: usize = 64;

#[derive(Clone, Debug)]
pub struct RequestId(pub String);

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn new_id() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let epoch = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros())
        .unwrap_or(0);
    format!("{:x}-{:x}-{n}", epoch, std::process::id())
}

fn acceptable(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= MAX_CLIENT_ID_LEN
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

pub async fn middleware(
    State(state): State<Arc<AppState>>,
    mut req: Request,
    next: Next,
) -> Response {
    let id = req
        .headers()
        .get(HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable(v))
        .map(str::to_string)
        .unwrap_or_else(new_id);
    req.extensions_mut().insert(RequestId(id.clone()));
    let span =
        tracing::info_span!("request", id = %id, method = %req.method(), path = %req.uri().path());
    let t = Instant::now();
    let mut resp = next.run(req).instrument(span.clone()).await;
    let status = resp.status().as_u16();
    state.metrics.http_response(status);
    span.in_scope(|| tracing::info!(status, ms = t.elapsed().as_millis() as u64, "answered"));
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(HEADER, v);
    }
    resp
}
