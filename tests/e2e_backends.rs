//! End to end over the network backends, with the real `nixpush` binary and real Nix:
//! - `nixpush push --to http://...` into nginx (WebDAV PUT, bearer token), then Nix substitutes
//!   the closure from `http://127.0.0.1:PORT/...` with signatures required;
//! - `nixpush push --to s3://...` into SeaweedFS, then Nix substitutes it through SeaweedFS's
//!   S3 HTTP endpoint, where the bucket allows anonymous reads (this Nix has no `s3://`);
//! - two `nixpush push` processes publishing overlapping closures into one S3 prefix at the
//!   same time: every narinfo is created exactly once and never rewritten, is signed and
//!   valid, and no NAR is missing;
//! - what goes wrong with an S3 cache (no server, no credentials, an unknown access key, a
//!   wrong secret, a missing bucket) is said once, word for word, with what to try;
//! - keys from an AWS profile (`profile=`, `AWS_PROFILE`) in the files
//!   `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` name.
//!
//! The servers are the ones the backend conformance suite uses (`backends/tests/support`),
//! started once for this test binary. Credentials are always given explicitly, and
//! `AWS_EC2_METADATA_DISABLED=true`: nothing looks for cloud credentials.

// Needs both network backends compiled in (the default).
#![cfg(all(feature = "s3", feature = "http"))]

mod common;

#[path = "../backends/tests/support/testbeds.rs"]
mod testbeds;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::*;

/// `nixpush` with explicit S3 test keys and no way to reach cloud metadata.
fn nixpush_s3() -> Command {
    nixpush_with_s3_keys(testbeds::S3_ACCESS_KEY, testbeds::S3_SECRET_KEY)
}

fn assert_substituted(root: &Path, paths: &[String], how: &Out) {
    for p in paths {
        assert!(
            valid_in_root(root, p),
            "{p} not valid under {} after {}",
            root.display(),
            how.report()
        );
    }
}

/// `curl` a URL anonymously: status, headers (lower-cased names) and body.
fn curl(method: &str, url: &str) -> (u16, BTreeMap<String, String>, String) {
    let mut cmd = Command::new("curl");
    if method == "HEAD" {
        cmd.args(["-sS", "-I"]);
    } else {
        cmd.args(["-sS", "-D", "-", "-X", method]);
    }
    let out = run_ok(cmd.arg(url));
    let (head, body) = out
        .stdout
        .split_once("\r\n\r\n")
        .unwrap_or((&out.stdout, ""));
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line: {}", out.report()));
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_lowercase(), v.trim().to_owned()))
        .collect();
    (status, headers, body.to_owned())
}

/// A narinfo's fields (key → values).
fn parse_narinfo(text: &str) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in text.lines() {
        let (k, v) = l
            .split_once(": ")
            .unwrap_or_else(|| panic!("bad narinfo line {l:?} in\n{text}"));
        m.entry(k.to_owned()).or_default().push(v.to_owned());
    }
    m
}

// ---------------------------------------------------------------------------------------------
// HTTP (nginx)

#[test]
fn http_push_then_nix_substitutes() {
    let Some(ngx) = testbeds::nginx() else { return };
    let c = small_closure();
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "e2e-http.example.org-1");
    let token = tmp.path().join("token");
    fs::write(&token, format!("{}\n", testbeds::HTTP_TOKEN)).expect("token file");
    let path = unique("http-cache");
    let url = ngx.url(&path);

    // Without the token, the server refuses and nixpush says so.
    let denied = run_fail(
        nixpush()
            .arg("push")
            .arg("--to")
            .arg(&url)
            .arg("--key-file")
            .arg(&keys.secret)
            .arg(&c.small)
            .env_remove("NIXPUSH_TOKEN"),
    );
    assert!(
        denied.stderr.contains("401"),
        "no 401 in {}",
        denied.report()
    );
    assert!(
        !denied.stderr.contains(testbeds::HTTP_TOKEN),
        "{}",
        denied.report()
    );

    let to = format!("{url}?token-file={}", token.display());
    let push = || push(&to, &keys, &c.small);
    let first = push();
    assert_eq!(pushed_count(&first), c.all().len(), "{}", first.report());
    assert!(
        !first.stderr.contains(testbeds::HTTP_TOKEN),
        "{}",
        first.report()
    );
    let second = push();
    assert_eq!(pushed_count(&second), 0, "{}", second.report());

    // The files are where Nix looks for them, served with the right types by nginx itself.
    let served = ngx.root.join(&path);
    for p in c.all() {
        assert!(served.join(format!("{}.narinfo", hash_part(&p))).is_file());
    }
    assert!(served.join("nix-cache-info").is_file());

    let root = tmp.path().join("root");
    let copy = nix_copy_from(
        &url,
        &root,
        &[keys.public_key()],
        std::slice::from_ref(&c.small),
    );
    assert_substituted(&root, &c.all(), &copy);
}

