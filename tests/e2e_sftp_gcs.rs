//! End to end over SFTP and GCS, with the real `nixpush` binary and real Nix:
//! - `nixpush push --to sftp://...` into a directory served by OpenSSH's sshd;
//! - `nixpush push --to gs://...` into a bucket of fake-gcs-server.
//!
//! This Nix reads neither `sftp://` nor `gs://`, so what landed is checked directly: every
//! narinfo of the closure parses and says what Nix says about the path (hash, size,
//! references, signature), every NAR is there with the narinfo's size and decompresses to
//! exactly `nix-store --dump`. Then the objects, as files (the SFTP directory itself; the GCS
//! objects downloaded through the emulator's own API), are read by Nix as a `file://` cache:
//! `nix copy` substitutes the closure into a fresh store, signatures required. A second push
//! finds everything present and uploads nothing.
//!
//! What goes wrong with a GCS cache is said once, with what to try; the metadata server (a
//! loopback stand-in named by `GCE_METADATA_HOST`) is asked only with `metadata-server=true`.
//!
//! The servers are the ones the backend tests use (`backends/tests/support/testbeds.rs`).

#![cfg(all(feature = "sftp", feature = "gcs"))]

mod common;

#[path = "../backends/tests/support/testbeds.rs"]
mod testbeds;

use std::fs;
use std::path::Path;

use common::*;
use testbeds as tb;

/// The cache directory `cache` holds the closure of `root` as Nix would: narinfos that say
/// what Nix says, signed by `key_name`, and NARs that decompress to `nix-store --dump`.
fn check_cache(cache: &Path, root: &str, key_name: &str) {
    let paths = closure_of(root);
    let local = nix_path_info(None, &[root.to_owned()]);
    assert_eq!(local.keys().cloned().collect::<Vec<_>>(), paths);
    let nix_hashes: Vec<String> = local.values().map(|i| i.nar_hash.clone()).collect();
    let expected: Vec<String> = paths
        .iter()
        .map(|p| format!("{}.narinfo", hash_part(p)))
        .collect();
    let mut expected_sorted = expected.clone();
    expected_sorted.sort();
    assert_eq!(
        narinfo_files(cache),
        expected_sorted,
        "the narinfos in the cache"
    );
    assert!(cache.join("nix-cache-info").is_file(), "no nix-cache-info");
    for ((path, info), nar_hash) in local.iter().zip(nix_to_base32(&nix_hashes)) {
        let ni = RawNarInfo::read(cache, path);
        let ctx = format!("narinfo of {path}:\n{}", ni.text);
        assert_eq!(ni.one("StorePath"), path, "{ctx}");
        assert_eq!(ni.one("NarHash"), nar_hash, "{ctx}");
        assert_eq!(ni.one("NarSize"), info.nar_size.to_string(), "{ctx}");
        let refs: Vec<&str> = info.references.iter().map(|r| base_name(r)).collect();
        assert_eq!(ni.one("References"), refs.join(" "), "{ctx}");
        assert!(
            ni.all("Sig")
                .iter()
                .any(|s| s.starts_with(&format!("{key_name}:"))),
            "no signature by {key_name}; {ctx}"
        );
        let nar = cache.join(ni.one("URL"));
        let size = fs::metadata(&nar)
            .unwrap_or_else(|e| panic!("{}: {e}; {ctx}", nar.display()))
            .len();
        assert_eq!(ni.one("FileSize"), size.to_string(), "{ctx}");
        let ours = digest_stream(decompressor(
            fs::File::open(&nar).expect("open NAR"),
            ni.one("Compression"),
        ))
        .unwrap_or_else(|e| panic!("cannot decompress {}: {e}", nar.display()));
        assert_eq!(
            ours,
            nix_dump_digest(path),
            "{} does not decompress to `nix-store --dump {path}`",
            nar.display()
        );
    }
}

/// Nix itself substitutes the closure of `root` from `cache` (as `file://`) into a fresh
/// store, trusting only `keys`.
fn nix_substitutes(cache: &Path, keys: &KeyPair, root: &str, scratch: &Path) {
    let store = scratch.join("fresh-store");
    let out = run_ok(&mut nix_copy_cmd(
        cache,
        &store,
        &keys.public_key(),
        &[root.to_owned()],
    ));
    for p in closure_of(root) {
        assert!(
            valid_in_root(&store, &p),
            "{p} not substituted into {}: {}",
            store.display(),
            out.report()
        );
    }
}

