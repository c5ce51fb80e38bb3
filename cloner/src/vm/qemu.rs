//! The qemu-system driver: builds `qemu-system-x86_64` command lines from a [`VmSpec`], runs
//! them daemonized, and stops and queries the VM over QMP.
//!
//! The disk chain is handed over explicitly, one `-blockdev` pair (file node `fN`, format node
//! `dN`) per layer, from the base up, in qemu's JSON form (no option-syntax escaping of paths):
//! every format is pinned, every layer but the clone is read-only, each overlay names its backing
//! node, and the bottom qcow2 layer gets `"backing": null`. qemu therefore never reads a backing name or probes a format from an image
//! header.
//!
//! Runtime files live in the spec's run directory: `qemu.pid`, `qmp.sock`, `serial.log` and
//! `invocations.log` (every qemu run and QMP command, one JSON line each).

use std::fs;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use imagefmt::ImageFormat;
use serde::Serialize;
use serde_json::{json, Value};

use super::accel::{self, Resolved};
use super::pidfile;
use super::qmp::Qmp;
use super::runner::{append_log, now_ns, CommandRunner, Invocation, LogEntry};
use super::spec::{utf8, Egress, VmSpec};
use super::VmError;

/// The qemu binary used unless told otherwise.
pub const DEFAULT_BINARY: &str = "qemu-system-x86_64";
/// How long `stop` waits after the ACPI powerdown before it sends `quit`.
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long qemu may take to come up daemonized.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The guest-side address of the first `--egress allow:` endpoint (the next ones count up).
pub const EGRESS_BASE_ADDRESS: [u8; 4] = [10, 0, 2, 100];
/// Longest Unix socket path the kernel accepts (sun_path minus its NUL).
const MAX_SOCKET_PATH: usize = 107;
/// Per-message QMP timeout.
const QMP_TIMEOUT: Duration = Duration::from_secs(10);

/// The qemu-system driver.
pub struct QemuDriver<'r> {
    runner: &'r dyn CommandRunner,
    binary: String,
    probe_timeout: Duration,
}

/// A VM that was started.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Started {
    /// The daemonized qemu's pid (from the pidfile).
    pub pid: u32,
    /// The accelerator used.
    pub accel: &'static str,
    /// The command line that started it.
    pub command_line: String,
}

/// Whether a VM is running.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub enum Status {
    /// qemu is running.
    Running {
        /// Its pid.
        pid: u32,
        /// The guest's run state as QMP reports it (`running`, `paused`, `shutdown`, ...), or
        /// `unknown` if QMP did not answer.
        guest: String,
    },
    /// No qemu is running for this VM.
    Stopped,
}

/// How a stop ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stopped {
    /// It was not running.
    WasNotRunning,
    /// The guest powered off after the ACPI power button.
    PoweredDown,
    /// The guest ignored the power button; qemu was told to quit.
    Quit,
    /// qemu ignored `quit`; it was killed.
    Killed,
}

impl<'r> QemuDriver<'r> {
    /// A driver running `qemu-system-x86_64` through `runner`.
    pub fn new(runner: &'r dyn CommandRunner) -> Self {
        QemuDriver {
            runner,
            binary: DEFAULT_BINARY.into(),
            probe_timeout: accel::DEFAULT_PROBE_TIMEOUT,
        }
    }

    /// Uses another qemu binary.
    pub fn binary(mut self, binary: impl Into<String>) -> Self {
        self.binary = binary.into();
        self
    }

    /// Changes how long the KVM probe guest may take.
    pub fn probe_timeout(mut self, timeout: Duration) -> Self {
        self.probe_timeout = timeout;
        self
    }

    /// The qemu binary.
    pub fn binary_name(&self) -> &str {
        &self.binary
    }

    /// The probe a `--accel auto` start runs first (what a dry run shows).
    pub fn probe_invocation(&self, spec: &VmSpec) -> Result<Invocation, VmError> {
        accel::probe_invocation(
            &self.binary,
            &spec.run_dir.join("accel-probe.bin"),
            self.probe_timeout,
        )
    }

