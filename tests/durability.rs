//! The order in which a push makes a directory cache durable, read from the system calls of a
//! real `nixpush push` (`strace -f -y`): what reaches the disk is what a crash leaves, so this
//! is the truth the publishing rules must hold to, whatever the code looks like.
//!
//! For every narinfo, at the moment it is renamed into place:
//! - its own bytes were flushed (`fdatasync` of its temporary file, or a `syncfs` after they
//!   were written);
//! - its NAR was flushed, renamed into `nar/`, and `nar/` (or the file system) flushed after
//!   that rename;
//! - the narinfo of every reference was renamed and the cache's directory (or the file system)
//!   flushed after that.
//!
//! And before the push exits successfully, every narinfo's name was flushed. Objects are made
//! durable in batches: at least one flush of the cache directory makes several narinfos
//! durable at once, and there are fewer such flushes than paths.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::path::Path;
use std::process::Command;

use common::*;

/// 4 layers of 30 text files, each referring to three of the layer below (the benchmark's
/// small-paths closure, smaller), and a top referring to the last layer: 121 small paths with
/// dense references, added to the store by evaluation alone.
const DENSE_NIX: &str = r#"
{ salt }:
let
  width = 30;
  text = layer: i: builtins.toFile "np-durable-l${toString layer}-${toString i}" (
    "text ${toString layer} ${toString i} ${salt}\n"
    + (if layer > 0 then
        let below = builtins.elemAt layers (layer - 1);
            at = k: builtins.elemAt below (k - (k / width) * width);
        in "${at i}\n${at (i + 1)}\n${at (i + 7)}\n"
      else ""));
  layers = builtins.genList (layer: builtins.genList (text layer) width) 4;
in { top = builtins.toFile "np-durable-top" (builtins.concatStringsSep "\n" (builtins.elemAt layers 3)); }
"#;

/// One system call as strace shows it: who, what, on which paths, and where in the trace it
/// started and ended (line numbers; equal for a call strace printed on one line).
#[derive(Debug, Clone)]
struct Call {
    name: String,
    /// For `fsync`/`fdatasync`: the file (strace's `-y` path); for renames and links: the
    /// old and new names.
    paths: Vec<String>,
    start: usize,
    end: usize,
    ok: bool,
}

/// Every call in an `strace -f -y -o FILE` trace, joining `<unfinished ...>` and
/// `<... resumed>` halves.
fn parse_trace(text: &str) -> Vec<Call> {
    let mut open: HashMap<String, (String, String, usize)> = HashMap::new();
    let mut calls = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let Some((pid, rest)) = line.split_once(' ') else {
            continue;
        };
        let rest = rest.trim_start();
        if let Some(r) = rest.strip_prefix("<... ") {
            let name = r.split_whitespace().next().unwrap_or("").to_owned();
            let Some((open_name, args, start)) = open.remove(pid) else {
                panic!("trace line {n}: a resumed call that never started: {line}");
            };
            assert_eq!(open_name, name, "trace line {n}: {line}");
            calls.push(call(&name, &args, start, n, r));
            continue;
        }
        let Some((name, args)) = rest.split_once('(') else {
            continue; // `+++ exited with 0 +++` and signals
        };
        if let Some(args) = args.strip_suffix(" <unfinished ...>") {
            open.insert(pid.to_owned(), (name.to_owned(), args.to_owned(), n));
        } else {
            calls.push(call(name, args, n, n, args));
        }
    }
    calls
}

fn call(name: &str, args: &str, start: usize, end: usize, result: &str) -> Call {
    let paths = match name {
        "fsync" | "fdatasync" | "syncfs" | "sync_file_range" => {
            // `7</dir/file>`
            let from = args.find('<').map_or(0, |i| i + 1);
            let to = args[from..].find('>').map_or(args.len(), |i| from + i);
            vec![args[from..to].to_owned()]
        }
        // The quoted arguments, in order: old name, new name.
        _ => args
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect(),
    };
    Call {
        name: name.to_owned(),
        paths,
        start,
        end,
        // `) = 0`, padded with spaces where strace aligns its columns.
        ok: result
            .rsplit_once('=')
            .is_some_and(|(_, v)| v.split_whitespace().next() == Some("0")),
    }
}

