//! HTTP error responses, classified into [`ErrorKind`]s.
//!
//! - 401 and 403 are [`ErrorKind::Permission`]; 404 [`ErrorKind::NotFound`]; 412
//!   [`ErrorKind::AlreadyExists`]; 408, 429 and 5xx, refused connections and timeouts
//!   [`ErrorKind::Transient`].
//! - **A missing bucket** is [`ErrorKind::Config`] (the address is wrong) where a 404 can only
//!   mean the bucket: uploads and listing, and any 404 whose message names the bucket (GCS
//!   itself says "The specified bucket does not exist."). Where GCS answers a bare 404 that
//!   could mean either (fake-gcs-server does for every object request), `get` is
//!   [`ErrorKind::NotFound`], `exists` is `false` and `delete` succeeds; the first upload
//!   reports the bucket.

use futures::StreamExt as _;
use reqwest::{Response, StatusCode};
use serde_json::Value;

use crate::{BackendError, ErrorKind};

fn status_kind(status: StatusCode) -> ErrorKind {
    match status.as_u16() {
        401 | 403 => ErrorKind::Permission,
        404 => ErrorKind::NotFound,
        412 => ErrorKind::AlreadyExists,
        408 | 425 | 429 | 500..=599 => ErrorKind::Transient,
        _ => ErrorKind::Other,
    }
}

/// What an error response says: its status and the message in its JSON body.
pub(super) async fn response_error(op: &'static str, key: &str, resp: Response) -> BackendError {
    let status = resp.status();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() > 16 << 10 {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    let json: Option<Value> = serde_json::from_slice(&body).ok();
    let message = json
        .as_ref()
        .and_then(|v| {
            let e = v.get("error")?;
            // GCS: {"error": {"message": ...}}; OAuth: {"error": "invalid_grant", ...}.
            e.get("message")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .or_else(|| {
                    let code = e.as_str()?;
                    Some(match v.get("error_description").and_then(Value::as_str) {
                        Some(d) => format!("{code}: {d}"),
                        None => code.to_owned(),
                    })
                })
        })
        .unwrap_or_else(|| text.trim().chars().take(300).collect());
    let text = if message.is_empty() || Some(message.as_str()) == status.canonical_reason() {
        status.to_string()
    } else {
        format!("{status}: {message}")
    };
    BackendError::new(status_kind(status), op, key, text)
}

/// A 404 whose message names the bucket means the bucket is missing: the address is wrong.
pub(super) fn bucket_missing(e: &BackendError) -> bool {
    let m = e.message.to_ascii_lowercase();
    e.kind == ErrorKind::NotFound && m.contains("bucket") && m.contains("not exist")
}

pub(super) fn missing_bucket_error(bucket: &str, mut e: BackendError) -> BackendError {
    e.kind = ErrorKind::Config;
    e.message = format!(
        "no bucket {bucket:?} ({}); create it, or correct the bucket name in the address",
        e.message
    );
    e
}
