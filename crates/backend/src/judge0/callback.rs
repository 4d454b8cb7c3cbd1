//! `callback_url`: like Judge0, the finished submission (default fields, base64) is PUT there,
//! tried up to `callbacks_max_tries` times with `callbacks_timeout` each, with a growing pause
//! between tries (the attempts are recorded in the store: see `worker::deliver_callbacks`, so
//! they survive a restart). Only plain `http://` URLs to hosts in `[judge0] callback_hosts` are
//! accepted; nothing else is ever contacted.

use std::net::{IpAddr, SocketAddr, ToSocketAddrs as _};
use std::time::Duration;

use http_body_util::{BodyExt as _, Full};
use hyper::Request;
use hyper_util::rt::TokioIo;

/// Pause after the first failed attempt; it doubles with each further one.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Longest pause between two attempts.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(30);

/// The pause after the `tries`-th failed attempt.
pub fn retry_after(tries: i32) -> Duration {
    let doublings = u32::try_from(tries.saturating_sub(1).clamp(0, 16)).unwrap_or(0);
    RETRY_PAUSE
        .saturating_mul(1 << doublings)
        .min(MAX_RETRY_PAUSE)
}

/// Host and port of an `http://host[:port]/path` URL.
fn host_port(url: &str) -> Option<(String, u16, String)> {
    let uri: hyper::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("http") {
        return None;
    }
    let auth = uri.authority()?;
    if auth.as_str().contains('@') {
        return None;
    }
    let host = auth.host().trim_start_matches('[').trim_end_matches(']');
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_string();
    Some((
        host.to_ascii_lowercase(),
        auth.port_u16().unwrap_or(80),
        path,
    ))
}

/// One allow-list entry: `host` (port 80), `host:port`, or `host:*` (any port, said
/// explicitly); an IPv6 host in brackets.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    host: String,
    /// `None`: any port.
    port: Option<u16>,
}

impl Entry {
    fn allows(&self, host: &str, port: u16) -> bool {
        self.host == host
            && match self.port {
                None => true,
                Some(p) => p == port,
            }
    }
}

fn parse_entry(a: &str) -> Option<Entry> {
    let a = a.trim().to_ascii_lowercase();
    let (host, port) = match a.rsplit_once(':') {
        Some((h, p)) if !h.is_empty() && (!h.contains(':') || h.ends_with(']')) => {
            let port = if p == "*" {
                None
            } else {
                Some(p.parse().ok()?)
            };
            (h.to_string(), port)
        }
        _ => (a.clone(), Some(80)),
    };
    let host = host
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    (!host.is_empty()).then_some(Entry { host, port })
}

/// The callback allow-list with each entry's addresses resolved once, when the server starts:
/// a delivery connects only to those, so a name that resolves elsewhere later (DNS rebinding:
/// an allowed name turned into `127.0.0.1` or a cloud metadata address) changes nothing.
#[derive(Clone, Debug, Default)]
pub struct Pins {
    entries: Vec<(Entry, Vec<IpAddr>)>,
}

impl Pins {
    /// Resolves every entry with the system resolver (blocking; at start-up).
    pub fn resolve(allowed: &[String]) -> Pins {
        Self::with(allowed, |host| {
            (host, 0)
                .to_socket_addrs()
                .map(|a| a.map(|s| s.ip()).collect())
                .unwrap_or_default()
        })
    }

    /// Like [`Pins::resolve`] with the given resolver.
    pub fn with(allowed: &[String], resolve: impl Fn(&str) -> Vec<IpAddr>) -> Pins {
        let entries = allowed
            .iter()
            .filter_map(|a| {
                let Some(e) = parse_entry(a) else {
                    tracing::warn!("judge0: callback_hosts entry {a:?} is not host[:port|:*]; ignored");
                    return None;
                };
                let ips = match e.host.parse::<IpAddr>() {
                    Ok(ip) => vec![ip],
                    Err(_) => resolve(&e.host),
                };
                if ips.is_empty() {
                    tracing::warn!(
                        "judge0: callback host {} did not resolve at start; callbacks to it will fail",
                        e.host
                    );
                }
                Some((e, ips))
            })
            .collect();
        Pins { entries }
    }

    /// The pinned addresses for `host`:`port`, if an entry allows it.
    fn addrs(&self, host: &str, port: u16) -> Option<Vec<SocketAddr>> {
        self.entries
            .iter()
            .find(|(e, _)| e.allows(host, port))
            .map(|(_, ips)| ips.iter().map(|ip| SocketAddr::new(*ip, port)).collect())
    }
}

/// Refuses a callback URL unless callbacks are on and it names an allowed host and port.
pub fn check_url(url: &str, allowed: &[String]) -> Result<(), String> {
    if allowed.is_empty() {
        return Err("setting callback is not allowed".into());
    }
    let Some((host, port, _)) = host_port(url) else {
        return Err("must be an http:// URL without credentials".into());
    };
    let ok = allowed
        .iter()
        .filter_map(|a| parse_entry(a))
        .any(|e| e.allows(&host, port));
    if ok {
        Ok(())
    } else {
        Err(format!("host {host}:{port} is not allowed for callbacks"))
    }
}

