//! The SFTP and GCS backends on real servers: OpenSSH's sshd and fake-gcs-server, started by
//! `support/testbeds.rs`. Beyond the shared conformance suite (run on them in
//! `big_sftp_gcs.rs`), the things only these backends have: host keys, SSH keys and agents, reconnection, objects landing as files on the server;
//! GCS tokens (a service account's JWT, checked against a local token endpoint), refused
//! credentials, missing buckets and pagination.

// Needs both backends compiled in (the default).
#![cfg(all(feature = "sftp", feature = "gcs"))]

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use nixpush_backends::gcs::{GcsBackend, GcsConfig, GcsCredentials};
use nixpush_backends::sftp::{HostKeyCheck, SftpAuth, SftpBackend, SftpConfig};
use nixpush_backends::{Backend, BackendExt as _, Body, ErrorKind, PutMode};
use support::suite::*;
use support::testbeds as tb;

// ---------------------------------------------------------------------------------------------
// SFTP

fn sftp_config(sshd: &tb::Sshd, dir: &Path) -> SftpConfig {
    SftpConfig::parse(&sshd.address(dir)).expect("sftp address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_objects_land_as_files_in_new_directories() {
    let Some(sshd) = tb::sshd() else { return };
    let dir = sshd.fresh_dir("layout");
    // The cache directory itself does not exist yet: the first put creates it.
    let root = dir.join("a/cache");
    let b = nixpush_backends::open(&sshd.address(&root))
        .await
        .expect("open");
    assert!(b.describe().starts_with("sftp://"), "{}", b.describe());
    assert!(!b.exists("nix-cache-info").await.unwrap());
    assert_eq!(b.list("").await.unwrap(), Vec::<String>::new());
    b.put(
        "nix-cache-info",
        Body::Bytes(Bytes::from_static(b"StoreDir: /nix/store\n")),
        opts(PutMode::Create),
    )
    .await
    .expect("create nix-cache-info");
    let file = staged(3 << 20, 7);
    let expected = std::fs::read(&file).unwrap();
    b.put("nar/deep/x.nar", Body::File(file), opts(PutMode::Overwrite))
        .await
        .expect("put a staged file");
    assert_eq!(
        files_below(&root),
        ["nar/deep/x.nar", "nix-cache-info"],
        "no temporary file may be left behind"
    );
    assert_eq!(
        std::fs::read(root.join("nar/deep/x.nar")).unwrap(),
        expected,
        "the file on the server"
    );
    assert_eq!(
        &get_all(&*b, "nix-cache-info").await[..],
        b"StoreDir: /nix/store\n"
    );
    assert_eq!(get_all(&*b, "nar/deep/x.nar").await.to_vec(), expected);
    // Overwrite replaces; create refuses and leaves the file.
    b.put(
        "nar/deep/x.nar",
        Body::Bytes(Bytes::from_static(b"short")),
        opts(PutMode::Overwrite),
    )
    .await
    .unwrap();
    assert_eq!(
        std::fs::read(root.join("nar/deep/x.nar")).unwrap(),
        b"short"
    );
    let msg = expect_kind(
        b.put(
            "nix-cache-info",
            Body::File(staged(100_000, 1)),
            opts(PutMode::Create),
        )
        .await,
        ErrorKind::AlreadyExists,
        "create over an existing file",
    );
    assert!(msg.contains("nix-cache-info"), "{msg}");
    assert_eq!(
        std::fs::read(root.join("nix-cache-info")).unwrap(),
        b"StoreDir: /nix/store\n"
    );
    assert_eq!(
        files_below(&root),
        ["nar/deep/x.nar", "nix-cache-info"],
        "a refused create left a temporary file"
    );
    // Temporary files of a crashed writer are not objects.
    std::fs::write(root.join("nar/.nixpush-dead.tmp"), b"partial").unwrap();
    let listed: BTreeSet<String> = b.list("").await.unwrap().into_iter().collect();
    assert_eq!(
        listed,
        ["nar/deep/x.nar", "nix-cache-info"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    );
    b.delete("nar/deep/x.nar").await.unwrap();
    assert!(!root.join("nar/deep/x.nar").exists());
}

#[tokio::test]
async fn sftp_unknown_host_key_is_permission() {
    let Some(sshd) = tb::sshd() else { return };
    let dir = sshd.fresh_dir("unknown-host");
    let empty = dir.join("empty_known_hosts");
    std::fs::write(&empty, "").unwrap();
    let mut config = sftp_config(sshd, &dir);
    config.host_keys = HostKeyCheck::KnownHosts(empty.clone());
    let b = SftpBackend::new(config);
    for _ in 0..2 {
        let msg = expect_kind(b.exists("k").await, ErrorKind::Permission, "unknown host");
        assert!(
            msg.contains("is not in") && msg.contains("empty_known_hosts"),
            "{msg}"
        );
    }
    expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Overwrite))
            .await,
        ErrorKind::Permission,
        "put to an unknown host",
    );
    assert!(!dir.join("k").exists());
}

