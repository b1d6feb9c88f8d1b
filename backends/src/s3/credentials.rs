//! Where the S3 keys come from. Decided once, when the backend is opened, and never printed:
//! 1. [`S3Credentials::Static`]: keys given by the caller (tests, a config file).
//! 2. [`S3Credentials::Environment`] (what `open` uses):
//!    - with `profile=NAME`: that profile only, through aws-config, as Nix does;
//!    - else, if `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY` (and optionally
//!      `AWS_SESSION_TOKEN`) are set, those keys, used directly: no credential chain is built,
//!      so nothing ever asks the instance metadata service;
//!    - else the full AWS default chain through aws-config (environment, profile files, SSO,
//!      web identity, ECS, EC2 instance metadata), which honours `AWS_EC2_METADATA_DISABLED`.
//!
//! aws-config credentials are plugged into object_store through its `CredentialProvider`
//! trait and cached until five minutes before they expire; one refresh at a time.
//! aws-config is behind the `s3-aws-config` cargo feature (on by default): without it, only
//! explicit keys work and the others are a [`ErrorKind::Config`] error.

use std::fmt;
use std::sync::Arc;

use object_store::StaticCredentialProvider;
use object_store::aws::{AwsCredential, AwsCredentialProvider};
use tracing::debug;

use super::S3Config;
use crate::{ConfigError, ErrorKind};

/// Where the keys come from; see the module doc.
#[derive(Clone)]
pub enum S3Credentials {
    /// These keys, always.
    Static {
        key_id: String,
        secret_key: String,
        token: Option<String>,
    },
    /// `profile=`, else keys from the environment, else the AWS default chain.
    Environment,
}

impl fmt::Debug for S3Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            S3Credentials::Static { key_id, token, .. } => f
                .debug_struct("Static")
                .field("key_id", key_id)
                .field("secret_key", &"<redacted>")
                .field("token", &token.as_ref().map(|_| "<redacted>"))
                .finish(),
            S3Credentials::Environment => f.write_str("Environment"),
        }
    }
}

impl S3Credentials {
    /// Keys from `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` and `AWS_SESSION_TOKEN`, if the
    /// first two are set; an error if only one is.
    fn from_env_vars() -> Result<Option<Self>, ConfigError> {
        let var = |n: &str| std::env::var(n).ok().filter(|v| !v.is_empty());
        match (var("AWS_ACCESS_KEY_ID"), var("AWS_SECRET_ACCESS_KEY")) {
            (Some(key_id), Some(secret_key)) => Ok(Some(S3Credentials::Static {
                key_id,
                secret_key,
                token: var("AWS_SESSION_TOKEN"),
            })),
            (None, None) => Ok(None),
            (Some(_), None) => {
                Err("AWS_ACCESS_KEY_ID is set but AWS_SECRET_ACCESS_KEY is not".into())
            }
            (None, Some(_)) => {
                Err("AWS_SECRET_ACCESS_KEY is set but AWS_ACCESS_KEY_ID is not".into())
            }
        }
    }

    /// The provider, and where its keys come from, in words for error messages (never the
    /// keys themselves).
    pub(super) async fn provider(
        &self,
        config: &S3Config,
    ) -> Result<(AwsCredentialProvider, KeySource), ConfigError> {
        match self {
            S3Credentials::Static {
                key_id,
                secret_key,
                token,
            } => Ok((
                Arc::new(StaticCredentialProvider::new(AwsCredential {
                    key_id: key_id.clone(),
                    secret_key: secret_key.clone(),
                    token: token.clone(),
                })),
                KeySource {
                    key_id: format!("the access key ID given ({key_id:?})"),
                    secret: "the secret key given".to_owned(),
                },
            )),
            S3Credentials::Environment => {
                if config.profile.is_none() {
                    if let Some(keys) = Self::from_env_vars()? {
                        debug!("S3 credentials: keys from the environment");
                        let (p, _) = Box::pin(keys.provider(config)).await?;
                        return Ok((
                            p,
                            KeySource {
                                key_id: "AWS_ACCESS_KEY_ID".to_owned(),
                                secret: "AWS_SECRET_ACCESS_KEY".to_owned(),
                            },
                        ));
                    }
                }
                chain_provider(config).await
            }
        }
    }
}

/// Where the keys came from, for error messages: what to check when one is refused.
#[derive(Debug, Clone)]
pub(super) struct KeySource {
    /// `AWS_ACCESS_KEY_ID`, `aws_access_key_id of profile "p" (FILES)`, ...
    pub(super) key_id: String,
    pub(super) secret: String,
}

/// The profile files aws-config reads, as a person would find them.
pub(super) fn profile_files() -> String {
    let file = |var: &str, default: &str| match std::env::var(var) {
        Ok(v) if !v.is_empty() => format!("{v} (${var})"),
        _ => default.to_owned(),
    };
    format!(
        "{} and {}",
        file("AWS_SHARED_CREDENTIALS_FILE", "~/.aws/credentials"),
        file("AWS_CONFIG_FILE", "~/.aws/config")
    )
}

