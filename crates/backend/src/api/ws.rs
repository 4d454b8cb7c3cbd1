//! WebSockets on our own connection loop.
//!
//! `serve` drives each connection with hyper's `poll_without_shutdown` (it keeps the socket for
//! the lingering close), so hyper hands an upgrade over by hand: a handler that accepts a
//! WebSocket answers `101` and leaves its session in the request's [`Handover`] slot; once
//! hyper has sent the `101`, `serve::connection` takes the socket and the bytes hyper had
//! already read, and runs the session there, with the connection counted busy in the
//! connection table for as long as it lives.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame, Role};
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

use super::error::ApiError;

/// Largest message a client may send (a Piston `init` or a native start carries the code);
/// longer ones end the connection (tungstenite's `Capacity` error).
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Bytes of frames queued for a client that does not read, beyond which sending waits (each
/// send waits for the queue to drain below it). The queue holds at most this plus one message;
/// the largest message is a run's final result, whose size the output limit bounds (and which
/// the server holds in memory anyway), so tungstenite's hard cap on the queue is left open.
const WRITE_BUFFER_BYTES: usize = 128 * 1024;

/// A WebSocket session once the connection has been handed over.
pub type Session = Box<dyn FnOnce(Socket) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A server-side WebSocket.
pub type Socket = WebSocketStream<TcpStream>;

/// The per-connection slot a handler leaves its WebSocket session in (one per request; the
/// connection loop takes it after the `101` has been sent).
#[derive(Clone, Default)]
pub struct Handover(Arc<Mutex<Option<Session>>>);

impl Handover {
    fn put(&self, s: Session) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = Some(s);
        }
    }

    /// The session left by the last request, if it upgraded.
    pub fn take(&self) -> Option<Session> {
        self.0.lock().ok().and_then(|mut s| s.take())
    }

    /// Runs the session on the handed-over socket (`read` = bytes hyper had read past the
    /// request: the client's first frames, possibly).
    pub async fn run(session: Session, stream: TcpStream, read: bytes::Bytes) {
        let config = tungstenite::protocol::WebSocketConfig {
            max_message_size: Some(MAX_MESSAGE_BYTES),
            max_frame_size: Some(MAX_MESSAGE_BYTES),
            write_buffer_size: WRITE_BUFFER_BYTES,
            max_write_buffer_size: usize::MAX,
            ..Default::default()
        };
        let ws =
            WebSocketStream::from_partially_read(stream, read.to_vec(), Role::Server, Some(config))
                .await;
        session(ws).await;
    }
}

/// Answers a WebSocket handshake (`101` with the accept key) and leaves `session` to run on the
/// connection; a request that is not a valid WebSocket handshake is refused with 400 (426
/// when it asks no upgrade at all).
pub fn accept<F, Fut>(
    method: &Method,
    headers: &HeaderMap,
    handover: Option<&Handover>,
    session: F,
) -> Response
where
    F: FnOnce(Socket) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !has(header::UPGRADE, "websocket") {
        return ApiError::upgrade_required("this route speaks WebSocket only (Upgrade: websocket)")
            .into_response();
    }
    let Some(key) = headers.get(header::SEC_WEBSOCKET_KEY) else {
        return ApiError::bad_request(None, "missing Sec-WebSocket-Key").into_response();
    };
    if method != Method::GET || !has(header::CONNECTION, "upgrade") {
        return ApiError::bad_request(
            None,
            "a WebSocket handshake is a GET with Connection: upgrade",
        )
        .into_response();
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v.as_bytes() != b"13")
    {
        return ApiError::bad_request(None, "Sec-WebSocket-Version must be 13").into_response();
    }
    if let Err(origin) = same_site(headers) {
        return ApiError::forbidden(
            "forbidden_origin",
            format!(
                "a WebSocket from a page of another site ({origin}) is refused: only this server's own pages and non-browser clients may open one"
            ),
        )
        .into_response();
    }
    let Some(handover) = handover else {
        return ApiError::bad_request(None, "WebSockets are served on the server's own listener")
            .into_response();
    };
    let accept = tungstenite::handshake::derive_accept_key(key.as_bytes());
    handover.put(Box::new(move |ws| Box::pin(session(ws))));
    let mut resp = Response::new(axum::body::Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&accept) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    resp
}

/// Browsers send `Origin` with every WebSocket and let any page open one to any address (no
/// same-origin rule for WebSockets): a page on another site must not run programs through a
/// server on the visitor's loopback. A request without `Origin` (not a browser: Piston's CLI,
/// tungstenite) passes; one whose `Origin` names this server (the `Host` it asked) or a
/// loopback name passes; any other is refused with the origin it named.
fn same_site(headers: &HeaderMap) -> Result<(), String> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = origin.to_str().unwrap_or("?").to_string();
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or("")
        .trim_end_matches('/');
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let name = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.split(':').next().unwrap_or(""),
    };
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if !authority.is_empty() && (authority.eq_ignore_ascii_case(host) || loopback) {
        Ok(())
    } else {
        Err(origin)
    }
}

/// Sends one JSON text message.
pub async fn send_json<T: serde::Serialize>(
    ws: &mut Socket,
    v: &T,
) -> Result<(), tungstenite::Error> {
    let text = serde_json::to_string(v).unwrap_or_default();
    ws.send(Message::Text(text)).await
}

/// Sends a close frame with `code` and `reason` (at most 123 bytes, as the protocol allows),
/// then waits briefly for the client's close.
pub async fn close(ws: &mut Socket, code: u16, reason: &str) {
    let reason: String = reason.chars().take(60).collect();
    let frame = CloseFrame {
        code: CloseCode::from(code),
        reason: reason.into(),
    };
    let _ = ws.send(Message::Close(Some(frame))).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        while let Some(Ok(m)) = ws.next().await {
            if m.is_close() {
                break;
            }
        }
    })
    .await;
}

/// The next message from the client that carries data: text (or binary as UTF-8). `None` when
/// the client closed or broke the connection; pings are answered by tungstenite.
pub async fn next_text(ws: &mut Socket) -> Option<Result<String, String>> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return Some(Ok(t)),
            Ok(Message::Binary(b)) => {
                return Some(
                    String::from_utf8(b).map_err(|_| "a binary message is not UTF-8".into()),
                )
            }
            Ok(Message::Close(_)) => return None,
            Ok(_) => continue,
            Err(tungstenite::Error::Capacity(e)) => return Some(Err(format!("{e}"))),
            Err(_) => return None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(origin: Option<&str>, host: &str) -> HeaderMap {
        let mut m = HeaderMap::new();
        m.insert(header::HOST, HeaderValue::from_str(host).expect("host"));
        if let Some(o) = origin {
            m.insert(header::ORIGIN, HeaderValue::from_str(o).expect("origin"));
        }
        m
    }

    #[test]
    fn only_this_server_s_pages_and_non_browsers_open_websockets() {
        assert!(same_site(&h(None, "127.0.0.1:8787")).is_ok());
        assert!(same_site(&h(
            Some("http://cloude.example:8787"),
            "cloude.example:8787"
        ))
        .is_ok());
        assert!(same_site(&h(Some("http://localhost:3000"), "127.0.0.1:8787")).is_ok());
        assert!(same_site(&h(Some("http://[::1]:8787"), "[::1]:8787")).is_ok());
        assert!(same_site(&h(Some("https://evil.example"), "127.0.0.1:8787")).is_err());
        assert!(same_site(&h(Some("null"), "127.0.0.1:8787")).is_err());
        assert!(same_site(&h(Some("http://127.0.0.1.evil.example"), "127.0.0.1:8787")).is_err());
    }
}
