//! Durable storage of Judge0 submissions: embedded SQLite (default) or PostgreSQL (shared by
//! several servers).
//!
//! A row is written before the client hears its token (accepted = durable). States: In Queue
//! (1) → Processing (2, claimed by one server with a lease it renews while the program runs) →
//! a final status (3..=14) with its result. A Processing row whose lease ran out (its server
//! died) goes back to the queue, or is finished as Internal Error after `max_attempts` claims.
//! Finished rows are deleted `keep_results_s` after they finished.
//!
//! Callbacks are durable too: a row finished with a `callback_url` gets `callback_due` (when its
//! next delivery attempt is due) in the same update. A server delivering it first claims it
//! (`callback_due` moved to a lease's end, `callback_tries` counted), then clears it once
//! answered or out of tries, or sets the next attempt's time; a server that died mid-delivery
//! leaves a lease that runs out, and any server's callback sweep takes it up.

mod postgres;
mod sqlite;

use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Status ids the store itself needs (Judge0's numbering).
pub const STATUS_IN_QUEUE: i32 = 1;
pub const STATUS_PROCESSING: i32 = 2;
pub const STATUS_INTERNAL_ERROR: i32 = 13;

/// `[store]` in the server configuration.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// `""`: SQLite at `$CLOUDE_HOME/judge0.sqlite3`; `sqlite:PATH`; or `postgres://…`.
    pub url: String,
    /// How long finished submissions are kept (seconds).
    pub keep_results_s: u64,
    /// A claimed submission's lease; renewed every third of it while it runs (ms).
    pub lease_ms: u64,
    /// Claims of one submission (crashes while it ran count) before it is finished as
    /// Internal Error.
    pub max_attempts: u32,
    /// How often a server looks for queued work it was not told about (ms).
    pub poll_ms: u64,
    /// Asynchronous submissions run at once by this server (0: `limits.max_concurrent_vms`).
    pub workers: usize,
    /// PostgreSQL: connections kept open by this server.
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// PostgreSQL: the CA(s) the database's TLS certificate must chain to (`""`: the system's).
    #[serde(default)]
    pub ca_file: String,
}

fn default_pool_size() -> usize {
    4
}

impl StoreConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_ms < 1000 {
            return Err("store.lease_ms must be at least 1000".into());
        }
        if self.max_attempts == 0 || self.max_attempts > 100 {
            return Err("store.max_attempts must be between 1 and 100".into());
        }
        if !(10..=60_000).contains(&self.poll_ms) {
            return Err("store.poll_ms must be between 10 and 60000".into());
        }
        if self.keep_results_s == 0 {
            return Err("store.keep_results_s must be at least 1".into());
        }
        if self.workers > 1024 {
            return Err("store.workers must be at most 1024".into());
        }
        if !(1..=64).contains(&self.pool_size) {
            return Err("store.pool_size must be between 1 and 64".into());
        }
        let u = self.url.as_str();
        if !(u.is_empty()
            || u.starts_with("sqlite:")
            || u.starts_with("postgres://")
            || u.starts_with("postgresql://"))
        {
            return Err("store.url must be empty, sqlite:PATH or postgres://…".into());
        }
        Ok(())
    }
}

/// The columns every query returns, in [`Row`]'s order.
const COLUMNS: &str =
    "token, status_id, request, result, created_at, finished_at, attempts, callback_tries";

/// One stored submission.
#[derive(Clone, Debug)]
pub struct Row {
    pub token: String,
    pub status_id: i32,
    /// The accepted request (JSON, written by `judge0::Request`).
    pub request: String,
    /// The result (JSON, `judge0::Outcome`), once final.
    pub result: Option<String>,
    /// Milliseconds since the epoch.
    pub created_at: i64,
    pub finished_at: Option<i64>,
    pub attempts: i32,
    /// Callback deliveries claimed so far.
    pub callback_tries: i32,
}

/// A new row: the token is chosen by the caller.
pub struct NewRow<'a> {
    pub token: &'a str,
    pub request: &'a str,
}

#[derive(Debug, thiserror::Error)]
#[error("submission store: {0}")]
pub struct StoreError(pub String);

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError(e.to_string())
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(e: tokio_postgres::Error) -> Self {
        // The plain Display of a server error is only "db error"; the sources say what.
        StoreError(causes(&e))
    }
}

/// An error and its sources, each said once (`a: b: c`), at most eight deep.
pub(crate) fn causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    for _ in 0..8 {
        let Some(s) = next else { break };
        let part = s.to_string();
        if !text.ends_with(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        next = s.source();
    }
    text
}

/// What a sweep of expired leases did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub requeued: u64,
    pub failed: u64,
}

pub enum Store {
    Sqlite(sqlite::SqliteStore),
    Postgres(postgres::PgStore),
}