    /// The full qemu command line for `spec` under `accel`.
    pub fn invocation(&self, spec: &VmSpec, accel: Resolved) -> Result<Invocation, VmError> {
        spec.validate()?;
        let socket = spec.qmp_socket();
        if socket.as_os_str().len() > MAX_SOCKET_PATH {
            return Err(VmError::Unsupported(format!(
                "the QMP socket path {} is longer than {MAX_SOCKET_PATH} bytes; use a shorter clones directory",
                socket.display()
            )));
        }
        let mut args: Vec<String> = Vec::new();
        let mut push = |items: &[&str]| args.extend(items.iter().map(|s| (*s).to_owned()));
        push(&["-name", &format!("guest={}", opt(&spec.name))]);
        push(&["-no-user-config", "-nodefaults", "-accel", accel.name()]);
        if accel == Resolved::Kvm {
            push(&["-cpu", "host"]);
        }
        push(&["-m", &format!("{}M", spec.memory_mib())]);
        push(&["-smp", &spec.cpus.to_string()]);
        push(&["-display", "none"]);
        push(&["-daemonize", "-pidfile", utf8(&spec.pidfile())?]);
        push(&[
            "-chardev",
            &format!(
                "socket,id=qmp,path={},server=on,wait=off",
                opt_path(&socket)?
            ),
            "-mon",
            "chardev=qmp,mode=control",
        ]);
        let serials =
            std::iter::once(spec.serial_log()).chain(spec.extra_serial_logs.iter().cloned());
        for (i, log) in serials.enumerate() {
            push(&[
                "-chardev",
                &format!("file,id=serial{i},path={}", opt_path(&log)?),
                "-serial",
                &format!("chardev:serial{i}"),
            ]);
        }
        for blockdev in chain_blockdevs(spec)? {
            push(&["-blockdev", &blockdev]);
        }
        push(&["-device", "virtio-blk-pci,drive=d0,bootindex=1"]);
        for (i, drive) in spec.extra_drives.iter().enumerate() {
            let format_node = json!({
                "driver": format_driver(drive.format),
                "node-name": format!("x{i}"),
                "file": format!("xf{i}"),
                "read-only": drive.read_only,
            });
            push(&[
                "-blockdev",
                &file_node(&format!("xf{i}"), &drive.path, drive.read_only)?.to_string(),
                "-blockdev",
                &format_node.to_string(),
                "-device",
                &format!("virtio-blk-pci,drive=x{i}"),
            ]);
        }
        if let Some(netdev) = netdev(spec) {
            push(&["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"]);
        }
        if let Some(boot) = &spec.kernel {
            push(&["-kernel", utf8(&boot.kernel)?]);
            if let Some(initrd) = &boot.initrd {
                push(&["-initrd", utf8(initrd)?]);
            }
            if let Some(append) = &boot.append {
                push(&["-append", append]);
            }
        }
        Ok(Invocation::new(&self.binary, args).with_timeout(START_TIMEOUT))
    }

    /// Decides the accelerator (running the KVM probe for `auto`).
    pub fn resolve_accel(&self, spec: &VmSpec) -> Result<Resolved, VmError> {
        accel::resolve(
            spec.accel,
            &self.binary,
            self.runner,
            &spec.run_dir,
            self.probe_timeout,
        )
    }

    /// Starts the VM daemonized and returns once qemu has written its pidfile.
    pub fn start(&self, spec: &VmSpec) -> Result<Started, VmError> {
        spec.validate()?;
        if let Status::Running { pid, .. } = self.status(spec) {
            return Err(VmError::AlreadyRunning {
                name: spec.name.clone(),
                pid,
            });
        }
        fs::create_dir_all(&spec.run_dir)
            .map_err(VmError::io("creating the run directory", &spec.run_dir))?;
        // Leftovers of a VM that is not running: qemu would refuse to bind an existing socket.
        for stale in [spec.pidfile(), spec.qmp_socket()] {
            let _ = fs::remove_file(stale);
        }
        let accel = self.resolve_accel(spec)?;
        let invocation = self.invocation(spec, accel)?;
        self.runner.run(&invocation)?.require_success(&invocation)?;
        let pid = pidfile::read_pid(&spec.pidfile()).ok_or_else(|| VmError::Io {
            step: "reading the pidfile",
            path: spec.pidfile(),
            source: std::io::ErrorKind::NotFound.into(),
        })?;
        Ok(Started {
            pid,
            accel: accel.name(),
            command_line: invocation.command_line(),
        })
    }

