//! Output capture: reads a stage's stdout and stderr pipes, keeps at most the stage's cap
//! (shared by both streams), forwards the kept bytes to an optional stream sink and reports
//! when the cap is exceeded. Bytes beyond the cap are read and dropped, so the agent's memory
//! stays bounded whatever the program prints.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use cloude_protocol::{Stage, StreamEvent, StreamKind};
use tokio::io::AsyncReadExt as _;
use tokio::sync::{mpsc, watch, Notify};

/// Size of one read from a pipe (also the largest streamed chunk).
pub const READ_CHUNK: usize = 64 * 1024;

/// The cap shared by a stage's stdout and stderr.
#[derive(Debug)]
pub struct OutputCap {
    limit: u64,
    used: AtomicU64,
    exceeded: AtomicBool,
    notify: Notify,
}

impl OutputCap {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(OutputCap {
            limit,
            used: AtomicU64::new(0),
            exceeded: AtomicBool::new(false),
            notify: Notify::new(),
        })
    }

    /// Reserves up to `n` bytes; returns how many may be kept.
    fn take(&self, n: usize) -> usize {
        let n = n as u64;
        let mut granted = 0;
        let _ = self
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                granted = n.min(self.limit.saturating_sub(used));
                Some(used + granted)
            });
        if granted < n {
            self.exceeded.store(true, Ordering::Release);
            self.notify.notify_waiters();
            self.notify.notify_one();
        }
        usize::try_from(granted).expect("granted <= n, a usize")
    }

    pub fn is_exceeded(&self) -> bool {
        self.exceeded.load(Ordering::Acquire)
    }

    /// Resolves once the cap has been exceeded.
    pub async fn exceeded(&self) {
        loop {
            let notified = self.notify.notified();
            if self.is_exceeded() {
                return;
            }
            notified.await;
        }
    }
}

/// Where kept output chunks go besides the final result (the streaming form).
#[derive(Clone, Debug)]
pub struct Sink {
    pub stage: Stage,
    pub tx: mpsc::Sender<StreamEvent>,
}

/// Reads `reader` to its end; returns the kept bytes.
pub async fn pump<R>(
    mut reader: R,
    kind: StreamKind,
    cap: Arc<OutputCap>,
    mut sink: Option<Sink>,
    mut stop: Option<watch::Receiver<bool>>,
) -> Vec<u8>
where
    R: tokio::io::AsyncRead + Unpin,
{
    let mut kept = Vec::new();
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        let read = tokio::select! {
            r = reader.read(&mut buf) => r,
            () = stopped(&mut stop) => break,
        };
        let n = match read {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::warn!("reading {kind:?} failed: {e}");
                break;
            }
        };
        let keep = cap.take(n);
        if keep == 0 {
            continue;
        }
        kept.extend_from_slice(&buf[..keep]);
        if let Some(s) = &sink {
            let ev = StreamEvent::Output {
                stage: s.stage,
                stream: kind,
                data: buf[..keep].to_vec().into(),
            };
            if s.tx.send(ev).await.is_err() {
                // The client went away; keep collecting for the final result only.
                sink = None;
            }
        }
    }
    kept
}

/// Resolves when `stop` turns true; never when there is no stop signal.
async fn stopped(stop: &mut Option<watch::Receiver<bool>>) {
    if let Some(rx) = stop {
        if rx.wait_for(|s| *s).await.is_ok() {
            return;
        }
    }
    std::future::pending().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn cap_is_shared_and_bounded() {
        let cap = OutputCap::new(10);
        let a = pump(&b"0123456"[..], StreamKind::Stdout, cap.clone(), None, None).await;
        assert!(!cap.is_exceeded());
        let b = pump(
            &b"abcdefgh"[..],
            StreamKind::Stderr,
            cap.clone(),
            None,
            None,
        )
        .await;
        assert_eq!(a, b"0123456");
        assert_eq!(b, b"abc");
        assert!(cap.is_exceeded());
        tokio::time::timeout(std::time::Duration::from_secs(1), cap.exceeded())
            .await
            .expect("exceeded resolves");
    }

    #[tokio::test]
    async fn chunks_are_streamed() {
        let cap = OutputCap::new(100);
        let (tx, mut rx) = mpsc::channel(4);
        let sink = Sink {
            stage: Stage::Run,
            tx,
        };
        let kept = pump(&b"hello"[..], StreamKind::Stdout, cap, Some(sink), None).await;
        assert_eq!(kept, b"hello");
        match rx.recv().await {
            Some(StreamEvent::Output { data, stream, .. }) => {
                assert_eq!(data.0, b"hello");
                assert_eq!(stream, StreamKind::Stdout);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
}