#[test]
fn a_narinfo_is_renamed_only_after_its_nar_and_references_are_durable() {
    let dir = tempdir();
    let keys = nixpush_keygen(dir.path(), "durable-1");
    let top = run_ok(
        Command::new("nix-instantiate")
            .args(["--eval", "--read-write-mode", "--expr", DENSE_NIX])
            .args(["--argstr", "salt", salt(), "-A", "top"]),
    )
    .stdout
    .trim()
    .trim_matches('"')
    .to_owned();
    let closure = closure_of(&top);
    assert_eq!(
        closure.len(),
        121,
        "the test closure is not what it should be"
    );

    let cache = dir.path().join("cache");
    // The cache exists before the traced push, so that its real path is known.
    fs::create_dir_all(&cache).expect("cache dir");
    let cache = fs::canonicalize(&cache).expect("cache path");
    let trace = dir.path().join("trace");
    let mut cmd = Command::new("strace");
    cmd.args(["-f", "-y", "-qq", "-s", "4096", "-o"])
        .arg(&trace)
        .args([
            "-e",
            "trace=fsync,fdatasync,syncfs,sync_file_range,rename,renameat,renameat2,link,linkat",
        ])
        .arg(&*NIXPUSH);
    let out = run_ok(&mut push_cmd(cmd, cache.to_str().unwrap(), &keys, &top));
    assert_eq!(pushed_count(&out), 121, "{}", out.report());
    let calls = parse_trace(&fs::read_to_string(&trace).expect("read trace"));

    let root = cache.to_str().unwrap().to_owned();
    let nar_dir = format!("{root}/nar");
    let in_cache = |p: &str| p == root || p.starts_with(&format!("{root}/"));
    // When each file's data became durable (the end of its flush), and when it was last
    // written (its `sync_file_range`, which follows the writes).
    let mut data_flushed: HashMap<String, usize> = HashMap::new();
    let mut written: HashMap<String, usize> = HashMap::new();
    // Flushes of the whole file system (start, end): all data and names before their start.
    let mut fs_flushes: Vec<(usize, usize)> = Vec::new();
    // Name → (rename start, rename end).
    let mut renamed: HashMap<String, (usize, usize)> = HashMap::new();
    // Directory → flushes (start, end).
    let mut dir_flushes: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    for c in calls.iter().filter(|c| c.ok && in_cache(&c.paths[0])) {
        match c.name.as_str() {
            "fdatasync" | "fsync" if c.paths[0] == root || c.paths[0] == nar_dir => {
                dir_flushes
                    .entry(c.paths[0].clone())
                    .or_default()
                    .push((c.start, c.end));
            }
            "fdatasync" | "fsync" => {
                data_flushed.entry(c.paths[0].clone()).or_insert(c.end);
            }
            "sync_file_range" => {
                written.insert(c.paths[0].clone(), c.end);
            }
            "syncfs" => fs_flushes.push((c.start, c.end)),
            _ => {
                let [old, new] = &c.paths[..] else {
                    panic!("a rename without two names: {c:?}");
                };
                let by_file = data_flushed.get(old).is_some_and(|f| *f < c.start);
                let by_fs = written
                    .get(old)
                    .is_some_and(|w| fs_flushes.iter().any(|(s, e)| s > w && *e < c.start));
                assert!(
                    by_file || by_fs,
                    "{new} was renamed from {old} before that file's data was flushed"
                );
                renamed.insert(new.clone(), (c.start, c.end));
            }
        }
    }
    // The first flush of the name's directory, or of the file system, that started after the
    // rename ended.
    let durable_at = |name: &str| -> Option<usize> {
        let (_, end) = *renamed.get(name)?;
        let dir = Path::new(name).parent()?.to_str()?;
        dir_flushes
            .get(dir)
            .into_iter()
            .flatten()
            .chain(&fs_flushes)
            .filter(|(s, _)| *s > end)
            .map(|(_, e)| *e)
            .min()
    };

    let mut made_durable_by: BTreeMap<usize, usize> = BTreeMap::new();
    for path in &closure {
        let name = format!("{root}/{}.narinfo", hash_part(path));
        let (start, _) = *renamed
            .get(&name)
            .unwrap_or_else(|| panic!("no rename of {name} in the trace"));
        let info = RawNarInfo::read(&cache, path);
        let nar = format!("{root}/{}", info.one("URL"));
        let nar_durable = durable_at(&nar)
            .unwrap_or_else(|| panic!("the NAR {nar} of {path} was never made durable"));
        assert!(
            nar_durable < start,
            "{name} was renamed into place (trace line {start}) before its NAR {nar} was \
             durable (line {nar_durable})"
        );
        for r in info.all("References").iter().flat_map(|r| r.split(' ')) {
            if r.is_empty() || path.ends_with(r) {
                continue;
            }
            let ref_name = format!("{root}/{}.narinfo", &r[..32]);
            let ref_durable = durable_at(&ref_name).unwrap_or_else(|| {
                panic!("the narinfo of {path}'s reference {r} was never made durable")
            });
            assert!(
                ref_durable < start,
                "{name} was renamed into place (trace line {start}) before the narinfo of \
                 its reference {r} was durable (line {ref_durable})"
            );
        }
        let durable = durable_at(&name).unwrap_or_else(|| panic!("{name} was never made durable"));
        *made_durable_by.entry(durable).or_default() += 1;
    }
    let flushes: BTreeSet<usize> = made_durable_by.keys().copied().collect();
    let largest = made_durable_by.values().max().copied().unwrap_or(0);
    assert!(
        largest >= 2 && flushes.len() < closure.len(),
        "narinfos were not made durable in batches: {} flushes for {} narinfos, at most \
         {largest} at once",
        flushes.len(),
        closure.len()
    );
    eprintln!(
        "{} narinfos made durable by {} flushes of the cache directory (at most {largest} at once)",
        closure.len(),
        flushes.len()
    );
}
