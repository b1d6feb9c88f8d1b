//! A push beside a garbage collection: the pusher's half of the protocol whose argument is in
//! [`crate::maintain::gc`] ("Safe beside pushers"). Two kinds of small objects, both JSON:
//!
//! - **`nixpush/gc-pending`** ([`Pending`]), written by a gc when it has marked and deleted
//!   when it is done: the narinfos (hash parts) and NAR keys it may delete, when it will list
//!   the cache again and decide (`sweep_at`, T), when it stops deleting (`sweep_end`, E), and
//!   the clock skew it allows for (ε).
//! - **`nixpush/announce/<unix-ms>-<random>.json`** ([`Announcement`]), written by a pusher:
//!   the paths it relies on (the present paths its new narinfos will refer to) and the paths
//!   it was asked for. A gc keeps what was announced after its mark, and `gc --keep-since`
//!   what was announced within its window.
//!
//! # What a push pass does ([`Guard`])
//! 1. At the start, before looking at what the cache has, one `GET` of `gc-pending`.
//! 2. One `PUT` of an announcement naming its roots, while it looks at what the cache has (a
//!    no-op push thus pays for it in parallel); once it knows which present paths it relies
//!    on, one more naming those that are not roots (none for a no-op push).
//! 3. While it runs, it reads `gc-pending` again every [`POLL_EVERY`]; when a new gc has
//!    marked paths it relies on, it announces them again at once.
//! 4. Before writing a narinfo that touches a pending gc's candidates (the narinfo itself is
//!    a candidate, or one of its references, or its NAR), it goes ahead only where the write
//!    lands well before the gc lists again (before T − 2ε by its own clock), or where each
//!    reference that is a candidate was announced before T − 2ε, its NAR (if a candidate) was
//!    uploaded after the mark and before T − 2ε, and the narinfo itself is no candidate.
//!    Otherwise it waits until the gc has stopped deleting (E + ε), checks that what it
//!    relies on is still there, and fails the path (transiently: pushed again, it is
//!    re-published) where it is not.
//! 5. Before uploading a NAR that is a candidate, after T − 2ε and before E + ε, it waits
//!    until E + ε (uploading then could be undone by the sweep).
//!
//! A no-op push thus costs one `GET` and one small `PUT` more than before, and a longer pass
//! one `GET` a second.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use nixpush_backends::{
    Backend, BackendError, BackendExt as _, Body, ErrorKind, PutMode, PutOptions,
};
use tracing::debug;

/// The key of the pending gc's object.
pub const PENDING_KEY: &str = "nixpush/gc-pending";
/// Announcements are below this.
pub const ANNOUNCE_PREFIX: &str = "nixpush/announce/";
/// How often a running push pass reads [`PENDING_KEY`] again.
pub const POLL_EVERY: Duration = Duration::from_secs(1);
/// The largest pending object read (a candidate costs some 40 bytes).
const PENDING_LIMIT: usize = 256 << 20;

/// What a gc has marked (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Pending {
    /// Unique per gc run.
    pub id: String,
    /// When the mark's listing started, Unix milliseconds by the gc's clock.
    pub marked_at_ms: u64,
    /// T: when the gc lists the cache again and decides.
    pub sweep_at_ms: u64,
    /// E: after this, the gc deletes nothing more.
    pub sweep_end_ms: u64,
    /// ε: the largest difference between any two clocks (the store's included) allowed for.
    pub skew_ms: u64,
    /// Hash parts of the narinfos it may delete.
    pub paths: Vec<String>,
    /// NAR keys it may delete.
    pub nars: Vec<String>,
}

impl Pending {
    pub fn marked_at(&self) -> SystemTime {
        from_ms(self.marked_at_ms)
    }
    pub fn sweep_at(&self) -> SystemTime {
        from_ms(self.sweep_at_ms)
    }
    pub fn sweep_end(&self) -> SystemTime {
        from_ms(self.sweep_end_ms)
    }
    pub fn skew(&self) -> Duration {
        Duration::from_millis(self.skew_ms)
    }
    /// Whether it may still delete, or may have deleted moments ago, by a clock `now` within ε.
    pub fn active(&self, now: SystemTime) -> bool {
        now < self.sweep_end() + self.skew()
    }
}

