//! A NAR as the nix-daemon sends it (`NarFromPath`, no length in front): the copier follows
//! the grammar to find its end, and passes on exactly the bytes it read, a prefix of the
//! stream, or fails cleanly.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nixpush::store::nar_stream::{CHANNEL_CHUNKS, NarCopier};
use tokio::sync::mpsc;

fuzz_target!(|data: &[u8]| {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a runtime");
    rt.block_on(async {
        let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(CHANNEL_CHUNKS);
        let mut input: &[u8] = data;
        let copy = async {
            let r = NarCopier::new(&mut input, &tx).copy().await;
            drop(tx);
            r
        };
        let drain = async {
            let mut out = Vec::new();
            while let Some(chunk) = rx.recv().await {
                match chunk {
                    Ok(b) => out.extend_from_slice(&b),
                    Err(_) => break,
                }
            }
            out
        };
        let (result, out) = tokio::join!(copy, drain);
        assert!(data.starts_with(&out), "passed on bytes it did not read");
        if result.is_ok() {
            // A whole NAR: the copier stops at its last byte, and the lister agrees it is one.
            let mut l = nixpush::formats::nar::Lister::new();
            std::io::Write::write_all(&mut l, &out).expect("the lister takes bytes");
            assert!(
                l.finish().is_ok(),
                "the copier took {} bytes the lister refuses",
                out.len()
            );
        }
    });
});
