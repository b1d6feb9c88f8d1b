//! Shared helpers for the end-to-end tests: run the real `nixpush` binary and real Nix, build a
//! test closure without network, look at caches and fresh stores.
//!
//! Every command runs with its output captured; a failing command panics with its command line,
//! exit status, stderr and stdout, so a red test shows what Nix or nixpush said.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::fs;
use std::io::{self, Read};
use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{LazyLock, OnceLock};
use std::time::{SystemTime, UNIX_EPOCH};

use sha2::Digest as _;

/// The `nixpush` binary cargo built for these tests.
/// The nixpush binary: cargo's, unless `NIXPUSH_TEST_BIN` names a copy of it
/// (`scripts/e2e-runner unprivileged` runs the tests as a user who cannot read cargo's target
/// directory).
pub static NIXPUSH: LazyLock<String> = LazyLock::new(|| {
    std::env::var("NIXPUSH_TEST_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_nixpush").to_owned())
});

/// The nixpush-hook binary: the one beside [`NIXPUSH`] (`scripts/e2e-runner unprivileged`
/// copies both), else cargo's.
pub static NIXPUSH_HOOK: LazyLock<String> =
    LazyLock::new(|| match std::env::var("NIXPUSH_TEST_BIN") {
        Ok(bin) => Path::new(&bin)
            .with_file_name("nixpush-hook")
            .display()
            .to_string(),
        Err(_) => env!("CARGO_BIN_EXE_nixpush-hook").to_owned(),
    });

/// `nixpush` with the S3 keys given (the testbed's), no other AWS settings from the
/// environment, and no way to reach cloud metadata.
pub fn nixpush_with_s3_keys(access_key: &str, secret_key: &str) -> Command {
    let mut c = nixpush();
    for v in [
        "AWS_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_CONFIG_FILE",
        "AWS_SHARED_CREDENTIALS_FILE",
    ] {
        c.env_remove(v);
    }
    c.env("AWS_ACCESS_KEY_ID", access_key)
        .env("AWS_SECRET_ACCESS_KEY", secret_key)
        .env("AWS_EC2_METADATA_DISABLED", "true");
    c
}

/// A Nix expression of one derivation named `name`, taking `{ salt }`, whose builder is
/// `/bin/sh -c SCRIPT` (the script may use `${salt}` and must write `$out`).
pub fn sh_derivation_nix(name: &str, script: &str) -> String {
    format!(
        "{{ salt }}:\nderivation {{\n  name = \"{name}\";\n  system = builtins.currentSystem;\n  \
         builder = \"/bin/sh\";\n  args = [ \"-c\" \"{script}\" ];\n}}\n"
    )
}

/// Change the first byte of `needle` in `file` to `to`, keeping its length: a corruption only
/// reading the file can find.
pub fn corrupt_at(file: &Path, needle: &[u8], to: u8) {
    let mut bytes = fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap_or_else(|| {
            panic!(
                "{:?} not in {}",
                String::from_utf8_lossy(needle),
                file.display()
            )
        });
    bytes[at] = to;
    fs::write(file, &bytes).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
}

/// What a finished command printed.
#[derive(Debug)]
pub struct Out {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub command: String,
}

impl Out {
    /// Everything about the run, for assertion messages.
    pub fn report(&self) -> String {
        format!(
            "`{}` exited with {}\n--- stderr:\n{}\n--- stdout:\n{}",
            self.command,
            self.status,
            self.stderr.trim_end(),
            self.stdout.trim_end()
        )
    }
}

/// The command line of `cmd`, for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    if let Some(dir) = cmd.get_current_dir() {
        let _ = write!(s, "  (in {})", dir.display());
    }
    s
}

/// Run `cmd` to completion, stdin empty, output captured.
pub fn run(cmd: &mut Command) -> Out {
    let command = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run `{command}`: {e}"));
    Out {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        command,
    }
}

/// Run `cmd` and assert that it succeeded.
pub fn run_ok(cmd: &mut Command) -> Out {
    let out = run(cmd);
    assert!(out.status.success(), "command failed: {}", out.report());
    out
}

/// Run `cmd` and assert that it exited with a non-zero code (not killed by a signal).
pub fn run_fail(cmd: &mut Command) -> Out {
    let out = run(cmd);
    assert!(
        !out.status.success() && out.status.code().is_some(),
        "command should have failed with an exit code: {}",
        out.report()
    );
    out
}

