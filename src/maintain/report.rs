//! What verify finds, in words for people and in types for [`super::repair`] and `--json`:
//! a [`Problem`] per way the cache is not whole (the object, the store path where known, and
//! a [`ProblemKind`] whose text says what is wrong), a [`Note`] per thing worth knowing that
//! does not break it, and what each narinfo turned out to be ([`Entry`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;

use crate::formats::StorePath;

/// A way in which the cache is not whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// The object at fault: a narinfo's key, `nix-cache-info`, or a NAR's key.
    pub object: String,
    /// The store path the object is for, where known.
    pub path: Option<String>,
    #[serde(flatten)]
    pub kind: ProblemKind,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.path {
            Some(p) => write!(f, "{} ({p}): {}", self.object, self.kind),
            None => write!(f, "{}: {}", self.object, self.kind),
        }
    }
}

/// What is wrong; the words are for people (the object is named by [`Problem`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, thiserror::Error)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ProblemKind {
    #[error(
        "missing: a client over HTTP refuses the cache (\"does not appear to be a binary \
         cache\", Nix 2.8 says); --repair writes it"
    )]
    CacheInfoMissing,
    #[error("cannot be parsed: {message}")]
    CacheInfoUnparsable { message: String },
    #[error("is for the store {theirs}, but this store is {ours}: Nix refuses the cache")]
    StoreDirMismatch { theirs: String, ours: String },
    #[error("cannot be parsed: {message}")]
    Unparsable { message: String },
    #[error("is not a path in the store {store_dir}: {message}")]
    NotInStore { store_dir: String, message: String },
    #[error("is filed under the wrong name: its narinfo would be {expected}")]
    WrongName { expected: String },
    #[error("its NAR {nar} is missing")]
    NarMissing { nar: String },
    #[error(
        "its NAR {nar} is {actual} bytes, but FileSize says {expected} (truncated or replaced)"
    )]
    FileSize {
        nar: String,
        expected: u64,
        actual: u64,
    },
    #[error("its NAR {nar} hashes to {actual}, but FileHash says {expected}: the file is damaged")]
    FileHash {
        nar: String,
        expected: String,
        actual: String,
    },
    #[error("its NAR {nar} cannot be decompressed as {compression}: {message}")]
    Decompress {
        nar: String,
        compression: String,
        message: String,
    },
    #[error(
        "its NAR {nar} holds an archive of {actual_size} bytes with hash {actual}, \
         but NarHash and NarSize say {expected} and {expected_size} bytes"
    )]
    NarHash {
        nar: String,
        expected: String,
        expected_size: u64,
        actual: String,
        actual_size: u64,
    },
    #[error("refers to {reference}, which has no narinfo, so its closure cannot be substituted")]
    ReferenceMissing { reference: String },
    #[error("refers to {reference:?}, which is not a store path")]
    BadReference { reference: String },
    #[error(
        "has no signature by a trusted key (trusted: {trusted}; signed by: {signed_by}), \
         so Nix with require-sigs refuses it"
    )]
    Unsigned { trusted: String, signed_by: String },
    #[error(
        "its signature by {key} does not verify: the narinfo was changed after it was signed, \
         or it was signed by another key of that name"
    )]
    BadSignature { key: String },
    #[error("could not be checked: {message}")]
    Unreadable { message: String },
}

/// Something worth knowing that does not make the cache broken.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Note {
    /// A NAR no narinfo names.
    Orphan { object: String, size: Option<u64> },
    /// A temporary file left by a writer that was killed.
    StaleTemp {
        object: String,
        age_secs: u64,
        size: u64,
    },
    /// A NAR `deep` could not look into.
    Unchecked { object: String, why: String },
    /// Signatures were not checked.
    NoTrustedKey,
    /// A reference without a narinfo here, where the cache leaves out upstream paths.
    ReferenceElsewhere {
        object: String,
        path: Option<String>,
        reference: String,
        upstream: String,
    },
}

impl std::fmt::Display for Note {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Note::Orphan { object, size } => {
                write!(f, "{object}: no narinfo names this NAR (an orphan")?;
                if let Some(s) = size {
                    write!(f, ", {}", indicatif::HumanBytes(*s))?;
                }
                write!(f, "); Nix never reads it, it can be deleted")
            }
            Note::StaleTemp {
                object,
                age_secs,
                size,
            } => write!(
                f,
                "{object}: stale temporary file ({}, unchanged for {}), left by a writer that \
                 was killed; it can be deleted",
                indicatif::HumanBytes(*size),
                indicatif::HumanDuration(std::time::Duration::from_secs(*age_secs))
            ),
            Note::Unchecked { object, why } => write!(f, "{object}: not checked: {why}"),
            Note::ReferenceElsewhere {
                object,
                path,
                reference,
                upstream,
            } => {
                match path {
                    Some(p) => write!(f, "{object} ({p})")?,
                    None => write!(f, "{object}")?,
                }
                write!(
                    f,
                    ": refers to {reference}, which has no narinfo here; expected upstream \
                     (paths signed by {upstream} are left out)"
                )
            }
            Note::NoTrustedKey => write!(
                f,
                "signatures not checked: no trusted key (give --trusted-key NAME:KEY or --key-file)"
            ),
        }
    }
}

/// What verify learned about one narinfo, for [`super::repair`].
#[derive(Debug, Clone)]
pub struct Entry {
    /// The narinfo's key.
    pub key: String,
    /// The path it is for, where it says (even an unparsable one may).
    pub path: Option<StorePath>,
    /// Its references, without itself, where it parsed.
    pub references: Vec<StorePath>,
    pub state: State,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Passed every check that concerns it alone (its references may still be missing).
    Sound,
    /// Failed one: it must be re-published or removed.
    Broken,
    /// Could not be read (the store failed): neither sound nor known broken.
    Unchecked,
}

/// What verify found.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub cache: String,
    pub deep: bool,
    pub narinfos: usize,
    /// NARs read with `deep`.
    pub nars_read: usize,
    /// Compressed bytes read with `deep`.
    pub bytes_read: u64,
    pub signatures_checked: bool,
    pub problems: Vec<Problem>,
    pub notes: Vec<Note>,
    pub secs: f64,
    /// Every narinfo, by key.
    #[serde(skip)]
    pub entries: BTreeMap<String, Entry>,
    /// Paths that narinfos refer to and that have no narinfo, by key.
    #[serde(skip)]
    pub missing: BTreeMap<String, StorePath>,
}

impl Report {
    /// Every narinfo can be substituted, and every check could be made.
    pub fn whole(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Progress, for displays.
#[derive(Debug, Clone)]
pub enum Event {
    /// The inventory is taken: this many narinfos to read.
    Listed {
        narinfos: usize,
    },
    NarinfoChecked,
    /// `deep` starts: this many NARs, this many bytes (as FileSize says).
    Reading {
        nars: usize,
        bytes: u64,
    },
    NarRead {
        bytes: u64,
    },
    Problem(Problem),
    Note(Note),
}

pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;
