//! Realisations of content-addressed derivations (`__contentAddressed = true`, Nix's
//! `ca-derivations`): which output path each output turned out to be, signed, so that a Nix
//! with `ca-derivations` substitutes the derivation's outputs instead of building them. Layout
//! and signing in [`crate::formats::derivation::realisation`].
//!
//! Which: for every path a push published that is content-addressed and has a deriver, the
//! deriver's `.drv` is read; if its outputs are floating content-addressed, each output that
//! is among the published paths gets `realisations/<id>.doi`, written after the narinfos of
//! the outputs are durable (a realisation names a path, so the path comes first). The id needs
//! the derivation's hash modulo, which needs those of its input derivations, read from the
//! store recursively (memoised for the push). Fixed-output and input-addressed derivations
//! need none: their paths are known from the derivation alone.
//!
//! Cost: nothing for paths that are not content-addressed (nearly all); for a CA derivation,
//! one read of each `.drv` below it (once per push) and one put per output.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use nixpush_backends::{Backend, Body, ErrorKind, PutMode, PutOptions};
use tracing::debug;

use crate::formats::StorePath;
use crate::formats::derivation::{Derivation, Kind, realisation};
use crate::formats::signing::SecretKey;
use crate::store::{NarSource, PathInfo, Store};

type Hashes = BTreeMap<String, [u8; 32]>;

/// The derivation at `drv` and the masked hash modulo of each of its outputs; the unmasked ones
/// of the derivations below it go into `memo` (by store path).
async fn hash_modulo(
    store: &dyn Store,
    drv: &StorePath,
    memo: &mut HashMap<String, Hashes>,
) -> Result<(Derivation, Hashes), String> {
    let file = match store.nar_source(drv).await.map_err(|e| e.to_string())? {
        NarSource::Files(f) => f,
        NarSource::Stream(_) => {
            return Err("the store's files are not on this machine".into());
        }
    };
    // Where the store's files are: the input derivations are beside this one.
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut m = std::mem::take(memo);
    let (result, m) = tokio::task::spawn_blocking(move || {
        let r = read(&file).and_then(|d| {
            let h = hashes(&dir, &d, true, &mut m)?;
            Ok((d, h))
        });
        (r, m)
    })
    .await
    .map_err(|e| e.to_string())?;
    *memo = m;
    result
}

fn read(file: &Path) -> Result<Derivation, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    Derivation::parse(&text).map_err(|e| format!("{}: {e}", file.display()))
}

/// `d`'s hash modulo, its inputs' (unmasked, as Nix's `pathDerivationModulo` has them) first.
fn hashes(
    dir: &Path,
    d: &Derivation,
    mask: bool,
    memo: &mut HashMap<String, Hashes>,
) -> Result<Hashes, String> {
    for (input, _) in &d.input_drvs {
        if memo.contains_key(input) {
            continue;
        }
        let name = Path::new(input)
            .file_name()
            .ok_or_else(|| format!("{input}: not a store path"))?;
        let inner = read(&dir.join(name))?;
        let h = hashes(dir, &inner, false, memo)?;
        memo.insert(input.clone(), h);
    }
    d.hash_modulo(mask, |p, o| memo.get(p).and_then(|m| m.get(o)).copied())
        .ok_or_else(|| "an input derivation lacks an output it is used for".to_owned())
}

/// Publish the realisations of the content-addressed derivations behind `published`; how
/// many, and why each that could not be failed.
pub async fn publish(
    store: &dyn Store,
    backend: &dyn Backend,
    keys: &[SecretKey],
    published: &[Arc<PathInfo>],
) -> (usize, Vec<String>) {
    let sd = store.store_dir().clone();
    let drvs: std::collections::BTreeSet<StorePath> = published
        .iter()
        .filter(|i| i.ca.is_some())
        .filter_map(|i| i.deriver.clone())
        .collect();
    if drvs.is_empty() {
        return (0, Vec::new());
    }
    let mut memo = HashMap::new();
    let mut done = 0;
    let mut failed = Vec::new();
    for drv in drvs {
        let (d, hashes) = match hash_modulo(store, &drv, &mut memo).await {
            Ok(x) => x,
            // A deriver that is gone (collected) or unreadable: the paths are published all
            // the same; only building-free substitution of this derivation is lost.
            Err(e) => {
                debug!(drv = %sd.display(&drv), error = %e, "no realisation");
                continue;
            }
        };
        if d.kind() != Kind::Floating {
            continue;
        }
        // A floating output's path is named after its output (Nix's `outputPathName`):
        // `NAME` for `out`, `NAME-OUTPUT` for the others; the output map of the store knows
        // such paths only where the daemon runs with `ca-derivations` on.
        let drv_name = drv.name().strip_suffix(".drv").unwrap_or(drv.name());
        for info in published
            .iter()
            .filter(|i| i.deriver.as_ref() == Some(&drv))
        {
            let path = &info.path;
            let name = match path.name().strip_prefix(drv_name) {
                Some("") => "out",
                Some(rest) => match rest.strip_prefix('-') {
                    Some(o) => o,
                    None => continue,
                },
                None => continue,
            };
            let Some(hash) = hashes.get(name) else {
                continue;
            };
            let id = realisation::id(hash, name);
            let fingerprint = realisation::fingerprint(&id, path.base_name());
            let sigs: Vec<String> = keys.iter().map(|k| k.sign(&fingerprint)).collect();
            let body = realisation::render(&id, path.base_name(), &sigs);
            let opts = PutOptions {
                mode: PutMode::Create,
                content_type: "application/json",
            };
            match backend
                .put(&realisation::key(&id), Body::Bytes(Bytes::from(body)), opts)
                .await
            {
                Ok(()) => done += 1,
                Err(e) if e.kind == ErrorKind::AlreadyExists => done += 1,
                Err(e) => failed.push(format!("realisation {id} of {}: {e}", sd.display(&drv))),
            }
        }
    }
    (done, failed)
}
