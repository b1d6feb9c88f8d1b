//! How many requests one remote cache gets at once: an adaptive limit (AIMD), shared by every
//! request of a backend, that backs off when the store throttles.
//!
//! A store that answers `429 Too Many Requests` or `503 Slow Down` asks for fewer requests.
//! Retrying each one on its own backoff while keeping as many in flight keeps hammering it
//! (NixOS/nix#15023, Mic92/niks3#402). object_store (0.14) retries 429 and 5xx answers with its
//! exponential backoff, but it ignores `Retry-After` and never sends fewer requests at once.
//! So every HTTP request of the S3 backend (through an object_store `HttpConnector`), of the
//! GCS backend and of the HTTP backend takes a [`Permit`] of the backend's [`Limiter`] first
//! (SFTP has one connection and no throttling answers):
//! - **At most `limit` in flight**, from sending a request until its answer's status line and
//!   headers are in (a streamed body being read afterwards is not counted: its reader may hold
//!   it for as long as it likes).
//! - **Multiplicative decrease**: a throttling answer (429, or 503: S3's `SlowDown` and
//!   `ServiceUnavailable`) halves the limit, taken from the requests actually in flight when it
//!   came (a limit far above what is used would otherwise halve to no effect), never below 1.
//!   Once per round: throttled answers to requests sent before the last decrease do not lower
//!   it again, so one burst of refusals halves it once, not once per refused request.
//! - **Retry-After**: its delay in seconds (at most [`RETRY_AFTER_MAX`]; an HTTP-date is not
//!   read and counts as absent) holds back every request of the backend, retries and new
//!   ones alike, until it has passed.
//! - **Additive increase**: every other answer adds `1/limit`, one more request in flight per
//!   round of answers, up to the limit the backend started with.
//!
//! Connection failures and timeouts change nothing: they say nothing about load.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::info;

/// The longest `Retry-After` honoured; a longer one is cut to this.
pub const RETRY_AFTER_MAX: Duration = Duration::from_secs(300);

/// Requests in flight at most, to one cache, before any throttling: far above what publishing
/// sends (`jobs` × 2 uploads, 64 existence checks), so that only a store's answers limit it.
pub const DEFAULT_MAX_IN_FLIGHT: usize = 256;

/// The adaptive limit of one backend; see the module doc.
#[derive(Debug)]
pub struct Limiter {
    state: Mutex<State>,
    changed: Notify,
    max: f64,
}

#[derive(Debug)]
struct State {
    limit: f64,
    in_flight: usize,
    /// Bumped at every decrease; a permit remembers the round it was taken in.
    round: u64,
    paused_until: Option<Instant>,
    throttled: u64,
}

/// What an answer says about the store's load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// Anything but throttling.
    Ok,
    /// 429 or 503, with its `Retry-After` if it had one.
    Throttled(Option<Duration>),
}

impl Answer {
    /// From a status code and the `Retry-After` header's value.
    pub fn from_status(status: u16, retry_after: Option<&[u8]>) -> Self {
        match status {
            429 | 503 => Answer::Throttled(retry_after.and_then(parse_retry_after)),
            _ => Answer::Ok,
        }
    }
}

/// `Retry-After: SECONDS` (RFC 9110 §10.2.3); `None` for an HTTP-date or anything else.
pub fn parse_retry_after(value: &[u8]) -> Option<Duration> {
    let s = std::str::from_utf8(value).ok()?.trim();
    let secs: u64 = s.parse().ok()?;
    Some(Duration::from_secs(secs).min(RETRY_AFTER_MAX))
}

/// A slot for one request; given back when dropped.
#[derive(Debug)]
pub struct Permit {
    limiter: Arc<Limiter>,
    round: u64,
}

impl Permit {
    /// Tell the limiter what the answer was (and give the slot back).
    pub fn answered(self, answer: Answer) {
        self.limiter.answered(self.round, answer);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut s = self.limiter.lock();
        s.in_flight -= 1;
        drop(s);
        self.limiter.changed.notify_waiters();
    }
}

