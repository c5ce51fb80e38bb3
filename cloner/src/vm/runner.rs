//! Running hypervisor tools: an [`Invocation`] is a program and its arguments, exactly as a
//! driver built them; a [`CommandRunner`] runs it. [`SystemRunner`] spawns processes,
//! [`RecordingRunner`] only records (for tests and for tools that cannot be installed here), and
//! [`Logged`] wraps either, appending every invocation with its outcome to a JSON-lines file.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use super::VmError;

/// One command line a driver wants run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invocation {
    /// The program (looked up in `PATH`).
    pub program: String,
    /// Its arguments, unquoted.
    pub args: Vec<String>,
    /// How long it may run before it is killed (`None`: no limit).
    #[serde(skip)]
    pub timeout: Option<Duration>,
}

impl Invocation {
    /// `program` with `args` and no time limit.
    pub fn new<I, S>(program: impl Into<String>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Invocation {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            timeout: None,
        }
    }

    /// The same invocation, killed after `timeout`.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// The command line as a POSIX shell would take it (what `--dry-run` prints).
    pub fn command_line(&self) -> String {
        std::iter::once(&self.program)
            .chain(&self.args)
            .map(|word| quote(word))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

fn quote(word: &str) -> String {
    // try_quote fails only on NUL bytes, which no argument can carry anyway.
    shlex::try_quote(word).map_or_else(|_| format!("{word:?}"), |q| q.into_owned())
}

/// How a process ended.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Completed {
    /// Exit code (`None`: killed by a signal, or by the timeout).
    pub code: Option<i32>,
    /// True if the runner killed it at its timeout.
    pub timed_out: bool,
    /// What it printed on stdout.
    pub stdout: Vec<u8>,
    /// What it printed on stderr.
    pub stderr: Vec<u8>,
}

impl Completed {
    /// True for exit code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// `Ok(self)` on success, else the matching [`VmError`].
    pub fn require_success(self, invocation: &Invocation) -> Result<Completed, VmError> {
        if self.success() {
            return Ok(self);
        }
        if self.timed_out {
            return Err(VmError::CommandTimedOut {
                command: invocation.command_line(),
                seconds: invocation.timeout.unwrap_or_default().as_secs(),
            });
        }
        let stderr = String::from_utf8_lossy(&self.stderr);
        Err(VmError::CommandFailed {
            command: invocation.command_line(),
            status: self.code.unwrap_or(-1),
            stderr: stderr.trim().lines().last().unwrap_or("").to_owned(),
        })
    }
}

/// Runs invocations. Implementations must not interpret the arguments.
pub trait CommandRunner: Send + Sync {
    /// Runs `invocation` to completion (or its timeout) and returns how it ended; `Err` only if
    /// it could not be started.
    fn run(&self, invocation: &Invocation) -> Result<Completed, VmError>;
}

/// Spawns real processes, with stdin closed and stdout/stderr captured.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemRunner;

/// How often a process with a timeout is polled.
const POLL: Duration = Duration::from_millis(20);

impl CommandRunner for SystemRunner {
    fn run(&self, invocation: &Invocation) -> Result<Completed, VmError> {
        let mut child = Command::new(&invocation.program)
            .args(&invocation.args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|source| VmError::Spawn {
                program: invocation.program.clone(),
                source,
            })?;
        let stdout = child.stdout.take().map(drain);
        let stderr = child.stderr.take().map(drain);
        let started = Instant::now();
        let (status, timed_out) = loop {
            let waited = child.try_wait();
            match waited {
                Ok(Some(status)) => break (Some(status), false),
                Ok(None) => {}
                Err(_) => break (None, false),
            }
            if invocation.timeout.is_some_and(|t| started.elapsed() >= t) {
                // Already exited or unkillable: either way wait() below reaps what there is.
                let _ = child.kill();
                break (child.wait().ok(), true);
            }
            thread::sleep(POLL);
        };
        Ok(Completed {
            code: if timed_out {
                None
            } else {
                status.and_then(|s| s.code())
            },
            timed_out,
            stdout: stdout.map(join).unwrap_or_default(),
            stderr: stderr.map(join).unwrap_or_default(),
        })
    }
}

fn drain(mut pipe: impl Read + Send + 'static) -> thread::JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut bytes = Vec::new();
        // A read error ends the capture; what was read so far is kept.
        let _ = pipe.read_to_end(&mut bytes);
        bytes
    })
}

fn join(handle: thread::JoinHandle<Vec<u8>>) -> Vec<u8> {
    handle.join().unwrap_or_default()
}

/// Answers for a [`RecordingRunner`]: given an invocation, how it "ended".
pub type Responder = Box<dyn Fn(&Invocation) -> Completed + Send + Sync>;

/// Records invocations instead of running them; every one "succeeds" with empty output unless a
/// responder says otherwise.
pub struct RecordingRunner {
    recorded: Mutex<Vec<Invocation>>,
    responder: Option<Responder>,
}

impl Default for RecordingRunner {
    fn default() -> Self {
        Self::new()
    }
}

impl RecordingRunner {
    /// A runner that answers success to everything.
    pub fn new() -> Self {
        RecordingRunner {
            recorded: Mutex::new(Vec::new()),
            responder: None,
        }
    }

