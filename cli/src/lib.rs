//! The `cowclone` command line as a library: [`args`] is the syntax (clap), [`commands`] holds
//! one function per command (typed arguments, an `impl Write`, an exit code), and [`run`]
//! dispatches a parsed command line. The `cowclone` binary is a thin shell around [`run`] and
//! [`error_line`], so tests and tools can call any command in-process.
#![forbid(unsafe_code)]

pub mod args;
pub mod commands;
pub mod output;
pub mod progress;
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
    tracing::debug!(command = ?cli.command, global = ?cli.global, "running");
    let started = std::time::Instant::now();
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
        Command::Amend(args) => (amend::amend(args, out).map(|()| 0), 1),
        Command::Dd(args) => (dd::dd(args, out).map(|()| 0), 1),
        Command::Measure(args) => (measure::measure_cmd(args, out).map(|()| 0), 1),
        Command::Bitmap(args) => (bitmap::bitmap_cmd(args, out).map(|()| 0), 1),
        Command::Snapshot(args) => (snapshot::snapshot(args, out).map(|()| 0), 1),
        Command::Bench(args) => (bench::bench(args, out).map(|()| 0), 1),
        Command::Registry(command) => (registry::run(command, out), 1),
        Command::Vm(command) => (vm::run(command, out), 1),
        Command::Host(args) => (host::run(args, out), 1),
        Command::Completions(args) => (shell::completions(args, out).map(|()| 0), 1),
        Command::Man(args) => (shell::man(args, out).map(|()| 0), 1),
        Command::QemuImg(args) => (Ok(crate::qemu_img::main("qemu-img", &args.args, out)), 1),
    };
    let result = result.and_then(|code| out.flush().map(|()| code).map_err(Into::into));
    match &result {
        Ok(code) => tracing::info!(exit = code, elapsed = ?started.elapsed(), "command finished"),
        Err(e) => tracing::info!(error = %error_line(e), exit = error_code, "command failed"),
    }
    result.map_err(|e| (e, error_code))
}

/// The exit code of a command line clap refused: 0 for `--help` and `--version` (printed on
/// stdout), 1 for usage errors, as qemu-img exits (clap's own default, 2, is what `compare`
/// and `check` use for an answer).
pub fn usage_exit_code(e: &clap::Error) -> u8 {
    if e.use_stderr() {
        1
    } else {
        0
    }
}

/// Sends `tracing` events to stderr: `RUST_LOG` if set, else warnings only, `-v` adds
/// cowclone's steps (info), `-vv` every layer opened and command run (debug), `-vvv` trace.
/// Call once, from a binary; a second call does nothing.
pub fn init_logging(verbose: u8) {
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.is_empty() => tracing_subscriber::EnvFilter::new(spec),
        _ => {
            let level = match verbose {
                0 => "warn",
                1 => "info",
                2 => "debug",
                _ => "trace",
            };
            tracing_subscriber::EnvFilter::new(format!(
                "warn,cowclone_cli={level},imagefmt={level},cloner={level},cowclone_benches={level}"
            ))
        }
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(verbose >= 2)
        .without_time()
        .try_init();
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
