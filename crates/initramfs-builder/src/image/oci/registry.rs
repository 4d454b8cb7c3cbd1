//! A small client of the registry HTTP API v2 (pull only): manifests, blobs, and the anonymous
//! bearer-token flow of Docker Hub and GHCR. Blobs are verified and cached by digest.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{
    check_digest, digest_of, parse_doc, pick_platform, verify, verify_file, Descriptor, Doc,
    Manifest, OciError, MAX_INDEX_DEPTH, MAX_LAYER_BYTES, MAX_MANIFEST_BYTES, MT_DOCKER_LIST,
    MT_DOCKER_MANIFEST, MT_OCI_INDEX, MT_OCI_MANIFEST,
};
use crate::progress::Progress;

/// Longest error body quoted in messages.
const MAX_ERROR_SNIPPET: usize = 300;
/// Largest token response accepted.
const MAX_TOKEN_BYTES: u64 = 1 << 20;

pub struct Registry {
    agent: ureq::Agent,
    base: String,
    repo: String,
    insecure: bool,
    token: RefCell<Option<String>>,
}

fn is_loopback(host: &str) -> bool {
    let h = if let Some(rest) = host.strip_prefix('[') {
        rest.split(']').next().unwrap_or("")
    } else {
        host.rsplit_once(':').map_or(host, |(h, _)| h)
    };
    h == "localhost"
        || h.parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Parses a `WWW-Authenticate` header: scheme and its parameters.
pub fn parse_challenge(h: &str) -> Option<(String, BTreeMap<String, String>)> {
    let h = h.trim();
    let (scheme, mut rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = BTreeMap::new();
    loop {
        rest = rest.trim_start_matches([' ', ',']);
        if rest.is_empty() {
            break;
        }
        let (key, after) = rest.split_once('=')?;
        let (value, next) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = None;
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = Some(i + 1);
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end?..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_string(), &after[end..])
        };
        params.insert(key.trim().to_ascii_lowercase(), value);
        rest = next;
    }
    Some((scheme.to_ascii_lowercase(), params))
}

fn blobs_dir() -> PathBuf {
    crate::paths::cloude_home().join("blobs").join("sha256")
}

impl Registry {
    pub fn new(host: &str, repo: &str, insecure: bool) -> Result<Self, OciError> {
        if insecure && !is_loopback(host) {
            return Err(OciError::InsecureNotLoopback(host.to_string()));
        }
        let scheme = if insecure { "http" } else { "https" };
        let agent = ureq::AgentBuilder::new()
            .timeout_connect(Duration::from_secs(30))
            .timeout_read(Duration::from_secs(300))
            .user_agent(concat!("cloude-image/", env!("CARGO_PKG_VERSION")))
            .build();
        Ok(Registry {
            agent,
            base: format!("{scheme}://{host}/v2/{repo}"),
            repo: repo.to_string(),
            insecure,
            token: RefCell::new(None),
        })
    }

    fn http_error(url: &str, what: &str, e: ureq::Error) -> OciError {
        match e {
            ureq::Error::Status(404, _) => OciError::NotFound {
                what: what.to_string(),
                url: url.to_string(),
            },
            ureq::Error::Status(status, r) => {
                let mut body = String::new();
                let _ = r
                    .into_reader()
                    .take(MAX_ERROR_SNIPPET as u64)
                    .read_to_string(&mut body);
                OciError::Http {
                    url: url.to_string(),
                    status,
                    detail: body.trim().to_string(),
                }
            }
            ureq::Error::Transport(t) => OciError::Network {
                url: url.to_string(),
                detail: t.to_string(),
            },
        }
    }

    /// GET with the current token; on 401 obtains a token once and retries.
    #[allow(clippy::result_large_err)] // ureq's error type, converted right away
    fn get(&self, url: &str, accept: &str, what: &str) -> Result<ureq::Response, OciError> {
        let call = |token: &Option<String>| {
            let mut r = self.agent.get(url);
            if !accept.is_empty() {
                r = r.set("Accept", accept);
            }
            if let Some(t) = token {
                r = r.set("Authorization", &format!("Bearer {t}"));
            }
            r.call()
        };
        let first = call(&self.token.borrow());
        match first {
            Err(ureq::Error::Status(401, resp)) => {
                let challenge = resp.header("www-authenticate").unwrap_or("").to_string();
                let token = self.authenticate(url, &challenge)?;
                *self.token.borrow_mut() = Some(token);
                match call(&self.token.borrow()) {
                    Err(ureq::Error::Status(401, _)) => Err(OciError::Auth {
                        url: url.to_string(),
                        detail: "the registry refused the anonymous token (private image? credentials are not supported yet)".into(),
                    }),
                    r => r.map_err(|e| Self::http_error(url, what, e)),
                }
            }
            r => r.map_err(|e| Self::http_error(url, what, e)),
        }
    }

