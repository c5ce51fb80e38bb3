//! [`VmError`]: why starting, stopping or provisioning a VM failed.

use std::path::PathBuf;

/// Why a driver operation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A hypervisor tool could not be started at all (not installed, not executable).
    #[error("cannot run {program}")]
    Spawn {
        /// The program.
        program: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A hypervisor tool ran and failed.
    #[error("{command} exited with status {status}: {stderr}")]
    CommandFailed {
        /// The command line, shell-quoted.
        command: String,
        /// Its exit status (-1: killed by a signal).
        status: i32,
        /// The last line(s) it printed on stderr.
        stderr: String,
    },
    /// A hypervisor tool did not finish in time (it was killed).
    #[error("{command} did not finish within {seconds} s")]
    CommandTimedOut {
        /// The command line, shell-quoted.
        command: String,
        /// The limit.
        seconds: u64,
    },
    /// A path that must go into a command line or XML is not UTF-8.
    #[error("path {0:?} is not valid UTF-8")]
    NonUtf8Path(PathBuf),
    /// A path contains a character (a comma) that qemu's option syntax cannot carry safely.
    #[error("path {path:?} contains {character:?}, which qemu option syntax cannot carry")]
    UnsafePath {
        /// The path.
        path: PathBuf,
        /// The offending character.
        character: char,
    },
    /// The spec cannot be run by this driver (e.g. a VDI differencing image under qemu).
    #[error("{0}")]
    Unsupported(String),
    /// An option value was malformed (`--ingress`, `--egress`, `--accel`, ...).
    #[error("invalid {what} {value:?}: {reason}")]
    InvalidOption {
        /// Which option.
        what: &'static str,
        /// The value given.
        value: String,
        /// What is wrong.
        reason: String,
    },
    /// The VM is already running (its pidfile names a live qemu).
    #[error("VM {name} is already running (pid {pid})")]
    AlreadyRunning {
        /// The VM.
        name: String,
        /// Its qemu process.
        pid: u32,
    },
    /// The VM is not running.
    #[error("VM {0} is not running")]
    NotRunning(String),
    /// The QMP conversation failed.
    #[error("QMP {step} failed: {detail}")]
    Qmp {
        /// What was being done.
        step: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// Building a file for the VM (seed, log) failed.
    #[error("{step} {path}")]
    Io {
        /// What was being done.
        step: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The guest did not report completion in time.
    #[error("the guest did not finish within {seconds} s (serial log: {log})")]
    GuestTimedOut {
        /// The limit.
        seconds: u64,
        /// Where the guest's console went.
        log: PathBuf,
    },
    /// The guest's result could not be decoded.
    #[error("the guest's result is malformed: {0}")]
    BadResult(String),
    /// The guest stopped without reporting a result.
    #[error("the guest stopped without reporting a result (serial log: {log})")]
    NoResult {
        /// Where the guest's console went.
        log: PathBuf,
    },
}

impl VmError {
    /// A closure turning an I/O error on `path` during `step` into a [`VmError::Io`].
    pub fn io(step: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> Self {
        let path = path.to_owned();
        move |source| VmError::Io { step, path, source }
    }
}