#[tokio::test]
async fn sftp_changed_host_key_is_permission() {
    let Some(sshd) = tb::sshd() else { return };
    let dir = sshd.fresh_dir("changed-host");
    let other = dir.join("other_host_key");
    tb::keygen(&other);
    let public = std::fs::read_to_string(dir.join("other_host_key.pub")).unwrap();
    let kh = dir.join("known_hosts");
    std::fs::write(&kh, format!("[127.0.0.1]:{} {public}", sshd.port)).unwrap();
    let mut config = sftp_config(sshd, &dir);
    config.host_keys = HostKeyCheck::KnownHosts(kh);
    let b = SftpBackend::new(config);
    let msg = expect_kind(
        b.exists("k").await,
        ErrorKind::Permission,
        "changed host key",
    );
    assert!(msg.contains("DIFFERS"), "{msg}");
}

#[tokio::test]
async fn sftp_any_host_key_only_when_asked() {
    let Some(sshd) = tb::sshd() else { return };
    let dir = sshd.fresh_dir("any-host");
    let addr = format!(
        "sftp://{}@127.0.0.1:{}{}?identity={}&insecure-accept-any-host-key=true",
        sshd.user,
        sshd.port,
        dir.display(),
        sshd.client_key.display()
    );
    let b = nixpush_backends::open(&addr).await.expect("open");
    b.put("k", Body::Bytes("x".into()), opts(PutMode::Create))
        .await
        .expect("put with any host key accepted");
    assert_eq!(std::fs::read(dir.join("k")).unwrap(), b"x");
}

#[tokio::test]
async fn sftp_wrong_key_is_permission() {
    let Some(sshd) = tb::sshd() else { return };
    let dir = sshd.fresh_dir("wrong-key");
    std::fs::write(dir.join("present"), b"x").unwrap();
    let key = dir.join("stranger");
    tb::keygen(&key);
    let addr = format!(
        "sftp://{}@127.0.0.1:{}{}?identity={}&known-hosts={}",
        sshd.user,
        sshd.port,
        dir.display(),
        key.display(),
        sshd.known_hosts.display()
    );
    let b = nixpush_backends::open(&addr).await.expect("open");
    let msg = expect_kind(b.exists("present").await, ErrorKind::Permission, "exists");
    assert!(msg.contains("stranger"), "the message names the key: {msg}");
    expect_ops_fail(&*b, ErrorKind::Permission, "present").await;
    assert!(dir.join("present").exists(), "a refused delete deleted");
}

#[tokio::test]
async fn sftp_authenticates_with_ssh_agent() {
    let Some(sshd) = tb::sshd() else { return };
    let dir = sshd.fresh_dir("agent");
    let agent = tb::Agent::start(&sshd.client_key);
    let mut config = sftp_config(sshd, &dir);
    config.auth = SftpAuth {
        identity: None,
        agent: Some(agent.socket.clone()),
        default_keys: Vec::new(),
    };
    let b = SftpBackend::new(config.clone());
    b.put("k", Body::Bytes("by agent".into()), opts(PutMode::Create))
        .await
        .expect("put authenticated by the agent");
    assert_eq!(std::fs::read(dir.join("k")).unwrap(), b"by agent");

    // An agent with only a key the server does not know: refused, and said so.
    let stranger = dir.join("stranger");
    tb::keygen(&stranger);
    let other_agent = tb::Agent::start(&stranger);
    config.auth.agent = Some(other_agent.socket.clone());
    let msg = expect_kind(
        SftpBackend::new(config.clone()).exists("k").await,
        ErrorKind::Permission,
        "agent with a wrong key",
    );
    assert!(msg.contains("ssh-agent key"), "{msg}");
    // No key at all is a configuration error.
    config.auth.agent = None;
    expect_kind(
        SftpBackend::new(config).exists("k").await,
        ErrorKind::Config,
        "no key at all",
    );
}

