//! One conformance suite, [`suite`], run against every backend on its real server: a local
//! directory, SeaweedFS over S3, nginx over HTTP PUT. The servers are started once per test
//! binary on loopback by `support/testbeds.rs`; every test works under its own fresh prefix or
//! bucket, so the tests run in parallel.
//!
//! The suite checks the contract written in `nixpush_backends`' crate doc: round trips of small
//! and large (over 100 MiB, staged) objects with memory staying bounded, create-if-absent
//! refusing an existing key and leaving it untouched (also when writers race), `exists`,
//! listing by prefix, delete, and error kinds. Errors that need a broken setup (wrong
//! credentials, a missing bucket, a closed port) have a test per backend.

// The suite needs every backend; a build without one of them has nothing to run here.
#![cfg(all(feature = "fs", feature = "s3", feature = "http"))]

#[path = "support/testbeds.rs"]
mod testbeds;

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt as _;
use nixpush_backends::fs::FsBackend;
use nixpush_backends::http::{HttpAuth, HttpBackend, HttpConfig};
use nixpush_backends::s3::{S3Backend, S3Config, S3Credentials};
use nixpush_backends::{
    Backend, BackendError, BackendExt as _, Body, ByteStream, ErrorKind, OpenError, PutMode,
    PutOptions, CREATE_LIMIT,
};

/// What a backend offers beyond the core contract.
#[derive(Debug, Clone, Copy)]
struct Caps {
    /// `list` works (plain HTTP has no listing: it must fail with `ErrorKind::Other`).
    list: bool,
    /// Racing create-if-absent writers: exactly one wins. nginx ignores `If-None-Match` on PUT,
    /// so over HTTP only "each writer either wins or is told it lost, and one version stays"
    /// is checked (the race the http module documents).
    exact_create_race: bool,
}

const FULL: Caps = Caps {
    list: true,
    exact_create_race: true,
};

/// Objects over 100 MiB, not a multiple of any part size.
const BIG_LEN: u64 = (105 << 20) + 12_345;

/// The peak memory a put and a get of [`BIG_LEN`] bytes may add to this process: the S3
/// backend holds at most 3 parts of 8 MiB, the others one 256 KiB buffer; the rest is slack
/// for the HTTP client and allocator. Less than half the object.
const BIG_MEMORY_LIMIT: u64 = 48 << 20;

fn opts(mode: PutMode) -> PutOptions {
    PutOptions {
        mode,
        content_type: "application/octet-stream",
    }
}

fn narinfo_opts(mode: PutMode) -> PutOptions {
    PutOptions {
        mode,
        content_type: "text/x-nix-narinfo",
    }
}