impl Limiter {
    /// A limiter allowing `max` requests at once until the store throttles.
    pub fn new(max: usize) -> Arc<Self> {
        let max = max.max(1) as f64;
        Arc::new(Self {
            state: Mutex::new(State {
                limit: max,
                in_flight: 0,
                round: 0,
                paused_until: None,
                throttled: 0,
            }),
            changed: Notify::new(),
            max,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Wait for a slot: until fewer than `limit` requests are in flight and no `Retry-After`
    /// holds requests back.
    pub async fn acquire(self: &Arc<Self>) -> Permit {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            // Registered before looking, so a slot given back meanwhile is not missed.
            notified.as_mut().enable();
            let paused = {
                let mut s = self.lock();
                match s.paused_until {
                    Some(t) if t > Instant::now() => Some(t),
                    _ => {
                        s.paused_until = None;
                        if (s.in_flight as f64) < s.limit.floor().max(1.0) {
                            s.in_flight += 1;
                            return Permit {
                                limiter: self.clone(),
                                round: s.round,
                            };
                        }
                        None
                    }
                }
            };
            match paused {
                // A later Retry-After may extend the pause: look again when this one ends.
                Some(t) => tokio::time::sleep_until(t).await,
                None => notified.await,
            }
        }
    }

    fn answered(&self, round: u64, answer: Answer) {
        let mut s = self.lock();
        match answer {
            Answer::Ok => s.limit = (s.limit + 1.0 / s.limit).min(self.max),
            Answer::Throttled(retry_after) => {
                s.throttled += 1;
                if round == s.round {
                    s.limit = (s.limit.min(s.in_flight as f64) / 2.0).max(1.0);
                    s.round += 1;
                    info!(
                        in_flight = s.in_flight,
                        limit = s.limit.floor(),
                        ?retry_after,
                        "the cache throttles: fewer requests at once"
                    );
                }
                if let Some(d) = retry_after {
                    let until = Instant::now() + d;
                    if s.paused_until.is_none_or(|t| t < until) {
                        s.paused_until = Some(until);
                    }
                }
            }
        }
    }

    /// The current limit (whole requests).
    pub fn limit(&self) -> usize {
        self.lock().limit.floor().max(1.0) as usize
    }

    /// Requests in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().in_flight
    }

    /// Throttling answers seen so far.
    pub fn throttled(&self) -> u64 {
        self.lock().throttled
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_retry_after_seconds_only() {
        assert_eq!(parse_retry_after(b" 2 "), Some(Duration::from_secs(2)));
        assert_eq!(parse_retry_after(b"100000"), Some(RETRY_AFTER_MAX));
        assert_eq!(parse_retry_after(b"Wed, 21 Oct 2015 07:28:00 GMT"), None);
        assert_eq!(
            Answer::from_status(503, Some(b"1")),
            Answer::Throttled(Some(Duration::from_secs(1)))
        );
        assert_eq!(Answer::from_status(429, None), Answer::Throttled(None));
        assert_eq!(Answer::from_status(500, Some(b"1")), Answer::Ok);
    }

    #[tokio::test(start_paused = true)]
    async fn halves_once_per_round_from_what_is_in_flight_and_grows_back() {
        let l = Limiter::new(100);
        let permits: Vec<Permit> = futures::future::join_all((0..8).map(|_| l.acquire())).await;
        assert_eq!(l.in_flight(), 8);
        // A burst of eight refusals of requests of one round: one halving, from 8 in flight.
        for p in permits {
            p.answered(Answer::Throttled(None));
        }
        assert_eq!((l.limit(), l.throttled()), (4, 8));
        // Four go at once, the fifth waits.
        let held: Vec<Permit> = futures::future::join_all((0..4).map(|_| l.acquire())).await;
        let fifth = tokio::time::timeout(Duration::from_millis(10), l.acquire()).await;
        assert!(fifth.is_err(), "a fifth request went while the limit is 4");
        // Each round of successes adds about one.
        for p in held {
            p.answered(Answer::Ok);
        }
        let held: Vec<Permit> = futures::future::join_all((0..4).map(|_| l.acquire())).await;
        for p in held {
            p.answered(Answer::Ok);
        }
        assert_eq!(l.limit(), 5);
        // A refusal of the new round halves again.
        let p = l.acquire().await;
        let q = l.acquire().await;
        p.answered(Answer::Throttled(None));
        assert_eq!(l.limit(), 1);
        drop(q);
        // Never below one.
        let p = l.acquire().await;
        p.answered(Answer::Throttled(None));
        assert_eq!(l.limit(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_holds_every_request_back() {
        let l = Limiter::new(10);
        let p = l.acquire().await;
        let start = Instant::now();
        p.answered(Answer::Throttled(Some(Duration::from_secs(3))));
        let q = l.acquire().await;
        assert!(
            start.elapsed() >= Duration::from_secs(3),
            "{:?}",
            start.elapsed()
        );
        assert!(start.elapsed() < Duration::from_secs(4));
        drop(q);
        // Once it has passed, nothing waits.
        let t = Instant::now();
        let _r = l.acquire().await;
        assert_eq!(t.elapsed(), Duration::ZERO);
    }
}
