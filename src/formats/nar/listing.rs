//! The listing of a NAR that Nix writes beside it in a binary cache with
//! `?write-nar-listing=true` (`<hash>.ls`, `listNar` in `nar-accessor.cc`), so that
//! `nix store ls` and `nix store cat` can serve a path from the cache without the whole NAR:
//! ```json
//! {"version":1,"root":{"type":"directory","entries":{
//!   "bin":{"type":"directory","entries":{"hello":{"type":"regular","size":42,"executable":true,"narOffset":400}}},
//!   "lib":{"type":"symlink","target":"bin"}}}}
//! ```
//! `narOffset` is where a file's contents start in the uncompressed NAR; `executable` is only
//! there when true.
//!
//! [`Lister`] takes the NAR's bytes as they stream past (an [`io::Write`]), following the
//! grammar of [`super`], so the listing comes out of the same pass that hashes and compresses
//! the NAR, whichever way the NAR was made. File contents are skipped, not held; names and
//! targets are bounded; the listing itself grows with the number of entries, as Nix's does.

use std::io;

use serde_json::{Map, Value, json};

/// The longest token other than file contents (a name or symlink target).
const MAX_TOKEN: u64 = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Magic,
    Open,
    Type,
    Kind,
    /// `executable`, or `contents`.
    RegularField,
    /// The empty token after `executable`.
    ExecutableValue,
    /// The length of the contents, then the contents.
    Contents,
    Target,
    TargetValue,
    /// `entry`, or the `)` that closes the directory.
    DirField,
    EntryOpen,
    EntryName,
    EntryNameValue,
    EntryNode,
    /// The `)` of a regular file or symlink.
    Close,
    /// The `)` of a directory entry.
    EntryClose,
    Done,
}

enum Lex {
    /// A token's 8-byte length.
    Len {
        buf: [u8; 8],
        n: usize,
    },
    Token {
        len: usize,
        buf: Vec<u8>,
    },
    Contents {
        left: u64,
    },
    Pad {
        left: u64,
    },
}

/// Builds the listing of the NAR written into it; see the module doc.
pub struct Lister {
    offset: u64,
    lex: Lex,
    expect: Expect,
    /// Open directories: the name each has in its parent (none for the root), its entries.
    dirs: Vec<(Option<String>, Map<String, Value>)>,
    /// The entry whose node is being read.
    name: Option<String>,
    /// The regular file or symlink being read.
    leaf: Map<String, Value>,
    root: Option<Value>,
    error: Option<String>,
}

impl Default for Lister {
    fn default() -> Self {
        Self::new()
    }
}

fn pad(len: u64) -> u64 {
    (8 - len % 8) % 8
}

impl Lister {
    pub fn new() -> Self {
        Self {
            offset: 0,
            lex: Lex::Len { buf: [0; 8], n: 0 },
            expect: Expect::Magic,
            dirs: Vec::new(),
            name: None,
            leaf: Map::new(),
            root: None,
            error: None,
        }
    }

    /// The listing, as the JSON text Nix writes (`{"version":1,"root":…}`); an error naming
    /// what is wrong if the bytes were not one whole NAR.
    pub fn finish(self) -> Result<Vec<u8>, String> {
        if let Some(e) = self.error {
            return Err(e);
        }
        match (self.expect, self.root) {
            (Expect::Done, Some(root)) => {
                Ok(serde_json::to_vec(&json!({"version": 1, "root": root}))
                    .expect("a JSON value serialises"))
            }
            _ => Err("the NAR ended early".into()),
        }
    }

    fn fail(&mut self, what: String) {
        if self.error.is_none() {
            self.error = Some(format!("malformed NAR at byte {}: {what}", self.offset));
        }
    }

    /// A node is complete: put it in its directory, or make it the root.
    fn finished(&mut self, node: Value, name: Option<String>) {
        match (self.dirs.last_mut(), name) {
            (Some((_, entries)), Some(name)) => {
                entries.insert(name, node);
                self.expect = Expect::EntryClose;
            }
            (None, None) => {
                self.root = Some(node);
                self.expect = Expect::Done;
            }
            _ => self.fail("an entry outside a directory".into()),
        }
    }

