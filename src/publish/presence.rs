//! Which of a set of keys (narinfos) a cache already has, in as few requests as can be.
//!
//! # Two ways to ask
//! - **One existence check per key** ([`Backend::exists`], a `HEAD` on S3), [`EXISTS_CONCURRENCY`]
//!   in flight: `n` requests for `n` keys, whatever the cache holds.
//! - **Ordered listing pages** ([`Backend::list_page`], where the store offers it: S3, GCS): one
//!   request returns up to 1000 keys in order. A page that starts just before a wanted key `w`
//!   and ends at `last` decides every wanted key in between (present if and only if it is on
//!   the page); a page that says the listing is complete decides every wanted key after its
//!   start.
//!
//! # The algorithm
//! The wanted keys are sorted. While some are undecided, let `w` be the first of them; ask for
//! the page after `max(w without its last character, the last entry of the previous page)`.
//! That sorts before `w` and not before anything already listed, so the page's first entry is
//! at most `w` and the pages never overlap. The page decides every wanted key up to its last entry
//! (all of them if it is complete); the next page starts at the next undecided key, skipping the
//! stretch of the bucket between the two that holds nothing wanted.
//!
//! Cost, for `n` wanted keys in a cache of `k` listed entries (a store that groups folders,
//! as S3 and GCS do here, lists all of `nar/…` as one entry; otherwise every key counts):
//! - **at most `k / 1000 + 1` listing requests**: every page but the last is a full page of
//!   entries no other page holds;
//! - **at most `n` requests in all**, so never more than the existence checks: a page is asked
//!   for only while the pages so far have decided more keys than they cost, and the rest takes
//!   one check per key. (The exception: a first page that decides nothing costs one request
//!   more than the checks. With folders grouped, that takes a thousand keys between `w`
//!   without its last character and `w`, `<hash>.narinf…`, which a cache does not have.)
//!   Every page but a folder's (below) decides at least `w`, since its first entry is at most
//!   `w`.
//!
//! A no-op re-push of a 1001-path closure into its own cache therefore costs two listing
//! requests (1001 narinfos, `nix-cache-info` and the `nar/` folder) instead of 1001 `HEAD`s.
//!
//! # When not to list
//! Requests are not the only cost. On AWS a `LIST` costs 12.5 times a `HEAD` ($0.005 against
//! $0.0004 per thousand), and pages come one after another where existence checks run 64 at
//! once. Listing pays when the wanted keys are dense in the bucket (a closure pushed again into
//! its own cache); it does not when a few hundred paths are looked up in a cache of millions.
//! So:
//! - fewer than [`LIST_MIN_WANTED`] (16) wanted keys: existence checks only. Below about 13
//!   keys even a single page costs more than the checks it replaces.
//! - after every full page, if it decided fewer than [`LIST_MIN_DECIDED`] (8) wanted keys, the
//!   bucket is much larger than the set looked for (fewer than 8 wanted per 1000 keys): the rest
//!   is decided by existence checks. A page at that density still replaces 8 requests by one
//!   (at 1.6 times their price on AWS); a sparser one is not worth its wait. At most one page is
//!   spent finding this out.
//! - a full page whose last entry lies in a folder (contains `/`: a store that does not group
//!   folders ran into thousands of `nar/…` keys) says nothing of the density of narinfos, and
//!   does not count towards that decision.
//!
//! Stores that cannot list in order ([`Backend::list_page`] answers `None`: local directories,
//! SFTP, HTTP) get the existence checks. So does a store that refuses to list
//! ([`ErrorKind::Permission`]: a policy may allow `HEAD` and `PUT` without `ListBucket`) or
//! answers with a listing it cannot use ([`ErrorKind::Other`]); other errors are returned.

use std::collections::HashSet;

use futures::StreamExt as _;
use nixpush_backends::{Backend, BackendError, ErrorKind};
use tracing::{debug, warn};

