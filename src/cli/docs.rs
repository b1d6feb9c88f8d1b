//! `nixpush help`, `nixpush completions SHELL` and `nixpush man [COMMAND]`: the command line
//! describing itself, from the same definitions clap parses with.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::CommandFactory as _;

use super::Cli;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  nixpush help push
  nixpush help")]
pub struct HelpArgs {
    /// The command to describe; none: nixpush itself.
    command: Option<String>,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  Load them in the running shell:
    source <(nixpush completions bash)

  Install them for every user:
    nixpush completions bash > /usr/share/bash-completion/completions/nixpush
    nixpush completions zsh > /usr/share/zsh/site-functions/_nixpush
    nixpush completions fish > /usr/share/fish/vendor_completions.d/nixpush.fish")]
pub struct CompletionsArgs {
    /// The shell to complete in.
    shell: clap_complete::Shell,
}

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Examples:
  Read it now:
    nixpush man | man -l -

  Install the pages of nixpush and of each command:
    nixpush man > /usr/local/share/man/man1/nixpush.1
    for c in push keygen daemon hook status; do
      nixpush man $c > /usr/local/share/man/man1/nixpush-$c.1
    done")]
pub struct ManArgs {
    /// A command's own page (nixpush-push(1), ...); none: nixpush(1).
    command: Option<String>,
}

/// The command a user named, or an error listing the ones there are.
fn find(cmd: &mut clap::Command, name: &str) -> anyhow::Result<clap::Command> {
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|c| c.get_name().to_owned())
        .collect();
    match cmd.find_subcommand_mut(name) {
        Some(c) => Ok(c.clone()),
        None => bail!(
            "no command {name:?}; the commands are: {}",
            names.join(", ")
        ),
    }
}

pub fn help(args: HelpArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    cmd.build();
    let mut shown = match &args.command {
        Some(name) => find(&mut cmd, name)?,
        None => cmd,
    };
    // As `COMMAND --help` prints it.
    super::print_stdout(&shown.render_help().to_string())?;
    Ok(ExitCode::SUCCESS)
}

pub fn completions(args: CompletionsArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(args.shell, &mut cmd, "nixpush", &mut out);
    super::print_stdout(&String::from_utf8(out).context("completions are not UTF-8")?)?;
    Ok(ExitCode::SUCCESS)
}

pub fn man(args: ManArgs) -> anyhow::Result<ExitCode> {
    let mut cmd = Cli::command();
    cmd.build();
    let page = match &args.command {
        Some(name) => {
            let sub = find(&mut cmd, name)?;
            // nixpush-push(1), as git and cargo name their commands' pages.
            let title = format!("nixpush-{}", sub.get_name());
            sub.name(title)
        }
        None => cmd,
    };
    let mut out = Vec::new();
    clap_mangen::Man::new(page)
        .render(&mut out)
        .context("cannot render the man page")?;
    super::print_stdout(&String::from_utf8(out).context("the man page is not UTF-8")?)?;
    Ok(ExitCode::SUCCESS)
}
