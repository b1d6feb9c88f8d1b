//! The queue directory: the single source of truth for what still has to be published.
//!
//! Every request is a file in the queue directory until every path of its closure is
//! published; only then is it removed. The daemon rescans the directory at start-up and
//! periodically, and a file-system watcher only nudges it sooner, so nothing depends on an
//! event being delivered.
//!
//! # Entry format
//! A regular file (not a symlink) whose name does not start with `.`, at most
//! [`MAX_ENTRY_BYTES`], holding whitespace-separated items; `#` starts a comment line:
//! - a store path, e.g. `/nix/store/<hash>-hello-2.12`: publish its closure;
//! - `<store path of a .drv>^*`: publish the closure of that derivation's built outputs (what
//!   the post-build-hook sends when Nix does not pass `OUT_PATHS`).
//!
//! So `echo /nix/store/…-hello > /var/lib/nixpush/queue/my-request` is a valid request. Writers
//! that want to be safe against a reader seeing half a file write a dot-file and rename it, as
//! [`Queue::enqueue`] does; a file that does not parse yet and is younger than
//! [`SETTLE_TIME`] is left for a later scan rather than rejected.
//!
//! Entries that can never succeed are moved to `rejected/` inside the queue directory, with a
//! `<name>.reason` file beside them: whatever is not a regular file (a symlink, a directory, a
//! FIFO, a device node, a socket; never opened, so a FIFO cannot block the daemon and a
//! device is not touched), an entry whose name is not UTF-8, one that is too large, not text
//! or does not parse, or that names a path outside the store or not valid in it. A name too
//! long to take `.reason` (file names are at most [`NAME_MAX`] bytes), or one already taken in
//! `rejected/`, is shortened or numbered there, and the reason says what it was.

use std::ffi::{OsStr, OsString};
use std::fs;
use std::io::{self, Read as _, Write as _};
use std::os::unix::ffi::{OsStrExt as _, OsStringExt as _};
use std::os::unix::fs::{
    FileTypeExt as _, MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _,
};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime};

use crate::formats::store_path::StorePathError;
use crate::formats::{StoreDir, StorePath};

pub const MAX_ENTRY_BYTES: u64 = 1 << 20;
pub const REJECTED_DIR: &str = "rejected";
/// The longest file name Linux's filesystems take, in bytes.
pub const NAME_MAX: usize = 255;
const REASON_SUFFIX: &str = ".reason";
/// The end of the names of entries that report paths seen in the store.
const SEEN_SUFFIX: &str = "-seen";
/// How long a hand-written entry may take to be complete.
pub const SETTLE_TIME: Duration = Duration::from_secs(5);

/// One thing a request asks for.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Item {
    /// A store path and its closure.
    Path(StorePath),
    /// The built outputs of a derivation, and their closure.
    Outputs(StorePath),
}

/// Why an item of a request or entry is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ItemError {
    #[error(transparent)]
    StorePath(#[from] StorePathError),
    #[error("{0:?}: '^*' follows a path that is not a .drv")]
    NotDerivation(String),
}

/// Why an entry's text is not a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error(transparent)]
    Item(#[from] ItemError),
    #[error("the entry names no store path")]
    Empty,
}

impl Item {
    pub fn parse(store_dir: &StoreDir, s: &str) -> Result<Self, ItemError> {
        if let Some(drv) = s.strip_suffix("^*") {
            let p = store_dir.parse(drv)?;
            if !p.is_derivation() {
                return Err(ItemError::NotDerivation(s.to_owned()));
            }
            Ok(Item::Outputs(p))
        } else {
            Ok(Item::Path(store_dir.parse(s)?))
        }
    }

    pub fn render(&self, store_dir: &StoreDir) -> String {
        match self {
            Item::Path(p) => store_dir.display(p),
            Item::Outputs(p) => format!("{}^*", store_dir.display(p)),
        }
    }
}

/// Parse an entry's text. Every item must be valid, or the whole entry is refused.
pub fn parse_entry(store_dir: &StoreDir, text: &str) -> Result<Vec<Item>, EntryError> {
    let mut items = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        for word in line.split_whitespace() {
            items.push(Item::parse(store_dir, word)?);
        }
    }
    if items.is_empty() {
        return Err(EntryError::Empty);
    }
    items.sort();
    items.dedup();
    Ok(items)
}