/// One PUT, to the addresses pinned for the URL's host at start (never resolved again); any
/// HTTP answer counts as delivered (Judge0 does not look at the status either).
pub async fn put(pins: &Pins, url: &str, body: &[u8], timeout: Duration) -> Result<u16, String> {
    let (host, port, path) = host_port(url).ok_or("bad URL")?;
    let addrs = pins
        .addrs(&host, port)
        .ok_or_else(|| format!("host {host}:{port} is no longer allowed for callbacks"))?;
    if addrs.is_empty() {
        return Err(format!(
            "host {host} did not resolve when the server started"
        ));
    }
    let attempt = async {
        let stream = tokio::net::TcpStream::connect(addrs.as_slice())
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let req = Request::put(path)
            .header(hyper::header::HOST, format!("{host}:{port}"))
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .body(Full::new(bytes::Bytes::copy_from_slice(body)))
            .map_err(|e| e.to_string())?;
        let resp = send.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        // Read (and drop) at most a little of the answer.
        let _ = http_body_util::Limited::new(resp.into_body(), 64 * 1024)
            .collect()
            .await;
        Ok::<u16, String>(status)
    };
    tokio::time::timeout(timeout, attempt)
        .await
        .map_err(|_| format!("no answer within {} ms", timeout.as_millis()))?
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn urls_are_checked() {
        let allowed = vec!["127.0.0.1:*".to_string(), "hooks.local:8080".to_string()];
        assert!(check_url("http://127.0.0.1:9/cb", &allowed).is_ok());
        // A bare host means port 80 only.
        let bare = vec!["hooks.local".to_string()];
        assert!(check_url("http://hooks.local/x", &bare).is_ok());
        assert!(check_url("http://hooks.local:8080/x", &bare).is_err());
        assert!(check_url("http://hooks.local:8080/x?y=1", &allowed).is_ok());
        assert!(check_url("http://hooks.local/x", &allowed).is_err());
        assert!(check_url("https://127.0.0.1/cb", &allowed).is_err());
        assert!(check_url("http://u:p@127.0.0.1/cb", &allowed).is_err());
        assert!(check_url("http://10.0.0.1/cb", &allowed).is_err());
        assert_eq!(
            check_url("http://127.0.0.1/cb", &[]),
            Err("setting callback is not allowed".into())
        );
    }

    /// A listener that drops the first connection unanswered, then answers.
    #[tokio::test]
    async fn a_put_is_delivered_or_fails() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = l.local_addr().expect("addr");
        let server = tokio::spawn(async move {
            let (s, _) = l.accept().await.expect("accept");
            drop(s);
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let mut got = Vec::new();
            while !String::from_utf8_lossy(&got).contains("\"token\"") {
                let n = s.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("write");
            String::from_utf8_lossy(&got).into_owned()
        });
        let url = format!("http://{addr}/hook");
        let body = br#"{"token":"x"}"#;
        let pins = Pins::resolve(&["127.0.0.1:*".to_string()]);
        assert!(put(&pins, &url, body, Duration::from_secs(2))
            .await
            .is_err());
        assert_eq!(
            put(&pins, &url, body, Duration::from_secs(2)).await,
            Ok(204)
        );
        let got = server.await.expect("server");
        assert!(got.starts_with("PUT /hook HTTP/1.1"), "{got}");
        // Nobody listens: refused.
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let dead = format!("http://{}/", l.local_addr().expect("addr"));
        drop(l);
        assert!(put(&pins, &dead, b"{}", Duration::from_millis(200))
            .await
            .is_err());
    }

    /// DNS rebinding: the allowed name resolved to 127.0.0.1 at start; the delivery goes there
    /// even though the name resolves nowhere (or anywhere else) now, because it is never
    /// resolved again. A port the entry does not name gets nothing.
    #[tokio::test]
    async fn deliveries_go_to_the_address_pinned_at_start() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = l.local_addr().expect("addr").port();
        let server = tokio::spawn(async move {
            let (mut s, _) = l.accept().await.expect("accept");
            let mut buf = vec![0u8; 4096];
            let n = s.read(&mut buf).await.expect("read");
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n")
                .await
                .expect("write");
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let allowed = vec![format!("hooks.rebind.invalid:{port}")];
        let pins = Pins::with(&allowed, |h| {
            assert_eq!(h, "hooks.rebind.invalid");
            vec![IpAddr::from([127, 0, 0, 1])]
        });
        let url = format!("http://hooks.rebind.invalid:{port}/cb");
        assert!(check_url(&url, &allowed).is_ok());
        assert_eq!(
            put(&pins, &url, b"{}", Duration::from_secs(2)).await,
            Ok(204)
        );
        let got = server.await.expect("server");
        assert!(
            got.contains(&format!("host: hooks.rebind.invalid:{port}")),
            "{got}"
        );
        let other = format!("http://hooks.rebind.invalid:{}/cb", port.wrapping_add(1));
        assert!(check_url(&other, &allowed).is_err());
        assert!(put(&pins, &other, b"{}", Duration::from_millis(200))
            .await
            .is_err());
    }

    #[test]
    fn pauses_grow_to_a_cap() {
        assert_eq!(retry_after(1), RETRY_PAUSE);
        assert_eq!(retry_after(2), RETRY_PAUSE * 2);
        assert_eq!(retry_after(4), RETRY_PAUSE * 8);
        assert_eq!(retry_after(40), MAX_RETRY_PAUSE);
        assert_eq!(retry_after(0), RETRY_PAUSE);
    }
}
