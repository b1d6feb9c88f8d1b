//! The framing of Nix's worker protocol (`src/libutil/serialise.hh`, `worker-protocol.hh`).
//!
//! Everything on the wire is a sequence of little-endian 64-bit words:
//! - an integer or a boolean is one word (`0` false, `1` true);
//! - a string (bytes, not necessarily UTF-8) is its length as a word, the bytes, then zero
//!   bytes up to the next multiple of 8;
//! - a list or set of strings is its count as a word, then each string.
//!
//! Requests are built in memory ([`Request`]) and written with one `write_all`, so a batch of
//! pipelined requests costs one system call. Replies are read from a buffered reader with
//! bounds on every length, because a confused or hostile peer must not make us allocate
//! without limit.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt as _};

/// The longest string we accept from the daemon: far above any store path, signature or error
/// message, far below what would hurt.
pub const MAX_STRING: u64 = 16 << 20;
/// The most items we accept in one list (references of one path, paths of one reply).
pub const MAX_ITEMS: u64 = 1 << 24;

/// A request being encoded.
#[derive(Debug, Default)]
pub struct Request {
    buf: Vec<u8>,
}

impl Request {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn u64(&mut self, n: u64) -> &mut Self {
        self.buf.extend_from_slice(&n.to_le_bytes());
        self
    }

    pub fn bool(&mut self, b: bool) -> &mut Self {
        self.u64(u64::from(b))
    }

    pub fn bytes(&mut self, s: &[u8]) -> &mut Self {
        self.u64(s.len() as u64);
        self.buf.extend_from_slice(s);
        let pad = padding(s.len() as u64);
        self.buf.extend_from_slice(&[0; 8][..pad]);
        self
    }

    pub fn str(&mut self, s: &str) -> &mut Self {
        self.bytes(s.as_bytes())
    }

    pub fn strs<S: AsRef<str>>(&mut self, items: &[S]) -> &mut Self {
        self.u64(items.len() as u64);
        for s in items {
            self.str(s.as_ref());
        }
        self
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    pub fn clear(&mut self) {
        self.buf.clear();
    }
}

fn padding(len: u64) -> usize {
    ((8 - len % 8) % 8) as usize
}

fn invalid(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

pub async fn read_u64<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).await?;
    Ok(u64::from_le_bytes(b))
}

pub async fn read_bool<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<bool> {
    match read_u64(r).await? {
        0 => Ok(false),
        1 => Ok(true),
        n => Err(invalid(format!("expected a boolean, got {n}"))),
    }
}

pub async fn read_bytes<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<u8>> {
    let len = read_u64(r).await?;
    if len > MAX_STRING {
        return Err(invalid(format!(
            "a string of {len} bytes (at most {MAX_STRING} expected)"
        )));
    }
    let mut buf = vec![0u8; len as usize + padding(len)];
    r.read_exact(&mut buf).await?;
    if buf[len as usize..].iter().any(|b| *b != 0) {
        return Err(invalid("non-zero padding after a string".into()));
    }
    buf.truncate(len as usize);
    Ok(buf)
}

pub async fn read_string<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<String> {
    String::from_utf8(read_bytes(r).await?).map_err(|_| invalid("a string is not UTF-8".into()))
}

pub async fn read_strings<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Vec<String>> {
    let n = read_count(r).await?;
    let mut out = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        out.push(read_string(r).await?);
    }
    Ok(out)
}

pub async fn read_count<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<usize> {
    let n = read_u64(r).await?;
    if n > MAX_ITEMS {
        return Err(invalid(format!(
            "a list of {n} items (at most {MAX_ITEMS} expected)"
        )));
    }
    Ok(n as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn strings_are_padded_to_words() {
        let mut r = Request::new();
        r.str("").str("abc").strs(&["12345678"]);
        let b = r.as_bytes();
        assert_eq!(b.len(), 8 + (8 + 8) + (8 + 8 + 8));
        assert_eq!(&b[8..16], &3u64.to_le_bytes());
        assert_eq!(&b[16..24], b"abc\0\0\0\0\0");
        let mut cur = b;
        let (a, bb, c) = block_on(async {
            (
                read_string(&mut cur).await.unwrap(),
                read_string(&mut cur).await.unwrap(),
                read_strings(&mut cur).await.unwrap(),
            )
        });
        assert_eq!((a.as_str(), bb.as_str()), ("", "abc"));
        assert_eq!(c, vec!["12345678".to_owned()]);
        assert!(cur.is_empty());
    }

    #[test]
    fn refuses_bad_framing() {
        let mut huge = Request::new();
        huge.u64(MAX_STRING + 1);
        let mut r = huge.as_bytes();
        let e = block_on(read_bytes(&mut r)).unwrap_err();
        assert!(e.to_string().contains("at most"), "{e}");

        let mut bad_pad = Request::new();
        bad_pad.u64(1);
        let mut bytes = bad_pad.as_bytes().to_vec();
        bytes.extend_from_slice(b"a\x01\0\0\0\0\0\0");
        let e = block_on(read_bytes(&mut bytes.as_slice())).unwrap_err();
        assert!(e.to_string().contains("padding"), "{e}");

        let mut truncated = Request::new();
        truncated.str("abcdefgh");
        let short = &truncated.as_bytes()[..12];
        let e = block_on(read_bytes(&mut &short[..])).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);

        let mut b = Request::new();
        b.u64(2);
        assert!(block_on(read_bool(&mut b.as_bytes())).is_err());
    }
}
