//! Credentials and access tokens.
//!
//! A service account signs a JWT (RS256, with aws-lc-rs) and trades it at the file's
//! `token_uri` for an access token (scope `devstorage.read_write`); an authorized user trades
//! its refresh token. Tokens are cached until five minutes before they expire, one refresh at
//! a time. A refused credential (`invalid_grant`, 401, 403) is [`ErrorKind::Permission`].
//! Secrets are read when the backend is opened and never printed; a token is sent only to the
//! configured endpoint's origin.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use aws_lc_rs::signature::{RSA_PKCS1_SHA256, RsaKeyPair};
use base64::Engine as _;
use reqwest::header::CONTENT_TYPE;
use serde_json::{Value, json};

use super::GcsBackend;
use super::error::response_error;
use crate::{BackendError, ConfigError, ErrorKind};

/// Default token endpoint, for credential files that do not name one.
pub const TOKEN_URI: &str = "https://oauth2.googleapis.com/token";
/// The OAuth scope asked for: read and write objects, nothing else.
pub const SCOPE: &str = "https://www.googleapis.com/auth/devstorage.read_write";

/// Refresh a token this long before it expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(300);

/// How requests authenticate.
#[derive(Clone)]
pub enum GcsCredentials {
    /// No token (`anonymous=true`).
    Anonymous,
    /// A service account's key: JWTs signed with it are traded for tokens.
    ServiceAccount {
        file: PathBuf,
        client_email: String,
        private_key_id: Option<String>,
        key: Arc<RsaKeyPair>,
        token_uri: url::Url,
    },
    /// A user's refresh token (application-default credentials from `gcloud`).
    AuthorizedUser {
        file: PathBuf,
        client_id: String,
        client_secret: String,
        refresh_token: String,
        token_uri: url::Url,
    },
}

impl fmt::Debug for GcsCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GcsCredentials::Anonymous => f.write_str("Anonymous"),
            GcsCredentials::ServiceAccount {
                file, client_email, ..
            } => write!(
                f,
                "ServiceAccount({client_email:?} from {}, <key redacted>)",
                file.display()
            ),
            GcsCredentials::AuthorizedUser { file, .. } => {
                write!(f, "AuthorizedUser(from {}, <redacted>)", file.display())
            }
        }
    }
}

impl GcsCredentials {
    /// Read a service-account or authorized-user JSON file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let at = |m: String| format!("credentials file {}: {m}", path.display());
        let text = std::fs::read_to_string(path).map_err(|e| at(e.to_string()))?;
        let v: Value = serde_json::from_str(&text).map_err(|e| at(format!("not JSON: {e}")))?;
        let field = |name: &str| {
            v.get(name)
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| at(format!("no {name:?}")))
        };
        let token_uri = match v.get("token_uri").and_then(Value::as_str) {
            None | Some("") => TOKEN_URI.to_owned(),
            Some(u) => u.to_owned(),
        };
        let token_uri = url::Url::parse(&token_uri)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| at(format!("token_uri {token_uri:?} is not an http(s) URL")))?;
        match v.get("type").and_then(Value::as_str) {
            Some("service_account") => {
                let pem = field("private_key")?;
                let der = pem_pkcs8(&pem).ok_or_else(|| {
                    at("private_key is not a PEM \"PRIVATE KEY\" (PKCS#8)".to_owned())
                })?;
                let key = RsaKeyPair::from_pkcs8(&der)
                    .map_err(|e| at(format!("private_key is not an RSA key: {e}")))?;
                Ok(GcsCredentials::ServiceAccount {
                    file: path.to_owned(),
                    client_email: field("client_email")?,
                    private_key_id: field("private_key_id").ok(),
                    key: Arc::new(key),
                    token_uri,
                })
            }
            Some("authorized_user") => Ok(GcsCredentials::AuthorizedUser {
                file: path.to_owned(),
                client_id: field("client_id")?,
                client_secret: field("client_secret")?,
                refresh_token: field("refresh_token")?,
                token_uri,
            }),
            Some(other) => Err(at(format!(
                "credentials of type {other:?} are not supported \
                 (service_account and authorized_user are)"
            ))
            .into()),
            None => Err(at("no \"type\"".to_owned()).into()),
        }
    }

    /// Application-default credentials, from a file only (never the metadata server).
    pub(super) fn application_default() -> Result<Self, ConfigError> {
        if let Some(p) =
            std::env::var_os("GOOGLE_APPLICATION_CREDENTIALS").filter(|p| !p.is_empty())
        {
            return Self::from_file(Path::new(&p))
                .map_err(|e| format!("$GOOGLE_APPLICATION_CREDENTIALS: {e}").into());
        }
        let well_known = std::env::var_os("HOME")
            .map(PathBuf::from)
            .filter(|h| h.is_absolute())
            .map(|h| h.join(".config/gcloud/application_default_credentials.json"));
        match well_known {
            Some(p) if p.is_file() => Self::from_file(&p),
            _ => Err(
                "no credentials: give credentials=FILE (a service-account key), set \
                      GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth application-default \
                      login`, or give anonymous=true (public buckets, emulators); the metadata \
                      server is never asked"
                    .into(),
            ),
        }
    }
}

