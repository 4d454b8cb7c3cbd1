//! The HTTP router shared by every transport: health, run, and the streaming run.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use bytes::Bytes;
use cloude_protocol::{
    ErrorBody, Health, RunRequest, StreamEvent, WakeRequest, WakeResponse, MAX_REQUEST_BODY_BYTES,
    PROTOCOL_VERSION,
};
use hyper::body::Frame;
use tokio::sync::{mpsc, Mutex};

use crate::executor::{ExecError, Executor};
use crate::power;

/// Output events buffered between the program and a slow streaming client.
const STREAM_QUEUE: usize = 64;

/// Shared state of the server.
#[derive(Debug)]
pub struct AgentState {
    pub executor: Executor,
    /// Sandbox processes (`/v1/procs`).
    pub procs: crate::procs::Procs,
    /// Held for the duration of a run: one run at a time.
    busy: Arc<Mutex<()>>,
    started: Instant,
    /// Whether `poweroff_after` may reboot the machine (only ever true as PID 1).
    pub poweroff_enabled: bool,
    /// Set by `/v1/snapshot/prepare`: this VM (and every clone restored from its snapshot)
    /// refuses runs until `/v1/wake` has made it a new machine.
    sealed: AtomicBool,
}

impl AgentState {
    /// The one-run-at-a-time lock, held until the guard is dropped.
    pub(crate) fn busy_lock(&self) -> Result<tokio::sync::OwnedMutexGuard<()>, ApiError> {
        self.busy
            .clone()
            .try_lock_owned()
            .map_err(|_| ApiError::Busy)
    }

    pub fn new(executor: Executor, poweroff_enabled: bool) -> Arc<Self> {
        Arc::new(AgentState {
            executor,
            procs: Default::default(),
            busy: Arc::new(Mutex::new(())),
            started: Instant::now(),
            poweroff_enabled,
            sealed: AtomicBool::new(false),
        })
    }
}

/// Per-connection context: set when the connection must end with a power-off.
#[derive(Clone, Debug, Default)]
pub struct ConnCtx {
    pub poweroff: Arc<AtomicBool>,
    /// Set when an interactive run took the connection over: ends with its session.
    pub session: Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>>,
}

/// Every error answer of the agent.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("request body: {0}")]
    Body(String, StatusCode),
    #[error("another run is in progress")]
    Busy,
    #[error(
        "this VM was prepared for a snapshot: it runs nothing until it is woken (POST /v1/wake)"
    )]
    Sealed,
    #[error("{0}")]
    Wake(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("internal error")]
    Internal,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match &self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Body(_, s) => *s,
            ApiError::Busy | ApiError::Sealed => StatusCode::CONFLICT,
            ApiError::Wake(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = ErrorBody {
            error: self.to_string(),
        };
        (status, Json(body)).into_response()
    }
}

impl From<ExecError> for ApiError {
    fn from(e: ExecError) -> Self {
        if e.is_client_error() {
            ApiError::BadRequest(e.to_string())
        } else {
            tracing::error!("run failed: {e}: {:?}", std::error::Error::source(&e));
            ApiError::Internal
        }
    }
}

/// The agent's router.
pub fn router(state: Arc<AgentState>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/run", post(run))
        .route("/v1/run/stream", post(run_stream))
        .route("/v1/snapshot/prepare", post(prepare_snapshot))
        .route("/v1/wake", post(wake))
        .route("/v1/exec", post(exec))
        .route("/v1/run/interactive", get(crate::interactive::start))
        .route(
            "/v1/procs",
            post(crate::procs::start).get(crate::procs::list),
        )
        .route("/v1/files/op", post(crate::files::op))
        .route("/v1/procs/:id/read", post(crate::procs::read))
        .route("/v1/procs/:id/input", post(crate::procs::input))
        .route("/v1/procs/:id", axum::routing::delete(crate::procs::delete))
        .layer(DefaultBodyLimit::max(MAX_REQUEST_BODY_BYTES))
        .route(
            "/v1/files",
            get(crate::files::get)
                .put(crate::files::put)
                .delete(crate::files::delete)
                .layer(DefaultBodyLimit::max(
                    cloude_protocol::sandbox::MAX_SANDBOX_FILE_BYTES as usize,
                )),
        )
        .with_state(state)
}

/// `POST /v1/exec`: one sandbox command (its background processes keep running). Several may
/// run at once; none while the agent is sealed.
async fn exec(
    State(state): State<Arc<AgentState>>,
    body: RunBody,
) -> Result<Json<cloude_protocol::StageResult>, ApiError> {
    let RunBody(body) = body;
    let req: cloude_protocol::sandbox::ExecRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid exec request: {e}")))?;
    check_unsealed(&state)?;
    Ok(Json(state.executor.exec(&req).await?))
}

async fn health(State(state): State<Arc<AgentState>>) -> Json<Health> {
    Json(Health {
        protocol_version: PROTOCOL_VERSION,
        agent_version: env!("CARGO_PKG_VERSION").to_string(),
        uptime_ms: u64::try_from(state.started.elapsed().as_millis()).unwrap_or(u64::MAX),
    })
}

/// A run request body: refused early (413) when its declared length is over the limit,
/// before a byte of it is read.
struct RunBody(Bytes);

