//! A NAR read from the nix-daemon (`NarFromPath`), for stores whose files nixpush cannot read
//! in place (a chroot store, another machine's store behind `NIX_REMOTE`).
//!
//! The daemon sends the archive raw, with no length in front, so the only way to know where
//! it ends is to follow its grammar (`src/libutil/archive.cc`, see [`crate::formats::nar`]):
//! ```text
//! nar       = "nix-archive-1" node
//! node      = "(" "type" ( regular | symlink | directory ) ")"
//! regular   = "regular" [ "executable" "" ] "contents" CONTENTS
//! symlink   = "symlink" "target" TARGET
//! directory = "directory" { "entry" "(" "name" NAME "node" node ")" }
//! ```
//! Every token is a padded string (see [`super::wire`]). The bytes are passed on exactly as
//! read; the pipeline hashes them and checks NarHash and NarSize as it does for a NAR it
//! serialised itself, so a daemon that sent something else is caught there. File contents are
//! streamed in chunks; tokens are bounded (names, targets), so memory stays flat whatever the
//! NAR size. The bytes go through a channel of [`CHANNEL_CHUNKS`] chunks of up to
//! [`CHUNK`] bytes to a blocking reader ([`NarReader`]) that the pipeline's thread reads.

use std::io::{self, Read};

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt as _};
use tokio::sync::mpsc;

/// Bytes per chunk handed to the reader.
pub const CHUNK: usize = 256 << 10;
/// Chunks in flight between the connection and the reader.
pub const CHANNEL_CHUNKS: usize = 4;
/// The longest token other than file contents (a symlink target is at most `PATH_MAX`).
const MAX_TOKEN: u64 = 64 << 10;
/// Directory nesting we follow; deeper is refused rather than trusted.
const MAX_DEPTH: usize = 4096;

/// Reads a NAR from `r` up to its last byte and nothing more, sending its bytes to `tx` as
/// they come.
pub struct NarCopier<'a, R> {
    r: &'a mut R,
    buf: BytesMut,
    tx: &'a mpsc::Sender<io::Result<Bytes>>,
}

fn bad(what: impl Into<String>) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("malformed NAR from the daemon: {}", what.into()),
    )
}

impl<'a, R: AsyncRead + Unpin> NarCopier<'a, R> {
    pub fn new(r: &'a mut R, tx: &'a mpsc::Sender<io::Result<Bytes>>) -> Self {
        Self {
            r,
            buf: BytesMut::with_capacity(CHUNK),
            tx,
        }
    }

