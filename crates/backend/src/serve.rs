//! The HTTP/1.1 accept loop: per-connection disconnect watch, header timeout, graceful stop.

use std::future::Future as _;
use std::time::Duration;

use axum::Router;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use crate::api::conn::ConnWatch;

/// Longest time a client may take to send a request's headers (slowloris).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// After the server ends a connection, how long (and how many bytes) it keeps reading and
/// discarding what the client still sends, so that a client that sends its whole oversized body
/// before reading (Python's `urllib`, for one) sees the 413 instead of a reset (nginx's
/// lingering close).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 256 << 20;

/// Serves `router` until `stop` turns true, then lets open connections finish their current
/// request (graceful shutdown) and returns once all are closed. At most `max_connections` are
/// open at once; one more gets a 503 naming the limit and is closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
    max_connections: usize,
) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) if conns.len() >= max_connections => {
                    refuse(&stream, max_connections);
                }
                Ok((stream, _)) => {
                    conns.spawn(connection(stream, router.clone(), stop.clone()));
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    drop(listener);
    while conns.join_next().await.is_some() {}
}

/// Answers a connection over the limit with a 503 (one non-blocking write: a refusal never
/// waits on the client) and closes it.
fn refuse(stream: &tokio::net::TcpStream, max: usize) {
    let body = format!(
        "{{\"error\":\"too_many_connections\",\"message\":\"the server already has {max} connections open (limits.max_connections); retry later\"}}"
    );
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(resp.as_bytes());
    tracing::warn!("refused a connection: {max} open (limits.max_connections)");
}

/// Ends our side (FIN: a client reading to end-of-file sees the answer end), then reads and
/// discards what the client still sends (bounded in time and bytes), then closes.
async fn linger(mut io: tokio::net::TcpStream) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if io.shutdown().await.is_err() {
        return;
    }
    let _ = tokio::time::timeout(LINGER_TIME, async {
        let mut buf = vec![0u8; 64 * 1024];
        let mut total = 0;
        while total < LINGER_BYTES {
            match io.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

async fn connection(
    stream: tokio::net::TcpStream,
    router: Router,
    mut stop: watch::Receiver<bool>,
) {
    let _ = stream.set_nodelay(true);
    let conn_watch = ConnWatch::watch(&stream);
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        req.extensions_mut().insert(conn_watch.clone());
        router.clone().oneshot(req.map(axum::body::Body::new))
    });
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc);
    // Serve until the connection ends (keeping the socket, for the lingering close) or until
    // the server stops (then finish the current request and close).
    let stopping = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let mut stopping = std::pin::pin!(stopping);
    let mut stopped = false;
    let r = std::future::poll_fn(|cx| {
        if !stopped && stopping.as_mut().poll(cx).is_ready() {
            stopped = true;
            std::pin::Pin::new(&mut conn).graceful_shutdown();
        }
        conn.poll_without_shutdown(cx)
    })
    .await;
    match r {
        Ok(()) if !stopped => linger(conn.into_parts().io.into_inner()).await,
        Ok(()) => {}
        Err(e) => tracing::debug!("connection ended: {e}"),
    }
}
