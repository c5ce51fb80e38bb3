//! The qemu-system driver: the command line, started as a daemon with a pidfile, a QMP socket
//! and a serial log in the clone's directory; stopped by ACPI powerdown, then quit.
//!
//! The disk chain is passed explicitly, one `-blockdev` pair (file node, format node) per image,
//! base first: every format is pinned, every layer below the top is read-only, and each qcow2
//! node names the node below it as `"backing"` (the bottom one `"backing": null`), so qemu
//! follows no path written in an image header and probes no format.
//!
//! The `-blockdev` values are JSON objects, not `key=value` lists: qemu's dotted-key syntax has
//! no null, and `backing=null` there names a node called `null` ("Cannot find device='null' nor
//! node-name='null'", qemu 7.2), so a clone of a qcow2 base would not start. JSON also carries
//! any path without escaping. The serial log and the QMP socket are `-chardev` options, where a
//! comma in a path is escaped by doubling; `-serial file:PATH` would take the doubled comma
//! literally.

use std::path::Path;
use std::time::{Duration, Instant};

use imagefmt::ImageFormat;
use serde_json::{json, Value};

use super::runner::{log_line, shell_quote, CommandRunner, Invocation};
use super::spec::{self, Accel, Egress, VmSpec};
use super::{io, qmp::Qmp, relay, Result, VmError};

/// The qemu binary for x86-64 guests.
pub const QEMU: &str = "qemu-system-x86_64";

/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// How long `stop` waits for the guest to power down before asking qemu to quit.
pub const POWERDOWN_TIMEOUT: Duration = Duration::from_secs(30);

/// Escapes a value for qemu's `key=value,...` option syntax (a comma is doubled).
fn opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn utf8(path: &Path) -> Result<&str> {
    path.to_str()
        .ok_or_else(|| VmError::Invalid(format!("{} is not UTF-8", path.display())))
}

fn path_opt(path: &Path) -> Result<String> {
    utf8(path).map(opt)
}

/// A `-blockdev` file-protocol node (JSON).
fn file_node(node: &str, path: &Path, read_only: bool) -> Result<Value> {
    Ok(json!({
        "driver": "file",
        "node-name": node,
        "filename": utf8(path)?,
        "read-only": read_only,
    }))
}

/// The block driver name of a format.
fn driver(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Qcow2 => "qcow2",
        ImageFormat::Vdi => "vdi",
        ImageFormat::Raw => "raw",
    }
}

