//! Serialise a path on disk as a NAR, as `nix-store --dump` does (`dumpPath` in `archive.cc`).

use std::fs;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use super::{Finished, Node, Writer};

/// The most the copy buffer for file contents grows to: large reads keep syscalls off the
/// profile. It grows to the largest file met, so that a path of small files (most of a real
/// closure) does not clear a megabyte for each.
const BUF_SIZE: usize = 1 << 20;

/// Each message is whole by itself: the I/O error is part of it and not also the `source()`,
/// so a report that prints the chain of causes shows it once.
#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("cannot archive {path}: {error}")]
    Io { path: PathBuf, error: io::Error },
    #[error("cannot archive {0}: not a regular file, directory or symlink")]
    UnsupportedType(PathBuf),
    #[error("writing the archive: {0}")]
    Sink(io::Error),
}

/// Write the NAR of `path` into `out` and give `out` back.
pub fn dump<W: Write>(path: &Path, out: W) -> Result<W, DumpError> {
    let root = Writer::open(out).map_err(DumpError::Sink)?;
    let mut buf = Vec::new();
    let done = node(path, root, &mut buf)?;
    Ok(done.expect("the root node gives its writer back"))
}

fn node<W: Write>(
    path: &Path,
    n: Node<'_, W>,
    buf: &mut Vec<u8>,
) -> Result<Finished<W>, DumpError> {
    let at = |error| DumpError::Io {
        path: path.to_owned(),
        error,
    };
    let meta = fs::symlink_metadata(path).map_err(at)?;
    let ft = meta.file_type();
    // Errors from the node writer are either our sink failing or the file changing under us;
    // the latter carries an InvalidData/UnexpectedEof/InvalidInput kind and names the path.
    let sink_or_path = |e: io::Error| match e.kind() {
        io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof | io::ErrorKind::InvalidInput => {
            at(e)
        }
        _ => DumpError::Sink(e),
    };
    if ft.is_symlink() {
        let target = fs::read_link(path).map_err(at)?;
        n.symlink(target.as_os_str().as_bytes())
            .map_err(sink_or_path)
    } else if ft.is_file() {
        let executable = meta.permissions().mode() & 0o100 != 0;
        let mut f = fs::File::open(path).map_err(at)?;
        let want = usize::try_from(meta.len()).map_or(BUF_SIZE, |l| l.clamp(1, BUF_SIZE));
        if buf.len() < want {
            buf.resize(want, 0);
        }
        n.file(executable, meta.len(), &mut f, buf)
            .map_err(sink_or_path)
    } else if ft.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)
            .map_err(at)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(at)?;
        names.sort_unstable_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
        let mut dir = n.directory().map_err(DumpError::Sink)?;
        for name in names {
            let child = dir.entry(name.as_bytes()).map_err(sink_or_path)?;
            node(&path.join(&name), child, buf)?;
        }
        dir.close().map_err(DumpError::Sink)
    } else {
        Err(DumpError::UnsupportedType(path.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_path_is_named_with_its_cause_once() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("gone");
        let e = dump(&missing, Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!(
                "cannot archive {}: No such file or directory (os error 2)",
                missing.display()
            )
        );
        assert!(std::error::Error::source(&e).is_none());
    }
}
