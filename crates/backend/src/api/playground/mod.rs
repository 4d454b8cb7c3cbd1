//! The playground: the page at `/` where a person picks a language, writes a program and watches
//! it run in a fresh VM (over `/v1/executions/ws`). Its files live in `crates/backend/web/`:
//! `static/` (page, style, icon) embedded as they are, `src/` (the script, with CodeMirror 6)
//! bundled by `build.rs`, which also makes `examples.json` from the catalogue's conformance
//! programs. Nothing is fetched from anywhere else: the Content-Security-Policy allows only this
//! server, and frames only from `[playground] frame_ancestors`.

use std::sync::{Arc, LazyLock};

use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use crate::api::error::ApiError;
use crate::api::AppState;

/// `[playground]`.
#[derive(Clone, Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PlaygroundConfig {
    /// Serve the page at `/` (off: `/` answers 404 like any unknown path).
    pub enabled: bool,
    /// Sites allowed to show the page in a frame (`https://course.example.org`); empty: none.
    pub frame_ancestors: Vec<String>,
}

impl PlaygroundConfig {
    /// Each entry must be one CSP source: a scheme and host, no spaces, quotes or separators.
    pub fn validate(&self) -> Result<(), String> {
        for a in &self.frame_ancestors {
            let ok = (a.starts_with("https://") || a.starts_with("http://"))
                && a.len() <= 253
                && a.bytes().all(|b| {
                    b.is_ascii_alphanumeric() || matches!(b, b':' | b'/' | b'.' | b'-' | b'*')
                });
            if !ok {
                return Err(format!(
                    "[playground] frame_ancestors: {a:?} is not a site (http:// or https:// and a host, optionally a port)"
                ));
            }
        }
        Ok(())
    }
}

/// One embedded file.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
    etag: LazyLock<String>,
}

macro_rules! asset {
    ($body:expr, $ty:expr) => {
        Asset {
            body: $body,
            content_type: $ty,
            etag: LazyLock::new(|| etag($body)),
        }
    };
}

fn etag(body: &[u8]) -> String {
    let d = sha2::Sha256::digest(body);
    format!(
        "\"{}\"",
        d.iter()
            .take(12)
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    )
}

/// The page: its nonce slot filled per answer, so not served through [`serve`].
static INDEX: Asset = asset!(
    include_bytes!("../../../web/static/index.html"),
    "text/html; charset=utf-8"
);
static STYLE: Asset = asset!(
    include_bytes!("../../../web/static/style.css"),
    "text/css; charset=utf-8"
);
static ICON: Asset = asset!(
    include_bytes!("../../../web/static/icon.svg"),
    "image/svg+xml"
);
static APP: Asset = asset!(
    include_bytes!(concat!(env!("OUT_DIR"), "/app.js")),
    "text/javascript; charset=utf-8"
);
static EXAMPLES: Asset = asset!(
    include_bytes!(concat!(env!("OUT_DIR"), "/examples.json")),
    "application/json"
);

/// The playground's routes (none when it is off).
pub fn routes(config: &PlaygroundConfig) -> Vec<(&'static str, MethodRouter<Arc<AppState>>)> {
    if !config.enabled {
        return Vec::new();
    }
    vec![("/", get(index)), ("/assets/:name", get(asset))]
}

/// Where `index.html` takes the nonce of its answer.
const NONCE_PLACEHOLDER: &str = "CSP-NONCE";

