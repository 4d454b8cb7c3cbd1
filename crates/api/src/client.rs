//! A small typed blocking client for the native API (on `ureq`), used by the `cloude` CLI, the
//! server's tests and the bench.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::Value;

use crate::{ExecutionRequest, ExecutionResponse, Languages};

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the Cloude server at {0}: is it running? (start it with `cloude-server`, or point --server / CLOUDE_SERVER elsewhere)")]
    Unreachable(String),
    /// The server answered with an error status; `message` is its message (with the field at
    /// fault and `Retry-After`, when given), `body` the whole answer.
    #[error("the server answered {status}: {message}")]
    Api {
        status: u16,
        message: String,
        body: Value,
    },
    #[error("the server's answer could not be read: {0}")]
    BadAnswer(String),
}

/// Any answer of [`Client::raw`], whatever its status.
#[derive(Clone, Debug)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Largest body [`Client::raw`] reads.
pub const MAX_RAW_BODY_BYTES: u64 = 256 << 20;

/// A client for one server.
pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    /// A client for the server at `base` (`http://127.0.0.1:8787`).
    pub fn new(base: &str) -> Self {
        Self::with_timeout(base, None)
    }

    /// Like [`Client::new`], with an overall timeout per call.
    pub fn with_timeout(base: &str, timeout: Option<Duration>) -> Self {
        let mut b = ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(5));
        if let Some(t) = timeout {
            b = b.timeout(t);
        }
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent: b.build(),
        }
    }

    /// The server's base URL.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// `POST /v1/executions`.
    pub fn execute(&self, req: &ExecutionRequest) -> Result<ExecutionResponse, ClientError> {
        self.post("/v1/executions", req)
    }

    /// `GET /v1/languages`.
    pub fn languages(&self) -> Result<Languages, ClientError> {
        self.get("/v1/languages")
    }

    /// `GET path`, decoded as `T`.
    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.decode(self.agent.get(&format!("{}{path}", self.base)).call())
    }

    /// `POST path` with a JSON body, decoded as `T`.
    pub fn post<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let body = serde_json::to_value(body).map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        self.decode(
            self.agent
                .post(&format!("{}{path}", self.base))
                .send_json(body),
        )
    }

    /// One request with a JSON (or empty) body, on a connection of its own; any status is an
    /// answer (for tests and benchmarks that look at errors too). `Err` only when no answer
    /// came.
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<RawResponse, ClientError> {
        let req = self
            .agent
            .request(method, &format!("{}{path}", self.base))
            .set("Connection", "close");
        let sent = match body {
            Some(b) => req.set("Content-Type", "application/json").send_bytes(b),
            None => req.call(),
        };
        let resp = match sent {
            Ok(r) | Err(ureq::Error::Status(_, r)) => r,
            Err(ureq::Error::Transport(t)) => {
                return Err(ClientError::Unreachable(format!("{}: {t}", self.base)))
            }
        };
        let status = resp.status();
        let headers = resp
            .headers_names()
            .into_iter()
            .filter_map(|n| resp.header(&n).map(|v| (n.clone(), v.to_string())))
            .collect();
        let mut body = Vec::new();
        std::io::Read::read_to_end(
            &mut std::io::Read::take(resp.into_reader(), MAX_RAW_BODY_BYTES),
            &mut body,
        )
        .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
        Ok(RawResponse {
            status,
            headers,
            body,
        })
    }

    fn decode<T: DeserializeOwned>(
        &self,
        r: Result<ureq::Response, ureq::Error>,
    ) -> Result<T, ClientError> {
        match r {
            Ok(resp) => {
                let text = resp
                    .into_string()
                    .map_err(|e| ClientError::BadAnswer(e.to_string()))?;
                serde_json::from_str(&text).map_err(|e| ClientError::BadAnswer(e.to_string()))
            }
            Err(ureq::Error::Status(status, resp)) => {
                let retry = resp.header("retry-after").map(str::to_string);
                let text = resp.into_string().unwrap_or_default();
                let body: Value =
                    serde_json::from_str(&text).unwrap_or(Value::String(text.clone()));
                let mut message = body
                    .get("message")
                    .and_then(Value::as_str)
                    .map(str::to_string)
                    .unwrap_or(text);
                if let Some(f) = body.get("field").and_then(Value::as_str) {
                    if !message.contains(f) {
                        message = format!("{f}: {message}");
                    }
                }
                if let Some(r) = retry {
                    message = format!("{message} (retry after {r} s)");
                }
                Err(ClientError::Api {
                    status,
                    message,
                    body,
                })
            }
            Err(ureq::Error::Transport(_)) => Err(ClientError::Unreachable(self.base.clone())),
        }
    }
}

/// Longest response head [`exchange`] reads.
pub const MAX_HEAD_BYTES: usize = 64 << 10;
/// Most headers [`exchange`] accepts in one answer.
const MAX_HEADERS: usize = 64;

