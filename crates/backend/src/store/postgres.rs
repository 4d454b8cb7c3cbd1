//! The shared store: PostgreSQL by URL, for several servers on one database. Claims use
//! `FOR UPDATE SKIP LOCKED`, so two servers never take the same submission. Each server keeps a
//! pool of `[store] pool_size` connections (deadpool; a broken one is replaced on the next
//! call). TLS as the URL's `sslmode` asks (`prefer` by default, `require`, `disable`), the
//! server's certificate checked against `[store] ca_file` or the system's CA bundle.

use std::path::Path;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Object, Pool, RecyclingMethod, Runtime};

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

/// Longest wait for a free pooled connection, or for a new one to be opened.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// The system's CA bundle (Debian's ca-certificates), used when `[store] ca_file` is empty.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

pub struct PgStore {
    url: String,
    pool: Pool,
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

/// The TLS set-up: the server's certificate must chain to a CA of `ca_file` (PEM), or of the
/// system bundle when none is given.
fn tls(ca_file: Option<&Path>) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    let (path, required) = match ca_file {
        Some(p) => (p, true),
        None => (Path::new(SYSTEM_CA_BUNDLE), false),
    };
    match rustls_pki_types::CertificateDer::pem_file_iter(path) {
        Ok(certs) => {
            for c in certs {
                let c = c.map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
                roots
                    .add(c)
                    .map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
            }
        }
        Err(e) if required => return Err(StoreError(format!("{}: {e}", path.display()))),
        Err(_) => {}
    }
    if required && roots.is_empty() {
        return Err(StoreError(format!(
            "{}: no certificate in the file",
            path.display()
        )));
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

impl PgStore {
    pub async fn connect(
        url: &str,
        pool_size: usize,
        ca_file: Option<&Path>,
    ) -> Result<PgStore, StoreError> {
        let pg: tokio_postgres::Config = url
            .parse()
            .map_err(|e| StoreError(format!("store.url: {e}")))?;
        let manager = Manager::from_config(
            pg,
            tls(ca_file)?,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(pool_size)
            .wait_timeout(Some(POOL_WAIT))
            .create_timeout(Some(POOL_WAIT))
            .runtime(Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError(e.to_string()))?;
        let store = PgStore {
            url: url.to_string(),
            pool,
        };
        // Several servers may start at once: serialise the schema creation with a lock held
        // until the creating transaction commits.
        store
            .client()
            .await?
            .batch_execute(&format!(
                "BEGIN; SELECT pg_advisory_xact_lock(71113); {SCHEMA} COMMIT;"
            ))
            .await?;
        Ok(store)
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

    /// A pooled connection (a new one when the pool has none free and room for more).
    async fn client(&self) -> Result<Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError(format!("postgresql: {}", super::causes(&e))))
    }

    pub async fn insert(&self, rows: &[NewRow<'_>], now: i64) -> Result<(), StoreError> {
        let mut c = self.client().await?;
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
        let c = self.client().await?;
        c.execute(
            "INSERT INTO judge0_submissions (token, status_id, request, created_at, owner, lease_until, attempts) VALUES ($1, $2, $3, $4, $5, $6, 1)",
            &[&r.token, &STATUS_PROCESSING, &r.request, &now, &owner, &lease_until],
        )
        .await?;
        Ok(())
    }

    pub async fn queued(&self) -> Result<u64, StoreError> {
        let c = self.client().await?;
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
        let c = self.client().await?;
        let rows = c
            .query(
                &format!("SELECT {COLUMNS} FROM judge0_submissions WHERE token = ANY($1)"),
                &[&tokens],
            )
            .await?;
        Ok(rows.iter().map(row).collect())
    }

    pub async fn claim(&self, owner: &str, lease_until: i64) -> Result<Option<Row>, StoreError> {
        let c = self.client().await?;
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
        let c = self.client().await?;
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
        let c = self.client().await?;
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
        let c = self.client().await?;
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
        let c = self.client().await?;
        c.execute(
            "UPDATE judge0_submissions SET callback_due = $1 WHERE token = $2",
            &[&next, &token],
        )
        .await?;
        Ok(())
    }

    pub async fn release(&self, token: &str, owner: &str) -> Result<bool, StoreError> {
        let c = self.client().await?;
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
        let c = self.client().await?;
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
        let c = self.client().await?;
        let n = c
            .execute(
                "DELETE FROM judge0_submissions WHERE finished_at IS NOT NULL AND finished_at < $1",
                &[&before],
            )
            .await?;
        Ok(n)
    }
}
