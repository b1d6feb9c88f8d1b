//! nixpush: publish Nix store paths to binary caches.
//!
//! Layers, each with one job, each knowing only those below it (see `docs/architecture.md`):
//! - [`formats`]: what Nix reads and writes, pure (store paths, nixbase32, NAR, narinfo, keys,
//!   nix-cache-info). No async, no I/O policy.
//! - [`store`]: what we ask the local Nix store, over Nix's worker protocol.
//! - [`publish`]: which paths to publish ([`publish::plan`]), which the cache has already
//!   ([`publish::presence`]), one path to one compressed NAR ([`publish::pipeline`]), and the
//!   order and concurrency of uploads.
//! - [`maintain`]: looking after a cache that exists: verify it, repair it.
//! - [`daemon`]: the queue directory, the socket protocol, the hook client, the worker, systemd.
//! - [`config`] and [`address`]: what the user wrote, checked once.
//! - the `nixpush-backends` crate: where the objects go.

pub mod address;
pub mod config;
pub mod daemon;
pub mod formats;
pub mod maintain;
pub mod publish;
pub mod store;
