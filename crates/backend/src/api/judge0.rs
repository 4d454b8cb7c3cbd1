//! Judge0 CE 1.13.1 compatibility: `/about`, `/config_info`, `/languages`, `/languages/{id}`,
//! `/statuses`, `/submissions` (`wait`, `base64_encoded`, `fields`), `/submissions/{token}`,
//! `/submissions/batch`.
//!
//! Field names, defaults, status ids, validation messages and error shapes follow Judge0, so
//! that Judge0 clients work unchanged: validation errors are 422 `{"field": ["message"]}`, other
//! errors `{"error": "message"}`, a missing or wrong API key 401 with an empty body.
// Helpers return finished responses as their error, to be sent as they are (`?`-style early
// returns in the handlers); their size does not matter next to a request's work.
#![allow(clippy::result_large_err)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use serde_json::{json, Value};

use super::json::read_body;
use super::AppState;
use crate::judge0::request::{self, Ctx, FieldErrors, Request as J0Request};
use crate::judge0::verdict::{self, View};
use crate::judge0::worker::{self, label_for, language_label};
use crate::judge0::{new_token, plausible_token, Judge0, JUDGE0_VERSION, STATUSES};
use crate::limiter::LimitError;
use crate::store::{now_ms, NewRow, Row, STATUS_IN_QUEUE};

/// The routes (without trailing slashes; `api::router` adds those).
pub fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/about", get(about)),
        ("/config_info", get(config_info)),
        ("/languages", get(languages)),
        ("/languages/:id", get(language)),
        ("/statuses", get(statuses)),
        ("/submissions", post(create)),
        ("/submissions/batch", post(batch_create).get(batch_show)),
        ("/submissions/:token", get(show).delete(delete)),
    ]
}

type Params = Query<HashMap<String, String>>;

/// A Judge0-shaped error: `{"error": message}`.
fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": msg.into() }))).into_response()
}

fn field_errors(e: &FieldErrors) -> Response {
    (StatusCode::UNPROCESSABLE_ENTITY, axum::Json(e.to_json())).into_response()
}

fn limit_error(e: LimitError) -> Response {
    let (status, retry) = match e {
        LimitError::QueueFull(_) => (StatusCode::TOO_MANY_REQUESTS, 1u64),
        LimitError::QueueTimeout(_) => (StatusCode::SERVICE_UNAVAILABLE, 5),
        LimitError::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, 10),
    };
    let mut r = error(status, format!("{e}; try again later"));
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(retry));
    r
}

fn store_unavailable(e: impl std::fmt::Display) -> Response {
    tracing::error!("judge0: {e}");
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "the submission store is unavailable; try again later",
    );
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from(5u64));
    r
}

const NOT_UTF8: &str =
    "some attributes for this submission cannot be converted to UTF-8, use base64_encoded=true query parameter";
const NOT_UTF8_BATCH: &str = "some attributes for one or more submissions cannot be converted to UTF-8, use base64_encoded=true query parameter";

fn judge0(state: &AppState) -> Result<&Arc<Judge0>, Response> {
    state
        .judge0
        .as_ref()
        .ok_or_else(|| super::error::ApiError::not_found().into_response())
}

