//! Serving the router over each transport, and the power-off once a connection that asked for
//! it has been answered and closed.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use axum::Extension;
use cloude_protocol::ready_line;
use hyper_util::rt::TokioIo;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

use crate::power;
use crate::server::{router, AgentState, ConnCtx};
use crate::transport::serial;
use crate::transport::vsock::{VsockListener, VMADDR_CID_HOST};

/// Pause after a failed `accept` (e.g. out of descriptors) before trying again.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// Pause before reopening the serial port after its connection ended.
const SERIAL_REOPEN: Duration = Duration::from_millis(50);

/// Serves HTTP/1.1 (keep-alive) on one byte stream until it closes; then powers off if a run
/// on it asked for that.
pub async fn serve_connection<IO>(io: IO, state: Arc<AgentState>)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let ctx = ConnCtx::default();
    let app = router(state.clone()).layer(Extension(ctx.clone()));
    let conn = hyper::server::conn::http1::Builder::new()
        .keep_alive(true)
        .serve_connection(TokioIo::new(io), TowerToHyperService::new(app))
        // Interactive runs take the connection over (`GET /v1/run/interactive`).
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!("connection ended: {e}");
    }
    // An interactive run owns the stream now: the serial port is reopened only after it.
    let session = ctx.session.lock().ok().and_then(|mut s| s.take());
    if let Some(done) = session {
        let _ = done.await;
    }
    if ctx.poweroff.load(Ordering::SeqCst) {
        power::power_off(state.poweroff_enabled).await;
    }
}

/// Who may connect to the agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Peers {
    /// Anyone (host mode: tests talk over loopback).
    Any,
    /// Only the host: in the guest, the program itself must not reach the agent (loopback,
    /// the guest's own IP, or the vsock loopback transport). Over TCP, when the VM has a default
    /// gateway (the host's end of its tap), only that address: another VM routed through the
    /// host must not reach this agent either.
    HostOnly,
}

/// How long a TCP peer has to send its `AUTH` line.
const AUTH_TIMEOUT: Duration = Duration::from_secs(2);

/// Reads the first line of a TCP connection (byte by byte: nothing after it is consumed), at
/// most [`cloude_protocol::AGENT_AUTH_LINE_MAX`] bytes, and checks it carries `token`.
async fn authenticated<R: AsyncRead + Unpin>(r: &mut R, token: &str) -> bool {
    use tokio::io::AsyncReadExt as _;
    let mut line = Vec::new();
    let read = async {
        loop {
            let b = r.read_u8().await.ok()?;
            if b == b'\n' {
                return Some(());
            }
            if line.len() >= cloude_protocol::AGENT_AUTH_LINE_MAX {
                return None;
            }
            line.push(b);
        }
    };
    matches!(tokio::time::timeout(AUTH_TIMEOUT, read).await, Ok(Some(())))
        && cloude_protocol::agent_auth_ok(&String::from_utf8_lossy(&line), token)
}

