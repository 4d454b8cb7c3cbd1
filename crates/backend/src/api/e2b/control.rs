//! E2B's control plane: sandboxes created, described, listed, killed, given a new timeout and
//! connected to. Fields are E2B's (camelCase, `templateID`, `sandboxID`, …).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, MethodRouter};
use axum::Json;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{owned, tenant, E2bError, CLIENT_ID, ENVD_VERSION};
use crate::api::sandboxes::{create_sandbox, sandboxes};
use crate::api::AppState;
use crate::sandbox::{Info, Sandbox};

/// Largest control-plane request body.
const MAX_BODY_BYTES: usize = 64 * 1024;
/// Most sandboxes one list page holds (and the default page).
const MAX_PAGE: usize = 100;

pub fn routes() -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    vec![
        ("/e2b/sandboxes", post(create).get(list_v1)),
        ("/e2b/v2/sandboxes", post(create).get(list_v2)),
        ("/e2b/sandboxes/:id", get(show).delete(kill)),
        ("/e2b/sandboxes/:id/timeout", post(set_timeout)),
        ("/e2b/sandboxes/:id/pause", post(pause)),
        ("/e2b/sandboxes/:id/resume", post(connect)),
        ("/e2b/sandboxes/:id/connect", post(connect)),
        ("/e2b/v2/sandboxes/:id/connect", post(connect)),
    ]
}