/// Refuses chains qemu cannot open as given: a VDI differencing image (qemu's vdi driver refuses
/// them; use the VirtualBox driver), a layer that would need a layer below it but has none, or
/// a raw or VDI layer with something below it.
fn check_chain(spec: &VmSpec) -> Result<()> {
    if spec.disks.is_empty() {
        return Err(VmError::Invalid("no disk to boot from".into()));
    }
    for (i, layer) in spec.disks.iter().enumerate() {
        let has_below = i + 1 < spec.disks.len();
        match layer.format {
            ImageFormat::Qcow2 => {}
            ImageFormat::Vdi | ImageFormat::Raw if has_below => {
                let what = if layer.format == ImageFormat::Vdi {
                    "a VDI differencing image (qemu cannot open those; use the VirtualBox driver)"
                } else {
                    "a raw image with an image below it"
                };
                return Err(VmError::Invalid(format!(
                    "{} is {what}",
                    layer.path.display()
                )));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The qemu-system command line that runs `spec` as a daemon (pidfile, QMP socket and serial log
/// in its runtime directory). `accel` must be resolved (not `Auto`).
pub fn command_line(spec: &VmSpec, accel: Accel) -> Result<Invocation> {
    check_chain(spec)?;
    let socket = spec.qmp_socket();
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(VmError::Invalid(format!(
            "the QMP socket path {} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket \
             allows; use a registry home with a shorter path",
            socket.display()
        )));
    }
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    let accel = match accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
        Accel::Auto => return Err(VmError::Invalid("accelerator not resolved".into())),
    };
    let memory_mib = spec.memory.div_ceil(1 << 20).to_string();
    let cpus = spec.cpus.to_string();
    push(&["-name", &opt(&spec.name), "-accel", accel, "-machine", "pc"]);
    push(&["-m", &memory_mib, "-smp", &cpus]);
    push(&["-nodefaults", "-no-user-config", "-display", "none"]);
    let serial = format!("file,id=serial0,path={}", path_opt(&spec.serial_log())?);
    let qmp = format!(
        "socket,id=qmp,path={},server=on,wait=off",
        path_opt(&spec.qmp_socket())?
    );
    // -pidfile takes its argument verbatim (no option syntax).
    let pidfile = spec.pidfile();
    let pidfile = utf8(&pidfile)?;
    push(&["-chardev", &serial, "-serial", "chardev:serial0"]);
    for (k, log) in spec.extra_serial_logs.iter().enumerate() {
        let id = format!("serial{}", k + 1);
        let chardev = format!("file,id={id},path={}", path_opt(log)?);
        push(&["-chardev", &chardev, "-serial", &format!("chardev:{id}")]);
    }
    push(&["-chardev", &qmp, "-mon", "chardev=qmp,mode=control"]);
    push(&["-pidfile", pidfile, "-daemonize"]);

    // The chain, base first so that each node can name the one below it.
    let last = spec.disks.len() - 1;
    for (i, layer) in spec.disks.iter().enumerate().rev() {
        let file = file_node(&format!("file{i}"), &layer.path, layer.read_only)?;
        let mut format = json!({
            "driver": driver(layer.format),
            "node-name": format!("disk{i}"),
            "file": format!("file{i}"),
            "read-only": layer.read_only,
        });
        if layer.format == ImageFormat::Qcow2 {
            format["backing"] = if i < last {
                json!(format!("disk{}", i + 1))
            } else {
                Value::Null
            };
        }
        push(&[
            "-blockdev",
            &file.to_string(),
            "-blockdev",
            &format.to_string(),
        ]);
    }
    push(&["-device", "virtio-blk-pci,drive=disk0"]);
    for (j, extra) in spec.extra_drives.iter().enumerate() {
        let file = file_node(&format!("extrafile{j}"), extra, true)?;
        let raw = json!({
            "driver": "raw",
            "node-name": format!("extra{j}"),
            "file": format!("extrafile{j}"),
            "read-only": true,
        });
        let device = format!("virtio-blk-pci,drive=extra{j}");
        push(&[
            "-blockdev",
            &file.to_string(),
            "-blockdev",
            &raw.to_string(),
            "-device",
            &device,
        ]);
    }

    // User-mode networking: restricted unless egress says otherwise; forwards bound to loopback.
    let mut netdev = String::from("user,id=net0");
    match &spec.egress {
        Egress::Deny => netdev.push_str(",restrict=on"),
        Egress::Allow(allowed) => {
            netdev.push_str(",restrict=on");
            // One relay process per guest connection (`cmd:`), not a `tcp:` character device:
            // qemu connects that once at start, refuses to start if the endpoint is down, and
            // shares the one stream between all guest connections.
            let relay = spec.egress_relay.as_deref().ok_or_else(|| {
                VmError::Invalid("--egress allow needs the relay program (cowclone)".into())
            })?;
            let relay = shell_quote(utf8(relay)?);
            if allowed.len() > 100 {
                return Err(VmError::Invalid("at most 100 egress destinations".into()));
            }
            for (k, (host, port)) in allowed.iter().enumerate() {
                let command = format!("{relay} {} {} {port}", relay::SUBCOMMAND, shell_quote(host));
                netdev.push_str(&format!(
                    ",guestfwd=tcp:10.0.2.{}:{port}-cmd:{}",
                    100 + k,
                    opt(&command)
                ));
            }
        }
    }
    for forward in &spec.ingress {
        netdev.push_str(&format!(
            ",hostfwd=tcp:127.0.0.1:{}-:{}",
            forward.host, forward.guest
        ));
    }
    push(&["-netdev", &netdev, "-device", "virtio-net-pci,netdev=net0"]);

    if let Some(boot) = &spec.kernel {
        push(&["-kernel", &path_opt(&boot.kernel)?]);
        if let Some(initrd) = &boot.initrd {
            push(&["-initrd", &path_opt(initrd)?]);
        }
        if let Some(append) = &boot.append {
            push(&["-append", append]);
        }
    }
    Ok(Invocation::new(QEMU, args))
}

/// The running state of a clone's qemu.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmState {
    /// qemu runs with this pid.
    Running(i32),
    /// No live qemu for this clone (no pidfile, or a stale one).
    Stopped,
}

/// Reads the clone's pidfile; `Running` only if that process is alive and is the qemu started
/// for this directory (see [`crate::runtime::running_pid`]).
pub fn state(run_dir: &Path) -> VmState {
    match crate::runtime::running_pid(run_dir) {
        Some(pid) => VmState::Running(pid),
        None => VmState::Stopped,
    }
}

/// Starts `spec` with `runner` (resolving `Auto` beforehand is the caller's job: see
/// [`super::accel::probe_kvm`]). Refuses a clone that is already running; removes stale
/// runtime files first.
pub fn start(spec: &VmSpec, accel: Accel, runner: &dyn CommandRunner) -> Result<Invocation> {
    if let VmState::Running(pid) = state(&spec.run_dir) {
        return Err(VmError::AlreadyRunning {
            name: spec.name.clone(),
            pid,
        });
    }
    let invocation = command_line(spec, accel)?;
    make_private(&spec.run_dir)?;
    for stale in [spec.pidfile(), spec.qmp_socket(), spec.serial_log()] {
        match std::fs::remove_file(&stale) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("removing {}", stale.display()))(e)),
        }
    }
    runner.run(&invocation)?;
    Ok(invocation)
}

