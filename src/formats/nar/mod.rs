//! The Nix Archive format (`src/libutil/archive.cc`; manual `protocols/nix-archive`).
//!
//! Every token is `str(s)`: the length as a little-endian u64, the bytes, then zero padding to a
//! multiple of 8.
//! ```text
//! nar       = str("nix-archive-1") node
//! node      = str("(") str("type") (regular | symlink | directory) str(")")
//! regular   = str("regular") [str("executable") str("")] str("contents") str(<bytes>)
//! symlink   = str("symlink") str("target") str(<target>)
//! directory = str("directory") { str("entry") str("(") str("name") str(<name>)
//!                                str("node") node str(")") }
//! ```
//! Directory entries are sorted by name, bytewise, without duplicates; a name is not empty, not
//! `.` or `..`, and holds no `/` or NUL. Only the executable bit survives: no times, owners or
//! other modes. The NarHash of a store path is the sha256 of this byte stream, NarSize its length.
//!
//! [`Writer`] makes a malformed archive impossible to write through its types: a [`Node`] is
//! consumed by writing exactly one file, symlink or directory, a [`Directory`] checks that names
//! come in order, and a file's contents must be exactly as long as announced.
//! [`dump`] walks a path on disk into a writer. [`Lister`] reads a NAR's bytes as they stream
//! past and lists its entries as Nix's `.ls` files do.

mod dump;
mod listing;

pub use dump::{DumpError, dump};
pub use listing::Lister;

use std::io::{self, Read, Write};

const MAGIC: &[u8] = b"nix-archive-1";

/// Writes one NAR into `W`. Start with [`Writer::open`].
pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    /// Write the archive header and return the root node.
    pub fn open<'a>(out: W) -> io::Result<Node<'a, W>>
    where
        W: 'a,
    {
        let mut w = Writer { out };
        w.token(MAGIC)?;
        Ok(Node {
            w: NodeSlot::Root(w),
            in_entry: false,
        })
    }

    fn token(&mut self, s: &[u8]) -> io::Result<()> {
        self.out.write_all(&(s.len() as u64).to_le_bytes())?;
        self.out.write_all(s)?;
        self.pad(s.len() as u64)
    }

    fn tokens(&mut self, ts: &[&[u8]]) -> io::Result<()> {
        ts.iter().try_for_each(|t| self.token(t))
    }

    fn pad(&mut self, len: u64) -> io::Result<()> {
        let rem = (len % 8) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; 8][rem..])?;
        }
        Ok(())
    }
}

enum NodeSlot<'a, W: Write> {
    Root(Writer<W>),
    Entry(&'a mut Writer<W>),
}

impl<W: Write> NodeSlot<'_, W> {
    fn get(&mut self) -> &mut Writer<W> {
        match self {
            NodeSlot::Root(w) => w,
            NodeSlot::Entry(w) => w,
        }
    }
}

/// One node to be written. The root node returns the underlying writer when done.
pub struct Node<'a, W: Write> {
    w: NodeSlot<'a, W>,
    in_entry: bool,
}

/// What finishing a node gives back: the inner writer for the root, nothing for an entry.
pub type Finished<W> = Option<W>;

impl<'a, W: Write> Node<'a, W> {
    /// A regular file of exactly `size` bytes read from `contents`, with `buf` as copy buffer.
    pub fn file(
        mut self,
        executable: bool,
        size: u64,
        contents: &mut dyn Read,
        buf: &mut [u8],
    ) -> io::Result<Finished<W>> {
        let w = self.w.get();
        w.tokens(&[b"(", b"type", b"regular"])?;
        if executable {
            w.tokens(&[b"executable", b""])?;
        }
        w.token(b"contents")?;
        w.out.write_all(&size.to_le_bytes())?;
        let mut left = size;
        while left > 0 {
            let want = buf.len().min(usize::try_from(left).unwrap_or(usize::MAX));
            let n = contents.read(&mut buf[..want])?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!("file shrank while archiving: {left} of {size} bytes missing"),
                ));
            }
            w.out.write_all(&buf[..n])?;
            left -= n as u64;
        }
        // A file that grew would make the archive disagree with the size we announced.
        if contents.read(&mut buf[..1])? != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("file grew while archiving: more than {size} bytes"),
            ));
        }
        w.pad(size)?;
        self.close()
    }

    pub fn symlink(mut self, target: &[u8]) -> io::Result<Finished<W>> {
        if target.is_empty() || target.contains(&0) {
            return Err(invalid("symlink target is empty or contains NUL"));
        }
        self.w
            .get()
            .tokens(&[b"(", b"type", b"symlink", b"target", target])?;
        self.close()
    }

    pub fn directory(mut self) -> io::Result<Directory<'a, W>> {
        self.w.get().tokens(&[b"(", b"type", b"directory"])?;
        Ok(Directory {
            node: self,
            last: None,
        })
    }

    fn close(mut self) -> io::Result<Finished<W>> {
        let w = self.w.get();
        w.token(b")")?;
        if self.in_entry {
            w.token(b")")?;
        }
        Ok(match self.w {
            NodeSlot::Root(mut w) => {
                w.out.flush()?;
                Some(w.out)
            }
            NodeSlot::Entry(_) => None,
        })
    }
}

