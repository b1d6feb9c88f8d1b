//! Large objects and racing writers on SFTP (OpenSSH's sshd) and GCS (fake-gcs-server): a
//! staged file over 100 MiB goes up and comes back intact while this process's peak memory
//! grows by less than half of it, and of eight writers creating one key exactly one wins.
//!
//! A test binary of its own, with its tests serialized, so that the memory measured is the
//! transfer's and nothing else's.

// Needs both backends compiled in (the default).
#![cfg(all(feature = "sftp", feature = "gcs"))]

mod support_sftp_gcs;

use std::io::Write as _;
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt as _;
use nixpush_backends::{
    Backend, BackendExt as _, Body, ByteStream, ErrorKind, PutMode, PutOptions,
};
use support_sftp_gcs as tb;

/// Over 100 MiB, not a multiple of any chunk or part size.
const BIG_LEN: u64 = (105 << 20) + 12_345;

/// What a put and a get of [`BIG_LEN`] bytes may add to this process's peak memory: less than
/// half the object (the backends hold at most one 8 MiB chunk, or a megabyte of requests in
/// flight; the rest is slack for the HTTP and SSH clients and the allocator).
const BIG_MEMORY_LIMIT: u64 = 48 << 20;

/// One test at a time in this binary.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn opts(mode: PutMode) -> PutOptions {
    PutOptions {
        mode,
        content_type: "application/x-nix-nar",
    }
}

const BLOCK: usize = 64 << 10;

/// Block `k` of the contents named by `seed` (splitmix64).
fn block(seed: u64, k: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ k.wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut out = Vec::with_capacity(BLOCK);
    while out.len() < BLOCK {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out
}

/// A staged file of `len` bytes of contents `seed`, written a block at a time.
fn staged(seed: u64, len: u64) -> tempfile::TempPath {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    let (mut left, mut k) = (len, 0);
    while left > 0 {
        let take = left.min(BLOCK as u64) as usize;
        f.write_all(&block(seed, k)[..take]).expect("write");
        left -= take as u64;
        k += 1;
    }
    f.as_file().sync_all().expect("sync");
    f.into_temp_path()
}

/// Whether `stream` is exactly `len` bytes of contents `seed`, checked chunk by chunk.
async fn check(mut stream: ByteStream, seed: u64, len: u64) -> Result<(), String> {
    let mut offset = 0u64;
    let mut cur: Option<(u64, Vec<u8>)> = None;
    while let Some(chunk) = stream.try_next().await.map_err(|e| e.to_string())? {
        let mut c: &[u8] = &chunk;
        while !c.is_empty() {
            if offset >= len {
                return Err(format!("more than {len} bytes"));
            }
            let k = offset / BLOCK as u64;
            if cur.as_ref().is_none_or(|(ck, _)| *ck != k) {
                cur = Some((k, block(seed, k)));
            }
            let b = &cur.as_ref().expect("set").1;
            let at = (offset % BLOCK as u64) as usize;
            let n = c.len().min(BLOCK - at).min((len - offset) as usize);
            if c[..n] != b[at..at + n] {
                return Err(format!("contents differ near byte {offset}"));
            }
            c = &c[n..];
            offset += n as u64;
        }
    }
    if offset != len {
        return Err(format!("{offset} bytes instead of {len}"));
    }
    Ok(())
}

fn status_kib(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    s.lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/self/status"))
}

/// Reset the peak (VmHWM) to the current resident size; that size, in bytes.
fn reset_peak() -> u64 {
    std::fs::write("/proc/self/clear_refs", "5").expect("reset VmHWM via /proc/self/clear_refs");
    status_kib("VmRSS:") * 1024
}

fn peak() -> u64 {
    status_kib("VmHWM:") * 1024
}

/// Up and down with [`BIG_LEN`] bytes, in bounded memory; then overwritten, and refused to a
/// creator.
async fn big_round_trip(b: &dyn Backend) {
    let name = b.describe();
    let file = staged(8, BIG_LEN);
    let base = reset_peak();
    let started = std::time::Instant::now();
    b.put("nar/big.nar", Body::File(file), opts(PutMode::Overwrite))
        .await
        .expect("put big");
    let up = started.elapsed().as_secs_f64();
    check(b.get("nar/big.nar").await.expect("get big"), 8, BIG_LEN)
        .await
        .expect("big object round trip");
    let added = peak().saturating_sub(base);
    eprintln!(
        "{name}: {} MiB up in {up:.1}s, round trip {:.1}s, peak memory +{:.1} MiB",
        BIG_LEN >> 20,
        started.elapsed().as_secs_f64(),
        added as f64 / (1 << 20) as f64
    );
    assert!(
        added < BIG_MEMORY_LIMIT,
        "{name}: a {BIG_LEN}-byte round trip raised peak memory by {added} bytes \
         (limit {BIG_MEMORY_LIMIT})"
    );
    // Overwritten by a different big object, in place.
    b.put(
        "nar/big.nar",
        Body::File(staged(9, BIG_LEN - 1)),
        opts(PutMode::Overwrite),
    )
    .await
    .expect("overwrite big");
    check(b.get("nar/big.nar").await.unwrap(), 9, BIG_LEN - 1)
        .await
        .expect("overwritten big object");
    // A creator of a big object over it is refused, and changes nothing.
    let e = b
        .put(
            "nar/big.nar",
            Body::File(staged(10, BIG_LEN)),
            opts(PutMode::Create),
        )
        .await
        .expect_err("create over an existing big object");
    assert_eq!(e.kind, ErrorKind::AlreadyExists, "{e}");
    check(b.get("nar/big.nar").await.unwrap(), 9, BIG_LEN - 1)
        .await
        .expect("a refused create changed the object");
    b.delete("nar/big.nar").await.expect("delete big");
    assert!(!b.exists("nar/big.nar").await.unwrap());
}

/// Eight writers create one key at once: exactly one wins, the others are told, the winner's
/// bytes stay.
async fn racing_creators(b: Arc<dyn Backend>) {
    let results = futures::future::join_all((0..8).map(|i| {
        let b = b.clone();
        async move {
            let body = Bytes::from(format!("writer {i}\n"));
            let r = b
                .put(
                    "raced.narinfo",
                    Body::Bytes(body.clone()),
                    opts(PutMode::Create),
                )
                .await;
            (body, r)
        }
    }))
    .await;
    let mut winners = Vec::new();
    for (body, r) in results {
        match r {
            Ok(()) => winners.push(body),
            Err(e) => assert_eq!(e.kind, ErrorKind::AlreadyExists, "racing create: {e}"),
        }
    }
    assert_eq!(winners.len(), 1, "8 racing creators: {} won", winners.len());
    assert_eq!(
        b.get_bytes("raced.narinfo", 1 << 20).await.unwrap(),
        winners[0],
        "the stored object is not the winner's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sftp_big_objects_and_racing_creators() {
    let _serial = SERIAL.lock().await;
    let Some(sshd) = tb::sshd() else { return };
    let dir = sshd.fresh_dir("big");
    let b = nixpush_backends::open(&sshd.address(&dir))
        .await
        .expect("open");
    big_round_trip(&*b).await;
    racing_creators(b).await;
    let leftovers: Vec<_> = std::fs::read_dir(dir.join("nar"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "files left: {leftovers:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gcs_big_objects_and_racing_creators() {
    let _serial = SERIAL.lock().await;
    let Some(g) = tb::fake_gcs() else { return };
    g.create_bucket("big");
    let b = nixpush_backends::open(&g.address("big", &tb::unique("p")))
        .await
        .expect("open");
    big_round_trip(&*b).await;
    racing_creators(b).await;
}
