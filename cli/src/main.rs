//! `cowclone`: the command line. Parses arguments and hands them to [`cowclone_cli::run`];
//! errors print one line (`cowclone: <error>: <cause>...`) and exit 1, like qemu-img; so do
//! usage errors (`--help` and `--version` exit 0).
#![forbid(unsafe_code)]

use std::io;
use std::process::ExitCode;

use clap::Parser;
use cowclone_cli::args::Cli;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(cowclone_cli::usage_exit_code(&e));
        }
    };
    cowclone_cli::init_logging(cli.global.verbose);
    let stdout = io::stdout();
    let mut out = stdout.lock();
    match cowclone_cli::run(cli, &mut out) {
        Ok(code) => ExitCode::from(code),
        Err((e, _)) if cowclone_cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err((e, code)) => {
            eprintln!("cowclone: {}", cowclone_cli::error_line(&e));
            ExitCode::from(code)
        }
    }
}
