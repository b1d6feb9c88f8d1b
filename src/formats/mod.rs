//! The formats Nix reads from a binary cache, pure: no async, no I/O policy, no configuration.
//! Each module carries the spec it implements and the Nix source file it matches.

pub mod cache_info;
pub mod compression;
pub mod content_address;
pub mod derivation;
pub mod hash;
pub mod nar;
pub mod narinfo;
pub mod nixbase32;
pub mod signing;
pub mod store_path;

pub use compression::Compression;
pub use hash::Sha256;
pub use narinfo::NarInfo;
pub use store_path::{StoreDir, StorePath};