    fn token(&mut self, t: &[u8]) {
        let want = |lit: &[u8]| t == lit;
        let next = match self.expect {
            Expect::Magic if want(b"nix-archive-1") => Expect::Open,
            Expect::Open if want(b"(") => Expect::Type,
            Expect::Type if want(b"type") => Expect::Kind,
            Expect::Kind if want(b"regular") => {
                self.leaf = Map::new();
                self.leaf.insert("type".into(), "regular".into());
                Expect::RegularField
            }
            Expect::Kind if want(b"symlink") => {
                self.leaf = Map::new();
                self.leaf.insert("type".into(), "symlink".into());
                Expect::Target
            }
            Expect::Kind if want(b"directory") => {
                let name = self.name.take();
                self.dirs.push((name, Map::new()));
                Expect::DirField
            }
            Expect::RegularField if want(b"executable") => Expect::ExecutableValue,
            Expect::ExecutableValue if t.is_empty() => {
                self.leaf.insert("executable".into(), true.into());
                Expect::RegularField
            }
            Expect::RegularField if want(b"contents") => Expect::Contents,
            Expect::Target if want(b"target") => Expect::TargetValue,
            Expect::TargetValue => {
                self.leaf.insert(
                    "target".into(),
                    String::from_utf8_lossy(t).into_owned().into(),
                );
                Expect::Close
            }
            Expect::Close if want(b")") => {
                let leaf = std::mem::take(&mut self.leaf);
                let name = self.name.take();
                self.finished(Value::Object(leaf), name);
                return;
            }
            Expect::DirField if want(b"entry") => Expect::EntryOpen,
            Expect::DirField if want(b")") => {
                let (name, entries) = self.dirs.pop().expect("in a directory");
                let node = json!({"type": "directory", "entries": entries});
                self.finished(node, name);
                return;
            }
            Expect::EntryOpen if want(b"(") => Expect::EntryName,
            Expect::EntryName if want(b"name") => Expect::EntryNameValue,
            Expect::EntryNameValue => {
                self.name = Some(String::from_utf8_lossy(t).into_owned());
                Expect::EntryNode
            }
            Expect::EntryNode if want(b"node") => Expect::Open,
            Expect::EntryClose if want(b")") => Expect::DirField,
            e => {
                self.fail(format!(
                    "unexpected token {:?} (expected {e:?})",
                    String::from_utf8_lossy(&t[..t.len().min(64)])
                ));
                return;
            }
        };
        self.expect = next;
    }
}

impl io::Write for Lister {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut rest = buf;
        while !rest.is_empty() && self.error.is_none() {
            let used = match &mut self.lex {
                Lex::Len { buf: len, n } => {
                    let take = (8 - *n).min(rest.len());
                    len[*n..*n + take].copy_from_slice(&rest[..take]);
                    *n += take;
                    if *n == 8 {
                        let l = u64::from_le_bytes(*len);
                        if self.expect == Expect::Contents {
                            self.leaf.insert("size".into(), l.into());
                            self.leaf
                                .insert("narOffset".into(), (self.offset + take as u64).into());
                            self.lex = Lex::Contents { left: l };
                        } else if l > MAX_TOKEN {
                            self.offset += take as u64;
                            self.fail(format!("a token of {l} bytes"));
                            return Ok(buf.len());
                        } else {
                            self.lex = Lex::Token {
                                len: l as usize,
                                buf: Vec::with_capacity(l as usize),
                            };
                        }
                    }
                    take
                }
                Lex::Token { len, buf: t } => {
                    let take = (*len - t.len()).min(rest.len());
                    t.extend_from_slice(&rest[..take]);
                    take
                }
                Lex::Contents { left } => {
                    let take = (*left).min(rest.len() as u64) as usize;
                    *left -= take as u64;
                    take
                }
                Lex::Pad { left } => {
                    let take = (*left).min(rest.len() as u64) as usize;
                    *left -= take as u64;
                    take
                }
            };
            self.offset += used as u64;
            rest = &rest[used..];
            // Whatever finished, finishes now, so that empty tokens and contents move on too.
            loop {
                match &mut self.lex {
                    Lex::Token { len, buf: t } if t.len() == *len => {
                        let t = std::mem::take(t);
                        self.lex = Lex::Pad {
                            left: pad(t.len() as u64),
                        };
                        self.token(&t);
                    }
                    Lex::Contents { left: 0 } => {
                        let size = self.leaf.get("size").and_then(Value::as_u64).unwrap_or(0);
                        self.lex = Lex::Pad { left: pad(size) };
                        self.expect = Expect::Close;
                    }
                    Lex::Pad { left: 0 } => self.lex = Lex::Len { buf: [0; 8], n: 0 },
                    _ => break,
                }
            }
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn nar_of(build: impl FnOnce(&std::path::Path)) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        build(&root);
        super::super::dump(&root, Vec::new()).unwrap()
    }