// ---------------------------------------------------------------------------------------------
// S3 (SeaweedFS)

const BUCKET: &str = testbeds::PUBLIC_BUCKETS[0];

#[test]
fn s3_push_then_nix_substitutes_over_http() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let c = small_closure();
    let tmp = tempdir();
    let keys = nixpush_keygen(tmp.path(), "e2e-s3.example.org-1");
    let prefix = unique("s3-cache");
    let to = sw.address(BUCKET, &prefix);
    let push = || run_ok(&mut push_cmd(nixpush_s3(), &to, &keys, &c.small));
    let first = push();
    assert_eq!(pushed_count(&first), c.all().len(), "{}", first.report());
    assert!(
        !first.stderr.contains(testbeds::S3_SECRET_KEY),
        "{}",
        first.report()
    );
    let second = push();
    assert_eq!(pushed_count(&second), 0, "{}", second.report());

    // Anonymous readers get every object, with the content types nixpush set.
    let http = format!("{}/{BUCKET}/{prefix}", sw.endpoint());
    let (status, headers, _) = curl("GET", &format!("{http}/nix-cache-info"));
    assert_eq!(status, 200);
    assert_eq!(
        headers.get("content-type").map(String::as_str),
        Some("text/x-nix-cache-info")
    );
    for p in c.all() {
        let (status, headers, body) = curl("GET", &format!("{http}/{}.narinfo", hash_part(&p)));
        assert_eq!(status, 200, "{p}");
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            Some("text/x-nix-narinfo")
        );
        let url = &parse_narinfo(&body)["URL"][0];
        let (status, headers, _) = curl("HEAD", &format!("{http}/{url}"));
        assert_eq!(status, 200, "{url}");
        assert_eq!(
            headers.get("content-type").map(String::as_str),
            Some("application/x-nix-nar")
        );
    }

    let root = tmp.path().join("root");
    let copy = nix_copy_from(
        &http,
        &root,
        &[keys.public_key()],
        std::slice::from_ref(&c.small),
    );
    assert_substituted(&root, &c.all(), &copy);
}

/// `nixpush` with no AWS keys or profile from the environment: the profile files are the
/// ones in `dir` (written by the caller, else empty), HOME is `dir`, and cloud metadata is off.
fn nixpush_s3_profiles(dir: &Path) -> Command {
    for f in ["credentials", "config"] {
        if !dir.join(f).exists() {
            fs::write(dir.join(f), "").expect("profile file");
        }
    }
    let mut c = nixpush();
    for v in [
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
    ] {
        c.env_remove(v);
    }
    c.env("HOME", dir)
        .env("AWS_SHARED_CREDENTIALS_FILE", dir.join("credentials"))
        .env("AWS_CONFIG_FILE", dir.join("config"))
        .env("AWS_EC2_METADATA_DISABLED", "true");
    c
}

/// The one line a failed `nixpush push` printed, which must be `nixpush: error: {expected}`,
/// with each of `once` in it exactly once.
fn error_line_is(out: &Out, expected: &str, once: &[&str]) {
    assert_eq!(
        out.stderr.trim_end(),
        format!("nixpush: error: {expected}"),
        "{}",
        out.report()
    );
    for cause in once {
        assert_eq!(
            out.stderr.matches(cause).count(),
            1,
            "{cause:?} should appear exactly once: {}",
            out.report()
        );
    }
}

