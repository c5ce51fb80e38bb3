//! Running hypervisor tools: every invocation is logged (to the clone's `commands.log`), and a
//! recording runner stands in for tools that cannot run here (VirtualBox) and for `--dry-run`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::{io, Result, VmError};

/// One command line: program and arguments, exactly as run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invocation {
    /// The program (looked up in `PATH`).
    pub program: String,
    /// Its arguments.
    pub args: Vec<String>,
}

impl Invocation {
    /// A program and its arguments.
    pub fn new(program: &str, args: Vec<String>) -> Invocation {
        Invocation {
            program: program.to_owned(),
            args,
        }
    }

    /// The command as a shell would take it (arguments quoted where needed), for logs and
    /// `--dry-run`.
    pub fn shell_line(&self) -> String {
        std::iter::once(self.program.as_str())
            .chain(self.args.iter().map(String::as_str))
            .map(shell_quote)
            .collect::<Vec<_>>()
            .join(" ")
    }
}

/// Quotes `word` for a POSIX shell unless it is made only of safe characters.
pub fn shell_quote(word: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !word.is_empty() && word.chars().all(safe) {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

/// How a [`CommandRunner::run_until`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Until {
    /// The condition held after this long; the process was then killed.
    Done(Duration),
    /// The process exited first (its status, as text).
    Exited(String),
    /// The deadline passed; the process was killed.
    TimedOut,
    /// The program could not be started (the OS error, as text).
    NotRun(String),
}

/// Runs hypervisor command lines.
pub trait CommandRunner {
    /// Runs `invocation` to completion; its stdout on success, [`VmError::Tool`] otherwise.
    fn run(&self, invocation: &Invocation) -> Result<String>;

    /// Starts `invocation` (no stdin, output discarded) and polls `done` until it holds, the
    /// process exits or `deadline` passes; then kills the process. For probes whose program
    /// never exits by itself.
    fn run_until(
        &self,
        invocation: &Invocation,
        deadline: Duration,
        done: &dyn Fn() -> bool,
    ) -> Result<Until>;
}

/// Runs commands for real, appending each (with its outcome) to a log file if one is set.
#[derive(Debug, Clone, Default)]
pub struct SystemRunner {
    /// Where invocations are logged (a clone's `commands.log`).
    pub log: Option<PathBuf>,
}

impl SystemRunner {
    /// A runner logging to `log`.
    pub fn logging_to(log: PathBuf) -> SystemRunner {
        SystemRunner { log: Some(log) }
    }

    fn record(&self, invocation: &Invocation, outcome: &str) -> Result<()> {
        tracing::debug!(command = %invocation.shell_line(), outcome, "ran a hypervisor tool");
        match &self.log {
            Some(log) => log_line(log, &invocation.shell_line(), outcome),
            None => Ok(()),
        }
    }
}

/// Appends `{time} {what} # {outcome}` to the command log `log`: the format of every line there,
/// commands run and QMP requests sent alike.
pub fn log_line(log: &Path, what: &str, outcome: &str) -> Result<()> {
    let when = humantime::format_rfc3339_seconds(SystemTime::now());
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(io(format!("opening {}", log.display())))?;
    writeln!(file, "{when} {what} # {outcome}").map_err(io(format!("writing {}", log.display())))
}

impl CommandRunner for SystemRunner {
    fn run(&self, invocation: &Invocation) -> Result<String> {
        let output = Command::new(&invocation.program)
            .args(&invocation.args)
            .output();
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                self.record(invocation, &format!("not run: {e}"))?;
                return Err(VmError::Tool {
                    command: invocation.shell_line(),
                    detail: format!("cannot run {}: {e}", invocation.program),
                });
            }
        };
        self.record(invocation, &format!("{}", output.status))?;
        if output.status.success() {
            Ok(String::from_utf8_lossy(&output.stdout).into_owned())
        } else {
            Err(VmError::Tool {
                command: invocation.shell_line(),
                detail: format!(
                    "{}: {}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            })
        }
    }

    fn run_until(
        &self,
        invocation: &Invocation,
        deadline: Duration,
        done: &dyn Fn() -> bool,
    ) -> Result<Until> {
        let spawned = Command::new(&invocation.program)
            .args(&invocation.args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let mut child = match spawned {
            Ok(child) => child,
            Err(e) => {
                self.record(invocation, &format!("not run: {e}"))?;
                return Ok(Until::NotRun(e.to_string()));
            }
        };
        let start = Instant::now();
        let until = loop {
            if done() {
                break Until::Done(start.elapsed());
            }
            if let Ok(Some(status)) = child.try_wait() {
                break Until::Exited(status.to_string());
            }
            if start.elapsed() >= deadline {
                break Until::TimedOut;
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let _ = child.kill();
        let _ = child.wait();
        let outcome = match &until {
            Until::Done(after) => format!("done after {} ms, killed", after.as_millis()),
            Until::Exited(status) => status.clone(),
            Until::TimedOut => format!("no result in {} ms, killed", deadline.as_millis()),
            Until::NotRun(e) => format!("not run: {e}"),
        };
        self.record(invocation, &outcome)?;
        Ok(until)
    }
}

/// Records invocations instead of running them: every command succeeds with empty output.
/// For `--dry-run`, and for testing the command sequences of tools that are not installed.
#[derive(Debug, Default)]
pub struct RecordingRunner {
    calls: Mutex<Vec<Invocation>>,
}

impl RecordingRunner {
    /// The invocations recorded so far, in order.
    pub fn calls(&self) -> Vec<Invocation> {
        self.calls.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

impl CommandRunner for RecordingRunner {
    fn run(&self, invocation: &Invocation) -> Result<String> {
        if let Ok(mut calls) = self.calls.lock() {
            calls.push(invocation.clone());
        }
        Ok(String::new())
    }

    /// Records the invocation and asks `done` once: nothing runs, so nothing waits.
    fn run_until(
        &self,
        invocation: &Invocation,
        _deadline: Duration,
        done: &dyn Fn() -> bool,
    ) -> Result<Until> {
        self.run(invocation)?;
        Ok(if done() {
            Until::Done(Duration::ZERO)
        } else {
            Until::TimedOut
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quotes_only_what_needs_it() {
        assert_eq!(shell_quote("-blockdev"), "-blockdev");
        assert_eq!(
            shell_quote("driver=file,filename=/a b"),
            "'driver=file,filename=/a b'"
        );
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn the_system_runner_logs_and_reports_failures() {
        let dir = tempfile::tempdir().unwrap();
        let runner = SystemRunner::logging_to(dir.path().join("commands.log"));
        let out = runner
            .run(&Invocation::new("sh", vec!["-c".into(), "echo hi".into()]))
            .unwrap();
        assert_eq!(out, "hi\n");
        let err = runner
            .run(&Invocation::new(
                "sh",
                vec!["-c".into(), "echo no >&2; exit 3".into()],
            ))
            .unwrap_err();
        assert!(err.to_string().contains("no"), "{err}");
        let err = runner
            .run(&Invocation::new("/nonexistent/tool", vec![]))
            .unwrap_err();
        assert!(err.to_string().contains("cannot run"), "{err}");
        let log = std::fs::read_to_string(dir.path().join("commands.log")).unwrap();
        let lines: Vec<&str> = log.lines().collect();
        assert_eq!(lines.len(), 3, "{log}");
        assert!(
            lines[0].contains("sh -c 'echo hi' # exit status: 0"),
            "{log}"
        );
        assert!(lines[1].contains("exit status: 3"), "{log}");
    }
}