/// Checks the API key on every Judge0 route (Judge0 also takes it as a query parameter).
pub async fn auth(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let cfg = &state.config.judge0;
    if cfg.auth_tokens.is_empty() {
        return next.run(req).await;
    }
    let from_header = req
        .headers()
        .get(cfg.auth_header.as_str())
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let from_query = req.uri().query().and_then(|q| {
        q.split('&').find_map(|kv| {
            let (k, v) = kv.split_once('=')?;
            (k == cfg.auth_header).then(|| v.to_string())
        })
    });
    let given = from_header.or(from_query).unwrap_or_default();
    if cfg
        .auth_tokens
        .iter()
        .any(|t| constant_time_eq(t.as_bytes(), given.as_bytes()))
    {
        next.run(req).await
    } else {
        StatusCode::UNAUTHORIZED.into_response()
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn about(State(state): State<Arc<AppState>>) -> Response {
    if let Err(r) = judge0(&state) {
        return r;
    }
    axum::Json(json!({
        "version": JUDGE0_VERSION,
        "homepage": "https://github.com/cloude/cloude",
        "source_code": "https://github.com/cloude/cloude",
        "maintainer": "Cloude (a Judge0 CE 1.13.1-compatible API over one fresh micro-VM per run)",
    }))
    .into_response()
}

async fn config_info(State(state): State<Arc<AppState>>) -> Response {
    if let Err(r) = judge0(&state) {
        return r;
    }
    let j = &state.config.judge0;
    axum::Json(json!({
        "maintenance_mode": false,
        "enable_wait_result": j.enable_wait_result,
        "enable_compiler_options": j.enable_compiler_options,
        "allowed_languages_for_compile_options": [],
        "enable_command_line_arguments": j.enable_command_line_arguments,
        "enable_submission_delete": false,
        "enable_callbacks": !j.callback_hosts.is_empty(),
        "callbacks_max_tries": j.callbacks_max_tries,
        "callbacks_timeout": j.callbacks_timeout,
        "enable_additional_files": j.enable_additional_files,
        "max_queue_size": j.max_queue_size,
        "cpu_time_limit": j.cpu_time_limit,
        "max_cpu_time_limit": j.max_cpu_time_limit,
        "cpu_extra_time": j.cpu_extra_time,
        "max_cpu_extra_time": j.max_cpu_extra_time,
        "wall_time_limit": j.wall_time_limit,
        "max_wall_time_limit": j.max_wall_time_limit,
        "memory_limit": j.memory_limit,
        "max_memory_limit": j.max_memory_limit,
        "stack_limit": j.stack_limit,
        "max_stack_limit": j.max_stack_limit,
        "max_processes_and_or_threads": j.max_processes_and_or_threads,
        "max_max_processes_and_or_threads": j.max_max_processes_and_or_threads,
        "enable_per_process_and_thread_time_limit": false,
        "allow_enable_per_process_and_thread_time_limit": false,
        "enable_per_process_and_thread_memory_limit": false,
        "allow_enable_per_process_and_thread_memory_limit": false,
        "max_file_size": j.max_file_size,
        "max_max_file_size": j.max_max_file_size,
        "number_of_runs": j.number_of_runs,
        "max_number_of_runs": j.max_number_of_runs,
        "redirect_stderr_to_stdout": j.redirect_stderr_to_stdout,
        "max_extract_size": j.max_extract_size,
        "enable_batched_submissions": j.enable_batched_submissions,
        "max_submission_batch_size": j.max_submission_batch_size,
        "submission_cache_duration": 0.0,
        "use_docs_as_homepage": false,
        "allow_enable_network": state.config.network.allow,
        "enable_network": false,
    }))
    .into_response()
}

/// Every (id, language) the catalogue offers, by Judge0's display name, then id.
fn judge0_languages(state: &AppState) -> Vec<(u32, &cloude_image::catalog::Language)> {
    let mut v: Vec<_> = state
        .catalog
        .languages
        .iter()
        .flat_map(|l| l.judge0_ids.iter().map(move |id| (*id, l)))
        .collect();
    v.sort_by_key(|(id, l)| (language_label(l), *id));
    v
}

async fn languages(State(state): State<Arc<AppState>>) -> Response {
    if let Err(r) = judge0(&state) {
        return r;
    }
    let list: Vec<Value> = judge0_languages(&state)
        .into_iter()
        .map(|(id, l)| json!({"id": id, "name": language_label(l)}))
        .collect();
    axum::Json(list).into_response()
}

async fn language(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Response {
    if let Err(r) = judge0(&state) {
        return r;
    }
    let found = id
        .parse::<u32>()
        .ok()
        .and_then(|id| state.catalog.by_judge0_id(id).map(|l| (id, l)));
    let Some((id, l)) = found else {
        return error(
            StatusCode::NOT_FOUND,
            format!("Couldn't find Language with 'id'={id}"),
        );
    };
    axum::Json(json!({
        "id": id,
        "name": language_label(l),
        "is_archived": false,
        "source_file": l.file,
        "compile_cmd": l.compile.as_ref().map(|c| c.join(" ")),
        "run_cmd": l.run.join(" "),
    }))
    .into_response()
}

async fn statuses(State(state): State<Arc<AppState>>) -> Response {
    if let Err(r) = judge0(&state) {
        return r;
    }
    let list: Vec<Value> = STATUSES
        .iter()
        .map(|(id, d)| json!({"id": id, "description": d}))
        .collect();
    axum::Json(list).into_response()
}

/// A parameter from the query string, else from the JSON body (Rails merges both).
fn param<'a>(
    q: &'a HashMap<String, String>,
    body: Option<&'a Value>,
    name: &str,
) -> Option<&'a str> {
    q.get(name)
        .map(String::as_str)
        .or_else(|| body.and_then(|b| b.get(name)).and_then(Value::as_str))
}

fn is_true(v: Option<&str>) -> bool {
    v == Some("true")
}

fn fields(v: Option<&str>) -> Result<Vec<&'static str>, Response> {
    verdict::requested_fields(v).map_err(|bad| {
        error(
            StatusCode::BAD_REQUEST,
            format!("invalid fields: [{}]", bad.join(", ")),
        )
    })
}

