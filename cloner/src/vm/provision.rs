//! `provision`: run a script in a fresh VM and get its output and exit status back.
//!
//! The script's `/* rexxjs-vm-KEY: VALUE */` lines give the plan ([`crate::plan`]); the named
//! base is cloned through the registry; the script travels to the guest in a cloud-init NoCloud
//! seed ([`super::cidata`]) as the `user-data` of a small wrapper; the clone boots under qemu;
//! the wrapper runs the script and writes its output (base64) and exit status between two marker
//! lines carrying a random nonce to the guest's second serial port (`/dev/ttyS1`), which qemu
//! records in `result.log` in the clone's directory:
//!
//! ```text
//! COWCLONE-BEGIN <nonce>
//! <stdout and stderr of the script, base64>
//! COWCLONE-END <nonce> <exit status>
//! ```
//!
//! A port of its own keeps kernel and init messages (which go to the console, `serial.log`)
//! out of the output, and base64 keeps the output's bytes as they were (no `\n` → `\r\n`
//! translation by the tty).
//!
//! Guest contract: something in the guest must run the seed's `user-data` once at boot, as
//! cloud-init does for a `user-data` that starts with `#!`. The wrapper then powers the guest
//! off (`poweroff -f`, after `sync`) unless the VM is kept running.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::Serialize;

use super::limits::{self, Limits};
use super::runner::{CommandRunner, SystemRunner};
use super::spec::{Accel, Egress, KernelBoot, PortForward, VmSpec};
use super::{accel, cidata, io, qemu, Result, VmError};
use crate::{CloneSpec, Home, Registry};

/// Largest script accepted (it travels on a 1 MiB seed volume).
pub const MAX_SCRIPT: u64 = 256 << 10;
/// Run time limit when the plan sets none.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// What to provision.
#[derive(Debug, Clone)]
pub struct ProvisionRequest {
    /// The script (its directives name the base).
    pub script: PathBuf,
    /// Name of the clone to make; default `<base>-run-<8 hex digits>`.
    pub clone_name: Option<String>,
    /// Leave the VM running after the script finished.
    pub keep_running: bool,
    /// Acceleration.
    pub accel: Accel,
    /// Direct kernel boot, for bases without a boot loader.
    pub kernel: Option<KernelBoot>,
    /// The relay program for the plan's `egress-ports` (see [`VmSpec::egress_relay`]).
    pub egress_relay: Option<PathBuf>,
    /// The operator's limits (see [`super::limits`]); a plan beyond them is refused before
    /// anything is cloned.
    pub limits: Limits,
    /// Take an internal snapshot of this name of the clone's qcow2 image once the script exited
    /// 0 and the VM stopped, so the provisioned state can be returned to (`snapshot -a`).
    /// Refused with `keep_running` (the running VM holds the image's write lock).
    pub snapshot: Option<String>,
}

/// What came back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ProvisionOutcome {
    /// The clone the script ran in.
    pub clone: String,
    /// The script's output (stdout and stderr, interleaved as the guest wrote them).
    pub output: String,
    /// The script's exit status.
    pub exit_status: i32,
    /// The VM is still running.
    pub kept_running: bool,
    /// The guest's console log.
    pub serial_log: PathBuf,
    /// Where the guest's report arrived (its second serial port).
    pub result_log: PathBuf,
    /// Wall time from boot to result, milliseconds.
    pub elapsed_ms: u64,
    /// The internal snapshot taken of the clone (`--snapshot`, after a script that exited 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<imagefmt::ops::info::SnapshotInfo>,
}

/// The seed's `user-data`: a wrapper that writes `script` to a file, runs it, reports its
/// output and status on `/dev/ttyS1` between markers carrying `nonce` (see the module docs),
/// and powers off unless `keep_running`.
pub fn wrapper(script: &str, nonce: &str, keep_running: bool) -> String {
    let mut body = script.to_owned();
    if !body.ends_with('\n') {
        body.push('\n');
    }
    let power = if keep_running {
        ""
    } else {
        "sync\npoweroff -f 2>/dev/null || poweroff\n"
    };
    format!(
        "#!/bin/sh\n\
         # cowclone provision wrapper\n\
         cat > /tmp/cowclone-script <<'COWCLONE_SCRIPT_{nonce}'\n\
         {body}COWCLONE_SCRIPT_{nonce}\n\
         chmod +x /tmp/cowclone-script\n\
         /tmp/cowclone-script > /tmp/cowclone-output 2>&1\n\
         status=$?\n\
         stty -F {REPORT_PORT} raw -echo 2>/dev/null\n\
         {{ echo \"COWCLONE-BEGIN {nonce}\"; base64 < /tmp/cowclone-output; \
         echo \"COWCLONE-END {nonce} $status\"; }} > {REPORT_PORT}\n\
         {power}"
    )
}

