//! `cowclone completions SHELL` and `cowclone man`: the shell's view of the command line,
//! generated from the same clap definition that parses it (clap_complete, clap_mangen).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::CommandFactory;

use crate::args::Cli;

/// `cowclone completions SHELL`
#[derive(Debug, clap::Args)]
pub struct CompletionsArgs {
    /// The shell to complete for.
    #[arg(value_enum)]
    pub shell: clap_complete::Shell,
}

/// `cowclone man [--dir DIR]`
#[derive(Debug, clap::Args)]
pub struct ManArgs {
    /// Write cowclone.1 and one page per subcommand (cowclone-info.1, ...) into DIR instead of
    /// printing cowclone.1.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

/// Writes the completion script for `args.shell`.
pub fn completions(args: CompletionsArgs, out: &mut impl Write) -> Result<()> {
    let mut command = Cli::command();
    // Generated into memory: clap_complete panics on a write error (`| head`).
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "cowclone", &mut script);
    Ok(out.write_all(&script)?)
}

/// Writes the manual page, or with `--dir` every page into that directory.
pub fn man(args: ManArgs, out: &mut impl Write) -> Result<()> {
    let command = Cli::command();
    match args.dir {
        Some(dir) => {
            std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
            clap_mangen::generate_to(command, &dir)
                .with_context(|| format!("writing manual pages into {}", dir.display()))?;
            writeln!(out, "manual pages written to {}", dir.display())?;
        }
        None => clap_mangen::Man::new(command).render(out)?,
    }
    Ok(())
}
