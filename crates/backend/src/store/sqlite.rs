//! The embedded store: one SQLite file (WAL, `synchronous = FULL`: a commit is on disk before
//! the client hears its token). Several servers on one host may share it (SQLite serialises
//! writers; a claim is one `UPDATE … RETURNING`). Each holds a shared `flock` on `<file>.lock`
//! for as long as it runs; a server that gets the lock exclusively at start-up knows that no
//! other is alive, so whatever is still Processing was left by a dead one and is requeued at
//! once (otherwise leases decide, as with PostgreSQL).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use nix::fcntl::{Flock, FlockArg};
use rusqlite::{params, Connection, OptionalExtension};

use super::{
    abandoned_message, Row, StoreError, Swept, COLUMNS, STATUS_INTERNAL_ERROR, STATUS_IN_QUEUE,
    STATUS_PROCESSING,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS judge0_submissions (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    token       TEXT    NOT NULL UNIQUE,
    status_id   INTEGER NOT NULL,
    request     TEXT    NOT NULL,
    result      TEXT,
    created_at  INTEGER NOT NULL,
    finished_at INTEGER,
    owner       TEXT,
    lease_until INTEGER,
    attempts    INTEGER NOT NULL DEFAULT 0,
    callback_due   INTEGER,
    callback_tries INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS judge0_submissions_status ON judge0_submissions (status_id, id);
CREATE INDEX IF NOT EXISTS judge0_submissions_finished ON judge0_submissions (finished_at);
";

/// What a file made before durable callbacks lacks (SQLite has no `ADD COLUMN IF NOT EXISTS`).
const CALLBACK_COLUMNS: &str = "
ALTER TABLE judge0_submissions ADD COLUMN callback_due INTEGER;
ALTER TABLE judge0_submissions ADD COLUMN callback_tries INTEGER NOT NULL DEFAULT 0;
";

const CALLBACK_INDEX: &str = "CREATE INDEX IF NOT EXISTS judge0_submissions_callback
    ON judge0_submissions (callback_due) WHERE callback_due IS NOT NULL;";

pub struct SqliteStore {
    pub path: PathBuf,
    conn: Arc<Mutex<Connection>>,
    /// What the start-up recovery did, when this server was alone on the file.
    pub recovered: Option<Swept>,
    /// Held (shared) for as long as the store is open.
    _lock: Flock<std::fs::File>,
}

impl SqliteStore {
    pub fn open(path: &Path, max_attempts: i32) -> Result<SqliteStore, StoreError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| StoreError(format!("cannot create {}: {e}", dir.display())))?;
        }
        let lock_path = PathBuf::from(format!("{}.lock", path.display()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| StoreError(format!("cannot open {}: {e}", lock_path.display())))?;
        let locked =
            |e: nix::errno::Errno| StoreError(format!("cannot lock {}: {e}", lock_path.display()));
        let (lock, alone) = match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(l) => (l, true),
            Err((file, nix::errno::Errno::EWOULDBLOCK)) => (
                // Another server is alive (or recovering: wait for it).
                Flock::lock(file, FlockArg::LockShared).map_err(|(_, e)| locked(e))?,
                false,
            ),
            Err((_, e)) => return Err(locked(e)),
        };
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        {
            // One writer at a time: two servers upgrading one file do not both add the columns.
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            tx.execute_batch(SCHEMA)?;
            let has_callbacks: i64 = tx.query_row(
                "SELECT COUNT(*) FROM pragma_table_info('judge0_submissions') WHERE name = 'callback_due'",
                [],
                |r| r.get(0),
            )?;
            if has_callbacks == 0 {
                tx.execute_batch(CALLBACK_COLUMNS)?;
            }
            tx.execute_batch(CALLBACK_INDEX)?;
            tx.commit()?;
        }
        let recovered = if alone {
            let swept = sweep(&mut conn, i64::MAX, max_attempts)?;
            lock.relock(FlockArg::LockShared).map_err(locked)?;
            Some(swept)
        } else {
            None
        };
        Ok(SqliteStore {
            path: path.to_path_buf(),
            conn: Arc::new(Mutex::new(conn)),
            recovered,
            _lock: lock,
        })
    }

    /// Runs `f` on the connection off the async workers.
    pub async fn call<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = self.conn.clone();
        tokio::task::spawn_blocking(move || {
            let mut c = conn
                .lock()
                .map_err(|_| StoreError("the store's connection lock is poisoned".into()))?;
            f(&mut c)
        })
        .await
        .map_err(|e| StoreError(e.to_string()))?
    }
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Row> {
    Ok(Row {
        token: r.get(0)?,
        status_id: r.get(1)?,
        request: r.get(2)?,
        result: r.get(3)?,
        created_at: r.get(4)?,
        finished_at: r.get(5)?,
        attempts: r.get(6)?,
        callback_tries: r.get(7)?,
    })
}

pub fn insert(c: &mut Connection, rows: &[(String, String)], now: i64) -> Result<(), StoreError> {
    let tx = c.transaction()?;
    {
        let mut st = tx.prepare_cached(
            "INSERT INTO judge0_submissions (token, status_id, request, created_at) VALUES (?1, ?2, ?3, ?4)",
        )?;
        for (token, request) in rows {
            st.execute(params![token, STATUS_IN_QUEUE, request, now])?;
        }
    }
    tx.commit()?;
    Ok(())
}

