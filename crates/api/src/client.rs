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