/// `nixpush` with no settings leaking in from the environment.
pub fn nixpush() -> Command {
    let mut c = Command::new(&*NIXPUSH);
    for var in ["NIXPUSH_TO", "NIXPUSH_KEY_FILE", "NIXPUSH_LOG"] {
        c.env_remove(var);
    }
    c
}

/// `nix` with the `nix-command` feature on, whatever nix.conf says.
pub fn nix() -> Command {
    let mut c = Command::new("nix");
    c.args(["--extra-experimental-features", "nix-command"]);
    c
}

/// A temporary directory, removed when dropped even if it holds a Nix store (whose
/// directories are read-only, which stops a non-root user from removing their contents).
pub struct TestDir(tempfile::TempDir);

impl TestDir {
    pub fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        fn make_writable(dir: &Path) {
            let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o755));
            if let Ok(rd) = fs::read_dir(dir) {
                for e in rd.flatten() {
                    if e.file_type().is_ok_and(|t| t.is_dir()) {
                        make_writable(&e.path());
                    }
                }
            }
        }
        make_writable(self.0.path());
    }
}

/// A fresh temporary directory, removed when dropped.
pub fn tempdir() -> TestDir {
    TestDir(
        tempfile::Builder::new()
            .prefix("nixpush-test-")
            .tempdir()
            .expect("cannot create a temporary directory"),
    )
}

/// Nix's store directory, as Nix says (usually `/nix/store`).
pub fn store_dir() -> &'static str {
    static DIR: OnceLock<String> = OnceLock::new();
    DIR.get_or_init(|| {
        let out = run_ok(nix().args(["eval", "--raw", "--expr", "builtins.storeDir"]));
        out.stdout.trim().to_owned()
    })
}

/// `/nix/store/<hash>-<name>` → `<hash>-<name>`.
pub fn base_name(path: &str) -> &str {
    path.rsplit('/').next().expect("a path")
}

/// `/nix/store/<hash>-<name>` → `<hash>`.
pub fn hash_part(path: &str) -> &str {
    &base_name(path)[..32]
}

// ---------------------------------------------------------------------------------------------
// Derivations for tests.

/// A Nix `let` binding for an expression that takes `salt`: `mk NAME SCRIPT`, a derivation that
/// `/bin/sh -c SCRIPT` builds, with `salt` in its environment (and so in its hash). For
/// `concat!` in an expression's text: `concat!("{ salt }:\nlet\n", nix_mk!(), "  a = mk …")`.
#[allow(unused_macros)] // Each test file uses a different subset of these helpers.
macro_rules! nix_mk {
    () => {
        r#"  mk = name: script: builtins.derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
"#
    };
}
#[allow(unused_imports)]
pub(crate) use nix_mk;

// ---------------------------------------------------------------------------------------------
// The test closure.

/// Every derivation takes `salt` (fresh per test process, so parallel or repeated runs of
/// different tests never share paths) except the big one, which takes `bigSalt`: it is the same
/// on every run, so repeated runs reuse one 67 MB path instead of filling the store.
const CLOSURE_NIX: &str = r#"
{ salt, bigSalt }:
let
  mkWith = s: name: script: builtins.derivation {
    inherit name;
    salt = s;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    PATH = "/usr/bin:/bin";
  };
  mk = mkWith salt;

  # A store path that is a single regular file.
  leaf = mk "np-leaf" "printf 'leaf %s\\n' \"$salt\" > $out";

  # A store path that is itself a symlink (to another store path, hence a reference).
  link = mk "np-link" "ln -s ${leaf} $out";

  # A content-addressed text file (narinfo gets a CA line).
  text = builtins.toFile "np-text" "text ${salt}\n";

  # Every node type, referring to the three above.
  small = mk "np-small" ''
    set -e
    mkdir -p $out/dir/sub/deeper $out/empty-dir $out/bin
    printf 'hello\n' > $out/dir/sub/deeper/file
    : > $out/empty-file
    printf '#!/bin/sh\necho hi\n' > $out/bin/exe
    chmod +x $out/bin/exe
    ln -s ../bin/exe $out/dir/rel-link
    ln -s /absolute/target $out/abs-link
    printf 'B' > $out/B
    printf 'a' > $out/a
    printf '%s\n' ${leaf} > $out/dir/ref-leaf
    ln -s ${link} $out/link-to-link
    cat ${text} > $out/text-copy
    printf '%s\n' ${text} > $out/ref-text
  '';

  # More than 64 MiB, cheap to make: a repetitive part and a less compressible (shuffled,
  # deterministic) part.
  big = mkWith bigSalt "np-big" ''
    set -e
    mkdir -p $out/data
    yes seed | head -c 10000000 > random-source
    { yes 'nixpush: a big, cheap and deterministic file' | head -c 67108864
      shuf -i 1-500000 --random-source=random-source
    } > $out/data/big
    printf 'neighbour\n' > $out/data/small
  '';

  top = mk "np-top" ''
    set -e
    mkdir $out
    ln -s ${big}/data/big $out/big
    printf '%s\n' ${small} > $out/small
  '';
