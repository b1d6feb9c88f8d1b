//! The conformance suite, [`suite`], run by every backend's test on its real server (see
//! `testbeds.rs`), and the helpers the backend tests share.
//!
//! The suite checks the contract written in `nixpush_backends`' crate doc: round trips of small
//! and large (over 100 MiB, staged) objects with memory staying bounded, create-if-absent
//! refusing an existing key and leaving it untouched (also when writers race), `exists`,
//! listing by prefix, ordered listing pages, delete, and error kinds. What a backend offers beyond the core contract
//! is said by its [`Caps`].

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::io::Write as _;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt as _;
use nixpush_backends::{
    Backend, BackendError, BackendExt as _, Body, ByteStream, CREATE_LIMIT, ErrorKind, OpenError,
    Put, PutMode, PutOptions,
};

/// What a backend offers beyond the core contract.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    /// `list` works (plain HTTP has no listing: it must fail with `ErrorKind::Other`).
    pub list: bool,
    /// Racing create-if-absent writers: exactly one wins. nginx ignores `If-None-Match` on PUT,
    /// so over HTTP only "each writer either wins or is told it lost, and one version stays"
    /// is checked (the race the http module documents).
    pub exact_create_race: bool,
    /// Also overwrite the large object with another and check that a create over it is refused
    /// and changes nothing (two more transfers of [`BIG_LEN`] bytes; the SFTP and GCS runs).
    pub big_rewrite: bool,
    /// `Some(n)`: `list_page` is offered, with pages of at most `n` entries and folders grouped
    /// (`nar/` once); `None`: it answers `None`.
    pub list_page: Option<usize>,
}

pub const FULL: Caps = Caps {
    list: true,
    exact_create_race: true,
    big_rewrite: false,
    list_page: None,
};

/// Objects over 100 MiB, not a multiple of any part size.
pub const BIG_LEN: u64 = (105 << 20) + 12_345;

/// The peak memory a put and a get of [`BIG_LEN`] bytes may add to this process: the S3
/// backend holds at most 3 parts of 8 MiB, GCS one 8 MiB chunk, SFTP a megabyte of requests in
/// flight, the others one 256 KiB buffer; the rest is slack for the HTTP and SSH clients and the
/// allocator. Less than half the object.
pub const BIG_MEMORY_LIMIT: u64 = 48 << 20;

pub fn opts(mode: PutMode) -> PutOptions {
    PutOptions {
        mode,
        content_type: "application/octet-stream",
    }
}

pub fn narinfo_opts(mode: PutMode) -> PutOptions {
    PutOptions {
        mode,
        content_type: "text/x-nix-narinfo",
    }
}

// ---------------------------------------------------------------------------------------------
// Deterministic contents, generated and checked in 64 KiB blocks without holding them whole.

pub struct Pattern {
    seed: u64,
    len: u64,
}

const BLOCK: usize = 64 << 10;

impl Pattern {
    pub fn new(seed: u64, len: u64) -> Self {
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
    pub fn staged(&self, backend: &dyn Backend) -> tempfile::TempPath {
        self.file_in(
            &backend
                .staging_dir()
                .map(Path::to_owned)
                .unwrap_or_else(std::env::temp_dir),
        )
    }

    /// A file with these contents in the temporary directory.
    pub fn file(&self) -> tempfile::TempPath {
        self.file_in(&std::env::temp_dir())
    }

    fn file_in(&self, dir: &Path) -> tempfile::TempPath {
        let mut f = tempfile::Builder::new()
            .prefix("conformance-")
            .tempfile_in(dir)
            .expect("staged file");
        self.write_to(f.as_file_mut());
        f.into_temp_path()
    }

    /// Whether `stream` yields exactly these contents; read chunk by chunk.
    pub async fn check(&self, mut stream: ByteStream) -> Result<(), String> {
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

pub fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Reset the peak (VmHWM) to the current resident size; the current size, in bytes.
pub fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM via /proc/self/clear_refs");
    status_kib("VmRSS:") * 1024
}

pub fn peak() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Serializes the large-object part of the suites, so that the memory measured is theirs.
pub static BIG: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------------------------------------------------------------------------------------------
// The suite.

/// Assert that `r` failed with `kind`; the error's message.
pub fn expect_kind<T: std::fmt::Debug>(
    r: Result<T, BackendError>,
    kind: ErrorKind,
    what: &str,
) -> String {
    match r {
        Err(e) => {
            assert_eq!(e.kind, kind, "{what}: wrong kind in {e}");
            e.to_string()
        }
        Ok(v) => panic!("{what}: expected {kind:?}, got Ok({v:?})"),
    }
}

/// Assert that writing `k` (replacing and creating), a get and a delete of `existing` (a key
/// that may be present, so that a refusal is not mistaken for `NotFound`), and a listing each
/// fail with `kind`.
pub async fn expect_ops_fail(b: &dyn Backend, kind: ErrorKind, existing: &str) {
    expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Overwrite))
            .await,
        kind,
        "put",
    );
    expect_kind(
        b.put("k", Body::Bytes("x".into()), opts(PutMode::Create))
            .await,
        kind,
        "create",
    );
    expect_kind(b.get(existing).await.map(|_| ()), kind, "get");
    expect_kind(b.list("").await, kind, "list");
    expect_kind(b.delete(existing).await, kind, "delete");
}

