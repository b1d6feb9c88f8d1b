//! `nixpush keygen NAME SECRET PUBLIC`: files interchangeable with
//! `nix-store --generate-binary-cache-key`'s (no trailing newline, the secret one private).

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;
use nixpush::formats::signing::SecretKey;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  Make the key pair a cache signs with, and show the line for nix.conf:
    nixpush keygen cache.example.org-1 /etc/nixpush/signing-key /etc/nixpush/signing-key.pub
    echo \"trusted-public-keys = $(cat /etc/nixpush/signing-key.pub)\"")]
pub struct KeygenArgs {
    /// Key name, conventionally `<cache host>-1`, e.g. `cache.example.org-1`.
    name: String,
    /// Where to write the secret key (created with mode 0600; never overwritten).
    secret: PathBuf,
    /// Where to write the public key (never overwritten).
    public: PathBuf,
}

pub fn run(args: KeygenArgs) -> anyhow::Result<ExitCode> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).context("cannot get randomness from the OS")?;
    // Its message says what is wrong with the name, and names it.
    let key = SecretKey::from_seed(&args.name, seed)?;
    write_new(&args.secret, key.to_file_string().as_bytes(), 0o600)?;
    if let Err(e) = write_new(
        &args.public,
        key.public().to_file_string().as_bytes(),
        0o644,
    ) {
        // Do not leave half a key pair behind.
        let _ = std::fs::remove_file(&args.secret);
        return Err(e);
    }
    eprintln!(
        "nixpush: wrote {} (secret) and {} (public: {})",
        args.secret.display(),
        args.public.display(),
        key.public().to_file_string()
    );
    Ok(ExitCode::SUCCESS)
}

fn write_new(path: &PathBuf, data: &[u8], mode: u32) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write {}", path.display()))
}
