//! Store derivations (`.drv` files) in Nix's ATerm form, read and written back byte for byte,
//! and the *hash modulo* that names a derivation's outputs in a realisation (`realisations/
//! sha256:HEX!out.doi`, see [`realisation`]).
//!
//! The format (Nix's `derivations.cc`, `parseDerivation` and `Derivation::unparse`):
//! ```text
//! Derive([("out","/nix/store/…-name","r:sha256","hex…"),…],   outputs: name, path, method:algo, hash
//!        [("/nix/store/…-dep.drv",["out"]),…],               input derivations and their outputs
//!        ["/nix/store/…-src",…],                             input sources
//!        "x86_64-linux","/bin/sh",["-c","…"],                platform, builder, arguments
//!        [("name","value"),…])                               environment
//! ```
//! Strings are in double quotes with `\"`, `\\`, `\n`, `\r` and `\t` escaped. Lists keep the
//! order of the file (Nix writes them sorted). Dynamic derivations (`DrvWithVersion`) are not
//! read.
//!
//! The hash modulo (Nix's `hashDerivationModulo`): for a fixed-output derivation, the SHA-256
//! of `fixed:out:METHOD:ALGO:HEX:PATH` per output; for any other, the SHA-256 of the ATerm with
//! each input derivation's path replaced by the hex of its own hash modulo (inputs merged by
//! that hash, sorted), and, when outputs are masked (as for a realisation's id), every
//! output's path and the environment variable of each output's name left empty. A caller
//! supplies the inputs' hashes (see [`Derivation::hash_modulo`]): reading them is I/O.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use sha2::{Digest as _, Sha256};

/// One output: its name, its path (empty where it is not known before the build), and for a
/// content-addressed output its method and algorithm (`r:sha256`) and, when fixed, its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    pub name: String,
    pub path: String,
    pub hash_algo: String,
    pub hash: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub outputs: Vec<Output>,
    /// Input derivations (store paths) with the outputs taken from each.
    pub input_drvs: Vec<(String, Vec<String>)>,
    pub input_srcs: Vec<String>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
}

/// What kind of outputs a derivation has, for what its hash modulo means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Output paths computed from the derivation (the usual kind).
    InputAddressed,
    /// Content-addressed with a hash given in advance (`fetchurl` and the like).
    Fixed,
    /// Content-addressed, paths known only once built (`__contentAddressed = true`): these
    /// are the outputs that realisations name.
    Floating,
}

/// A `.drv` file that is not a derivation Nix writes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a derivation Nix writes, at byte {at}: {message}")]
pub struct ParseError {
    pub at: usize,
    pub message: String,
}

