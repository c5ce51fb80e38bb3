//! External programs the harness compares against (`qemu-img`, `VBoxManage`): finding them and
//! running them with a clear error.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::process::{Command, Output};

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
        Err(e) if e.kind() == ErrorKind::NotFound => Some(match program {
            "qemu-img" => "qemu-img not found in PATH (Debian package qemu-utils)".to_owned(),
            _ => format!("{program} not found in PATH"),
        }),
        Err(e) => Some(format!("cannot run {program}: {e}")),
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
    let output = Command::new(program)
        .args(args)
        .output()
        .map_err(BenchError::io(format!("running {command}")))?;
    if !output.status.success() {
        return Err(BenchError::Tool {
            command,
            status: output.status.to_string(),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(output)
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
