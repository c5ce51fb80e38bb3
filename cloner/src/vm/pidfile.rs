//! Whether the qemu a pidfile names is still running: the process must exist, not be a zombie,
//! and carry our QMP socket path on its command line (a recycled pid is not mistaken for it).

use std::fs;
use std::path::Path;

use rustix::process::{kill_process, Pid, Signal};

/// The pid in `pidfile`, if the file exists and holds one.
pub fn read_pid(pidfile: &Path) -> Option<u32> {
    fs::read_to_string(pidfile).ok()?.trim().parse().ok()
}

/// True if process `pid` is alive (not a zombie) and its command line contains `marker`.
pub fn is_ours(pid: u32, marker: &str) -> bool {
    let proc_dir = Path::new("/proc").join(pid.to_string());
    let Ok(stat) = fs::read_to_string(proc_dir.join("stat")) else {
        return false;
    };
    // The state follows the command name, which is in parentheses and may contain spaces.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, Some("Z" | "X") | None) {
        return false;
    }
    fs::read(proc_dir.join("cmdline"))
        .map(|cmdline| {
            cmdline
                .split(|b| *b == 0)
                .any(|arg| String::from_utf8_lossy(arg).contains(marker))
        })
        .unwrap_or(false)
}

/// Sends SIGKILL to `pid` (the last resort of a stop). Errors (already gone) are ignored.
pub fn kill(pid: u32) {
    if let Some(pid) = i32::try_from(pid).ok().and_then(Pid::from_raw) {
        let _ = kill_process(pid, Signal::KILL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_live_process_is_recognised_by_its_marker_and_a_dead_one_is_not() {
        let mut child = std::process::Command::new("sleep")
            .arg("30.123")
            .spawn()
            .unwrap();
        let pid = child.id();
        // Between fork and exec the child still shows the test's command line.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while !is_ours(pid, "30.123") && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(is_ours(pid, "30.123"));
        assert!(!is_ours(pid, "qmp.sock"));
        kill(pid);
        child.wait().unwrap();
        assert!(!is_ours(pid, "30.123"));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("p");
        assert_eq!(read_pid(&file), None);
        fs::write(&file, "1234\n").unwrap();
        assert_eq!(read_pid(&file), Some(1234));
    }
}
