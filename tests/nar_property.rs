//! Our NAR writer against real Nix: arbitrary file trees written to disk must archive to exactly
//! the bytes `nix-store --dump` prints for them.
//!
//! Needs `nix-store` on PATH. CI always has Nix installed, so a missing `nix-store` fails these
//! tests rather than skipping them.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::fs::{PermissionsExt as _, symlink};
use std::path::Path;
use std::process::Command;

use nixpush::formats::nar;
use proptest::prelude::*;
use proptest::test_runner::Config;

/// A file tree to put on disk.
#[derive(Clone)]
enum Tree {
    /// Contents and the full permission bits (always readable by the owner).
    File(Vec<u8>, u32),
    Symlink(Vec<u8>),
    Dir(BTreeMap<Vec<u8>, Tree>),
}

impl fmt::Debug for Tree {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
        match self {
            Tree::File(c, mode) => write!(f, "File({} bytes, {mode:o})", c.len()),
            Tree::Symlink(t) => write!(f, "Symlink({:?})", s(t)),
            Tree::Dir(entries) => f
                .debug_map()
                .entries(entries.iter().map(|(k, v)| (s(k), v)))
                .finish(),
        }
    }
}

fn write_tree(path: &Path, tree: &Tree) {
    match tree {
        Tree::File(contents, mode) => {
            fs::write(path, contents).unwrap();
            fs::set_permissions(path, fs::Permissions::from_mode(*mode)).unwrap();
        }
        Tree::Symlink(target) => symlink(OsStr::from_bytes(target), path).unwrap(),
        Tree::Dir(entries) => {
            fs::create_dir(path).unwrap();
            for (name, child) in entries {
                write_tree(&path.join(OsStr::from_bytes(name)), child);
            }
        }
    }
}

fn nix_store_dump(path: &Path) -> Vec<u8> {
    let out = Command::new("nix-store")
        .arg("--dump")
        .arg(path)
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run `nix-store --dump` (these tests need Nix installed): {e}")
        });
    assert!(
        out.status.success(),
        "`nix-store --dump {}` failed ({}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or((a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Our NAR and Nix's for `path`, or a description of where they differ.
fn compare_with_nix(path: &Path) -> Result<usize, String> {
    let ours = nar::dump(path, Vec::new()).map_err(|e| format!("nar::dump failed: {e}"))?;
    let nix = nix_store_dump(path);
    if ours == nix {
        return Ok(ours.len());
    }
    let at = first_difference(&ours, &nix).unwrap_or(0);
    let window = |b: &[u8]| {
        let lo = at.saturating_sub(32).min(b.len());
        let hi = (at + 32).min(b.len());
        String::from_utf8_lossy(&b[lo..hi])
            .escape_debug()
            .to_string()
    };
    Err(format!(
        "NAR differs from `nix-store --dump`: ours {} bytes, Nix {} bytes, first difference at \
         byte {at}\n ours: {}\n  nix: {}",
        ours.len(),
        nix.len(),
        window(&ours),
        window(&nix)
    ))
}

fn check_tree(tree: &Tree) -> Result<usize, String> {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("root");
    write_tree(&root, tree);
    compare_with_nix(&root)
}

/// A byte allowed in a file name: anything but NUL and '/'.
fn name_byte() -> impl Strategy<Value = u8> {
    any::<u8>().prop_map(|b| if b == 0 || b == b'/' { b'_' } else { b })
}

/// Names that sort differently bytewise than by case-insensitive, locale or signed-char order,
/// that are prefixes of each other, that look like options, or that are not UTF-8.
const TRICKY_NAMES: &[&[u8]] = &[
    b"a",
    b"A",
    b"b",
    b"B",
    b"Z",
    b"z",
    b"_",
    b"~",
    b"-",
    b"-a",
    b"--help",
    b"a-",
    b"a.b",
    b"a0",
    b"aa",
    b"a b",
    b" ",
    b".hidden",
    b"...",
    b"\xc3\xa9",                 // é (UTF-8, first byte >= 0x80)
    b"e\xcc\x81",                // e + combining acute: é decomposed
    b"\xc3\x89",                 // É
    b"\xe6\xbc\xa2\xe5\xad\x97", // 漢字
    b"\xf0\x9f\xa6\x80",         // 🦀
    b"\xff",                     // not UTF-8
    b"\x80x",
    b"\x7f",
    b"\x01",
    b"new\nline",
    b"back\\slash",
    b"1",
    b"10",
    b"9",
];

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        3 => prop::sample::select(TRICKY_NAMES).prop_map(<[u8]>::to_vec),
        2 => "[a-zA-Z0-9éÉßøΩ漢字🦀 ._+=-]{1,8}".prop_map(String::into_bytes),
        2 => prop::collection::vec(name_byte(), 1..12),
    ]
    .prop_filter("not . or ..", |n| n != b"." && n != b"..")
}

fn contents() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        1 => Just(Vec::new()),
        3 => prop::collection::vec(any::<u8>(), 0..40),
        1 => prop::collection::vec(any::<u8>(), 0..5000),
    ]
}

/// Permission bits with the owner's read bit set (so that any user can archive the file); the
/// owner's execute bit, the only one Nix keeps, is set in about half of them, and the group's
/// and others' execute bits vary independently of it.
fn mode() -> impl Strategy<Value = u32> {
    (0u32..0o400).prop_map(|m| 0o400 | m)
}