/// One HTTP/1.1 request and its answer over an already open byte stream (a Unix socket to a
/// guest's virtio-serial port, or a hybrid-vsock connection after its `CONNECT`), for the tests
/// and tools that talk to an agent directly. The connection stays usable for the next call: the
/// body is read by its `Content-Length`, nothing past it. A chunked answer, a head over
/// [`MAX_HEAD_BYTES`] or a body over [`MAX_RAW_BODY_BYTES`] is an error.
pub fn exchange<S: std::io::Read + std::io::Write>(
    stream: &mut S,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<RawResponse, ClientError> {
    let bad = |e: String| ClientError::BadAnswer(e);
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: agent\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    stream
        .write_all(head.as_bytes())
        .and_then(|()| stream.write_all(body))
        .and_then(|()| stream.flush())
        .map_err(|e| ClientError::Unreachable(format!("stream: {e}")))?;
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    // Read until the blank line ends the head (scanning only what is new), then parse it once.
    let head_len = loop {
        let n = stream
            .read(&mut chunk)
            .map_err(|e| bad(format!("reading the head: {e}")))?;
        if n == 0 {
            return Err(bad("the connection closed before an answer".into()));
        }
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(at) = buf[from..].windows(4).position(|w| w == b"\r\n\r\n") {
            break from + at + 4;
        }
        if buf.len() > MAX_HEAD_BYTES {
            return Err(bad(format!("the head is over {MAX_HEAD_BYTES} bytes")));
        }
    };
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    if !resp
        .parse(&buf[..head_len])
        .map_err(|e| bad(format!("bad head: {e}")))?
        .is_complete()
    {
        return Err(bad("bad head: incomplete".into()));
    }
    let status = resp.code.unwrap_or_default();
    let headers: Vec<(String, String)> = resp
        .headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect();
    let header = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.trim())
    };
    if header("transfer-encoding").is_some() {
        return Err(bad(
            "a chunked answer (only Content-Length is read here)".into()
        ));
    }
    let len: u64 = match header("content-length") {
        Some(v) => v
            .parse()
            .map_err(|_| bad(format!("bad content-length {v:?}")))?,
        None => 0,
    };
    if len > MAX_RAW_BODY_BYTES {
        return Err(bad(format!(
            "a body of {len} bytes (at most {MAX_RAW_BODY_BYTES})"
        )));
    }
    let mut body = buf.split_off(head_len);
    // The cap above bounds `len`, so it fits in usize.
    let len = usize::try_from(len).map_err(|e| bad(e.to_string()))?;
    if body.len() > len {
        return Err(bad("more bytes than the content-length announced".into()));
    }
    let have = body.len();
    body.resize(len, 0);
    stream
        .read_exact(&mut body[have..])
        .map_err(|e| bad(format!("reading the body: {e}")))?;
    Ok(RawResponse {
        status,
        headers,
        body,
    })
}

#[cfg(test)]
mod exchange_tests {
    use super::*;

    /// A stream whose reads come from `input` and whose writes are kept.
    struct Pipe {
        input: std::io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }

    impl std::io::Read for Pipe {
        fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
            // One byte at a time: the head is found across many reads.
            let n = b.len().min(1);
            self.input.read(&mut b[..n])
        }
    }

    impl std::io::Write for Pipe {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pipe(answer: &[u8]) -> Pipe {
        Pipe {
            input: std::io::Cursor::new(answer.to_vec()),
            written: Vec::new(),
        }
    }

    #[test]
    fn two_answers_on_one_connection() {
        let mut p = pipe(
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 409 Conflict\r\ncontent-length: 0\r\n\r\n",
        );
        let a = exchange(&mut p, "POST", "/v1/run", Some(b"{\"x\":1}")).expect("first");
        assert_eq!((a.status, a.body.as_slice()), (200, &b"{}"[..]));
        let b = exchange(&mut p, "GET", "/v1/health", None).expect("second");
        assert_eq!((b.status, b.body.len()), (409, 0));
        let sent = String::from_utf8(p.written).expect("utf8");
        assert!(sent.starts_with("POST /v1/run HTTP/1.1\r\n"), "{sent}");
        assert!(
            sent.contains("content-length: 7\r\n\r\n{\"x\":1}GET /v1/health"),
            "{sent}"
        );
    }

    #[test]
    fn hostile_answers_are_refused() {
        for (answer, why) in [
            (
                &b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n"[..],
                "chunked",
            ),
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 99999999999999\r\n\r\n"[..],
                "a body of",
            ),
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n"[..],
                "bad content-length",
            ),
            (
                &b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\n\r\n"[..],
                "reading the body",
            ),
            (&b"NOT HTTP\r\n\r\n"[..], "bad head"),
            (&b""[..], "closed before"),
        ] {
            let e = exchange(&mut pipe(answer), "GET", "/", None).expect_err(why);
            assert!(e.to_string().contains(why), "{why}: {e}");
        }
        let endless = [
            b"HTTP/1.1 200 OK\r\nx-a: ".to_vec(),
            vec![b'b'; 2 * MAX_HEAD_BYTES],
        ]
        .concat();
        let e = exchange(&mut pipe(&endless), "GET", "/", None).expect_err("endless head");
        assert!(e.to_string().contains("the head is over"), "{e}");
    }
}
