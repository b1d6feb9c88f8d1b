//! Looking after a cache that is already there: [`verify`] checks that every path it offers can
//! be substituted, [`repair`] mends what verify found. `nixpush verify CACHE [--deep] [--repair]`
//! is the thin CLI over both. [`gc`] deletes what no root needs, beside live pushers
//! (`nixpush gc`; its module doc has the protocol and the argument for its safety).
//!
//! # What "whole" means
//! A cache is whole when a Nix client with `require-sigs = true` and the cache's keys trusted
//! can substitute every path it has a narinfo for:
//! 1. `nix-cache-info` exists, parses, and its `StoreDir` is the store's (clients refuse a
//!    cache for another store directory);
//! 2. every `<hash>.narinfo` parses, names a path in that store directory whose hash part is
//!    `<hash>`;
//! 3. its NAR (`URL`) exists, and is `FileSize` bytes long where that is known without reading
//!    it; with `--deep`, its bytes hash to `FileHash`, decompress (as `Compression` says), and
//!    the NAR inside hashes to `NarHash` and is `NarSize` bytes long;
//! 4. every reference has a narinfo (a substitution needs the whole closure), unless the cache
//!    leaves out paths an upstream cache has (`push --skip-signed-by`; verify is told so, and a
//!    reference without a narinfo is then a note);
//! 5. at least one `Sig:` verifies under a trusted key (Nix's rule for `require-sigs`), or,
//!    as Nix also accepts, its `CA:` content address implies its store path (the path's name
//!    then proves what it holds; see [`crate::formats::content_address`]). Nix then checks the
//!    content against the address when it imports the path; verify checks a recursive
//!    (`fixed:r:sha256:`) address against NarHash, and a flat or text one not at all.
//!
//! Two things are reported but do not make a cache broken: NARs no narinfo names (orphans, left
//! by a narinfo that was removed or rewritten; reading Nix never sees them) and temporary files
//! left by a writer that was killed (`.nixpush-*`, see `nixpush_backends::fs::TMP_PREFIX`).
//! Removing those is garbage collection, not repair.
//!
//! # Cost model
//! For a cache of `n` narinfos and `k` objects in all:
//! - **the inventory**: one listing of the whole cache, which is `k / 1000 + 1` requests where
//!   the store lists in pages (S3, GCS: `Backend::list`), one directory walk for SFTP, and for
//!   a local directory one `read_dir` of the top and one of `nar/` with a `stat` of each entry
//!   (which also gives sizes and finds temporary files). NAR and reference existence are
//!   answered from it: no request per object. Only what it lacks is asked about once more,
//!   one existence check each (a listing taken during a push may miss an object written just
//!   before one it shows): none in a sound cache. HTTP caches cannot be listed and are
//!   refused.
//! - **the narinfos**: one `GET` each, [`NARINFO_CONCURRENCY`] in flight (a local directory:
//!   plain reads on the checking threads), checked in batches of 1024 on `jobs` threads (the
//!   ed25519 signature check is most of the CPU: some 50 µs a narinfo).
//! - **sizes** (`FileSize`) are checked without reading where the inventory has them (a local
//!   directory). S3 and GCS listings carry sizes too, but `Backend::list` returns keys only,
//!   so there the size is checked by `--deep`.
//! - **`--deep`**: one streamed `GET` per NAR (a local file read on a blocking thread), `jobs`
//!   at once; each NAR passes through
//!   `FileHash`, the decompressor and `NarHash` in one pass with a few 256 KiB chunks in
//!   flight (bounded memory: `jobs` × (chunks + the decoder's window)).
//! - memory otherwise is a few hundred bytes per narinfo (its key, store path, NAR key and
//!   references), which the reference check and repair need.
//!
//! Repair's cost is in [`repair`].

pub mod deep;
pub mod gc;
pub mod inventory;
pub mod repair;
pub mod report;
pub mod verify;

/// Narinfos read at once.
pub const NARINFO_CONCURRENCY: usize = 64;