/// What a push pass announces (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Announcement {
    /// When it was written, Unix milliseconds by the pusher's clock (for people; gc goes by
    /// the store's time of the object).
    pub at_ms: u64,
    /// Hash parts of the store paths announced.
    pub paths: Vec<String>,
}

pub fn ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

pub fn from_ms(ms: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms)
}

/// A key for a new announcement: `nixpush/announce/<unix-ms>-<16 hex digits>.json`.
pub fn announcement_key(now: SystemTime) -> String {
    let mut r = [0u8; 8];
    // Without randomness (it never fails on Linux), the time and the process still differ.
    if getrandom::getrandom(&mut r).is_err() {
        r = u64::from(std::process::id()).to_le_bytes();
    }
    format!(
        "{ANNOUNCE_PREFIX}{}-{:016x}.json",
        ms(now),
        u64::from_le_bytes(r)
    )
}

/// Read `gc-pending`; `None` where there is none. An object that does not parse is an error
/// naming it: a pusher that cannot tell what a gc will delete must not go on.
pub async fn read_pending(backend: &dyn Backend) -> Result<Option<Pending>, BackendError> {
    let Some(bytes) = backend.get_optional(PENDING_KEY, PENDING_LIMIT).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes).map(Some).map_err(|e| {
        BackendError::new(
            ErrorKind::Other,
            "get",
            PENDING_KEY,
            format!(
                "the garbage collector's pending object does not parse ({e}); \
                 remove it if no `nixpush gc` is running"
            ),
        )
    })
}

/// Write an announcement of `paths` (hash parts); returns when it is durable.
pub async fn announce(backend: &dyn Backend, paths: Vec<String>) -> Result<(), BackendError> {
    let now = SystemTime::now();
    let body = serde_json::to_vec(&Announcement {
        at_ms: ms(now),
        paths,
    })
    .expect("an announcement serialises");
    backend
        .put(
            &announcement_key(now),
            Body::Bytes(Bytes::from(body)),
            PutOptions {
                mode: PutMode::Create,
                content_type: "application/json",
            },
        )
        .await
}

/// A pending gc, with its candidates in sets.
#[derive(Debug)]
struct Marked {
    p: Pending,
    paths: HashSet<String>,
    nars: HashSet<String>,
}

impl Marked {
    fn new(p: Pending) -> Self {
        Self {
            paths: p.paths.iter().cloned().collect(),
            nars: p.nars.iter().cloned().collect(),
            p,
        }
    }
    /// The last moment (by a pusher's clock) at which a write surely lands before the gc
    /// lists again: T − 2ε.
    fn safe_until(&self) -> SystemTime {
        self.p.sweep_at() - 2 * self.p.skew()
    }
    /// When the gc has surely stopped deleting, by a pusher's clock: E + ε.
    fn over_at(&self) -> SystemTime {
        self.p.sweep_end() + self.p.skew()
    }
}

#[derive(Debug, Default)]
struct State {
    marked: Option<Arc<Marked>>,
    /// When the last successful read of `gc-pending` started.
    read_at: Option<SystemTime>,
    /// Announcements made knowing of a gc: (its id, when the announcement was durable, the
    /// hash parts announced).
    announced: Vec<(String, SystemTime, HashSet<String>)>,
    /// Gcs the poller has seen (and announced to).
    polled: HashSet<String>,
}

/// One push pass's side of the protocol (see the module doc).
pub struct Guard {
    backend: Arc<dyn Backend>,
    state: Mutex<State>,
    /// Hash parts of the present paths the pass relies on.
    relied: Mutex<HashSet<String>>,
}

/// Why a narinfo was not written.
#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("{0}")]
    Backend(#[from] BackendError),
    #[error(
        "{object} was removed by a garbage collection of the cache (`nixpush gc`) while this \
         push ran, so {path} was not published; pushing again publishes it"
    )]
    Collected { object: String, path: String },
}

