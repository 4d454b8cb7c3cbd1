//! The workers inside the server: a dispatcher that claims queued submissions from the store
//! whenever a VM slot is free (the same `max_concurrent_vms` limiter as every other request),
//! runs each through the executor while renewing its lease, records the result and makes the
//! callback; a sweeper that requeues submissions whose server died and deletes old results; a
//! callback sweeper that delivers the callbacks that are due (retries, and those a dead server
//! had claimed).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::request::{self, Ctx, Request};
use super::verdict::{self, Outcome, View, DEFAULT_FIELDS};
use super::Judge0;
use crate::api::AppState;
use crate::limiter::Permit;
use crate::store::{now_ms, Row};

/// Longest time between two looks for expired results (half the retention when shorter).
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Judge0's display name of a catalogue language, e.g. `C++ (GCC 12.2.0)`.
pub fn language_label(l: &cloude_image::catalog::Language) -> String {
    let v = &l.version;
    match l.name.as_str() {
        "python" => format!("Python ({v})"),
        "javascript" => format!("JavaScript (Node.js {v})"),
        "bash" => format!("Bash ({v})"),
        "c" => format!("C (GCC {v})"),
        "cpp" => format!("C++ (GCC {v})"),
        other => {
            let mut c = other.chars();
            let first = c.next().map(|f| f.to_uppercase().collect::<String>());
            format!("{}{} ({v})", first.unwrap_or_default(), c.as_str())
        }
    }
}

pub fn label_for(state: &AppState, id: u32) -> String {
    state
        .catalog
        .by_judge0_id(id)
        .map_or_else(|| format!("language {id}"), language_label)
}

/// Starts recovery, the sweeper and the dispatcher.
pub async fn start(state: Arc<AppState>, j0: Arc<Judge0>) {
    if let Some(s) = j0.store.recovered().filter(|s| s.requeued + s.failed > 0) {
        // This server was alone on its SQLite file: what was Processing was left by a dead one.
        tracing::warn!(
            requeued = s.requeued,
            failed = s.failed,
            "judge0: submissions left running by a previous server: {} queued again, {} finished as Internal Error",
            s.requeued,
            s.failed
        );
    }
    tokio::spawn(sweeper(j0.clone()));
    tokio::spawn(callback_sweeper(state.clone(), j0.clone()));
    tokio::spawn(dispatcher(state, j0));
}

/// How often a server looks for callbacks that are due (a retry's time came, or the server
/// that claimed one died).
const CALLBACK_SWEEP_EVERY: Duration = Duration::from_secs(1);

async fn callback_sweeper(state: Arc<AppState>, j0: Arc<Judge0>) {
    while !j0.closing.load(Ordering::SeqCst) {
        deliver_callbacks(&state, &j0, None).await;
        tokio::time::sleep(CALLBACK_SWEEP_EVERY).await;
    }
}

