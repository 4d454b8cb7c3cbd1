//! Requests for loopback benchmarks, through the API crate's client (one connection per
//! request).

use std::net::SocketAddr;
use std::time::Duration;

/// Status code and body of a response.
pub struct Response {
    pub status: u16,
    pub body: String,
}

/// Sends one request with `Connection: close` and reads the whole answer.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&str>,
    timeout: Duration,
) -> anyhow::Result<Response> {
    let client = cloude_api::client::Client::with_timeout(&format!("http://{addr}"), Some(timeout));
    let r = client.raw(method, path, body.map(str::as_bytes))?;
    Ok(Response {
        status: r.status,
        body: String::from_utf8_lossy(&r.body).into_owned(),
    })
}
