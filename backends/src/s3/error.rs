//! object_store errors, classified into [`ErrorKind`]s.
//!
//! object_store's own kinds (not found, precondition, 401, 403) map directly. Everything else
//! arrives as `Error::Generic` wrapping crate-private types; the status code and S3 error code
//! are then read from the error's text (`non-2xx status code: 503`, `<Code>SlowDown</Code>`),
//! and transport failures from the public `HttpError` in its source chain. A missing bucket
//! (`NoSuchBucket`) is [`ErrorKind::Config`]: the address is wrong, retrying will not help.
//! `exists` cannot tell (a `HEAD` response has no body) and answers `false`; the first `get`,
//! `put`, `list` or `delete` reports it.

use super::credentials::CredentialsUnavailable;
use crate::{BackendError, ErrorKind};

pub(super) fn map_err(op: &'static str, key: &str, e: object_store::Error) -> BackendError {
    let kind = classify(&e);
    let message = error_text(&e);
    BackendError {
        kind,
        op,
        key: key.to_owned(),
        message,
        source: None,
    }
}

/// The error and its causes on one line; object_store's messages repeat their source's text
/// only sometimes.
pub(super) fn error_text(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}

/// S3 error codes (`<Code>...</Code>` in an error body) that say what to do.
fn s3_code_kind(text: &str) -> Option<ErrorKind> {
    let code = text
        .split("<Code>")
        .nth(1)
        .and_then(|r| r.split("</Code>").next())?;
    Some(match code {
        "NoSuchBucket"
        | "InvalidBucketName"
        | "AuthorizationHeaderMalformed"
        | "PermanentRedirect"
        | "IllegalLocationConstraintException" => ErrorKind::Config,
        "AccessDenied"
        | "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "ExpiredToken"
        | "InvalidToken"
        | "TokenRefreshRequired"
        | "AllAccessDisabled"
        | "RequestTimeTooSkewed"
        | "AccountProblem" => ErrorKind::Permission,
        "SlowDown"
        | "InternalError"
        | "ServiceUnavailable"
        | "RequestTimeout"
        | "OperationAborted"
        | "ConditionalRequestConflict"
        | "Throttling" => ErrorKind::Transient,
        "NoSuchKey" => ErrorKind::NotFound,
        "PreconditionFailed" => ErrorKind::AlreadyExists,
        _ => return None,
    })
}

/// The HTTP status in object_store's retry error text (`non-2xx status code: 503 ...`).
fn status_in(text: &str) -> Option<u16> {
    let rest = text.split("status code: ").nth(1)?;
    rest.get(..3)?.parse().ok()
}

fn classify(e: &object_store::Error) -> ErrorKind {
    use object_store::Error as E;
    let text = error_text(e);
    let code = s3_code_kind(&text);
    match e {
        // A missing bucket is a wrong address, whatever the operation.
        _ if code == Some(ErrorKind::Config) => ErrorKind::Config,
        E::NotFound { .. } => ErrorKind::NotFound,
        // object_store maps 409 to AlreadyExists, but S3's 409s on a PUT are "a conflicting
        // operation is in progress": try again.
        E::AlreadyExists { .. } if code == Some(ErrorKind::Transient) => ErrorKind::Transient,
        E::AlreadyExists { .. } | E::Precondition { .. } | E::NotModified { .. } => {
            ErrorKind::AlreadyExists
        }
        E::PermissionDenied { .. } | E::Unauthenticated { .. } => ErrorKind::Permission,
        E::InvalidPath { .. } | E::UnknownConfigurationKey { .. } => ErrorKind::Config,
        E::NotSupported { .. } | E::NotImplemented { .. } => ErrorKind::Other,
        _ => classify_generic(e, &text, code),
    }
}

fn classify_generic(e: &object_store::Error, text: &str, code: Option<ErrorKind>) -> ErrorKind {
    use object_store::client::HttpErrorKind as H;
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(cu) = c.downcast_ref::<CredentialsUnavailable>() {
            return cu.kind;
        }
        if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
            return match h.kind() {
                H::Connect | H::Request | H::Timeout | H::Interrupted | H::Decode => {
                    ErrorKind::Transient
                }
                _ => ErrorKind::Other,
            };
        }
        cur = c.source();
    }
    if let Some(k) = code {
        return k;
    }
    match status_in(text) {
        Some(404) => ErrorKind::NotFound,
        Some(401 | 403) => ErrorKind::Permission,
        Some(412) => ErrorKind::AlreadyExists,
        Some(408 | 429) => ErrorKind::Transient,
        Some(s) if s >= 500 => ErrorKind::Transient,
        Some(_) => ErrorKind::Other,
        // A 200 whose body holds an error, after the retries ran out.
        None if text.contains("Server returned error response") => ErrorKind::Transient,
        // Bare redirects mean a wrong region.
        None if text.contains("redirect without LOCATION") => ErrorKind::Config,
        None => ErrorKind::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn generic(msg: &str) -> object_store::Error {
        object_store::Error::Generic {
            store: "S3",
            source: msg.to_owned().into(),
        }
    }

    #[test]
    fn classifies_errors_hidden_in_generic_ones() {
        let c = |m: &str| classify(&generic(m));
        assert_eq!(
            c(
                "Error performing list request: Server returned non-2xx status code: 503 Service Unavailable: "
            ),
            ErrorKind::Transient
        );
        assert_eq!(
            c(
                "Server returned non-2xx status code: 403 Forbidden: <Error><Code>SignatureDoesNotMatch</Code></Error>"
            ),
            ErrorKind::Permission
        );
        assert_eq!(
            c(
                "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>"
            ),
            ErrorKind::Config
        );
        assert_eq!(
            c("Server returned non-2xx status code: 429 Too Many Requests"),
            ErrorKind::Transient
        );
        assert_eq!(
            c("Server returned error response: <Error><Code>SlowDown</Code></Error>"),
            ErrorKind::Transient
        );
        assert_eq!(c("something else entirely"), ErrorKind::Other);
        let not_found = object_store::Error::NotFound {
            path: "x".into(),
            source: "Server returned non-2xx status code: 404 Not Found: <Error><Code>NoSuchBucket</Code></Error>".into(),
        };
        assert_eq!(classify(&not_found), ErrorKind::Config);
        let conflict = object_store::Error::AlreadyExists {
            path: "x".into(),
            source: "409 Conflict: <Error><Code>ConditionalRequestConflict</Code></Error>".into(),
        };
        assert_eq!(classify(&conflict), ErrorKind::Transient);
        let cred = object_store::Error::Generic {
            store: "S3",
            source: Box::new(CredentialsUnavailable {
                kind: ErrorKind::Config,
                message: "none".into(),
            }),
        };
        assert_eq!(classify(&cred), ErrorKind::Config);
    }
}