async fn read_json(state: &AppState, req: Request) -> Result<Value, Response> {
    let bytes = read_body(req.into_body(), state.config.judge0.max_body_bytes)
        .await
        .map_err(|e| error(e.status, e.message))?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(json!({}));
    }
    serde_json::from_slice(&bytes)
        .map_err(|e| error(StatusCode::BAD_REQUEST, format!("invalid JSON: {e}")))
}

/// Judge0 refuses new work when its queue holds `max_queue_size` submissions.
async fn check_queue(j0: &Judge0, adding: usize) -> Result<(), Response> {
    let queued = j0.store.queued().await.map_err(store_unavailable)?;
    if queued as usize + adding > j0.config.max_queue_size {
        let mut r = error(StatusCode::SERVICE_UNAVAILABLE, "queue is full");
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(1u64));
        return Err(r);
    }
    Ok(())
}

/// Decodes and validates one `POST /submissions` body exactly as the handler does, without
/// server state (pure; fuzzed by `fuzz/fuzz_targets/judge0_request.rs`). Malformed JSON is
/// reported as a field error on `submission`.
pub fn decode_judge0(
    body: &[u8],
    base64: bool,
    catalog: &cloude_image::catalog::Catalog,
    config: &crate::config::Config,
) -> Result<(J0Request, crate::executor::Job), FieldErrors> {
    let value: Value = serde_json::from_slice(body).map_err(|e| {
        let mut f = FieldErrors::default();
        f.add("submission", format!("is not valid JSON: {e}"));
        f
    })?;
    let ctx = Ctx {
        catalog,
        config,
        judge0: &config.judge0,
    };
    request::parse(&value, base64, &ctx)
}

fn ctx(state: &AppState) -> Ctx<'_> {
    Ctx {
        catalog: &state.catalog,
        config: &state.config,
        judge0: &state.config.judge0,
    }
}

fn render_row(
    state: &AppState,
    row: &Row,
    fields: &[&str],
    base64: bool,
) -> Result<Value, Response> {
    crate::judge0::worker::render_stored(state, row, fields, base64).map_err(|e| match e {
        crate::judge0::worker::StoredError::Unreadable(why) => {
            tracing::error!(token = %row.token, "judge0: stored request unreadable: {why}");
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the stored submission cannot be read",
            )
        }
        crate::judge0::worker::StoredError::NotUtf8 => error(StatusCode::BAD_REQUEST, NOT_UTF8),
    })
}