#[axum::async_trait]
impl<S: Send + Sync> FromRequest<S> for RunBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > MAX_REQUEST_BODY_BYTES as u64) {
            return Err(ApiError::Body(
                format!("larger than {MAX_REQUEST_BODY_BYTES} bytes"),
                StatusCode::PAYLOAD_TOO_LARGE,
            ));
        }
        Bytes::from_request(req, state)
            .await
            .map(RunBody)
            .map_err(|r: BytesRejection| ApiError::Body(r.body_text(), r.status()))
    }
}

/// `POST /v1/snapshot/prepare`: seals the agent (runs refused until a wake). The connection stays
/// open and idle: over virtio-serial that is the state every clone resumes in, so the clone's
/// host sends its wake as the next request on it.
async fn prepare_snapshot(State(state): State<Arc<AgentState>>) -> Result<StatusCode, ApiError> {
    let _guard = state.busy.try_lock().map_err(|_| ApiError::Busy)?;
    state.sealed.store(true, Ordering::SeqCst);
    tracing::info!("sealed for a snapshot: runs wait for a wake");
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /v1/wake`: fresh entropy, clock and identity for a restored VM; unseals it.
async fn wake(
    State(state): State<Arc<AgentState>>,
    body: RunBody,
) -> Result<Json<WakeResponse>, ApiError> {
    let RunBody(body) = body;
    let req: WakeRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid wake request: {e}")))?;
    req.validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let _guard = state.busy.try_lock().map_err(|_| ApiError::Busy)?;
    let resp = tokio::task::spawn_blocking(move || crate::wake::apply(&req))
        .await
        .map_err(|_| ApiError::Internal)?
        .map_err(|e| ApiError::Wake(e.to_string()))?;
    state.sealed.store(false, Ordering::SeqCst);
    tracing::info!(
        skew_ms = resp.clock_skew_ms,
        "woken: entropy mixed in, clock set"
    );
    Ok(Json(resp))
}

/// Refuses runs while the agent is sealed for a snapshot.
pub(crate) fn check_unsealed(state: &AgentState) -> Result<(), ApiError> {
    if state.sealed.load(Ordering::SeqCst) {
        return Err(ApiError::Sealed);
    }
    Ok(())
}

fn parse(RunBody(body): RunBody) -> Result<RunRequest, ApiError> {
    let req: RunRequest = serde_json::from_slice(&body)
        .map_err(|e| ApiError::BadRequest(format!("invalid run request: {e}")))?;
    req.validate()
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    Ok(req)
}

/// Marks the connection for power-off and asks the client to close it after this response.
fn arm_poweroff(state: &AgentState, ctx: Option<&ConnCtx>, resp: &mut Response) {
    if let Some(ctx) = ctx {
        ctx.poweroff.store(true, Ordering::SeqCst);
    }
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    if state.poweroff_enabled {
        tracing::info!("powering off once the response is sent");
    }
}

async fn run(
    State(state): State<Arc<AgentState>>,
    ctx: Option<Extension<ConnCtx>>,
    body: RunBody,
) -> Result<Response, ApiError> {
    let req = parse(body)?;
    let _guard = state.busy.try_lock().map_err(|_| ApiError::Busy)?;
    check_unsealed(&state)?;
    let result = state.executor.run(&req, None).await?;
    let mut resp = Json(result).into_response();
    if req.poweroff_after {
        arm_poweroff(&state, ctx.as_deref(), &mut resp);
        power::arm_fallback(state.poweroff_enabled);
    }
    Ok(resp)
}

async fn run_stream(
    State(state): State<Arc<AgentState>>,
    ctx: Option<Extension<ConnCtx>>,
    body: RunBody,
) -> Result<Response, ApiError> {
    let req = parse(body)?;
    let guard = state
        .busy
        .clone()
        .try_lock_owned()
        .map_err(|_| ApiError::Busy)?;
    check_unsealed(&state)?;
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let poweroff = req.poweroff_after;
    let task_state = state.clone();
    tokio::spawn(async move {
        let last = match task_state.executor.run(&req, Some(tx.clone())).await {
            Ok(result) => StreamEvent::Result { result },
            Err(e) => StreamEvent::Error {
                message: ApiError::from(e).to_string(),
            },
        };
        let _ = tx.send(last).await;
        drop(guard);
        if poweroff {
            power::arm_fallback(task_state.poweroff_enabled);
        }
    });
    let mut resp = Response::new(axum::body::Body::new(NdjsonBody { rx }));
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    if poweroff {
        arm_poweroff(&state, ctx.as_deref(), &mut resp);
    }
    Ok(resp)
}

/// A response body of NDJSON lines, one per [`StreamEvent`], ending when the sender is gone.
struct NdjsonBody {
    rx: mpsc::Receiver<StreamEvent>,
}

impl hyper::body::Body for NdjsonBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|ev| {
            ev.map(|ev| {
                let mut line = serde_json::to_vec(&ev).unwrap_or_else(|e| {
                    format!("{{\"type\":\"error\",\"message\":\"cannot encode event: {e}\"}}")
                        .into_bytes()
                });
                line.push(b'\n');
                Ok(Frame::data(Bytes::from(line)))
            })
        })
    }
}
