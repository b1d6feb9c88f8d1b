//! One store path to one staged, compressed NAR, in a single streaming pass:
//! ```text
//! directory walk ─► NAR bytes ─► NarHash, NarSize ─► compressor ─► FileHash, FileSize ─► staged file
//! ```
//! Memory stays flat whatever the NAR size: the only buffers are the copy buffer, a write
//! buffer on each side of the compressor, and the compressor's own window.
//!
//! The compressed NAR is staged in a file rather than streamed straight to the backend because
//! its object key is named after its FileHash, which is known only at the end. Where the backend
//! lives on the local filesystem it gives us a staging directory next to the final place, and
//! the "upload" is a rename. Staging also lets the caller check the NarHash against Nix's
//! database before anything becomes visible, and retry an upload without recompressing.

use std::io::{self, BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};

use sha2::Digest as _;

use crate::formats::{Compression, Sha256, nar};
use crate::store::NarSource;

/// Below this NAR size a single compression thread is as fast and wastes no start-up work.
const MULTITHREAD_MIN_NAR: u64 = 4 << 20;
const WRITE_BUF: usize = 256 << 10;
/// zstd's work unit per thread when one NAR is compressed by several threads.
const ZSTD_JOB_SIZE: u32 = 1 << 20;

#[derive(Debug, Clone, Copy)]
pub struct CompressOptions {
    pub compression: Compression,
    /// Codec level; `None` for the codec's default (as Nix: xz 6, zstd 3, bzip2 9).
    pub level: Option<i32>,
    /// Worker threads for one large NAR, where the codec can use them (zstd, xz).
    pub threads: u32,
}

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Dump(#[from] nar::DumpError),
    #[error("cannot read the NAR that the nix-daemon sent: {0}")]
    Stream(io::Error),
    // The cause is in the message, so it is not also the `source()` (printed once).
    #[error("cannot create a staging file in {dir}: {error}{}", full_hint(error))]
    Staging { dir: String, error: io::Error },
    #[error(
        "cannot write the compressed NAR into its staging file in {dir}: {error}{}",
        full_hint(error)
    )]
    StagingWrite { dir: String, error: io::Error },
    /// The listing of a NAR we hashed: only a NAR that is not one (caught by its NarHash too).
    #[error("cannot list the NAR: {0}")]
    Listing(String),
    #[error("{compression} compression level {level} is out of range ({range})")]
    Level {
        compression: Compression,
        level: i32,
        range: &'static str,
    },
}

/// What to do about a full file system, after its error.
fn full_hint(e: &io::Error) -> &'static str {
    if matches!(
        e.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded
    ) {
        "; the file system is full: free space there (the path is tried again)"
    } else {
        ""
    }
}

/// A compressed NAR waiting in a temporary file (removed when dropped).
#[derive(Debug)]
pub struct Staged {
    pub file: tempfile::TempPath,
    pub nar_hash: Sha256,
    pub nar_size: u64,
    pub file_hash: Sha256,
    pub file_size: u64,
    /// The NAR's `.ls` listing (JSON), when asked for.
    pub listing: Option<Vec<u8>>,
}

/// Check a level before any work starts, so a bad one is reported once, not per path.
pub fn validate_level(compression: Compression, level: Option<i32>) -> Result<(), PipelineError> {
    let Some(level) = level else { return Ok(()) };
    let (ok, range) = match compression {
        Compression::None => (true, "ignored"),
        Compression::Xz => ((0..=9).contains(&level), "0-9"),
        Compression::Bzip2 => ((1..=9).contains(&level), "1-9"),
        Compression::Zstd => ((-7..=22).contains(&level), "-7-22"),
    };
    if ok {
        Ok(())
    } else {
        Err(PipelineError::Level {
            compression,
            level,
            range,
        })
    }
}

/// Serialise `source` as a NAR (or take the NAR the daemon sends), compress and hash it into a temporary file in `staging_dir`
/// (or the system temp dir). `size_hint` is the expected NarSize (0 if unknown), used to size
/// the compressor.
pub fn stage(
    source: NarSource,
    staging_dir: Option<&Path>,
    opts: CompressOptions,
    size_hint: u64,
    contexts: &Contexts,
    listing: bool,
) -> Result<Staged, PipelineError> {
    validate_level(opts.compression, opts.level)?;
    let dir = staging_dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    let tmp = tempfile::Builder::new()
        .prefix(".nixpush-")
        .suffix(".tmp")
        // A file backend renames this into the cache as it is: give it the mode Nix gives
        // cache files (0666 less the umask), not tempfile's 0600.
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .tempfile_in(&dir)
        .map_err(|error| PipelineError::Staging {
            dir: dir.display().to_string(),
            error,
        })?;
    let (file, path) = tmp.into_parts();
    // A failed write into the staging file (a full disk, most often) is told as such, with
    // the directory, however deep in the pipeline it surfaced: otherwise it reads as a
    // failure to archive the path, or to read the daemon's NAR.
    let write_failure = Arc::new(Mutex::new(None));
    let watched = Watched {
        inner: file,
        failure: write_failure.clone(),
    };
    stage_into(
        watched,
        path,
        source,
        staging_dir.is_some(),
        opts,
        size_hint,
        contexts,
        listing,
    )
    .map_err(|e| {
        let failed = write_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        match failed {
            Some((kind, message)) => PipelineError::StagingWrite {
                dir: dir.display().to_string(),
                error: io::Error::new(kind, message),
            },
            None => e,
        }
    })
}