impl Guard {
    /// Step 1: read `gc-pending`.
    pub async fn start(backend: Arc<dyn Backend>) -> Result<Arc<Self>, BackendError> {
        let g = Arc::new(Self {
            backend,
            state: Mutex::default(),
            relied: Mutex::default(),
        });
        g.refresh().await?;
        Ok(g)
    }

    async fn refresh(&self) -> Result<Option<Arc<Marked>>, BackendError> {
        let started = SystemTime::now();
        let p = read_pending(&*self.backend).await?;
        let mut st = self.state.lock().expect("guard state");
        let same = match (&st.marked, &p) {
            (Some(m), Some(p)) => m.p.id == p.id,
            (None, None) => true,
            _ => false,
        };
        if !same {
            st.marked = p.map(|p| Arc::new(Marked::new(p)));
        }
        st.read_at = Some(started);
        Ok(st.marked.clone())
    }

    fn current(&self) -> Option<Arc<Marked>> {
        self.state.lock().expect("guard state").marked.clone()
    }

    /// Step 2: announce `paths` (hash parts: the roots, at the start of the pass, then the
    /// present paths the pass relies on that are not roots); returns when it is durable.
    pub async fn announce(&self, paths: HashSet<String>) -> Result<(), BackendError> {
        let known = self.current();
        let mut sorted: Vec<String> = paths.iter().cloned().collect();
        sorted.sort_unstable();
        announce(&*self.backend, sorted).await?;
        if let Some(m) = known {
            self.state.lock().expect("guard state").announced.push((
                m.p.id.clone(),
                SystemTime::now(),
                paths,
            ));
        }
        Ok(())
    }

    /// The present paths (hash parts) the pass relies on, for announcing them to a gc that
    /// marks while the pass runs.
    pub fn set_relied(&self, relied: HashSet<String>) {
        *self.relied.lock().expect("guard relied") = relied;
        // A gc known when the pass announced has been told all of it already.
        let mut st = self.state.lock().expect("guard state");
        if let Some(m) = st.marked.clone() {
            if st.announced.iter().any(|(id, _, _)| *id == m.p.id) {
                st.polled.insert(m.p.id.clone());
            }
        }
    }

    /// Step 3: read `gc-pending` every [`POLL_EVERY`] until the returned task is aborted;
    /// announce again what a new gc marked of what the pass relies on.
    pub fn poll(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(POLL_EVERY).await;
                match me.refresh().await {
                    Ok(Some(m)) => {
                        let new = me
                            .state
                            .lock()
                            .expect("guard state")
                            .polled
                            .insert(m.p.id.clone());
                        if new {
                            if let Err(e) = me.announce_marked(&m).await {
                                debug!(error = %e, "announcing to a new gc failed");
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => debug!(error = %e, "reading the gc's pending object failed"),
                }
            }
        })
    }

    async fn announce_marked(&self, m: &Marked) -> Result<(), BackendError> {
        let hit: HashSet<String> = self
            .relied
            .lock()
            .expect("guard relied")
            .intersection(&m.paths)
            .cloned()
            .collect();
        if hit.is_empty() || SystemTime::now() >= m.safe_until() {
            return Ok(());
        }
        announce(&*self.backend, hit.iter().cloned().collect()).await?;
        self.state.lock().expect("guard state").announced.push((
            m.p.id.clone(),
            SystemTime::now(),
            hit,
        ));
        Ok(())
    }

    /// The pending gc as of at most two polls ago, read now if the poller is behind.
    async fn fresh(&self) -> Result<Option<Arc<Marked>>, BackendError> {
        let read_at = self.state.lock().expect("guard state").read_at;
        match read_at {
            Some(t) if t + 2 * POLL_EVERY > SystemTime::now() => Ok(self.current()),
            _ => self.refresh().await,
        }
    }