/// Accepts TCP connections forever. With `peers` = [`Peers::HostOnly`] a connection is served
/// only if it comes from the host (the gateway) *and* its first line is `AUTH <token>` with the
/// VM's secret from the kernel command line; without a token every connection is refused.
pub fn spawn_tcp(
    listener: TcpListener,
    state: Arc<AgentState>,
    peers: Peers,
    token: Option<String>,
) -> JoinHandle<()> {
    if peers == Peers::HostOnly && token.is_none() {
        tracing::error!(
            "no {} on the kernel command line: every TCP connection will be refused",
            cloude_protocol::AGENT_TOKEN_PARAM
        );
    }
    let token: Option<Arc<str>> = token.map(Arc::from);
    let gateway = std::fs::read_to_string("/proc/net/route")
        .ok()
        .and_then(|t| crate::transport::tcp::default_gateway(&t));
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, peer)) => {
                    let local = stream.local_addr().map(|a| a.ip()).ok();
                    let from_guest = peer.ip().is_loopback() || Some(peer.ip()) == local;
                    let not_host = match gateway {
                        Some(g) => peer.ip() != std::net::IpAddr::V4(g),
                        None => from_guest,
                    };
                    if peers == Peers::HostOnly && not_host {
                        tracing::warn!("refused a TCP connection from {peer}: not the host");
                        continue;
                    }
                    let _ = stream.set_nodelay(true);
                    if peers == Peers::Any {
                        tokio::spawn(serve_connection(stream, state.clone()));
                        continue;
                    }
                    let (state, token) = (state.clone(), token.clone());
                    tokio::spawn(async move {
                        let mut stream = stream;
                        match token {
                            Some(t) if authenticated(&mut stream, &t).await => {
                                serve_connection(stream, state).await;
                            }
                            _ => tracing::warn!(
                                "refused a TCP connection from {peer}: no valid AUTH line"
                            ),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("tcp accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    })
}

/// Accepts vsock connections forever.
pub fn spawn_vsock(
    listener: VsockListener,
    state: Arc<AgentState>,
    peers: Peers,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, cid)) => {
                    if peers == Peers::HostOnly && cid != VMADDR_CID_HOST {
                        tracing::warn!("refused a vsock connection from CID {cid}");
                        continue;
                    }
                    tokio::spawn(serve_connection(stream, state.clone()));
                }
                Err(e) => {
                    tracing::warn!("vsock accept failed: {e}");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    })
}

/// Serves the virtio-serial port at `path`: write the ready line, serve one HTTP connection
/// over the stream; when the host side goes away, reopen and start again.
pub fn spawn_serial(path: PathBuf, state: Arc<AgentState>) -> JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            match serial::open(&path) {
                Ok(mut stream) => match stream.write_all(ready_line().as_bytes()).await {
                    Ok(()) => serve_connection(stream, state.clone()).await,
                    Err(e) => {
                        tracing::warn!("cannot write the ready line on {}: {e}", path.display())
                    }
                },
                Err(e) => {
                    tracing::error!(
                        "cannot open {}: {e}; serial channel stopped",
                        path.display()
                    );
                    return;
                }
            }
            tokio::time::sleep(SERIAL_REOPEN).await;
        }
    })
}

/// Binds TCP `addr` and serves it; returns the bound address (port 0 picks one).
pub async fn start_tcp(
    addr: SocketAddr,
    state: Arc<AgentState>,
    peers: Peers,
    token: Option<String>,
) -> std::io::Result<(SocketAddr, JoinHandle<()>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    Ok((local, spawn_tcp(listener, state, peers, token)))
}

#[cfg(test)]
mod tests {
    use super::authenticated;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    #[tokio::test]
    async fn only_the_right_auth_line_opens_a_connection_and_nothing_after_it_is_eaten() {
        let token = "ab".repeat(32);
        let (mut host, mut agent) = tokio::io::duplex(4096);
        host.write_all(format!("AUTH {token}\nGET / HTTP/1.1\r\n").as_bytes())
            .await
            .expect("write");
        assert!(authenticated(&mut agent, &token).await);
        let mut rest = [0u8; 5];
        agent.read_exact(&mut rest).await.expect("rest");
        assert_eq!(&rest, b"GET /");
        for first in [
            format!("AUTH {}\n", "cd".repeat(32)),
            "GET /v1/health HTTP/1.1\r\n".to_string(),
            format!("AUTH {token}{}\n", "x".repeat(200)),
        ] {
            let (mut host, mut agent) = tokio::io::duplex(4096);
            host.write_all(first.as_bytes()).await.expect("write");
            assert!(!authenticated(&mut agent, &token).await, "{first:?}");
        }
        // A peer that says nothing is dropped after the timeout.
        let (_host, mut agent) = tokio::io::duplex(64);
        let t = std::time::Instant::now();
        assert!(!authenticated(&mut agent, &token).await);
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
    }
}