    /// Whether the VM is running, and the guest's run state if so.
    pub fn status(&self, spec: &VmSpec) -> Status {
        let Some(pid) = self.live_pid(spec) else {
            return Status::Stopped;
        };
        let guest = Qmp::connect(&spec.qmp_socket(), QMP_TIMEOUT)
            .and_then(|mut qmp| qmp.execute("query-status", None))
            .ok()
            .and_then(|v| v.get("status").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| "unknown".into());
        Status::Running { pid, guest }
    }

    /// The pid of the VM's qemu if it is running.
    pub fn live_pid(&self, spec: &VmSpec) -> Option<u32> {
        let pid = pidfile::read_pid(&spec.pidfile())?;
        let socket = spec.qmp_socket();
        pidfile::is_ours(pid, &socket.to_string_lossy()).then_some(pid)
    }

    /// Waits up to `timeout` for the VM's qemu to exit; true if it did.
    pub fn wait_stopped(&self, spec: &VmSpec, timeout: Duration) -> bool {
        let started = Instant::now();
        loop {
            if self.live_pid(spec).is_none() {
                return true;
            }
            if started.elapsed() >= timeout {
                return false;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the VM: ACPI powerdown, then `quit` if the guest has not powered off after
    /// `timeout`, then SIGKILL if qemu is still there 10 s later. Removes the pidfile and socket.
    pub fn stop(&self, spec: &VmSpec, timeout: Duration) -> Result<Stopped, VmError> {
        let Some(pid) = self.live_pid(spec) else {
            return Ok(Stopped::WasNotRunning);
        };
        let outcome = match self.qmp(spec, "system_powerdown") {
            Ok(()) if self.wait_stopped(spec, timeout) => Stopped::PoweredDown,
            _ => match self.qmp(spec, "quit") {
                Ok(()) if self.wait_stopped(spec, Duration::from_secs(10)) => Stopped::Quit,
                _ => {
                    pidfile::kill(pid);
                    self.log_action(spec, "kill", &["-KILL", &pid.to_string()])?;
                    self.wait_stopped(spec, Duration::from_secs(10));
                    Stopped::Killed
                }
            },
        };
        for file in [spec.pidfile(), spec.qmp_socket()] {
            let _ = fs::remove_file(file);
        }
        Ok(outcome)
    }

    /// Sends one QMP command (no arguments), logging it.
    fn qmp(&self, spec: &VmSpec, command: &str) -> Result<(), VmError> {
        let result = Qmp::connect(&spec.qmp_socket(), QMP_TIMEOUT)
            .and_then(|mut qmp| qmp.execute(command, None));
        // `quit` may close the socket before its reply arrives: that is success.
        let result = match result {
            Err(VmError::Qmp { step: "reply", .. }) if command == "quit" => Ok(Value::Null),
            other => other,
        };
        self.log_action(spec, "qmp", &[command])?;
        result.map(drop)
    }

    fn log_action(&self, spec: &VmSpec, program: &str, args: &[&str]) -> Result<(), VmError> {
        let invocation = Invocation::new(program, args.iter().copied());
        append_log(
            &spec.invocation_log(),
            &LogEntry {
                at_ns: now_ns(),
                invocation: &invocation,
                code: None,
                timed_out: false,
                elapsed_ms: 0,
                error: None,
            },
        )
    }
}

/// The `-blockdev` values (JSON) for the boot chain, base first.
fn chain_blockdevs(spec: &VmSpec) -> Result<Vec<String>, VmError> {
    let mut out = Vec::new();
    let last = spec.disks.len() - 1;
    for (i, layer) in spec.disks.iter().enumerate().rev() {
        let read_only = i > 0;
        let mut format_node = json!({
            "driver": format_driver(layer.format),
            "node-name": format!("d{i}"),
            "file": format!("f{i}"),
            "read-only": read_only,
        });
        match layer.format {
            ImageFormat::Qcow2 if i < last => format_node["backing"] = json!(format!("d{}", i + 1)),
            // Never let qemu open the backing file a header names.
            ImageFormat::Qcow2 => format_node["backing"] = Value::Null,
            _ if i < last => {
                return Err(VmError::Unsupported(format!(
                    "{} is a {} image with a backing layer below it: qemu-system cannot open {} \
                     differencing images (the VirtualBox driver can)",
                    layer.path.display(),
                    layer.format,
                    layer.format
                )))
            }
            _ => {}
        }
        out.push(file_node(&format!("f{i}"), &layer.path, read_only)?.to_string());
        out.push(format_node.to_string());
    }
    Ok(out)
}

/// A `file` protocol node.
fn file_node(node: &str, path: &Path, read_only: bool) -> Result<Value, VmError> {
    Ok(json!({
        "driver": "file",
        "node-name": node,
        "filename": utf8(path)?,
        "read-only": read_only,
    }))
}

/// The `-netdev` value, or `None` when the VM gets no network at all (egress denied and no
/// ingress).
fn netdev(spec: &VmSpec) -> Option<String> {
    let allowed = match &spec.egress {
        Egress::Allow(endpoints) => endpoints.as_slice(),
        Egress::Deny => &[],
    };
    if spec.ingress.is_empty() && allowed.is_empty() {
        return None;
    }
    // restrict=on: the guest reaches neither the host nor the outside world, except through
    // the guestfwd endpoints listed; hostfwd ingress keeps working.
    let mut netdev = "user,id=net0,restrict=on".to_owned();
    for forward in &spec.ingress {
        netdev.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{}-:{}",
            forward.host_port, forward.guest_port
        ));
    }
    let [a, b, c, d] = EGRESS_BASE_ADDRESS;
    for (i, endpoint) in allowed.iter().enumerate() {
        netdev.push_str(&format!(
            ",guestfwd=tcp:{a}.{b}.{c}.{}:{}-tcp:{}:{}",
            d as usize + i,
            endpoint.port,
            endpoint.host,
            endpoint.port
        ));
    }
    Some(netdev)
}

fn format_driver(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Vdi => "vdi",
        _ => "raw",
    }
}