/// A unique name for this test run.
fn unique(name: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("time")
        .as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

// ---------------------------------------------------------------------------------------------
// Deterministic contents, generated and checked in 64 KiB blocks without holding them whole.

struct Pattern {
    seed: u64,
    len: u64,
}

const BLOCK: usize = 64 << 10;

impl Pattern {
    fn new(seed: u64, len: u64) -> Self {
        Self { seed, len }
    }

    fn block(&self, k: u64) -> Vec<u8> {
        let mut out = Vec::with_capacity(BLOCK);
        let mut x = self
            .seed
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .wrapping_add(k);
        while out.len() < BLOCK {
            // splitmix64
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            out.extend_from_slice(&z.to_le_bytes());
        }
        out
    }

    fn write_to(&self, file: &mut std::fs::File) {
        let mut left = self.len;
        let mut k = 0;
        while left > 0 {
            let b = self.block(k);
            let take = left.min(BLOCK as u64) as usize;
            file.write_all(&b[..take]).expect("write staged file");
            left -= take as u64;
            k += 1;
        }
        file.sync_all().expect("sync staged file");
    }

    /// A staged file with these contents, where the backend wants it staged.
    fn staged(&self, backend: &dyn Backend) -> tempfile::TempPath {
        let dir = backend
            .staging_dir()
            .map(Path::to_owned)
            .unwrap_or_else(std::env::temp_dir);
        let mut f = tempfile::Builder::new()
            .prefix("conformance-")
            .tempfile_in(dir)
            .expect("staged file");
        self.write_to(f.as_file_mut());
        f.into_temp_path()
    }

    /// Whether `stream` yields exactly these contents; read chunk by chunk.
    async fn check(&self, mut stream: ByteStream) -> Result<(), String> {
        let mut offset: u64 = 0;
        let mut cur: Option<(u64, Vec<u8>)> = None;
        while let Some(chunk) = stream.try_next().await.map_err(|e| e.to_string())? {
            let mut c: &[u8] = &chunk;
            while !c.is_empty() {
                if offset >= self.len {
                    return Err(format!("more than {} bytes", self.len));
                }
                let k = offset / BLOCK as u64;
                if cur.as_ref().is_none_or(|(ck, _)| *ck != k) {
                    cur = Some((k, self.block(k)));
                }
                let block = &cur.as_ref().expect("set").1;
                let at = (offset % BLOCK as u64) as usize;
                let n = c.len().min(BLOCK - at);
                if c[..n] != block[at..at + n] {
                    return Err(format!("contents differ near byte {offset}"));
                }
                c = &c[n..];
                offset += n as u64;
            }
        }
        if offset != self.len {
            return Err(format!("{offset} bytes instead of {}", self.len));
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Memory of this process, from /proc/self/status.

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Reset the peak (VmHWM) to the current resident size; the current size, in bytes.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM via /proc/self/clear_refs");
    status_kib("VmRSS:") * 1024
}

fn peak() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Serializes the large-object part of the suites, so that the memory measured is theirs.
static BIG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// The suite.

fn expect_kind<T: std::fmt::Debug>(r: Result<T, BackendError>, kind: ErrorKind, what: &str) {
    match r {
        Err(e) => assert_eq!(e.kind, kind, "{what}: wrong kind in {e}"),
        Ok(v) => panic!("{what}: expected {kind:?}, got Ok({v:?})"),
    }
}

async fn get_all(b: &dyn Backend, key: &str) -> Bytes {
    b.get_bytes(key, 64 << 20)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
}

/// The whole contract, against one backend whose keys are all ours.
async fn suite(b: Arc<dyn Backend>, caps: Caps) {
    let b = &*b;
    let name = b.describe();
    eprintln!("conformance: {name}");

    // Absent keys.
    assert!(!b.exists("absent.narinfo").await.unwrap());
    expect_kind(
        b.get("absent.narinfo").await.map(|_| ()),
        ErrorKind::NotFound,
        "get absent",
    );
    b.delete("absent.narinfo").await.expect("delete absent key");

    // Invalid keys are refused before any request.
    for bad in ["", "../escape", "dir/", "a/../../b"] {
        expect_kind(
            b.put(
                bad,
                Body::Bytes(Bytes::from_static(b"x")),
                opts(PutMode::Overwrite),
            )
            .await,
            ErrorKind::Config,
            &format!("put {bad:?}"),
        );
    }

    // Small round trips, bytes and staged file, and overwrite.
    let small = Bytes::from_static(b"StorePath: /nix/store/aaaa-x\nNarSize: 1\n");
    b.put(
        "small.narinfo",
        Body::Bytes(small.clone()),
        narinfo_opts(PutMode::Overwrite),
    )
    .await
    .expect("put small");
    assert!(b.exists("small.narinfo").await.unwrap());
    assert_eq!(get_all(b, "small.narinfo").await, small);
    let replaced = Bytes::from_static(b"replaced\n");
    b.put(
        "small.narinfo",
        Body::Bytes(replaced.clone()),
        narinfo_opts(PutMode::Overwrite),
    )
    .await
    .expect("overwrite small");
    assert_eq!(get_all(b, "small.narinfo").await, replaced);

    let staged = Pattern::new(1, (1 << 20) + 7);
    b.put(
        "nar/staged.nar",
        Body::File(staged.staged(b)),
        opts(PutMode::Overwrite),
    )
    .await
    .expect("put staged file");
    staged
        .check(b.get("nar/staged.nar").await.unwrap())
        .await
        .expect("staged file round trip");
    let empty = Pattern::new(2, 0);
    b.put(
        "nar/empty.nar",
        Body::File(empty.staged(b)),
        opts(PutMode::Overwrite),
    )
    .await
    .expect("put empty file");
    assert!(b.exists("nar/empty.nar").await.unwrap());
    empty
        .check(b.get("nar/empty.nar").await.unwrap())
        .await
        .expect("empty file round trip");

    // Create-if-absent: a new key is created; an existing one is refused and left untouched,
    // whatever the body.
    let first = Bytes::from_static(b"first writer\n");
    b.put(
        "created.narinfo",
        Body::Bytes(first.clone()),
        narinfo_opts(PutMode::Create),
    )
    .await
    .expect("create new key");
    expect_kind(
        b.put(
            "created.narinfo",
            Body::Bytes(Bytes::from_static(b"second writer\n")),
            narinfo_opts(PutMode::Create),
        )
        .await,
        ErrorKind::AlreadyExists,
        "create existing key",
    );
    expect_kind(
        b.put(
            "created.narinfo",
            Body::File(Pattern::new(3, 1000).staged(b)),
            narinfo_opts(PutMode::Create),
        )
        .await,
        ErrorKind::AlreadyExists,
        "create existing key from a file",
    );
    assert_eq!(
        get_all(b, "created.narinfo").await,
        first,
        "refused create changed the object"
    );
    // Also over an object written in overwrite mode.
    expect_kind(
        b.put(
            "small.narinfo",
            Body::Bytes(first.clone()),
            narinfo_opts(PutMode::Create),
        )
        .await,
        ErrorKind::AlreadyExists,
        "create over an overwritten key",
    );
    assert_eq!(get_all(b, "small.narinfo").await, replaced);

    // Every backend creates files up to CREATE_LIMIT bytes.
    let at_limit = Pattern::new(4, CREATE_LIMIT);
    b.put(
        "nar/at-limit.nar",
        Body::File(at_limit.staged(b)),
        opts(PutMode::Create),
    )
    .await
    .expect("create a file of CREATE_LIMIT bytes");
    expect_kind(
        b.put(
            "nar/at-limit.nar",
            Body::File(Pattern::new(5, CREATE_LIMIT).staged(b)),
            opts(PutMode::Create),
        )
        .await,
        ErrorKind::AlreadyExists,
        "create existing CREATE_LIMIT file",
    );
    at_limit
        .check(b.get("nar/at-limit.nar").await.unwrap())
        .await
        .expect("refused create changed the file");
    // Over the limit: created for real, or refused with Other and nothing written.
    let over = Pattern::new(6, CREATE_LIMIT + 1);
    match b
        .put(
            "nar/over-limit.nar",
            Body::File(over.staged(b)),
            opts(PutMode::Create),
        )
        .await
    {
        Ok(()) => {
            over.check(b.get("nar/over-limit.nar").await.unwrap())
                .await
                .expect("over-limit round trip");
            expect_kind(
                b.put(
                    "nar/over-limit.nar",
                    Body::File(Pattern::new(7, CREATE_LIMIT + 1).staged(b)),
                    opts(PutMode::Create),
                )
                .await,
                ErrorKind::AlreadyExists,
                "create existing over-limit file",
            );
            over.check(b.get("nar/over-limit.nar").await.unwrap())
                .await
                .expect("refused create changed the file");
        }
        Err(e) => {
            assert_eq!(
                e.kind,
                ErrorKind::Other,
                "over-limit create refused wrongly: {e}"
            );
            assert!(
                !b.exists("nar/over-limit.nar").await.unwrap(),
                "a refused create left an object"
            );
        }
    }

    // Racing creators: exactly one wins, the others are told, the winner's bytes stay.
    let writers = 8;
    let results = futures::future::join_all((0..writers).map(|i| async move {
        let body = Bytes::from(format!("writer {i}\n"));
        let r = b
            .put(
                "raced.narinfo",
                Body::Bytes(body.clone()),
                narinfo_opts(PutMode::Create),
            )
            .await;
        (body, r)
    }))
    .await;
    let mut winners = Vec::new();
    for (body, r) in &results {
        match r {
            Ok(()) => winners.push(body.clone()),
            Err(e) => assert_eq!(e.kind, ErrorKind::AlreadyExists, "racing create: {e}"),
        }
    }
    let stored = get_all(b, "raced.narinfo").await;
    if caps.exact_create_race {
        assert_eq!(
            winners.len(),
            1,
            "{writers} racing creators: {} won",
            winners.len()
        );
        assert_eq!(stored, winners[0], "the stored object is not the winner's");
    } else {
        assert!(!winners.is_empty(), "nobody won the race");
        assert!(
            winners.contains(&stored),
            "the stored object is no writer's"
        );
    }

    // Listing by prefix.
    for k in [
        "list/a/1",
        "list/a/2",
        "list/b/1",
        "list-x",
        "listed.narinfo",
    ] {
        b.put(
            k,
            Body::Bytes(Bytes::from(k.to_owned())),
            opts(PutMode::Overwrite),
        )
        .await
        .expect("put for listing");
    }
    let list = |p: &'static str| async move {
        b.list(p)
            .await
            .map(|v| v.into_iter().collect::<BTreeSet<String>>())
    };
    if caps.list {
        let set = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
        assert_eq!(
            list("list/a/").await.unwrap(),
            set(&["list/a/1", "list/a/2"])
        );
        assert_eq!(
            list("list/").await.unwrap(),
            set(&["list/a/1", "list/a/2", "list/b/1"])
        );
        assert_eq!(
            list("list").await.unwrap(),
            set(&[
                "list/a/1",
                "list/a/2",
                "list/b/1",
                "list-x",
                "listed.narinfo"
            ])
        );
        assert_eq!(list("list/a/2").await.unwrap(), set(&["list/a/2"]));
        assert_eq!(list("nothing/").await.unwrap(), set(&[]));
        let all = list("").await.unwrap();
        for k in [
            "small.narinfo",
            "created.narinfo",
            "nar/staged.nar",
            "list-x",
        ] {
            assert!(all.contains(k), "{k} missing from the full listing {all:?}");
        }
        let nars = list("nar/").await.unwrap();
        assert!(nars.iter().all(|k| k.starts_with("nar/")), "{nars:?}");
        assert!(nars.contains("nar/at-limit.nar"), "{nars:?}");
    } else {
        expect_kind(list("list/").await, ErrorKind::Other, "list unsupported");
    }

    // Delete.
    b.delete("list/a/1").await.expect("delete");
    assert!(!b.exists("list/a/1").await.unwrap());
    expect_kind(
        b.get("list/a/1").await.map(|_| ()),
        ErrorKind::NotFound,
        "get deleted",
    );
    b.delete("list/a/1").await.expect("delete again");
    assert!(
        b.exists("list/a/2").await.unwrap(),
        "delete removed a neighbour"
    );
    if caps.list {
        assert_eq!(
            list("list/a/").await.unwrap(),
            ["list/a/2".to_owned()].into_iter().collect()
        );
    }
    // A deleted key can be created again.
    b.put(
        "list/a/1",
        Body::Bytes(first.clone()),
        narinfo_opts(PutMode::Create),
    )
    .await
    .expect("create after delete");

    // A large staged object, with the memory of this process watched.
    {
        let _serial = BIG.lock().await;
        let big = Pattern::new(8, BIG_LEN);
        let file = big.staged(b);
        let base = reset_peak();
        let started = std::time::Instant::now();
        b.put("nar/big.nar", Body::File(file), opts(PutMode::Overwrite))
            .await
            .expect("put big");
        let put_secs = started.elapsed().as_secs_f64();
        big.check(b.get("nar/big.nar").await.expect("get big"))
            .await
            .expect("big object round trip");
        let added = peak().saturating_sub(base);
        eprintln!(
            "conformance: {name}: {} MiB up in {put_secs:.1}s, round trip {:.1}s, peak memory +{:.1} MiB",
            BIG_LEN >> 20,
            started.elapsed().as_secs_f64(),
            added as f64 / (1 << 20) as f64
        );
        assert!(
            added < BIG_MEMORY_LIMIT,
            "{name}: a {BIG_LEN}-byte round trip raised peak memory by {added} bytes \
             (limit {BIG_MEMORY_LIMIT})"
        );
        assert!(b.exists("nar/big.nar").await.unwrap());
        b.delete("nar/big.nar").await.expect("delete big");
    }
}

// ---------------------------------------------------------------------------------------------
// Backends on their servers.

fn s3_config(sw: &testbeds::SeaweedFs, bucket: &str, prefix: &str) -> S3Config {
    S3Config::parse(&sw.address(bucket, prefix)).expect("S3 address")
}

fn test_keys() -> S3Credentials {
    S3Credentials::Static {
        key_id: testbeds::S3_ACCESS_KEY.into(),
        secret_key: testbeds::S3_SECRET_KEY.into(),
        token: None,
    }
}

async fn s3(sw: &testbeds::SeaweedFs, bucket: &str, prefix: &str) -> Arc<dyn Backend> {
    Arc::new(
        S3Backend::new(s3_config(sw, bucket, prefix), test_keys())
            .await
            .expect("open S3 backend"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_conformance() {
    let dir = tempfile::tempdir().expect("temp dir");
    let b = FsBackend::new(dir.path().join("cache"))
        .await
        .expect("open fs");
    suite(Arc::new(b), FULL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_conformance_under_a_prefix() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    sw.create_bucket("conformance");
    suite(s3(sw, "conformance", &unique("suite/prefixed")).await, FULL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_conformance_at_a_bucket_root() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let bucket = unique("root").to_lowercase();
    sw.create_bucket(&bucket);
    suite(s3(sw, &bucket, "").await, FULL).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_conformance() {
    let Some(ngx) = testbeds::nginx() else { return };
    let dir = tempfile::tempdir().expect("temp dir");
    let token = dir.path().join("token");
    std::fs::write(&token, format!("{}\n", testbeds::HTTP_TOKEN)).expect("write token");
    let path = unique("suite");
    let addr = format!("{}?token-file={}", ngx.url(&path), token.display());
    let b = nixpush_backends::open(&addr).await.expect("open http");
    suite(
        b,
        Caps {
            list: false,
            exact_create_race: false,
        },
    )
    .await;
    // Every upload announced its length (streamed files too), none was chunked.
    let log = ngx.access_log();
    let puts: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with(&format!("PUT /{path}/")))
        .collect();
    assert!(puts.len() > 10, "too few uploads logged:\n{log}");
    for l in &puts {
        assert!(
            l.ends_with("transfer-encoding=-") && !l.contains("length=- "),
            "an upload without Content-Length: {l}"
        );
    }
    let big = format!("PUT /{path}/nar/big.nar 201 length={BIG_LEN} ");
    assert!(
        puts.iter().any(|l| l.starts_with(&big)),
        "no {big:?} in\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// Errors that need a broken setup.

#[tokio::test]
async fn s3_wrong_secret_is_permission() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    sw.create_bucket("conformance");
    let prefix = unique("wrong-secret");
    let good = s3(sw, "conformance", &prefix).await;
    good.put("present", Body::Bytes("x".into()), opts(PutMode::Overwrite))
        .await
        .expect("put with the right keys");
    let bad = S3Backend::new(
        s3_config(sw, "conformance", &prefix),
        S3Credentials::Static {
            key_id: testbeds::S3_ACCESS_KEY.into(),
            secret_key: "not-the-secret".into(),
            token: None,
        },
    )
    .await
    .expect("open");
    let unknown_key = S3Backend::new(
        s3_config(sw, "conformance", &prefix),
        S3Credentials::Static {
            key_id: "no-such-key".into(),
            secret_key: "whatever".into(),
            token: None,
        },
    )
    .await
    .expect("open");
    for b in [&bad, &unknown_key] {
        expect_kind(
            b.put("k", Body::Bytes("x".into()), opts(PutMode::Overwrite))
                .await,
            ErrorKind::Permission,
            "put with a wrong secret",
        );
        expect_kind(
            b.put("k", Body::Bytes("x".into()), opts(PutMode::Create))
                .await,
            ErrorKind::Permission,
            "create with a wrong secret",
        );
        expect_kind(b.exists("present").await, ErrorKind::Permission, "exists");
        expect_kind(
            b.get("present").await.map(|_| ()),
            ErrorKind::Permission,
            "get",
        );
        expect_kind(b.list("").await, ErrorKind::Permission, "list");
        expect_kind(b.delete("present").await, ErrorKind::Permission, "delete");
    }
    assert!(
        good.exists("present").await.unwrap(),
        "a refused delete deleted"
    );
}

/// A missing bucket is `ErrorKind::Config` (the address is wrong) for get, put, list and
/// delete; `exists` answers false, as a HEAD response cannot say which is missing.
#[tokio::test]
async fn s3_missing_bucket_is_config() {
    let Some(sw) = testbeds::seaweedfs() else {
        return;
    };
    let b = s3(sw, "no-such-bucket-here", "").await;
    expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Overwrite))
            .await,
        ErrorKind::Config,
        "put into a missing bucket",
    );
    expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Create))
            .await,
        ErrorKind::Config,
        "create in a missing bucket",
    );
    let staged = Pattern::new(9, 20 << 20).staged(&*b);
    expect_kind(
        b.put("big", Body::File(staged), opts(PutMode::Overwrite))
            .await,
        ErrorKind::Config,
        "multipart upload into a missing bucket",
    );
    expect_kind(b.get("k").await.map(|_| ()), ErrorKind::Config, "get");
    expect_kind(b.list("").await, ErrorKind::Config, "list");
    expect_kind(b.delete("k").await, ErrorKind::Config, "delete");
    assert!(!b.exists("k").await.unwrap());
    let e = b.get("k").await.map(|_| ()).unwrap_err();
    assert!(e.to_string().contains("NoSuchBucket"), "{e}");
}

#[tokio::test]
async fn s3_unreachable_server_is_transient() {
    let port = testbeds::closed_port();
    let config = S3Config::parse(&format!("s3://bucket?endpoint=http://127.0.0.1:{port}")).unwrap();
    let b = S3Backend::new(config, test_keys()).await.unwrap();
    let started = std::time::Instant::now();
    expect_kind(b.exists("k").await, ErrorKind::Transient, "exists");
    expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Create))
            .await,
        ErrorKind::Transient,
        "put",
    );
    expect_kind(b.get("k").await.map(|_| ()), ErrorKind::Transient, "get");
    expect_kind(b.list("").await, ErrorKind::Transient, "list");
    // Retries are bounded: a dead cache is reported within seconds, not minutes.
    assert!(
        started.elapsed() < std::time::Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn s3_unknown_profile_is_config() {
    // The named-profile path of the credential chain, without any network: aws-config reads
    // the profile files only.
    let port = testbeds::closed_port();
    let r = nixpush_backends::open(&format!(
        "s3://bucket?endpoint=http://127.0.0.1:{port}&profile=nixpush-no-such-profile-7c1"
    ))
    .await;
    match r {
        Ok(b) => {
            let e = b.exists("k").await.unwrap_err();
            assert_eq!(e.kind, ErrorKind::Config, "{e}");
            assert!(e.to_string().contains("nixpush-no-such-profile-7c1"), "{e}");
        }
        // Without aws-config, a profile cannot be used, and opening says why.
        Err(OpenError::Invalid(_, m)) if cfg!(not(feature = "s3-aws-config")) => {
            assert!(m.contains("s3-aws-config"), "{m}");
        }
        Err(e) => panic!("open: {e}"),
    }
}

#[tokio::test]
async fn http_wrong_token_is_permission() {
    let Some(ngx) = testbeds::nginx() else { return };
    let base = ngx.url(&unique("auth"));
    let config = |auth| HttpConfig {
        base: url::Url::parse(&base).unwrap(),
        auth,
    };
    let good = HttpBackend::new(config(HttpAuth::Bearer(testbeds::HTTP_TOKEN.into()))).unwrap();
    good.put("present", Body::Bytes("x".into()), opts(PutMode::Overwrite))
        .await
        .expect("put with the token");
    for auth in [
        HttpAuth::Bearer("wrong-token".into()),
        HttpAuth::None,
        HttpAuth::Basic {
            user: "u".into(),
            password: testbeds::HTTP_TOKEN.into(),
        },
    ] {
        let what = format!("{auth:?}");
        assert!(!what.contains(testbeds::HTTP_TOKEN) && !what.contains("wrong-token"));
        let b = HttpBackend::new(config(auth)).unwrap();
        expect_kind(
            b.put("k", Body::Bytes("x".into()), opts(PutMode::Overwrite))
                .await,
            ErrorKind::Permission,
            &format!("put with {what}"),
        );
        expect_kind(
            b.put(
                "k2",
                Body::File(Pattern::new(10, 300_000).staged(&b)),
                opts(PutMode::Create),
            )
            .await,
            ErrorKind::Permission,
            &format!("put file with {what}"),
        );
        expect_kind(b.delete("present").await, ErrorKind::Permission, &what);
        // Reading is open on this server.
        assert!(b.exists("present").await.unwrap());
        assert!(!b.exists("k").await.unwrap());
    }
    assert!(good.exists("present").await.unwrap());
}

#[tokio::test]
async fn http_unreachable_server_is_transient() {
    let port = testbeds::closed_port();
    let b = nixpush_backends::open(&format!("http://127.0.0.1:{port}/cache"))
        .await
        .unwrap();
    expect_kind(b.exists("k").await, ErrorKind::Transient, "exists");
    expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Overwrite))
            .await,
        ErrorKind::Transient,
        "put",
    );
    expect_kind(b.get("k").await.map(|_| ()), ErrorKind::Transient, "get");
    expect_kind(b.delete("k").await, ErrorKind::Transient, "delete");
}

