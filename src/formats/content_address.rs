//! Content addresses (a narinfo's `CA:` line) and the store path they imply
//! (`src/libstore/content-address.cc`, `Store::makeStorePath`, `makeTextPath`,
//! `makeFixedOutputPath` in `src/libstore/store-api.cc`, `ValidPathInfo::isContentAddressed`
//! in `src/libstore/path-info.cc`).
//!
//! ```text
//! ca      = "text:" hash                     (builtins.toFile, derivations: flat sha256)
//!         | "fixed:" ["r:"] hash             (fixed-output; r: the hash is of the NAR)
//! hash    = algo ":" nixbase32               (algo: md5, sha1, sha256, sha512)
//! ```
//! The path a content address implies, for a path named `name` in the store `dir`:
//! ```text
//! makeStorePath(type, h, name) = dir "/" nixbase32(fold20(sha256(type ":" algo ":" hex(h) ":" dir ":" name))) "-" name
//! text:                type = "text" {":" reference}
//! fixed:r:sha256:      type = "source" {":" reference} [":self"]
//! fixed (otherwise):   type = "output:out", h = sha256("fixed:out:" ["r:"] algo ":" hex(h) ":")
//! ```
//! References are full store paths, sorted, without the path itself (a self-reference is the
//! `:self` suffix); `fold20` XORs byte `i` of the digest into byte `i mod 20`. Nix trusts a
//! path whose content address implies its own path without any signature, since its name
//! then proves what it holds (once the content is checked against the hash).

use sha2::Digest as _;

use super::{StoreDir, StorePath, nixbase32};

/// The store path that the content address `ca` implies for a path named like `path`, with
/// `references` (base names, as a narinfo lists them; may include `path` itself). `None`
/// when `ca` is not a content address this module reads, or the combination cannot occur
/// (references on a flat fixed-output path, references or a self-reference on a text path).
pub fn implied_path(
    dir: &StoreDir,
    path: &StorePath,
    ca: &str,
    references: &[StorePath],
) -> Option<StorePath> {
    let (text, rest) = if let Some(r) = ca.strip_prefix("text:") {
        (true, r)
    } else {
        (false, ca.strip_prefix("fixed:")?)
    };
    let (recursive, hash) = match rest.strip_prefix("r:") {
        Some(h) => (true, h),
        None => (false, rest),
    };
    let (algo, digest) = hash.split_once(':')?;
    let len = match algo {
        "md5" => 16,
        "sha1" => 20,
        "sha256" => 32,
        "sha512" => 64,
        _ => return None,
    };
    let digest = nixbase32::decode(digest).ok().filter(|d| d.len() == len)?;
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let self_ref = references.contains(path);
    let mut refs: Vec<String> = references
        .iter()
        .filter(|r| *r != path)
        .map(|r| dir.display(r))
        .collect();
    refs.sort_unstable();
    let with_refs = |kind: &str| {
        let mut t = kind.to_owned();
        for r in &refs {
            t.push(':');
            t.push_str(r);
        }
        t
    };
    let (kind, inner) = if text {
        if algo != "sha256" || recursive || self_ref {
            return None;
        }
        (with_refs("text"), format!("{algo}:{hex}"))
    } else if recursive && algo == "sha256" {
        let mut t = with_refs("source");
        if self_ref {
            t.push_str(":self");
        }
        (t, format!("{algo}:{hex}"))
    } else {
        if !refs.is_empty() || self_ref {
            return None;
        }
        let prefix = if recursive { "r:" } else { "" };
        let h = sha2::Sha256::digest(format!("fixed:out:{prefix}{algo}:{hex}:"));
        let h: String = h.iter().map(|b| format!("{b:02x}")).collect();
        ("output:out".to_owned(), format!("sha256:{h}"))
    };
    let name = path.name();
    let digest = sha2::Sha256::digest(format!("{kind}:{inner}:{}:{name}", dir.as_str()));
    let mut folded = [0u8; 20];
    for (i, b) in digest.iter().enumerate() {
        folded[i % 20] ^= b;
    }
    StorePath::from_base_name(&format!("{}-{name}", nixbase32::encode(&folded))).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(s: &str) -> StorePath {
        StorePath::from_base_name(s).unwrap()
    }

    /// Paths and content addresses as Nix 2.8 made them (`nix path-info --json`).
    #[test]
    fn nix_made_content_addresses_imply_their_paths() {
        let dir = StoreDir::new("/nix/store").unwrap();
        // builtins.toFile "hello.txt" "hello\n"
        let hello = sp("qa1w9gdfrba6jl2r57mb3c43863gqywp-hello.txt");
        let hello_ca = "text:sha256:00xyyr3fi8l6hb839bv3f7yb86yjv7xi1cgh1xnhipym4asvb4aq";
        // builtins.toFile "ref.txt" "see ${hello}\n": a text path with a reference.
        let with_ref = sp("3cmrvzmwi8kl03zzg5i25crdy3pjz95w-ref.txt");
        let with_ref_ca = "text:sha256:18gh8j233979r0blaz24aikbwrjgj32sxpdzsydrk89lmg8q5107";
        // builtins.path { name = "src"; path = <a directory>; }
        let src = sp("qp2422fm4lgfh6979k71gsw0n9nf512m-src");
        let src_ca = "fixed:r:sha256:1jpg5v8rcf4d08rlpq51vnd1w800l64h34r0bw4vkb6z3qlk089k";
        // builtins.path { name = "flat"; path = <a file>; recursive = false; }
        let flat = sp("ca1y6c916z1ck1dxi4rcrsfs9rzp728w-flat");
        let flat_ca = "fixed:sha256:1xk2hhjr0f2n4adj1h688wlz59xpl86y1r8bd2pjasg8gy16mikb";
        let refs = std::slice::from_ref(&hello);
        assert_eq!(
            implied_path(&dir, &hello, hello_ca, &[]),
            Some(hello.clone())
        );
        assert_eq!(
            implied_path(&dir, &with_ref, with_ref_ca, refs),
            Some(with_ref.clone())
        );
        assert_eq!(implied_path(&dir, &src, src_ca, &[]), Some(src.clone()));
        assert_eq!(implied_path(&dir, &flat, flat_ca, &[]), Some(flat.clone()));
        // Without its reference, or with another hash, the address implies another path.
        assert_ne!(
            implied_path(&dir, &with_ref, with_ref_ca, &[]),
            Some(with_ref.clone())
        );
        assert_ne!(
            implied_path(&dir, &hello, with_ref_ca, &[]),
            Some(hello.clone())
        );
        // So does another store directory.
        let other = StoreDir::new("/other/store").unwrap();
        assert_ne!(
            implied_path(&other, &hello, hello_ca, &[]),
            Some(hello.clone())
        );
        // Malformed or impossible addresses imply nothing.
        assert_eq!(implied_path(&dir, &hello, "text:md5:00", &[]), None);
        assert_eq!(implied_path(&dir, &hello, "nonsense", &[]), None);
        assert_eq!(
            implied_path(&dir, &hello, hello_ca, std::slice::from_ref(&hello)),
            None
        );
        assert_eq!(implied_path(&dir, &flat, flat_ca, refs), None);
    }
}