/// The page, with a nonce fresh per answer: CodeMirror puts its styles in a `<style>` element,
/// which the policy allows only with that nonce (never `'unsafe-inline'`). Not cached.
async fn index(State(state): State<Arc<AppState>>) -> Response {
    let mut b = [0u8; 18];
    if let Err(e) = crate::agent::fill_random(&mut b) {
        return ApiError::unavailable(format!("no random bytes for the page's nonce: {e}"))
            .into_response();
    }
    let nonce = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, b);
    let html = String::from_utf8_lossy(INDEX.body).replace(NONCE_PLACEHOLDER, &nonce);
    let mut resp = ([(header::CONTENT_TYPE, INDEX.content_type)], html).into_response();
    protect(resp.headers_mut(), &state.config.playground, Some(&nonce));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn asset(
    State(state): State<Arc<AppState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Response {
    let a = match name.as_str() {
        "app.js" => &APP,
        "style.css" => &STYLE,
        "icon.svg" => &ICON,
        "examples.json" => &EXAMPLES,
        _ => return ApiError::not_found().into_response(),
    };
    serve(a, &headers, &state.config.playground)
}

/// The Content-Security-Policy of every playground answer: this server only (and the page's
/// `<style>` elements that carry its nonce).
fn csp(config: &PlaygroundConfig, nonce: Option<&str>) -> String {
    let frames = if config.frame_ancestors.is_empty() {
        "'none'".to_string()
    } else {
        config.frame_ancestors.join(" ")
    };
    let styles = match nonce {
        Some(n) => format!("'self' 'nonce-{n}'"),
        None => "'self'".to_string(),
    };
    format!(
        "default-src 'none'; script-src 'self'; style-src {styles}; img-src 'self'; \
         connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors {frames}"
    )
}

/// The headers every playground answer carries.
fn protect(h: &mut HeaderMap, config: &PlaygroundConfig, nonce: Option<&str>) {
    if let Ok(v) = HeaderValue::from_str(&csp(config, nonce)) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if config.frame_ancestors.is_empty() {
        h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    }
}

fn serve(a: &Asset, headers: &HeaderMap, config: &PlaygroundConfig) -> Response {
    let etag = a.etag.as_str();
    let fresh = headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.split(',').any(|t| t.trim() == etag));
    let mut resp = if fresh {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, a.content_type)], a.body).into_response()
    };
    let h = resp.headers_mut();
    // Revalidated on every load (cheap: an ETag), so a new server's page is never mixed with
    // an old script.
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    if let Ok(v) = HeaderValue::from_str(etag) {
        h.insert(header::ETAG, v);
    }
    protect(h, config, None);
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_ancestors_are_sites_only() {
        let c = |a: &str| PlaygroundConfig {
            enabled: true,
            frame_ancestors: vec![a.to_string()],
        };
        assert!(c("https://course.example.org").validate().is_ok());
        assert!(c("http://127.0.0.1:8080").validate().is_ok());
        for bad in [
            "course.example.org",
            "https://a.org; script-src *",
            "'unsafe-inline'",
            "https://a.org\r\nX: y",
            "*",
        ] {
            assert!(c(bad).validate().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn the_policy_names_only_this_server() {
        let c = PlaygroundConfig {
            enabled: true,
            frame_ancestors: vec![],
        };
        assert!(csp(&c, Some("abc")).contains("style-src 'self' 'nonce-abc';"));
        let p = csp(&c, None);
        assert!(p.contains("default-src 'none'"));
        assert!(p.contains("frame-ancestors 'none'"));
        assert!(!p.contains("unsafe"), "{p}");
    }

    #[test]
    fn the_bundle_and_examples_are_embedded() {
        // build.rs made them: the script with the editor, an example per catalogue language.
        assert!(
            APP.body.len() > 100_000,
            "app.js is {} bytes",
            APP.body.len()
        );
        let ex: serde_json::Value = serde_json::from_slice(EXAMPLES.body).expect("examples");
        assert!(ex["python"]["code"]
            .as_str()
            .is_some_and(|c| c.contains("print")));
        assert_eq!(ex["python"]["stdin"], "21\n");
        assert_eq!(ex["sqlite3"]["args"], serde_json::json!([]));
        assert_ne!(etag(APP.body), etag(STYLE.body));
        let page = String::from_utf8_lossy(INDEX.body);
        assert_eq!(
            page.matches(NONCE_PLACEHOLDER).count(),
            1,
            "one nonce slot in index.html"
        );
    }
}