/// Each way an S3 cache can be unusable is said once, in words, with what to try: a server
/// that is not there, no credentials, an access key the server does not know, a secret key
/// that does not match, a bucket that does not exist.
#[test]
fn s3_errors_say_their_cause_once_with_what_to_try() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let c = small_closure();
    let tmp = tempdir();
    let prefix = unique("s3-errors");
    let push = |mut cmd: Command, to: &str| {
        run_fail(cmd.args(["push", "--no-sign", "--to"]).arg(to).arg(&c.leaf))
    };
    let at = sw.endpoint();

    // Nothing listens there.
    let port = testbeds::closed_port();
    let to = format!("s3://{BUCKET}/{prefix}?endpoint=http://127.0.0.1:{port}");
    let out = push(nixpush_s3(), &to);
    error_line_is(
        &out,
        &format!(
            "cache s3://{BUCKET}/{prefix} (at http://127.0.0.1:{port}): get \"nix-cache-info\": \
             cannot connect to http://127.0.0.1:{port}: Connection refused (os error 111) (tried \
             5 times); is the server up, and is the address's endpoint= right?"
        ),
        &["Connection refused"],
    );

    // No keys anywhere: what the chain tried, once, and how to give keys.
    let to = sw.address(BUCKET, &prefix);
    let d = tmp.path();
    let out = push(nixpush_s3_profiles(d), &to);
    error_line_is(
        &out,
        &format!(
            "cache s3://{BUCKET}/{prefix} (at {at}): get \"nix-cache-info\": no AWS \
             credentials: the AWS default credential chain tried Environment, Profile, \
             WebIdentityToken, EcsContainer and Ec2InstanceMetadata (IMDS disabled by \
             AWS_EC2_METADATA_DISABLED env var set to `true`); set AWS_ACCESS_KEY_ID and \
             AWS_SECRET_ACCESS_KEY, or give the address profile=NAME (or set AWS_PROFILE) for a \
             profile of {cred} ($AWS_SHARED_CREDENTIALS_FILE) and {conf} ($AWS_CONFIG_FILE)",
            cred = d.join("credentials").display(),
            conf = d.join("config").display(),
        ),
        &["Ec2InstanceMetadata", "Environment"],
    );

    // An access key the server never issued.
    let out = push(
        nixpush_with_s3_keys("nixpush-no-such-key", testbeds::S3_SECRET_KEY),
        &to,
    );
    error_line_is(
        &out,
        &format!(
            "cache s3://{BUCKET}/{prefix} (at {at}): get \"nix-cache-info\": the server does \
             not know the access key ID (InvalidAccessKeyId: The access key ID you provided does \
             not exist in our records.); check AWS_ACCESS_KEY_ID"
        ),
        &["InvalidAccessKeyId"],
    );

    // The right access key with the wrong secret.
    let out = push(
        nixpush_with_s3_keys(testbeds::S3_ACCESS_KEY, "not-the-secret"),
        &to,
    );
    error_line_is(
        &out,
        &format!(
            "cache s3://{BUCKET}/{prefix} (at {at}): get \"nix-cache-info\": the server refused \
             the request's signature (SignatureDoesNotMatch: The request signature we calculated \
             does not match the signature you provided. Check your key and signing method.): \
             the secret key does not belong to the access key ID; check AWS_SECRET_ACCESS_KEY"
        ),
        &["SignatureDoesNotMatch"],
    );
    assert!(!out.stderr.contains("not-the-secret"), "{}", out.report());

    // A bucket that is not there.
    let missing = unique("nixpush-missing");
    let to = sw.address(&missing, "");
    let out = push(nixpush_s3(), &to);
    error_line_is(
        &out,
        &format!(
            "cache s3://{missing} (at {at}): get \"nix-cache-info\": no bucket {missing:?} at \
             {at} (NoSuchBucket: The specified bucket does not exist); create it, or correct \
             the bucket name in the address"
        ),
        &["NoSuchBucket", "does not exist"],
    );
}