async fn sweeper(j0: Arc<Judge0>) {
    let every = Duration::from_millis((j0.store_config.lease_ms / 2).max(500)).min(
        Duration::from_millis(j0.store_config.keep_results_s * 500).max(Duration::from_millis(500)),
    );
    let retention_every = RETENTION_EVERY
        .min(Duration::from_millis(j0.store_config.keep_results_s * 500))
        .max(Duration::from_millis(500));
    let mut last_retention: Option<Instant> = None;
    loop {
        if j0.closing.load(Ordering::SeqCst) {
            return;
        }
        match j0.store.sweep(now_ms(), j0.store_config.max_attempts).await {
            Ok(s) if s.requeued + s.failed > 0 => tracing::warn!(
                "judge0: {} submission(s) whose server stopped queued again, {} finished as Internal Error",
                s.requeued,
                s.failed
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!("judge0: lease sweep failed: {e}"),
        }
        if last_retention.is_none_or(|t| t.elapsed() >= retention_every) {
            last_retention = Some(Instant::now());
            let keep = i64::try_from(j0.store_config.keep_results_s.saturating_mul(1000))
                .unwrap_or(i64::MAX);
            match j0
                .store
                .delete_finished_before(now_ms().saturating_sub(keep))
                .await
            {
                Ok(n) if n > 0 => tracing::info!("judge0: deleted {n} expired submission(s)"),
                Ok(_) => {}
                Err(e) => tracing::warn!("judge0: retention failed: {e}"),
            }
        }
        tokio::time::sleep(every).await;
    }
}

fn workers(state: &AppState, j0: &Judge0) -> usize {
    match j0.store_config.workers {
        0 => state.config.limits.max_concurrent_vms,
        n => n,
    }
}

async fn dispatcher(state: Arc<AppState>, j0: Arc<Judge0>) {
    let slots = Arc::new(tokio::sync::Semaphore::new(workers(&state, &j0)));
    let poll = Duration::from_millis(j0.store_config.poll_ms);
    loop {
        if j0.closing.load(Ordering::SeqCst) {
            return;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let t = Instant::now();
        // Stored submissions wait in the store, never in the clients' queue: a VM slot is
        // taken only when there is work and one is free now. (Taking it through the queue on
        // every poll refused clients of a small queue, and held a slot while nothing waited.)
        match j0.store.queued().await {
            Ok(0) => {
                drop(slot);
                tokio::select! {
                    () = j0.wake.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                }
                continue;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("judge0: cannot read the queue: {e}");
                drop(slot);
                tokio::time::sleep(poll).await;
                continue;
            }
        }
        let permit = match state.executor.try_admit() {
            Ok(Some(p)) => p,
            Ok(None) => {
                drop(slot);
                tokio::time::sleep(poll).await;
                continue;
            }
            // Only a closed limiter refuses a try.
            Err(_) => return,
        };
        let lease = now_ms() + lease_ms(&j0);
        match j0.store.claim(&j0.owner, lease).await {
            Ok(Some(row)) => {
                let (state, j0) = (state.clone(), j0.clone());
                tokio::spawn(async move {
                    run_claimed(&state, &j0, row, permit, t.elapsed()).await;
                    drop(slot);
                });
            }
            Ok(None) => {
                drop(permit);
                drop(slot);
                tokio::select! {
                    () = j0.wake.notified() => {}
                    () = tokio::time::sleep(poll) => {}
                }
            }
            Err(e) => {
                tracing::warn!("judge0: cannot claim work: {e}");
                drop(permit);
                drop(slot);
                tokio::time::sleep(poll).await;
            }
        }
    }
}

fn lease_ms(j0: &Judge0) -> i64 {
    i64::try_from(j0.store_config.lease_ms).unwrap_or(i64::MAX / 2)
}

async fn run_claimed(
    state: &Arc<AppState>,
    j0: &Arc<Judge0>,
    row: Row,
    permit: Permit,
    queued: Duration,
) {
    let req: Request = match serde_json::from_str(&row.request) {
        Ok(r) => r,
        Err(e) => {
            let o = Outcome {
                status_id: 13,
                message: Some(format!("the stored submission cannot be read: {e}")),
                ..Outcome::default()
            };
            record(state, j0, &row.token, None, &o).await;
            return;
        }
    };
    tracing::info!(token = %row.token, attempt = row.attempts, "judge0: running a queued submission");
    let _ = run_and_record(state, j0, &row.token, &req, permit, queued).await;
}

/// Runs `req` (already claimed by this server as `token`), renewing the lease, then records
/// the result and makes the callback. `None` when the result was not recorded: the lease was
/// lost to another server, or the server is stopping (the submission then goes back to the
/// queue).
pub async fn run_and_record(
    state: &Arc<AppState>,
    j0: &Arc<Judge0>,
    token: &str,
    req: &Request,
    permit: Permit,
    queued: Duration,
) -> Option<(Outcome, i64)> {
    let exec = execute(state, req, permit, queued);
    tokio::pin!(exec);
    let renew_every = Duration::from_millis((j0.store_config.lease_ms / 3).max(100));
    let mut tick = tokio::time::interval(renew_every);
    tick.tick().await;
    let outcome = loop {
        tokio::select! {
            o = &mut exec => break o,
            _ = tick.tick() => {
                match j0.store.renew(token, &j0.owner, now_ms() + lease_ms(j0)).await {
                    Ok(true) => {}
                    Ok(false) => {
                        tracing::warn!(token, "judge0: lost the lease (another server took the submission); stopping its run");
                        return None;
                    }
                    Err(e) => tracing::warn!(token, "judge0: cannot renew the lease: {e}"),
                }
            }
        }
    };
    if outcome.status_id == 13 && j0.closing.load(Ordering::SeqCst) {
        // Cut short by the shutdown: another start (or server) runs it again.
        match j0.store.release(token, &j0.owner).await {
            Ok(_) => tracing::info!(token, "judge0: interrupted by the shutdown; queued again"),
            Err(e) => tracing::warn!(token, "judge0: cannot requeue at shutdown: {e}"),
        }
        return None;
    }
    let finished = record(state, j0, token, Some(req), &outcome).await?;
    Some((outcome, finished))
}

/// Stores the final result (if this server still holds the row) and starts the callback.
async fn record(
    state: &Arc<AppState>,
    j0: &Arc<Judge0>,
    token: &str,
    req: Option<&Request>,
    o: &Outcome,
) -> Option<i64> {
    let now = now_ms();
    let json = serde_json::to_string(o).unwrap_or_else(|_| "{}".into());
    let callback = req.is_some_and(|r| r.callback_url.is_some());
    match j0
        .store
        .finish(token, &j0.owner, o.status_id, &json, now, callback)
        .await
    {
        Ok(true) => {}
        Ok(false) => {
            tracing::warn!(
                token,
                "judge0: the submission is no longer ours; result dropped"
            );
            return None;
        }
        Err(e) => {
            tracing::error!(token, "judge0: cannot store the result: {e}");
            return None;
        }
    }
    state
        .metrics
        .execution("judge0", &super::status_label(o.status_id));
    if callback {
        // Stored as due with the result: if this server dies first, another delivers it.
        let (state, j0, token) = (state.clone(), j0.clone(), token.to_string());
        tokio::spawn(async move { deliver_callbacks(&state, &j0, Some(&token)).await });
    }
    Some(now)
}

/// Why a stored row cannot be shown.
#[derive(Debug)]
pub enum StoredError {
    /// The stored request does not parse (written by another version, or damaged).
    Unreadable(String),
    /// Output that is not UTF-8, asked for without base64.
    NotUtf8,
}

/// A stored submission as Judge0 clients read it (`fields`, `base64_encoded`).
pub fn render_stored(
    state: &AppState,
    row: &Row,
    fields: &[&str],
    base64: bool,
) -> Result<serde_json::Value, StoredError> {
    let req: Request =
        serde_json::from_str(&row.request).map_err(|e| StoredError::Unreadable(e.to_string()))?;
    let outcome: Option<Outcome> = row
        .result
        .as_deref()
        .and_then(|r| serde_json::from_str(r).ok());
    let view = View {
        token: &row.token,
        status_id: row.status_id,
        created_at: row.created_at,
        finished_at: row.finished_at,
        request: &req,
        outcome: outcome.as_ref(),
        language_name: label_for(state, req.language_id),
    };
    verdict::render(&view, fields, base64).map_err(|_| StoredError::NotUtf8)
}

/// Slack on a callback claim beyond one attempt's timeout.
const CALLBACK_LEASE_SLACK: Duration = Duration::from_secs(5);

/// Delivers due callbacks (only `token`'s, or any), one attempt per claim, until none is due:
/// each answered or out of tries is cleared, each failed one set due again after a backoff.
pub async fn deliver_callbacks(state: &Arc<AppState>, j0: &Arc<Judge0>, token: Option<&str>) {
    let timeout = Duration::from_secs_f64(j0.config.callbacks_timeout);
    let max_tries = i32::try_from(j0.config.callbacks_max_tries).unwrap_or(i32::MAX);
    loop {
        let now = now_ms();
        let until = now.saturating_add(ms_i64(timeout + CALLBACK_LEASE_SLACK));
        let row = match j0.store.claim_callback(token, now, until).await {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!("judge0: cannot claim a callback: {e}");
                return;
            }
        };
        let url = serde_json::from_str::<Request>(&row.request)
            .ok()
            .and_then(|r| r.callback_url);
        let body = render_stored(state, &row, &DEFAULT_FIELDS, true);
        let (Some(url), Ok(body)) = (url, body) else {
            tracing::error!(token = %row.token, "judge0: stored callback unreadable; dropped");
            settle(j0, &row.token, None).await;
            continue;
        };
        if row.callback_tries > max_tries {
            tracing::warn!(token = %row.token, url, "judge0: callback given up after {max_tries} tries");
            settle(j0, &row.token, None).await;
            continue;
        }
        let body = body.to_string().into_bytes();
        match super::callback::put(&j0.callback_pins, &url, &body, timeout).await {
            Ok(status) => {
                tracing::info!(token = %row.token, url, status, attempt = row.callback_tries, "judge0: callback delivered");
                settle(j0, &row.token, None).await;
            }
            Err(e) if row.callback_tries >= max_tries => {
                tracing::warn!(token = %row.token, url, "judge0: callback failed ({e}); given up after {max_tries} tries");
                settle(j0, &row.token, None).await;
            }
            Err(e) => {
                let pause = super::callback::retry_after(row.callback_tries);
                tracing::warn!(token = %row.token, url, attempt = row.callback_tries, "judge0: callback failed ({e}); next try in {} ms", pause.as_millis());
                settle(j0, &row.token, Some(now_ms().saturating_add(ms_i64(pause)))).await;
                if token.is_none() {
                    // The sweep moves on; this row is due again later.
                    continue;
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

async fn settle(j0: &Judge0, token: &str, next: Option<i64>) {
    if let Err(e) = j0.store.settle_callback(token, next).await {
        tracing::warn!(token, "judge0: cannot record the callback's state: {e}");
    }
}

fn ms_i64(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Runs a submission (its `number_of_runs` as test cases of one VM: compiled once) and gives
/// Judge0's result.
pub async fn execute(
    state: &Arc<AppState>,
    req: &Request,
    permit: Permit,
    queued: Duration,
) -> Outcome {
    let ctx = Ctx {
        catalog: &state.catalog,
        config: &state.config,
        judge0: &state.config.judge0,
    };
    let job = match request::job(req, &ctx) {
        Ok(j) => j,
        Err((field, msg)) => {
            return Outcome {
                status_id: 13,
                message: Some(format!("{field} {msg}")),
                ..Outcome::default()
            }
        }
    };
    match state
        .executor
        .execute(permit, job, queued, crate::executor::Talk::Whole)
        .await
    {
        Ok(outcome) => verdict::verdict(req, outcome),
        Err(e) => Outcome {
            status_id: 13,
            message: Some(e.to_string()),
            ..Outcome::default()
        },
    }
}