/// A value for qemu's `key=value,...` option syntax: commas are doubled.
fn opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn opt_path(path: &Path) -> Result<String, VmError> {
    Ok(opt(utf8(path)?))
}

#[cfg(test)]
mod tests {
    use super::super::runner::RecordingRunner;
    use super::super::spec::{DiskLayer, ExtraDrive, KernelBoot};
    use super::*;

    fn spec() -> VmSpec {
        let mut spec = VmSpec::new(
            "web,1",
            "/clones/web1",
            vec![
                DiskLayer {
                    path: "/clones/web1/disk.qcow2".into(),
                    format: ImageFormat::Qcow2,
                },
                DiskLayer {
                    path: "/bases/mid.qcow2".into(),
                    format: ImageFormat::Qcow2,
                },
                DiskLayer {
                    path: "/bases/deb,12.raw".into(),
                    format: ImageFormat::Raw,
                },
            ],
        );
        spec.memory = 256 << 20;
        spec.cpus = 2;
        spec
    }

    #[test]
    fn the_chain_is_passed_base_first_with_formats_pinned_and_lower_layers_read_only() {
        // (The shell-quoted form is what --dry-run prints; the raw words are compared here.)
        let runner = RecordingRunner::new();
        let driver = QemuDriver::new(&runner);
        let mut spec = spec();
        spec.ingress = vec!["2222:22".parse().unwrap()];
        spec.egress = "allow:mirror.example:80".parse().unwrap();
        spec.extra_drives.push(ExtraDrive {
            path: "/clones/web1/seed.img".into(),
            format: ImageFormat::Raw,
            read_only: true,
        });
        spec.kernel = Some(KernelBoot {
            kernel: "/k".into(),
            initrd: Some("/i".into()),
            append: Some("console=ttyS0 quiet".into()),
        });
        let invocation = driver.invocation(&spec, Resolved::Tcg).unwrap();
        let line = format!("{} {}", invocation.program, invocation.args.join(" "));
        let expected = [
            r#"qemu-system-x86_64 -name guest=web,,1 -no-user-config -nodefaults -accel tcg"#,
            r#"-m 256M -smp 2 -display none -daemonize -pidfile /clones/web1/qemu.pid"#,
            r#"-chardev socket,id=qmp,path=/clones/web1/qmp.sock,server=on,wait=off -mon chardev=qmp,mode=control"#,
            r#"-chardev file,id=serial0,path=/clones/web1/serial.log -serial chardev:serial0"#,
            r#"-blockdev {"driver":"file","filename":"/bases/deb,12.raw","node-name":"f2","read-only":true}"#,
            r#"-blockdev {"driver":"raw","file":"f2","node-name":"d2","read-only":true}"#,
            r#"-blockdev {"driver":"file","filename":"/bases/mid.qcow2","node-name":"f1","read-only":true}"#,
            r#"-blockdev {"backing":"d2","driver":"qcow2","file":"f1","node-name":"d1","read-only":true}"#,
            r#"-blockdev {"driver":"file","filename":"/clones/web1/disk.qcow2","node-name":"f0","read-only":false}"#,
            r#"-blockdev {"backing":"d1","driver":"qcow2","file":"f0","node-name":"d0","read-only":false}"#,
            r#"-device virtio-blk-pci,drive=d0,bootindex=1"#,
            r#"-blockdev {"driver":"file","filename":"/clones/web1/seed.img","node-name":"xf0","read-only":true}"#,
            r#"-blockdev {"driver":"raw","file":"xf0","node-name":"x0","read-only":true} -device virtio-blk-pci,drive=x0"#,
            r#"-netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22,guestfwd=tcp:10.0.2.100:80-tcp:mirror.example:80"#,
            r#"-device virtio-net-pci,netdev=net0"#,
            r#"-kernel /k -initrd /i -append console=ttyS0 quiet"#,
        ]
        .join(" ");
        assert_eq!(line, expected);
        assert!(
            runner.recorded().is_empty(),
            "building a command line runs nothing"
        );
    }

