//! Credentials and access tokens.
//!
//! A service account signs a JWT (RS256, with aws-lc-rs) and trades it at the file's
//! `token_uri` for an access token (scope `devstorage.read_write`); an authorized user trades
//! its refresh token. Only when the address asks for it (`metadata-server=true`), and no
//! credential file is found, the metadata server of a Compute Engine VM or a GKE pod gives
//! the token of the service account attached to it:
//! `GET http://metadata.google.internal/computeMetadata/v1/instance/service-accounts/default/token?scopes=…`
//! with `Metadata-Flavor: Google` (which it answers with too; `$GCE_METADATA_HOST` names
//! another host, as Google's own libraries read it). Tokens are cached until five minutes before they expire, one refresh at
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
/// The metadata server's host where `$GCE_METADATA_HOST` names none.
pub const METADATA_HOST: &str = "metadata.google.internal";
/// Where the metadata server gives the default service account's access token.
const METADATA_TOKEN_PATH: &str = "/computeMetadata/v1/instance/service-accounts/default/token";

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
    /// The service account of the VM or pod, from its metadata server (asked for only with
    /// `metadata-server=true`).
    MetadataServer {
        /// `http://metadata.google.internal`, or `http://$GCE_METADATA_HOST`.
        base: url::Url,
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
            GcsCredentials::MetadataServer { base } => write!(f, "MetadataServer({base})"),
        }
    }
}

impl GcsCredentials {
    /// Whose requests these are, for messages; `None` when anonymous.
    pub(super) fn who(&self) -> Option<String> {
        match self {
            GcsCredentials::Anonymous => None,
            GcsCredentials::ServiceAccount {
                file, client_email, ..
            } => Some(format!(
                "the service account {client_email} (from {})",
                file.display()
            )),
            GcsCredentials::AuthorizedUser { file, .. } => {
                Some(format!("the user of {}", file.display()))
            }
            GcsCredentials::MetadataServer { base } => Some(format!(
                "the service account the metadata server at {} gives (the VM's, or the GKE \
                 workload's)",
                base.as_str().trim_end_matches('/')
            )),
        }
    }

    /// The metadata server: `http://$GCE_METADATA_HOST`, else `http://metadata.google.internal`.
    pub fn metadata_server() -> Result<Self, ConfigError> {
        let host = std::env::var("GCE_METADATA_HOST")
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| METADATA_HOST.to_owned());
        let base = url::Url::parse(&format!("http://{host}"))
            .ok()
            .filter(|u| u.host_str().is_some() && matches!(u.path(), "" | "/"))
            .ok_or_else(|| format!("GCE_METADATA_HOST={host:?} is not a host name or host:port"))?;
        Ok(GcsCredentials::MetadataServer { base })
    }

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

    /// Application-default credentials: a file, else the metadata server if `metadata` (the
    /// address's `metadata-server=true`), else an error saying what to give.
    pub(super) fn application_default(metadata: bool) -> Result<Self, ConfigError> {
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
            _ if metadata => Self::metadata_server(),
            _ => Err(
                "no credentials: give credentials=FILE (a service-account key), set \
                      GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth application-default \
                      login`, give metadata-server=true on a Compute Engine VM or in GKE (the \
                      metadata server is asked only then), or give anonymous=true (public \
                      buckets, emulators)"
                    .into(),
            ),
        }
    }
}

/// The access token and its lifetime in a token response (`{"access_token":…,"expires_in":…}`).
fn token_from(
    op: &'static str,
    key: &str,
    body: &[u8],
    from: &str,
) -> Result<(String, Duration), BackendError> {
    let v: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let token = v
        .get("access_token")
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| {
            BackendError::new(
                ErrorKind::Other,
                op,
                key,
                format!("{from} answered without an access_token"),
            )
        })?;
    let ttl = v.get("expires_in").and_then(Value::as_u64).unwrap_or(3600);
    Ok((token.to_owned(), Duration::from_secs(ttl)))
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
            GcsCredentials::Anonymous | GcsCredentials::MetadataServer { .. } => {
                unreachable!("no token request to sign: anonymous, or asked with a GET")
            }
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

    /// A token from the metadata server: one GET, no secret of ours involved.
    async fn metadata_token(
        &self,
        base: &url::Url,
        op: &'static str,
        key: &str,
    ) -> Result<(String, Duration), BackendError> {
        let mut u = base.clone();
        u.set_path(METADATA_TOKEN_PATH);
        u.query_pairs_mut().append_pair("scopes", SCOPE);
        let server = base.as_str().trim_end_matches('/');
        let elsewhere = "is this a Compute Engine VM or a GKE pod (with Workload Identity)? \
                         Elsewhere give credentials=FILE";
        let resp = self
            .client
            .get(u.clone())
            .header("Metadata-Flavor", "Google")
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| {
                let mut e = crate::transport_error(op, key, &e);
                e.message = format!(
                    "getting an access token from the metadata server: {}; {elsewhere}",
                    e.message
                );
                e
            })?;
        let flavor = resp
            .headers()
            .get("Metadata-Flavor")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let status = resp.status();
        if !status.is_success() {
            let mut e = response_error(op, key, resp).await;
            if matches!(status.as_u16(), 401 | 403 | 404) {
                e.kind = ErrorKind::Permission;
            }
            e.message = format!(
                "the metadata server at {server} gave no access token ({}); is a service \
                 account attached to this VM, or to this GKE workload?",
                e.message
            );
            return Err(e);
        }
        if flavor.as_deref() != Some("Google") {
            return Err(BackendError::new(
                ErrorKind::Config,
                op,
                key,
                format!(
                    "{server} answered without \"Metadata-Flavor: Google\", so it is not a \
                     metadata server; {elsewhere}"
                ),
            ));
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| crate::transport_error(op, key, &e))?;
        token_from(op, key, &body, server)
    }

    async fn fetch_token(
        &self,
        op: &'static str,
        key: &str,
    ) -> Result<(String, Duration), BackendError> {
        if let GcsCredentials::MetadataServer { base } = &self.config.credentials {
            return self.metadata_token(base, op, key).await;
        }
        let (token_uri, body) = self.token_request(op, key)?;
        let resp = self
            .client
            .post(token_uri.clone())
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await
            .map_err(|e| {
                let mut e = crate::transport_error(op, key, &e);
                e.message = format!(
                    "getting an access token: {}; is {token_uri} right (token_uri of the \
                     credentials file)?",
                    e.message
                );
                e
            })?;
        let status = resp.status();
        if !status.is_success() {
            let mut e = response_error(op, key, resp).await;
            // The token endpoint says 400 for a refused grant (`invalid_grant`).
            if matches!(status.as_u16(), 400 | 401 | 403) {
                e.kind = ErrorKind::Permission;
            }
            let who = self.config.credentials.who().unwrap_or_default();
            e.message = format!(
                "{token_uri} refused the credentials ({}); check {who}: its key may have been \
                 deleted or disabled",
                e.message
            );
            return Err(e);
        }
        let body = resp
            .bytes()
            .await
            .map_err(|e| crate::transport_error(op, key, &e))?;
        token_from(op, key, &body, token_uri.as_str())
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
