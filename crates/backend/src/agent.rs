//! HTTP/1.1 client for the guest agent, over whatever byte stream the driver provides.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use cloude_protocol::{RunRequest, RunResponse, StreamEvent};

use crate::vm::AgentIo;

/// Largest agent response body we accept (two stages of base64 output at the agent's cap).
const MAX_RESPONSE_BYTES: usize = 4 * (cloude_protocol::MAX_OUTPUT_LIMIT_BYTES as usize);
/// Longest NDJSON line in a streamed answer.
const MAX_STREAM_LINE_BYTES: usize = MAX_RESPONSE_BYTES;

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("HTTP to the agent failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the agent answered {0}: {1}")]
    Status(u16, String),
    #[error("reading the agent's answer failed: {0}")]
    Body(String),
    #[error("the agent's answer is not valid: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the agent reported an error: {0}")]
    Reported(String),
    #[error("the agent's stream ended without a result")]
    NoResult,
    #[error("the VM exited before the agent answered")]
    VmExited,
}

/// One HTTP/1.1 connection to an agent.
pub struct AgentClient {
    sender: SendRequest<Full<Bytes>>,
    conn: tokio::task::JoinHandle<()>,
}

impl Drop for AgentClient {
    fn drop(&mut self) {
        self.conn.abort();
    }
}

impl AgentClient {
    pub async fn handshake(io: Box<dyn AgentIo>) -> Result<Self, AgentError> {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
        let conn = tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!("agent connection ended: {e}");
            }
        });
        Ok(AgentClient { sender, conn })
    }

    async fn post(
        &mut self,
        path: &str,
        body: Vec<u8>,
    ) -> Result<hyper::Response<hyper::body::Incoming>, AgentError> {
        let req = hyper::Request::post(path)
            .header("host", "agent")
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("static request parts are valid");
        self.sender.ready().await?;
        let resp = self.sender.send_request(req).await?;
        if !resp.status().is_success() {
            let status = resp.status().as_u16();
            let body = collect(resp.into_body()).await.unwrap_or_default();
            let msg = serde_json::from_slice::<cloude_protocol::ErrorBody>(&body)
                .map(|e| e.error)
                .unwrap_or_else(|_| String::from_utf8_lossy(&body).into_owned());
            return Err(AgentError::Status(status, msg));
        }
        Ok(resp)
    }

    /// `POST /v1/run`.
    pub async fn run(&mut self, req: &RunRequest) -> Result<RunResponse, AgentError> {
        let resp = self.post("/v1/run", serde_json::to_vec(req)?).await?;
        let body = collect(resp.into_body()).await?;
        Ok(serde_json::from_slice(&body)?)
    }

    /// `POST /v1/run/stream`: forwards output events to `tx` and returns the final result.
    /// A closed `tx` (the client went away) ends the call early.
    pub async fn run_stream(
        &mut self,
        req: &RunRequest,
        tx: &mpsc::Sender<StreamEvent>,
    ) -> Result<RunResponse, AgentError> {
        let resp = self
            .post("/v1/run/stream", serde_json::to_vec(req)?)
            .await?;
        let mut body = resp.into_body();
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=nl).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                match serde_json::from_slice::<StreamEvent>(&line)? {
                    StreamEvent::Result { result } => return Ok(result),
                    StreamEvent::Error { message } => return Err(AgentError::Reported(message)),
                    ev @ StreamEvent::Output { .. } => {
                        if tx.send(ev).await.is_err() {
                            return Err(AgentError::Body("the client went away".into()));
                        }
                    }
                }
            }
            if buf.len() > MAX_STREAM_LINE_BYTES {
                return Err(AgentError::Body("a stream line is too long".into()));
            }
        }
        Err(AgentError::NoResult)
    }
}

async fn collect(body: hyper::body::Incoming) -> Result<Bytes, AgentError> {
    Limited::new(body, MAX_RESPONSE_BYTES)
        .collect()
        .await
        .map(|c| c.to_bytes())
        .map_err(|e| AgentError::Body(e.to_string()))
}