/// Assert that opening `addr` fails as invalid, with a message that names `needle`.
pub async fn expect_invalid(addr: &str, needle: &str) {
    match nixpush_backends::open(addr).await {
        Err(OpenError::Invalid(a, m)) => {
            assert_eq!(a, addr);
            assert!(m.contains(needle), "{addr}: {m:?} does not name {needle:?}");
        }
        Err(e) => panic!("{addr}: wrong error {e}"),
        Ok(b) => panic!("{addr}: opened {b:?}"),
    }
}

pub async fn get_all(b: &dyn Backend, key: &str) -> Bytes {
    b.get_bytes(key, 64 << 20)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"))
}

/// The length of an object, read as a stream.
pub async fn get_len(b: &dyn Backend, key: &str) -> u64 {
    let mut s = b
        .get(key)
        .await
        .unwrap_or_else(|e| panic!("get {key}: {e}"));
    let mut n = 0u64;
    while let Some(c) = s.try_next().await.expect("read") {
        n += c.len() as u64;
    }
    n
}

/// A staged file of `len` bytes (contents [`Pattern`] `seed`) in the temporary directory.
pub fn staged(len: usize, seed: u8) -> tempfile::TempPath {
    Pattern::new(seed.into(), len as u64).file()
}

/// Every file below `dir`, relative, sorted.
pub fn files_below(dir: &Path) -> Vec<String> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                walk(root, &p, out);
            } else {
                out.push(p.strip_prefix(root).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// The whole contract, against one backend whose keys are all ours.
pub async fn suite(b: Arc<dyn Backend>, caps: Caps) {
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

    // Many existence checks at once, where the store can: the same answers as `exists`, in
    // order (a "folder" is not an object).
    let keys: Vec<String> = ["small.narinfo", "absent.narinfo", "nar/empty.nar", "nar"]
        .map(String::from)
        .to_vec();
    if let Some(all) = b.exists_all(&keys).await.expect("exists_all") {
        assert_eq!(
            all,
            vec![true, false, true, false],
            "exists_all of {keys:?}"
        );
    }

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

    // A batch: each object as its own put would be, the results in order; an object refused
    // fails alone, and the others are there when the batch returns.
    let in_batch = Pattern::new(6, 300_000);
    let results = b
        .put_batch(vec![
            Put {
                key: "batch-a.narinfo".into(),
                body: Body::Bytes(first.clone()),
                opts: narinfo_opts(PutMode::Create),
            },
            Put {
                key: "created.narinfo".into(),
                body: Body::Bytes(Bytes::from_static(b"batch writer\n")),
                opts: narinfo_opts(PutMode::Create),
            },
            Put {
                key: "nar/batch.nar".into(),
                body: Body::File(in_batch.staged(b)),
                opts: opts(PutMode::Overwrite),
            },
            Put {
                key: "../batch-escape".into(),
                body: Body::Bytes(first.clone()),
                opts: opts(PutMode::Overwrite),
            },
            Put {
                key: "batch-b.narinfo".into(),
                body: Body::Bytes(replaced.clone()),
                opts: narinfo_opts(PutMode::Overwrite),
            },
        ])
        .await;
    let mut results = results.into_iter();
    let mut next = |what: &str| {
        results
            .next()
            .unwrap_or_else(|| panic!("put_batch: no result for {what}"))
    };
    next("a new narinfo").expect("batch: create a new key");
    expect_kind(
        next("a taken key"),
        ErrorKind::AlreadyExists,
        "batch: create existing key",
    );
    next("a staged NAR").expect("batch: put a staged file");
    expect_kind(next("a bad key"), ErrorKind::Config, "batch: invalid key");
    next("an overwrite").expect("batch: overwrite");
    assert!(
        results.next().is_none(),
        "put_batch: more results than puts"
    );
    assert_eq!(get_all(b, "batch-a.narinfo").await, first);
    assert_eq!(
        get_all(b, "created.narinfo").await,
        first,
        "a refused create in a batch changed the object"
    );
    in_batch
        .check(b.get("nar/batch.nar").await.unwrap())
        .await
        .expect("batch: staged file round trip");
    assert_eq!(get_all(b, "batch-b.narinfo").await, replaced);
    for k in ["batch-a.narinfo", "nar/batch.nar", "batch-b.narinfo"] {
        b.delete(k).await.expect("delete a batch's object");
    }

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

    list_pages(b, caps).await;
    if caps.list {
        list_objects_sizes_and_times(b).await;
    }
    delete_batches(b, caps).await;

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
        if caps.big_rewrite {
            // Overwritten by a different big object, in place.
            let other = Pattern::new(9, BIG_LEN - 1);
            b.put(
                "nar/big.nar",
                Body::File(other.staged(b)),
                opts(PutMode::Overwrite),
            )
            .await
            .expect("overwrite big");
            other
                .check(b.get("nar/big.nar").await.unwrap())
                .await
                .expect("overwritten big object");
            // A creator of a big object over it is refused, and changes nothing.
            let e = b
                .put(
                    "nar/big.nar",
                    Body::File(Pattern::new(10, BIG_LEN).staged(b)),
                    opts(PutMode::Create),
                )
                .await
                .expect_err("create over an existing big object");
            assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
            other
                .check(b.get("nar/big.nar").await.unwrap())
                .await
                .expect("a refused create changed the object");
        }
        assert!(b.exists("nar/big.nar").await.unwrap());
        b.delete("nar/big.nar").await.expect("delete big");
        assert!(!b.exists("nar/big.nar").await.unwrap());
    }
}

/// `Backend::list_objects`: each object's size, and a modification time from the store's clock
/// that a rewrite moves forward (garbage collection keeps what was written recently).
async fn list_objects_sizes_and_times(b: &dyn Backend) {
    let before = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
    b.put(
        "meta/seven",
        Body::Bytes(Bytes::from_static(b"1234567")),
        opts(PutMode::Overwrite),
    )
    .await
    .expect("put for list_objects");
    b.put(
        "meta/staged",
        Body::File(staged(3000, 4)),
        opts(PutMode::Overwrite),
    )
    .await
    .expect("put staged for list_objects");
    let objects = b.list_objects("meta/").await.expect("list_objects");
    let mut got: Vec<(String, u64)> = objects.iter().map(|o| (o.key.clone(), o.size)).collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("meta/seven".to_owned(), 7),
            ("meta/staged".to_owned(), 3000)
        ]
    );
    let after = std::time::SystemTime::now() + std::time::Duration::from_secs(120);
    for o in &objects {
        assert!(
            o.modified > before && o.modified < after,
            "{}: modified {:?} is not within two minutes of now",
            o.key,
            o.modified
        );
    }
    // Stores keep times to the second; a rewrite two seconds later must show a later one.
    let first = objects
        .iter()
        .find(|o| o.key == "meta/seven")
        .unwrap()
        .modified;
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    b.put(
        "meta/seven",
        Body::Bytes(Bytes::from_static(b"12345678")),
        opts(PutMode::Overwrite),
    )
    .await
    .expect("rewrite for list_objects");
    let again = b
        .list_objects("meta/seven")
        .await
        .expect("list_objects again");
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!(again[0].size, 8);
    assert!(
        again[0].modified > first,
        "a rewrite did not move the time forward: {:?} then {:?}",
        first,
        again[0].modified
    );
    let keys: BTreeSet<String> = b.list("meta/").await.unwrap().into_iter().collect();
    assert_eq!(keys.len(), 2, "list and list_objects disagree: {keys:?}");
}