#[test]
fn sftp_push_lands_a_cache_nix_can_read() {
    let Some(sshd) = tb::sshd() else { return };
    let c = small_closure();
    let tmp = tempdir();
    let name = "e2e-sftp.example.org-1";
    let keys = nixpush_keygen(tmp.path(), name);
    // A directory that does not exist yet, two levels down.
    let cache = sshd.fresh_dir("e2e").join("caches/main");
    let to = sshd.address(&cache);

    let first = push(&to, &keys, &c.small);
    assert_eq!(pushed_count(&first), c.all().len(), "{}", first.report());
    check_cache(&cache, &c.small, name);
    let leftovers: Vec<_> = fs::read_dir(cache.join("nar"))
        .expect("nar directory")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(".nixpush-"))
        .collect();
    assert!(leftovers.is_empty(), "temporary files left: {leftovers:?}");

    let second = push(&to, &keys, &c.small);
    assert_eq!(pushed_count(&second), 0, "{}", second.report());

    nix_substitutes(&cache, &keys, &c.small, tmp.path());

    // A wrong host key stops the push, and says why.
    let bad_kh = tmp.path().join("known_hosts");
    fs::write(&bad_kh, "").unwrap();
    let refused = run_fail(
        nixpush()
            .arg("push")
            .arg("--to")
            .arg(format!(
                "sftp://{}@127.0.0.1:{}{}?identity={}&known-hosts={}",
                sshd.user,
                sshd.port,
                cache.display(),
                sshd.client_key.display(),
                bad_kh.display()
            ))
            .arg("--key-file")
            .arg(&keys.secret)
            .arg(&c.small),
    );
    assert!(refused.stderr.contains("host key"), "{}", refused.report());
}

#[test]
fn gcs_push_lands_a_cache_nix_can_read() {
    let Some(g) = tb::fake_gcs() else { return };
    let c = small_closure();
    let tmp = tempdir();
    let name = "e2e-gcs.example.org-1";
    let keys = nixpush_keygen(tmp.path(), name);
    let bucket = "e2e-cache";
    g.create_bucket(bucket);
    let prefix = tb::unique("cache");
    let to = g.address(bucket, &prefix);

    let first = push(&to, &keys, &c.small);
    assert_eq!(pushed_count(&first), c.all().len(), "{}", first.report());
    let second = push(&to, &keys, &c.small);
    assert_eq!(pushed_count(&second), 0, "{}", second.report());

    // Download every object under the prefix through the emulator's JSON API.
    let (status, listing) = tb::http_request(
        g.port,
        "GET",
        &format!("/storage/v1/b/{bucket}/o?prefix={prefix}/"),
        "",
    );
    assert_eq!(status, 200, "{listing}");
    let listing: serde_json::Value = serde_json::from_str(&listing).expect("listing JSON");
    let names: Vec<String> = listing["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|i| i["name"].as_str().expect("name").to_owned())
        .collect();
    assert!(
        listing.get("nextPageToken").is_none(),
        "more objects than one page"
    );
    let cache = tmp.path().join("downloaded");
    for name in &names {
        let rel = name
            .strip_prefix(&format!("{prefix}/"))
            .unwrap_or_else(|| panic!("{name} outside the prefix"));
        let encoded: String = url::form_urlencoded::byte_serialize(name.as_bytes()).collect();
        let (status, body) = tb::http_request_bytes(
            g.port,
            "GET",
            &format!("/storage/v1/b/{bucket}/o/{encoded}?alt=media"),
            b"",
        );
        assert_eq!(status, 200, "downloading {name}");
        let dest = cache.join(rel);
        fs::create_dir_all(dest.parent().unwrap()).unwrap();
        fs::write(&dest, body).unwrap();
    }
    check_cache(&cache, &c.small, name);
    // Only what belongs in a cache: narinfos, NARs and nix-cache-info, and one announcement
    // a push (read by `nixpush gc --keep-since`).
    let announcements = names
        .iter()
        .filter(|n| n.starts_with(&format!("{prefix}/nixpush/announce/")))
        .count();
    assert_eq!(announcements, 2, "{names:?}");
    assert_eq!(names.len(), 2 * c.all().len() + 1 + 2, "{names:?}");

    nix_substitutes(&cache, &keys, &c.small, tmp.path());
}

/// A loopback stand-in for a metadata server or a token endpoint: answers every request with
/// one canned response and keeps each request's first line and headers. It lives until the
/// test process ends (a thread blocked in `accept`).
struct StandIn {
    port: u16,
    requests: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl StandIn {
    fn start(status: u16, headers: &'static str, body: &'static str) -> Self {
        use std::io::{BufRead as _, Read as _, Write as _};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("addr").port();
        let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = requests.clone();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { return };
                let mut r = std::io::BufReader::new(conn);
                let mut head = String::new();
                let mut len = 0usize;
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 || line.trim().is_empty() {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                        len = v.trim().parse().unwrap_or(0);
                    }
                    head.push_str(&line);
                }
                let mut body_in = vec![0; len];
                let _ = r.read_exact(&mut body_in);
                log.lock().unwrap_or_else(|e| e.into_inner()).push(head);
                let resp = format!(
                    "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{headers}\
                     Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                let mut conn = r.into_inner();
                let _ = conn.write_all(resp.as_bytes());
            }
        });
        StandIn { port, requests }
    }

    fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// A fresh RSA key in PKCS#8 PEM (`BEGIN PRIVATE KEY`), as service-account files hold.