/// What to do when no keys were found.
pub(super) fn how_to_give_keys() -> String {
    format!(
        "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give the address profile=NAME \
         (or set AWS_PROFILE) for a profile of {}",
        profile_files()
    )
}

#[cfg(feature = "s3-aws-config")]
async fn chain_provider(
    config: &S3Config,
) -> Result<(AwsCredentialProvider, KeySource), ConfigError> {
    let p = chain::AwsConfigProvider::new(config).await;
    let source = match &config.profile {
        Some(name) => KeySource {
            key_id: format!(
                "aws_access_key_id of profile {name:?} in {}",
                profile_files()
            ),
            secret: format!(
                "aws_secret_access_key of profile {name:?} in {}",
                profile_files()
            ),
        },
        None => KeySource {
            key_id: format!("the access key ID that {} found", p.what),
            secret: format!("the secret key that {} found", p.what),
        },
    };
    Ok((Arc::new(p), source))
}

#[cfg(not(feature = "s3-aws-config"))]
async fn chain_provider(
    config: &S3Config,
) -> Result<(AwsCredentialProvider, KeySource), ConfigError> {
    Err(ConfigError::from(match &config.profile {
        Some(p) => format!(
            "profile={p} needs the AWS credential chain, which this build lacks \
             (cargo feature \"s3-aws-config\")"
        ),
        None => "no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY \
                 (this build lacks the AWS credential chain, cargo feature \"s3-aws-config\")"
            .into(),
    }))
}

/// Credentials from aws-config, cached until shortly before they expire.
#[cfg(feature = "s3-aws-config")]
mod chain {
    use std::sync::Arc;
    use std::time::{Duration, SystemTime};

    use aws_credential_types::provider::error::CredentialsError;
    use aws_credential_types::provider::{ProvideCredentials as _, SharedCredentialsProvider};
    use object_store::aws::AwsCredential;
    use tracing::debug;

    use super::{CredentialsUnavailable, S3Config};
    use crate::ErrorKind;

    /// Refresh credentials this long before they expire.
    const REFRESH_MARGIN: Duration = Duration::from_secs(5 * 60);

    pub(super) struct AwsConfigProvider {
        inner: SharedCredentialsProvider,
        /// Where the keys come from, for messages: `profile "p" of FILES`.
        pub(super) what: String,
        profile: Option<String>,
        /// Held while fetching, so that concurrent requests wait for one refresh.
        cache: tokio::sync::Mutex<Option<(Arc<AwsCredential>, Option<SystemTime>)>>,
    }