/// `Backend::delete_batch`: every key removed (absent ones too), neighbours kept, one result
/// per key in order.
async fn delete_batches(b: &dyn Backend, caps: Caps) {
    let keys: Vec<String> = (0..25).map(|i| format!("batch/{i:02}.narinfo")).collect();
    for k in &keys {
        b.put(
            k,
            Body::Bytes(Bytes::from(k.clone())),
            opts(PutMode::Overwrite),
        )
        .await
        .expect("put for delete_batch");
    }
    b.put(
        "batch/keep",
        Body::Bytes(Bytes::from_static(b"k")),
        opts(PutMode::Overwrite),
    )
    .await
    .expect("put neighbour");
    let mut asked = keys.clone();
    asked.push("batch/absent.narinfo".to_owned());
    let results = b.delete_batch(asked.clone()).await;
    assert_eq!(results.len(), asked.len());
    for (k, r) in asked.iter().zip(&results) {
        assert!(r.is_ok(), "delete_batch {k}: {r:?}");
    }
    for k in &keys {
        assert!(!b.exists(k).await.unwrap(), "{k} is still there");
    }
    assert!(b.exists("batch/keep").await.unwrap(), "a neighbour went");
    if caps.list {
        assert_eq!(b.list("batch/").await.unwrap(), ["batch/keep"]);
    }
    let refused = b.delete_batch(vec!["../escape".to_owned()]).await;
    assert_eq!(refused.len(), 1);
    expect_kind(
        refused.into_iter().next().unwrap(),
        ErrorKind::Config,
        "delete_batch bad key",
    );
    b.delete("batch/keep").await.unwrap();
}