/// Existence checks in flight at once.
pub const EXISTS_CONCURRENCY: usize = 64;
/// Fewer wanted keys than this are decided by existence checks only (see the module doc).
pub const LIST_MIN_WANTED: usize = 16;
/// A full listing page that decides fewer wanted keys than this ends the listing (see the
/// module doc).
pub const LIST_MIN_DECIDED: usize = 8;

/// What [`present`] found, and what it cost.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Presence {
    /// The wanted keys the cache has.
    pub present: HashSet<String>,
    /// Listing requests made.
    pub list_requests: usize,
    /// Existence checks made.
    pub exists_requests: usize,
}

/// Which of `wanted` exist in `backend`; see the module doc for how, and at what cost.
pub async fn present<B: Backend + ?Sized>(
    backend: &B,
    wanted: impl IntoIterator<Item = String>,
) -> Result<Presence, BackendError> {
    let mut wanted: Vec<String> = wanted.into_iter().collect();
    wanted.sort_unstable();
    wanted.dedup();
    let mut found = Presence::default();
    let decided = if wanted.len() >= LIST_MIN_WANTED {
        by_listing(backend, &wanted, &mut found).await?
    } else {
        0
    };
    let rest = &wanted[decided..];
    found.exists_requests += rest.len();
    if let Some(answers) = backend.exists_all(rest).await? {
        for (key, present) in rest.iter().zip(answers) {
            if present {
                found.present.insert(key.clone());
            }
        }
        return Ok(decided_log(found, wanted.len()));
    }
    // Collected first: a stream that maps with a closure here trips rustc's inference of `Send`
    // for the daemon's spawned task ("implementation of `Send` is not general enough").
    let checks: Vec<_> = rest
        .iter()
        .map(|key| async move { (key, backend.exists(key).await) })
        .collect();
    let checks = futures::stream::iter(checks)
        .buffer_unordered(EXISTS_CONCURRENCY)
        .collect::<Vec<_>>()
        .await;
    for (key, r) in checks {
        if r? {
            found.present.insert(key.clone());
        }
    }
    Ok(decided_log(found, wanted.len()))
}

fn decided_log(found: Presence, wanted: usize) -> Presence {
    debug!(
        wanted,
        present = found.present.len(),
        list_requests = found.list_requests,
        exists_requests = found.exists_requests,
        "presence decided"
    );
    found
}

/// Decide a prefix of `wanted` (sorted, distinct) from listing pages, recording what is present
/// in `found`; how many were decided. The rest is left to existence checks.
async fn by_listing<B: Backend + ?Sized>(
    backend: &B,
    wanted: &[String],
    found: &mut Presence,
) -> Result<usize, BackendError> {
    let mut next = 0;
    // The last entry listed so far: everything up to it is known.
    let mut listed_to = String::new();
    // After the first page, list only while the pages have decided more keys than they cost,
    // so that what is left to existence checks keeps the total at most one per key.
    while next < wanted.len() && (found.list_requests == 0 || found.list_requests < next) {
        let w = &wanted[next];
        let start_after = std::cmp::max(before(w), listed_to.as_str()).to_owned();
        let page = match backend.list_page(&start_after).await {
            Ok(Some(page)) => page,
            Ok(None) => break,
            Err(e) if matches!(e.kind, ErrorKind::Permission | ErrorKind::Other) => {
                found.list_requests += 1;
                warn!(error = %e, "cannot list the cache; checking each narinfo instead");
                break;
            }
            Err(e) => return Err(e),
        };
        found.list_requests += 1;
        let on_page: HashSet<&str> = page.keys.iter().map(String::as_str).collect();
        // The contract says ascending, so this is the last one.
        let last = page.keys.iter().max();
        let first_undecided = next;
        while next < wanted.len() && (page.complete || last.is_some_and(|l| wanted[next] <= *l)) {
            if on_page.contains(wanted[next].as_str()) {
                found.present.insert(wanted[next].clone());
            }
            next += 1;
        }
        if page.complete {
            break;
        }
        let Some(last) = last.filter(|l| l.as_str() > start_after.as_str()) else {
            // An empty page that is not the end, or one that broke the contract: no progress.
            break;
        };
        let decided = next - first_undecided;
        if decided < LIST_MIN_DECIDED && !last.contains('/') {
            break;
        }
        listed_to.clone_from(last);
    }
    Ok(next)
}