/// The DER inside a PEM `PRIVATE KEY` block.
fn pem_pkcs8(pem: &str) -> Option<Vec<u8>> {
    let start = pem.find("-----BEGIN PRIVATE KEY-----")? + "-----BEGIN PRIVATE KEY-----".len();
    let end = start + pem[start..].find("-----END PRIVATE KEY-----")?;
    let b64: String = pem[start..end]
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect();
    base64::engine::general_purpose::STANDARD.decode(b64).ok()
}

fn b64url(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

impl GcsBackend {
    /// A valid access token, fetched when needed; `None` when anonymous.
    pub(super) async fn access_token(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<Option<String>, BackendError> {
        if matches!(self.config.credentials, GcsCredentials::Anonymous) {
            return Ok(None);
        }
        let mut slot = self.token.lock().await;
        if let Some((t, expires)) = &*slot {
            if Instant::now() + TOKEN_MARGIN < *expires {
                return Ok(Some(t.clone()));
            }
        }
        let (token, ttl) = self.fetch_token(op, key).await?;
        *slot = Some((token.clone(), Instant::now() + ttl));
        Ok(Some(token))
    }

    /// Where to ask for a token, and the form to send there. (Not async: the serializer is
    /// not `Send`.)
    fn token_request(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<(url::Url, String), BackendError> {
        let mut form = url::form_urlencoded::Serializer::new(String::new());
        let token_uri = match &self.config.credentials {
            GcsCredentials::Anonymous => unreachable!("anonymous requests need no token"),
            GcsCredentials::ServiceAccount {
                client_email,
                private_key_id,
                key: rsa,
                token_uri,
                file,
            } => {
                let now = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_secs();
                let mut header = json!({"alg": "RS256", "typ": "JWT"});
                if let Some(kid) = private_key_id {
                    header["kid"] = json!(kid);
                }
                let claims = json!({
                    "iss": client_email,
                    "scope": SCOPE,
                    "aud": token_uri.as_str(),
                    "iat": now,
                    "exp": now + 3600,
                });
                let signed = format!(
                    "{}.{}",
                    b64url(header.to_string().as_bytes()),
                    b64url(claims.to_string().as_bytes())
                );
                let mut sig = vec![0; rsa.public_modulus_len()];
                rsa.sign(
                    &RSA_PKCS1_SHA256,
                    &aws_lc_rs::rand::SystemRandom::new(),
                    signed.as_bytes(),
                    &mut sig,
                )
                .map_err(|_| {
                    BackendError::new(
                        ErrorKind::Config,
                        op,
                        key,
                        format!("cannot sign with the key in {}", file.display()),
                    )
                })?;
                form.append_pair("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer");
                form.append_pair("assertion", &format!("{signed}.{}", b64url(&sig)));
                token_uri
            }
            GcsCredentials::AuthorizedUser {
                client_id,
                client_secret,
                refresh_token,
                token_uri,
                ..
            } => {
                form.append_pair("grant_type", "refresh_token");
                form.append_pair("client_id", client_id);
                form.append_pair("client_secret", client_secret);
                form.append_pair("refresh_token", refresh_token);
                token_uri
            }
        };
        Ok((token_uri.clone(), form.finish()))
    }

    async fn fetch_token(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<(String, Duration), BackendError> {
        let (token_uri, body) = self.token_request(op, key)?;
        let resp = self
            .client
            .post(token_uri.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| crate::transport_error(op, key, &e))?;
        let status = resp.status();
        if !status.is_success() {
            let mut e = response_error(op, key, resp).await;
            // The token endpoint says 400 for a refused grant (`invalid_grant`).
            if matches!(status.as_u16(), 400 | 401 | 403) {
                e.kind = ErrorKind::Permission;
            }
            e.message = format!("getting an access token from {token_uri}: {}", e.message);
            return Err(e);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| crate::transport_error(op, key, &e))?;
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let token = v
            .get("access_token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                BackendError::new(
                    ErrorKind::Other,
                    op,
                    key,
                    format!("{token_uri} answered without an access_token"),
                )
            })?;
        let ttl = v.get("expires_in").and_then(Value::as_u64).unwrap_or(3600);
        Ok((token.to_owned(), Duration::from_secs(ttl)))
    }

    /// The token goes only to the configured endpoint's origin.
    pub(super) fn same_origin(&self, u: &url::Url) -> bool {
        u.origin() == self.config.endpoint.origin()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_credential_files() {
        let dir = tempfile::tempdir().unwrap();
        let user = dir.path().join("adc.json");
        std::fs::write(
            &user,
            r#"{"type":"authorized_user","client_id":"id","client_secret":"s3cr3t","refresh_token":"r3fr3sh"}"#,
        )
        .unwrap();
        let c = GcsCredentials::from_file(&user).unwrap();
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("s3cr3t") && !shown.contains("r3fr3sh"),
            "{shown}"
        );
        let ext = dir.path().join("ext.json");
        std::fs::write(&ext, r#"{"type":"external_account"}"#).unwrap();
        assert!(
            GcsCredentials::from_file(&ext)
                .unwrap_err()
                .to_string()
                .contains("external_account")
        );
        let bad = dir.path().join("sa.json");
        std::fs::write(
            &bad,
            r#"{"type":"service_account","client_email":"a@b","private_key":"nope"}"#,
        )
        .unwrap();
        assert!(
            GcsCredentials::from_file(&bad)
                .unwrap_err()
                .to_string()
                .contains("PRIVATE KEY")
        );
    }
}