in { inherit leaf link text small big top; }
"#;

const BIG_SALT: &str = "nixpush-e2e-big-1";

/// The salt of this test process.
pub fn salt() -> &'static str {
    static SALT: OnceLock<String> = OnceLock::new();
    SALT.get_or_init(|| {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("time")
            .as_nanos();
        format!("{}-{nanos}", std::process::id())
    })
}

/// A name unique to this process and call: `NAME-PID-NANOS`.
pub fn unique(name: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("time")
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// `nix-build --no-out-link --expr EXPR --argstr salt SALT -A a -A b …`, with `extra` options;
/// the output paths it printed, in order, and the whole output.
pub fn nix_build_expr(
    expr: &str,
    salt: &str,
    attrs: &[&str],
    extra: &[&str],
) -> (Vec<String>, Out) {
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "--expr", expr, "--argstr", "salt", salt])
        .args(extra);
    for a in attrs {
        cmd.args(["-A", a]);
    }
    let out = run_ok(&mut cmd);
    let paths: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    (paths, out)
}

/// A derivation that is not built (only instantiated).
pub fn unbuilt_drv() -> String {
    let expr = concat!(
        "{ salt }:\nlet\n",
        nix_mk!(),
        "in mk \"np-unbuilt\" \"echo never > $out\"\n"
    );
    let out = run_ok(Command::new("nix-instantiate").args([
        "--expr",
        expr,
        "--argstr",
        "salt",
        &unique("unbuilt"),
    ]));
    let drv = out.stdout.trim().to_owned();
    assert!(drv.ends_with(".drv"), "{}", out.report());
    drv
}

/// Build attributes of [`CLOSURE_NIX`] with `nix-build`; their output paths, in order.
pub fn nix_build(attrs: &[&str]) -> Vec<String> {
    let mut cmd = Command::new("nix-build");
    cmd.args(["--no-out-link", "--expr", CLOSURE_NIX]).args([
        "--argstr",
        "salt",
        salt(),
        "--argstr",
        "bigSalt",
        BIG_SALT,
    ]);
    for a in attrs {
        cmd.args(["-A", a]);
    }
    let out = run_ok(&mut cmd);
    let paths: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    assert_eq!(paths.len(), attrs.len(), "{}", out.report());
    paths
}

/// The path of a `builtins.toFile` attribute (evaluating adds it to the store).
fn nix_eval_path(attr: &str) -> String {
    let out = run_ok(
        Command::new("nix-instantiate")
            .args(["--eval", "--read-write-mode", "--expr", CLOSURE_NIX])
            .args(["--argstr", "salt", salt(), "--argstr", "bigSalt", BIG_SALT])
            .args(["-A", attr]),
    );
    out.stdout.trim().trim_matches('"').to_owned()
}

/// The closure without the big path: `small` and everything it refers to.
#[derive(Debug)]
pub struct SmallClosure {
    /// A single regular file.
    pub leaf: String,
    /// A symlink to `leaf`.
    pub link: String,
    /// A content-addressed text file.
    pub text: String,
    /// A directory with every node type, referring to the three above.
    pub small: String,
}

impl SmallClosure {
    pub fn all(&self) -> Vec<String> {
        vec![
            self.leaf.clone(),
            self.link.clone(),
            self.text.clone(),
            self.small.clone(),
        ]
    }
}