    fn listing(nar: &[u8], chunk: usize) -> Value {
        let mut l = Lister::new();
        for c in nar.chunks(chunk) {
            l.write_all(c).unwrap();
        }
        serde_json::from_slice(&l.finish().unwrap()).unwrap()
    }

    #[test]
    fn lists_every_node_with_offsets_whatever_the_chunks() {
        use std::os::unix::fs::PermissionsExt as _;
        let nar = nar_of(|root| {
            std::fs::create_dir_all(root.join("bin")).unwrap();
            std::fs::write(root.join("bin/hello"), b"#!/bin/sh\necho hi\n").unwrap();
            std::fs::set_permissions(
                root.join("bin/hello"),
                std::fs::Permissions::from_mode(0o755),
            )
            .unwrap();
            std::fs::write(root.join("empty"), b"").unwrap();
            std::os::unix::fs::symlink("bin/hello", root.join("link")).unwrap();
        });
        let whole = listing(&nar, nar.len());
        for chunk in [1, 3, 7, 8, 13] {
            assert_eq!(listing(&nar, chunk), whole, "chunks of {chunk}");
        }
        let hello = &whole["root"]["entries"]["bin"]["entries"]["hello"];
        assert_eq!(hello["type"], "regular");
        assert_eq!(hello["executable"], true);
        assert_eq!(hello["size"], 18);
        let at = hello["narOffset"].as_u64().unwrap() as usize;
        assert_eq!(&nar[at..at + 18], b"#!/bin/sh\necho hi\n");
        let empty = &whole["root"]["entries"]["empty"];
        assert_eq!(
            (empty["size"].as_u64(), empty.get("executable")),
            (Some(0), None)
        );
        assert_eq!(
            whole["root"]["entries"]["link"],
            json!({"type": "symlink", "target": "bin/hello"})
        );
        assert_eq!(whole["version"], 1);
    }

    #[test]
    fn a_single_file_is_the_root() {
        let nar = nar_of(|root| std::fs::write(root, b"x").unwrap());
        let l = listing(&nar, 5);
        assert_eq!(l["root"]["type"], "regular");
        assert_eq!(l["root"]["size"], 1);
    }

    #[test]
    fn a_cut_or_foreign_stream_is_refused() {
        let nar = nar_of(|root| std::fs::write(root, b"x").unwrap());
        let mut l = Lister::new();
        l.write_all(&nar[..nar.len() - 8]).unwrap();
        assert_eq!(l.finish().unwrap_err(), "the NAR ended early");
        let mut l = Lister::new();
        l.write_all(b"\x05\0\0\0\0\0\0\0hello\0\0\0").unwrap();
        let e = l.finish().unwrap_err();
        assert!(e.contains("unexpected token \"hello\""), "{e}");
    }
}