/// Keys from an AWS profile: `profile=NAME` in the address, or `AWS_PROFILE`, read from the
/// files `AWS_SHARED_CREDENTIALS_FILE` and `AWS_CONFIG_FILE` name (no network: the profile
/// holds the keys themselves). A profile wins over keys in the environment; a profile with
/// wrong keys or none is named in the error, with the file to look in.
#[test]
fn s3_keys_come_from_an_aws_profile() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let c = small_closure();
    let tmp = tempdir();
    let d = tmp.path();
    let keys = nixpush_keygen(d, "e2e-s3-profile.example.org-1");
    fs::write(
        d.join("credentials"),
        format!(
            "[nixpush-e2e]\naws_access_key_id = {}\naws_secret_access_key = {}\n\n\
             [nixpush-wrong]\naws_access_key_id = {}\naws_secret_access_key = not-the-secret\n",
            testbeds::S3_ACCESS_KEY,
            testbeds::S3_SECRET_KEY,
            testbeds::S3_ACCESS_KEY
        ),
    )
    .expect("credentials file");
    fs::write(
        d.join("config"),
        format!(
            "[profile nixpush-config-only]\naws_access_key_id = {}\n\
             aws_secret_access_key = {}\nregion = {}\n",
            testbeds::S3_ACCESS_KEY,
            testbeds::S3_SECRET_KEY,
            testbeds::S3_REGION
        ),
    )
    .expect("config file");
    let at = sw.endpoint();

    // profile= in the address, with wrong keys in the environment that must not be used.
    let prefix = unique("s3-profile");
    let to = format!("{}&profile=nixpush-e2e", sw.address(BUCKET, &prefix));
    let mut cmd = nixpush_s3_profiles(d);
    cmd.env("AWS_ACCESS_KEY_ID", "nixpush-env-key")
        .env("AWS_SECRET_ACCESS_KEY", "nixpush-env-secret");
    let out = run_ok(&mut push_cmd(cmd, &to, &keys, &c.small));
    assert_eq!(pushed_count(&out), c.all().len(), "{}", out.report());
    let (code, body) = sw.curl_signed("GET", &format!("/{BUCKET}/{prefix}/nix-cache-info"));
    assert_eq!(code, 200, "{body}");

    // AWS_PROFILE, through the default chain; a profile of the config file only.
    for (var, profile) in [
        ("AWS_PROFILE", "nixpush-e2e"),
        ("AWS_PROFILE", "nixpush-config-only"),
    ] {
        let prefix = unique("s3-aws-profile");
        let to = sw.address(BUCKET, &prefix);
        let mut cmd = nixpush_s3_profiles(d);
        cmd.env(var, profile);
        let out = run_ok(&mut push_cmd(cmd, &to, &keys, &c.leaf));
        assert_eq!(pushed_count(&out), 1, "{profile}: {}", out.report());
        let (code, body) = sw.curl_signed("GET", &format!("/{BUCKET}/{prefix}/nix-cache-info"));
        assert_eq!(code, 200, "{profile}: {body}");
    }

    // Wrong keys in the profile: the error says which profile and where it is.
    let prefix = unique("s3-profile-wrong");
    let to = format!("{}&profile=nixpush-wrong", sw.address(BUCKET, &prefix));
    let out = run_fail(&mut push_cmd(nixpush_s3_profiles(d), &to, &keys, &c.leaf));
    let files = format!(
        "{} ($AWS_SHARED_CREDENTIALS_FILE) and {} ($AWS_CONFIG_FILE)",
        d.join("credentials").display(),
        d.join("config").display()
    );
    error_line_is(
        &out,
        &format!(
            "cache s3://{BUCKET}/{prefix} (at {at}): get \"nix-cache-info\": the server refused \
             the request's signature (SignatureDoesNotMatch: The request signature we calculated \
             does not match the signature you provided. Check your key and signing method.): \
             the secret key does not belong to the access key ID; check aws_secret_access_key \
             of profile \"nixpush-wrong\" in {files}"
        ),
        &["SignatureDoesNotMatch"],
    );

    // A profile that is not there.
    let to = format!("{}&profile=nixpush-absent", sw.address(BUCKET, &prefix));
    let out = run_fail(&mut push_cmd(nixpush_s3_profiles(d), &to, &keys, &c.leaf));
    error_line_is(
        &out,
        &format!(
            "cache s3://{BUCKET}/{prefix} (at {at}): get \"nix-cache-info\": no AWS profile \
             \"nixpush-absent\" in {files}; add a [nixpush-absent] section in the credentials \
             file, or [profile nixpush-absent] in the config file, with aws_access_key_id and \
             aws_secret_access_key, or correct profile= in the address"
        ),
        &["nixpush-absent\""],
    );
}

/// Paths for the concurrency test: a chain of ten, ten independent leaves, and two roots that
/// both refer to all of those plus one path of their own.
const OVERLAP_NIX: &str = concat!(
    r#"
{ salt }:
let
"#,
    nix_mk!(),
    r#"  chain = builtins.foldl' (prev: i: mk "np-chain-${toString i}" ''
    { printf 'chain ${toString i} %s\n' "$salt"; ${if prev == null then "" else "echo ${prev};"}
      seq 1 ${toString (2000 * (i + 1))}; } > $out
  '') null (builtins.genList (i: i) 10);
  leaves = builtins.genList (i: mk "np-leaf-${toString i}" ''
    { printf 'leaf ${toString i} %s\n' "$salt"; seq ${toString i} 7 40000; } > $out
  '') 10;
  root = side: mk "np-root-${side}" ''
    mkdir $out
    printf 'root ${side}\n' > $out/side
    printf '%s\n' ${chain} ${builtins.concatStringsSep " " (map toString leaves)} > $out/deps
    printf '%s\n' ${mk "np-own-${side}" "printf 'own ${side} %s\\n' \"$salt\" > $out"} > $out/own
  '';