    #[test]
    fn a_qcow2_base_gets_backing_null_and_kvm_gets_the_host_cpu() {
        let runner = RecordingRunner::new();
        let mut spec = spec();
        spec.disks.truncate(2);
        let args = QemuDriver::new(&runner)
            .invocation(&spec, Resolved::Kvm)
            .unwrap()
            .args;
        assert!(args.contains(
            &r#"{"backing":null,"driver":"qcow2","file":"f1","node-name":"d1","read-only":true}"#
                .to_owned()
        ));
        assert!(args
            .windows(4)
            .any(|w| w == ["-accel", "kvm", "-cpu", "host"]));
        assert!(
            !args.iter().any(|a| a == "-netdev"),
            "no network unless asked"
        );
    }

    #[test]
    fn vdi_differencing_chains_are_refused_and_long_socket_paths_too() {
        let runner = RecordingRunner::new();
        let driver = QemuDriver::new(&runner);
        let mut spec = spec();
        spec.disks[0].format = ImageFormat::Vdi;
        let err = driver.invocation(&spec, Resolved::Tcg).unwrap_err();
        assert!(err.to_string().contains("VirtualBox driver"), "{err}");
        let mut spec = self::spec();
        spec.run_dir = Path::new("/").join("x".repeat(120));
        assert!(matches!(
            driver.invocation(&spec, Resolved::Tcg),
            Err(VmError::Unsupported(_))
        ));
    }

    #[test]
    fn a_stopped_vm_reports_stopped_and_stop_is_a_no_op() {
        let dir = tempfile::tempdir().unwrap();
        let runner = RecordingRunner::new();
        let driver = QemuDriver::new(&runner);
        let mut spec = spec();
        spec.run_dir = dir.path().to_owned();
        // A pidfile naming a live process that is not this VM's qemu (pid reuse) is not trusted.
        fs::write(spec.pidfile(), std::process::id().to_string()).unwrap();
        assert_eq!(driver.status(&spec), Status::Stopped);
        assert_eq!(
            driver.stop(&spec, Duration::from_secs(1)).unwrap(),
            Stopped::WasNotRunning
        );
    }
}
