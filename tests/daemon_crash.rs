//! `kill -9` the daemon again and again while it publishes, restarting it each time. After
//! every kill the cache holds only complete narinfos (signed, with their NAR and the narinfos
//! of all their references), nothing once published disappears, and no queue entry is gone
//! whose closure is not wholly published. In the end everything is published, the queue is
//! empty, and real Nix substitutes it all with signatures required.

mod common;
mod daemon_support;

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use common::*;
use daemon_support::*;

/// 40 text files referring to each other, 8 small derivations referring to them, 3 random
/// 8 MB paths (slow enough to be killed in the middle of), and a top referring to all.
const CRASH_NIX: &str = concat!(
    r#"
{ salt }:
let
  n = 40;
  text = i: builtins.toFile "np-crash-t${toString i}" (
    "text ${toString i} ${salt}\n"
    + (if i > 0 then "${builtins.elemAt texts (i - 1)}\n" else "")
    + (if i > 2 then "${builtins.elemAt texts (i / 3)}\n" else ""));
  texts = builtins.genList text n;
"#,
    nix_mk!(),
    r#"  small = i: mk "np-crash-s${toString i}" ''
    mkdir $out
    printf '%s\n' ${builtins.elemAt texts (i * 4 + 3)} > $out/ref
    echo ${toString i} > $out/n
  '';
  smalls = builtins.genList small 8;
  big = i: mk "np-crash-big${toString i}" ''
    mkdir $out
    head -c 2500000 /dev/urandom > $out/data
    printf '%s\n' ${builtins.elemAt smalls (i * 2)} > $out/ref
  '';
  bigs = builtins.genList big 3;
  top = mk "np-crash-top" ''
    mkdir $out
    printf '%s\n' ${toString bigs} ${toString smalls} ${builtins.elemAt texts (n - 1)} > $out/refs
  '';
in { inherit texts top; }
"#
);

const KILLS: usize = 12;

/// A pseudo-random number in 0..n, from the clock.
fn jitter(n: u64) -> u64 {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .expect("time")
        .subsec_nanos();
    u64::from(nanos.wrapping_mul(2_654_435_761)) % n
}

