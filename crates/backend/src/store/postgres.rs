//! The shared store: PostgreSQL by URL, for several servers on one database. Claims use
//! `FOR UPDATE SKIP LOCKED`, so two servers never take the same submission; a broken connection
//! is reopened on the next call.

use tokio::sync::Mutex;
use tokio_postgres::{Client, NoTls};

use super::{
    abandoned_message, NewRow, Row, StoreError, Swept, COLUMNS, STATUS_INTERNAL_ERROR,
    STATUS_IN_QUEUE, STATUS_PROCESSING,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS judge0_submissions (
    id          BIGSERIAL PRIMARY KEY,
    token       TEXT    NOT NULL UNIQUE,
    status_id   INTEGER NOT NULL,
    request     TEXT    NOT NULL,
    result      TEXT,
    created_at  BIGINT  NOT NULL,
    finished_at BIGINT,
    owner       TEXT,
    lease_until BIGINT,
    attempts    INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS judge0_submissions_status ON judge0_submissions (status_id, id);
CREATE INDEX IF NOT EXISTS judge0_submissions_finished ON judge0_submissions (finished_at);
ALTER TABLE judge0_submissions ADD COLUMN IF NOT EXISTS callback_due BIGINT;
ALTER TABLE judge0_submissions ADD COLUMN IF NOT EXISTS callback_tries INTEGER NOT NULL DEFAULT 0;
CREATE INDEX IF NOT EXISTS judge0_submissions_callback
    ON judge0_submissions (callback_due) WHERE callback_due IS NOT NULL;
";

pub struct PgStore {
    url: String,
    client: Mutex<Option<Client>>,
}

fn row(r: &tokio_postgres::Row) -> Row {
    Row {
        token: r.get(0),
        status_id: r.get(1),
        request: r.get(2),
        result: r.get(3),
        created_at: r.get(4),
        finished_at: r.get(5),
        attempts: r.get(6),
        callback_tries: r.get(7),
    }
}

async fn open(url: &str) -> Result<Client, StoreError> {
    let (client, conn) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::warn!("postgresql connection closed: {e}");
        }
    });
    Ok(client)
}

