//! The systemd unit's sandbox against what the README tells people to configure.
//!
//! `ProtectSystem=strict` mounts the whole file system read-only for the service except what
//! the unit names (systemd.exec(5)): `ReadWritePaths=`, its `StateDirectory=`,
//! `CacheDirectory=`, `LogsDirectory=` and `RuntimeDirectory=`, and with `PrivateTmp=` its own
//! `/tmp` and `/var/tmp`; `ProtectHome=yes` hides `/home`, `/root` and `/run/user` whatever
//! else says. The tests read `systemd/nixpush.service` and the drop-ins of
//! `systemd/nixpush.service.d/` by those rules, and check that:
//! - the cache the README's daemon configuration names is writable with the drop-in the README
//!   says to install, and not without it (the unit alone is what made the README's
//!   `/srv/cache` fail with "Read-only file system");
//! - the default cache and queue directory are writable with the unit alone;
//! - the README shows the drop-in as it is shipped, and the user it runs as is the one the
//!   README creates; a path outside what systemd manages is not given to a dynamic user;
//! - `systemd-analyze verify` accepts the unit with its drop-ins, without a warning.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The `[Service]` settings of a unit file, in order (drop-ins appended after the unit).
fn service_settings(text: &str) -> Vec<(String, String)> {
    let mut in_service = false;
    let mut out = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if line.starts_with('[') {
            in_service = line == "[Service]";
            continue;
        }
        if let (true, Some((k, v))) = (in_service, line.split_once('=')) {
            out.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    out
}

fn unit() -> Vec<(String, String)> {
    service_settings(
        &fs::read_to_string(repo().join("systemd/nixpush.service")).expect("nixpush.service"),
    )
}

/// The drop-ins shipped beside the unit, by name.
fn drop_ins() -> Vec<(PathBuf, String)> {
    let dir = repo().join("systemd/nixpush.service.d");
    let mut out: Vec<(PathBuf, String)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "conf"))
        .map(|p| {
            let text = fs::read_to_string(&p).expect("drop-in");
            (p, text)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no drop-ins in {}", dir.display());
    out
}

fn with_drop_ins() -> Vec<(String, String)> {
    let mut s = unit();
    for (_, text) in drop_ins() {
        s.extend(service_settings(&text));
    }
    s
}

/// The last value of a single-valued setting.
fn last<'a>(settings: &'a [(String, String)], key: &str) -> Option<&'a str> {
    settings
        .iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// Every value of a list setting, an empty assignment resetting the list (systemd.unit(5)).
fn list(settings: &[(String, String)], key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in settings {
        if k == key {
            if v.is_empty() {
                out.clear();
            }
            out.extend(v.split_whitespace().map(str::to_owned));
        }
    }
    out
}

/// The directories systemd makes writable for the service under `ProtectSystem=strict`.
fn writable_dirs(settings: &[(String, String)]) -> Vec<PathBuf> {
    assert_eq!(
        last(settings, "ProtectSystem"),
        Some("strict"),
        "these rules are ProtectSystem=strict's"
    );
    let mut out: Vec<PathBuf> = list(settings, "ReadWritePaths")
        .iter()
        // `-PATH`: ignored if missing; `+PATH`: relative to RootDirectory= (unused here).
        .map(|p| PathBuf::from(p.trim_start_matches(['-', '+'])))
        .collect();
    for (key, base) in [
        ("StateDirectory", "/var/lib"),
        ("CacheDirectory", "/var/cache"),
        ("LogsDirectory", "/var/log"),
        ("RuntimeDirectory", "/run"),
    ] {
        out.extend(list(settings, key).iter().map(|d| Path::new(base).join(d)));
    }
    if last(settings, "PrivateTmp") == Some("yes") {
        out.extend([PathBuf::from("/tmp"), PathBuf::from("/var/tmp")]);
    }
    out
}

/// Whether the service may write `path` (a directory it writes into).
fn writable(settings: &[(String, String)], path: &Path) -> bool {
    let hidden = matches!(
        last(settings, "ProtectHome"),
        Some("yes" | "read-only" | "tmpfs")
    ) && ["/home", "/root", "/run/user"]
        .iter()
        .any(|h| path.starts_with(h));
    !hidden && writable_dirs(settings).iter().any(|d| path.starts_with(d))
}

/// The fenced code blocks of the README, each as (info string, text).
fn readme_blocks() -> Vec<(String, String)> {
    let readme = fs::read_to_string(repo().join("README.md")).expect("README.md");
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in readme.lines() {
        let t = line.trim_start();
        if let Some(info) = t.strip_prefix("```") {
            match current.take() {
                Some(block) => out.push(block),
                None => current = Some((info.trim().to_owned(), String::new())),
            }
        } else if let Some((_, text)) = current.as_mut() {
            text.push_str(t);
            text.push('\n');
        }
    }
    out
}

/// The local directory the README's daemon configuration (`# /etc/nixpush/config.toml`)
/// publishes to.
fn readme_daemon_cache() -> PathBuf {
    let blocks = readme_blocks();
    let (_, config) = blocks
        .iter()
        .find(|(_, t)| t.starts_with("# /etc/nixpush/config.toml"))
        .expect("the README shows the daemon's config.toml");
    let value: toml::Value = toml::from_str(config).expect("the README's config is TOML");
    let cache = value["cache"].as_str().expect("cache = \"...\"");
    let dir = cache
        .strip_prefix("file://")
        .expect("the README's daemon example is a local cache");
    PathBuf::from(dir)
}