#[test]
fn kill_9_at_any_moment_loses_nothing_and_publishes_nothing_incomplete() {
    let salt = unique("crash");
    let (top, _) = nix_build_expr(CRASH_NIX, &salt, &["top"], &[]);
    let top = top[0].clone();
    let texts = nix_eval_paths(CRASH_NIX, &salt, "texts");
    let all = closure_of(&top);
    assert_eq!(all.len(), 52, "40 texts, 8 smalls, 3 bigs, top: {all:?}");
    for t in &texts {
        assert!(all.contains(t));
    }
    let top_drv = deriver_of(&top);

    let setup = Setup::new("batch-entries = 2");
    // xz takes most of a second for each random path (2.5 MB), so that the kills below land
    // while it works however fast the rest of the pipeline gets: the small paths go in the
    // first lives, the random ones only in lives long enough to compress one, which the
    // growing delays reach part-way through. (At 8 MB a random path took longer than any life,
    // so once the small paths were in, as the first life now manages, no kill saw progress.)
    let text = fs::read_to_string(&setup.config).expect("config");
    fs::write(&setup.config, format!("compression = \"xz\"\n{text}")).expect("config");
    // What each entry asks for, and the closure it stands for.
    let mut entries: BTreeMap<String, (String, Vec<String>)> = BTreeMap::new();
    // By hand, before the daemon starts: 2 or 3 paths each, in a scrambled order, every path
    // named at least once, some twice.
    let mut order: Vec<String> = all.clone();
    order.sort_by_key(|p| hash_part(p).chars().rev().collect::<String>());
    let mut i = 0;
    let mut k = 0;
    while i < order.len() {
        let take = 2 + k % 2;
        let mut items: Vec<String> = order[i..(i + take).min(order.len())].to_vec();
        if k % 5 == 0 {
            items.push(order[(i * 7 + 3) % order.len()].clone());
        }
        let name = format!("by-hand-{k:02}");
        let text = format!("# crash test\n{}\n", items.join("\n"));
        setup.write_entry(&name, &text);
        entries.insert(name, (text, closure_of_all(&items)));
        i += take;
        k += 1;
    }
    let drv_text = format!("{top_drv}^*\n");
    setup.write_entry("by-hand-drv", &drv_text);
    entries.insert("by-hand-drv".into(), (drv_text, all.clone()));

    let mut published_before: BTreeSet<String> = BTreeSet::new();
    let mut kills_with_work_left = 0;
    let mut kills_mid_progress = 0;
    let mut log = Vec::new();
    let started = Instant::now();
    for kill in 0..KILLS {
        let mut daemon = setup.start();
        if kill == 0 {
            // Some through the socket too, while it works.
            for (n, p) in [&texts[5], &texts[17], &top].iter().enumerate() {
                let name = setup.enqueue(std::slice::from_ref(*p));
                entries.insert(name, (format!("socket {n}"), closure_of(p)));
            }
            let st = setup.status();
            assert!(
                st["queue_depth"].as_u64().is_some_and(|d| d > 0),
                "entries are waiting: {st}"
            );
        }
        let delay = Duration::from_millis(50 + 150 * kill as u64 + jitter(150));
        std::thread::sleep(delay);
        daemon.assert_running();
        let queued_at_kill = setup.queued().len();
        daemon.kill9();

        // The invariant, right after the kill.
        let published = check_cache_invariant(&setup.cache)
            .unwrap_or_else(|e| panic!("after kill {kill} ({delay:?} after start): {e}"));
        assert!(
            published.is_superset(&published_before),
            "after kill {kill}: published paths disappeared: {:?}",
            published_before.difference(&published).collect::<Vec<_>>()
        );
        let queued: BTreeSet<String> = setup.queued().into_iter().collect();
        for (name, (what, closure)) in &entries {
            if !queued.contains(name) {
                let missing: Vec<&String> =
                    closure.iter().filter(|p| !published.contains(*p)).collect();
                assert!(
                    missing.is_empty(),
                    "after kill {kill}: entry {name} ({what}) left the queue, but {missing:?} \
                     of its closure are not published"
                );
            }
        }
        assert!(
            setup.rejected().is_empty(),
            "after kill {kill}: rejected {:?}",
            setup.rejected()
        );
        if queued_at_kill > 0 {
            kills_with_work_left += 1;
            if published.len() > published_before.len() {
                kills_mid_progress += 1;
            }
        }
        log.push(format!(
            "kill {kill}: {delay:?} after start, {queued_at_kill} entries queued, {} of {} paths published",
            published.len(),
            all.len()
        ));
        published_before = published;
    }
    eprintln!("{}", log.join("\n"));
    assert!(
        kills_with_work_left >= 5,
        "too few kills hit the daemon while it had work:\n{}",
        log.join("\n")
    );
    assert!(
        kills_mid_progress >= 2,
        "too few kills came after some but not all progress:\n{}\ndaemon log:\n{}",
        log.join("\n"),
        log_tail(&setup.log)
    );

    // Once more, to the end.
    let daemon = setup.start();
    setup.wait_published(&all, &daemon);
    let published = check_cache_invariant(&setup.cache).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(published.into_iter().collect::<Vec<_>>(), all);
    assert!(setup.rejected().is_empty(), "{:?}", setup.rejected());
    let st = setup.status();
    assert_eq!(st["queue_depth"], 0, "{st}");
    assert_eq!(st["rejected"], 0, "{st}");
    assert_eq!(st["in_flight"], 0, "{st}");
    assert_eq!(st["failed"], 0, "{st}");
    drop(daemon);
    eprintln!("{KILLS} kills and a final run in {:?}", started.elapsed());

    setup.nix_substitutes(&all);

    // The random paths are big and useless after this: let them go (best effort; nothing
    // refers to them but `top`).
    let mut big: Vec<String> = all
        .iter()
        .filter(|p| p.contains("-np-crash-big") || p.contains("-np-crash-top"))
        .cloned()
        .collect();
    big.sort_by_key(|p| !p.contains("-np-crash-top"));
    let _ = run(Command::new("nix-store").arg("--delete").args(&big));
}
