//! The workers inside the server: a dispatcher that claims queued submissions from the store
//! whenever a VM slot is free (the same `max_concurrent_vms` limiter as every other request),
//! runs each through the executor while renewing its lease, records the result and makes the
//! callback; a sweeper that requeues submissions whose server died and deletes old results.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::request::{self, Ctx, Request};
use super::verdict::{self, Outcome, View, DEFAULT_FIELDS};
use super::Judge0;
use crate::api::AppState;
use crate::limiter::{LimitError, Permit};
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
    tokio::spawn(dispatcher(state, j0));
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
        let permit = match state.executor.admit().await {
            Ok((p, _)) => p,
            Err(LimitError::ShuttingDown) => return,
            Err(_) => {
                tokio::time::sleep(poll).await;
                continue;
            }
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
            record(state, j0, &row.token, row.created_at, None, &o).await;
            return;
        }
    };
    tracing::info!(token = %row.token, attempt = row.attempts, "judge0: running a queued submission");
    let _ = run_and_record(state, j0, &row.token, row.created_at, &req, permit, queued).await;
}

/// Runs `req` (already claimed by this server as `token`), renewing the lease, then records
/// the result and makes the callback. `None` when the result was not recorded: the lease was
/// lost to another server, or the server is stopping (the submission then goes back to the
/// queue).
pub async fn run_and_record(
    state: &Arc<AppState>,
    j0: &Arc<Judge0>,
    token: &str,
    created_at: i64,
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
    let finished = record(state, j0, token, created_at, Some(req), &outcome).await?;
    Some((outcome, finished))
}

/// Stores the final result (if this server still holds the row) and starts the callback.
async fn record(
    state: &Arc<AppState>,
    j0: &Arc<Judge0>,
    token: &str,
    created_at: i64,
    req: Option<&Request>,
    o: &Outcome,
) -> Option<i64> {
    let now = now_ms();
    let json = serde_json::to_string(o).unwrap_or_else(|_| "{}".into());
    match j0
        .store
        .finish(token, &j0.owner, o.status_id, &json, now)
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
    if let Some((req, url)) = req.and_then(|r| r.callback_url.as_deref().map(|u| (r, u))) {
        let view = View {
            token,
            status_id: o.status_id,
            created_at,
            finished_at: Some(now),
            request: req,
            outcome: Some(o),
            language_name: label_for(state, req.language_id),
        };
        if let Ok(body) = verdict::render(&view, &DEFAULT_FIELDS, true) {
            let body = body.to_string().into_bytes();
            let url = url.to_string();
            let tries = j0.config.callbacks_max_tries;
            let timeout = Duration::from_secs_f64(j0.config.callbacks_timeout);
            tokio::spawn(async move {
                super::callback::deliver(&url, &body, tries, timeout).await;
            });
        }
    }
    Some(now)
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
    match state.executor.execute(permit, job, queued, None).await {
        Ok(outcome) => verdict::verdict(req, outcome),
        Err(e) => Outcome {
            status_id: 13,
            message: Some(e.to_string()),
            ..Outcome::default()
        },
    }
}