    fn authenticate(&self, url: &str, challenge: &str) -> Result<String, OciError> {
        let auth = |detail: String| OciError::Auth {
            url: url.to_string(),
            detail,
        };
        let (scheme, params) = parse_challenge(challenge)
            .ok_or_else(|| auth(format!("unreadable challenge {challenge:?}")))?;
        if scheme != "bearer" {
            return Err(auth(format!("the registry wants {scheme} authentication; only anonymous bearer tokens are supported")));
        }
        let realm = params
            .get("realm")
            .ok_or_else(|| auth("the bearer challenge has no realm".into()))?;
        if !(realm.starts_with("https://") || (self.insecure && realm.starts_with("http://"))) {
            return Err(auth(format!(
                "refusing the token realm {realm:?} (not HTTPS)"
            )));
        }
        let scope = params
            .get("scope")
            .cloned()
            .unwrap_or_else(|| format!("repository:{}:pull", self.repo));
        let mut req = self.agent.get(realm).query("scope", &scope);
        if let Some(service) = params.get("service") {
            req = req.query("service", service);
        }
        let resp = req
            .call()
            .map_err(|e| Self::http_error(realm, "token", e))?;
        let mut body = Vec::new();
        resp.into_reader()
            .take(MAX_TOKEN_BYTES)
            .read_to_end(&mut body)
            .map_err(|e| OciError::Network {
                url: realm.clone(),
                detail: e.to_string(),
            })?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token =
            serde_json::from_slice(&body).map_err(|e| auth(format!("bad token response: {e}")))?;
        t.token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| auth("the token response has no token".into()))
    }

    /// Refuses a response whose `Content-Length` already says it is over `limit`.
    fn check_length(
        resp: &ureq::Response,
        what: &str,
        cap: &'static str,
        limit: u64,
    ) -> Result<(), OciError> {
        let declared = resp
            .header("content-length")
            .and_then(|v| v.trim().parse::<u64>().ok());
        if declared.is_some_and(|n| n > limit) {
            return Err(OciError::TooLarge {
                what: format!("{what} (Content-Length {})", declared.unwrap_or(0)),
                cap,
                limit,
            });
        }
        Ok(())
    }

    /// Reads a body of at most `limit` bytes: refused from its `Content-Length`, or as soon as
    /// byte `limit + 1` arrives (an endless body is never read whole).
    fn read_limited(
        resp: ureq::Response,
        url: &str,
        what: &str,
        cap: &'static str,
        limit: u64,
    ) -> Result<Vec<u8>, OciError> {
        Self::check_length(&resp, what, cap, limit)?;
        let mut body = Vec::new();
        resp.into_reader()
            .take(limit + 1)
            .read_to_end(&mut body)
            .map_err(|e| OciError::Network {
                url: url.to_string(),
                detail: e.to_string(),
            })?;
        if body.len() as u64 > limit {
            return Err(OciError::TooLarge {
                what: what.to_string(),
                cap,
                limit,
            });
        }
        Ok(body)
    }

    /// Resolves a tag or digest to the linux/amd64 image manifest and its digest.
    pub fn resolve(&self, reference: &str) -> Result<(String, Manifest), OciError> {
        let accept = [
            MT_OCI_MANIFEST,
            MT_OCI_INDEX,
            MT_DOCKER_MANIFEST,
            MT_DOCKER_LIST,
        ]
        .join(", ");
        let mut reference = reference.to_string();
        for _ in 0..MAX_INDEX_DEPTH {
            let url = format!("{}/manifests/{reference}", self.base);
            let what = format!("manifest {}:{reference}", self.repo);
            let resp = self.get(&url, &accept, &what)?;
            let header_digest = resp.header("docker-content-digest").map(str::to_string);
            let body =
                Self::read_limited(resp, &url, &what, "MAX_MANIFEST_BYTES", MAX_MANIFEST_BYTES)?;
            let digest = if reference.starts_with("sha256:") {
                verify(&what, &reference, &body)?;
                reference.clone()
            } else {
                let d = digest_of(&body);
                if let Some(h) = header_digest.filter(|h| h.starts_with("sha256:")) {
                    if h != d {
                        return Err(OciError::DigestMismatch {
                            what,
                            expected: h,
                            actual: d,
                        });
                    }
                }
                d
            };
            match parse_doc(&what, &body)? {
                Doc::Manifest(m) => return Ok((digest, m)),
                Doc::Index(list) => {
                    let d = pick_platform(&what, &list)?;
                    check_digest(&d.digest)?;
                    reference = d.digest.clone();
                }
            }
        }
        Err(OciError::BadManifest {
            what: format!("{}:{reference}", self.repo),
            detail: format!("indexes nested deeper than {MAX_INDEX_DEPTH}"),
        })
    }

    /// An image config (at most [`MAX_MANIFEST_BYTES`]), verified, in memory.
    pub fn blob_bytes(&self, desc: &Descriptor, what: &str) -> Result<Vec<u8>, OciError> {
        let file = self.fetch(desc, what, "MAX_MANIFEST_BYTES", MAX_MANIFEST_BYTES, None)?;
        let mut data = Vec::new();
        file.take(MAX_MANIFEST_BYTES)
            .read_to_end(&mut data)
            .map_err(|e| OciError::Io(what.to_string(), e))?;
        Ok(data)
    }

    /// A layer blob (at most [`MAX_LAYER_BYTES`]), verified, as an open file of the blob cache,
    /// positioned at its start.
    pub fn blob_file(
        &self,
        desc: &Descriptor,
        what: &str,
        progress: Option<&Progress>,
    ) -> Result<File, OciError> {
        self.fetch(desc, what, "MAX_LAYER_BYTES", MAX_LAYER_BYTES, progress)
    }

    /// Fetches a blob into the cache (`$CLOUDE_HOME/blobs/sha256/HEX`) unless it is there: the
    /// body is streamed to a temporary file of the cache directory while hashed (never held in
    /// memory), refused past `limit` or its descriptor's size, and published by rename only once
    /// its digest matches (a failed download leaves no file).
    fn fetch(
        &self,
        desc: &Descriptor,
        what: &str,
        cap: &'static str,
        limit: u64,
        progress: Option<&Progress>,
    ) -> Result<File, OciError> {
        let hexd = check_digest(&desc.digest)?;
        let dir = blobs_dir();
        let cached = dir.join(hexd);
        let too_large = |what: String| OciError::TooLarge { what, cap, limit };
        if let Ok(mut f) = File::open(&cached) {
            // Written only after verification; re-checked because it is cheap next to a pull.
            let len = f.metadata().map(|m| m.len()).unwrap_or(u64::MAX);
            if len <= limit && verify_file(what, &desc.digest, &mut f).is_ok() {
                return Ok(f);
            }
        }
        if desc.size > limit {
            return Err(too_large(format!("{what} (declared size {})", desc.size)));
        }
        let url = format!("{}/blobs/{}", self.base, desc.digest);
        let resp = self.get(&url, "", what)?;
        Self::check_length(&resp, what, cap, limit)?;
        let io_err = |e: std::io::Error| OciError::Io(dir.display().to_string(), e);
        fs::create_dir_all(&dir).map_err(io_err)?;
        let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(io_err)?;
        let bar = progress.map(|p| p.bar(desc.size.max(1), format!("downloading {what}")));
        // A descriptor's size is part of the digested manifest: never read past it.
        let most = if desc.size > 0 { desc.size } else { limit };
        let mut reader = resp.into_reader().take(most + 1);
        let mut hash = Sha256::new();
        let mut total = 0u64;
        let mut buf = vec![0u8; 1 << 16];
        {
            let mut out = BufWriter::with_capacity(1 << 20, tmp.as_file_mut());
            loop {
                let n = reader.read(&mut buf).map_err(|e| OciError::Network {
                    url: url.clone(),
                    detail: e.to_string(),
                })?;
                if n == 0 {
                    break;
                }
                total += n as u64;
                if total > limit {
                    return Err(too_large(what.to_string()));
                }
                hash.update(&buf[..n]);
                out.write_all(&buf[..n]).map_err(io_err)?;
                if let Some(b) = &bar {
                    b.inc(n as u64);
                }
            }
            out.flush().map_err(io_err)?;
        }
        if desc.size > 0 && total != desc.size {
            return Err(OciError::BadManifest {
                what: format!("{what} from {url}"),
                detail: format!(
                    "the blob has {}{total} bytes, its descriptor says {}",
                    if total > desc.size { "more than " } else { "" },
                    desc.size
                ),
            });
        }
        let actual = format!("sha256:{}", hex::encode(hash.finalize()));
        if actual != desc.digest {
            if let Some(b) = &bar {
                b.abandon_with_message(format!("{what}: digest mismatch"));
            }
            return Err(OciError::DigestMismatch {
                what: format!("{what} from {url}"),
                expected: desc.digest.clone(),
                actual,
            });
        }
        if let Some(b) = bar {
            b.finish_with_message(format!("downloaded {what}"));
        }
        let mut file = tmp
            .persist(&cached)
            .map_err(|e| OciError::Io(cached.display().to_string(), e.error))?;
        std::io::Seek::rewind(&mut file)
            .map_err(|e| OciError::Io(cached.display().to_string(), e))?;
        Ok(file)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/python:pull,push""#,
        )
        .expect("parse");
        assert_eq!(s, "bearer");
        assert_eq!(p["realm"], "https://auth.docker.io/token");
        assert_eq!(p["service"], "registry.docker.io");
        assert_eq!(p["scope"], "repository:library/python:pull,push");
        let (s, p) = parse_challenge("Basic realm=x").expect("basic");
        assert_eq!((s.as_str(), p["realm"].as_str()), ("basic", "x"));
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    }

    #[test]
    fn loopback_only_when_insecure() {
        for h in ["127.0.0.1:5000", "localhost:1", "[::1]:80", "127.1.2.3"] {
            assert!(is_loopback(h), "{h}");
        }
        for h in ["10.0.0.1:5000", "example.com", "[2001:db8::1]:5"] {
            assert!(!is_loopback(h), "{h}");
        }
        assert!(matches!(
            Registry::new("registry.example:5000", "a/b", true),
            Err(OciError::InsecureNotLoopback(_))
        ));
    }
}