/// The whole test closure: `top` refers to `small` and to `big` (a file over 64 MiB).
#[derive(Debug)]
pub struct Closure {
    pub small: &'static SmallClosure,
    pub big: String,
    pub top: String,
}

impl Closure {
    /// Every path of the closure of `top`.
    pub fn all(&self) -> Vec<String> {
        let mut v = self.small.all();
        v.push(self.big.clone());
        v.push(self.top.clone());
        v
    }
}

/// Built once per test process.
pub fn small_closure() -> &'static SmallClosure {
    static SMALL: OnceLock<SmallClosure> = OnceLock::new();
    SMALL.get_or_init(|| {
        let p = nix_build(&["leaf", "link", "small"]);
        let c = SmallClosure {
            leaf: p[0].clone(),
            link: p[1].clone(),
            text: nix_eval_path("text"),
            small: p[2].clone(),
        };
        // The closure is what the tests think it is.
        let mut expected = c.all();
        expected.sort();
        assert_eq!(closure_of(&c.small), expected);
        c
    })
}

/// Built once per test process.
pub fn full_closure() -> &'static Closure {
    static FULL: OnceLock<Closure> = OnceLock::new();
    FULL.get_or_init(|| {
        let small = small_closure();
        let p = nix_build(&["big", "top"]);
        let c = Closure {
            small,
            big: p[0].clone(),
            top: p[1].clone(),
        };
        let mut expected = c.all();
        expected.sort();
        assert_eq!(closure_of(&c.top), expected);
        let big_file = Path::new(&c.big).join("data/big");
        let size = fs::metadata(&big_file).expect("big file").len();
        assert!(
            size > 64 << 20,
            "{} is only {size} bytes",
            big_file.display()
        );
        c
    })
}

/// `nix-store -qR`, sorted.
pub fn closure_of(path: &str) -> Vec<String> {
    let out = run_ok(Command::new("nix-store").args(["--query", "--requisites", path]));
    let mut v: Vec<String> = out.stdout.lines().map(str::to_owned).collect();
    v.sort();
    v
}

/// `CMD push --to TO --key-file KEYS.secret ROOT`, where `cmd` is [`nixpush`] or one with more
/// environment.
pub fn push_cmd(mut cmd: Command, to: &str, keys: &KeyPair, root: &str) -> Command {
    cmd.arg("push")
        .arg("--to")
        .arg(to)
        .arg("--key-file")
        .arg(&keys.secret)
        .arg(root);
    cmd
}

/// `nixpush push --to TO --key-file KEYS.secret ROOT`, which must succeed.
pub fn push(to: &str, keys: &KeyPair, root: &str) -> Out {
    run_ok(&mut push_cmd(nixpush(), to, keys, root))
}

/// How many paths a push says it published (`pushed N paths ...`, or 0 for "nothing to push").
pub fn pushed_count(out: &Out) -> usize {
    for l in out.stderr.lines() {
        if l.starts_with("nothing to push") {
            return 0;
        }
        if let Some(rest) = l.strip_prefix("pushed ") {
            if let Some(n) = rest.split_whitespace().next().and_then(|n| n.parse().ok()) {
                return n;
            }
        }
    }
    panic!("no summary line in {}", out.report())
}

// ---------------------------------------------------------------------------------------------
// Keys.

pub struct KeyPair {
    pub secret: PathBuf,
    pub public: PathBuf,
}

impl KeyPair {
    /// The public key, as `trusted-public-keys` takes it.
    pub fn public_key(&self) -> String {
        fs::read_to_string(&self.public)
            .expect("public key file")
            .trim()
            .to_owned()
    }
}

/// A pair made by `nixpush keygen`, in `dir`.
pub fn nixpush_keygen(dir: &Path, name: &str) -> KeyPair {
    let kp = KeyPair {
        secret: dir.join(format!("{name}.sec")),
        public: dir.join(format!("{name}.pub")),
    };
    run_ok(
        nixpush()
            .arg("keygen")
            .arg(name)
            .arg(&kp.secret)
            .arg(&kp.public),
    );
    kp
}