/// Makes `run_dir` private (0700) if it is not: the QMP socket in it controls the VM, and the
/// pidfile and logs are nobody else's business. (Clone directories are made 0700; this covers
/// those made by older versions.)
fn make_private(run_dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(run_dir)
        .map_err(io(format!("reading metadata of {}", run_dir.display())))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(run_dir, std::fs::Permissions::from_mode(0o700))
            .map_err(io(format!("making {} private", run_dir.display())))?;
    }
    Ok(())
}

/// How a stop went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running.
    WasNotRunning,
    /// The guest powered off after the ACPI request.
    PoweredDown,
    /// The guest ignored the request; qemu was told to quit.
    Quit,
    /// qemu did not answer; it was killed.
    Killed,
}

/// Stops the clone's qemu: ACPI powerdown through QMP, waiting up to `timeout`; then QMP
/// `quit`; then SIGKILL if qemu is still there.
pub fn stop(run_dir: &Path, timeout: Duration) -> Result<Stopped> {
    let VmState::Running(pid) = state(run_dir) else {
        return Ok(Stopped::WasNotRunning);
    };
    let socket = spec::qmp_socket(run_dir);
    let log = spec::command_log(run_dir);
    // Every request is logged with its outcome, like the commands in the same log.
    let send = |qmp: &mut Qmp, command: &str| -> Result<bool> {
        let sent = qmp.execute(command, None);
        let outcome = match &sent {
            Ok(_) => "ok".to_owned(),
            Err(e) => format!("error: {e}"),
        };
        log_line(
            &log,
            &format!("QMP {} {command}", socket.display()),
            &outcome,
        )?;
        Ok(sent.is_ok())
    };
    let qmp = Qmp::connect(&socket);
    if let Ok(mut qmp) = qmp {
        if send(&mut qmp, "system_powerdown")? && wait_gone(run_dir, timeout) {
            return Ok(Stopped::PoweredDown);
        }
        send(&mut qmp, "quit")?;
        if wait_gone(run_dir, Duration::from_secs(5)) {
            return Ok(Stopped::Quit);
        }
    }
    if let Some(pid) = rustix::process::Pid::from_raw(pid) {
        let killed = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
        let outcome = killed.map_or_else(|e| format!("error: {e}"), |()| "ok".into());
        log_line(
            &log,
            &format!("kill -KILL {}", pid.as_raw_nonzero()),
            &outcome,
        )?;
    }
    wait_gone(run_dir, Duration::from_secs(5));
    Ok(Stopped::Killed)
}