fn symlink_target() -> impl Strategy<Value = Vec<u8>> {
    let pool: &[&[u8]] = &[
        b".",
        b"..",
        b"../..",
        b"/",
        b"/nix/store",
        b"/absolute/target",
        b"/dev/null",
        b"a",
        b"B",
        b"./a/b/../c",
        b"dangling/nowhere",
        b"-rf",
        b"\xc3\xa9/\xff",
        b"trailing/",
        b"//double//slash",
    ];
    prop_oneof![
        2 => prop::sample::select(pool).prop_map(<[u8]>::to_vec),
        2 => prop::collection::vec(name(), 1..4).prop_map(|parts| parts.join(&b'/')),
        1 => prop::collection::vec(name(), 1..4).prop_map(|parts| {
            let mut t = b"/".to_vec();
            t.extend(parts.join(&b'/'));
            t
        }),
        1 => prop::collection::vec(any::<u8>().prop_map(|b| b.max(1)), 1..60),
    ]
}

fn leaf() -> impl Strategy<Value = Tree> {
    prop_oneof![
        4 => (contents(), mode()).prop_map(|(c, m)| Tree::File(c, m)),
        2 => symlink_target().prop_map(Tree::Symlink),
        1 => Just(Tree::Dir(BTreeMap::new())),
    ]
}

fn tree() -> impl Strategy<Value = Tree> {
    leaf().prop_recursive(4, 40, 6, |inner| {
        prop::collection::btree_map(name(), inner, 0..6).prop_map(Tree::Dir)
    })
}

/// A root that is usually a directory, sometimes a lone file or symlink.
fn root() -> impl Strategy<Value = Tree> {
    prop_oneof![
        8 => prop::collection::btree_map(name(), tree(), 0..8).prop_map(Tree::Dir),
        1 => (contents(), mode()).prop_map(|(c, m)| Tree::File(c, m)),
        1 => symlink_target().prop_map(Tree::Symlink),
    ]
}

proptest! {
    #![proptest_config(Config {
        cases: 64,
        // Regressions would be written under tests/; a failure prints the minimal tree instead.
        failure_persistence: None,
        max_shrink_iters: 1024,
        ..Config::default()
    })]

    #[test]
    fn nar_equals_nix_store_dump(tree in root()) {
        if let Err(e) = check_tree(&tree) {
            prop_assert!(false, "{}\ntree: {:#?}", e, tree);
        }
    }
}

#[test]
fn root_is_a_single_file() {
    for (contents, mode) in [
        (&b""[..], 0o644),
        (b"x", 0o755),
        (b"exactly8", 0o700),
        (b"nine byte", 0o611), // group/other may execute, the owner may not: not executable
        (b"\0\xff\n", 0o500),
    ] {
        let tree = Tree::File(contents.to_vec(), mode);
        check_tree(&tree).unwrap_or_else(|e| panic!("{tree:?}: {e}"));
    }
}

#[test]
fn root_is_a_symlink_and_is_not_followed() {
    let tmp = tempfile::tempdir().unwrap();
    // A symlink to a directory: both Nix and we must archive the link, not the directory.
    fs::create_dir(tmp.path().join("target-dir")).unwrap();
    fs::write(tmp.path().join("target-dir/file"), b"not to be archived").unwrap();
    symlink("target-dir", tmp.path().join("link-to-dir")).unwrap();
    // A symlink to a file, an absolute one, and a dangling one.
    fs::write(tmp.path().join("target-file"), b"neither").unwrap();
    symlink(
        tmp.path().join("target-file"),
        tmp.path().join("link-to-file"),
    )
    .unwrap();
    symlink("does/not/exist", tmp.path().join("dangling")).unwrap();
    for link in ["link-to-dir", "link-to-file", "dangling"] {
        let path = tmp.path().join(link);
        let size = compare_with_nix(&path).unwrap_or_else(|e| panic!("{link}: {e}"));
        let ours = nar::dump(&path, Vec::new()).unwrap();
        assert_eq!(ours.len(), size);
        assert!(
            !ours.windows(9).any(|w| w == b"directory"),
            "{link}: followed the link"
        );
        assert!(!ours.windows(7).any(|w| w == b"regular"), "{link}");
    }
}

#[test]
fn names_in_bytewise_order() {
    // Every tricky name in one directory, each as a different kind of node.
    let mut entries = BTreeMap::new();
    for (i, name) in TRICKY_NAMES.iter().enumerate() {
        let node = match i % 4 {
            0 => Tree::File(name.to_vec(), 0o644),
            1 => Tree::File(Vec::new(), 0o755),
            2 => Tree::Symlink(name.to_vec()),
            _ => Tree::Dir(BTreeMap::from([(
                name.to_vec(),
                Tree::File(vec![1], 0o600),
            )])),
        };
        entries.insert(name.to_vec(), node);
    }
    check_tree(&Tree::Dir(entries)).unwrap();
}

#[test]
fn files_larger_than_the_copy_buffer() {
    // The dumper copies through a 1 MiB buffer: cross its boundaries and end off an 8-byte
    // boundary.
    let big: Vec<u8> = (0..(2 << 20) + 13).map(|i: u32| (i % 251) as u8).collect();
    let tree = Tree::Dir(BTreeMap::from([
        (b"big".to_vec(), Tree::File(big, 0o755)),
        (
            b"exactly-1MiB".to_vec(),
            Tree::File(vec![0xa5; 1 << 20], 0o644),
        ),
    ]));
    check_tree(&tree).unwrap();
}

#[test]
fn deep_nesting() {
    let mut tree = Tree::File(b"bottom".to_vec(), 0o644);
    for depth in 0..40 {
        tree = Tree::Dir(BTreeMap::from([
            (format!("d{depth}").into_bytes(), tree),
            (b"s".to_vec(), Tree::Symlink(b"..".to_vec())),
        ]));
    }
    check_tree(&tree).unwrap();
}
