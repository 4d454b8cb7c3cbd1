//! Noticing that an HTTP client went away while its request runs (hyper does not poll the
//! socket while a handler is busy), so that its VM is killed at once.
//!
//! Each accepted connection gets a watcher holding a duplicate of the socket: when the peer
//! closes (EOF or error), the connection's [`ConnWatch`] fires. The watcher ends when the peer
//! closes or when the connection (and every request of it) is gone.

use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

/// How often the watcher checks whether its connection still exists.
const LIVENESS_POLL: Duration = Duration::from_millis(500);
/// Back-off while the client has sent bytes that hyper has not read yet (a pipelined request).
const PENDING_DATA_BACKOFF: Duration = Duration::from_millis(200);

struct Shared {
    closed: watch::Receiver<bool>,
}

/// Per-connection "the client went away" signal, put in every request's extensions.
#[derive(Clone)]
pub struct ConnWatch {
    shared: Option<Arc<Shared>>,
}

impl ConnWatch {
    /// A watch that never fires (requests that did not come through [`crate::serve`]).
    pub fn none() -> Self {
        ConnWatch { shared: None }
    }
}

impl ConnWatch {
    /// Resolves when the client has closed its connection; never, if unknown.
    pub async fn closed(&self) {
        let Some(s) = &self.shared else {
            return std::future::pending().await;
        };
        let mut rx = s.closed.clone();
        if rx.wait_for(|c| *c).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Starts watching an accepted connection.
    pub fn watch(io: &TcpStream) -> Self {
        let Some(dup) = duplicate(io) else {
            tracing::warn!("cannot watch a connection for disconnects");
            return ConnWatch { shared: None };
        };
        let (tx, rx) = watch::channel(false);
        let shared = Arc::new(Shared { closed: rx });
        let weak = Arc::downgrade(&shared);
        tokio::spawn(watcher(dup, tx, weak));
        ConnWatch {
            shared: Some(shared),
        }
    }
}

fn duplicate(io: &TcpStream) -> Option<TcpStream> {
    use std::os::fd::AsFd;
    let fd = io.as_fd().try_clone_to_owned().ok()?;
    let std = std::net::TcpStream::from(fd);
    std.set_nonblocking(true).ok()?;
    TcpStream::from_std(std).ok()
}

async fn watcher(dup: TcpStream, tx: watch::Sender<bool>, conn: Weak<Shared>) {
    let mut buf = [0u8; 1];
    loop {
        if conn.strong_count() == 0 {
            return;
        }
        match tokio::time::timeout(LIVENESS_POLL, dup.readable()).await {
            Err(_) => continue,
            Ok(Err(_)) => break,
            Ok(Ok(())) => match dup.try_peek_compat(&mut buf) {
                Ok(0) => break,
                Ok(_) => tokio::time::sleep(PENDING_DATA_BACKOFF).await,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(_) => break,
            },
        }
    }
    tracing::debug!("client connection closed");
    let _ = tx.send(true);
}

/// `peek` without blocking on the duplicate socket.
trait TryPeek {
    fn try_peek_compat(&self, buf: &mut [u8]) -> std::io::Result<usize>;
}

impl TryPeek for TcpStream {
    fn try_peek_compat(&self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.try_io(tokio::io::Interest::READABLE, || {
            let r = nix::sys::socket::recv(
                std::os::fd::AsRawFd::as_raw_fd(self),
                buf,
                nix::sys::socket::MsgFlags::MSG_PEEK | nix::sys::socket::MsgFlags::MSG_DONTWAIT,
            );
            r.map_err(std::io::Error::from)
        })
    }
}
