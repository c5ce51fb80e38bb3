//! Where `ls` learns whether a clone is running: a [`StateProbe`] the hypervisor drivers
//! implement (pid files, sockets in the clone's directory). [`NoRuntime`] reports no state, and
//! `ls` shows `-` (JSON `"state": null`).
//!
//! [`running_pid`] reads the qemu driver's pidfile; it lives here, below both the registry and
//! the drivers, because the registry refuses to remove a running clone.

use std::path::{Path, PathBuf};

use crate::registry::ImageRecord;

/// The pidfile's name in a clone's runtime directory.
pub const PIDFILE_NAME: &str = "qemu.pid";

/// The pidfile in a clone's runtime directory.
pub fn pidfile(run_dir: &Path) -> PathBuf {
    run_dir.join(PIDFILE_NAME)
}

/// The pid of the hypervisor running for `run_dir`: the pidfile's pid, if that process is alive
/// and is the one started for this directory (its command line names this pidfile), so that a
/// reused pid is not mistaken for it.
pub fn running_pid(run_dir: &Path) -> Option<i32> {
    let pidfile = pidfile(run_dir);
    live_pid(&pidfile, pidfile.to_str()?)
}

/// The pid recorded in `pidfile`, if that process is alive and its command line contains
/// `marker` (a reused pid belongs to some other program and does not count).
pub fn live_pid(pidfile: &Path, marker: &str) -> Option<i32> {
    let pid = std::fs::read_to_string(pidfile)
        .ok()
        .and_then(|text| text.trim().parse::<i32>().ok())?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let ours = !marker.is_empty()
        && cmdline
            .windows(marker.len())
            .any(|w| w == marker.as_bytes());
    ours.then_some(pid)
}

/// Reports a record's runtime state (`running`, `stopped`, …), if known.
pub trait StateProbe {
    /// The state of the image `record`, or `None` if unknown.
    fn state(&self, record: &ImageRecord) -> Option<String>;
}

/// The probe used until hypervisor drivers provide one: state unknown.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRuntime;

impl StateProbe for NoRuntime {
    fn state(&self, _record: &ImageRecord) -> Option<String> {
        None
    }
}
