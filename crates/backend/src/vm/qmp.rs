//! A small QMP client (QEMU's JSON monitor protocol over a Unix socket): the QEMU driver uses it
//! to pause a template VM and migrate it into a snapshot file. QEMU is treated as hostile like
//! any hypervisor: every line is bounded and so is the number of lines read per command.

use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};

/// Longest line QEMU may send.
const MAX_LINE_BYTES: usize = 64 * 1024;
/// Event lines skipped while waiting for one command's answer.
const MAX_EVENTS_PER_COMMAND: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("QMP socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("QMP: {0}")]
    Protocol(String),
    #[error("QMP command {0} failed: {1}")]
    Command(String, String),
}

pub struct Qmp {
    reader: BufReader<tokio::net::unix::OwnedReadHalf>,
    writer: tokio::net::unix::OwnedWriteHalf,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket, up to `within`) and negotiates. The
    /// socket must be one that QEMU (uid `owner`; `None`: unjailed, the server's uid) made:
    /// never a symlink to another socket on the host (`hostile::connect_socket`).
    pub async fn connect(
        path: &Path,
        owner: Option<u32>,
        within: Duration,
    ) -> Result<Self, QmpError> {
        let start = std::time::Instant::now();
        let stream = loop {
            match super::hostile::connect_socket(path, owner).await {
                Ok(s) => break s,
                Err(e) if start.elapsed() < within => {
                    tracing::trace!("QMP not up yet: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(e) => return Err(e.into()),
            }
        };
        let (r, w) = stream.into_split();
        let mut q = Qmp {
            reader: BufReader::new(r),
            writer: w,
        };
        let greeting = q.line().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "unexpected greeting {greeting}"
            )));
        }
        q.execute("qmp_capabilities", json!({})).await?;
        Ok(q)
    }

    async fn line(&mut self) -> Result<Value, QmpError> {
        let mut buf = Vec::new();
        let n = (&mut self.reader)
            .take(MAX_LINE_BYTES as u64 + 1)
            .read_until(b'\n', &mut buf)
            .await?;
        if n == 0 {
            return Err(QmpError::Protocol("QEMU closed the monitor".into()));
        }
        if n > MAX_LINE_BYTES {
            return Err(QmpError::Protocol("line too long".into()));
        }
        serde_json::from_slice(&buf).map_err(|e| QmpError::Protocol(format!("bad JSON: {e}")))
    }

    /// Runs one command; returns its `return` value.
    pub async fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        let mut msg = serde_json::to_vec(&json!({"execute": command, "arguments": arguments}))
            .map_err(|e| QmpError::Protocol(e.to_string()))?;
        msg.push(b'\n');
        self.writer.write_all(&msg).await?;
        for _ in 0..MAX_EVENTS_PER_COMMAND {
            let v = self.line().await?;
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                let desc = e
                    .get("desc")
                    .and_then(Value::as_str)
                    .unwrap_or("no description");
                return Err(QmpError::Command(command.into(), desc.into()));
            }
            // An asynchronous event: skip it.
        }
        Err(QmpError::Protocol(format!(
            "no answer to {command} within {MAX_EVENTS_PER_COMMAND} lines"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake monitor on a Unix socket that greets, accepts `qmp_capabilities`, then runs `then`.
    async fn hostile_monitor<F, Fut>(then: F) -> (tempfile::TempDir, std::path::PathBuf)
    where
        F: FnOnce(tokio::net::UnixStream) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send,
    {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("qmp.sock");
        let l = tokio::net::UnixListener::bind(&path).expect("bind");
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            s.write_all(b"{\"QMP\": {\"version\": {}}}\n")
                .await
                .expect("greet");
            let mut buf = [0u8; 256];
            let _ = s.read(&mut buf).await;
            s.write_all(b"{\"return\": {}}\n").await.expect("caps");
            then(s).await;
        });
        (dir, path)
    }

    #[tokio::test]
    async fn an_endless_line_is_cut_at_the_cap() {
        let (_d, path) = hostile_monitor(|mut s| async move {
            let chunk = vec![b'x'; 8192];
            // About 1 MiB without a newline.
            for _ in 0..128 {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
        })
        .await;
        let mut q = Qmp::connect(&path, None, Duration::from_secs(2))
            .await
            .expect("connect");
        let e = q.execute("stop", json!({})).await.expect_err("refused");
        assert!(e.to_string().contains("line too long"), "{e}");
    }

    #[tokio::test]
    async fn endless_events_end_the_command() {
        let (_d, path) = hostile_monitor(|mut s| async move {
            for _ in 0..10_000 {
                if s.write_all(b"{\"event\": \"SPAM\"}\n").await.is_err() {
                    return;
                }
            }
        })
        .await;
        let mut q = Qmp::connect(&path, None, Duration::from_secs(2))
            .await
            .expect("connect");
        let e = q.execute("stop", json!({})).await.expect_err("refused");
        assert!(e.to_string().contains("no answer to stop"), "{e}");
    }

    #[tokio::test]
    async fn errors_and_garbage_are_reported() {
        let (_d, path) = hostile_monitor(|mut s| async move {
            let _ = s
                .write_all(b"{\"error\": {\"desc\": \"no such thing\"}}\nnot json\n")
                .await;
            // Stay connected until the client is done.
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink).await;
        })
        .await;
        let mut q = Qmp::connect(&path, None, Duration::from_secs(2))
            .await
            .expect("connect");
        let e = q.execute("stop", json!({})).await.expect_err("error");
        assert!(e.to_string().contains("no such thing"), "{e}");
        let e = q.execute("cont", json!({})).await.expect_err("garbage");
        assert!(e.to_string().contains("bad JSON"), "{e}");
    }
}