    /// Step 5: before uploading the NAR `key`.
    pub async fn before_nar(&self, key: &str) -> Result<(), BackendError> {
        loop {
            let Some(m) = self.fresh().await? else {
                return Ok(());
            };
            let now = SystemTime::now();
            if !m.p.active(now) || !m.nars.contains(key) || now < m.safe_until() {
                return Ok(());
            }
            debug!(key, "NAR is a gc candidate: waiting for the sweep to end");
            sleep_until(m.over_at()).await;
            self.refresh().await?;
        }
    }

    /// Step 4: before writing the narinfo of `hash` (a hash part) whose references are
    /// `refs` (hash parts, itself left out) and whose NAR `nar` was uploaded from `nar_at.0`
    /// to `nar_at.1`. `path` is for messages.
    pub async fn before_narinfo(
        &self,
        hash: &str,
        refs: &[String],
        nar: &str,
        nar_at: (SystemTime, SystemTime),
        path: &str,
    ) -> Result<(), GuardError> {
        loop {
            let Some(m) = self.fresh().await? else {
                return Ok(());
            };
            let now = SystemTime::now();
            if !m.p.active(now) {
                return Ok(());
            }
            let refs_hit: Vec<&String> = refs.iter().filter(|r| m.paths.contains(*r)).collect();
            let self_hit = m.paths.contains(hash);
            let nar_hit = m.nars.contains(nar);
            if (refs_hit.is_empty() && !self_hit && !nar_hit) || now < m.safe_until() {
                return Ok(());
            }
            // Late: allowed only where the gc is sure to keep all it touches.
            let announced = {
                let st = self.state.lock().expect("guard state");
                refs_hit.iter().all(|r| {
                    st.announced.iter().any(|(id, at, set)| {
                        *id == m.p.id && *at < m.safe_until() && set.contains(*r)
                    })
                })
            };
            let nar_kept =
                !nar_hit || (nar_at.0 > m.p.marked_at() + m.p.skew() && nar_at.1 < m.safe_until());
            if announced && nar_kept && !self_hit {
                return Ok(());
            }
            debug!(
                path,
                "narinfo touches a gc's candidates: waiting for the sweep to end"
            );
            sleep_until(m.over_at()).await;
            // The gc has stopped; what it removed is gone for good, what is left stays.
            let mut keys: Vec<String> = refs_hit.iter().map(|r| format!("{r}.narinfo")).collect();
            keys.push(nar.to_owned());
            for key in keys {
                if !self.backend.exists(&key).await? {
                    return Err(GuardError::Collected {
                        object: key,
                        path: path.to_owned(),
                    });
                }
            }
            self.refresh().await?;
        }
    }
}