/// Waits until the clone's qemu is gone, up to `timeout`.
pub fn wait_gone(run_dir: &Path, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if state(run_dir) == VmState::Stopped {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::vm::spec::{DiskLayer, KernelBoot, PortForward};

    fn spec() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            run_dir: PathBuf::from("/h/clones/web-1"),
            disks: vec![
                DiskLayer {
                    path: "/h/clones/web-1/disk.qcow2".into(),
                    format: ImageFormat::Qcow2,
                    read_only: false,
                },
                DiskLayer {
                    path: "/srv/base,v1.raw".into(),
                    format: ImageFormat::Raw,
                    read_only: true,
                },
            ],
            memory: 256 << 20,
            cpus: 2,
            accel: Accel::Tcg,
            ingress: vec![PortForward {
                host: 8080,
                guest: 80,
            }],
            egress: Egress::Deny,
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinuz".into(),
                initrd: None,
                append: Some("console=ttyS0".into()),
            }),
            extra_drives: vec![],
            extra_serial_logs: vec![],
            egress_relay: None,
        }
    }

    #[test]
    fn the_chain_is_explicit_base_first_with_formats_pinned() {
        let line = command_line(&spec(), Accel::Tcg).unwrap().shell_line();
        let args = command_line(&spec(), Accel::Tcg).unwrap().args;
        let expected_disks = [
            "-blockdev",
            r#"{"driver":"file","filename":"/srv/base,v1.raw","node-name":"file1","read-only":true}"#,
            "-blockdev",
            r#"{"driver":"raw","file":"file1","node-name":"disk1","read-only":true}"#,
            "-blockdev",
            r#"{"driver":"file","filename":"/h/clones/web-1/disk.qcow2","node-name":"file0","read-only":false}"#,
            "-blockdev",
            r#"{"backing":"disk1","driver":"qcow2","file":"file0","node-name":"disk0","read-only":false}"#,
            "-device",
            "virtio-blk-pci,drive=disk0",
        ];
        assert!(
            args.windows(expected_disks.len())
                .any(|w| w == expected_disks),
            "{line}"
        );
        let runtime = [
            "-chardev",
            "file,id=serial0,path=/h/clones/web-1/serial.log",
            "-serial",
            "chardev:serial0",
            "-chardev",
            "socket,id=qmp,path=/h/clones/web-1/qmp.sock,server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
        ];
        assert!(args.windows(runtime.len()).any(|w| w == runtime), "{line}");
        assert!(line.contains("-accel tcg"), "{line}");
        assert!(line.contains("-m 256 -smp 2"), "{line}");
        assert!(
            line.contains("-pidfile /h/clones/web-1/qemu.pid -daemonize"),
            "{line}"
        );
        assert!(
            line.contains("-netdev user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:8080-:80"),
            "{line}"
        );
        assert!(
            line.contains("-kernel /boot/vmlinuz -append console=ttyS0"),
            "{line}"
        );
    }

    #[test]
    fn egress_runs_one_relay_per_connection_and_needs_the_relay_program() {
        let mut s = spec();
        s.egress = "allow:mirror.example:443,10.1.2.3:80".parse().unwrap();
        assert!(command_line(&s, Accel::Tcg).is_err(), "no relay program");
        s.egress_relay = Some("/opt/cow,clone/bin/cowclone".into());
        let args = command_line(&s, Accel::Tcg).unwrap().args;
        let netdev = &args[args.iter().position(|a| a == "-netdev").unwrap() + 1];
        assert_eq!(
            netdev,
            "user,id=net0,restrict=on\
             ,guestfwd=tcp:10.0.2.100:443-cmd:/opt/cow,,clone/bin/cowclone relay mirror.example 443\
             ,guestfwd=tcp:10.0.2.101:80-cmd:/opt/cow,,clone/bin/cowclone relay 10.1.2.3 80\
             ,hostfwd=tcp:127.0.0.1:8080-:80"
        );
    }

    #[test]
    fn refuses_what_qemu_cannot_open_as_given() {
        let mut s = spec();
        s.disks[0].format = ImageFormat::Vdi;
        let e = command_line(&s, Accel::Tcg).unwrap_err().to_string();
        assert!(e.contains("VirtualBox"), "{e}");
        let mut s = spec();
        s.disks.truncate(1);
        let args = command_line(&s, Accel::Tcg).unwrap().args;
        // JSON null: in key=value syntax `backing=null` would name a node called "null".
        assert!(
            args.contains(
                &r#"{"backing":null,"driver":"qcow2","file":"file0","node-name":"disk0","read-only":false}"#
                    .to_owned()
            ),
            "{args:?}"
        );
        assert!(command_line(&spec(), Accel::Auto).is_err());
        let mut s = spec();
        s.run_dir = PathBuf::from("/h").join("c".repeat(100));
        let e = command_line(&s, Accel::Tcg).unwrap_err().to_string();
        assert!(e.contains("shorter path"), "{e}");
    }

    #[test]
    fn start_makes_an_old_world_readable_run_dir_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let mut s = spec();
        s.run_dir = dir.path().join("vm");
        std::fs::create_dir(&s.run_dir).unwrap();
        std::fs::set_permissions(&s.run_dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let runner = crate::vm::RecordingRunner::default();
        start(&s, Accel::Tcg, &runner).unwrap();
        assert_eq!(runner.calls().len(), 1);
        let mode = std::fs::metadata(&s.run_dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700);
    }

    #[test]
    fn a_missing_pidfile_or_a_foreign_pid_is_stopped() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(state(dir.path()), VmState::Stopped);
        // Our own pid is alive but its command line does not name this pidfile.
        std::fs::write(spec::pidfile(dir.path()), std::process::id().to_string()).unwrap();
        assert_eq!(state(dir.path()), VmState::Stopped);
    }
}

/// The runtime state `ls` shows for registered images: `running` or `stopped` for clones (from
/// their directory's pidfile), nothing for bases.
#[derive(Debug, Clone, Copy, Default)]
pub struct QemuStateProbe;

impl crate::runtime::StateProbe for QemuStateProbe {
    fn state(&self, record: &crate::ImageRecord) -> Option<String> {
        let dir = record.dir.as_deref()?;
        Some(match state(dir) {
            VmState::Running(_) => "running".into(),
            VmState::Stopped => "stopped".into(),
        })
    }
}