async fn body_json<T: serde::de::DeserializeOwned + Default>(body: Body) -> Result<T, E2bError> {
    let b = crate::api::json::read_body(body, MAX_BODY_BYTES).await?;
    if b.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(&b).map_err(|e| E2bError::bad(format!("invalid JSON body: {e}")))
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CreateIn {
    #[serde(rename = "templateID")]
    template_id: Option<String>,
    timeout: Option<u64>,
    metadata: Option<HashMap<String, String>>,
    env_vars: Option<HashMap<String, String>>,
    auto_pause: Option<bool>,
    auto_resume: Option<Value>,
    volume_mounts: Option<Vec<Value>>,
    network: Option<Value>,
    #[serde(rename = "allow_internet_access")]
    allow_internet_access: Option<bool>,
}

/// The `Sandbox` model: what create and connect answer.
fn sandbox_json(sb: &Sandbox, i: &Info) -> Value {
    json!({
        "templateID": i.template,
        "alias": i.template,
        "sandboxID": i.id,
        "clientID": CLIENT_ID,
        "envdVersion": ENVD_VERSION,
        "envdAccessToken": sb.token(),
        "trafficAccessToken": sb.token(),
    })
}

/// The `ListedSandbox` model (`SandboxDetail` adds the access token).
fn listed_json(i: &Info) -> Value {
    let meta: serde_json::Map<String, Value> = i
        .metadata
        .iter()
        .map(|(k, v)| {
            let s = v.as_str().map_or_else(|| v.to_string(), str::to_string);
            (k.clone(), Value::String(s))
        })
        .collect();
    json!({
        "templateID": i.template,
        "alias": i.template,
        "sandboxID": i.id,
        "clientID": CLIENT_ID,
        "startedAt": crate::judge0::timestamp(i.created_ms),
        "endAt": crate::judge0::timestamp(i.expires_ms),
        "cpuCount": i.vcpus,
        "memoryMB": i.memory_mib,
        "diskSizeMB": 0,
        "state": if i.paused { "paused" } else { "running" },
        "envdVersion": ENVD_VERSION,
        "metadata": meta,
    })
}

async fn create(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, E2bError> {
    let owner = tenant(&state, &headers)?;
    let req: CreateIn = body_json(body).await?;
    if req.auto_pause == Some(true) || req.auto_resume.is_some() {
        return Err(E2bError::bad(
            "autoPause/autoResume: pausing sandboxes is not offered by this server",
        ));
    }
    if req.volume_mounts.as_ref().is_some_and(|v| !v.is_empty()) {
        return Err(E2bError::bad(
            "volumeMounts: volumes are not offered by this server",
        ));
    }
    if req.network.is_some() {
        return Err(E2bError::bad(
            "network: egress rules are not offered by this server (a sandbox has no network)",
        ));
    }
    if req.allow_internet_access == Some(true) {
        return Err(E2bError::bad(
            "allow_internet_access: sandboxes of this server have no network",
        ));
    }
    let create = cloude_api::sandbox::SandboxCreate {
        template: req.template_id,
        timeout_s: req.timeout,
        env: req.env_vars.map(|m| m.into_iter().collect()),
        metadata: req
            .metadata
            .map(|m| m.into_iter().map(|(k, v)| (k, Value::String(v))).collect()),
    };
    let info = create_sandbox(&state, create, false, owner).await?;
    let sb = sandboxes(&state)?.get(&info.id)?;
    tracing::info!(sandbox = %info.id, "e2b sandbox created");
    Ok((StatusCode::CREATED, Json(sandbox_json(&sb, &sb.info()))).into_response())
}

async fn show(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Value>, E2bError> {
    let t = tenant(&state, &headers)?;
    let sb = owned(&state, &t, &id)?;
    let mut v = listed_json(&sb.info());
    v["envdAccessToken"] = Value::String(sb.token().to_string());
    Ok(Json(v))
}

/// The sandboxes `tenant` sees, oldest first, filtered by `metadata` (E2B's list filter: a
/// query string inside the parameter) and `state`.
fn visible(
    state: &AppState,
    t: &Option<String>,
    q: &HashMap<String, String>,
) -> Result<Vec<Info>, E2bError> {
    let sbx = sandboxes(state)?;
    let states: Option<Vec<&str>> = q
        .get("state")
        .map(|s| s.split(',').map(str::trim).collect());
    let wanted = |i: &Info| {
        states
            .as_ref()
            .is_none_or(|s| s.contains(&if i.paused { "paused" } else { "running" }))
    };
    let want: Vec<(String, String)> = match q.get("metadata") {
        None => Vec::new(),
        Some(m) => serde_urlencoded::from_str(m)
            .map_err(|e| E2bError::bad(format!("metadata filter: {e}")))?,
    };
    Ok(sbx
        .list()
        .into_iter()
        .filter(|i| t.is_none() || i.owner == *t)
        .filter(wanted)
        .filter(|i| {
            want.iter()
                .all(|(k, v)| i.metadata.get(k).and_then(Value::as_str) == Some(v.as_str()))
        })
        .collect())
}

async fn list_v1(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Vec<Value>>, E2bError> {
    let t = tenant(&state, &headers)?;
    Ok(Json(
        visible(&state, &t, &q)?.iter().map(listed_json).collect(),
    ))
}

/// `GET /v2/sandboxes`: pages of at most `limit` (100), the next one named by `X-Next-Token`.
async fn list_v2(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Response, E2bError> {
    let t = tenant(&state, &headers)?;
    let limit = match q.get("limit") {
        None => MAX_PAGE,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_PAGE).contains(n))
            .ok_or_else(|| E2bError::bad(format!("limit {l:?}: 1 to {MAX_PAGE}")))?,
    };
    let mut all = visible(&state, &t, &q)?;
    if q.get("order").map(String::as_str) == Some("desc") {
        all.reverse();
    }
    // The token is the last id of the page before; what follows it comes next.
    let start = match q.get("nextToken").filter(|s| !s.is_empty()) {
        None => 0,
        Some(tok) => all
            .iter()
            .position(|i| &i.id == tok)
            .map_or(all.len(), |p| p + 1),
    };
    let page: Vec<&Info> = all.iter().skip(start).take(limit).collect();
    let more = start + page.len() < all.len();
    let mut resp = Json(page.iter().map(|i| listed_json(i)).collect::<Vec<_>>()).into_response();
    if more {
        if let Some(last) = page.last() {
            if let Ok(v) = HeaderValue::from_str(&last.id) {
                resp.headers_mut().insert("x-next-token", v);
            }
        }
    }
    Ok(resp)
}

async fn kill(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let t = tenant(&state, &headers)?;
    let sb = owned(&state, &t, &id)?;
    sandboxes(&state)?.delete(sb.id()).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Debug, Default, Deserialize)]
struct TimeoutIn {
    timeout: Option<u64>,
}

fn checked_timeout(state: &AppState, t: u64) -> Result<Duration, E2bError> {
    let max = sandboxes(state)?.config().max_timeout_s;
    if t == 0 || t > max {
        return Err(E2bError::bad(format!(
            "timeout {t} s is out of range: 1 to {max} s ([sandboxes] max_timeout_s)"
        )));
    }
    Ok(Duration::from_secs(t))
}

async fn set_timeout(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<StatusCode, E2bError> {
    let t = tenant(&state, &headers)?;
    let sb = owned(&state, &t, &id)?;
    let req: TimeoutIn = body_json(body).await?;
    let secs = req
        .timeout
        .ok_or_else(|| E2bError::bad("timeout: required, in seconds"))?;
    sb.set_timeout(checked_timeout(&state, secs)?);
    Ok(StatusCode::NO_CONTENT)
}

/// Pause: 204, or 409 when it is paused already. The VM is frozen, not saved to disk: its memory
/// stays held (see `[sandboxes] max_paused_s`).
async fn pause(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, E2bError> {
    let t = tenant(&state, &headers)?;
    let sb = owned(&state, &t, &id)?;
    match sandboxes(&state)?.pause(sb.id()).await {
        Ok(()) => Ok(StatusCode::NO_CONTENT),
        Err(crate::sandbox::SandboxError::Paused(_)) => Err(E2bError::new(
            StatusCode::CONFLICT,
            format!("Sandbox {id} is already paused"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Connect (or resume): a paused sandbox is resumed (201), a running one answers at once (200);
/// either way its timeout is at least the one asked for.
async fn connect(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> Result<Response, E2bError> {
    let t = tenant(&state, &headers)?;
    let sb = owned(&state, &t, &id)?;
    let req: TimeoutIn = body_json(body).await?;
    let timeout = req
        .timeout
        .map(|s| checked_timeout(&state, s))
        .transpose()?;
    let resumed = sandboxes(&state)?.resume(sb.id(), timeout).await?;
    if let (false, Some(t)) = (resumed, timeout) {
        sb.extend(t);
    }
    let status = if resumed {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(sandbox_json(&sb, &sb.info()))).into_response())
}
