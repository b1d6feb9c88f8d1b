//! One NAR checked to the bottom, in one streaming pass:
//! ```text
//! Backend::get ─► [sha256 + count: FileHash, FileSize] ─► bounded channel
//!              ─► decompressor (a blocking thread) ─► [sha256 + count: NarHash, NarSize]
//! ```
//! Memory is bounded whatever the NAR's size: [`CHUNKS_IN_FLIGHT`] chunks from the store, the
//! decoder's buffers and window, and a copy buffer of at most 256 KiB (less for a small NAR:
//! a cache of small paths is mostly small NARs, and filling a fresh 256 KiB buffer for each
//! cost more than reading them). When the decoder gives up (the data is not what the
//! narinfo's `Compression` says), the rest is still read for `FileHash`, so a damaged file is
//! reported as such first.
//!
//! A NAR in a local directory is read by [`measure_file`] on the calling (blocking) thread,
//! hashed below the decoder's buffer, without the channel.

use std::io::{self, Read};
use std::path::Path;

use bytes::{Buf as _, Bytes};
use futures::TryStreamExt as _;
use nixpush_backends::{Backend, BackendError};
use sha2::Digest as _;

use crate::formats::{Compression, Sha256};

/// Chunks read ahead of the decompressor.
pub const CHUNKS_IN_FLIGHT: usize = 4;
const COPY_BUF: usize = 256 << 10;

/// What one NAR turned out to be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NarFacts {
    pub file_hash: Sha256,
    pub file_size: u64,
    /// The NAR inside: its hash and size, or why it could not be decompressed.
    pub nar: Result<(Sha256, u64), String>,
}

/// Read the NAR under `key` and measure it (see the module doc). Only the store's failures
/// are errors; what the bytes are is in the answer.
/// `nar_size` (what the narinfo says) only sizes the buffers.
pub async fn measure(
    backend: &dyn Backend,
    key: &str,
    compression: Compression,
    nar_size: u64,
) -> Result<NarFacts, BackendError> {
    let mut stream = backend.get(key).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(CHUNKS_IN_FLIGHT);
    let decoder = tokio::task::spawn_blocking(move || {
        let raw = ChannelReader {
            rx,
            cur: Bytes::new(),
        };
        decode(raw, COPY_BUF, compression, nar_size)
    });
    let mut file_hash = sha2::Sha256::new();
    let mut file_size = 0u64;
    let mut tx = Some(tx);
    while let Some(chunk) = stream.try_next().await? {
        file_hash.update(&chunk);
        file_size += chunk.len() as u64;
        if let Some(t) = &tx {
            if t.send(chunk).await.is_err() {
                // The decoder has stopped (bad data, or the end of its stream): keep hashing.
                tx = None;
            }
        }
    }
    drop(tx);
    let nar = match decoder.await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(format!("the decompressor failed: {e}")),
    };
    Ok(NarFacts {
        file_hash: Sha256(file_hash.finalize().into()),
        file_size,
        nar,
    })
}

/// [`measure`] for the NAR file `path` (its key `key`, for errors), blocking.
pub fn measure_file(
    path: &Path,
    key: &str,
    compression: Compression,
    nar_size: u64,
) -> Result<NarFacts, BackendError> {
    let file = std::fs::File::open(path).map_err(|e| BackendError::io("get", key, e))?;
    let file_len = file.metadata().map(|m| m.len()).unwrap_or(COPY_BUF as u64);
    let mut src = Hashing {
        inner: file,
        hash: sha2::Sha256::new(),
        count: 0,
        error: None,
    };
    let nar = decode(&mut src, buffer_for(file_len), compression, nar_size);
    // What the decoder left (trailing bytes, or all of it after a failure) counts for FileHash.
    if src.error.is_none() {
        let _ = io::copy(&mut src, &mut io::sink());
    }
    if let Some(e) = src.error {
        return Err(BackendError::io("get", key, e));
    }
    Ok(NarFacts {
        file_hash: Sha256(src.hash.finalize().into()),
        file_size: src.count,
        nar: nar.map_err(|e| e.to_string()),
    })
}