/// A pair made by `nix-store --generate-binary-cache-key`, in `dir`.
pub fn nix_keygen(dir: &Path, name: &str, file_stem: &str) -> KeyPair {
    let kp = KeyPair {
        secret: dir.join(format!("{file_stem}.sec")),
        public: dir.join(format!("{file_stem}.pub")),
    };
    run_ok(
        Command::new("nix-store")
            .arg("--generate-binary-cache-key")
            .arg(name)
            .arg(&kp.secret)
            .arg(&kp.public),
    );
    kp
}

// ---------------------------------------------------------------------------------------------
// Nix reading a cache.

/// `nix copy --from file://CACHE --to ROOT PATHS`, trusting only `public_key`, signatures
/// required. ROOT is a fresh chroot store.
pub fn nix_copy_cmd(cache: &Path, root: &Path, public_key: &str, paths: &[String]) -> Command {
    let mut c = nix();
    c.arg("copy")
        .arg("--from")
        .arg(format!("file://{}", cache.display()))
        .arg("--to")
        .arg(root)
        .args(["--option", "trusted-public-keys", public_key])
        .args(["--option", "require-sigs", "true"])
        .args(["--option", "substituters", ""])
        .args(paths);
    c
}

/// Where `store_path` lives inside the chroot store `root`.
pub fn in_root(root: &Path, store_path: &str) -> PathBuf {
    root.join(store_path.trim_start_matches('/'))
}

/// Whether `store_path` is on disk in the chroot store `root` (a symlink counts as itself).
/// After a failed substitution, Nix 2.8 may leave what it unpacked on disk without registering
/// it: use [`valid_in_root`] for "was it substituted".
pub fn present_in_root(root: &Path, store_path: &str) -> bool {
    fs::symlink_metadata(in_root(root, store_path)).is_ok()
}

/// Whether `store_path` is valid (registered) in the chroot store `root`.
pub fn valid_in_root(root: &Path, store_path: &str) -> bool {
    let out = run_ok(Command::new("nix-store").arg("--store").arg(root).args([
        "--check-validity",
        "--print-invalid",
        store_path,
    ]));
    match out.stdout.trim() {
        "" => true,
        p if p == store_path => false,
        _ => panic!("unexpected output: {}", out.report()),
    }
}

// ---------------------------------------------------------------------------------------------
// Nix's view of paths.

/// One entry of `nix path-info --json`.
#[derive(Debug, Clone)]
pub struct NixPathInfo {
    pub path: String,
    /// As Nix printed it (SRI in Nix 2.8).
    pub nar_hash: String,
    pub nar_size: u64,
    /// Full paths, sorted.
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    pub signatures: Vec<String>,
}

/// Whether this Nix takes `--json-format` (2.34 does, and warns that `--json` without it will
/// become an error; 2.8 refuses it as an unknown flag).
pub fn nix_has_json_format() -> bool {
    static HAS: OnceLock<bool> = OnceLock::new();
    *HAS.get_or_init(|| {
        run(nix().args(["path-info", "--json-format", "1", "--help"]))
            .status
            .success()
    })
}