/// The guest device the wrapper reports on: the second serial port.
pub const REPORT_PORT: &str = "/dev/ttyS1";

/// The file that receives the guest's second serial port.
pub fn result_log(run_dir: &Path) -> PathBuf {
    run_dir.join("result.log")
}

/// Finds the wrapper's report in `log`: the decoded output (invalid UTF-8 replaced) and the
/// exit status. `None` until the end marker has arrived; `Some(Err)` for a report that does
/// not decode.
pub fn parse_report(log: &str, nonce: &str) -> Option<Result<(String, i32), String>> {
    let lines: Vec<&str> = log.lines().map(|l| l.trim_end_matches('\r')).collect();
    let begin_line = format!("COWCLONE-BEGIN {nonce}");
    let end_prefix = format!("COWCLONE-END {nonce} ");
    let begin = lines.iter().position(|l| *l == begin_line)?;
    let (end, status) = lines[begin + 1..].iter().enumerate().find_map(|(i, l)| {
        l.strip_prefix(end_prefix.as_str())
            .map(|s| (begin + 1 + i, s))
    })?;
    let Ok(status) = status.trim().parse::<i32>() else {
        return Some(Err(format!("bad exit status {status:?}")));
    };
    let encoded: String = lines[begin + 1..end].concat();
    Some(
        STANDARD
            .decode(encoded.as_bytes())
            .map(|bytes| (String::from_utf8_lossy(&bytes).into_owned(), status))
            .map_err(|e| format!("the output does not decode as base64: {e}")),
    )
}

/// Largest report read back from the guest (base64 of about 48 MiB of output): the guest
/// controls what it writes on its serial port, so reading it is bounded.
pub const MAX_REPORT: u64 = 64 << 20;