/// A directory being written: add entries in strictly increasing bytewise order, then
/// [`close`](Directory::close) it.
pub struct Directory<'a, W: Write> {
    node: Node<'a, W>,
    last: Option<Vec<u8>>,
}

impl<'a, W: Write> Directory<'a, W> {
    /// Start the entry `name`; the returned node must be written before the next entry.
    pub fn entry(&mut self, name: &[u8]) -> io::Result<Node<'_, W>> {
        if name.is_empty()
            || name == b"."
            || name == b".."
            || name.contains(&b'/')
            || name.contains(&0)
        {
            return Err(invalid(format!(
                "invalid directory entry name {:?}",
                String::from_utf8_lossy(name)
            )));
        }
        if let Some(last) = &self.last {
            if name <= last.as_slice() {
                return Err(invalid(format!(
                    "directory entry {:?} is not after {:?} in byte order",
                    String::from_utf8_lossy(name),
                    String::from_utf8_lossy(last)
                )));
            }
        }
        self.last = Some(name.to_vec());
        let w = self.node.w.get();
        w.tokens(&[b"entry", b"(", b"name", name, b"node"])?;
        Ok(Node {
            w: NodeSlot::Entry(w),
            in_entry: true,
        })
    }

    pub fn close(self) -> io::Result<Finished<W>> {
        self.node.close()
    }
}

fn invalid(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nar(f: impl FnOnce(Node<'static, Vec<u8>>) -> io::Result<Finished<Vec<u8>>>) -> Vec<u8> {
        f(Writer::open(Vec::new()).unwrap()).unwrap().unwrap()
    }

    #[test]
    fn rejects_unsorted_and_bad_names() {
        let root = Writer::open(Vec::new()).unwrap();
        let mut d = root.directory().unwrap();
        d.entry(b"b").unwrap().symlink(b"x").unwrap();
        assert!(d.entry(b"a").is_err());
        assert!(d.entry(b"b").is_err());
        assert!(d.entry(b"..").is_err());
        assert!(d.entry(b"c/d").is_err());
        assert!(d.entry(b"").is_err());
    }

    #[test]
    fn file_size_is_checked() {
        let mut buf = [0u8; 4];
        let root = Writer::open(Vec::new()).unwrap();
        assert!(root.file(false, 10, &mut &b"short"[..], &mut buf).is_err());
        let root = Writer::open(Vec::new()).unwrap();
        assert!(root.file(false, 2, &mut &b"longer"[..], &mut buf).is_err());
    }

    #[test]
    fn padding_and_layout() {
        let mut buf = [0u8; 3];
        let bytes = nar(|n| n.file(true, 5, &mut &b"hello"[..], &mut buf));
        // Golden: `printf hello > f; chmod +x f; nix-store --dump f | xxd`.
        let mut expect = Vec::new();
        for t in [
            &b"nix-archive-1"[..],
            b"(",
            b"type",
            b"regular",
            b"executable",
            b"",
            b"contents",
            b"hello",
            b")",
        ] {
            expect.extend_from_slice(&(t.len() as u64).to_le_bytes());
            expect.extend_from_slice(t);
            expect.resize(expect.len().div_ceil(8) * 8, 0);
        }
        assert_eq!(bytes, expect);
    }
}