fn rsa_private_key() -> String {
    run_ok(std::process::Command::new("openssl").args([
        "genpkey",
        "-algorithm",
        "RSA",
        "-pkeyopt",
        "rsa_keygen_bits:2048",
    ]))
    .stdout
}

/// `nixpush` with no Google credentials to find: HOME is `home` (no gcloud file there), no
/// `GOOGLE_APPLICATION_CREDENTIALS`, no `GCE_METADATA_HOST`.
fn nixpush_gcs(home: &Path) -> std::process::Command {
    let mut c = nixpush();
    c.env("HOME", home)
        .env_remove("GOOGLE_APPLICATION_CREDENTIALS")
        .env_remove("GCE_METADATA_HOST");
    c
}

/// The one line a failed command printed, `nixpush: error: {expected}`, with each of `once`
/// in it exactly once.
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

/// Each way a GCS cache can be unusable is said once, in words, with what to try: a server that
/// is not there, no credentials, credentials the token endpoint refuses, a missing bucket.
#[test]
fn gcs_errors_say_their_cause_once_with_what_to_try() {
    let Some(g) = tb::fake_gcs() else { return };
    let c = small_closure();
    let tmp = tempdir();
    let home = tmp.path();
    let push = |mut cmd: std::process::Command, to: &str| {
        run_fail(cmd.args(["push", "--no-sign", "--to"]).arg(to).arg(&c.leaf))
    };

    let port = tb::closed_port();
    let out = push(
        nixpush_gcs(home),
        &format!("gs://e2e-errors?endpoint=http://127.0.0.1:{port}&anonymous=true"),
    );
    error_line_is(
        &out,
        &format!(
            "cache gs://e2e-errors (at http://127.0.0.1:{port}/): get \"nix-cache-info\": cannot \
             connect to http://127.0.0.1:{port}: Connection refused (os error 111); is the \
             server up, and is the address's endpoint= right?"
        ),
        &["Connection refused"],
    );

    let to = format!("gs://e2e-errors?endpoint={}", g.endpoint());
    let out = push(nixpush_gcs(home), &to);
    error_line_is(
        &out,
        &format!(
            "invalid cache address {to:?}: no credentials: give credentials=FILE (a \
             service-account key), set GOOGLE_APPLICATION_CREDENTIALS, run `gcloud auth \
             application-default login`, give metadata-server=true on a Compute Engine VM or in \
             GKE (the metadata server is asked only then), or give anonymous=true (public \
             buckets, emulators)"
        ),
        &["no credentials"],
    );

    // A token endpoint that refuses the service account's JWT.
    let token = StandIn::start(
        400,
        "",
        r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#,
    );
    let sa = tmp.path().join("sa.json");
    fs::write(
        &sa,
        serde_json::json!({
            "type": "service_account",
            "private_key": rsa_private_key(),
            "client_email": "pusher@nixpush-test.iam.gserviceaccount.com",
            "token_uri": format!("http://{}/token", token.host()),
        })
        .to_string(),
    )
    .expect("credentials file");
    let bucket = "e2e-errors-refused";
    g.create_bucket(bucket);
    let out = push(
        nixpush_gcs(home),
        &format!(
            "gs://{bucket}?endpoint={}&credentials={}",
            g.endpoint(),
            sa.display()
        ),
    );
    error_line_is(
        &out,
        &format!(
            "cache gs://{bucket} (at {}/): get \"nix-cache-info\": http://{}/token refused the \
             credentials (400 Bad Request: invalid_grant: Invalid JWT Signature.); check the \
             service account pusher@nixpush-test.iam.gserviceaccount.com (from {}): its key may \
             have been deleted or disabled",
            g.endpoint(),
            token.host(),
            sa.display()
        ),
        &["invalid_grant"],
    );
    assert_eq!(token.requests().len(), 1, "{:?}", token.requests());

    let missing = tb::unique("e2e-missing");
    let out = push(nixpush_gcs(home), &g.address(&missing, ""));
    assert!(
        out.stderr.trim_end().starts_with(&format!(
            "nixpush: error: cache gs://{missing} (at {}/): put \"nix-cache-info\": no bucket \
             {missing:?} (404 Not Found",
            g.endpoint()
        )) && out
            .stderr
            .trim_end()
            .ends_with("); create it, or correct the bucket name in the address"),
        "{}",
        out.report()
    );
    assert_eq!(out.stderr.lines().count(), 1, "{}", out.report());
}