async fn create(State(state): State<Arc<AppState>>, Query(q): Params, req: Request) -> Response {
    let t = Instant::now();
    let j0 = match judge0(&state) {
        Ok(j) => j.clone(),
        Err(r) => return r,
    };
    let body = match read_json(&state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let wait = is_true(param(&q, Some(&body), "wait"));
    if wait && !j0.config.enable_wait_result {
        return error(StatusCode::BAD_REQUEST, "wait not allowed");
    }
    let base64 = is_true(param(&q, Some(&body), "base64_encoded"));
    let fields = match fields(param(&q, Some(&body), "fields")) {
        Ok(f) => f,
        Err(r) => return r,
    };
    if let Err(r) = check_queue(&j0, 1).await {
        return r;
    }
    let (sub, _job) = match request::parse(&body, base64, &ctx(&state)) {
        Ok(x) => x,
        Err(e) => return field_errors(&e),
    };
    let token = new_token();
    let stored = match serde_json::to_string(&sub) {
        Ok(s) => s,
        Err(e) => return store_unavailable(e),
    };
    let now = now_ms();
    if !wait {
        let row = NewRow {
            token: &token,
            request: &stored,
        };
        if let Err(e) = j0.store.insert(&[row], now).await {
            return store_unavailable(e);
        }
        j0.wake.notify_one();
        return (StatusCode::CREATED, axum::Json(json!({ "token": token }))).into_response();
    }
    // wait=true: admitted like a /v1 request (429/503 when saturated), stored as Processing by
    // this server, run in a task of its own so that a client that goes away does not cancel it.
    let (permit, queued) = match state.executor.admit().await {
        Ok(p) => p,
        Err(e) => return limit_error(e),
    };
    let lease = now + i64::try_from(j0.store_config.lease_ms).unwrap_or(30_000);
    let row = NewRow {
        token: &token,
        request: &stored,
    };
    if let Err(e) = j0.store.insert_claimed(row, &j0.owner, now, lease).await {
        return store_unavailable(e);
    }
    let run = {
        let (state, j0, token, sub) = (state.clone(), j0.clone(), token.clone(), sub.clone());
        tokio::spawn(async move {
            worker::run_and_record(&state, &j0, &token, &sub, permit, queued).await
        })
    };
    let recorded = run.await.ok().flatten();
    let view_outcome;
    let (status_id, finished) = match &recorded {
        Some((o, finished)) => {
            view_outcome = Some(o);
            (o.status_id, Some(*finished))
        }
        None => {
            // Not recorded here (shutdown or lost lease): answer what the store says.
            view_outcome = None;
            match j0.store.get(std::slice::from_ref(&token)).await {
                Ok(rows) if !rows.is_empty() => {
                    let r = &rows[0];
                    return match render_row(&state, r, &fields, base64) {
                        Ok(v) => (StatusCode::CREATED, axum::Json(v)).into_response(),
                        Err(_) => (
                            StatusCode::CREATED,
                            axum::Json(json!({"error": NOT_UTF8, "token": token})),
                        )
                            .into_response(),
                    };
                }
                _ => (STATUS_IN_QUEUE, None),
            }
        }
    };
    let view = View {
        token: &token,
        status_id,
        created_at: now,
        finished_at: finished,
        request: &sub,
        outcome: view_outcome,
        language_name: label_for(&state, sub.language_id),
    };
    state.metrics.observe("total", t.elapsed());
    match verdict::render(&view, &fields, base64) {
        Ok(v) => (StatusCode::CREATED, axum::Json(v)).into_response(),
        Err(_) => (
            StatusCode::CREATED,
            axum::Json(json!({"error": NOT_UTF8, "token": token})),
        )
            .into_response(),
    }
}

async fn show(
    State(state): State<Arc<AppState>>,
    Path(token): Path<String>,
    Query(q): Params,
) -> Response {
    let j0 = match judge0(&state) {
        Ok(j) => j.clone(),
        Err(r) => return r,
    };
    let fields = match fields(param(&q, None, "fields")) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let base64 = is_true(param(&q, None, "base64_encoded"));
    if !plausible_token(&token) {
        return error(StatusCode::NOT_FOUND, "record not found");
    }
    let rows = match j0.store.get(std::slice::from_ref(&token)).await {
        Ok(r) => r,
        Err(e) => return store_unavailable(e),
    };
    let Some(row) = rows.first() else {
        return error(StatusCode::NOT_FOUND, "record not found");
    };
    match render_row(&state, row, &fields, base64) {
        Ok(v) => axum::Json(v).into_response(),
        Err(r) => r,
    }
}

async fn delete(State(state): State<Arc<AppState>>) -> Response {
    if let Err(r) = judge0(&state) {
        return r;
    }
    error(StatusCode::BAD_REQUEST, "delete not allowed")
}

fn batch_size_error(max: usize) -> Response {
    error(
        StatusCode::BAD_REQUEST,
        format!("number of submissions in a batch should be less than or equal to {max}"),
    )
}

async fn batch_create(
    State(state): State<Arc<AppState>>,
    Query(q): Params,
    req: Request,
) -> Response {
    let j0 = match judge0(&state) {
        Ok(j) => j.clone(),
        Err(r) => return r,
    };
    if !j0.config.enable_batched_submissions {
        return error(
            StatusCode::BAD_REQUEST,
            "batched submissions are not allowed",
        );
    }
    let body = match read_json(&state, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let base64 = is_true(param(&q, Some(&body), "base64_encoded"));
    let subs: &[Value] = match body.get("submissions") {
        Some(Value::Array(a)) => a,
        _ => &[],
    };
    let max = j0.config.max_submission_batch_size;
    if subs.len() > max {
        return batch_size_error(max);
    }
    if subs.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "there should be at least one submission in a batch",
        );
    }
    if let Err(r) = check_queue(&j0, subs.len()).await {
        return r;
    }
    let ctx = ctx(&state);
    let mut answers: Vec<Value> = Vec::with_capacity(subs.len());
    let mut accepted: Vec<(String, String)> = Vec::new();
    for s in subs {
        match request::parse(s, base64, &ctx) {
            Ok((sub, _)) => match serde_json::to_string(&sub) {
                Ok(stored) => {
                    let token = new_token();
                    answers.push(json!({ "token": token }));
                    accepted.push((token, stored));
                }
                Err(e) => return store_unavailable(e),
            },
            Err(e) => answers.push(e.to_json()),
        }
    }
    if !accepted.is_empty() {
        let rows: Vec<NewRow<'_>> = accepted
            .iter()
            .map(|(t, r)| NewRow {
                token: t,
                request: r,
            })
            .collect();
        if let Err(e) = j0.store.insert(&rows, now_ms()).await {
            return store_unavailable(e);
        }
        j0.wake.notify_one();
    }
    let status = if accepted.is_empty() {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::CREATED
    };
    (status, axum::Json(Value::Array(answers))).into_response()
}