    /// A runner that answers with `responder`.
    pub fn answering(responder: impl Fn(&Invocation) -> Completed + Send + Sync + 'static) -> Self {
        RecordingRunner {
            recorded: Mutex::new(Vec::new()),
            responder: Some(Box::new(responder)),
        }
    }

    /// Everything recorded so far, in order.
    pub fn recorded(&self) -> Vec<Invocation> {
        self.recorded.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// The recorded command lines, shell-quoted.
    pub fn command_lines(&self) -> Vec<String> {
        self.recorded()
            .iter()
            .map(Invocation::command_line)
            .collect()
    }
}

impl CommandRunner for RecordingRunner {
    fn run(&self, invocation: &Invocation) -> Result<Completed, VmError> {
        if let Ok(mut recorded) = self.recorded.lock() {
            recorded.push(invocation.clone());
        }
        Ok(match &self.responder {
            Some(respond) => respond(invocation),
            None => Completed {
                code: Some(0),
                ..Completed::default()
            },
        })
    }
}

/// One line of an invocation log.
#[derive(Debug, Clone, Serialize)]
pub struct LogEntry<'a> {
    /// Nanoseconds since the Unix epoch when the invocation started.
    pub at_ns: u128,
    /// What ran (`program` and `args`), or a QMP command (`program` = `qmp`).
    #[serde(flatten)]
    pub invocation: &'a Invocation,
    /// Its exit code; `null` if killed or not started.
    pub code: Option<i32>,
    /// True if killed at its timeout.
    pub timed_out: bool,
    /// Wall time in milliseconds.
    pub elapsed_ms: u128,
    /// The error, if it could not be started.
    pub error: Option<String>,
}

/// Appends every invocation (and its outcome) to a JSON-lines log, then delegates to `R`.
pub struct Logged<R> {
    inner: R,
    log: PathBuf,
}

impl<R: CommandRunner> Logged<R> {
    /// Logs to `log` (created on first use).
    pub fn new(inner: R, log: impl Into<PathBuf>) -> Self {
        Logged {
            inner,
            log: log.into(),
        }
    }

    /// The runner inside.
    pub fn inner(&self) -> &R {
        &self.inner
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }
}

impl<R: CommandRunner> CommandRunner for Logged<R> {
    fn run(&self, invocation: &Invocation) -> Result<Completed, VmError> {
        let at_ns = now_ns();
        let started = Instant::now();
        let result = self.inner.run(invocation);
        let entry = LogEntry {
            at_ns,
            invocation,
            code: result.as_ref().ok().and_then(|c| c.code),
            timed_out: result.as_ref().is_ok_and(|c| c.timed_out),
            elapsed_ms: started.elapsed().as_millis(),
            error: result.as_ref().err().map(ToString::to_string),
        };
        append_log(&self.log, &entry)?;
        result
    }
}

/// Appends `entry` as one JSON line to `log`.
pub fn append_log(log: &Path, entry: &LogEntry<'_>) -> Result<(), VmError> {
    let mut line = serde_json::to_string(entry).map_err(|e| VmError::Io {
        step: "encoding a log entry for",
        path: log.to_owned(),
        source: e.into(),
    })?;
    line.push('\n');
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(VmError::io("appending to the invocation log", log))
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_are_quoted_for_the_shell() {
        let inv = Invocation::new("qemu-system-x86_64", ["-name", "my vm", "-append", "a='b'"]);
        assert_eq!(
            inv.command_line(),
            r#"qemu-system-x86_64 -name 'my vm' -append "a='b'""#
        );
    }

    #[test]
    fn the_system_runner_captures_output_status_and_timeouts() {
        let done = SystemRunner
            .run(&Invocation::new(
                "sh",
                ["-c", "echo out; echo err >&2; exit 3"],
            ))
            .unwrap();
        assert_eq!(
            (done.code, done.stdout, done.stderr),
            (Some(3), b"out\n".to_vec(), b"err\n".to_vec())
        );
        let slow = Invocation::new("sleep", ["30"]).with_timeout(Duration::from_millis(100));
        let done = SystemRunner.run(&slow).unwrap();
        assert!(done.timed_out && done.code.is_none());
        assert!(matches!(
            done.require_success(&slow),
            Err(VmError::CommandTimedOut { .. })
        ));
        assert!(matches!(
            SystemRunner.run(&Invocation::new("/nonexistent/tool", Vec::<String>::new())),
            Err(VmError::Spawn { .. })
        ));
    }

    #[test]
    fn logged_appends_one_json_line_per_invocation() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("inv.log");
        let runner = Logged::new(
            RecordingRunner::answering(|inv| Completed {
                code: Some(if inv.program == "false" { 1 } else { 0 }),
                ..Completed::default()
            }),
            &log,
        );
        runner.run(&Invocation::new("true", ["a b"])).unwrap();
        runner
            .run(&Invocation::new("false", Vec::<String>::new()))
            .unwrap();
        let text = std::fs::read_to_string(&log).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["program"], "true");
        assert_eq!(lines[0]["args"][0], "a b");
        assert_eq!(lines[0]["code"], 0);
        assert_eq!(lines[1]["code"], 1);
        assert_eq!(runner.inner().recorded().len(), 2);
    }
}
