//! External programs the harness compares against or builds workloads with (`qemu-img`,
//! `qemu-io`, `mkfs.ext4`, `VBoxManage`): finding them, running them with a clear error, and
//! running one under GNU time to measure its wall time and peak RSS.

use std::ffi::OsStr;
use std::fs::File;
use std::io::ErrorKind;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use crate::{BenchError, Result};

/// Why `program` cannot be used here, or `None` if `program --version` runs. The reason names
/// the package for qemu-img.
pub fn unavailable(program: &str) -> Option<String> {
    match Command::new(program).arg("--version").output() {
        Ok(output) if output.status.success() => None,
        Ok(output) => Some(format!(
            "{program} --version failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        )),
        Err(e) if e.kind() == ErrorKind::NotFound => Some(not_found(program)),
        Err(e) => Some(format!("cannot run {program}: {e}")),
    }
}

/// "`program` not found", naming the Debian package that installs it where known.
fn not_found(program: &str) -> String {
    let package = match program {
        "qemu-img" | "qemu-io" => Some("qemu-utils"),
        "mkfs.ext4" => Some("e2fsprogs"),
        GNU_TIME => Some("time"),
        _ => None,
    };
    match package {
        Some(package) => format!("{program} not found in PATH (Debian package {package})"),
        None => format!("{program} not found in PATH"),
    }
}

/// The first line `program --version` prints, if it runs.
pub fn version(program: &str) -> Option<String> {
    let output = Command::new(program).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&output.stdout);
    text.lines().next().map(|l| l.trim().to_owned())
}

/// Runs `program args`, waits, and fails with its stderr unless it exits 0.
pub fn run_ok<S: AsRef<OsStr>>(program: &str, args: &[S]) -> Result<Output> {
    let command = command_line(program, args);
    let output = match Command::new(program).args(args).output() {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(BenchError::Invalid(not_found(program)))
        }
        Err(e) => return Err(BenchError::io(format!("running {command}"))(e)),
    };
    if !output.status.success() {
        return Err(BenchError::Tool {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
}

/// GNU time, which reports the peak RSS (`ru_maxrss` from `wait4`) of the program it runs:
/// std's `Child` has no rusage and rustix has no `wait4`, so the harness runs children under it.
pub const GNU_TIME: &str = "/usr/bin/time";

/// What [`run_measured`] measured of one child.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Measured {
    /// Wall time from spawning GNU time to reaping it, seconds (GNU time's own fork and exec,
    /// about a millisecond, is inside: the same for every program measured this way).
    pub seconds: f64,
    /// The child's peak resident set size, KiB (GNU time's `%M`).
    pub peak_rss_kib: u64,
}

/// Runs `program args` under [`GNU_TIME`] with stdout going to `stdout` and GNU time's report
/// going to `rss_file`, and fails with the child's stderr unless it exits 0.
pub fn run_measured<S: AsRef<OsStr>>(
    program: &OsStr,
    args: &[S],
    stdout: File,
    rss_file: &Path,
) -> Result<Measured> {
    let name = program.to_string_lossy();
    let command = command_line(&name, args);
    if !Path::new(GNU_TIME).is_file() {
        return Err(BenchError::Invalid(format!(
            "{GNU_TIME} not found (Debian package time): it measures each child's peak RSS"
        )));
    }
    let start = Instant::now();
    let output = Command::new(GNU_TIME)
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(rss_file)
        .arg(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .map_err(BenchError::io(format!("running {GNU_TIME} {command}")))?;
    let seconds = start.elapsed().as_secs_f64();
    if !output.status.success() {
        return Err(BenchError::Tool {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    let report = std::fs::read_to_string(rss_file)
        .map_err(BenchError::io(format!("reading {}", rss_file.display())))?;
    let peak_rss_kib = parse_peak_rss(&report).ok_or_else(|| BenchError::ToolOutput {
        command: format!("{GNU_TIME} -f %M {command}"),
        output: report.clone(),
    })?;
    Ok(Measured {
        seconds,
        peak_rss_kib,
    })
}

/// The KiB figure on the last non-empty line of GNU time's `-f %M` report (earlier lines, such
/// as "Command exited with non-zero status 1", are GNU time's notes).
fn parse_peak_rss(report: &str) -> Option<u64> {
    report
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())?
        .trim()
        .parse()
        .ok()
}

/// `program arg arg…` for messages.
pub fn command_line<S: AsRef<OsStr>>(program: &str, args: &[S]) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.as_ref().to_string_lossy());
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gnu_time_reports_and_missing_programs_are_understood() {
        assert_eq!(parse_peak_rss("4236\n"), Some(4236));
        assert_eq!(
            parse_peak_rss("Command exited with non-zero status 1\n812\n\n"),
            Some(812)
        );
        assert_eq!(parse_peak_rss(""), None);
        assert!(not_found("mkfs.ext4").contains("e2fsprogs"));
        assert!(not_found(GNU_TIME).contains("package time"));
        let err = run_ok("cowclone-no-such-program", &["x"]).unwrap_err();
        assert!(err.to_string().contains("not found in PATH"), "{err}");
    }
}