/// `nix path-info --json --recursive PATHS` in `store` (None: the local store), keyed by path.
/// Reads JSON format 1: the list Nix 2.8 prints and the object keyed by full path that newer
/// Nix prints (asked for with `--json-format 1` where Nix has the flag: format 2 keys by base
/// name and gives `ca` as an object).
pub fn nix_path_info(store: Option<&str>, paths: &[String]) -> BTreeMap<String, NixPathInfo> {
    let mut cmd = nix();
    cmd.args(["path-info", "--json", "--recursive"]);
    if nix_has_json_format() {
        cmd.args(["--json-format", "1"]);
    }
    if let Some(s) = store {
        cmd.args(["--store", s]);
    }
    let out = run_ok(cmd.args(paths));
    let json: serde_json::Value = serde_json::from_str(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", out.report()));
    let entries: Vec<(String, serde_json::Value)> = match json {
        serde_json::Value::Array(items) => items
            .into_iter()
            .map(|v| (v["path"].as_str().expect("path").to_owned(), v))
            .collect(),
        serde_json::Value::Object(map) => map.into_iter().collect(),
        other => panic!("unexpected path-info JSON: {other}"),
    };
    let strs = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .map(|s| s.as_str().expect("string").to_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    entries
        .into_iter()
        .map(|(path, v)| {
            let mut references = strs(&v["references"]);
            references.sort();
            let info = NixPathInfo {
                path: path.clone(),
                nar_hash: v["narHash"].as_str().expect("narHash").to_owned(),
                nar_size: v["narSize"].as_u64().expect("narSize"),
                references,
                deriver: v["deriver"].as_str().map(str::to_owned),
                ca: match &v["ca"] {
                    serde_json::Value::Null => None,
                    serde_json::Value::String(ca) => Some(ca.clone()),
                    other => panic!("{path}: `ca` is not format 1's string: {other}"),
                },
                signatures: strs(&v["signatures"]),
            };
            (path, info)
        })
        .collect()
}

/// Nix's own conversion of sha256 hashes (any form) to `sha256:<nixbase32>`.
pub fn nix_to_base32(hashes: &[String]) -> Vec<String> {
    let out = run_ok(
        nix()
            .args(["hash", "to-base32", "--type", "sha256"])
            .args(hashes),
    );
    let v: Vec<String> = out
        .stdout
        .lines()
        .map(|l| format!("sha256:{}", l.trim()))
        .collect();
    assert_eq!(v.len(), hashes.len(), "{}", out.report());
    v
}

/// Nix's sha256 of files, `sha256:<nixbase32>`, in order.
pub fn nix_hash_files(files: &[PathBuf]) -> Vec<String> {
    let out = run_ok(
        nix()
            .args(["hash", "file", "--type", "sha256", "--base32"])
            .args(files),
    );
    let v: Vec<String> = out
        .stdout
        .lines()
        .map(|l| format!("sha256:{}", l.trim()))
        .collect();
    assert_eq!(v.len(), files.len(), "{}", out.report());
    v
}

/// sha256 and length of a stream, read in 1 MiB pieces.
pub fn digest_stream(mut r: impl Read) -> io::Result<([u8; 32], u64)> {
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = r.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((h.finalize().into(), n))
}

/// sha256 and length of `nix-store --dump PATH`, streamed.
pub fn nix_dump_digest(path: &str) -> ([u8; 32], u64) {
    let mut child = Command::new("nix-store")
        .args(["--dump", path])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run nix-store --dump");
    let stdout = child.stdout.take().expect("piped");
    let digest = digest_stream(stdout).expect("reading nix-store --dump");
    let out = child.wait_with_output().expect("nix-store --dump");
    assert!(
        out.status.success(),
        "nix-store --dump {path} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    digest
}

/// [`nix_dump_digest`] of every path of the full closure, computed once per process.
pub fn dump_digests() -> &'static HashMap<String, ([u8; 32], u64)> {
    static D: OnceLock<HashMap<String, ([u8; 32], u64)>> = OnceLock::new();
    D.get_or_init(|| {
        full_closure()
            .all()
            .into_iter()
            .map(|p| {
                let d = nix_dump_digest(&p);
                (p, d)
            })
            .collect()
    })
}

/// A reader of the NAR inside a cache file compressed with `compression` (a narinfo name).
pub fn decompressor(file: fs::File, compression: &str) -> Box<dyn Read> {
    let r = io::BufReader::with_capacity(1 << 20, file);
    match compression {
        "none" => Box::new(r),
        "xz" => Box::new(xz2::read::XzDecoder::new(r)),
        "bzip2" => Box::new(bzip2::read::BzDecoder::new(r)),
        "zstd" => Box::new(zstd::stream::read::Decoder::with_buffer(r).expect("zstd decoder")),
        other => panic!("unexpected compression {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Caches.

/// A narinfo's fields, parsed independently of nixpush's own parser: key → values in order.
#[derive(Debug, Clone)]
pub struct RawNarInfo {
    pub text: String,
    pub fields: BTreeMap<String, Vec<String>>,
}

impl RawNarInfo {
    pub fn read(cache: &Path, store_path: &str) -> Self {
        let file = cache.join(format!("{}.narinfo", hash_part(store_path)));
        let text = fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", file.display()));
        let mut fields: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for line in text.lines() {
            let (k, v) = line
                .split_once(": ")
                .unwrap_or_else(|| panic!("bad narinfo line {line:?} in {}", file.display()));
            fields.entry(k.to_owned()).or_default().push(v.to_owned());
        }
        assert!(
            text.ends_with('\n'),
            "{} lacks a final newline",
            file.display()
        );
        Self { text, fields }
    }

    /// The single value of `key`.
    pub fn one(&self, key: &str) -> &str {
        match self.fields.get(key).map(Vec::as_slice) {
            Some([v]) => v,
            other => panic!(
                "narinfo field {key}: expected one value, got {other:?}\n{}",
                self.text
            ),
        }
    }

    pub fn opt(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(|v| {
            assert_eq!(v.len(), 1, "{key} repeated in\n{}", self.text);
            v[0].as_str()
        })
    }

    pub fn all(&self, key: &str) -> &[String] {
        self.fields.get(key).map(Vec::as_slice).unwrap_or(&[])
    }
}

/// The names in `dir` that `keep` accepts, sorted (none if `dir` does not exist).
pub fn dir_names(dir: &Path, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(rd) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<String> = rd
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .filter(|n| keep(n))
        .collect();
    v.sort();
    v
}

/// The `.narinfo` files at the top of a cache directory (none if it does not exist).
pub fn narinfo_files(cache: &Path) -> Vec<String> {
    dir_names(cache, |n| n.ends_with(".narinfo"))
}

/// Every file below `dir` (relative path → size, mtime, inode), for "nothing changed" checks.
pub fn snapshot(dir: &Path) -> BTreeMap<PathBuf, (u64, SystemTime, u64)> {
    fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, (u64, SystemTime, u64)>) {
        for e in fs::read_dir(dir).expect("read_dir") {
            let e = e.expect("dir entry");
            let meta = fs::symlink_metadata(e.path()).expect("metadata");
            let rel = e.path().strip_prefix(root).expect("below root").to_owned();
            if meta.is_dir() {
                walk(root, &e.path(), out);
            }
            out.insert(
                rel,
                (meta.len(), meta.modified().expect("mtime"), meta.ino()),
            );
        }
    }
    let mut out = BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// This process's umask (children inherit it), from `/proc/self/status`.
pub fn umask() -> u32 {
    let status = fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let line = status
        .lines()
        .find_map(|l| l.strip_prefix("Umask:"))
        .expect("a Umask line in /proc/self/status");
    u32::from_str_radix(line.trim(), 8).expect("octal umask")
}

/// Every regular file below `dir` has the mode Nix's own `file://` store gives it (it creates
/// files with 0666 less the umask), so that a web server running as another user can serve the
/// cache.
pub fn assert_modes_like_nix(dir: &Path) {
    let want = 0o666 & !umask();
    for (rel, _) in snapshot(dir) {
        let meta = fs::symlink_metadata(dir.join(&rel)).expect("metadata");
        if meta.is_file() {
            assert_eq!(
                meta.mode() & 0o7777,
                want,
                "{} has mode {:o}, Nix would give it {want:o}",
                rel.display(),
                meta.mode() & 0o7777
            );
        }
    }
}

/// Copy a cache directory (files and directories only) to `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).expect("create_dir_all");
    for e in fs::read_dir(from).expect("read_dir") {
        let e = e.expect("dir entry");
        let ft = e.file_type().expect("file type");
        let dest = to.join(e.file_name());
        if ft.is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            fs::copy(e.path(), &dest).expect("copy");
        }
    }
}

/// `nix copy --from URL --to ROOT PATHS`, trusting only `public_keys`, signatures required.
pub fn nix_copy_from(url: &str, root: &Path, public_keys: &[String], paths: &[String]) -> Out {
    run_ok(
        nix()
            .arg("copy")
            .arg("--from")
            .arg(url)
            .arg("--to")
            .arg(root)
            .args(["--option", "trusted-public-keys", &public_keys.join(" ")])
            .args(["--option", "require-sigs", "true"])
            .args(["--option", "substituters", ""])
            .args(paths),
    )
}

/// `nix copy --from URL` of `roots` into a fresh store, signatures required; every path of
/// `all` is then valid there.
pub fn nix_substitutes_from(
    url: &str,
    root: &Path,
    public_key: &str,
    roots: &[String],
    all: &[String],
) {
    let copy = nix_copy_from(url, root, &[public_key.to_owned()], roots);
    for p in all {
        assert!(
            valid_in_root(root, p),
            "{p} not valid after {}",
            copy.report()
        );
    }
}
