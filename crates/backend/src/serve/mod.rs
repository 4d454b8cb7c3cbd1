//! The HTTP/1.1 accept loop: the connection table (`table.rs`: per-address caps, eviction of
//! idle connections), per-connection disconnect watch, header timeout, graceful stop.

use std::future::Future as _;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use http_body_util::BodyExt as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt as _;

use crate::api::conn::ConnWatch;
use crate::api::ws::Handover;

mod table;
pub use table::{ConnLimits, ConnStats, ConnTable, Refusal, Ticket};

/// Longest time a client may take to send a request's headers (slowloris; under pressure the
/// [`ConnTable`]'s idle deadline is shorter).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// The idle deadline when every connection slot is taken.
pub const MIN_IDLE_TIMEOUT: Duration = Duration::from_secs(2);
/// hyper's per-connection buffer cap (it bounds a request's header): 1,500 half-sent headers
/// then hold at most ~100 MiB, not hyper's default ~400 KiB each.
const MAX_CONN_BUFFER: usize = 64 * 1024;
/// After the server ends a connection, how long (and how many bytes) it keeps reading and
/// discarding what the client still sends, so that a client that sends its whole oversized body
/// before reading (Python's `urllib`, for one) sees the 413 instead of a reset (nginx's
/// lingering close).
const LINGER_TIME: Duration = Duration::from_secs(5);
const LINGER_BYTES: usize = 256 << 20;

/// How often idle connections are checked against the idle deadline.
const SWEEP_EVERY: Duration = Duration::from_millis(500);
/// How often evictions and refusals are summed up in the log (never one line per connection).
const REPORT_EVERY: Duration = Duration::from_secs(10);

/// Serves `router` until `stop` turns true, then closes idle connections at once, lets the
/// others finish their current request (graceful shutdown) and returns once all are closed.
/// Who may hold a connection is the [`ConnTable`]'s decision: an idle connection makes way for a
/// newcomer, and one is refused (503 naming the limit) only when every slot has a request in
/// flight.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut stop: watch::Receiver<bool>,
    table: Arc<ConnTable>,
) {
    let mut conns = JoinSet::new();
    let mut sweep = tokio::time::interval(SWEEP_EVERY);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = tokio::time::Instant::now();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match table.admit(peer.ip()) {
                    Ok(ticket) => {
                        conns.spawn(connection(stream, router.clone(), stop.clone(), ticket));
                    }
                    Err(why) => refuse(&stream, why),
                },
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            _ = sweep.tick() => {
                table.sweep();
                if last_report.elapsed() >= REPORT_EVERY {
                    last_report = tokio::time::Instant::now();
                    let (evicted, refused) = table.take_unreported();
                    if evicted + refused > 0 {
                        let s = table.stats();
                        tracing::warn!(
                            "connections: {evicted} idle one(s) closed to make room or past the idle deadline, {refused} refused, in the last {} s ({} open from {} address(es), {} idle)",
                            REPORT_EVERY.as_secs(), s.open, s.addresses, s.idle
                        );
                    }
                }
            }
        }
    }
    drop(listener);
    let closed = table.close_idle();
    if closed > 0 {
        tracing::info!("closed {closed} idle connection(s)");
    }
    while conns.join_next().await.is_some() {}
}

/// Answers a connection the table refused with a 503 (one non-blocking write: a refusal never
/// waits on the client) and closes it.
fn refuse(stream: &tokio::net::TcpStream, why: Refusal) {
    let message = match why {
        Refusal::Full(max) => format!(
            "the server already has {max} connections open, each with a request in flight (limits.max_connections); retry later"
        ),
        Refusal::PerIp(max) => format!(
            "your address already has {max} connections open, each with a request in flight (limits.max_connections_per_ip); retry later"
        ),
    };
    let body = format!("{{\"error\":\"too_many_connections\",\"message\":\"{message}\"}}");
    let resp = format!(
        "HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.try_write(resp.as_bytes());
    tracing::debug!("refused a connection: {message}");
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
    ticket: Ticket,
) {
    let _ = stream.set_nodelay(true);
    let conn_watch = ConnWatch::watch(&stream);
    let kicked = ticket.kicked.clone();
    let ticket = Arc::new(ticket);
    let handover = Handover::default();
    let svc_ticket = ticket.clone();
    let svc_handover = handover.clone();
    let svc = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        let ticket = &svc_ticket;
        req.extensions_mut().insert(conn_watch.clone());
        req.extensions_mut().insert(svc_handover.clone());
        // The request is in flight until its response body has been sent (or dropped).
        let busy = ticket.busy();
        let call = router.clone().oneshot(req.map(axum::body::Body::new));
        Box::pin(async move {
            let resp = call.await?;
            Ok::<_, std::convert::Infallible>(resp.map(|body| {
                axum::body::Body::new(body.map_frame(move |frame| {
                    let _in_flight = &busy;
                    frame
                }))
            }))
        })
    });
    let mut conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(MAX_CONN_BUFFER)
        .serve_connection(TokioIo::new(stream), svc);
    // Serve until the connection ends (keeping the socket, for the lingering close) or until
    // the server stops (then finish the current request and close).
    let stopping = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let mut stopping = std::pin::pin!(stopping);
    let mut stopped = false;
    let kicked = kicked.notified();
    let mut kicked = std::pin::pin!(kicked);
    let r = std::future::poll_fn(|cx| {
        if kicked.as_mut().poll(cx).is_ready() {
            // Evicted by the table: the connection was idle; drop it now.
            return std::task::Poll::Ready(Err(None));
        }
        if !stopped && stopping.as_mut().poll(cx).is_ready() {
            stopped = true;
            std::pin::Pin::new(&mut conn).graceful_shutdown();
        }
        conn.poll_without_shutdown(cx).map_err(Some)
    })
    .await;
    // A WebSocket handler answered 101: the session runs here, on the same socket, with the
    // connection busy (never evicted as idle) until it ends.
    if let (Ok(()), Some(session)) = (&r, handover.take()) {
        let parts = conn.into_parts();
        let _busy = ticket.busy();
        Handover::run(session, parts.io.into_inner(), parts.read_buf).await;
        return;
    }
    match r {
        Ok(()) if !stopped => linger(conn.into_parts().io.into_inner()).await,
        Ok(()) => {}
        Err(Some(e)) => tracing::debug!("connection ended: {e}"),
        Err(None) => tracing::debug!("idle connection closed to make room"),
    }
}