#[test]
fn the_readme_s_local_cache_is_writable_under_the_unit_s_sandbox_with_its_drop_in() {
    let cache = readme_daemon_cache();
    assert!(
        !writable(&unit(), &cache),
        "the unit alone lets the service write {}: then the drop-in is not needed",
        cache.display()
    );
    assert!(
        writable(&with_drop_ins(), &cache),
        "with systemd/nixpush.service.d/ the service still cannot write {} (writable: {:?})",
        cache.display(),
        writable_dirs(&with_drop_ins())
    );
    // A new file goes into the cache's nar/ and beside nix-cache-info: below it, too.
    assert!(writable(&with_drop_ins(), &cache.join("nar")));
}

#[test]
fn the_default_cache_and_queue_are_writable_with_the_unit_alone() {
    let example = fs::read_to_string(repo().join("config.example.toml")).expect("example");
    let value: toml::Value = toml::from_str(&example).expect("config.example.toml");
    let cache = value["cache"].as_str().expect("cache");
    let cache = Path::new(cache.strip_prefix("file://").expect("a local default"));
    let queue = Path::new(value["queue-dir"].as_str().expect("queue-dir"));
    for p in [cache, queue] {
        assert!(
            writable(&unit(), p),
            "the unit does not let the service write {} (writable: {:?})",
            p.display(),
            writable_dirs(&unit())
        );
    }
}

#[test]
fn the_readme_shows_the_drop_in_as_shipped_and_its_user_is_one_that_can_own_the_cache() {
    let blocks = readme_blocks();
    let (path, text) = drop_ins()
        .into_iter()
        .find(|(p, _)| p.ends_with("local-cache.conf"))
        .expect("systemd/nixpush.service.d/local-cache.conf");
    // The drop-in without its comments, as the README shows it.
    let bare: String = text
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        blocks.iter().any(|(info, t)| info == "ini" && *t == bare),
        "the README does not show {} as it is:\n{bare}",
        path.display()
    );
    let settings = with_drop_ins();
    let managed = [
        "/var/lib",
        "/var/cache",
        "/var/log",
        "/run",
        "/tmp",
        "/var/tmp",
    ];
    let outside: Vec<String> = list(&settings, "ReadWritePaths")
        .into_iter()
        .filter(|p| !managed.iter().any(|m| Path::new(p).starts_with(m)))
        .collect();
    assert!(!outside.is_empty(), "{settings:?}");
    // A dynamic user's uid is allocated anew: it cannot keep owning a directory systemd does
    // not manage for it.
    assert_eq!(last(&settings, "DynamicUser"), Some("no"), "{outside:?}");
    let user = last(&settings, "User").expect("User=");
    let readme = fs::read_to_string(repo().join("README.md")).expect("README.md");
    for words in [
        format!("useradd --system --no-create-home --shell /usr/sbin/nologin {user}"),
        format!("chown -R {user}:{user} {}", readme_daemon_cache().display()),
        "systemd/nixpush.service.d/local-cache.conf".to_owned(),
    ] {
        assert!(readme.contains(&words), "the README lacks {words:?}");
    }
    assert!(
        text.contains(&format!(
            "useradd --system --no-create-home --shell /usr/sbin/nologin {user}"
        )),
        "the drop-in's own instructions should create {user}"
    );
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_with_its_drop_ins() {
    let Ok(probe) = Command::new("systemd-analyze").arg("--version").output() else {
        let msg = "systemd-analyze is not installed: run scripts/setup";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("CI=true and {msg}");
        }
        // Straight to stderr: the test harness captures eprintln!, and this must be seen.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            format!("\n!!!!!!!! SKIPPED: {msg} !!!!!!!!\n\n").as_bytes(),
        );
        return;
    };
    assert!(probe.status.success());
    // A copy whose ExecStart= is the binary under test (verify checks it is executable).
    let dir = tempfile::tempdir().expect("temp dir");
    let unit_text =
        fs::read_to_string(repo().join("systemd/nixpush.service")).expect("nixpush.service");
    let exec = env!("CARGO_BIN_EXE_nixpush");
    let unit_text = unit_text.replace(
        "ExecStart=/usr/local/bin/nixpush ",
        &format!("ExecStart={exec} "),
    );
    assert!(
        unit_text.contains(exec),
        "no ExecStart=/usr/local/bin/nixpush in the unit"
    );
    fs::write(dir.path().join("nixpush.service"), unit_text).expect("unit");
    fs::copy(
        repo().join("systemd/nixpush.socket"),
        dir.path().join("nixpush.socket"),
    )
    .expect("socket unit");
    fs::create_dir(dir.path().join("nixpush.service.d")).expect("mkdir");
    for (p, text) in drop_ins() {
        fs::write(
            dir.path()
                .join("nixpush.service.d")
                .join(p.file_name().expect("name")),
            text,
        )
        .expect("drop-in");
    }
    let out = Command::new("systemd-analyze")
        .args(["verify", "--man=no"])
        .arg(dir.path().join("nixpush.service"))
        .output()
        .expect("systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {}\n{said}",
        out.status
    );
}
