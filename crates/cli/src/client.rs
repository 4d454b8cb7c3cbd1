//! Minimal HTTP client for the server's JSON API.

use std::time::Duration;

use serde_json::Value;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the Cloude server at {0}: is it running? (start it with `cloude-server`, or point --server / CLOUDE_SERVER elsewhere)")]
    Unreachable(String),
    #[error("the server answered {status}: {message}")]
    Api {
        status: u16,
        message: String,
        body: Value,
    },
    #[error("the server's answer could not be read: {0}")]
    BadAnswer(String),
}

pub struct Client {
    base: String,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(base: &str) -> Self {
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(5))
            .build();
        Client {
            base: base.trim_end_matches('/').to_string(),
            agent,
        }
    }

    fn handle(&self, r: Result<ureq::Response, ureq::Error>) -> Result<Value, ClientError> {
        match r {
            Ok(resp) => resp
                .into_json()
                .map_err(|e| ClientError::BadAnswer(e.to_string())),
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

    pub fn get(&self, path: &str) -> Result<Value, ClientError> {
        self.handle(self.agent.get(&format!("{}{path}", self.base)).call())
    }

    pub fn post(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        self.handle(
            self.agent
                .post(&format!("{}{path}", self.base))
                .send_json(body),
        )
    }
}