pub fn insert_claimed(
    c: &mut Connection,
    token: &str,
    request: &str,
    owner: &str,
    now: i64,
    lease_until: i64,
) -> Result<(), StoreError> {
    c.execute(
        "INSERT INTO judge0_submissions (token, status_id, request, created_at, owner, lease_until, attempts) VALUES (?1, ?2, ?3, ?4, ?5, ?6, 1)",
        params![token, STATUS_PROCESSING, request, now, owner, lease_until],
    )?;
    Ok(())
}

pub fn queued(c: &mut Connection) -> Result<u64, StoreError> {
    let n: i64 = c.query_row(
        "SELECT COUNT(*) FROM judge0_submissions WHERE status_id = ?1",
        [STATUS_IN_QUEUE],
        |r| r.get(0),
    )?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub fn get(c: &mut Connection, tokens: &[String]) -> Result<Vec<Row>, StoreError> {
    let mut st = c.prepare_cached(&format!(
        "SELECT {COLUMNS} FROM judge0_submissions WHERE token = ?1"
    ))?;
    let mut out = Vec::with_capacity(tokens.len());
    for t in tokens {
        if let Some(r) = st.query_row([t], row).optional()? {
            out.push(r);
        }
    }
    Ok(out)
}

pub fn claim(c: &mut Connection, owner: &str, lease_until: i64) -> Result<Option<Row>, StoreError> {
    let r = c
        .query_row(
            &format!(
                "UPDATE judge0_submissions SET status_id = ?1, owner = ?2, lease_until = ?3, attempts = attempts + 1
                 WHERE id = (SELECT id FROM judge0_submissions WHERE status_id = ?4 ORDER BY id LIMIT 1)
                 RETURNING {COLUMNS}"
            ),
            params![STATUS_PROCESSING, owner, lease_until, STATUS_IN_QUEUE],
            row,
        )
        .optional()?;
    Ok(r)
}

pub fn renew(
    c: &mut Connection,
    token: &str,
    owner: &str,
    lease_until: i64,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE judge0_submissions SET lease_until = ?1 WHERE token = ?2 AND owner = ?3 AND status_id = ?4",
        params![lease_until, token, owner, STATUS_PROCESSING],
    )?;
    Ok(n == 1)
}

pub fn finish(
    c: &mut Connection,
    token: &str,
    owner: &str,
    status_id: i32,
    result: &str,
    now: i64,
    callback_due: Option<i64>,
) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE judge0_submissions SET status_id = ?1, result = ?2, finished_at = ?3, owner = NULL, lease_until = NULL, callback_due = ?7
         WHERE token = ?4 AND owner = ?5 AND status_id = ?6",
        params![status_id, result, now, token, owner, STATUS_PROCESSING, callback_due],
    )?;
    Ok(n == 1)
}

pub fn claim_callback(
    c: &mut Connection,
    token: Option<&str>,
    now: i64,
    until: i64,
) -> Result<Option<Row>, StoreError> {
    let r = c
        .query_row(
            &format!(
                "UPDATE judge0_submissions SET callback_due = ?1, callback_tries = callback_tries + 1
                 WHERE id = (SELECT id FROM judge0_submissions
                             WHERE callback_due IS NOT NULL AND callback_due <= ?2 AND (?3 IS NULL OR token = ?3)
                             ORDER BY callback_due LIMIT 1)
                 RETURNING {COLUMNS}"
            ),
            params![until, now, token],
            row,
        )
        .optional()?;
    Ok(r)
}

pub fn settle_callback(
    c: &mut Connection,
    token: &str,
    next: Option<i64>,
) -> Result<(), StoreError> {
    c.execute(
        "UPDATE judge0_submissions SET callback_due = ?1 WHERE token = ?2",
        params![next, token],
    )?;
    Ok(())
}

pub fn release(c: &mut Connection, token: &str, owner: &str) -> Result<bool, StoreError> {
    let n = c.execute(
        "UPDATE judge0_submissions SET status_id = ?1, owner = NULL, lease_until = NULL, attempts = MAX(attempts - 1, 0)
         WHERE token = ?2 AND owner = ?3 AND status_id = ?4",
        params![STATUS_IN_QUEUE, token, owner, STATUS_PROCESSING],
    )?;
    Ok(n == 1)
}

pub fn sweep(c: &mut Connection, now: i64, max_attempts: i32) -> Result<Swept, StoreError> {
    let tx = c.transaction()?;
    let stale: Vec<(String, i32)> = {
        let mut st = tx.prepare_cached(
            "SELECT token, attempts FROM judge0_submissions WHERE status_id = ?1 AND lease_until < ?2",
        )?;
        let rows = st.query_map(params![STATUS_PROCESSING, now], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
        rows.collect::<Result<_, _>>()?
    };
    let mut swept = Swept::default();
    for (token, attempts) in stale {
        if attempts >= max_attempts {
            let result = serde_json::json!({ "message": abandoned_message(attempts) }).to_string();
            tx.execute(
                "UPDATE judge0_submissions SET status_id = ?1, result = ?2, finished_at = ?3, owner = NULL, lease_until = NULL WHERE token = ?4",
                params![STATUS_INTERNAL_ERROR, result, super::now_ms(), token],
            )?;
            swept.failed += 1;
        } else {
            tx.execute(
                "UPDATE judge0_submissions SET status_id = ?1, owner = NULL, lease_until = NULL WHERE token = ?2",
                params![STATUS_IN_QUEUE, token],
            )?;
            swept.requeued += 1;
        }
    }
    tx.commit()?;
    Ok(swept)
}

pub fn delete_before(c: &mut Connection, before: i64) -> Result<u64, StoreError> {
    let n = c.execute(
        "DELETE FROM judge0_submissions WHERE finished_at IS NOT NULL AND finished_at < ?1",
        [before],
    )?;
    Ok(n as u64)
}