/// The report file's text (empty if it does not exist yet), or an error if the guest wrote more
/// than [`MAX_REPORT`] bytes.
fn read_bounded(path: &Path) -> std::result::Result<String, String> {
    use std::io::Read;
    let Ok(file) = std::fs::File::open(path) else {
        return Ok(String::new());
    };
    let mut bytes = Vec::new();
    file.take(MAX_REPORT + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading {}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX_REPORT {
        return Err(format!(
            "the guest's report is larger than {MAX_REPORT} bytes"
        ));
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn read_script(path: &Path) -> Result<String> {
    let meta = std::fs::metadata(path).map_err(io(format!("reading {}", path.display())))?;
    if meta.len() > MAX_SCRIPT {
        return Err(VmError::Invalid(format!(
            "{} is {} bytes; scripts are limited to {MAX_SCRIPT}",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read_to_string(path).map_err(io(format!("reading {}", path.display())))
}

/// Runs the script at `request.script` in a new clone of its plan's base; see the module docs.
/// Commands run through `runner`, by default a [`SystemRunner`] logging to the new clone's
/// `commands.log`.
pub fn provision(
    registry: &mut Registry,
    request: &ProvisionRequest,
    runner: Option<&dyn CommandRunner>,
) -> Result<ProvisionOutcome> {
    if request.snapshot.is_some() && request.keep_running {
        return Err(VmError::Invalid(
            "a snapshot is taken after the VM stopped; it cannot be combined with keep-running"
                .into(),
        ));
    }
    let script = read_script(&request.script)?;
    let plan = crate::plan::parse_plan(&script).map_err(|e| VmError::Invalid(e.to_string()))?;
    let egress = plan_egress(&plan.egress_ports);
    let timeout = request
        .limits
        .run_time(plan.timeout_secs.map(Duration::from_secs), DEFAULT_TIMEOUT);
    {
        // What the clone will get: the plan's settings, else its base's, else the defaults.
        let base = registry.clone_record(&plan.base)?;
        request.limits.check(&limits::Request {
            memory: plan
                .memory
                .or(base.memory)
                .unwrap_or(super::spec::DEFAULT_MEMORY),
            cpus: plan.cpus.or(base.cpus).unwrap_or(1),
            run_time: Some(timeout),
            egress: &egress,
        })?;
    }
    let nonce = uuid::Uuid::new_v4().simple().to_string();
    let name = request
        .clone_name
        .clone()
        .unwrap_or_else(|| format!("{}-run-{}", plan.base, &nonce[..8]));
    registry.clone_images(&CloneSpec::new(&plan.base, &name))?;
    let record = registry.clone_record(&name)?;
    let mut spec = VmSpec::from_clone(&record)?;
    if let Some(memory) = plan.memory {
        spec.memory = memory;
    }
    if let Some(cpus) = plan.cpus {
        spec.cpus = cpus;
    }
    spec.ingress = plan
        .ingress_port
        .map(|p| PortForward { host: p, guest: p })
        .into_iter()
        .collect();
    spec.egress = egress;
    spec.kernel = request.kernel.clone();
    spec.egress_relay = request.egress_relay.clone();
    let seed = spec.run_dir.join("seed.img");
    let _ = std::fs::remove_file(&seed);
    cidata::write_seed(
        &seed,
        &cidata::meta_data(&name),
        wrapper(&script, &nonce, request.keep_running).as_bytes(),
    )?;
    spec.extra_drives.push(seed);
    let accel = resolve_accel(request.accel, &spec.run_dir, registry.home())?;

    let report_log = result_log(&spec.run_dir);
    let _ = std::fs::remove_file(&report_log);
    spec.extra_serial_logs.push(report_log.clone());
    let started = Instant::now();
    let system = SystemRunner::logging_to(super::spec::command_log(&spec.run_dir));
    qemu::start(&spec, accel, runner.unwrap_or(&system))?;
    let log = spec.serial_log();
    let read_report = || match read_bounded(&report_log) {
        Ok(text) => parse_report(&text, &nonce),
        Err(e) => Some(Err(e)),
    };
    let report = loop {
        if let Some(report) = read_report() {
            break report;
        }
        if qemu::state(&spec.run_dir) == qemu::VmState::Stopped {
            // The guest may have reported just before it powered off: look once more.
            if let Some(report) = read_report() {
                break report;
            }
            return Err(VmError::Invalid(format!(
                "the guest stopped without reporting the script's result (serial log: {})",
                log.display()
            )));
        }
        if started.elapsed() > timeout {
            qemu::stop(&spec.run_dir, Duration::from_secs(5))?;
            return Err(VmError::Timeout {
                seconds: timeout.as_secs(),
                log: log.display().to_string(),
            });
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let elapsed_ms = started.elapsed().as_millis() as u64;
    let kept_running = request.keep_running;
    if !kept_running && !qemu::wait_gone(&spec.run_dir, Duration::from_secs(30)) {
        qemu::stop(&spec.run_dir, Duration::from_secs(5))?;
    }
    let (output, exit_status) =
        report.map_err(|e| VmError::Invalid(format!("{e} (report: {})", report_log.display())))?;
    let snapshot = match &request.snapshot {
        Some(snapshot) if exit_status == 0 => Some(snapshot_stopped_clone(&spec, snapshot)?),
        _ => None,
    };
    Ok(ProvisionOutcome {
        clone: name,
        output,
        exit_status,
        kept_running,
        serial_log: log,
        result_log: report_log,
        elapsed_ms,
        snapshot,
    })
}

/// Takes internal snapshot `name` of the clone's writable (top) image, once its VM is gone.
fn snapshot_stopped_clone(spec: &VmSpec, name: &str) -> Result<imagefmt::ops::info::SnapshotInfo> {
    if qemu::state(&spec.run_dir) != qemu::VmState::Stopped {
        return Err(VmError::Invalid(format!(
            "{} is still running; snapshot {name:?} not taken",
            spec.name
        )));
    }
    let top = spec
        .disks
        .iter()
        .find(|d| !d.read_only)
        .ok_or_else(|| VmError::Invalid(format!("{} has no writable image", spec.name)))?;
    if top.format != imagefmt::ImageFormat::Qcow2 {
        return Err(VmError::Invalid(format!(
            "internal snapshots need a qcow2 image; {} is {}",
            top.path.display(),
            top.format.name()
        )));
    }
    let taken =
        imagefmt::ops::snapshot::create(&top.path, name).map_err(|source| VmError::Snapshot {
            name: name.to_owned(),
            path: top.path.clone(),
            source,
        })?;
    Ok(imagefmt::ops::info::SnapshotInfo::from(&taken))
}

/// The egress policy of a plan's `egress-ports`: the host's loopback at each port.
fn plan_egress(ports: &[u16]) -> Egress {
    if ports.is_empty() {
        Egress::Deny
    } else {
        Egress::Allow(ports.iter().map(|&p| ("127.0.0.1".to_owned(), p)).collect())
    }
}

/// `Auto` becomes KVM only if a probe guest runs under it (see [`accel`]); the verdict is
/// remembered in `home`'s cache for this kernel boot and qemu binary ([`accel::kvm_verdict`]).
pub fn resolve_accel(requested: Accel, scratch: &Path, home: &Home) -> Result<Accel> {
    Ok(match requested {
        Accel::Auto => {
            let runner = SystemRunner::default();
            if accel::kvm_verdict(&home.cache_dir(), qemu::QEMU, scratch, &runner)?.kvm_alive {
                Accel::Kvm
            } else {
                Accel::Tcg
            }
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_are_read_only_up_to_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("result.log");
        assert_eq!(read_bounded(&path), Ok(String::new()), "no report yet");
        std::fs::write(&path, "COWCLONE-BEGIN n\naGk=\nCOWCLONE-END n 0\n").unwrap();
        let text = read_bounded(&path).unwrap();
        assert_eq!(parse_report(&text, "n"), Some(Ok(("hi".to_owned(), 0))));
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(MAX_REPORT + 1).unwrap(); // sparse: no real 64 MiB written
        let e = read_bounded(&path).unwrap_err();
        assert!(e.contains("larger than"), "{e}");
    }

    #[test]
    fn the_report_is_found_between_markers_and_decoded() {
        let log = "noise\r\nCOWCLONE-BEGIN n1\r\naGVsbG8NCndv\r\ncmxkAP8K\r\nCOWCLONE-END n1 3\r\n";
        assert_eq!(
            parse_report(log, "n1"),
            Some(Ok(("hello\r\nworld\0\u{fffd}\n".to_owned(), 3)))
        );
        let empty = "COWCLONE-BEGIN n1\nCOWCLONE-END n1 0\n";
        assert_eq!(parse_report(empty, "n1"), Some(Ok((String::new(), 0))));
        assert_eq!(parse_report("COWCLONE-BEGIN n1\naGk=\n", "n1"), None);
        assert_eq!(parse_report(empty, "other"), None);
        assert!(matches!(
            parse_report("COWCLONE-BEGIN n1\n!!\nCOWCLONE-END n1 0\n", "n1"),
            Some(Err(_))
        ));
        assert!(matches!(
            parse_report("COWCLONE-BEGIN n1\nCOWCLONE-END n1 x\n", "n1"),
            Some(Err(_))
        ));
    }

    #[test]
    fn the_wrapper_runs_the_script_and_reports_on_the_second_port() {
        let dir = tempfile::tempdir().unwrap();
        let port = dir.path().join("ttyS1");
        let script = "#!/bin/sh\nprintf 'out\\r\\n'; echo err >&2; exit 7";
        // Run the wrapper on this host with the port and /tmp redirected into the tempdir.
        let wrapper = wrapper(script, "abc", true)
            .replace("/tmp/", &format!("{}/", dir.path().display()))
            .replace(REPORT_PORT, &port.to_string_lossy());
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(&wrapper)
            .status()
            .unwrap();
        assert!(status.success());
        let report = std::fs::read_to_string(&port).unwrap();
        assert_eq!(
            parse_report(&report, "abc"),
            Some(Ok(("out\r\nerr\n".to_owned(), 7)))
        );
        assert!(!wrapper.contains("poweroff"));
    }
}