/// The first write error of the staging file, as (kind, message).
type WriteFailure = Arc<Mutex<Option<(io::ErrorKind, String)>>>;

/// The staging file, noting its first write error.
struct Watched {
    inner: std::fs::File,
    failure: WriteFailure,
}

impl Watched {
    fn note<T>(&self, r: io::Result<T>) -> io::Result<T> {
        if let Err(e) = &r {
            let mut f = self.failure.lock().unwrap_or_else(|p| p.into_inner());
            if f.is_none() {
                *f = Some((e.kind(), e.to_string()));
            }
        }
        r
    }
}

impl Write for Watched {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let r = self.inner.write(buf);
        self.note(r)
    }

    fn flush(&mut self) -> io::Result<()> {
        let r = self.inner.flush();
        self.note(r)
    }
}

/// The rest of [`stage`], once the staging file is open: the file is removed (with `path`)
/// if this fails.
#[allow(clippy::too_many_arguments)]
fn stage_into(
    file: Watched,
    path: tempfile::TempPath,
    source: NarSource,
    local_staging: bool,
    opts: CompressOptions,
    size_hint: u64,
    contexts: &Contexts,
    listing: bool,
) -> Result<Staged, PipelineError> {
    let sink_err = |e: io::Error| PipelineError::Dump(nar::DumpError::Sink(e));

    let file_side = HashingWriter::new(BufWriter::with_capacity(WRITE_BUF, file));
    let threads = if size_hint >= MULTITHREAD_MIN_NAR {
        opts.threads
    } else {
        1
    };
    let mut zstd_ctx = (opts.compression == Compression::Zstd).then(|| contexts.take(threads));
    let encoder = Encoder::new(
        file_side,
        opts.compression,
        opts.level,
        threads,
        size_hint,
        zstd_ctx.as_mut(),
    )
    .map_err(sink_err)?;
    let lister = listing.then(nar::Lister::new);
    let nar_side = BufWriter::with_capacity(
        WRITE_BUF,
        Listed {
            inner: HashingWriter::new(encoder),
            lister,
        },
    );

    let nar_side = match source {
        NarSource::Files(path) => nar::dump(&path, nar_side)?,
        NarSource::Stream(mut reader) => {
            let mut nar_side = nar_side;
            io::copy(&mut reader, &mut nar_side).map_err(PipelineError::Stream)?;
            nar_side
        }
    };
    let Listed {
        inner: nar_hashing,
        lister,
    } = nar_side
        .into_inner()
        .map_err(|e| sink_err(e.into_error()))?;
    let listing = lister
        .map(nar::Lister::finish)
        .transpose()
        .map_err(PipelineError::Listing)?;
    let (encoder, nar_hash, nar_size) = nar_hashing.finish();
    let file_side = encoder.finish().map_err(sink_err)?;
    if let Some(ctx) = zstd_ctx {
        contexts.give_back(threads, ctx);
    }
    let (buffered, file_hash, file_size) = file_side.finish();
    let file = buffered
        .into_inner()
        .map_err(|e| sink_err(e.into_error()))?
        .inner;
    // Staged where the cache lives (a local directory): its writeback starts now, behind the
    // next NAR's compression, rather than when its batch is flushed.
    if local_staging {
        nixpush_backends::fs::start_writeback(&file);
    }
    drop(file);
    Ok(Staged {
        file: path,
        nar_hash,
        nar_size,
        file_hash,
        file_size,
        listing,
    })
}

/// Passes the NAR's bytes on, and to a [`nar::Lister`] where a listing is wanted.
struct Listed<W> {
    inner: W,
    lister: Option<nar::Lister>,
}