async fn batch_show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Params,
) -> Response {
    let j0 = match judge0(&state) {
        Ok(j) => j.clone(),
        Err(r) => return r,
    };
    if !j0.config.enable_batched_submissions {
        return error(
            StatusCode::BAD_REQUEST,
            "batched submissions are not allowed",
        );
    }
    let fields = match fields(param(&q, None, "fields")) {
        Ok(f) => f,
        Err(r) => return r,
    };
    let base64 = is_true(param(&q, None, "base64_encoded"));
    let raw = headers
        .get("tokens")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .or_else(|| q.get("tokens").cloned())
        .unwrap_or_default();
    let tokens: Vec<String> = raw
        .trim()
        .split(',')
        .filter(|t| !t.is_empty())
        .map(str::to_string)
        .collect();
    let max = j0.config.max_submission_batch_size;
    if tokens.len() > max {
        return batch_size_error(max);
    }
    if tokens.is_empty() {
        return error(
            StatusCode::BAD_REQUEST,
            "there should be at least one submission in a batch",
        );
    }
    let lookup: Vec<String> = tokens
        .iter()
        .filter(|t| plausible_token(t))
        .cloned()
        .collect();
    let rows = match j0.store.get(&lookup).await {
        Ok(r) => r,
        Err(e) => return store_unavailable(e),
    };
    let mut out = Vec::with_capacity(tokens.len());
    for t in &tokens {
        match rows.iter().find(|r| r.token == *t) {
            None => out.push(Value::Null),
            Some(row) => match render_row(&state, row, &fields, base64) {
                Ok(v) => out.push(v),
                Err(_) => return error(StatusCode::BAD_REQUEST, NOT_UTF8_BATCH),
            },
        }
    }
    axum::Json(json!({ "submissions": out })).into_response()
}
