//! Who is who: the server proves itself with its host key, the client with an SSH key.
//!
//! A host key that is not in the known-hosts file, or that differs from the one there, fails
//! the connection with [`ErrorKind::Permission`]: like wrong credentials, it will not succeed
//! until someone changes something (adds the key, or finds out why it changed), and the
//! message says which of the two happened. Keys are offered in the order the address says
//! (`identity=`, else the ssh-agent's, then the default key files); a key refused by the
//! server is [`ErrorKind::Permission`], having no key to offer [`ErrorKind::Config`]. Private
//! keys never appear in `Debug`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use russh::client;
use russh::keys::{HashAlg, PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate};

use super::SftpConfig;
use super::error::ssh_error;
use crate::{BackendError, ConfigError, ErrorKind};

/// How the server's host key is checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKeyCheck {
    /// It must be listed, for this host and port, in this OpenSSH known-hosts file.
    KnownHosts(PathBuf),
    /// No check (`insecure-accept-any-host-key=true`).
    AcceptAny,
}

/// Where the SSH keys come from.
#[derive(Clone, Default)]
pub struct SftpAuth {
    /// `identity=FILE`, loaded when the address is parsed; the only key tried when set.
    pub identity: Option<(PathBuf, Arc<PrivateKey>)>,
    /// The ssh-agent socket (`$SSH_AUTH_SOCK`), tried when there is no `identity`.
    pub agent: Option<PathBuf>,
    /// Key files tried after the agent when there is no `identity` (those that exist).
    pub default_keys: Vec<PathBuf>,
}

impl fmt::Debug for SftpAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SftpAuth")
            .field("identity", &self.identity.as_ref().map(|(p, _)| p))
            .field("agent", &self.agent)
            .field("default_keys", &self.default_keys)
            .finish()
    }
}

pub(super) fn load_key(path: &str) -> Result<PrivateKey, ConfigError> {
    russh::keys::load_secret_key(path, None).map_err(|e| {
        ConfigError::from(match e {
            russh::keys::Error::KeyIsEncrypted => format!(
                "identity={path}: the key is protected by a passphrase; load it into ssh-agent \
             and leave out identity="
            ),
            e => format!("identity={path}: {e}"),
        })
    })
}

/// The client side of one connection: checks the host key and remembers why it refused one.
pub(super) struct Client {
    pub(super) check: HostKeyCheck,
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) name: String,
    pub(super) refusal: Arc<std::sync::Mutex<Option<String>>>,
}

impl Client {
    fn refuse(&self, why: String) -> bool {
        *self.refusal.lock().unwrap_or_else(|e| e.into_inner()) = Some(why);
        false
    }
}

impl client::Handler for Client {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let path = match &self.check {
            HostKeyCheck::AcceptAny => return Ok(true),
            HostKeyCheck::KnownHosts(p) => p.clone(),
        };
        // A host certificate is checked as its plain key (no `@cert-authority` support).
        let key = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => key.clone(),
            PublicKeyOrCertificate::Certificate(c) => PublicKey::new(c.public_key().clone(), ""),
        };
        let fingerprint = key.fingerprint(HashAlg::Sha256);
        Ok(
            match russh::keys::check_known_hosts_path(&self.host, self.port, &key, &path) {
                Ok(true) => true,
                Ok(false) => self.refuse(format!(
                    "the host key of {} ({} {fingerprint}) is not in {}: add it (for example \
                     with `ssh-keyscan -p {} {}`) after checking it",
                    self.name,
                    key.algorithm(),
                    path.display(),
                    self.port,
                    self.host,
                )),
                Err(russh::keys::Error::KeyChanged { line }) => self.refuse(format!(
                    "the host key of {} ({} {fingerprint}) DIFFERS from the one in {} line \
                     {line}: someone may be impersonating the server, or its key was changed",
                    self.name,
                    key.algorithm(),
                    path.display(),
                )),
                Err(e) => self.refuse(format!(
                    "cannot check the host key of {} against {}: {e}",
                    self.name,
                    path.display()
                )),
            },
        )
    }
}

pub(super) async fn authenticate(
    handle: &mut client::Handle<Client>,
    config: &SftpConfig,
) -> Result<(), BackendError> {
    let user = config.user.as_str();
    let at = format!("{}@{}", user, config.known_hosts_name());
    let fail = |e| ssh_error("authenticate", "", e);
    let rsa_hash = handle
        .best_supported_rsa_hash()
        .await
        .map_err(fail)?
        .flatten();
    let mut tried: Vec<String> = Vec::new();

    if let Some((path, key)) = &config.auth.identity {
        let r = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(key.clone(), rsa_hash))
            .await
            .map_err(fail)?;
        if r.success() {
            return Ok(());
        }
        return Err(BackendError::new(
            ErrorKind::Permission,
            "authenticate",
            "",
            format!("{at}: the server refused the key {}", path.display()),
        ));
    }

    if let Some(sock) = &config.auth.agent {
        match russh::keys::agent::client::AgentClient::connect_uds(sock).await {
            Err(e) => tracing::debug!("ssh-agent at {}: {e}", sock.display()),
            Ok(mut agent) => match agent.request_identities().await {
                Err(e) => tracing::debug!("ssh-agent at {}: {e}", sock.display()),
                Ok(ids) => {
                    for id in ids {
                        let key = id.public_key().into_owned();
                        let what = format!("ssh-agent key {}", key.fingerprint(HashAlg::Sha256));
                        match handle
                            .authenticate_publickey_with(user, key, rsa_hash, &mut agent)
                            .await
                        {
                            Ok(r) if r.success() => return Ok(()),
                            Ok(_) => tried.push(what),
                            Err(e) => tried.push(format!("{what} ({e})")),
                        }
                        if handle.is_closed() {
                            break;
                        }
                    }
                }
            },
        }
    }

    for path in &config.auth.default_keys {
        let Ok(key) = russh::keys::load_secret_key(path, None) else {
            continue;
        };
        let r = handle
            .authenticate_publickey(user, PrivateKeyWithHashAlg::new(Arc::new(key), rsa_hash))
            .await
            .map_err(fail)?;
        if r.success() {
            return Ok(());
        }
        tried.push(path.display().to_string());
    }

    if tried.is_empty() {
        return Err(BackendError::new(
            ErrorKind::Config,
            "authenticate",
            "",
            format!(
                "{at}: no SSH key to offer: give identity=FILE, or start ssh-agent \
                 (SSH_AUTH_SOCK) with a key"
            ),
        ));
    }
    Err(BackendError::new(
        ErrorKind::Permission,
        "authenticate",
        "",
        format!("{at}: the server refused every key: {}", tried.join(", ")),
    ))
}

#[cfg(test)]
mod tests {
    use super::super::SftpBackend;
    use super::*;

    #[test]
    fn debug_never_shows_keys() {
        let dir = tempfile::tempdir().unwrap();
        let key = dir.path().join("k");
        let ok = std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("ssh-keygen not available; skipped");
            return;
        }
        let secret = std::fs::read_to_string(&key).unwrap();
        let body: String = secret.lines().nth(1).unwrap().to_owned();
        let c = SftpConfig::parse(&format!(
            "sftp://u@h/c?identity={}&insecure-accept-any-host-key=true",
            key.display()
        ))
        .unwrap();
        let shown = format!("{:?}", SftpBackend::new(c));
        assert!(!shown.contains(&body), "{shown}");
        assert!(shown.contains(&key.display().to_string()), "{shown}");
    }
}