/// The metadata server is asked for a token only when the address says `metadata-server=true`
/// (here a loopback stand-in, named by `GCE_METADATA_HOST` as on GKE's own set-up), once per
/// push, with `Metadata-Flavor: Google`; without the parameter it is never contacted, and a
/// server that does not answer as a metadata server is refused.
#[test]
fn gcs_asks_the_metadata_server_only_when_told_to() {
    let Some(g) = tb::fake_gcs() else { return };
    let c = small_closure();
    let tmp = tempdir();
    let home = tmp.path();
    let keys = nixpush_keygen(tmp.path(), "e2e-gcs-metadata.example.org-1");
    let bucket = "e2e-metadata";
    g.create_bucket(bucket);
    let md = StandIn::start(
        200,
        "Metadata-Flavor: Google\r\n",
        r#"{"access_token":"ya29.stand-in","expires_in":3599,"token_type":"Bearer"}"#,
    );

    // Not asked for: refused at once, the stand-in never hears of it.
    let prefix = tb::unique("md");
    let plain = format!("gs://{bucket}/{prefix}?endpoint={}", g.endpoint());
    let mut cmd = nixpush_gcs(home);
    cmd.env("GCE_METADATA_HOST", md.host());
    let out = run_fail(&mut push_cmd(cmd, &plain, &keys, &c.leaf));
    assert!(
        out.stderr.contains("give metadata-server=true"),
        "{}",
        out.report()
    );
    assert_eq!(md.requests(), Vec::<String>::new());

    // Asked for: one token for the whole push.
    let to = format!("{plain}&metadata-server=true");
    let mut cmd = nixpush_gcs(home);
    cmd.env("GCE_METADATA_HOST", md.host());
    let out = run_ok(&mut push_cmd(cmd, &to, &keys, &c.small));
    assert_eq!(pushed_count(&out), c.all().len(), "{}", out.report());
    let reqs = md.requests();
    assert_eq!(reqs.len(), 1, "one token, cached: {reqs:?}");
    let first_line = reqs[0].lines().next().unwrap_or("");
    assert_eq!(
        first_line,
        "GET /computeMetadata/v1/instance/service-accounts/default/token?scopes=https%3A%2F%2Fwww.googleapis.com%2Fauth%2Fdevstorage.read_write HTTP/1.1",
        "{reqs:?}"
    );
    assert!(
        reqs[0]
            .lines()
            .any(|l| l.eq_ignore_ascii_case("metadata-flavor: Google")),
        "{reqs:?}"
    );
    let (status, _) = tb::http_request(
        g.port,
        "GET",
        &format!("/storage/v1/b/{bucket}/o/{prefix}%2Fnix-cache-info"),
        "",
    );
    assert_eq!(status, 200);

    // Something else at that address: not taken for a metadata server.
    let impostor = StandIn::start(200, "", r#"{"access_token":"not-from-google"}"#);
    let mut cmd = nixpush_gcs(home);
    cmd.env("GCE_METADATA_HOST", impostor.host());
    let out = run_fail(&mut push_cmd(cmd, &to, &keys, &c.leaf));
    error_line_is(
        &out,
        &format!(
            "cache gs://{bucket}/{prefix} (at {}/): get \"nix-cache-info\": http://{} answered \
             without \"Metadata-Flavor: Google\", so it is not a metadata server; is this a \
             Compute Engine VM or a GKE pod (with Workload Identity)? Elsewhere give \
             credentials=FILE",
            g.endpoint(),
            impostor.host()
        ),
        &["Metadata-Flavor"],
    );
}