impl Derivation {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        let mut p = Parser {
            s: text.as_bytes(),
            at: 0,
        };
        p.lit("Derive(")?;
        let outputs = p.list(|p| {
            p.lit("(")?;
            let name = p.string()?;
            p.lit(",")?;
            let path = p.string()?;
            p.lit(",")?;
            let hash_algo = p.string()?;
            p.lit(",")?;
            let hash = p.string()?;
            p.lit(")")?;
            Ok(Output {
                name,
                path,
                hash_algo,
                hash,
            })
        })?;
        p.lit(",")?;
        let input_drvs = p.list(|p| {
            p.lit("(")?;
            let path = p.string()?;
            p.lit(",")?;
            let outs = p.list(Parser::string)?;
            p.lit(")")?;
            Ok((path, outs))
        })?;
        p.lit(",")?;
        let input_srcs = p.list(Parser::string)?;
        p.lit(",")?;
        let platform = p.string()?;
        p.lit(",")?;
        let builder = p.string()?;
        p.lit(",")?;
        let args = p.list(Parser::string)?;
        p.lit(",")?;
        let env = p.list(|p| {
            p.lit("(")?;
            let k = p.string()?;
            p.lit(",")?;
            let v = p.string()?;
            p.lit(")")?;
            Ok((k, v))
        })?;
        p.lit(")")?;
        if p.at != p.s.len() {
            return Err(p.error("text after the derivation"));
        }
        Ok(Self {
            outputs,
            input_drvs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    pub fn kind(&self) -> Kind {
        let ca = |o: &Output| !o.hash_algo.is_empty();
        if !self.outputs.is_empty() && self.outputs.iter().all(|o| ca(o) && !o.hash.is_empty()) {
            Kind::Fixed
        } else if self.outputs.iter().any(ca) {
            Kind::Floating
        } else {
            Kind::InputAddressed
        }
    }

    /// The ATerm, as Nix writes it. With `mask_outputs`, output paths and the environment
    /// variables named after outputs are empty; with `inputs`, the input derivations are those
    /// (hex hash modulo → outputs) instead of this derivation's own.
    pub fn unparse(
        &self,
        mask_outputs: bool,
        inputs: Option<&BTreeMap<String, BTreeSet<String>>>,
    ) -> String {
        let mut s = String::with_capacity(1024);
        s.push_str("Derive([");
        for (i, o) in self.outputs.iter().enumerate() {
            comma(&mut s, i);
            s.push('(');
            quote(&mut s, &o.name);
            s.push(',');
            quote(&mut s, if mask_outputs { "" } else { &o.path });
            s.push(',');
            quote(&mut s, &o.hash_algo);
            s.push(',');
            quote(&mut s, &o.hash);
            s.push(')');
        }
        s.push_str("],[");
        match inputs {
            Some(map) => {
                for (i, (h, outs)) in map.iter().enumerate() {
                    input_drv(&mut s, i, h, outs.iter());
                }
            }
            None => {
                for (i, (p, outs)) in self.input_drvs.iter().enumerate() {
                    input_drv(&mut s, i, p, outs.iter());
                }
            }
        }
        s.push_str("],");
        strings(&mut s, &self.input_srcs);
        s.push(',');
        quote(&mut s, &self.platform);
        s.push(',');
        quote(&mut s, &self.builder);
        s.push(',');
        strings(&mut s, &self.args);
        s.push_str(",[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            comma(&mut s, i);
            s.push('(');
            quote(&mut s, k);
            s.push(',');
            let masked = mask_outputs && self.outputs.iter().any(|o| &o.name == k);
            quote(&mut s, if masked { "" } else { v });
            s.push(')');
        }
        s.push_str("])");
        s
    }

    /// The hash modulo of each output (see the module doc). `input_hash` gives, for the path of
    /// an input derivation and one of its outputs, that output's hash modulo, or `None` if it
    /// is not known (then this is `None` too).
    pub fn hash_modulo(
        &self,
        mask_outputs: bool,
        mut input_hash: impl FnMut(&str, &str) -> Option<[u8; 32]>,
    ) -> Option<BTreeMap<String, [u8; 32]>> {
        if self.kind() == Kind::Fixed {
            return Some(
                self.outputs
                    .iter()
                    .map(|o| {
                        let text = format!("fixed:out:{}:{}:{}", o.hash_algo, o.hash, o.path);
                        (o.name.clone(), Sha256::digest(text.as_bytes()).into())
                    })
                    .collect(),
            );
        }
        let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (path, outs) in &self.input_drvs {
            for o in outs {
                let h = input_hash(path, o)?;
                inputs.entry(hex(&h)).or_default().insert(o.clone());
            }
        }
        let h: [u8; 32] =
            Sha256::digest(self.unparse(mask_outputs, Some(&inputs)).as_bytes()).into();
        Some(self.outputs.iter().map(|o| (o.name.clone(), h)).collect())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// `("PATH",["OUT",…])`, the `i`th of its list.
fn input_drv<'a>(s: &mut String, i: usize, path: &str, outs: impl Iterator<Item = &'a String>) {
    comma(s, i);
    s.push('(');
    quote(s, path);
    s.push_str(",[");
    for (j, o) in outs.enumerate() {
        comma(s, j);
        quote(s, o);
    }
    s.push_str("])");
}

fn comma(s: &mut String, i: usize) {
    if i > 0 {
        s.push(',');
    }
}

fn strings(s: &mut String, list: &[String]) {
    s.push('[');
    for (i, x) in list.iter().enumerate() {
        comma(s, i);
        quote(s, x);
    }
    s.push(']');
}

fn quote(s: &mut String, x: &str) {
    s.push('"');
    for c in x.chars() {
        match c {
            '"' => s.push_str("\\\""),
            '\\' => s.push_str("\\\\"),
            '\n' => s.push_str("\\n"),
            '\r' => s.push_str("\\r"),
            '\t' => s.push_str("\\t"),
            c => s.push(c),
        }
    }
    s.push('"');
}

struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl Parser<'_> {
    fn error(&self, message: &str) -> ParseError {
        ParseError {
            at: self.at,
            message: message.to_owned(),
        }
    }

    fn lit(&mut self, l: &str) -> Result<(), ParseError> {
        if self.s[self.at..].starts_with(l.as_bytes()) {
            self.at += l.len();
            Ok(())
        } else {
            Err(self.error(&format!("expected {l:?}")))
        }
    }

    fn string(&mut self) -> Result<String, ParseError> {
        self.lit("\"")?;
        let mut out = Vec::new();
        loop {
            let Some(&c) = self.s.get(self.at) else {
                return Err(self.error("unterminated string"));
            };
            self.at += 1;
            match c {
                b'"' => break,
                b'\\' => {
                    let Some(&e) = self.s.get(self.at) else {
                        return Err(self.error("unterminated string"));
                    };
                    self.at += 1;
                    out.push(match e {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                }
                c => out.push(c),
            }
        }
        String::from_utf8(out).map_err(|_| self.error("a string that is not UTF-8"))
    }

    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, ParseError>,
    ) -> Result<Vec<T>, ParseError> {
        self.lit("[")?;
        let mut out = Vec::new();
        if self.lit("]").is_ok() {
            return Ok(out);
        }
        loop {
            out.push(item(self)?);
            if self.lit(",").is_ok() {
                continue;
            }
            self.lit("]")?;
            return Ok(out);
        }
    }
}

/// Realisations: which output path a content-addressed derivation's output turned out to be,
/// signed, as Nix keeps them in a binary cache (Nix's `realisation.cc`; the layout checked
/// against Nix 2.34's own `nix copy`): `realisations/<id>.doi`, where the id is
/// `sha256:HEX!OUTPUT` with HEX the derivation's masked hash modulo, holding the JSON
/// `{"dependentRealisations":{},"id":"…","outPath":"<base name>","signatures":[…]}` (keys
/// sorted, no spaces). A signature signs the same JSON without `signatures`.
pub mod realisation {
    /// The id of output `output` of a derivation whose masked hash modulo is `hash`.
    pub fn id(hash: &[u8; 32], output: &str) -> String {
        format!("sha256:{}!{output}", super::hex(hash))
    }

    /// The object name in the cache.
    pub fn key(id: &str) -> String {
        format!("realisations/{id}.doi")
    }

    /// What a signature signs.
    pub fn fingerprint(id: &str, out_base_name: &str) -> String {
        format!(
            "{{\"dependentRealisations\":{{}},\"id\":{},\"outPath\":{}}}",
            json_string(id),
            json_string(out_base_name)
        )
    }

    /// The object's contents.
    pub fn render(id: &str, out_base_name: &str, signatures: &[String]) -> String {
        let sigs: Vec<String> = signatures.iter().map(|s| json_string(s)).collect();
        format!(
            "{{\"dependentRealisations\":{{}},\"id\":{},\"outPath\":{},\"signatures\":[{}]}}",
            json_string(id),
            json_string(out_base_name),
            sigs.join(",")
        )
    }

    fn json_string(s: &str) -> String {
        serde_json::to_string(s).expect("a string serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CA: &str = r#"Derive([("out","","r:sha256","")],[("/nix/store/qh2v1mhmd9m0qk6xxgnfaj5ik0f141c3-np-ca-dep.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","echo /1vp1hxh3jvfxhj2p0f0hd4r0m3wq5ib9a5gvx4cmkvz2hngmlqaw > $out"],[("__contentAddressed","1"),("args","-c echo /1vp1hxh3jvfxhj2p0f0hd4r0m3wq5ib9a5gvx4cmkvz2hngmlqaw > $out"),("builder","/bin/sh"),("name","np-ca"),("out","/1rz4g4znpzjwh1xymhjpm42vipw92pr73vdgl6xs1hycac8kf2n9"),("outputHashAlgo","sha256"),("outputHashMode","recursive"),("system","x86_64-linux")])"#;

    #[test]
    fn reads_and_writes_back_byte_for_byte() {
        let d = Derivation::parse(CA).expect("parses");
        assert_eq!(d.unparse(false, None), CA);
        assert_eq!(d.kind(), Kind::Floating);
        assert_eq!(d.outputs[0].hash_algo, "r:sha256");
        let esc =
            r#"Derive([("out","/nix/store/x-a","","")],[],[],"s","b",["a\"b\\c\nd\te\r"],[])"#;
        let e = Derivation::parse(esc).expect("parses");
        assert_eq!(e.args[0], "a\"b\\c\nd\te\r");
        assert_eq!(e.unparse(false, None), esc);
        assert_eq!(e.kind(), Kind::InputAddressed);
    }

    #[test]
    fn masking_empties_output_paths_and_their_variables() {
        let d = Derivation::parse(CA).expect("parses");
        let masked = d.unparse(true, Some(&BTreeMap::new()));
        assert!(masked.contains(r#"("out","")"#), "{masked}");
        assert!(masked.contains(r#"],[],[],"x86_64-linux""#), "{masked}");
    }

    #[test]
    fn fixed_outputs_hash_their_content_address() {
        let fixed = r#"Derive([("out","/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-src","r:sha256","aa")],[],[],"s","b",[],[])"#;
        let d = Derivation::parse(fixed).expect("parses");
        assert_eq!(d.kind(), Kind::Fixed);
        let h = d.hash_modulo(true, |_, _| None).expect("needs no inputs");
        let want: [u8; 32] = Sha256::digest(
            b"fixed:out:r:sha256:aa:/nix/store/1b9p07z77phvv2hf6gm9f28syp39f1ag-src",
        )
        .into();
        assert_eq!(h["out"], want);
    }

    #[test]
    fn refuses_what_is_not_a_derivation() {
        for bad in [
            "",
            "Derive(",
            "Derive([],[],[],\"s\",\"b\",[],[])x",
            "DrvWithVersion(\"xp-dyn-drv\",[])",
        ] {
            assert!(Derivation::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn realisations_render_as_nix_writes_them() {
        let id = realisation::id(&[0x10; 32], "out");
        assert_eq!(id, format!("sha256:{}!out", "10".repeat(32)));
        assert_eq!(
            realisation::render(&id, "8z7w-np-ca", &[]),
            format!(
                "{{\"dependentRealisations\":{{}},\"id\":\"{id}\",\"outPath\":\"8z7w-np-ca\",\"signatures\":[]}}"
            )
        );
        assert_eq!(realisation::key(&id), format!("realisations/{id}.doi"));
    }
}