in { a = root "a"; b = root "b"; }
"#
);

/// One S3 listing entry: ETag and LastModified.
type Version = (String, String);

/// Anonymous ListObjectsV2 of `prefix/` in the public bucket: key → (ETag, LastModified).
fn list_versions(sw: &testbeds::SeaweedFs, prefix: &str) -> BTreeMap<String, Version> {
    let (status, _, body) = curl(
        "GET",
        &format!(
            "{}/{BUCKET}?list-type=2&max-keys=1000&prefix={prefix}/",
            sw.endpoint()
        ),
    );
    assert_eq!(status, 200, "listing: {body}");
    assert!(
        !body.contains("<IsTruncated>true</IsTruncated>"),
        "listing truncated"
    );
    let field = |entry: &str, name: &str| -> String {
        entry
            .split(&format!("<{name}>"))
            .nth(1)
            .and_then(|r| r.split(&format!("</{name}>")).next())
            .unwrap_or_else(|| panic!("no {name} in {entry}"))
            .replace("&#34;", "\"")
            .replace("&quot;", "\"")
    };
    body.split("<Contents>")
        .skip(1)
        .map(|e| {
            let key = field(e, "Key");
            let key = key
                .strip_prefix(&format!("{prefix}/"))
                .unwrap_or(&key)
                .to_owned();
            (key, (field(e, "ETag"), field(e, "LastModified")))
        })
        .collect()
}

