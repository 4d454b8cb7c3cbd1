//! The Connect protocol with the JSON codec, as E2B's envd speaks it: unary calls are a JSON
//! body each way (`application/json`; an error is a non-200 status with `{code, message}`);
//! server streams are 5-byte-prefixed envelopes (a flag byte, a big-endian length, JSON) in
//! `application/connect+json`, the last one an end-of-stream envelope (flag 2) holding `{}` or
//! `{"error": {code, message}}`. Compression is not offered (the SDKs ask for none).

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::mpsc;

use super::E2bError;

/// Largest request message (a `Start` with its arguments and environment, a `SendInput`):
/// what a sandbox command may carry, plus JSON and base64 overhead.
pub const MAX_MESSAGE_BYTES: usize = 4 << 20;
/// Envelopes queued for a slow client before the producer waits.
const STREAM_QUEUE: usize = 16;
/// The stream content type; the SDKs accept exactly this string.
pub const STREAM_CONTENT_TYPE: &str = "application/connect+json";
const FLAG_END_STREAM: u8 = 0x02;
const FLAG_COMPRESSED: u8 = 0x01;

/// A Connect error code and its HTTP status.
pub fn code_of(status: StatusCode) -> &'static str {
    match status.as_u16() {
        400 | 413 | 415 | 422 => "invalid_argument",
        401 => "unauthenticated",
        403 => "permission_denied",
        404 | 410 => "not_found",
        409 => "already_exists",
        429 => "resource_exhausted",
        408 | 504 => "deadline_exceeded",
        501 => "unimplemented",
        502 | 503 => "unavailable",
        _ => "internal",
    }
}

fn error_json(e: &E2bError) -> serde_json::Value {
    serde_json::json!({ "code": code_of(e.status), "message": e.message })
}

/// A unary answer: the message, or the error with its status.
pub fn unary<T: Serialize>(r: Result<T, E2bError>) -> Response {
    match r {
        Ok(v) => axum::Json(v).into_response(),
        Err(e) => {
            let mut resp = (e.status, axum::Json(error_json(&e))).into_response();
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
    }
}

/// A unary request's message (`application/json`).
pub fn parse_unary<T: DeserializeOwned>(headers: &HeaderMap, body: &[u8]) -> Result<T, E2bError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/json") {
        return Err(E2bError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ct:?}: this server speaks Connect with the JSON codec only (application/json)"),
        ));
    }
    check_encoding(headers, "content-encoding")?;
    serde_json::from_slice(body).map_err(|e| E2bError::bad(format!("invalid message: {e}")))
}

fn check_encoding(headers: &HeaderMap, name: &str) -> Result<(), E2bError> {
    match headers.get(name).and_then(|v| v.to_str().ok()) {
        None | Some("identity") => Ok(()),
        Some(other) => Err(E2bError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("{name} {other:?} is not offered: send uncompressed messages"),
        )),
    }
}

/// The one message of a server-streaming request: exactly one uncompressed envelope.
pub fn parse_stream_request<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: &[u8],
) -> Result<T, E2bError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with(STREAM_CONTENT_TYPE) {
        return Err(E2bError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ct:?}: a stream takes {STREAM_CONTENT_TYPE}"),
        ));
    }
    check_encoding(headers, "connect-content-encoding")?;
    let (flag, msg, rest) = split_envelope(body)?;
    if flag & FLAG_COMPRESSED != 0 {
        return Err(E2bError::bad("compressed messages are not offered"));
    }
    if flag != 0 || !rest.is_empty() {
        return Err(E2bError::bad(
            "a server-streaming call takes exactly one message envelope",
        ));
    }
    serde_json::from_slice(msg).map_err(|e| E2bError::bad(format!("invalid message: {e}")))
}

/// The first envelope of `b`: its flag, its message and what follows it.
pub fn split_envelope(b: &[u8]) -> Result<(u8, &[u8], &[u8]), E2bError> {
    if b.len() < 5 {
        return Err(E2bError::bad(format!(
            "an envelope needs a 5-byte prefix, the body has {} bytes",
            b.len()
        )));
    }
    let len = u32::from_be_bytes([b[1], b[2], b[3], b[4]]) as usize;
    if len > MAX_MESSAGE_BYTES {
        return Err(E2bError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("a message of {len} bytes is over the limit of {MAX_MESSAGE_BYTES}"),
        ));
    }
    let rest = &b[5..];
    if rest.len() < len {
        return Err(E2bError::bad(format!(
            "the envelope announces {len} bytes, {} follow",
            rest.len()
        )));
    }
    Ok((b[0], &rest[..len], &rest[len..]))
}