/// `key` without its last character: it sorts just before `key`, with only keys that share
/// all but `key`'s last character in between (`<hash>.narinf…`, of which a cache has none).
fn before(key: &str) -> &str {
    match key.char_indices().next_back() {
        Some((i, _)) => &key[..i],
        None => key,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::ops::Bound;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use nixpush_backends::{Body, ByteStream, ListPage, PutOptions};
    use proptest::prelude::*;

    use super::*;

    /// An ordered key set that answers `list_page` and `exists` as a store would, and counts
    /// the requests. Not a server: it is what the algorithm reads, to check its arithmetic.
    #[derive(Debug)]
    struct Keys {
        keys: BTreeSet<String>,
        /// Entries per page; `None`: `list_page` is not offered.
        page: Option<usize>,
        /// Keys below a folder come back as the folder (`nar/`), as S3 and GCS do here.
        group: bool,
        /// `list_page` fails with this kind.
        list_fails: Option<ErrorKind>,
        lists: AtomicUsize,
        heads: AtomicUsize,
    }

    impl Keys {
        fn new(keys: impl IntoIterator<Item = String>, page: usize, group: bool) -> Self {
            Self {
                keys: keys.into_iter().collect(),
                page: Some(page),
                group,
                list_fails: None,
                lists: AtomicUsize::new(0),
                heads: AtomicUsize::new(0),
            }
        }

        /// Entries a whole listing has: keys, or top-level keys and folders once each.
        fn entries(&self) -> usize {
            if !self.group {
                return self.keys.len();
            }
            let folders: BTreeSet<&str> = self
                .keys
                .iter()
                .filter_map(|k| k.split_once('/').map(|(f, _)| f))
                .collect();
            self.keys.iter().filter(|k| !k.contains('/')).count() + folders.len()
        }
    }

    fn unused(op: &'static str) -> BackendError {
        BackendError::new(ErrorKind::Other, op, "", "not used by these tests")
    }

    #[async_trait::async_trait]
    impl Backend for Keys {
        async fn put(&self, _: &str, _: Body, _: PutOptions) -> Result<(), BackendError> {
            Err(unused("put"))
        }

        async fn exists(&self, key: &str) -> Result<bool, BackendError> {
            self.heads.fetch_add(1, Ordering::SeqCst);
            Ok(self.keys.contains(key))
        }

        async fn get(&self, _: &str) -> Result<ByteStream, BackendError> {
            Err(unused("get"))
        }

        async fn list_objects(
            &self,
            _: &str,
        ) -> Result<Vec<nixpush_backends::ObjectInfo>, BackendError> {
            Err(unused("list"))
        }

        async fn delete(&self, _: &str) -> Result<(), BackendError> {
            Err(unused("delete"))
        }

        async fn list_page(&self, start_after: &str) -> Result<Option<ListPage>, BackendError> {
            let Some(size) = self.page else {
                return Ok(None);
            };
            self.lists.fetch_add(1, Ordering::SeqCst);
            if let Some(kind) = self.list_fails {
                return Err(BackendError::new(kind, "list", start_after, "refused"));
            }
            let mut keys: Vec<String> = Vec::new();
            let mut rest = self
                .keys
                .range::<str, _>((Bound::Excluded(start_after), Bound::Unbounded))
                .peekable();
            while keys.len() < size {
                let Some(k) = rest.next() else { break };
                match k.split_once('/') {
                    Some((folder, _)) if self.group => {
                        let entry = format!("{folder}/");
                        // A folder appears once, and only in a page that starts before it.
                        if entry.as_str() > start_after && keys.last() != Some(&entry) {
                            keys.push(entry);
                        }
                    }
                    _ => keys.push(k.clone()),
                }
            }
            // Skip what the last folder entry stands for, to tell whether anything follows.
            if let Some(folder) = keys.last().filter(|k| k.ends_with('/')) {
                while rest.peek().is_some_and(|k| k.starts_with(folder.as_str())) {
                    rest.next();
                }
            }
            let complete = rest.peek().is_none();
            Ok(Some(ListPage { keys, complete }))
        }

        fn describe(&self) -> String {
            "in-memory keys".into()
        }
    }

    /// A nixbase32 hash, 32 characters, from a number.
    fn hash(mut x: u64) -> String {
        const ALPHABET: &[u8] = b"0123456789abcdfghijklmnpqrsvwxyz";
        let mut s = String::with_capacity(32);
        for _ in 0..32 {
            // splitmix64 steps: well spread over the alphabet.
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            s.push(ALPHABET[(z % 32) as usize] as char);
        }
        s
    }

    fn narinfo(i: u64) -> String {
        format!("{}.narinfo", hash(i))
    }

    fn nar(i: u64) -> String {
        format!("nar/{}.nar.zst", hash(i + (1 << 40)))
    }

    fn run(keys: &Keys, wanted: &[String]) -> Presence {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let p = rt
            .block_on(present(keys, wanted.iter().cloned()))
            .expect("present");
        assert_eq!(p.list_requests, keys.lists.load(Ordering::SeqCst));
        assert_eq!(p.exists_requests, keys.heads.load(Ordering::SeqCst));
        p
    }

    fn expected(keys: &Keys, wanted: &[String]) -> HashSet<String> {
        wanted
            .iter()
            .filter(|w| keys.keys.contains(*w))
            .cloned()
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Exactly the wanted keys that exist; never more requests than existence checks;
        /// listing requests bounded by the entries listed.
        #[test]
        fn finds_exactly_the_present_keys(
            in_cache in proptest::collection::btree_set(0u64..3000, 0..600),
            wanted in proptest::collection::btree_set(0u64..3000, 0..300),
            nars in 0u64..1500,
            extras in proptest::collection::vec(
                prop_oneof![Just("nix-cache-info"), Just("log/x"), Just("0"), Just("~")],
                0..4,
            ),
            ls in any::<bool>(),
            page in 1usize..60,
            group in any::<bool>(),
        ) {
            let mut all: Vec<String> = in_cache.iter().map(|&i| narinfo(i)).collect();
            all.extend((0..nars).map(nar));
            all.extend(extras.iter().map(|s| s.to_string()));
            if ls {
                // Nix's `.ls` listings sort just before their narinfo.
                all.extend(in_cache.iter().map(|&i| format!("{}.ls", hash(i))));
            }
            let keys = Keys::new(all, page, group);
            let wanted: Vec<String> = wanted.iter().map(|&i| narinfo(i)).collect();
            let p = run(&keys, &wanted);
            prop_assert_eq!(&p.present, &expected(&keys, &wanted));
            // One more only when a first page ungrouped runs into `nar/…` and decides nothing.
            let slack = usize::from(!group);
            prop_assert!(p.list_requests + p.exists_requests <= wanted.len() + slack);
            prop_assert!(p.list_requests <= keys.entries() / page + 1);
            if wanted.len() < LIST_MIN_WANTED {
                prop_assert_eq!(p.list_requests, 0);
            }
        }
    }

    /// The benchmark's case: a no-op re-push of 1001 paths into their own cache.
    #[test]
    fn a_closure_in_its_own_cache_takes_two_pages() {
        let mut all: Vec<String> = (0..1001).map(narinfo).collect();
        all.extend((0..1001).map(nar));
        all.push("nix-cache-info".into());
        let keys = Keys::new(all, 1000, true);
        let wanted: Vec<String> = (0..1001).map(narinfo).collect();
        let p = run(&keys, &wanted);
        assert_eq!(p.present.len(), 1001);
        assert_eq!((p.list_requests, p.exists_requests), (2, 0));
        // And half of it pushed: the same pages decide the missing half.
        let wanted: Vec<String> = (500..1500).map(narinfo).collect();
        let keys = Keys::new(keys.keys, 1000, true);
        let p = run(&keys, &wanted);
        assert_eq!(p.present, expected(&keys, &wanted));
        assert!(p.list_requests <= 2 && p.exists_requests == 0, "{p:?}");
    }

    /// Without grouping, thousands of `nar/…` keys sit among the narinfos (`n` is a nixbase32
    /// digit): the pages that run through them do not end the listing, and cost one request
    /// per thousand keys.
    #[test]
    fn folder_keys_in_the_way_are_paged_through() {
        let mut all: Vec<String> = (0..1000).map(narinfo).collect();
        all.extend((0..5000).map(nar));
        let keys = Keys::new(all, 1000, false);
        let wanted: Vec<String> = (0..1000).map(narinfo).collect();
        let p = run(&keys, &wanted);
        assert_eq!(p.present.len(), 1000);
        assert_eq!(p.exists_requests, 0);
        assert!(p.list_requests <= 6000 / 1000 + 1, "{p:?}");
        // Grouped, the 5000 are one entry.
        let keys = Keys::new(keys.keys, 1000, true);
        let p = run(&keys, &wanted);
        assert_eq!((p.list_requests, p.exists_requests), (2, 0));
    }

    /// A few hundred paths in a big cache: one page shows the density is too low, and
    /// existence checks decide the rest.
    #[test]
    fn sparse_sets_switch_to_existence_checks() {
        let all: Vec<String> = (0..100_000).map(narinfo).collect();
        let keys = Keys::new(all, 1000, true);
        // 300 wanted keys, a third of them present, spread over the whole bucket.
        let wanted: Vec<String> = (0..300).map(|i| narinfo(i * 1000 + i % 3)).collect();
        let p = run(&keys, &wanted);
        assert_eq!(p.present, expected(&keys, &wanted));
        assert_eq!(p.list_requests, 1, "{p:?}");
        assert!(p.list_requests + p.exists_requests <= wanted.len());
    }

    #[test]
    fn few_keys_are_checked_one_by_one() {
        let keys = Keys::new((0..100).map(narinfo), 1000, true);
        let wanted: Vec<String> = (90..105).map(narinfo).collect();
        let p = run(&keys, &wanted);
        assert_eq!(p.present.len(), 10);
        assert_eq!((p.list_requests, p.exists_requests), (0, 15));
    }

    #[test]
    fn stores_that_cannot_list_are_checked_one_by_one() {
        let mut keys = Keys::new((0..100).map(narinfo), 1000, true);
        keys.page = None;
        let wanted: Vec<String> = (50..150).map(narinfo).collect();
        let p = run(&keys, &wanted);
        assert_eq!(p.present.len(), 50);
        assert_eq!((p.list_requests, p.exists_requests), (0, 100));
    }

    /// A policy without `ListBucket`: existence checks, as before listing existed. A
    /// transient failure is returned (the push is retried).
    #[test]
    fn a_refused_listing_falls_back_and_outages_are_errors() {
        let wanted: Vec<String> = (50..150).map(narinfo).collect();
        let mut keys = Keys::new((0..100).map(narinfo), 1000, true);
        keys.list_fails = Some(ErrorKind::Permission);
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let p = rt.block_on(present(&keys, wanted.clone())).unwrap();
        assert_eq!(p.present.len(), 50);
        assert_eq!((p.list_requests, p.exists_requests), (1, 100));
        keys.list_fails = Some(ErrorKind::Transient);
        let e = rt.block_on(present(&keys, wanted)).unwrap_err();
        assert_eq!(e.kind, ErrorKind::Transient);
    }

    #[test]
    fn before_sorts_just_before() {
        assert_eq!(before("abc.narinfo"), "abc.narinf");
        assert_eq!(before("é"), "");
        assert!(before("abc.ls") < "abc.narinfo" && "abc.ls" < before("abc.narinfo"));
    }
}