impl PgStore {
    pub async fn connect(url: &str) -> Result<PgStore, StoreError> {
        let client = open(url).await?;
        // Several servers may start at once: serialise the schema creation with a lock held
        // until the creating transaction commits.
        client
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(71113); {SCHEMA} COMMIT;"
            ))
            .await?;
        Ok(PgStore {
            url: url.to_string(),
            client: Mutex::new(Some(client)),
        })
    }

    /// Host, port and database of the URL, without user or password.
    pub fn describe(&self) -> String {
        match self.url.parse::<tokio_postgres::Config>() {
            Ok(c) => {
                let hosts: Vec<String> = c
                    .get_hosts()
                    .iter()
                    .map(|h| match h {
                        tokio_postgres::config::Host::Tcp(h) => h.clone(),
                        tokio_postgres::config::Host::Unix(p) => p.display().to_string(),
                    })
                    .collect();
                format!(
                    "{} port {:?} database {}",
                    hosts.join(","),
                    c.get_ports(),
                    c.get_dbname().unwrap_or("(default)")
                )
            }
            Err(_) => "(unparsable URL)".into(),
        }
    }

    /// The connection, reopened when the previous one broke.
    async fn client(&self) -> Result<tokio::sync::MutexGuard<'_, Option<Client>>, StoreError> {
        let mut g = self.client.lock().await;
        if g.as_ref().is_none_or(Client::is_closed) {
            *g = Some(open(&self.url).await?);
        }
        Ok(g)
    }

    pub async fn insert(&self, rows: &[NewRow<'_>], now: i64) -> Result<(), StoreError> {
        let mut g = self.client().await?;
        let c = g
            .as_mut()
            .ok_or_else(|| StoreError("no connection".into()))?;
        let tx = c.transaction().await?;
        let st = tx
            .prepare("INSERT INTO judge0_submissions (token, status_id, request, created_at) VALUES ($1, $2, $3, $4)")
            .await?;
        for r in rows {
            tx.execute(&st, &[&r.token, &STATUS_IN_QUEUE, &r.request, &now])
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    pub async fn insert_claimed(
        &self,
        r: NewRow<'_>,
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<(), StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        c.execute(
            "INSERT INTO judge0_submissions (token, status_id, request, created_at, owner, lease_until, attempts) VALUES ($1, $2, $3, $4, $5, $6, 1)",
            &[&r.token, &STATUS_PROCESSING, &r.request, &now, &owner, &lease_until],
        )
        .await?;
        Ok(())
    }

    pub async fn queued(&self) -> Result<u64, StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        let n: i64 = c
            .query_one(
                "SELECT COUNT(*) FROM judge0_submissions WHERE status_id = $1",
                &[&STATUS_IN_QUEUE],
            )
            .await?
            .get(0);
        Ok(u64::try_from(n).unwrap_or(0))
    }

    pub async fn get(&self, tokens: &[String]) -> Result<Vec<Row>, StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        let rows = c
            .query(
                &format!("SELECT {COLUMNS} FROM judge0_submissions WHERE token = ANY($1)"),
                &[&tokens],
            )
            .await?;
        Ok(rows.iter().map(row).collect())
    }

    pub async fn claim(&self, owner: &str, lease_until: i64) -> Result<Option<Row>, StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        let r = c
            .query_opt(
                &format!(
                    "UPDATE judge0_submissions SET status_id = $1, owner = $2, lease_until = $3, attempts = attempts + 1
                     WHERE id = (SELECT id FROM judge0_submissions WHERE status_id = $4 ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING {COLUMNS}"
                ),
                &[&STATUS_PROCESSING, &owner, &lease_until, &STATUS_IN_QUEUE],
            )
            .await?;
        Ok(r.as_ref().map(row))
    }

    pub async fn renew(
        &self,
        token: &str,
        owner: &str,
        lease_until: i64,
    ) -> Result<bool, StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        let n = c
            .execute(
                "UPDATE judge0_submissions SET lease_until = $1 WHERE token = $2 AND owner = $3 AND status_id = $4",
                &[&lease_until, &token, &owner, &STATUS_PROCESSING],
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn finish(
        &self,
        token: &str,
        owner: &str,
        status_id: i32,
        result: &str,
        now: i64,
        callback_due: Option<i64>,
    ) -> Result<bool, StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        let n = c
            .execute(
                "UPDATE judge0_submissions SET status_id = $1, result = $2, finished_at = $3, owner = NULL, lease_until = NULL, callback_due = $7
                 WHERE token = $4 AND owner = $5 AND status_id = $6",
                &[&status_id, &result, &now, &token, &owner, &STATUS_PROCESSING, &callback_due],
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn claim_callback(
        &self,
        token: Option<&str>,
        now: i64,
        until: i64,
    ) -> Result<Option<Row>, StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        let r = c
            .query_opt(
                &format!(
                    "UPDATE judge0_submissions SET callback_due = $1, callback_tries = callback_tries + 1
                     WHERE id = (SELECT id FROM judge0_submissions
                                 WHERE callback_due IS NOT NULL AND callback_due <= $2 AND ($3::TEXT IS NULL OR token = $3)
                                 ORDER BY callback_due LIMIT 1 FOR UPDATE SKIP LOCKED)
                     RETURNING {COLUMNS}"
                ),
                &[&until, &now, &token],
            )
            .await?;
        Ok(r.as_ref().map(row))
    }

    pub async fn settle_callback(&self, token: &str, next: Option<i64>) -> Result<(), StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        c.execute(
            "UPDATE judge0_submissions SET callback_due = $1 WHERE token = $2",
            &[&next, &token],
        )
        .await?;
        Ok(())
    }

    pub async fn release(&self, token: &str, owner: &str) -> Result<bool, StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        let n = c
            .execute(
                "UPDATE judge0_submissions SET status_id = $1, owner = NULL, lease_until = NULL, attempts = GREATEST(attempts - 1, 0)
                 WHERE token = $2 AND owner = $3 AND status_id = $4",
                &[&STATUS_IN_QUEUE, &token, &owner, &STATUS_PROCESSING],
            )
            .await?;
        Ok(n == 1)
    }

    pub async fn sweep(&self, now: i64, max_attempts: i32) -> Result<Swept, StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        // Each update re-checks the lease, so two servers sweeping at once act once per row.
        let requeued = c
            .execute(
                "UPDATE judge0_submissions SET status_id = $1, owner = NULL, lease_until = NULL
                 WHERE status_id = $2 AND lease_until < $3 AND attempts < $4",
                &[&STATUS_IN_QUEUE, &STATUS_PROCESSING, &now, &max_attempts],
            )
            .await?;
        let stale = c
            .query(
                "SELECT token, attempts FROM judge0_submissions WHERE status_id = $1 AND lease_until < $2",
                &[&STATUS_PROCESSING, &now],
            )
            .await?;
        let mut failed = 0;
        for r in stale {
            let token: String = r.get(0);
            let attempts: i32 = r.get(1);
            let result = serde_json::json!({ "message": abandoned_message(attempts) }).to_string();
            failed += c
                .execute(
                    "UPDATE judge0_submissions SET status_id = $1, result = $2, finished_at = $3, owner = NULL, lease_until = NULL
                     WHERE token = $4 AND status_id = $5 AND lease_until < $6",
                    &[&STATUS_INTERNAL_ERROR, &result, &super::now_ms(), &token, &STATUS_PROCESSING, &now],
                )
                .await?;
        }
        Ok(Swept { requeued, failed })
    }

    pub async fn delete_before(&self, before: i64) -> Result<u64, StoreError> {
        let g = self.client().await?;
        let c = g
            .as_ref()
            .ok_or_else(|| StoreError("no connection".into()))?;
        let n = c
            .execute(
                "DELETE FROM judge0_submissions WHERE finished_at IS NOT NULL AND finished_at < $1",
                &[&before],
            )
            .await?;
        Ok(n)
    }
}
