//! The `sftp://` address: which server, as which user, which directory, which keys, which
//! host-key check. Parsed once, before any connection (the `identity=` key file is read then).
//!
//! ```text
//! sftp://[USER@]HOST[:PORT][/PATH][?identity=FILE&known-hosts=FILE&insecure-accept-any-host-key=true]
//! ```
//! - `PATH` is absolute on the server (`sftp://cache@host/srv/nix-cache`); `/~/DIR` or no path
//!   at all names a directory relative to the login directory, as `sftp` and `scp` do.
//! - `USER` defaults to `$USER`, `PORT` to 22.
//! - `identity=FILE`: an OpenSSH private key file, the only key then tried. Without it: every
//!   key of the ssh-agent at `$SSH_AUTH_SOCK`, then `~/.ssh/id_ed25519`, `~/.ssh/id_ecdsa` and
//!   `~/.ssh/id_rsa` where they exist. Keys protected by a passphrase must go through the agent.
//! - `known-hosts=FILE`: where the server's host key must be listed (default
//!   `~/.ssh/known_hosts`); entries as OpenSSH writes them (`HOST` or `[HOST]:PORT`, hashed or
//!   not; `ssh-keyscan -p PORT HOST` makes one).
//! - `insecure-accept-any-host-key=true`: no host key check at all. An explicit opt-out for
//!   throw-away test servers; never the default.
//!
//! Any other parameter is refused with its name. Passwords (in the URL or interactively) are
//! not supported: SSH keys only.

use std::path::PathBuf;
use std::sync::Arc;

use super::auth::load_key;
use super::{HostKeyCheck, SftpAuth};
use crate::ConfigError;

/// A parsed `sftp://` address.
#[derive(Debug, Clone)]
pub struct SftpConfig {
    pub host: String,
    pub port: u16,
    pub user: String,
    /// The cache directory: absolute (`/srv/cache`), relative to the login directory
    /// (`cache`), or empty for the login directory itself. No trailing `/`.
    pub root: String,
    pub host_keys: HostKeyCheck,
    pub auth: SftpAuth,
}

fn home() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute())
}

impl SftpConfig {
    /// Parse an address, loading the key file it names; the agent socket comes from
    /// `$SSH_AUTH_SOCK`. No network.
    pub fn parse(addr: &str) -> Result<Self, ConfigError> {
        let (location, query) = addr.split_once('?').unwrap_or((addr, ""));
        let url = url::Url::parse(location).map_err(|e| e.to_string())?;
        if url.scheme() != "sftp" {
            return Err("expected sftp://[USER@]HOST[:PORT]/PATH".into());
        }
        let host = match url.host() {
            Some(url::Host::Domain(d)) if !d.is_empty() => d.to_owned(),
            Some(url::Host::Ipv4(a)) => a.to_string(),
            Some(url::Host::Ipv6(a)) => a.to_string(),
            _ => return Err("no host: expected sftp://[USER@]HOST[:PORT]/PATH".into()),
        };
        if url.password().is_some() {
            return Err(
                "passwords are not supported: use an SSH key (identity=FILE or ssh-agent)".into(),
            );
        }
        if url.fragment().is_some() {
            return Err("a cache address has no #fragment".into());
        }
        let user = if url.username().is_empty() {
            std::env::var("USER")
                .ok()
                .filter(|u| !u.is_empty())
                .ok_or("no user: write sftp://USER@HOST/PATH ($USER is not set)")?
        } else {
            decode(url.username())?
        };
        let port = url.port().unwrap_or(22);
        let path = decode(url.path())?;
        let root = if path == "/~" || path.is_empty() {
            String::new()
        } else if let Some(rel) = path.strip_prefix("/~/") {
            rel.trim_end_matches('/').to_owned()
        } else if path.trim_end_matches('/').is_empty() {
            "/".to_owned()
        } else {
            path.trim_end_matches('/').to_owned()
        };
        if root.split('/').any(|c| c == "..") {
            return Err("the path must not contain `..`".into());
        }

        let [identity, known_hosts, accept_any] = crate::query_params(
            query,
            "an SFTP cache",
            ["identity", "known-hosts", "insecure-accept-any-host-key"],
            false,
        )?;
        let accept_any = match accept_any.as_deref() {
            None | Some("false") => false,
            Some("true") => true,
            Some(v) => {
                return Err(format!(
                    "insecure-accept-any-host-key must be true or false, not {v:?}"
                )
                .into());
            }
        };
        let host_keys = match (accept_any, known_hosts) {
            (true, Some(_)) => {
                return Err(
                    "give known-hosts or insecure-accept-any-host-key=true, not both".into(),
                );
            }
            (true, None) => HostKeyCheck::AcceptAny,
            (false, Some(f)) => {
                let p = PathBuf::from(&f);
                std::fs::metadata(&p).map_err(|e| format!("known-hosts={f}: {e}"))?;
                HostKeyCheck::KnownHosts(p)
            }
            (false, None) => HostKeyCheck::KnownHosts(
                home()
                    .ok_or("no known-hosts file: $HOME is not set (give known-hosts=FILE)")?
                    .join(".ssh/known_hosts"),
            ),
        };
        let auth = match identity {
            Some(f) => SftpAuth {
                identity: Some((PathBuf::from(&f), Arc::new(load_key(&f)?))),
                ..SftpAuth::default()
            },
            None => SftpAuth {
                identity: None,
                agent: std::env::var_os("SSH_AUTH_SOCK")
                    .filter(|s| !s.is_empty())
                    .map(PathBuf::from),
                default_keys: home()
                    .map(|h| {
                        ["id_ed25519", "id_ecdsa", "id_rsa"]
                            .iter()
                            .map(|n| h.join(".ssh").join(n))
                            .filter(|p| p.is_file())
                            .collect()
                    })
                    .unwrap_or_default(),
            },
        };
        Ok(Self {
            host,
            port,
            user,
            root,
            host_keys,
            auth,
        })
    }