#[derive(Debug, Clone)]
pub struct Queue {
    dir: PathBuf,
}

/// An entry found by a scan. Its name is whatever the directory holds, UTF-8 or not, so that
/// any entry can be rejected by it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: OsString,
}

impl Entry {
    pub fn new(name: impl Into<OsString>) -> Self {
        Self { name: name.into() }
    }

    /// Whether it reports paths seen in the store rather than asks for them (see
    /// [`Queue::enqueue_seen`]).
    pub fn is_seen(&self) -> bool {
        self.name.as_bytes().ends_with(SEEN_SUFFIX.as_bytes())
    }
}

/// The name, for people: as it is if it is UTF-8 without control characters, else with those
/// bytes escaped (`bad-\xff`).
impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.name.to_str() {
            Some(n) if !n.chars().any(char::is_control) => f.write_str(n),
            _ => write!(f, "{}", self.name.as_bytes().escape_ascii()),
        }
    }
}

/// What reading an entry gave.
#[derive(Debug)]
pub enum Read {
    Items(Vec<Item>),
    /// Not parsable yet, but young enough that a writer may still be at it.
    NotReady,
    /// Never going to be valid: reject it, with this reason.
    Invalid(InvalidEntry),
    /// Gone meanwhile (another process finished it).
    Gone,
}

/// Why an entry can never be published as it is. Each message is whole by itself (a cause is
/// part of it, not also the `source()`); it goes into the entry's `.reason` file.
#[derive(Debug, thiserror::Error)]
pub enum InvalidEntry {
    #[error("cannot inspect: {0}")]
    Inspect(io::Error),
    #[error("the entry is a symlink; entries must be regular files")]
    Symlink,
    #[error("the entry is {0}, not a regular file; entries must be regular files")]
    NotAFile(&'static str),
    #[error(
        "the entry's name is not UTF-8; name entries in UTF-8 (the daemon and the hook use \
         <nanoseconds>-<pid>-<counter>)"
    )]
    NameNotUtf8,
    #[error("the entry is {0} bytes, more than the limit of {MAX_ENTRY_BYTES}")]
    TooLarge(u64),
    #[error("the entry is not UTF-8 text")]
    NotUtf8,
    #[error("cannot read: {0}")]
    Read(io::Error),
    #[error(transparent)]
    Parse(#[from] EntryError),
}

/// An entry the daemon moved to `rejected/`, and why.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub entry: Entry,
    pub reason: String,
    /// When it was rejected (its `.reason` file's time), where that can be read.
    pub at: Option<SystemTime>,
}

/// Why `retry` or `drop_rejected` did nothing. Each message is whole by itself.
#[derive(Debug, thiserror::Error)]
pub enum QueueOpError {
    #[error("no rejected entry {0} (see `nixpush queue list`)")]
    NoSuchRejected(Entry),
    #[error("an entry named {0} is already in the queue; drop one of them first")]
    NameTaken(Entry),
    #[error("rejected entry {0}: {1}")]
    Io(Entry, io::Error),
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl Queue {
    /// Open the queue directory, creating it (and `rejected/`) if needed.
    pub fn open(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir.join(REJECTED_DIR))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }

    /// Without creating anything: for the hook, which must not fail if the directory is absent.
    pub fn at(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Durably add a request: once this returns, it survives a crash or power loss.
    pub fn enqueue(&self, store_dir: &StoreDir, items: &[Item]) -> io::Result<String> {
        let lines: Vec<String> = items.iter().map(|i| i.render(store_dir)).collect();
        self.enqueue_raw(&lines)
    }

    /// Like [`Queue::enqueue`], with items not checked here (the daemon checks them when it
    /// reads the entry): for the hook, which must stay fast and never lose a request.
    pub fn enqueue_raw(&self, items: &[String]) -> io::Result<String> {
        self.write_new(items, "")
    }

    /// Like [`Queue::enqueue`], for paths seen appearing in the store (see
    /// [`super::watch_store`]): a path among them that is no longer valid when the entry is
    /// worked on is passed over, not a reason to reject the entry.
    pub fn enqueue_seen(&self, store_dir: &StoreDir, items: &[Item]) -> io::Result<String> {
        let lines: Vec<String> = items.iter().map(|i| i.render(store_dir)).collect();
        self.write_new(&lines, SEEN_SUFFIX)
    }

    fn write_new(&self, items: &[String], suffix: &str) -> io::Result<String> {
        let mut text = String::new();
        for it in items {
            text.push_str(it);
            text.push('\n');
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        // Names sort by time, so the oldest requests go first.
        let name = format!(
            "{:020}-{}-{}{suffix}",
            now.as_nanos(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let result = match write_entry(&self.dir, &name, text.as_bytes()) {
            // The daemon has never run (or its state was wiped): a queue directory made now
            // is taken over by the daemon when it starts, so the request survives.
            Err(e) if e.kind() == io::ErrorKind::NotFound => fs::create_dir_all(&self.dir)
                .and_then(|()| write_entry(&self.dir, &name, text.as_bytes())),
            other => other,
        };
        result.map(|()| name)
    }

    /// Entries in name order (oldest first for our own names).
    pub fn scan(&self) -> io::Result<Vec<Entry>> {
        let mut out = Vec::new();
        for e in fs::read_dir(&self.dir)? {
            let e = e?;
            let name = e.file_name();
            // Not UTF-8 is not one of ours, yet still an entry: `read` rejects it by its raw
            // name, rather than leaving it unseen forever.
            if name.as_bytes().starts_with(b".") || name == REJECTED_DIR {
                continue;
            }
            out.push(Entry { name });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub fn read(&self, store_dir: &StoreDir, entry: &Entry) -> Read {
        let path = self.dir.join(&entry.name);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Read::Gone,
            Err(e) => return Read::Invalid(InvalidEntry::Inspect(e)),
        };
        if let Some(why) = not_a_file(&meta) {
            return Read::Invalid(why);
        }
        if entry.name.to_str().is_none() {
            return Read::Invalid(InvalidEntry::NameNotUtf8);
        }
        if meta.len() > MAX_ENTRY_BYTES {
            return Read::Invalid(InvalidEntry::TooLarge(meta.len()));
        }
        let young = meta
            .modified()
            .ok()
            .and_then(|m| m.elapsed().ok())
            .is_none_or(|age| age < SETTLE_TIME);
        let mut text = String::new();
        // Opened without blocking and checked again once open: if the regular file seen above
        // was replaced meanwhile by a FIFO, opening one must not hang the daemon, nor reading
        // one wait for a writer.
        let opened = fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_NOCTTY)
            .open(&path);
        let read = opened.and_then(|f| {
            let now = f.metadata()?;
            if now.dev() != meta.dev() || now.ino() != meta.ino() || !now.is_file() {
                return Err(io::Error::from(io::ErrorKind::NotFound));
            }
            f.take(MAX_ENTRY_BYTES + 1).read_to_string(&mut text)
        });
        match read {
            // Replaced by something else meanwhile: the next scan looks at that.
            Err(e)
                if e.kind() == io::ErrorKind::NotFound && fs::symlink_metadata(&path).is_ok() =>
            {
                return Read::NotReady;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Read::Gone,
            Err(e) if e.kind() == io::ErrorKind::InvalidData => {
                return Read::Invalid(InvalidEntry::NotUtf8);
            }
            Err(e) => return Read::Invalid(InvalidEntry::Read(e)),
        }
        match parse_entry(store_dir, &text) {
            Ok(items) => Read::Items(items),
            Err(_) if young => Read::NotReady,
            Err(e) => Read::Invalid(e.into()),
        }
    }

    /// Remove a finished entry (durably).
    pub fn remove(&self, entry: &Entry) -> io::Result<()> {
        self.remove_all(std::slice::from_ref(entry))
    }

    /// Remove finished entries. The removal is not flushed: an entry that a power loss brings
    /// back is pushed again and finds everything present, which is harmless, while a flush of
    /// the directory here would queue on the disk beside the hooks writing into it.
    pub fn remove_all(&self, entries: &[Entry]) -> io::Result<()> {
        for entry in entries {
            match fs::remove_file(self.dir.join(&entry.name)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Move an entry that can never succeed to `rejected/`, with the reason beside it; the
    /// name it has there (see [`rejected_name`]).
    pub fn reject(&self, entry: &Entry, reason: &str) -> io::Result<OsString> {
        let rejected = self.dir.join(REJECTED_DIR);
        fs::create_dir_all(&rejected)?;
        let name = rejected_name(&entry.name, |n| {
            fs::symlink_metadata(rejected.join(n)).is_ok()
                || fs::symlink_metadata(rejected.join(with_reason_suffix(n))).is_ok()
        });
        let mut text = reason.to_owned();
        if name != entry.name {
            text.push_str(&format!(
                "\n(the entry was queued as {entry}; its name was taken in rejected/ or too long \
                 for a .reason file beside it)"
            ));
        }
        text.push('\n');
        let reason_file = rejected.join(with_reason_suffix(&name));
        if let Err(e) = fs::write(&reason_file, text) {
            // Not half a reason (a full disk): the entry stays queued, and a later try finds
            // the name free again.
            let _ = fs::remove_file(&reason_file);
            return Err(e);
        }
        match fs::rename(self.dir.join(&entry.name), rejected.join(&name)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        sync_dir(&self.dir)?;
        Ok(name)
    }

    /// The entries in `rejected/`, oldest name first, each with the reason the daemon gave.
    pub fn rejected(&self) -> io::Result<Vec<Rejected>> {
        let dir = self.dir.join(REJECTED_DIR);
        let rd = match fs::read_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            r => r?,
        };
        let mut out = Vec::new();
        for e in rd {
            let name = e?.file_name();
            if name.as_bytes().ends_with(REASON_SUFFIX.as_bytes()) {
                continue;
            }
            let at = fs::symlink_metadata(dir.join(with_reason_suffix(&name)))
                .and_then(|m| m.modified())
                .ok();
            out.push(Rejected {
                reason: read_reason(&dir, &name),
                entry: Entry { name },
                at,
            });
        }
        out.sort_by(|a, b| a.entry.name.cmp(&b.entry.name));
        Ok(out)
    }

    /// How many entries `rejected/` holds, and the newest `n` of them (by when they were
    /// rejected: the time of their `.reason` file), most recent first, with their reasons.
    /// Costs one `stat` per entry and one read per entry shown, so `status` stays cheap
    /// whatever piles up there.
    pub fn rejected_newest(&self, n: usize) -> io::Result<(usize, Vec<Rejected>)> {
        let dir = self.dir.join(REJECTED_DIR);
        let rd = match fs::read_dir(&dir) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((0, Vec::new())),
            r => r?,
        };
        let mut all = Vec::new();
        for e in rd {
            let name = e?.file_name();
            if name.as_bytes().ends_with(REASON_SUFFIX.as_bytes()) {
                continue;
            }
            let at = fs::symlink_metadata(dir.join(with_reason_suffix(&name)))
                .or_else(|_| fs::symlink_metadata(dir.join(&name)))
                .and_then(|m| m.modified())
                .ok();
            all.push((at, name));
        }
        let count = all.len();
        // Newest first; entries of one moment by name, newest name first.
        all.sort_by(|a, b| b.cmp(a));
        let newest = all
            .into_iter()
            .take(n)
            .map(|(at, name)| Rejected {
                reason: read_reason(&dir, &name),
                entry: Entry { name },
                at,
            })
            .collect();
        Ok((count, newest))
    }

    /// Put a rejected entry back in the queue (its reason goes), for the daemon to try again:
    /// once what was wrong is put right (the path built, the cache's settings fixed).
    pub fn retry(&self, name: &OsStr) -> Result<(), QueueOpError> {
        let rejected = self.dir.join(REJECTED_DIR);
        let from = rejected.join(name);
        let to = self.dir.join(name);
        if fs::symlink_metadata(&from).is_err() {
            return Err(QueueOpError::NoSuchRejected(Entry::new(name)));
        }
        if fs::symlink_metadata(&to).is_ok() {
            return Err(QueueOpError::NameTaken(Entry::new(name)));
        }
        fs::rename(&from, &to).map_err(|e| QueueOpError::Io(Entry::new(name), e))?;
        let _ = fs::remove_file(rejected.join(with_reason_suffix(name)));
        sync_dir(&self.dir)
            .and_then(|()| sync_dir(&rejected))
            .map_err(|e| QueueOpError::Io(Entry::new(name), e))
    }

    /// Remove a rejected entry and its reason for good.
    pub fn drop_rejected(&self, name: &OsStr) -> Result<(), QueueOpError> {
        let rejected = self.dir.join(REJECTED_DIR);
        let path = rejected.join(name);
        let meta = fs::symlink_metadata(&path)
            .map_err(|_| QueueOpError::NoSuchRejected(Entry::new(name)))?;
        let removed = if meta.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        removed.map_err(|e| QueueOpError::Io(Entry::new(name), e))?;
        let _ = fs::remove_file(rejected.join(with_reason_suffix(name)));
        sync_dir(&rejected).map_err(|e| QueueOpError::Io(Entry::new(name), e))
    }

    /// Leftover temporary files from writers that crashed, older than `age`.
    pub fn clean_stale_temps(&self, age: Duration) {
        let Ok(rd) = fs::read_dir(&self.dir) else {
            return;
        };
        for e in rd.flatten() {
            let name = e.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let old = e
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|m| m.elapsed().ok())
                    .is_some_and(|a| a > age);
                if old {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
}

/// What a rejected entry is, if it is not a regular file: things that are never opened.
fn not_a_file(meta: &fs::Metadata) -> Option<InvalidEntry> {
    let t = meta.file_type();
    let what = if t.is_file() {
        return None;
    } else if t.is_symlink() {
        return Some(InvalidEntry::Symlink);
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown kind"
    };
    Some(InvalidEntry::NotAFile(what))
}

/// The reason beside a rejected entry, or what stopped us reading it.
fn read_reason(rejected: &Path, name: &OsStr) -> String {
    fs::read_to_string(rejected.join(with_reason_suffix(name)))
        .map(|r| r.trim_end().to_owned())
        .unwrap_or_else(|e| format!("(no reason file: {e})"))
}

fn with_reason_suffix(name: &OsStr) -> OsString {
    let mut n = name.to_owned();
    n.push(REASON_SUFFIX);
    n
}

/// The name a rejected entry gets in `rejected/`: its own, if `<name>.reason` fits in a file
/// name and neither is `taken`; otherwise its first bytes (cut to leave room) with `~1`, `~2`,
/// … appended until both are free.
fn rejected_name(name: &OsStr, taken: impl Fn(&OsStr) -> bool) -> OsString {
    let fits = name.len() + REASON_SUFFIX.len() <= NAME_MAX;
    if fits && !taken(name) {
        return name.to_owned();
    }
    for n in 1u64.. {
        let suffix = format!("~{n}");
        let room = NAME_MAX - REASON_SUFFIX.len() - suffix.len();
        let mut stem = name.as_bytes()[..name.len().min(room)].to_vec();
        stem.extend_from_slice(suffix.as_bytes());
        let candidate = OsString::from_vec(stem);
        if !taken(&candidate) {
            return candidate;
        }
    }
    unreachable!("some number is free")
}

/// Write the entry `name` in `dir` so that it appears whole or not at all, and is durable when
/// this returns.
///
/// The quick way, one flush: write an unnamed file (`O_TMPFILE`), link it in under its name,
/// then fsync it. On Linux's journalling filesystems (ext4, XFS, btrfs) that fsync also makes
/// the new name durable, as the link is in the same transaction or log as the inode it
/// changed (and ext4 without a journal syncs the parent of a new inode). This is the hook's
/// critical path, where a second flush is a few milliseconds of every build.
///
/// Where the filesystem has no `O_TMPFILE` or `/proc` is not mounted, the portable way: a
/// dot-file, fsync, rename, fsync of the directory.
fn write_entry(dir: &Path, name: &str, text: &[u8]) -> io::Result<()> {
    let target = dir.join(name);
    if let Some(mut f) = open_unnamed(dir)? {
        f.write_all(text)?;
        // The daemon may run as another user than the writer (root, via nix-daemon).
        f.set_permissions(fs::Permissions::from_mode(0o644))?;
        let fd_path = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&f));
        match rustix::fs::linkat(
            rustix::fs::CWD,
            fd_path.as_str(),
            rustix::fs::CWD,
            &target,
            rustix::fs::AtFlags::SYMLINK_FOLLOW,
        ) {
            Ok(()) => return f.sync_all(),
            // No /proc: the unnamed file goes away with its descriptor; do it the other way.
            Err(rustix::io::Errno::NOENT) if dir.is_dir() => {}
            Err(e) => return Err(e.into()),
        }
    }
    write_renamed(dir, name, text)
}

/// The portable way to write an entry whole and durably: two flushes.
fn write_renamed(dir: &Path, name: &str, text: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(text)?;
        f.sync_all()?;
        fs::set_permissions(&tmp, fs::Permissions::from_mode(0o644))?;
        fs::rename(&tmp, dir.join(name))?;
        sync_dir(dir)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// An unnamed file in `dir`, or `None` where the filesystem (or kernel) has none.
fn open_unnamed(dir: &Path) -> io::Result<Option<fs::File>> {
    match fs::OpenOptions::new()
        .write(true)
        .mode(0o644)
        .custom_flags(libc::O_TMPFILE)
        .open(dir)
    {
        Ok(f) => Ok(Some(f)),
        // EOPNOTSUPP: this filesystem has none; EISDIR: a kernel older than O_TMPFILE.
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(libc::EOPNOTSUPP | libc::EISDIR | libc::EINVAL)
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: &str = "/nix/store/6wc80gnrw32m27zzl4k7r5j3jph6aasy-top";
    const D: &str = "/nix/store/2wx1h0k18gg1w40ca82nv063qpkxqx9i-top.drv";

    fn sd() -> StoreDir {
        StoreDir::new("/nix/store").unwrap()
    }

    #[test]
    fn entry_format() {
        let items = parse_entry(&sd(), &format!("# a comment\n{P}\n{D}^* {P}\n")).unwrap();
        assert_eq!(items.len(), 2);
        assert!(parse_entry(&sd(), "").is_err());
        assert!(parse_entry(&sd(), "\n# only\n").is_err());
        assert!(parse_entry(&sd(), "/etc/passwd").is_err());
        assert!(parse_entry(&sd(), "/nix/store/../etc/passwd").is_err());
        assert!(parse_entry(&sd(), &format!("{P}^*")).is_err());
    }

    #[test]
    fn both_ways_of_writing_an_entry_leave_the_same_file_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        // Whatever the umask, entries are readable by a daemon running as another user.
        write_entry(dir.path(), "a", b"one\n").unwrap();
        write_renamed(dir.path(), "b", b"one\n").unwrap();
        let mut names: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["a", "b"]);
        for n in names {
            let p = dir.path().join(n);
            assert_eq!(fs::read(&p).unwrap(), b"one\n");
            let meta = fs::symlink_metadata(&p).unwrap();
            assert!(meta.file_type().is_file());
            assert_eq!(meta.permissions().mode() & 0o777, 0o644);
        }
        // Linking never replaces an entry (names are unique anyway).
        assert!(write_entry(dir.path(), "a", b"two\n").is_err());
        assert_eq!(fs::read(dir.path().join("a")).unwrap(), b"one\n");
    }

    #[test]
    fn rejected_names_fit_beside_their_reason_and_never_replace_one() {
        let free = |_: &OsStr| false;
        assert_eq!(rejected_name(OsStr::new("a"), free), "a");
        let long = "x".repeat(NAME_MAX);
        let n = rejected_name(OsStr::new(&long), free);
        assert_eq!(n.len() + REASON_SUFFIX.len(), NAME_MAX);
        assert!(n.to_str().unwrap().ends_with("~1"));
        let taken = |n: &OsStr| n == "a" || n == "a~1";
        assert_eq!(rejected_name(OsStr::new("a"), taken), "a~2");
        let raw = OsString::from_vec(b"bad-\xff".to_vec());
        assert_eq!(Entry::new(raw).to_string(), "bad-\\xff");
        assert_eq!(Entry::new("new\nline").to_string(), "new\\nline");
    }

    #[test]
    fn enqueue_scan_read_remove_reject() {
        let dir = tempfile::tempdir().unwrap();
        let q = Queue::open(dir.path()).unwrap();
        let items = vec![Item::Path(sd().parse(P).unwrap())];
        let name = q.enqueue(&sd(), &items).unwrap();
        let entries = q.scan().unwrap();
        assert_eq!(entries, vec![Entry::new(&name)]);
        assert!(matches!(q.read(&sd(), &entries[0]), Read::Items(i) if i == items));
        q.remove(&entries[0]).unwrap();
        assert!(q.scan().unwrap().is_empty());

        std::os::unix::fs::symlink("/etc/passwd", dir.path().join("link")).unwrap();
        let e = Entry::new("link");
        let Read::Invalid(why) = q.read(&sd(), &e) else {
            panic!()
        };
        assert!(matches!(why, InvalidEntry::Symlink), "{why}");
        q.reject(&e, &why.to_string()).unwrap();
        assert!(dir.path().join("rejected/link.reason").exists());
        assert!(q.scan().unwrap().is_empty());
    }
}
