//! nixpush: publish Nix store paths to binary caches.
//!
//! Layers, each with one job (see `docs/architecture.md`):
//! - [`formats`]: what Nix reads, pure (store paths, nixbase32, NAR, narinfo, keys, cache info).
//! - [`store`]: what we ask the local Nix store (closures and path metadata).
//! - [`pipeline`]: one store path to one staged, compressed NAR, in one streaming pass.
//! - [`push`]: which paths to publish, in which order, how many at once; [`presence`]: which
//!   of them the cache has already.
//! - the `nixpush-backends` crate: where the objects go.

pub mod address;
pub mod config;
pub mod daemon;
pub mod formats;
pub mod hook;
pub mod pipeline;
pub mod presence;
pub mod protocol;
pub mod push;
pub mod queue;
pub mod store;
pub mod systemd;
