//! Progress for `nixpush push`: a bar on a terminal, one plain line per path otherwise, so logs
//! and CI output stay readable.
//!
//! The bar, as nix's and attic's progress show it: paths done of the total, NAR bytes done of
//! the total with the rate, the time left, and the paths being compressed or uploaded now:
//! ```text
//! ⠙ [=========>          ] 41.2 MiB/120.5 MiB 8.3 MiB/s 00:05, 12/40 paths, ETA 10s; in flight: glibc-2.40, hello-2.12 (+1 more)
//! ```
//! The time left is estimated from the bytes of the paths finished so far, at draw time (a
//! custom key of the template), so it keeps counting while a large path is in flight.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{HumanBytes, ProgressBar, ProgressState, ProgressStyle};
use nixpush::formats::StoreDir;
use nixpush::publish::{Event, EventSink};

/// Paths in flight named on the bar; the others are counted.
const IN_FLIGHT_SHOWN: usize = 3;

pub struct Progress {
    bar: Option<ProgressBar>,
    store_dir: StoreDir,
    total: AtomicUsize,
    done: AtomicUsize,
    /// Names of the paths in flight, in the order they started.
    in_flight: Mutex<Vec<String>>,
    // Plain lines from several tasks must not interleave.
    out: Mutex<()>,
}

/// The time left, from `done` of `total` bytes in `elapsed`; `None` until something is done.
pub fn eta(done: u64, total: u64, elapsed: Duration) -> Option<Duration> {
    if done == 0 || elapsed.is_zero() {
        return None;
    }
    let left = total.saturating_sub(done) as f64;
    Some(Duration::from_secs_f64(
        left * elapsed.as_secs_f64() / done as f64,
    ))
}

/// A duration as people read a countdown: `45s`, `3m05s`, `2h07m`.
pub fn short_duration(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, s % 3600 / 60),
    }
}

/// `ETA 3m05s`, or `ETA ?` before a path is done.
pub fn eta_text(done: u64, total: u64, elapsed: Duration) -> String {
    match eta(done, total, elapsed) {
        Some(d) => format!("ETA {}", short_duration(d)),
        None => "ETA ?".to_owned(),
    }
}

/// `12/40 paths; in flight: a, b, c (+2 more)`.
pub fn message(done: usize, total: usize, in_flight: &[String]) -> String {
    let mut m = format!(
        "{done}/{total} {}",
        if total == 1 { "path" } else { "paths" }
    );
    if !in_flight.is_empty() {
        m.push_str("; in flight: ");
        m.push_str(&in_flight[..in_flight.len().min(IN_FLIGHT_SHOWN)].join(", "));
        if in_flight.len() > IN_FLIGHT_SHOWN {
            m.push_str(&format!(" (+{} more)", in_flight.len() - IN_FLIGHT_SHOWN));
        }
    }
    m
}

