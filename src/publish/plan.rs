//! What a request stands for: the one resolver of "what to publish", shared by `nixpush push`
//! and the daemon, so both follow the same rules.
//!
//! A request names [`Root`]s:
//! - [`Root::Path`]: that store path (a `.drv` too: then the derivation file itself) and its
//!   closure;
//! - [`Root::Outputs`]: the outputs of a derivation (`drv^*` in a queue entry; `nixpush push
//!   x.drv` asks for both the `.drv` and its outputs, as nix-push's `--include-outputs` did).
//!
//! Rules:
//! 1. Every path a request names (paths, and the derivations of `Outputs`) must be valid, or
//!    the request fails for good, naming them: checked for all at once, before anything else.
//! 2. A derivation whose outputs are asked for must be built: an output not built (or,
//!    content-addressed, not yet known) fails the request for good, naming the derivation
//!    (building is not ours to do, and leaving it out silently published less than asked).
//!
//! Cost: one validity query for the named paths, one pipelined batch for the derivations'
//! output maps and one validity query for their outputs; nothing for requests without
//! derivations beyond the first.

use std::collections::BTreeSet;

use crate::formats::StorePath;
use crate::store::{Store, StoreError};

/// One thing a request asks to publish.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Root {
    /// A store path and its closure.
    Path(StorePath),
    /// The built outputs of a derivation, and their closures.
    Outputs(StorePath),
}

/// The valid store paths that `roots` stand for, sorted; their closures are what gets
/// published.
pub async fn resolve(store: &dyn Store, roots: &[Root]) -> Result<Vec<StorePath>, StoreError> {
    let named: BTreeSet<StorePath> = roots
        .iter()
        .map(|r| match r {
            Root::Path(p) | Root::Outputs(p) => p.clone(),
        })
        .collect();
    let named: Vec<StorePath> = named.into_iter().collect();
    let valid = store.valid_paths(&named).await?;
    let invalid: Vec<String> = named
        .iter()
        .filter(|p| !valid.contains(*p))
        .map(|p| store.store_dir().display(p))
        .collect();
    if !invalid.is_empty() {
        return Err(StoreError::Invalid(invalid));
    }

    let mut out: BTreeSet<StorePath> = BTreeSet::new();
    let mut drvs: BTreeSet<StorePath> = BTreeSet::new();
    for r in roots {
        match r {
            Root::Path(p) => {
                out.insert(p.clone());
            }
            Root::Outputs(d) => {
                drvs.insert(d.clone());
            }
        }
    }
    if drvs.is_empty() {
        return Ok(out.into_iter().collect());
    }
    let drvs: Vec<StorePath> = drvs.into_iter().collect();
    let maps = store.derivation_outputs(&drvs).await?;
    let mut outputs = Vec::new();
    let mut unknown: Vec<(&StorePath, String)> = Vec::new();
    for (drv, map) in drvs.iter().zip(maps) {
        for (name, path) in map {
            match path {
                Some(p) => outputs.push((drv, name, p)),
                None => unknown.push((drv, name)),
            }
        }
    }
    let paths: Vec<StorePath> = outputs.iter().map(|(_, _, p)| p.clone()).collect();
    let built = store.valid_paths(&paths).await?;
    for (drv, name, p) in outputs {
        if built.contains(&p) {
            out.insert(p);
        } else {
            unknown.push((drv, format!("{name} ({})", store.store_dir().display(&p))));
        }
    }
    // The first derivation with missing outputs, all of its missing outputs named.
    if let Some((drv, _)) = unknown.iter().min_by_key(|(d, _)| *d) {
        let drv = *drv;
        let mut missing: Vec<String> = unknown
            .iter()
            .filter(|(d, _)| *d == drv)
            .map(|(_, o)| o.clone())
            .collect();
        missing.sort();
        return Err(StoreError::NotBuilt {
            drv: store.store_dir().display(drv),
            outputs: missing,
        });
    }
    Ok(out.into_iter().collect())
}