/// Ordered listing pages (`Backend::list_page`), on a cache that holds the suite's objects.
async fn list_pages(b: &dyn Backend, caps: Caps) {
    let Some(size) = caps.list_page else {
        assert!(
            b.list_page("").await.expect("list_page").is_none(),
            "list_page is offered but Caps::list_page does not say so"
        );
        return;
    };
    for i in 0..10 {
        let k = format!("page-{i:02}");
        b.put(
            &k,
            Body::Bytes(Bytes::from(k.clone())),
            opts(PutMode::Overwrite),
        )
        .await
        .expect("put for paging");
    }
    // What a walk through the pages must show: every key of the cache, relative to it, and
    // each folder once.
    let expected: BTreeSet<String> = b
        .list("")
        .await
        .expect("list")
        .into_iter()
        .map(|k| match k.split_once('/') {
            Some((folder, _)) => format!("{folder}/"),
            None => k,
        })
        .collect();
    assert!(
        expected.contains("nar/") && expected.contains("page-09"),
        "{expected:?}"
    );
    let page = |after: String| async move {
        let p = b
            .list_page(&after)
            .await
            .unwrap_or_else(|e| panic!("list_page({after:?}): {e}"))
            .expect("list_page is offered");
        assert!(
            p.keys.len() <= size,
            "{} entries in a page of {size}",
            p.keys.len()
        );
        assert!(
            p.keys.windows(2).all(|w| w[0] < w[1]),
            "not strictly ascending: {:?}",
            p.keys
        );
        assert!(
            p.keys.iter().all(|k| *k > after),
            "not all after {after:?}: {:?}",
            p.keys
        );
        p
    };
    let mut seen: Vec<String> = Vec::new();
    let mut pages = 0;
    let mut after = String::new();
    loop {
        let p = page(after.clone()).await;
        pages += 1;
        seen.extend(p.keys.iter().cloned());
        if p.complete {
            break;
        }
        after = p
            .keys
            .last()
            .expect("an unfinished page has entries")
            .clone();
        assert!(pages <= expected.len(), "the listing never completes");
    }
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "pages overlap: {seen:?}"
    );
    assert_eq!(seen.into_iter().collect::<BTreeSet<_>>(), expected);
    if expected.len() > size {
        assert!(
            pages >= 2,
            "{} entries in {pages} page(s) of {size}",
            expected.len()
        );
    } else {
        assert_eq!(pages, 1);
    }
    // `start_after` is exclusive, need not exist, and may be a key's stem (as presence asks).
    for (after, first) in [
        ("page-03", "page-04"),
        ("page-035", "page-04"),
        ("page-0", "page-00"),
    ] {
        let p = page(after.to_owned()).await;
        assert_eq!(
            p.keys.first().map(String::as_str),
            Some(first),
            "after {after:?}"
        );
    }
    // A folder's keys come as the folder, once, if at all: SeaweedFS leaves out a folder whose
    // bare name is `start_after` (its filer orders the directory `nar` by that name), which the
    // contract allows. The next key without a `/` is there either way.
    let p = page("nar".to_owned()).await;
    assert!(
        p.keys.iter().all(|k| k == "nar/" || !k.starts_with("nar/")),
        "{:?}",
        p.keys
    );
    assert_eq!(
        p.keys.iter().find(|k| !k.contains('/')).map(String::as_str),
        Some("page-00"),
        "{:?}",
        p.keys
    );
    // Past the last key: nothing, and complete.
    let last = expected.last().expect("keys").clone();
    let p = page(last).await;
    assert!(p.keys.is_empty() && p.complete, "{p:?}");
}