impl Progress {
    pub fn new(store_dir: StoreDir) -> Arc<Self> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}, \
                     {eta_left} {wide_msg}",
                )
                .expect("valid template")
                .with_key(
                    "eta_left",
                    |s: &ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = w.write_str(&eta_text(s.pos(), s.len().unwrap_or(0), s.elapsed()));
                    },
                )
                .progress_chars("=> "),
            );
            bar
        });
        Arc::new(Self {
            bar,
            store_dir,
            total: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            in_flight: Mutex::new(Vec::new()),
            out: Mutex::new(()),
        })
    }

    pub fn sink(self: &Arc<Self>) -> EventSink {
        let me = self.clone();
        Arc::new(move |e: &Event| me.on(e))
    }

    fn line(&self, s: String) {
        match &self.bar {
            Some(bar) => bar.println(s),
            None => {
                let _g = self.out.lock();
                eprintln!("{s}");
            }
        }
    }

    /// The bar's message after a path started or ended (`ended`: its name leaves the list).
    fn update(&self, started: Option<&str>, ended: Option<&str>) {
        let Some(bar) = &self.bar else { return };
        let mut in_flight = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = started {
            in_flight.push(n.to_owned());
        }
        if let Some(n) = ended {
            if let Some(i) = in_flight.iter().position(|x| x == n) {
                in_flight.remove(i);
            }
        }
        bar.set_message(format!(
            "— {}",
            message(
                self.done.load(Ordering::Relaxed),
                self.total.load(Ordering::Relaxed),
                &in_flight
            )
        ));
    }

    fn on(&self, e: &Event) {
        match e {
            Event::Planned {
                to_push, nar_bytes, ..
            } => {
                self.total.store(*to_push, Ordering::Relaxed);
                if let Some(bar) = &self.bar {
                    bar.set_length(*nar_bytes);
                    bar.reset_elapsed();
                    self.update(None, None);
                    bar.enable_steady_tick(Duration::from_millis(120));
                }
            }
            Event::Started { path, .. } => self.update(Some(path.name()), None),
            Event::Published {
                path,
                nar_size,
                file_size,
                ..
            } => {
                let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
                let total = self.total.load(Ordering::Relaxed);
                match &self.bar {
                    Some(bar) => {
                        bar.inc(*nar_size);
                        self.update(None, Some(path.name()));
                    }
                    None => self.line(format!(
                        "[{done}/{total}] published {} ({} NAR, {} compressed)",
                        self.store_dir.display(path),
                        HumanBytes(*nar_size),
                        HumanBytes(*file_size)
                    )),
                }
            }
            Event::AlreadyPublished { path, nar_size } => {
                let done = self.done.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(bar) = &self.bar {
                    bar.inc(*nar_size);
                    self.update(None, Some(path.name()));
                }
                self.line(format!(
                    "[{done}/{}] {} was published meanwhile by another writer",
                    self.total.load(Ordering::Relaxed),
                    self.store_dir.display(path)
                ));
            }
            Event::Failed { path, error } => {
                self.update(None, Some(path.name()));
                self.line(format!("failed: {}: {error}", self.store_dir.display(path)));
            }
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_time_left_comes_from_the_rate_so_far() {
        let s = Duration::from_secs;
        assert_eq!(eta(0, 100, s(10)), None, "nothing done yet: no estimate");
        assert_eq!(eta(50, 100, Duration::ZERO), None);
        assert_eq!(eta(25, 100, s(10)), Some(s(30)));
        assert_eq!(eta(100, 100, s(10)), Some(Duration::ZERO));
        // More done than planned (a path grew): nothing left, not a negative time.
        assert_eq!(eta(120, 100, s(10)), Some(Duration::ZERO));
        assert_eq!(eta_text(0, 100, s(3)), "ETA ?");
        assert_eq!(eta_text(10, 100, s(5)), "ETA 45s");
        assert_eq!(eta_text(1, 100, s(2)), "ETA 3m18s");
        assert_eq!(eta_text(1, 1000, s(10)), "ETA 2h46m");
    }

    #[test]
    fn durations_read_as_a_countdown() {
        let s = Duration::from_secs;
        assert_eq!(short_duration(Duration::ZERO), "0s");
        assert_eq!(short_duration(Duration::from_millis(59_400)), "59s");
        assert_eq!(short_duration(s(60)), "1m00s");
        assert_eq!(short_duration(s(185)), "3m05s");
        assert_eq!(short_duration(s(3599)), "59m59s");
        assert_eq!(short_duration(s(3600)), "1h00m");
        assert_eq!(short_duration(s(7620)), "2h07m");
    }

    #[test]
    fn the_message_names_the_paths_in_flight() {
        let names = |n: &[&str]| n.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(message(0, 1, &[]), "0/1 path");
        assert_eq!(message(3, 10, &[]), "3/10 paths");
        assert_eq!(
            message(3, 10, &names(&["glibc-2.40", "hello-2.12"])),
            "3/10 paths; in flight: glibc-2.40, hello-2.12"
        );
        assert_eq!(
            message(3, 10, &names(&["a", "b", "c", "d", "e"])),
            "3/10 paths; in flight: a, b, c (+2 more)"
        );
    }
}