#[tokio::test]
async fn sftp_unreachable_server_is_transient() {
    let port = tb::closed_port();
    let b = nixpush_backends::open(&format!(
        "sftp://u@127.0.0.1:{port}/c?insecure-accept-any-host-key=true"
    ))
    .await
    .expect("open makes no request");
    let started = std::time::Instant::now();
    expect_kind(b.exists("k").await, ErrorKind::Transient, "exists");
    expect_ops_fail(&*b, ErrorKind::Transient, "k").await;
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_reconnects_after_the_connection_drops() {
    // A server of its own: its connections are this test's to cut.
    let Some(sshd) = tb::private_sshd() else {
        return;
    };
    let dir = sshd.fresh_dir("reconnect");
    let b = SftpBackend::new(sftp_config(&sshd, &dir));
    b.put("a", Body::Bytes("1".into()), opts(PutMode::Create))
        .await
        .unwrap();
    assert_eq!(sshd.connections(), 1);
    for pid in sshd.connection_pids() {
        let _ = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status();
    }
    let start = std::time::Instant::now();
    while sshd.connections() > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "connection processes linger"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Each idempotent operation gets through, on a new connection if need be.
    assert!(
        b.exists("a")
            .await
            .expect("exists after the connection died")
    );
    assert_eq!(&get_all(&b, "a").await[..], b"1");
    assert_eq!(b.list("").await.unwrap(), ["a"]);
    b.put("b", Body::Bytes("2".into()), opts(PutMode::Create))
        .await
        .expect("put after reconnecting");
    assert_eq!(std::fs::read(dir.join("b")).unwrap(), b"2");
    assert_eq!(sshd.connections(), 1, "one new connection");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_parallel_transfers_share_one_connection() {
    let Some(sshd) = tb::private_sshd() else {
        return;
    };
    let dir = sshd.fresh_dir("parallel");
    let b = Arc::new(SftpBackend::new(sftp_config(&sshd, &dir)));
    let tasks: Vec<_> = (0..12u64)
        .map(|i| {
            let b = b.clone();
            tokio::spawn(async move {
                let len = 300_000 + i as usize * 1000;
                let file = staged(len, i as u8);
                let key = format!("nar/{i}.nar");
                b.put(&key, Body::File(file), opts(PutMode::Overwrite))
                    .await
                    .expect("parallel put");
                assert_eq!(get_len(&*b, &key).await, len as u64);
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(sshd.connections(), 1, "12 transfers, one connection");
    assert_eq!(b.list("nar/").await.unwrap().len(), 12);
}

#[tokio::test]
async fn sftp_addresses_are_checked_when_opened() {
    for (addr, needle) in [
        ("sftp://u@h/c?bogus=1", "\"bogus\""),
        ("sftp://u@h/c?identity=/nonexistent/key", "/nonexistent/key"),
        (
            "sftp://u@h/c?known-hosts=/nonexistent/kh",
            "/nonexistent/kh",
        ),
    ] {
        expect_invalid(addr, needle).await;
    }
}

// ---------------------------------------------------------------------------------------------
// GCS

fn gcs(g: &tb::FakeGcs, bucket: &str, prefix: &str) -> GcsBackend {
    GcsBackend::new(GcsConfig::parse(&g.address(bucket, prefix)).expect("gs address"))
        .expect("open gcs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_round_trips_through_both_upload_kinds() {
    let Some(g) = tb::fake_gcs() else { return };
    g.create_bucket("roundtrip");
    let prefix = tb::unique("p");
    let b = nixpush_backends::open(&g.address("roundtrip", &prefix))
        .await
        .expect("open");
    b.put("x.narinfo", Body::Bytes("a".into()), opts(PutMode::Create))
        .await
        .unwrap();
    // Over the resumable threshold, not a multiple of the chunk size.
    let big = staged((20 << 20) + 12_345, 3);
    let expected = std::fs::read(&big).unwrap();
    b.put("nar/big.nar", Body::File(big), opts(PutMode::Overwrite))
        .await
        .expect("resumable upload");
    assert_eq!(get_all(&*b, "nar/big.nar").await.to_vec(), expected);
    // A create of a large file is one conditional request: refused over an existing object.
    expect_kind(
        b.put(
            "nar/big.nar",
            Body::File(staged(20 << 20, 4)),
            opts(PutMode::Create),
        )
        .await,
        ErrorKind::AlreadyExists,
        "create a large file over an existing one",
    );
    assert_eq!(get_all(&*b, "nar/big.nar").await.to_vec(), expected);
    b.put(
        "nar/big2.nar",
        Body::File(staged(20 << 20, 5)),
        opts(PutMode::Create),
    )
    .await
    .expect("create a large file");
    assert_eq!(get_len(&*b, "nar/big2.nar").await, 20 << 20);
    // The objects sit under the prefix in the bucket.
    let (status, body) = tb::http_request(
        g.port,
        "GET",
        &format!("/storage/v1/b/roundtrip/o?prefix={prefix}/"),
        "",
    );
    assert_eq!(status, 200, "{body}");
    for name in ["x.narinfo", "nar/big.nar", "nar/big2.nar"] {
        assert!(
            body.contains(&format!("\"{prefix}/{name}\"")),
            "{name} in {body}"
        );
    }
}

#[tokio::test]
async fn gcs_lists_across_pages() {
    let Some(g) = tb::fake_gcs() else { return };
    g.create_bucket("pages");
    let prefix = tb::unique("p");
    let b = gcs(g, "pages", &prefix).with_list_page_size(2);
    let mut want = BTreeSet::new();
    for i in 0..7 {
        let k = format!("dir/{i}");
        b.put(
            &k,
            Body::Bytes(Bytes::from(k.clone())),
            opts(PutMode::Overwrite),
        )
        .await
        .unwrap();
        want.insert(k);
    }
    b.put("other", Body::Bytes("o".into()), opts(PutMode::Overwrite))
        .await
        .unwrap();
    let got: BTreeSet<String> = b.list("dir/").await.unwrap().into_iter().collect();
    assert_eq!(got, want);
    assert_eq!(b.list("").await.unwrap().len(), 8);
}

/// A missing bucket: uploads and listing say so ([`ErrorKind::Config`]); object reads cannot
/// tell it from a missing object on this server (a bare 404), as the gcs module documents.
#[tokio::test]
async fn gcs_missing_bucket_is_config() {
    let Some(g) = tb::fake_gcs() else { return };
    let b = gcs(g, "no-such-bucket-here", "");
    for (body, mode, what) in [
        (Body::Bytes("x".into()), PutMode::Overwrite, "put"),
        (Body::Bytes("x".into()), PutMode::Create, "create"),
        (
            Body::File(staged(20 << 20, 1)),
            PutMode::Overwrite,
            "resumable upload",
        ),
    ] {
        let msg = expect_kind(b.put("k", body, opts(mode)).await, ErrorKind::Config, what);
        assert!(msg.contains("no-such-bucket-here"), "{msg}");
    }
    expect_kind(b.list("").await, ErrorKind::Config, "list");
    expect_kind(b.get("k").await.map(|_| ()), ErrorKind::NotFound, "get");
    assert!(!b.exists("k").await.unwrap());
    b.delete("k").await.expect("delete of an absent key");
}

#[tokio::test]
async fn gcs_unreachable_server_is_transient() {
    let port = tb::closed_port();
    let b = nixpush_backends::open(&format!(
        "gs://bucket?endpoint=http://127.0.0.1:{port}&anonymous=true"
    ))
    .await
    .unwrap();
    expect_kind(b.exists("k").await, ErrorKind::Transient, "exists");
    expect_kind(
        b.put(
            "k",
            Body::File(staged(20 << 20, 1)),
            opts(PutMode::Overwrite),
        )
        .await,
        ErrorKind::Transient,
        "resumable put",
    );
    expect_ops_fail(&*b, ErrorKind::Transient, "k").await;
}

#[tokio::test]
async fn gcs_addresses_are_checked_when_opened() {
    for (addr, needle) in [
        ("gs://bucket?anonymous=true&bogus=1", "\"bogus\""),
        (
            "gs://bucket?credentials=/nonexistent/sa.json",
            "/nonexistent/sa.json",
        ),
        ("gs://bucket?credentials=/x&anonymous=true", "not both"),
    ] {
        expect_invalid(addr, needle).await;
    }
}

// A scripted HTTP server, for what fake-gcs-server does not do: tokens and refusals.

#[derive(Debug, Clone)]
struct Request {
    method: String,
    path: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

type Handler = Arc<dyn Fn(&Request) -> (u16, String) + Send + Sync>;

struct Scripted {
    port: u16,
    requests: Arc<Mutex<Vec<Request>>>,
}

impl Scripted {
    async fn start(handler: impl Fn(&Request) -> (u16, String) + Send + Sync + 'static) -> Self {
        use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let requests = Arc::new(Mutex::new(Vec::new()));
        let handler: Handler = Arc::new(handler);
        let log = requests.clone();
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (handler, log) = (handler.clone(), log.clone());
                tokio::spawn(async move {
                    let mut r = tokio::io::BufReader::new(conn);
                    let mut line = String::new();
                    if r.read_line(&mut line).await.unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let method = parts.next().unwrap_or("").to_owned();
                    let path = parts.next().unwrap_or("").to_owned();
                    let mut headers = Vec::new();
                    loop {
                        let mut h = String::new();
                        if r.read_line(&mut h).await.unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.push((k.trim().to_owned(), v.trim().to_owned()));
                        }
                    }
                    let len: usize = headers
                        .iter()
                        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                    let mut body = vec![0; len];
                    if r.read_exact(&mut body).await.is_err() {
                        return;
                    }
                    let req = Request {
                        method,
                        path,
                        headers,
                        body,
                    };
                    let (status, text) = handler(&req);
                    log.lock().unwrap().push(req);
                    let resp = format!(
                        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n\
                         Content-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let mut conn = r.into_inner();
                    let _ = conn.write_all(resp.as_bytes()).await;
                    let _ = conn.shutdown().await;
                });
            }
        });
        Scripted { port, requests }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }
}

/// A service-account key file for `client_email`, whose tokens come from `token_uri`; and the
/// key pair, to check signatures.
fn service_account(
    dir: &Path,
    token_uri: &str,
) -> (std::path::PathBuf, aws_lc_rs::signature::RsaKeyPair) {
    use aws_lc_rs::encoding::{AsDer as _, Pkcs8V1Der};
    use base64::Engine as _;
    let key = aws_lc_rs::signature::RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
        .expect("RSA key");
    let der: Pkcs8V1Der = key.as_der().expect("PKCS#8");
    let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
    let mut pem = String::from("-----BEGIN PRIVATE KEY-----\n");
    for line in b64.as_bytes().chunks(64) {
        pem.push_str(std::str::from_utf8(line).unwrap());
        pem.push('\n');
    }
    pem.push_str("-----END PRIVATE KEY-----\n");
    let file = dir.join("sa.json");
    let json = serde_json::json!({
        "type": "service_account",
        "project_id": "nixpush-test",
        "private_key_id": "key-id-1",
        "private_key": pem,
        "client_email": "pusher@nixpush-test.iam.gserviceaccount.com",
        "token_uri": token_uri,
    });
    std::fs::write(&file, json.to_string()).unwrap();
    (file, key)
}

fn b64url_decode(s: &str) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s)
        .unwrap_or_else(|e| panic!("{s:?} is not base64url: {e}"))
}

#[tokio::test]
async fn gcs_service_account_signs_a_jwt_and_sends_the_token() {
    let server = Scripted::start(|r| {
        if r.path == "/token" {
            (
                200,
                r#"{"access_token":"tok-1","expires_in":3600,"token_type":"Bearer"}"#.into(),
            )
        } else if r.method == "GET" && r.path.contains("/o/pre%2Fpresent?") {
            (200, r#"{"name":"present"}"#.into())
        } else {
            (
                404,
                r#"{"error":{"code":404,"message":"No such object"}}"#.into(),
            )
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (file, key) = service_account(dir.path(), &format!("{}/token", server.url()));
    let addr = format!(
        "gs://bucket/pre?credentials={}&endpoint={}",
        file.display(),
        server.url()
    );
    let b = nixpush_backends::open(&addr).await.expect("open");
    let shown = format!("{b:?}");
    assert!(!shown.contains("PRIVATE KEY"), "{shown}");
    assert!(b.exists("present").await.unwrap());
    assert!(!b.exists("absent").await.unwrap());

    let reqs = server.requests();
    let tokens: Vec<&Request> = reqs.iter().filter(|r| r.path == "/token").collect();
    assert_eq!(
        tokens.len(),
        1,
        "the token is fetched once and cached: {reqs:?}"
    );
    let form: Vec<(String, String)> = url::form_urlencoded::parse(&tokens[0].body)
        .into_owned()
        .collect();
    let get = |k: &str| {
        form.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no {k} in {form:?}"))
    };
    assert_eq!(
        get("grant_type"),
        "urn:ietf:params:oauth:grant-type:jwt-bearer"
    );
    let jwt = get("assertion");
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    let header: serde_json::Value = serde_json::from_slice(&b64url_decode(parts[0])).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(&b64url_decode(parts[1])).unwrap();
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["kid"], "key-id-1");
    assert_eq!(claims["iss"], "pusher@nixpush-test.iam.gserviceaccount.com");
    assert_eq!(
        claims["scope"],
        "https://www.googleapis.com/auth/devstorage.read_write"
    );
    assert_eq!(claims["aud"], format!("{}/token", server.url()));
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 3600);
    use aws_lc_rs::signature::KeyPair as _;
    aws_lc_rs::signature::UnparsedPublicKey::new(
        &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
        key.public_key().as_ref(),
    )
    .verify(
        format!("{}.{}", parts[0], parts[1]).as_bytes(),
        &b64url_decode(parts[2]),
    )
    .expect("the JWT's signature verifies with the service account's public key");

    let storage: Vec<&Request> = reqs.iter().filter(|r| r.path != "/token").collect();
    assert_eq!(storage.len(), 2);
    for r in storage {
        assert_eq!(r.header("authorization"), Some("Bearer tok-1"), "{r:?}");
        assert!(r.path.starts_with("/storage/v1/b/bucket/o/pre%2F"), "{r:?}");
    }
}

#[tokio::test]
async fn gcs_refused_credentials_are_permission() {
    let server = Scripted::start(|r| {
        if r.path == "/token" {
            (
                400,
                r#"{"error":"invalid_grant","error_description":"Invalid JWT Signature."}"#.into(),
            )
        } else {
            (200, "{}".into())
        }
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let (file, _) = service_account(dir.path(), &format!("{}/token", server.url()));
    let b = GcsBackend::new(GcsConfig {
        bucket: "bucket".into(),
        prefix: String::new(),
        endpoint: url::Url::parse(&server.url()).unwrap(),
        credentials: GcsCredentials::from_file(&file).unwrap(),
    })
    .unwrap();
    let msg = expect_kind(b.exists("k").await, ErrorKind::Permission, "exists");
    assert!(msg.contains("invalid_grant"), "{msg}");
    expect_ops_fail(&b, ErrorKind::Permission, "k").await;
    assert!(
        server.requests().iter().all(|r| r.path == "/token"),
        "nothing may reach storage without a token"
    );
}

#[tokio::test]
async fn gcs_storage_refusal_is_permission() {
    let server = Scripted::start(|_| {
        (
            403,
            r#"{"error":{"code":403,"message":"pusher does not have storage.objects.create access"}}"#
                .into(),
        )
    })
    .await;
    let b = nixpush_backends::open(&format!(
        "gs://bucket?anonymous=true&endpoint={}",
        server.url()
    ))
    .await
    .unwrap();
    let msg = expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Create))
            .await,
        ErrorKind::Permission,
        "put",
    );
    assert_eq!(
        msg,
        "put \"k\": 403 Forbidden: pusher does not have storage.objects.create access; \
         anonymous requests may not use bucket \"bucket\": give credentials=FILE"
    );
    expect_kind(
        b.put(
            "k",
            Body::File(staged(20 << 20, 2)),
            opts(PutMode::Overwrite),
        )
        .await,
        ErrorKind::Permission,
        "resumable put",
    );
    expect_kind(b.exists("k").await, ErrorKind::Permission, "exists");
    expect_kind(b.get("k").await.map(|_| ()), ErrorKind::Permission, "get");
    expect_kind(b.list("").await, ErrorKind::Permission, "list");
    expect_kind(b.delete("k").await, ErrorKind::Permission, "delete");
    assert!(
        server
            .requests()
            .iter()
            .all(|r| r.header("authorization").is_none()),
        "anonymous requests carry no token"
    );
}

#[tokio::test]
async fn gcs_unreachable_token_endpoint_is_transient() {
    let dir = tempfile::tempdir().unwrap();
    let port = tb::closed_port();
    let (file, _) = service_account(dir.path(), &format!("http://127.0.0.1:{port}/token"));
    let b = nixpush_backends::open(&format!(
        "gs://bucket?credentials={}&endpoint=http://127.0.0.1:{port}",
        file.display()
    ))
    .await
    .unwrap();
    expect_kind(b.exists("k").await, ErrorKind::Transient, "exists");
}