/// One envelope.
pub fn envelope(flag: u8, msg: &[u8]) -> Bytes {
    let mut b = Vec::with_capacity(5 + msg.len());
    b.push(flag);
    b.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(u32::MAX).to_be_bytes());
    b.extend_from_slice(msg);
    b.into()
}

/// The sending end of a server stream.
pub struct StreamTx(mpsc::Sender<Bytes>);

impl StreamTx {
    /// Sends one message; false once the client has gone.
    pub async fn send<T: Serialize>(&self, msg: &T) -> bool {
        let json = serde_json::to_vec(msg).unwrap_or_else(|_| b"{}".to_vec());
        self.0.send(envelope(0, &json)).await.is_ok()
    }

    /// Resolves once the client has gone (the response body was dropped).
    pub async fn gone(&self) {
        self.0.closed().await;
    }

    /// Ends the stream: `{}`, or the error.
    pub async fn end(self, error: Option<E2bError>) {
        let body = match error {
            None => serde_json::json!({}),
            Some(e) => serde_json::json!({ "error": error_json(&e) }),
        };
        let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
        let _ = self.0.send(envelope(FLAG_END_STREAM, &json)).await;
    }
}

/// A server stream's response and its sender (drop the sender, or `end` it, to finish).
pub fn stream() -> (StreamTx, Response) {
    let (tx, rx) = mpsc::channel::<Bytes>(STREAM_QUEUE);
    let body = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::convert::Infallible>(b), rx))
    });
    let resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)],
        Body::from_stream(body),
    )
        .into_response();
    (StreamTx(tx), resp)
}

/// A stream that ends with an error before any message.
pub fn stream_error(e: E2bError) -> Response {
    let body = serde_json::json!({ "error": error_json(&e) });
    let json = serde_json::to_vec(&body).unwrap_or_default();
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, STREAM_CONTENT_TYPE)],
        Body::from(envelope(FLAG_END_STREAM, &json)),
    )
        .into_response()
}

/// Fuzzing hook: envelopes walked as a stream of them, and a stream request read; never a
/// panic, never a message over the cap, always progress.
pub fn fuzz(data: &[u8]) {
    let mut rest = data;
    while let Ok((_, msg, next)) = split_envelope(rest) {
        assert!(msg.len() <= MAX_MESSAGE_BYTES && next.len() < rest.len());
        let again = envelope(0, msg);
        assert_eq!(split_envelope(&again).map(|(_, m, _)| m).ok(), Some(msg));
        rest = next;
    }
    let mut h = HeaderMap::new();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(STREAM_CONTENT_TYPE),
    );
    if parse_stream_request::<serde_json::Value>(&h, data).is_ok() {
        assert_eq!(data[0], 0, "only an uncompressed message is accepted");
    }
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let _ = parse_unary::<serde_json::Value>(&h, data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_round_trip_and_lie_detected() {
        let e = envelope(0, br#"{"a":1}"#);
        let (flag, msg, rest) = split_envelope(&e).expect("split");
        assert_eq!((flag, msg, rest), (0, &br#"{"a":1}"#[..], &b""[..]));
        // A length past the body, past the cap, and a short prefix are all refused.
        assert!(split_envelope(&e[..e.len() - 1]).is_err());
        let mut big = vec![0u8, 0xff, 0xff, 0xff, 0xff];
        big.extend_from_slice(b"{}");
        assert_eq!(
            split_envelope(&big)
                .map(|_| ())
                .expect_err("over the cap")
                .status,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert!(split_envelope(&[0, 0, 0]).is_err());
    }

    #[test]
    fn stream_requests_take_one_plain_envelope() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(STREAM_CONTENT_TYPE),
        );
        let one = envelope(0, br#"{"x":2}"#);
        let v: serde_json::Value = parse_stream_request(&h, &one).expect("parse");
        assert_eq!(v["x"], 2);
        let mut two = one.to_vec();
        two.extend_from_slice(&one);
        assert!(parse_stream_request::<serde_json::Value>(&h, &two).is_err());
        let compressed = envelope(FLAG_COMPRESSED, b"{}");
        assert!(parse_stream_request::<serde_json::Value>(&h, &compressed).is_err());
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/connect+proto"),
        );
        assert!(parse_stream_request::<serde_json::Value>(&h, &one).is_err());
    }

    #[test]
    fn statuses_have_connect_codes() {
        assert_eq!(code_of(StatusCode::NOT_FOUND), "not_found");
        assert_eq!(code_of(StatusCode::UNAUTHORIZED), "unauthenticated");
        assert_eq!(code_of(StatusCode::SERVICE_UNAVAILABLE), "unavailable");
        assert_eq!(code_of(StatusCode::INTERNAL_SERVER_ERROR), "internal");
    }
}
