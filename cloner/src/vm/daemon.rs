//! Hypervisors that run in the foreground (cloud-hypervisor, Firecracker): started detached in
//! their own process group with stdout and stderr in files of the clone's runtime directory, a
//! pidfile written for them, and stopped by their API, then by signal.
//!
//! A pid is trusted only while that process's command line names a marker of this clone (its
//! API socket path, or qemu's pidfile), so a reused pid is never taken for the VM.

use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::qemu::{Stopped, VmState};
use super::runner::{log_line, CommandRunner, Invocation};
use super::{io, Result, VmError};

/// The state recorded in `pidfile`: `Running` only if that process is alive and its command
/// line contains `marker`.
pub fn state(pidfile: &Path, marker: &str) -> VmState {
    match crate::runtime::live_pid(pidfile, marker) {
        Some(pid) => VmState::Running(pid),
        None => VmState::Stopped,
    }
}

/// Starts `invocation` detached (new process group, stdin from /dev/null, stdout to `stdout`,
/// stderr to `stderr`), writes its pid to `pidfile`, and logs the command to `log`. Returns
/// the pid.
pub fn spawn(
    invocation: &Invocation,
    stdout: &Path,
    stderr: &Path,
    pidfile: &Path,
    log: &Path,
) -> Result<i32> {
    use std::os::unix::process::CommandExt;
    let open = |path: &Path| File::create(path).map_err(io(format!("creating {}", path.display())));
    tracing::debug!(command = %invocation.shell_line(), "running");
    let child = Command::new(&invocation.program)
        .args(&invocation.args)
        .stdin(Stdio::null())
        .stdout(open(stdout)?)
        .stderr(open(stderr)?)
        .process_group(0)
        .spawn();
    let child = match child {
        Ok(child) => child,
        Err(e) => {
            log_line(log, &invocation.shell_line(), &format!("not run: {e}"))?;
            return Err(VmError::Tool {
                command: invocation.shell_line(),
                detail: format!("cannot run {}: {e}", invocation.program),
            });
        }
    };
    let pid = child.id() as i32;
    // The parent of a new process may run on before the kernel has set up the new program's
    // arguments (/proc/PID/cmdline is empty for a moment): wait for them, so that `state`
    // recognises the process from the start.
    let started = Instant::now();
    while std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c.is_empty())
        && started.elapsed() < Duration::from_secs(2)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    log_line(
        log,
        &invocation.shell_line(),
        &format!("started, pid {pid}"),
    )?;
    std::fs::write(pidfile, format!("{pid}\n"))
        .map_err(io(format!("writing {}", pidfile.display())))?;
    Ok(pid)
}

/// Waits until the process of `pidfile` is gone, up to `timeout`.
pub fn wait_gone(pidfile: &Path, marker: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if state(pidfile, marker) == VmState::Stopped {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Stops the process of `pidfile`: runs `graceful` (the hypervisor's power-button request) and
/// waits up to `timeout`; then `forceful` (its own shutdown request, if it has one) and waits 5 s;
/// then SIGKILL to its process group. Failed requests are logged and passed over: the process's state is what counts.
pub fn stop(
    pidfile: &Path,
    marker: &str,
    graceful: &Invocation,
    forceful: Option<&Invocation>,
    runner: &dyn CommandRunner,
    log: &Path,
    timeout: Duration,
) -> Result<Stopped> {
    let VmState::Running(pid) = state(pidfile, marker) else {
        return Ok(Stopped::WasNotRunning);
    };
    if runner.run(graceful).is_ok() && wait_gone(pidfile, marker, timeout) {
        return Ok(Stopped::PoweredDown);
    }
    if let Some(forceful) = forceful {
        if runner.run(forceful).is_ok() && wait_gone(pidfile, marker, Duration::from_secs(5)) {
            return Ok(Stopped::Quit);
        }
    }
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        // The whole group: the hypervisor was started as its leader.
        let killed = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        let outcome = killed.map_or_else(|e| format!("error: {e}"), |()| "ok".into());
        log_line(
            log,
            &format!("kill -KILL -{}", pid.as_raw_nonzero()),
            &outcome,
        )?;
    }
    wait_gone(pidfile, marker, Duration::from_secs(5));
    Ok(Stopped::Killed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::runner::SystemRunner;

    /// A stand-in for a hypervisor: a shell that sleeps, with a marker in its command line.
    /// Started detached, it is seen running; a graceful request that does nothing leaves it
    /// running, so it is killed; a stale pidfile (the pid of a process without the marker) is
    /// not taken for it.
    #[test]
    fn a_detached_process_is_tracked_by_marker_and_killed_when_requests_fail() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("api.sock").to_string_lossy().into_owned();
        let pidfile = dir.path().join("vm.pid");
        let log = dir.path().join("commands.log");
        let vm = Invocation::new(
            "sh",
            vec![
                "-c".into(),
                // Not ending in a simple command, which the shell may exec in its own place.
                "echo up; sleep 60; exit 0".into(),
                "fake-hypervisor".into(),
                marker.clone(),
            ],
        );
        let out = dir.path().join("serial.log");
        let pid = spawn(&vm, &out, &dir.path().join("err.log"), &pidfile, &log).unwrap();
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        assert_eq!(
            state(&pidfile, &marker),
            VmState::Running(pid),
            "{:?}",
            String::from_utf8_lossy(&cmdline)
        );
        assert_eq!(state(&pidfile, "not-this-clone"), VmState::Stopped);
        let nothing = Invocation::new("true", vec![]);
        let runner = SystemRunner::logging_to(log.clone());
        let how = stop(
            &pidfile,
            &marker,
            &nothing,
            None,
            &runner,
            &log,
            Duration::from_millis(300),
        )
        .unwrap();
        assert_eq!(how, Stopped::Killed);
        assert_eq!(state(&pidfile, &marker), VmState::Stopped);
        assert_eq!(std::fs::read_to_string(&out).unwrap(), "up\n");
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(logged.contains("started, pid"), "{logged}");
        assert!(logged.contains("kill -KILL"), "{logged}");
        let missing = Invocation::new("/nonexistent/hypervisor", vec![]);
        let err = spawn(&missing, &out, &out, &pidfile, &log).unwrap_err();
        assert!(err.to_string().contains("cannot run"), "{err}");
    }
}
