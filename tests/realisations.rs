//! Content-addressed derivations (`ca-derivations`) with real Nix: built with the daemon's
//! post-build-hook, their outputs are published with their realisations, under the ids Nix
//! itself gives them, and a fresh store that may not build (`--max-jobs 0`) substitutes the
//! derivation's output through its realisation, signatures required.

mod common;
mod daemon_support;

use std::fs;
use std::os::unix::fs::PermissionsExt as _;
use std::process::Command;

use common::*;
use daemon_support::*;

const FEATURES: &str = "nix-command ca-derivations";

/// Two floating content-addressed derivations, `top` using `dep`.
const CA_NIX: &str = r#"{ salt }:
let
  ca = name: script: builtins.derivation {
    inherit name salt;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    args = [ "-c" script ];
    __contentAddressed = true;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
  };
  dep = ca "np-ca-dep" "echo dep $salt > $out";
in { inherit dep; top = ca "np-ca-top" "echo ${dep} > $out"; }
"#;

fn nix_ca() -> Command {
    let mut c = Command::new("nix");
    c.args(["--extra-experimental-features", FEATURES]);
    c
}

/// The realisation id Nix 2.34 gives output `out` of `drv`; `None` from a Nix whose
/// `nix realisation info` does not take a derivation's output (2.8 reads only what it built).
fn nix_realisation_id(drv: &str) -> Option<String> {
    let out = run(nix_ca().args(["realisation", "info", "--json", &format!("{drv}^out")]));
    if !out.status.success() {
        return None;
    }
    let v: serde_json::Value =
        serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", out.report()));
    Some(v[0]["id"].as_str().expect("an id").to_owned())
}

/// The realisation objects in `cache` whose `outPath` is `path`'s.
fn realisations_of(
    cache: &std::path::Path,
    path: &str,
) -> Vec<(std::path::PathBuf, serde_json::Value)> {
    let dir = cache.join("realisations");
    let Ok(entries) = fs::read_dir(&dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| {
            let p = e.ok()?.path();
            let v: serde_json::Value = serde_json::from_str(&fs::read_to_string(&p).ok()?).ok()?;
            (v["outPath"] == base_name(path)).then_some((p, v))
        })
        .collect()
}

/// With `drv` (and only its derivations) copied into a fresh store at `root`: `nix-store
/// --realise` there, substituting from the daemon's cache, trusting its key, signatures
/// required, and not allowed to build.
fn realise_without_building(root: &std::path::Path, drv: &str, s: &Setup) -> Command {
    let store = format!("local?root={}", root.display());
    run_ok(nix_ca().args([
        "copy",
        "--derivation",
        "--no-check-sigs",
        "--to",
        &store,
        drv,
    ]));
    let mut c = Command::new("nix-store");
    c.args(["--store", &store, "--realise", drv])
        .args(["--extra-experimental-features", "ca-derivations"])
        .args(["--max-jobs", "0", "--option", "substituters"])
        .arg(format!("file://{}", s.cache.display()))
        .args(["--option", "trusted-public-keys", &s.keys.public_key()])
        .args(["--option", "require-sigs", "true"]);
    c
}

#[test]
fn a_content_addressed_build_is_substituted_through_its_realisation() {
    let s = Setup::new("");
    let hook = s.dir.path().join("post-build-hook");
    fs::write(
        &hook,
        format!(
            "#!/bin/sh\nexec '{}' hook --config '{}'\n",
            &*NIXPUSH,
            s.config.display()
        ),
    )
    .expect("write hook");
    fs::set_permissions(&hook, fs::Permissions::from_mode(0o755)).expect("chmod hook");
    let salt = unique("ca");
    // The first use of ca-derivations upgrades a single-user store's schema, which needs the
    // store to itself: the `nix-daemon --stdio` that a running nixpush daemon keeps open would
    // make it wait forever (see the README). So the derivations are instantiated first.
    run_ok(
        Command::new("nix-instantiate")
            .args(["--extra-experimental-features", "ca-derivations"])
            .args(["--expr", CA_NIX, "--argstr", "salt", &salt]),
    );
    let daemon = s.start();
    let (outs, built) = nix_build_expr(
        CA_NIX,
        &salt,
        &["dep", "top"],
        &[
            "--extra-experimental-features",
            "ca-derivations",
            "--option",
            "post-build-hook",
            hook.to_str().expect("utf-8"),
        ],
    );
    assert_eq!(outs.len(), 2, "{}", built.report());
    s.wait_published(&outs, &daemon);

    // One realisation for each output, signed, under the id Nix itself gives it.
    let top = &outs[1];
    let drv = daemon_support::deriver_of(top);
    let mut found = Vec::new();
    wait_until(
        PATIENCE,
        || format!("a realisation of {top}\n{}", daemon.log_tail()),
        || {
            found = realisations_of(&s.cache, top);
            !found.is_empty()
        },
    );
    assert_eq!(realisations_of(&s.cache, &outs[0]).len(), 1, "dep's");
    assert_eq!(found.len(), 1, "{found:?}");
    let (object, r) = found.remove(0);
    let id = r["id"].as_str().expect("id").to_owned();
    assert_eq!(
        object,
        s.cache.join("realisations").join(format!("{id}.doi"))
    );
    if let Some(theirs) = nix_realisation_id(&drv) {
        assert_eq!(id, theirs);
    }
    let sigs = r["signatures"].as_array().expect("signatures");
    assert!(
        sigs.len() == 1
            && sigs[0]
                .as_str()
                .is_some_and(|sig| sig.starts_with("daemon-test-1:")),
        "{r}"
    );

    // A fresh store that may not build gets the output from the cache: only the realisation
    // can tell it which path the derivation's output is.
    let root = tempdir();
    let realised = run_ok(&mut realise_without_building(root.path(), &drv, &s));
    assert_eq!(
        realised.stdout.trim(),
        top.as_str(),
        "{}",
        realised.report()
    );
    assert!(valid_in_root(root.path(), top), "{}", realised.report());

    assert!(
        realised.stderr.contains("from 'file://"),
        "not substituted: {}",
        realised.report()
    );

    // Without the realisation, the same fresh store has no way to the output. (Nix 2.34 checks
    // neither a realisation's signatures nor a content-addressed path's: such a path is
    // its own proof. The signatures are for the Nixes that do.)
    fs::remove_file(&object).expect("remove realisation");
    let other = tempdir();
    let stuck = run(&mut realise_without_building(other.path(), &drv, &s));
    assert!(!stuck.status.success(), "{}", stuck.report());
    assert!(!valid_in_root(other.path(), top), "{}", stuck.report());
}
