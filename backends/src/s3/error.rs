//! object_store errors, classified into [`ErrorKind`]s and told in words for people.
//!
//! object_store's own kinds (not found, precondition, 401, 403) map directly. Everything else
//! arrives as `Error::Generic` wrapping crate-private types; the status code and S3 error code
//! are then read from the error's text (`non-2xx status code: 503`, `<Code>SlowDown</Code>`),
//! and transport failures from the public `HttpError` in its source chain. A missing bucket
//! (`NoSuchBucket`) is [`ErrorKind::Config`]: the address is wrong, retrying will not help.
//! `exists` cannot tell (a `HEAD` response has no body) and answers `false`; the first `get`,
//! `put`, `list` or `delete` reports it.
//!
//! # The message
//! object_store's text repeats its causes (`Generic S3 error: Error performing GET … - HTTP
//! error: error sending request: … Connection refused (os error 111)`) and says nothing of what
//! to do. The message here names what failed once, then what to try:
//! - the server could not be reached: the deepest cause (`Connection refused (os error 111)`)
//!   and the endpoint, then "is the server up, and is endpoint= right?";
//! - the server answered an S3 error: its code and message, then what that code means here:
//!   a missing bucket, an access key the server does not know, a secret key that does not
//!   match, a refusal by the bucket's policy — naming where the keys came from;
//! - no credentials: what the credential chain tried, once, then the ways to give keys.

use super::credentials::{CredentialsUnavailable, KeySource};
use crate::{BackendError, ErrorKind};

/// What a message needs to know of the backend: where it is, and where its keys came from.
#[derive(Debug, Clone)]
pub(super) struct ErrorContext {
    /// The bucket's server, as requests go to it (`http://127.0.0.1:8333`).
    pub(super) endpoint: String,
    /// Whether the address named the endpoint (else AWS S3 itself).
    pub(super) custom_endpoint: bool,
    pub(super) bucket: String,
    pub(super) region: String,
    /// Where the keys came from, for hints.
    pub(super) keys: KeySource,
}

pub(super) fn map_err(
    ctx: &ErrorContext,
    op: &'static str,
    key: &str,
    e: object_store::Error,
) -> BackendError {
    let kind = classify(&e);
    let message = describe(ctx, &e);
    BackendError {
        kind,
        op,
        key: key.to_owned(),
        message,
        source: None,
    }
}

/// The error and its causes on one line, each once: object_store's messages repeat their
/// source's text only sometimes.
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
    s.strip_prefix("Generic S3 error: ")
        .map(str::to_owned)
        .unwrap_or(s)
}

/// The message of a [`BackendError`] for `e`: see the module doc.
fn describe(ctx: &ErrorContext, e: &object_store::Error) -> String {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cur {
        if let Some(cu) = c.downcast_ref::<CredentialsUnavailable>() {
            return cu.message.clone();
        }
        if let Some(h) = c.downcast_ref::<object_store::client::HttpError>() {
            return transport_message(ctx, h, &error_text(e));
        }
        cur = c.source();
    }
    let text = error_text(e);
    if let Some(code) = xml_field(&text, "Code") {
        return s3_error_message(ctx, code, xml_field(&text, "Message"), status_in(&text));
    }
    match status_in(&text) {
        // A HEAD, or an error without a body.
        Some(s @ (401 | 403)) => format!(
            "the server refused the request ({}); check {} and {}, and that they may use \
             bucket {:?}",
            status_words(s),
            ctx.keys.key_id,
            ctx.keys.secret,
            ctx.bucket
        ),
        Some(s) => format!("the server answered {}", status_words(s)),
        None if text.contains("redirect without LOCATION") => format!(
            "the server redirected without saying where: bucket {:?} is not in region {:?}; \
             give the address its region=",
            ctx.bucket, ctx.region
        ),
        None => text,
    }
}

/// A request that got no answer: the deepest cause, once, and where it was going.
fn transport_message(
    ctx: &ErrorContext,
    h: &object_store::client::HttpError,
    whole: &str,
) -> String {
    use object_store::client::HttpErrorKind as H;
    let mut root = h.to_string();
    let mut cur = std::error::Error::source(h);
    while let Some(c) = cur {
        let t = c.to_string();
        if !t.trim().is_empty() {
            root = t;
        }
        cur = c.source();
    }
    let what = match h.kind() {
        H::Connect => format!("cannot connect to {}: {root}", ctx.endpoint),
        H::Timeout => format!("no answer from {} in time: {root}", ctx.endpoint),
        _ => format!("the connection to {} failed: {root}", ctx.endpoint),
    };
    let tries = retries_in(whole)
        .map(|n| format!(" (tried {} times)", n + 1))
        .unwrap_or_default();
    let hint = if ctx.custom_endpoint {
        "is the server up, and is the address's endpoint= right?"
    } else {
        "is the network up, and the address's region= right?"
    };
    format!("{what}{tries}; {hint}")
}