#[tokio::test]
async fn open_names_what_is_wrong_with_an_address() {
    let invalid = |addr: &'static str, needle: &'static str| async move {
        match nixpush_backends::open(addr).await {
            Err(OpenError::Invalid(a, m)) => {
                assert_eq!(a, addr);
                assert!(m.contains(needle), "{addr}: {m:?} does not name {needle:?}");
            }
            Err(e) => panic!("{addr}: wrong error {e}"),
            Ok(b) => panic!("{addr}: opened {b:?}"),
        }
    };
    invalid(
        "s3://bucket?endpoint=http://127.0.0.1:1&bogus=1",
        "\"bogus\"",
    )
    .await;
    invalid(
        "s3://bucket?narinfo-compression=xz",
        "\"narinfo-compression\"",
    )
    .await;
    invalid("http://127.0.0.1:1/c?bogus=1", "\"bogus\"").await;
    invalid(
        "https://h/c?token-file=/nonexistent/token",
        "/nonexistent/token",
    )
    .await;
    match nixpush_backends::open("gopher://h/c").await {
        Err(e @ OpenError::UnsupportedScheme(..)) => {
            let m = e.to_string();
            for s in ["file://", "s3://", "http://", "https://"] {
                assert!(m.contains(s), "{m}");
            }
        }
        other => panic!("gopher: {other:?}"),
    }
}