    async fn emit(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            let chunk = self.buf.split().freeze();
            self.tx
                .send(Ok(chunk))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))?;
        }
        Ok(())
    }

    async fn take(&mut self, n: usize) -> io::Result<()> {
        let start = self.buf.len();
        self.buf.resize(start + n, 0);
        self.r.read_exact(&mut self.buf[start..]).await?;
        Ok(())
    }

    async fn u64(&mut self) -> io::Result<u64> {
        let start = self.buf.len();
        self.take(8).await?;
        let b: [u8; 8] = self.buf[start..start + 8].try_into().expect("8 bytes");
        Ok(u64::from_le_bytes(b))
    }

    /// A short token (not file contents), returned and passed on.
    async fn token(&mut self) -> io::Result<Vec<u8>> {
        let len = self.u64().await?;
        if len > MAX_TOKEN {
            return Err(bad(format!("a {len}-byte token")));
        }
        let start = self.buf.len();
        let padded = (len as usize).div_ceil(8) * 8;
        self.take(padded).await?;
        let tok = self.buf[start..start + len as usize].to_vec();
        if self.buf[start + len as usize..].iter().any(|b| *b != 0) {
            return Err(bad("non-zero padding"));
        }
        if self.buf.len() >= CHUNK {
            self.emit().await?;
        }
        Ok(tok)
    }

    async fn expect(&mut self, want: &str) -> io::Result<()> {
        let got = self.token().await?;
        if got != want.as_bytes() {
            return Err(bad(format!(
                "expected {want:?}, got {:?}",
                String::from_utf8_lossy(&got)
            )));
        }
        Ok(())
    }

    /// File contents: a length, the bytes in chunks, padding.
    async fn contents(&mut self) -> io::Result<()> {
        let len = self.u64().await?;
        let mut left = len;
        while left > 0 {
            let room = CHUNK.saturating_sub(self.buf.len()).max(8 << 10);
            let n = left.min(room as u64) as usize;
            self.take(n).await?;
            left -= n as u64;
            if self.buf.len() >= CHUNK {
                self.emit().await?;
            }
        }
        let pad = ((8 - len % 8) % 8) as usize;
        let start = self.buf.len();
        self.take(pad).await?;
        if self.buf[start..].iter().any(|b| *b != 0) {
            return Err(bad("non-zero padding after file contents"));
        }
        Ok(())
    }

    /// Copy one whole NAR, then hand over the last bytes.
    pub async fn copy(mut self) -> io::Result<()> {
        self.expect("nix-archive-1").await?;
        // Open directories; each node ends with ")" and, inside a directory, its entry's ")".
        let mut open_dirs = 0usize;
        'node: loop {
            self.expect("(").await?;
            self.expect("type").await?;
            let mut finished = match self.token().await?.as_slice() {
                b"regular" => {
                    let mut t = self.token().await?;
                    if t == b"executable" {
                        self.expect("").await?;
                        t = self.token().await?;
                    }
                    if t != b"contents" {
                        return Err(bad("a regular file without contents"));
                    }
                    self.contents().await?;
                    self.expect(")").await?;
                    true
                }
                b"symlink" => {
                    self.expect("target").await?;
                    self.token().await?;
                    self.expect(")").await?;
                    true
                }
                b"directory" => {
                    if open_dirs >= MAX_DEPTH {
                        return Err(bad("directories nested too deep"));
                    }
                    open_dirs += 1;
                    false
                }
                other => {
                    return Err(bad(format!(
                        "unknown node type {:?}",
                        String::from_utf8_lossy(other)
                    )));
                }
            };
            // Find the next node: a finished node closes the entry it was in (unless it is
            // the root); the directory around it then has another entry or ends.
            loop {
                if finished {
                    if open_dirs == 0 {
                        break 'node;
                    }
                    self.expect(")").await?;
                }
                match self.token().await?.as_slice() {
                    b"entry" => {
                        self.expect("(").await?;
                        self.expect("name").await?;
                        self.token().await?;
                        self.expect("node").await?;
                        continue 'node;
                    }
                    b")" => {
                        open_dirs -= 1;
                        finished = true;
                    }
                    other => {
                        return Err(bad(format!(
                            "expected an entry or \")\", got {:?}",
                            String::from_utf8_lossy(other)
                        )));
                    }
                }
            }
        }
        self.emit().await
    }
}

/// The blocking side: what the pipeline's thread reads.
pub struct NarReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
}

impl NarReader {
    pub fn new(rx: mpsc::Receiver<io::Result<Bytes>>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
        }
    }
}

impl Read for NarReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(chunk)) => self.current = chunk,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::formats::nar;

    fn copy_all(input: &[u8]) -> io::Result<Vec<u8>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let (tx, mut rx) = mpsc::channel(1024);
            let mut r = input;
            NarCopier::new(&mut r, &tx).copy().await?;
            drop(tx);
            let mut out = Vec::new();
            while let Some(c) = rx.recv().await {
                out.extend_from_slice(&c?);
            }
            // Exactly the NAR, nothing after it.
            assert_eq!(r.len(), input.len() - out.len());
            Ok(out)
        })
    }

    #[test]
    fn copies_exactly_one_nar() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("a/b")).unwrap();
        std::fs::write(root.join("a/b/file"), vec![7u8; 3 * CHUNK + 5]).unwrap();
        std::fs::write(root.join("empty"), b"").unwrap();
        std::os::unix::fs::symlink("a/b/file", root.join("link")).unwrap();
        std::fs::create_dir(root.join("z")).unwrap();
        let mut bytes = nar::dump(&root, Vec::new()).unwrap();
        let len = bytes.len();
        bytes.extend_from_slice(b"trailing bytes of the next reply");
        let out = copy_all(&bytes).unwrap();
        assert_eq!(out, &bytes[..len]);

        let single = dir.path().join("single");
        std::fs::write(&single, b"x").unwrap();
        let one = nar::dump(&single, Vec::new()).unwrap();
        assert_eq!(copy_all(&one).unwrap(), one);
    }

    #[test]
    fn refuses_what_is_not_a_nar() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"hello").unwrap();
        let good = nar::dump(&f, Vec::new()).unwrap();
        // Cut short anywhere: an error, never a short NAR taken for whole.
        for cut in [0, 8, 20, good.len() - 8, good.len() - 1] {
            assert!(copy_all(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut wrong = good.clone();
        wrong[8] = b'X'; // "nix-archive-1" → "Xix-archive-1"
        assert!(
            copy_all(&wrong)
                .unwrap_err()
                .to_string()
                .contains("expected")
        );
    }
}