/// What an S3 error code means for this cache, and what to do about it.
fn s3_error_message(
    ctx: &ErrorContext,
    code: &str,
    message: Option<&str>,
    status: Option<u16>,
) -> String {
    let said = match message {
        Some(m) if !m.is_empty() => format!("{code}: {m}"),
        _ => code.to_owned(),
    };
    let keys = &ctx.keys;
    match code {
        "NoSuchBucket" => format!(
            "no bucket {:?} at {} ({said}); create it, or correct the bucket name in the \
             address",
            ctx.bucket, ctx.endpoint
        ),
        "InvalidAccessKeyId" => format!(
            "the server does not know the access key ID ({said}); check {}",
            keys.key_id
        ),
        "SignatureDoesNotMatch" => format!(
            "the server refused the request's signature ({said}): the secret key does not \
             belong to the access key ID; check {}",
            keys.secret
        ),
        "AccessDenied" | "AllAccessDisabled" | "AccountProblem" => format!(
            "the server refused access ({said}): the access key ID in {} may not use bucket \
             {:?}; check the bucket's policy and the user's permissions",
            keys.key_id, ctx.bucket
        ),
        "ExpiredToken" | "InvalidToken" | "TokenRefreshRequired" => format!(
            "the session token was refused ({said}); renew the credentials ({})",
            keys.key_id
        ),
        "RequestTimeTooSkewed" => {
            format!("the server refused the request ({said}); this machine's clock is wrong")
        }
        "PermanentRedirect"
        | "AuthorizationHeaderMalformed"
        | "IllegalLocationConstraintException" => {
            format!(
                "the server refused the region ({said}); give the address the bucket's \
                 region= (now {:?})",
                ctx.region
            )
        }
        _ => match status {
            Some(s) => format!("the server answered {} ({said})", status_words(s)),
            None => format!("the server answered {said}"),
        },
    }
}

/// `403 Forbidden`.
fn status_words(status: u16) -> String {
    match http_reason(status) {
        Some(r) => format!("{status} {r}"),
        None => status.to_string(),
    }
}

fn http_reason(status: u16) -> Option<&'static str> {
    Some(match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        409 => "Conflict",
        412 => "Precondition Failed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => return None,
    })
}

/// The text of `<NAME>...</NAME>` in an S3 error body.
fn xml_field<'a>(text: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = text.find(&open)? + open.len();
    let len = text[start..].find(&close)?;
    Some(text[start..start + len].trim())
}

/// The retries object_store made (`..., after 4 retries, ...`).
fn retries_in(text: &str) -> Option<u32> {
    let rest = text.split("after ").nth(1)?;
    let (n, tail) = rest.split_once(' ')?;
    tail.starts_with("retries")
        .then(|| n.parse().ok())
        .flatten()
}

/// S3 error codes (`<Code>...</Code>` in an error body) that say what to do.
fn s3_code_kind(text: &str) -> Option<ErrorKind> {
    Some(match xml_field(text, "Code")? {
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

    fn ctx() -> ErrorContext {
        ErrorContext {
            endpoint: "http://127.0.0.1:8333".into(),
            custom_endpoint: true,
            bucket: "b".into(),
            region: "us-east-1".into(),
            keys: KeySource {
                key_id: "AWS_ACCESS_KEY_ID".into(),
                secret: "AWS_SECRET_ACCESS_KEY".into(),
            },
        }
    }

    #[test]
    fn s3_errors_are_told_once_with_what_to_try() {
        let d = |m: &str| describe(&ctx(), &generic(m));
        assert_eq!(
            d(
                "Error performing PUT http://127.0.0.1:8333/b/k in 5ms - Server returned non-2xx \
               status code: 403 Forbidden: <Error><Code>AccessDenied</Code><Message>Access \
               Denied</Message></Error>"
            ),
            "the server refused access (AccessDenied: Access Denied): the access key ID in \
             AWS_ACCESS_KEY_ID may not use bucket \"b\"; check the bucket's policy and the \
             user's permissions"
        );
        // A HEAD's refusal has no body to tell why.
        assert_eq!(
            d(
                "Error performing HEAD http://127.0.0.1:8333/b/k in 5ms - Server returned non-2xx \
               status code: 403 Forbidden"
            ),
            "the server refused the request (403 Forbidden); check AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, and that they may use bucket \"b\""
        );
        assert_eq!(
            d(
                "Server returned non-2xx status code: 503 Service Unavailable: \
               <Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message>\
               </Error>"
            ),
            "the server answered 503 Service Unavailable (SlowDown: Please reduce your request \
             rate.)"
        );
        assert_eq!(
            retries_in("in 858ms, after 4 retries, max_retries: 4"),
            Some(4)
        );
        assert_eq!(retries_in("after a while"), None);
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