/// Milliseconds since the epoch, now.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// The message a submission gets when it was claimed `max_attempts` times without finishing.
pub fn abandoned_message(attempts: i32) -> String {
    format!(
        "the server running this submission stopped before it finished, {attempts} time(s); it was not run again"
    )
}

impl Store {
    /// Opens (and creates the schema of) the store `config.url` names.
    pub async fn open(config: &StoreConfig) -> Result<Store, StoreError> {
        let url = config.url.trim();
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let ca = (!config.ca_file.is_empty()).then(|| std::path::Path::new(&config.ca_file));
            return Ok(Store::Postgres(
                postgres::PgStore::connect(url, config.pool_size, ca).await?,
            ));
        }
        let path = match url.strip_prefix("sqlite:") {
            Some(p) => std::path::PathBuf::from(p),
            None => cloude_image::paths::cloude_home().join("judge0.sqlite3"),
        };
        let max = i32::try_from(config.max_attempts).unwrap_or(i32::MAX);
        let store = tokio::task::spawn_blocking(move || sqlite::SqliteStore::open(&path, max))
            .await
            .map_err(|e| StoreError(e.to_string()))??;
        Ok(Store::Sqlite(store))
    }

    /// Describes the store for logs (never a password).
    pub fn describe(&self) -> String {
        match self {
            Store::Sqlite(s) => format!("sqlite {}", s.path.display()),
            Store::Postgres(p) => format!("postgresql {}", p.describe()),
        }
    }

    /// What start-up recovery did: an SQLite store opened by the only live server on its file
    /// requeues (or fails, after `max_attempts`) every row left Processing, at once.
    pub fn recovered(&self) -> Option<&Swept> {
        match self {
            Store::Sqlite(s) => s.recovered.as_ref(),
            Store::Postgres(_) => None,
        }
    }

    pub async fn insert(&self, rows: &[NewRow<'_>], now: i64) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => {
                let rows: Vec<(String, String)> = rows
                    .iter()
                    .map(|r| (r.token.to_string(), r.request.to_string()))
                    .collect();
                s.call(move |c| sqlite::insert(c, &rows, now)).await
            }
            Store::Postgres(p) => p.insert(rows, now).await,
        }
    }

    /// Inserts one row already claimed by `owner` (a `wait=true` submission this server runs).
    pub async fn insert_claimed(
        &self,
        row: NewRow<'_>,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => {
                let (t, r, o) = (
                    row.token.to_string(),
                    row.request.to_string(),
                    owner.to_string(),
                );
                s.call(move |c| sqlite::insert_claimed(c, &t, &r, &o, now, lease_until))
                    .await
            }
            Store::Postgres(p) => p.insert_claimed(row, owner, now, lease_until).await,
        }
    }

    pub async fn queued(&self) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(sqlite::queued).await,
            Store::Postgres(p) => p.queued().await,
        }
    }

    pub async fn get(&self, tokens: &[String]) -> Result<Vec<Row>, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let t = tokens.to_vec();
                s.call(move |c| sqlite::get(c, &t)).await
            }
            Store::Postgres(p) => p.get(tokens).await,
        }
    }

    /// Claims the oldest queued submission for `owner` until `lease_until`.
    pub async fn claim(&self, owner: &str, lease_until: i64) -> Result<Option<Row>, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let o = owner.to_string();
                s.call(move |c| sqlite::claim(c, &o, lease_until)).await
            }
            Store::Postgres(p) => p.claim(owner, lease_until).await,
        }
    }

    /// Renews `owner`'s lease on `token`; false when the row is no longer its own.
    pub async fn renew(
        &self,
        token: &str,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let (t, o) = (token.to_string(), owner.to_string());
                s.call(move |c| sqlite::renew(c, &t, &o, lease_until)).await
            }
            Store::Postgres(p) => p.renew(token, owner, lease_until).await,
        }
    }

    /// Records the final status and result, if `owner` still holds the row; with `callback`
    /// its first delivery is due at once.
    pub async fn finish(
        &self,
        token: &str,
        owner: &str,
        status_id: i32,
        result: &str,
        now: i64,
        callback: bool,
    ) -> Result<bool, StoreError> {
        let due = callback.then_some(now);
        match self {
            Store::Sqlite(s) => {
                let (t, o, r) = (token.to_string(), owner.to_string(), result.to_string());
                s.call(move |c| sqlite::finish(c, &t, &o, status_id, &r, now, due))
                    .await
            }
            Store::Postgres(p) => p.finish(token, owner, status_id, result, now, due).await,
        }
    }

    /// Claims a callback due by `now` (that of `token`, or the longest due) until `until`.
    pub async fn claim_callback(
        &self,
        token: Option<&str>,
        now: i64,
        until: i64,
    ) -> Result<Option<Row>, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let t = token.map(str::to_string);
                s.call(move |c| sqlite::claim_callback(c, t.as_deref(), now, until))
                    .await
            }
            Store::Postgres(p) => p.claim_callback(token, now, until).await,
        }
    }

    /// Ends a claimed callback: delivered or given up (`None`), or its next attempt's time.
    pub async fn settle_callback(&self, token: &str, next: Option<i64>) -> Result<(), StoreError> {
        match self {
            Store::Sqlite(s) => {
                let t = token.to_string();
                s.call(move |c| sqlite::settle_callback(c, &t, next)).await
            }
            Store::Postgres(p) => p.settle_callback(token, next).await,
        }
    }

    /// Puts a row `owner` holds back in the queue without counting the attempt (shutdown).
    pub async fn release(&self, token: &str, owner: &str) -> Result<bool, StoreError> {
        match self {
            Store::Sqlite(s) => {
                let (t, o) = (token.to_string(), owner.to_string());
                s.call(move |c| sqlite::release(c, &t, &o)).await
            }
            Store::Postgres(p) => p.release(token, owner).await,
        }
    }

    /// Requeues Processing rows whose lease ended before `now` (all of them with `i64::MAX`),
    /// or finishes them as Internal Error once they were claimed `max_attempts` times.
    pub async fn sweep(&self, now: i64, max_attempts: u32) -> Result<Swept, StoreError> {
        let max = i32::try_from(max_attempts).unwrap_or(i32::MAX);
        match self {
            Store::Sqlite(s) => s.call(move |c| sqlite::sweep(c, now, max)).await,
            Store::Postgres(p) => p.sweep(now, max).await,
        }
    }

    /// Deletes rows that finished before `before`; returns how many.
    pub async fn delete_finished_before(&self, before: i64) -> Result<u64, StoreError> {
        match self {
            Store::Sqlite(s) => s.call(move |c| sqlite::delete_before(c, before)).await,
            Store::Postgres(p) => p.delete_before(before).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(url: String) -> StoreConfig {
        StoreConfig {
            url,
            keep_results_s: 60,
            lease_ms: 1000,
            max_attempts: 2,
            poll_ms: 100,
            workers: 0,
            pool_size: 4,
            ca_file: String::new(),
        }
    }

    #[test]
    fn config_is_checked() {
        let dir = tempfile::tempdir().expect("tmp");
        let mut c = cfg(format!("sqlite:{}", dir.path().join("x").display()));
        assert!(c.validate().is_ok());
        c.url = "mysql://x".into();
        assert!(c.validate().is_err());
        c.url = String::new();
        c.lease_ms = 10;
        assert!(c.validate().is_err());
    }

    /// Callbacks: due with the result, claimed by one deliverer at a time until its lease ends,
    /// retried when set due again, gone once settled; a file from before callbacks were
    /// stored gains the columns.
    #[tokio::test]
    async fn sqlite_callbacks_are_claimed_once_and_settled() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("old.sqlite3");
        {
            // The schema as it was before durable callbacks.
            let c = rusqlite::Connection::open(&path).expect("open");
            c.execute_batch(
                "CREATE TABLE judge0_submissions (id INTEGER PRIMARY KEY AUTOINCREMENT, token TEXT NOT NULL UNIQUE,
                 status_id INTEGER NOT NULL, request TEXT NOT NULL, result TEXT, created_at INTEGER NOT NULL,
                 finished_at INTEGER, owner TEXT, lease_until INTEGER, attempts INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO judge0_submissions (token, status_id, request, created_at) VALUES ('old', 1, '{}', 1);",
            )
            .expect("old schema");
        }
        let store = Store::open(&cfg(format!("sqlite:{}", path.display())))
            .await
            .expect("open an old file");
        let old = store.get(&["old".into()]).await.expect("get");
        assert_eq!(old[0].callback_tries, 0);
        for t in ["cb", "plain"] {
            store
                .insert_claimed(
                    NewRow {
                        token: t,
                        request: "{}",
                    },
                    "s1",
                    10,
                    1000,
                )
                .await
                .expect("insert");
        }
        assert!(store
            .finish("cb", "s1", 3, "{}", 100, true)
            .await
            .expect("finish"));
        assert!(store
            .finish("plain", "s1", 3, "{}", 100, false)
            .await
            .expect("finish"));
        assert!(
            store
                .claim_callback(None, 99, 500)
                .await
                .expect("claim")
                .is_none(),
            "not due yet"
        );
        let c = store
            .claim_callback(None, 100, 500)
            .await
            .expect("claim")
            .expect("due");
        assert_eq!((c.token.as_str(), c.callback_tries), ("cb", 1));
        // Claimed: nobody else gets it until the lease ends (a deliverer that died).
        assert!(store
            .claim_callback(None, 499, 900)
            .await
            .expect("claim")
            .is_none());
        assert!(store
            .claim_callback(Some("plain"), 10_000, 20_000)
            .await
            .expect("claim")
            .is_none());
        let c = store
            .claim_callback(Some("cb"), 500, 900)
            .await
            .expect("claim")
            .expect("lease ended");
        assert_eq!(c.callback_tries, 2);
        // A failed try sets the next one's time; a delivered one is settled for good.
        store
            .settle_callback("cb", Some(950))
            .await
            .expect("settle");
        assert!(store
            .claim_callback(None, 940, 2000)
            .await
            .expect("claim")
            .is_none());
        let c = store
            .claim_callback(None, 950, 2000)
            .await
            .expect("claim")
            .expect("retry");
        assert_eq!(c.callback_tries, 3);
        store.settle_callback("cb", None).await.expect("settle");
        assert!(store
            .claim_callback(None, i64::MAX, i64::MAX)
            .await
            .expect("claim")
            .is_none());
    }

    /// The whole life cycle on SQLite: insert, claim, renew, finish, sweep, retention.
    #[tokio::test]
    async fn sqlite_life_cycle() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.sqlite3");
        let store = Store::open(&cfg(format!("sqlite:{}", path.display())))
            .await
            .expect("open");
        assert_eq!(store.recovered(), Some(&Swept::default()));
        let rows = [
            NewRow {
                token: "a",
                request: "{}",
            },
            NewRow {
                token: "b",
                request: "{}",
            },
        ];
        store.insert(&rows, 10).await.expect("insert");
        assert_eq!(store.queued().await.expect("queued"), 2);
        let a = store.claim("s1", 100).await.expect("claim").expect("row");
        assert_eq!((a.token.as_str(), a.attempts), ("a", 1));
        assert!(store.renew("a", "s1", 200).await.expect("renew"));
        assert!(!store.renew("a", "s2", 200).await.expect("renew other"));
        let b = store.claim("s1", 100).await.expect("claim").expect("row");
        assert_eq!(b.token, "b");
        assert!(store.claim("s1", 100).await.expect("claim").is_none());
        // a finishes; b's server dies: its lease (100) ends.
        assert!(store
            .finish("a", "s1", 3, "{}", 150, false)
            .await
            .expect("finish"));
        assert_eq!(
            store.sweep(150, 2).await.expect("sweep"),
            Swept {
                requeued: 1,
                failed: 0
            }
        );
        let b = store
            .claim("s2", 1000)
            .await
            .expect("claim")
            .expect("b again");
        assert_eq!(b.attempts, 2);
        // The stale owner can no longer finish it.
        assert!(!store
            .finish("b", "s1", 3, "{}", 160, false)
            .await
            .expect("stale"));
        // Second crash: max_attempts reached.
        assert_eq!(
            store.sweep(i64::MAX, 2).await.expect("sweep"),
            Swept {
                requeued: 0,
                failed: 1
            }
        );
        let got = store
            .get(&["b".into(), "a".into(), "zz".into()])
            .await
            .expect("get");
        assert_eq!(got.len(), 2);
        let b = got.iter().find(|r| r.token == "b").expect("b");
        assert_eq!(b.status_id, STATUS_INTERNAL_ERROR);
        assert!(b.result.as_deref().is_some_and(|r| r.contains("stopped")));
        // Released rows go back without counting an attempt.
        store
            .insert(
                &[NewRow {
                    token: "c",
                    request: "{}",
                }],
                10,
            )
            .await
            .expect("insert c");
        let c = store.claim("s1", 100).await.expect("claim").expect("c");
        assert!(store.release(&c.token, "s1").await.expect("release"));
        let c = store.claim("s1", 100).await.expect("claim").expect("c");
        assert_eq!(c.attempts, 1);
        // Retention: a finished at 150, b at the sweep.
        assert_eq!(store.delete_finished_before(151).await.expect("del"), 1);
        assert_eq!(store.get(&["a".into()]).await.expect("get").len(), 0);
        // A second server on the same file (alive: it shares the lock) recovers nothing: the
        // first one's row stays Processing, under its lease.
        let second = Store::open(&cfg(format!("sqlite:{}", path.display())))
            .await
            .expect("a second server");
        assert_eq!(second.recovered(), None);
        assert_eq!(
            second.get(&["c".into()]).await.expect("get")[0].status_id,
            STATUS_PROCESSING
        );
        drop(second);
        drop(store);
        // Reopened alone (a restart after a crash): the row left Processing is queued again.
        let store = Store::open(&cfg(format!("sqlite:{}", path.display())))
            .await
            .expect("reopen");
        assert_eq!(
            store.recovered(),
            Some(&Swept {
                requeued: 1,
                failed: 0
            })
        );
        let got = store.get(&["c".into()]).await.expect("get");
        assert_eq!(got[0].status_id, STATUS_IN_QUEUE);
    }
}