    /// How OpenSSH names this server in known-hosts files.
    pub(super) fn known_hosts_name(&self) -> String {
        if self.port == 22 {
            self.host.clone()
        } else {
            format!("[{}]:{}", self.host, self.port)
        }
    }

    pub(super) fn describe(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        let path = if self.root.is_empty() {
            String::new()
        } else if self.root.starts_with('/') {
            self.root.clone()
        } else {
            format!("/~/{}", self.root)
        };
        format!("sftp://{}@{host}:{}{path}", self.user, self.port)
    }
}

fn decode(s: &str) -> Result<String, String> {
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| format!("{s:?} is not UTF-8 once percent-decoded"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let c = SftpConfig::parse(
            "sftp://cache@example.org:2222/srv/nix-cache/?insecure-accept-any-host-key=true",
        )
        .unwrap();
        assert_eq!(
            (c.user.as_str(), c.host.as_str(), c.port, c.root.as_str()),
            ("cache", "example.org", 2222, "/srv/nix-cache")
        );
        assert_eq!(c.host_keys, HostKeyCheck::AcceptAny);
        assert_eq!(c.known_hosts_name(), "[example.org]:2222");
        assert_eq!(c.describe(), "sftp://cache@example.org:2222/srv/nix-cache");

        let c = SftpConfig::parse("sftp://u@h/~/cache?insecure-accept-any-host-key=true").unwrap();
        assert_eq!((c.port, c.root.as_str()), (22, "cache"));
        assert_eq!(c.known_hosts_name(), "h");
        let c = SftpConfig::parse("sftp://u@h?insecure-accept-any-host-key=true").unwrap();
        assert_eq!(c.root, "");
        // Dot segments are resolved as in any URL: no `..` reaches the server.
        let c = SftpConfig::parse("sftp://u@h/a/../b?insecure-accept-any-host-key=true").unwrap();
        assert_eq!(c.root, "/b");
        let c = SftpConfig::parse("sftp://u@[::1]:22/c?insecure-accept-any-host-key=true").unwrap();
        assert_eq!((c.host.as_str(), c.root.as_str()), ("::1", "/c"));
    }

    #[test]
    fn refuses_bad_addresses_naming_the_problem() {
        for (addr, needle) in [
            ("sftp://u@h/c?bogus=1", "\"bogus\""),
            ("sftp://u:pw@h/c", "passwords"),
            ("sftp:///c", "no host"),
            ("sftp://u@h/c?identity=/nonexistent/key", "/nonexistent/key"),
            (
                "sftp://u@h/c?known-hosts=/nonexistent/kh",
                "/nonexistent/kh",
            ),
            (
                "sftp://u@h/c?insecure-accept-any-host-key=yes",
                "true or false",
            ),
        ] {
            let e = SftpConfig::parse(addr).unwrap_err().to_string();
            assert!(e.contains(needle), "{addr}: {e:?} does not name {needle:?}");
        }
    }
}
