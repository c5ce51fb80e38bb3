//! `cowclone`: the command line. Parses arguments and hands them to [`cowclone_cli::run`];
//! errors print one line (`cowclone: <error>: <cause>...`) and exit 1, like qemu-img; so do
//! usage errors (`--help` and `--version` exit 0). Run as `qemu-img` (a symlink), it takes
//! qemu-img's command lines instead ([`cowclone_cli::qemu_img`]).
#![forbid(unsafe_code)]

use std::io;
use std::process::ExitCode;

use clap::Parser;
use cowclone_cli::args::Cli;

fn main() -> ExitCode {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let mut argv = std::env::args_os();
    let program = argv.next().unwrap_or_default();
    if cowclone_cli::qemu_img::invoked_as_qemu_img(&program) {
        let args: Vec<_> = argv.collect();
        let program = program.to_string_lossy();
        return ExitCode::from(cowclone_cli::qemu_img::main(&program, &args, &mut out));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(cowclone_cli::usage_exit_code(&e));
        }
    };
    cowclone_cli::init_logging(cli.global.verbose);
    match cowclone_cli::run(cli, &mut out) {
        Ok(code) => ExitCode::from(code),
        Err((e, _)) if cowclone_cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err((e, code)) => {
            eprintln!("cowclone: {}", cowclone_cli::error_line(&e));
            ExitCode::from(code)
        }
    }
}
