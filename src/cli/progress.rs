//! Progress for `nixpush push`: a bar on a terminal (paths done/total, bytes, rate), one plain
//! line per path otherwise, so logs and CI output stay readable.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use indicatif::{HumanBytes, ProgressBar, ProgressStyle};
use nixpush::formats::StoreDir;
use nixpush::publish::{Event, EventSink};

pub struct Progress {
    bar: Option<ProgressBar>,
    store_dir: StoreDir,
    total: AtomicUsize,
    done: AtomicUsize,
    // Plain lines from several tasks must not interleave.
    out: Mutex<()>,
}

impl Progress {
    pub fn new(store_dir: StoreDir) -> Arc<Self> {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            bar.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {elapsed}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            bar
        });
        Arc::new(Self {
            bar,
            store_dir,
            total: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
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

    fn on(&self, e: &Event) {
        match e {
            Event::Planned {
                to_push, nar_bytes, ..
            } => {
                self.total.store(*to_push, Ordering::Relaxed);
                if let Some(bar) = &self.bar {
                    bar.set_length(*nar_bytes);
                    bar.set_message(format!("0/{to_push} paths"));
                    bar.enable_steady_tick(std::time::Duration::from_millis(120));
                }
            }
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
                        bar.set_message(format!("{done}/{total} paths"));
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
                }
                self.line(format!(
                    "[{done}/{}] {} was published meanwhile by another writer",
                    self.total.load(Ordering::Relaxed),
                    self.store_dir.display(path)
                ));
            }
            Event::Failed { path, error } => {
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