impl<W: Write> Write for Listed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        if let Some(l) = &mut self.lister {
            l.write_all(&buf[..n])?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Passes bytes through and hashes and counts what was written.
pub struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
        }
    }

    pub fn finish(self) -> (W, Sha256, u64) {
        (
            self.inner,
            Sha256(self.hasher.finalize().into()),
            self.count,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// The LZMA2 dictionary size of an xz preset (xz(1), "Presets"): 256 KiB at 0, 1 MiB at 1,
/// 2 MiB at 2, 4 MiB at 3 and 4, 8 MiB at 5 and 6, 16 MiB at 7, 32 MiB at 8, 64 MiB at 9.
fn xz_dict_size(preset: u32) -> u64 {
    const MIB: u64 = 1 << 20;
    match preset & 0x1f {
        0 => MIB / 4,
        1 => MIB,
        2 => 2 * MIB,
        3 | 4 => 4 * MIB,
        5 | 6 => 8 * MIB,
        7 => 16 * MIB,
        8 => 32 * MIB,
        _ => 64 * MIB,
    }
}

/// zstd contexts kept from one NAR to the next, so that a push of thousands of paths does not
/// build a context (its tables, and for a multi-threaded one its worker threads and buffer
/// pool) for each. A context is taken for one NAR and given back once that NAR is whole; as
/// many are out at once as paths compress at once, and at most [`Contexts::KEEP`] are kept.
#[derive(Default)]
pub struct Contexts {
    /// Idle contexts, each with the worker count it was set up for.
    zstd: std::sync::Mutex<Vec<(u32, zstd::zstd_safe::CCtx<'static>)>>,
}

impl Contexts {
    const KEEP: usize = 8;

    fn take(&self, threads: u32) -> zstd::zstd_safe::CCtx<'static> {
        let mut idle = self.zstd.lock().unwrap_or_else(|p| p.into_inner());
        match idle.iter().position(|(t, _)| *t == threads) {
            Some(i) => idle.swap_remove(i).1,
            None => zstd::zstd_safe::CCtx::create(),
        }
    }

    fn give_back(&self, threads: u32, ctx: zstd::zstd_safe::CCtx<'static>) {
        let mut idle = self.zstd.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < Self::KEEP {
            idle.push((threads, ctx));
        }
    }
}

enum Encoder<'c, W: Write> {
    None(W),
    Xz(xz2::write::XzEncoder<W>),
    Bzip2(bzip2::write::BzEncoder<W>),
    Zstd(zstd::stream::write::Encoder<'c, W>),
}

impl<'c, W: Write> Encoder<'c, W> {
    /// `zstd_ctx`: a context to compress with (zstd only; every parameter is set anew, and
    /// its worker count matches `threads`, as [`Contexts`] hands them out).
    fn new(
        w: W,
        compression: Compression,
        level: Option<i32>,
        threads: u32,
        size_hint: u64,
        zstd_ctx: Option<&'c mut zstd::zstd_safe::CCtx<'static>>,
    ) -> io::Result<Self> {
        Ok(match compression {
            Compression::None => Self::None(w),
            Compression::Xz => {
                let preset = level.unwrap_or(6) as u32;
                if threads > 1 {
                    // liblzma's default block is 3× the dictionary (24 MiB at -6), so a NAR
                    // below that compresses on one thread however many it is given. Blocks of
                    // size/threads, never below the dictionary (where ratio would suffer), put
                    // every thread to work on mid-size NARs too.
                    let dict = xz_dict_size(preset);
                    let block = size_hint.div_ceil(u64::from(threads)).clamp(dict, 3 * dict);
                    let stream = xz2::stream::MtStreamBuilder::new()
                        .threads(threads)
                        .preset(preset)
                        .block_size(block)
                        .check(xz2::stream::Check::Crc64)
                        .encoder()
                        .map_err(io::Error::other)?;
                    Self::Xz(xz2::write::XzEncoder::new_stream(w, stream))
                } else {
                    Self::Xz(xz2::write::XzEncoder::new(w, preset))
                }
            }
            Compression::Bzip2 => Self::Bzip2(bzip2::write::BzEncoder::new(
                w,
                bzip2::Compression::new(level.unwrap_or(9) as u32),
            )),
            Compression::Zstd => {
                let mut e = match zstd_ctx {
                    Some(ctx) => zstd::stream::write::Encoder::with_context(w, ctx),
                    None => zstd::stream::write::Encoder::new(w, 0)?,
                };
                e.set_parameter(zstd::stream::raw::CParameter::CompressionLevel(
                    level.unwrap_or(3),
                ))?;
                if threads > 1 {
                    e.multithread(threads)?;
                    // zstd's default job size at level 3 kept ~110 MiB of buffers in flight;
                    // 1 MiB jobs keep a push at ~25 MiB, spread mid-size NARs over all
                    // workers, and cost under 0.2% of compression ratio (measured with
                    // bench/run on its large path).
                    e.set_parameter(zstd::stream::raw::CParameter::JobSize(ZSTD_JOB_SIZE))?;
                }
                // Knowing the size lets zstd pick a window to fit small NARs.
                if size_hint > 0 {
                    e.set_pledged_src_size(Some(size_hint))?;
                }
                e.include_contentsize(false)?;
                Self::Zstd(e)
            }
        })
    }

    fn finish(self) -> io::Result<W> {
        match self {
            Self::None(w) => Ok(w),
            Self::Xz(e) => e.finish(),
            Self::Bzip2(e) => e.finish(),
            Self::Zstd(e) => e.finish(),
        }
    }
}

impl<W: Write> Write for Encoder<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Self::None(w) => w.write(buf),
            Self::Xz(e) => e.write(buf),
            Self::Bzip2(e) => e.write(buf),
            Self::Zstd(e) => e.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::None(w) => w.flush(),
            Self::Xz(e) => e.flush(),
            Self::Bzip2(e) => e.flush(),
            Self::Zstd(e) => e.flush(),
        }
    }
}
