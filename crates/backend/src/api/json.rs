//! JSON request bodies: size-capped, with errors that name the offending field.

use axum::body::Body;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use super::error::ApiError;
use super::AppState;

/// A JSON body decoded into `T`; 413 past the body cap, 400 naming the field otherwise.
pub struct ApiJson<T>(pub T);

/// Longest time a client may take to send a request body (slowloris: headers are bounded by
/// `serve`'s header timeout, the body by this).
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the whole body, at most `limit` bytes, within [`BODY_READ_TIMEOUT`].
pub async fn read_body(body: Body, limit: usize) -> Result<bytes::Bytes, ApiError> {
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, axum::body::to_bytes(body, limit));
    let Ok(read) = read.await else {
        return Err(ApiError::request_timeout(format!(
            "the request body was not received within {} s",
            BODY_READ_TIMEOUT.as_secs()
        )));
    };
    read.map_err(|e| {
        // `to_bytes` reports the cap as http-body-util's `LengthLimitError` somewhere in the
        // error's source chain.
        let too_big = std::iter::successors(Some(&e as &(dyn std::error::Error + 'static)), |e| {
            e.source()
        })
        .any(|e| e.is::<http_body_util::LengthLimitError>());
        if too_big {
            ApiError::too_large(
                None,
                format!("the request body is larger than {limit} bytes"),
            )
        } else {
            ApiError::bad_request(None, "the request body could not be read")
        }
    })
}

/// Decodes JSON, naming the field that failed.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = inner.to_string();
        // "missing field `x`" errors are reported at the parent; name the missing field.
        let field = match msg
            .strip_prefix("missing field `")
            .and_then(|r| r.split('`').next())
        {
            Some(missing) if path == "." => Some(missing.to_string()),
            Some(missing) => Some(format!("{path}.{missing}")),
            None if path == "." => None,
            None => Some(path),
        };
        let message = match &field {
            Some(f) if !msg.starts_with("missing field") => format!("{f}: {msg}"),
            _ => msg,
        };
        ApiError::bad_request(field, message)
    })?;
    // Nothing but whitespace may follow the JSON value.
    de.end()
        .map_err(|e| ApiError::bad_request(None, format!("after the JSON value: {e}")))?;
    Ok(value)
}

#[axum::async_trait]
impl<T: DeserializeOwned> FromRequest<std::sync::Arc<AppState>> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(
        req: Request,
        state: &std::sync::Arc<AppState>,
    ) -> Result<Self, ApiError> {
        let bytes = read_body(req.into_body(), state.body_limit()).await?;
        decode(&bytes).map(ApiJson)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct T {
        a: u64,
        b: Vec<Inner>,
    }
    #[derive(serde::Deserialize, Debug)]
    #[allow(dead_code)]
    struct Inner {
        c: String,
    }

    #[test]
    fn names_fields() {
        let e = decode::<T>(br#"{"a": -1, "b": []}"#).expect_err("negative");
        assert_eq!(e.field.as_deref(), Some("a"));
        let e = decode::<T>(br#"{"b": []}"#).expect_err("missing");
        assert_eq!(e.field.as_deref(), Some("a"));
        let e = decode::<T>(br#"{"a": 1, "b": [{"d": 1}]}"#).expect_err("missing nested");
        assert_eq!(e.field.as_deref(), Some("b[0].c"));
        let e = decode::<T>(br#"{"a": 1, "b": []} trailing"#).expect_err("trailing");
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
        let e = decode::<T>(b"{not json").expect_err("syntax");
        assert_eq!(e.status, axum::http::StatusCode::BAD_REQUEST);
    }
}