#[test]
fn s3_concurrent_pushes_never_rewrite_a_narinfo() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let tmp = tempdir();
    // Different keys and compressions: each process's narinfos and NARs differ from the other's,
    // so a rewrite would show in the content (ETag), whatever the timestamps' resolution.
    let key_a = nixpush_keygen(tmp.path(), "e2e-writer-a.example.org-1");
    let key_b = nixpush_keygen(tmp.path(), "e2e-writer-b.example.org-1");
    let (roots, built) = nix_build_expr(OVERLAP_NIX, &unique("overlap"), &["a", "b"], &[]);
    assert_eq!(roots.len(), 2, "{}", built.report());
    let closure_a = closure_of(&roots[0]);
    let closure_b = closure_of(&roots[1]);
    let union: BTreeSet<String> = closure_a.iter().chain(&closure_b).cloned().collect();
    let shared = closure_a.iter().filter(|p| closure_b.contains(p)).count();
    assert_eq!(
        (union.len(), shared),
        (24, 20),
        "unexpected closures:\n{closure_a:?}\n{closure_b:?}"
    );

    let prefix = unique("concurrent");
    let to = sw.address(BUCKET, &prefix);

    // Watch the prefix while the pushes run: the first version of every key seen.
    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = stop.clone();
        let prefix = prefix.clone();
        std::thread::spawn(move || {
            let mut first: BTreeMap<String, Version> = BTreeMap::new();
            let mut polls = 0;
            loop {
                let done = stop.load(Ordering::SeqCst);
                for (k, v) in list_versions(sw, &prefix) {
                    first.entry(k).or_insert(v);
                }
                polls += 1;
                if done {
                    return (first, polls);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };

    let spawn = |keys: &KeyPair, compression: &str, root: &str| {
        nixpush_s3()
            .arg("push")
            .arg("--to")
            .arg(&to)
            .arg("--key-file")
            .arg(&keys.secret)
            .args(["--compression", compression, "--jobs", "4"])
            .arg(root)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn nixpush")
    };
    let a = spawn(&key_a, "zstd", &roots[0]);
    let b = spawn(&key_b, "xz", &roots[1]);
    let finish = |child: std::process::Child, what: &str| {
        let out = child.wait_with_output().expect("wait for nixpush");
        let out = Out {
            status: out.status,
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            command: format!("nixpush push ({what})"),
        };
        assert!(out.status.success(), "{}", out.report());
        out
    };
    let out_a = finish(a, "writer a");
    let out_b = finish(b, "writer b");
    stop.store(true, Ordering::SeqCst);
    let (first_seen, polls) = watcher.join().expect("watcher thread");
    let last = list_versions(sw, &prefix);

    // Each narinfo was created by exactly one of the two.
    let (pa, pb) = (pushed_count(&out_a), pushed_count(&out_b));
    let raced = |o: &Out| {
        o.stderr
            .lines()
            .filter(|l| l.contains("published meanwhile by another writer"))
            .count()
    };
    eprintln!(
        "concurrent pushes: writer a published {pa} and lost {} races, writer b published {pb} \
         and lost {}, of {} paths ({polls} listings watched)",
        raced(&out_a),
        raced(&out_b),
        union.len()
    );
    assert_eq!(
        pa + pb,
        union.len(),
        "narinfos published twice or not at all:\n{}\n{}",
        out_a.report(),
        out_b.report()
    );

    // Never rewritten: what was first seen of every object is what is there now.
    for (k, v) in &last {
        if k.ends_with(".narinfo") || k == "nix-cache-info" {
            assert_eq!(
                first_seen.get(k),
                Some(v),
                "{k} changed after it was first seen"
            );
        }
    }

    // Every narinfo is there, valid, signed by one of the writers, its NAR present.
    let http = format!("{}/{BUCKET}/{prefix}", sw.endpoint());
    let names = [
        "e2e-writer-a.example.org-1:".to_owned(),
        "e2e-writer-b.example.org-1:".to_owned(),
    ];
    for p in &union {
        let key = format!("{}.narinfo", hash_part(p));
        assert!(last.contains_key(&key), "no narinfo for {p}");
        let (status, _, text) = curl("GET", &format!("{http}/{key}"));
        assert_eq!(status, 200, "{key}");
        let ni = parse_narinfo(&text);
        assert_eq!(ni["StorePath"], vec![p.clone()], "{text}");
        let sigs = ni.get("Sig").cloned().unwrap_or_default();
        assert!(
            sigs.iter()
                .any(|s| names.iter().any(|n| s.starts_with(n.as_str()))),
            "{key} not signed by a writer:\n{text}"
        );
        let url = &ni["URL"][0];
        assert!(last.contains_key(url), "{key} points to missing {url}");
        let ext = match ni["Compression"][0].as_str() {
            "zstd" => ".nar.zst",
            "xz" => ".nar.xz",
            other => panic!("compression {other} in {text}"),
        };
        assert!(url.ends_with(ext), "{text}");
    }

    // A re-push of one root uploads nothing and costs one request: its narinfo is there, so
    // (references first) its closure is too.
    let again =
        run_ok(push_cmd(nixpush_s3(), &to, &key_a, &roots[0]).env("NIXPUSH_LOG", "nixpush=debug"));
    assert_eq!(pushed_count(&again), 0, "{}", again.report());
    let decided = |out: &Out, want: &[&str]| {
        out.stderr
            .lines()
            .any(|l| l.contains("presence decided") && want.iter().all(|w| l.contains(w)))
    };
    assert!(
        decided(
            &again,
            &["present=1", "list_requests=0", "exists_requests=1"]
        ),
        "{}",
        again.report()
    );
    // Naming every path of that closure (22, enough to decide presence from a listing) asks
    // one listing page instead of 22 `HEAD`s.
    let mut all = push_cmd(nixpush_s3(), &to, &key_a, &roots[0]);
    all.args(&closure_a).env("NIXPUSH_LOG", "nixpush=debug");
    let again = run_ok(&mut all);
    assert_eq!(pushed_count(&again), 0, "{}", again.report());
    assert!(
        decided(
            &again,
            &["present=22", "list_requests=1", "exists_requests=0"]
        ),
        "{}",
        again.report()
    );
    // The re-pushes changed nothing; each wrote one announcement of what it was asked for
    // (read by `nixpush gc --keep-since`).
    let now = list_versions(sw, &prefix);
    let added: Vec<&String> = now.keys().filter(|k| !last.contains_key(*k)).collect();
    assert_eq!(added.len(), 2, "one announcement a re-push: {added:?}");
    assert!(
        added.iter().all(|k| k.starts_with("nixpush/announce/")),
        "the re-push added {added:?}"
    );
    let kept: BTreeMap<String, Version> = now
        .into_iter()
        .filter(|(k, _)| last.contains_key(k))
        .collect();
    assert_eq!(kept, last, "the re-push changed the cache");

    // Nix agrees: it substitutes both closures, checking every signature and hash.
    let root = tmp.path().join("root");
    let copy = nix_copy_from(
        &http,
        &root,
        &[key_a.public_key(), key_b.public_key()],
        &roots,
    );
    assert_substituted(&root, &union.iter().cloned().collect::<Vec<_>>(), &copy);
}