async fn sleep_until(t: SystemTime) {
    if let Ok(d) = t.duration_since(SystemTime::now()) {
        tokio::time::sleep(d).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache directory with `pending` as its gc-pending object, and a guard that read it.
    async fn guarded(pending: &Pending) -> (tempfile::TempDir, Arc<dyn Backend>, Arc<Guard>) {
        let dir = tempfile::tempdir().unwrap();
        let backend: Arc<dyn Backend> = Arc::new(
            nixpush_backends::fs::FsBackend::new(dir.path().join("cache"))
                .await
                .unwrap(),
        );
        let body = serde_json::to_vec(pending).unwrap();
        let opts = PutOptions {
            mode: PutMode::Overwrite,
            content_type: "application/json",
        };
        backend
            .put(PENDING_KEY, Body::Bytes(body.into()), opts)
            .await
            .unwrap();
        let guard = Guard::start(backend.clone()).await.unwrap();
        (dir, backend, guard)
    }

    /// A gc that marked `aaa` and `nar/old.nar`, lists again `sweep_in` from now and stops
    /// deleting `end_in` from now, with a skew of 100 ms.
    fn pending(sweep_in: Duration, end_in: Duration) -> Pending {
        let now = SystemTime::now();
        Pending {
            id: announcement_key(now),
            marked_at_ms: ms(now - Duration::from_secs(1)),
            sweep_at_ms: ms(now + sweep_in),
            sweep_end_ms: ms(now + end_in),
            skew_ms: 100,
            paths: vec!["aaa".into()],
            nars: vec!["nar/old.nar".into()],
        }
    }

    async fn small(backend: &dyn Backend, key: &str) {
        let opts = PutOptions {
            mode: PutMode::Overwrite,
            content_type: "text/plain",
        };
        backend
            .put(key, Body::Bytes(Bytes::from_static(b"x")), opts)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_early_write_goes_ahead_at_once() {
        let p = pending(Duration::from_secs(30), Duration::from_secs(60));
        let (_d, _b, g) = guarded(&p).await;
        let t = std::time::Instant::now();
        let now = SystemTime::now();
        g.before_narinfo("zzz", &["aaa".into()], "nar/old.nar", (now, now), "p")
            .await
            .unwrap();
        g.before_nar("nar/old.nar").await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn a_late_write_on_a_candidate_waits_for_the_sweep_then_checks_it_is_there() {
        // Late already (the gc lists again in 100 ms), sweeping for a second more.
        let p = pending(Duration::from_millis(100), Duration::from_millis(1200));
        let (_d, _b, g) = guarded(&p).await;
        let t = std::time::Instant::now();
        let now = SystemTime::now();
        let e = g
            .before_narinfo(
                "zzz",
                &["aaa".into()],
                "nar/new.nar",
                (now, now),
                "/s/zzz-p",
            )
            .await
            .expect_err("aaa is gone after the sweep");
        assert!(
            t.elapsed() >= Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        assert_eq!(
            e.to_string(),
            "aaa.narinfo was removed by a garbage collection of the cache (`nixpush gc`) while \
             this push ran, so /s/zzz-p was not published; pushing again publishes it"
        );
        // Where it survived the sweep, the write goes ahead after it.
        let p = pending(Duration::from_millis(100), Duration::from_millis(1200));
        let (_d2, b2, g2) = guarded(&p).await;
        small(&*b2, "aaa.narinfo").await;
        small(&*b2, "nar/new.nar").await;
        let t = std::time::Instant::now();
        g2.before_narinfo("zzz", &["aaa".into()], "nar/new.nar", (now, now), "p")
            .await
            .unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(1000),
            "{:?}",
            t.elapsed()
        );
        // A candidate NAR is not uploaded late in the window either.
        let p = pending(Duration::from_millis(100), Duration::from_millis(800));
        let (_d3, _b3, g3) = guarded(&p).await;
        let t = std::time::Instant::now();
        g3.before_nar("nar/old.nar").await.unwrap();
        assert!(
            t.elapsed() >= Duration::from_millis(700),
            "{:?}",
            t.elapsed()
        );
    }

    #[tokio::test]
    async fn an_announced_reference_lets_a_late_write_through() {
        // The gc lists again in 600 ms (safe until 400 ms from now) and sweeps for 30 s.
        let p = pending(Duration::from_millis(600), Duration::from_secs(30));
        let (_d, _b, g) = guarded(&p).await;
        g.announce(HashSet::from(["aaa".to_owned()])).await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let t = std::time::Instant::now();
        let now = SystemTime::now();
        g.before_narinfo("zzz", &["aaa".into()], "nar/new.nar", (now, now), "p")
            .await
            .unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
    }

    #[test]
    fn announcement_keys_sort_by_time_and_differ() {
        let t = from_ms(1_700_000_000_123);
        let a = announcement_key(t);
        let b = announcement_key(t);
        assert!(a.starts_with("nixpush/announce/1700000000123-"), "{a}");
        assert!(a.ends_with(".json"));
        assert_ne!(a, b);
    }

    #[test]
    fn a_pending_gc_is_active_until_its_sweep_ends_and_the_skew() {
        let p = Pending {
            id: "x".into(),
            marked_at_ms: 1000,
            sweep_at_ms: 5000,
            sweep_end_ms: 9000,
            skew_ms: 500,
            paths: vec![],
            nars: vec![],
        };
        assert!(p.active(from_ms(9499)));
        assert!(!p.active(from_ms(9500)));
        let m = Marked::new(p);
        assert_eq!(m.safe_until(), from_ms(4000));
        assert_eq!(m.over_at(), from_ms(9500));
    }
}