    impl std::fmt::Debug for AwsConfigProvider {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.debug_struct("AwsConfigProvider")
                .field("source", &self.what)
                .finish_non_exhaustive()
        }
    }

    impl AwsConfigProvider {
        pub(super) async fn new(config: &S3Config) -> Self {
            let (inner, what) = match &config.profile {
                Some(p) => {
                    debug!(profile = %p, "S3 credentials: AWS profile");
                    let provider = aws_config::profile::ProfileFileCredentialsProvider::builder()
                        .profile_name(p)
                        .build();
                    (
                        SharedCredentialsProvider::new(provider),
                        format!("profile {p:?} of {}", super::profile_files()),
                    )
                }
                None => {
                    debug!("S3 credentials: AWS default chain");
                    let chain = aws_config::default_provider::credentials::DefaultCredentialsChain::builder()
                        .region(aws_config::Region::new(config.region.clone()))
                        .build()
                        .await;
                    let what = match std::env::var("AWS_PROFILE") {
                        Ok(p) if !p.is_empty() => format!(
                            "the AWS default credential chain, with AWS_PROFILE={p:?} of {}",
                            super::profile_files()
                        ),
                        _ => "the AWS default credential chain".to_owned(),
                    };
                    (SharedCredentialsProvider::new(chain), what)
                }
            };
            Self {
                inner,
                what,
                profile: config.profile.clone(),
                cache: tokio::sync::Mutex::new(None),
            }
        }

        /// Why no keys came, once, and what to do.
        fn unavailable(&self, e: &CredentialsError) -> String {
            let text = aws_error_text(e);
            match &self.profile {
                Some(p) => {
                    let said = text
                        .trim_end()
                        .trim_start_matches("the credential provider was not enabled")
                        .trim_start_matches(": ");
                    let files = super::profile_files();
                    let add = format!(
                        "a [{p}] section in the credentials file, or [profile {p}] in the \
                         config file, with aws_access_key_id and aws_secret_access_key"
                    );
                    // aws-config: "profile `p` was not defined: ..." (or nothing at all where
                    // the files are missing).
                    if said.is_empty() || said.contains("was not defined") {
                        format!(
                            "no AWS profile {p:?} in {files}; add {add}, or correct profile= in \
                             the address"
                        )
                    } else {
                        format!(
                            "no AWS credentials from profile {p:?} ({said}); {files} should \
                             have {add}"
                        )
                    }
                }
                None => {
                    let tried = tried_providers(&text)
                        .map(|t| format!(": the AWS default credential chain tried {t}"))
                        .unwrap_or_else(|| format!(": {}", text.trim_end()));
                    format!("no AWS credentials{tried}; {}", super::how_to_give_keys())
                }
            }
        }
    }

    /// The providers the default chain names in its "Attempted:" list, each with why it gave
    /// nothing where that says more than "not enabled": `Environment, Profile, ... and
    /// Ec2InstanceMetadata (IMDS disabled by AWS_EC2_METADATA_DISABLED ...)`.
    fn tried_providers(text: &str) -> Option<String> {
        let list = text.split_once("Attempted:")?.1;
        let names: Vec<String> = list
            .lines()
            .filter_map(|l| {
                let (name, why) = l.trim().split_once(": ")?;
                let why = why
                    .trim_start_matches("the credential provider was not enabled")
                    .trim_start_matches(": ")
                    .trim();
                let boring =
                    why.is_empty() || why.contains("not set") || why.contains("not configured");
                Some(if boring {
                    name.to_owned()
                } else {
                    format!("{name} ({why})")
                })
            })
            .collect();
        match names.as_slice() {
            [] => None,
            [one] => Some(one.clone()),
            [rest @ .., last] => Some(format!("{} and {last}", rest.join(", "))),
        }
    }

    #[async_trait::async_trait]
    impl object_store::CredentialProvider for AwsConfigProvider {
        type Credential = AwsCredential;

        async fn get_credential(&self) -> object_store::Result<Arc<AwsCredential>> {
            let mut cache = self.cache.lock().await;
            if let Some((cred, expiry)) = cache.as_ref() {
                let fresh = expiry.is_none_or(|e| e > SystemTime::now() + REFRESH_MARGIN);
                if fresh {
                    return Ok(cred.clone());
                }
            }
            let creds = self.inner.provide_credentials().await.map_err(|e| {
                let kind = match &e {
                    CredentialsError::ProviderTimedOut(_) => ErrorKind::Transient,
                    CredentialsError::CredentialsNotLoaded(_)
                    | CredentialsError::InvalidConfiguration(_) => ErrorKind::Config,
                    CredentialsError::ProviderError(_) => ErrorKind::Permission,
                    _ => ErrorKind::Other,
                };
                object_store::Error::Generic {
                    store: "S3",
                    source: Box::new(CredentialsUnavailable {
                        kind,
                        message: self.unavailable(&e),
                    }),
                }
            })?;
            let cred = Arc::new(AwsCredential {
                key_id: creds.access_key_id().to_owned(),
                secret_key: creds.secret_access_key().to_owned(),
                token: creds.session_token().map(str::to_owned),
            });
            *cache = Some((cred.clone(), creds.expiry()));
            Ok(cred)
        }
    }

    /// The error and its causes on one line (aws-config's Display shows only the outermost).
    fn aws_error_text(e: &(dyn std::error::Error + 'static)) -> String {
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

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_chain_s_attempts_are_named_once() {
            let text = "the credential provider was not enabled: no credentials found in \
                chain. Attempted:\n  Environment: the credential provider was not enabled: \
                environment variable not set\n  Profile: the credential provider was not \
                enabled\n  WebIdentityToken: the credential provider was not enabled: \
                $AWS_WEB_IDENTITY_TOKEN_FILE was not set\n  EcsContainer: the credential \
                provider was not enabled: ECS provider not configured\n  Ec2InstanceMetadata: \
                the credential provider was not enabled: IMDS disabled by \
                AWS_EC2_METADATA_DISABLED env var set to `true`\n";
            assert_eq!(
                super::tried_providers(text).as_deref(),
                Some(
                    "Environment, Profile, WebIdentityToken, EcsContainer and \
                     Ec2InstanceMetadata (IMDS disabled by AWS_EC2_METADATA_DISABLED env var set \
                     to `true`)"
                )
            );
            assert_eq!(super::tried_providers("something else"), None);
        }
    }
}

/// A credential provider failed; carries its own classification.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub(super) struct CredentialsUnavailable {
    pub(super) kind: ErrorKind,
    pub(super) message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_never_shows_secrets() {
        let c = S3Credentials::Static {
            key_id: "AKIDEXAMPLE".into(),
            secret_key: "very-secret".into(),
            token: Some("session-secret".into()),
        };
        let d = format!("{c:?}");
        assert!(
            d.contains("AKIDEXAMPLE")
                && !d.contains("very-secret")
                && !d.contains("session-secret"),
            "{d}"
        );
    }
}
