//! `cowclone`: the command line. Parses arguments and hands them to [`cowclone_cli::run`];
//! errors print one line (`cowclone: <error>: <cause>...`) and exit 1, like qemu-img.
#![forbid(unsafe_code)]

use std::io;
use std::process::ExitCode;

use clap::Parser;
use cowclone_cli::args::Cli;

fn main() -> ExitCode {
    let stdout = io::stdout();
    let mut out = stdout.lock();
    // Run as `qemu-img` (a symlink), cowclone takes qemu-img's command lines.
    let mut argv = std::env::args_os();
    let program = argv.next().unwrap_or_default();
    if cowclone_cli::qemu_img::invoked_as_qemu_img(&program) {
        let args: Vec<_> = argv.collect();
        let program = program.to_string_lossy();
        return ExitCode::from(cowclone_cli::qemu_img::main(&program, &args, &mut out));
    }
    let cli = Cli::parse();
    match cowclone_cli::run(cli, &mut out) {
        Ok(code) => ExitCode::from(code),
        Err((e, _)) if cowclone_cli::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err((e, code)) => {
            eprintln!("cowclone: {}", cowclone_cli::error_line(&e));
            ExitCode::from(code)
        }
    }
}