/// A file read through sha256 and a byte count. A read error is kept: it is the store's
/// failure, not the data's, and must not be reported as a damaged NAR.
struct Hashing<R> {
    inner: R,
    hash: sha2::Sha256,
    count: u64,
    error: Option<io::Error>,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self.inner.read(buf) {
            Ok(n) => {
                self.hash.update(&buf[..n]);
                self.count += n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let copy = io::Error::new(e.kind(), e.to_string());
                self.error = Some(e);
                Err(copy)
            }
        }
    }
}

/// A buffer for `len` bytes: no larger than they need, nor than [`COPY_BUF`].
fn buffer_for(len: u64) -> usize {
    (len.saturating_add(1)).clamp(4096, COPY_BUF as u64) as usize
}

/// Chunks from the channel as a `Read`, for the synchronous decoders.
struct ChannelReader {
    rx: tokio::sync::mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.blocking_recv() {
                Some(b) => self.cur = b,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur.advance(n);
        Ok(n)
    }
}

/// Decompress `src` (read through a buffer of `in_buf` bytes) and hash what comes out.
fn decode(
    src: impl Read,
    in_buf: usize,
    compression: Compression,
    nar_size: u64,
) -> io::Result<(Sha256, u64)> {
    let raw = io::BufReader::with_capacity(in_buf, src);
    let mut reader: Box<dyn Read + '_> = match compression {
        Compression::None => Box::new(raw),
        Compression::Xz => Box::new(xz2::read::XzDecoder::new(raw)),
        Compression::Bzip2 => Box::new(bzip2::read::BzDecoder::new(raw)),
        Compression::Zstd => Box::new(zstd::stream::read::Decoder::with_buffer(raw)?),
    };
    let mut h = sha2::Sha256::new();
    let mut n = 0u64;
    let mut buf = vec![0u8; buffer_for(nar_size)];
    loop {
        let k = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(k) => k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        h.update(&buf[..k]);
        n += k as u64;
    }
    Ok((Sha256(h.finalize().into()), n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn compress(c: Compression, data: &[u8]) -> Vec<u8> {
        match c {
            Compression::None => data.to_vec(),
            Compression::Xz => {
                let mut e = xz2::write::XzEncoder::new(Vec::new(), 6);
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Bzip2 => {
                let mut e = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
                e.write_all(data).unwrap();
                e.finish().unwrap()
            }
            Compression::Zstd => zstd::encode_all(data, 3).unwrap(),
        }
    }

    async fn measured(c: Compression, file: &[u8]) -> NarFacts {
        let d = tempfile::tempdir().unwrap();
        let fs = nixpush_backends::fs::FsBackend::new(d.path().to_owned())
            .await
            .unwrap();
        std::fs::write(d.path().join("nar/x"), file).unwrap();
        let streamed = measure(&fs, "nar/x", c, 1000).await.unwrap();
        let local = measure_file(&d.path().join("nar/x"), "nar/x", c, 1000).unwrap();
        assert_eq!(streamed, local, "{c}");
        streamed
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn every_codec_round_trips_and_damage_shows() {
        // Larger than the chunks and the copy buffer, so the pass really streams.
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let want = (Sha256::digest(&data), data.len() as u64);
        for c in Compression::ALL {
            let file = compress(c, &data);
            let f = measured(c, &file).await;
            assert_eq!(f.file_hash, Sha256::digest(&file), "{c}");
            assert_eq!(f.file_size, file.len() as u64, "{c}");
            assert_eq!(f.nar, Ok(want), "{c}");
            // Cut short: the compressed ones cannot be decompressed, `none` gives another hash.
            let cut = &file[..file.len() / 2];
            let f = measured(c, cut).await;
            assert_eq!(f.file_size, cut.len() as u64, "{c}");
            match c {
                Compression::None => assert_ne!(f.nar, Ok(want)),
                _ => assert!(f.nar.is_err(), "{c}: {:?}", f.nar),
            }
        }
    }
}
