//! The `cowclone` command line as a library: [`args`] is the syntax (clap), [`commands`] holds
//! one function per command (typed arguments, an `impl Write`, an exit code), and [`run`]
//! dispatches a parsed command line. The `cowclone` binary is a thin shell around [`run`] and
//! [`error_line`], so tests and tools can call any command in-process.
#![forbid(unsafe_code)]

pub mod args;
pub mod commands;
pub mod output;
pub mod qemu_img;

use std::io::Write;

use anyhow::Result;

use args::{Cli, Command};

/// Runs one parsed command line, writing its output to `out`.
///
/// Returns qemu-img's exit code on success (compare: 1 = images differ; check: its codes), or
/// the error together with the code to exit with: 1, except for commands where 1 is a
/// negative answer (compare), which exit 2 on errors, as qemu-img does.
pub fn run(cli: Cli, out: &mut impl Write) -> std::result::Result<u8, (anyhow::Error, u8)> {
    use commands::*;
    let (result, error_code): (Result<u8>, u8) = match cli.command {
        Command::Create(args) => (create::create(args, out).map(|()| 0), 1),
        Command::Info(args) => (info::info(args, out).map(|()| 0), 1),
        Command::Compare(args) => (compare::compare(args, out), 2),
        Command::Check(args) => (check_map::check(args, out), 1),
        Command::Map(args) => (check_map::map(args, out), 1),
        Command::Convert(args) => (ops::convert(args, out).map(|()| 0), 1),
        Command::Commit(args) => (ops::commit(args, out).map(|()| 0), 1),
        Command::Rebase(args) => (ops::rebase(args, out).map(|()| 0), 1),
        Command::Resize(args) => (ops::resize(args, out).map(|()| 0), 1),
        Command::Measure(args) => (measure::measure_cmd(args, out).map(|()| 0), 1),
        Command::Bench(args) => (bench::bench(args, out).map(|()| 0), 1),
        Command::Registry(command) => (registry::run(command, out), 1),
        Command::Vm(command) => (vm::run(command, out), 1),
        Command::Host(args) => (host::run(args, out), 1),
        Command::QemuImg(args) => (Ok(crate::qemu_img::main("qemu-img", &args.args, out)), 1),
    };
    result
        .and_then(|code| out.flush().map(|()| code).map_err(Into::into))
        .map_err(|e| (e, error_code))
}

/// The one line an error is reported as: the error and its causes joined by ": ", without a
/// backtrace. A context naming only the file that the next cause names again is dropped.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = e.chain().map(|cause| cause.to_string()).collect();
    parts.dedup_by(|next, prev| {
        let repeats = next
            .strip_prefix(prev.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', ' ']));
        if repeats {
            std::mem::swap(next, prev);
        }
        repeats
    });
    parts.join(": ")
}

/// Whether `e` is a broken pipe on output (`cowclone ls | head`), which is not an error.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<std::io::Error>()
        .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
}
