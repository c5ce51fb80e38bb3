//! The cloud-hypervisor driver: cloud-hypervisor's own command line for a clone, run detached
//! (pidfile and logs in the clone's directory), stopped through its API socket with `ch-remote`.
//!
//! cloud-hypervisor opens one `--disk` image and follows the backing file named in a qcow2
//! header itself, and only when the disk says `backing_files=on` (off by default since v50.1 /
//! v51.0). It takes the backing file's format from the header's backing-format extension and
//! probes it when that is missing, so this driver reads every header of the chain first: each
//! must name exactly the next image of the registered chain, with its format pinned; anything
//! else is refused, as are VDI images (cloud-hypervisor reads raw, qcow2, VHD, VHDX, VMDK).
//! The top image's format is given as `image_type=`, so nothing is probed there either.
//!
//! cloud-hypervisor has no user-mode networking: `--net` takes a TAP device, a vhost-user socket
//! or file descriptors, so port forwards are refused and a VM gets no network device at all.
//!
//! cloud-hypervisor cannot be installed on the build machine (no Debian package; nested KVM
//! guests hang there): the command lines are checked against its documented CLI only
//! (docs/drivers/cloud-hypervisor.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use imagefmt::ImageFormat;

use super::daemon;
use super::qemu::{Stopped, VmState};
use super::runner::{CommandRunner, Invocation};
use super::spec::{Accel, Egress, VmSpec};
use super::{Result, VmError};

/// The cloud-hypervisor binary.
pub const PROGRAM: &str = "cloud-hypervisor";
/// cloud-hypervisor's API client.
pub const REMOTE: &str = "ch-remote";

/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// What the guest boots: a kernel (`--kernel`, with `--initramfs` and `--cmdline`) or firmware.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Payload {
    /// The spec's direct kernel boot.
    Kernel,
    /// A firmware image (`--firmware`, e.g. rust-hypervisor-firmware or CLOUDHV.fd).
    Firmware(PathBuf),
}

/// The API socket in a clone's runtime directory.
pub fn api_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("cloud-hypervisor.sock")
}

/// The pidfile cowclone writes for the cloud-hypervisor process.
pub fn pidfile(run_dir: &Path) -> PathBuf {
    run_dir.join("cloud-hypervisor.pid")
}

/// A value for cloud-hypervisor's `key=value,…` option syntax: quoted when it holds a comma,
/// a bracket or a quote-free special character, refused when it holds a double quote (which
/// the syntax cannot carry).
fn value(path: &Path) -> Result<String> {
    let text = path
        .to_str()
        .ok_or_else(|| VmError::Invalid(format!("{} is not UTF-8", path.display())))?;
    if text.contains('"') {
        return Err(VmError::Invalid(format!(
            "{text} contains a double quote, which cloud-hypervisor's option syntax cannot carry"
        )));
    }
    if text.contains([',', '[', ']', '=']) {
        Ok(format!("\"{text}\""))
    } else {
        Ok(text.to_owned())
    }
}

/// The `image_type=` name of a format cloud-hypervisor opens, or a refusal.
fn image_type(path: &Path, format: ImageFormat) -> Result<&'static str> {
    match format {
        ImageFormat::Raw => Ok("raw"),
        ImageFormat::Qcow2 => Ok("qcow2"),
        ImageFormat::Vdi => Err(VmError::Invalid(format!(
            "{} is VDI, which cloud-hypervisor cannot open (raw, qcow2, VHD, VHDX, VMDK only); \
             use --driver virtualbox, or clone a raw or qcow2 base",
            path.display()
        ))),
    }
}

/// The `--disk` values: the clone's top image (the chain below it through its own qcow2
/// headers, `backing_files=on` only when there is a chain), then the extra drives read-only.
fn disks(spec: &VmSpec) -> Result<Vec<String>> {
    let top = spec
        .disks
        .first()
        .ok_or_else(|| VmError::Invalid("no disk to boot from".into()))?;
    for (i, layer) in spec.disks.iter().enumerate() {
        image_type(&layer.path, layer.format)?;
        if layer.format == ImageFormat::Raw && i + 1 < spec.disks.len() {
            return Err(VmError::Invalid(format!(
                "{} is a raw image with an image below it",
                layer.path.display()
            )));
        }
    }
    let mut values = vec![format!(
        "path={},image_type={},backing_files={}",
        value(&top.path)?,
        image_type(&top.path, top.format)?,
        if spec.disks.len() > 1 { "on" } else { "off" }
    )];
    for drive in &spec.extra_drives {
        values.push(format!("path={},image_type=raw,readonly=on", value(drive)?));
    }
    Ok(values)
}

/// cloud-hypervisor's command line for `spec`, booting `payload`. Pure: the images are not read
/// (see [`check_chain_headers`]).
pub fn command_line(spec: &VmSpec, payload: &Payload) -> Result<Invocation> {
    if spec.accel == Accel::Tcg {
        return Err(VmError::Invalid(
            "cloud-hypervisor runs guests only under KVM (or MSHV): --accel tcg needs --driver \
             qemu"
                .into(),
        ));
    }
    if !spec.ingress.is_empty() {
        return Err(VmError::Invalid(
            "cloud-hypervisor has no user-mode networking to forward ports with (its --net \
             takes a TAP device or vhost-user): --ingress needs --driver qemu"
                .into(),
        ));
    }
    if let Egress::Allow(_) = spec.egress {
        return Err(VmError::Invalid(
            "cloud-hypervisor cannot limit a guest to chosen destinations: --egress allow needs \
             --driver qemu"
                .into(),
        ));
    }
    if !spec.extra_serial_logs.is_empty() {
        return Err(VmError::Invalid(
            "cloud-hypervisor has one serial port: extra serial logs need --driver qemu".into(),
        ));
    }
    let socket = api_socket(&spec.run_dir);
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(VmError::Invalid(format!(
            "the API socket path {} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket \
             allows; use a registry home with a shorter path",
            socket.display()
        )));
    }
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    match (payload, &spec.kernel) {
        (Payload::Kernel, Some(kernel)) => {
            push(&["--kernel", &value(&kernel.kernel)?]);
            if let Some(initrd) = &kernel.initrd {
                push(&["--initramfs", &value(initrd)?]);
            }
            if let Some(append) = &kernel.append {
                push(&["--cmdline", append]);
            }
        }
        (Payload::Kernel, None) => {
            return Err(VmError::Invalid(
                "cloud-hypervisor boots a kernel or firmware: pass --kernel FILE or --firmware \
                 FILE"
                    .into(),
            ))
        }
        (Payload::Firmware(_), Some(_)) => {
            return Err(VmError::Invalid(
                "--firmware and --kernel exclude each other".into(),
            ))
        }
        (Payload::Firmware(firmware), None) => push(&["--firmware", &value(firmware)?]),
    }
    let cpus = format!("boot={}", spec.cpus);
    let memory = format!("size={}M", spec.memory.div_ceil(1 << 20));
    push(&["--cpus", &cpus, "--memory", &memory]);
    for disk in disks(spec)? {
        push(&["--disk", &disk]);
    }
    let serial = format!("file={}", value(&spec.serial_log())?);
    let api = format!("path={}", value(&socket)?);
    push(&[
        "--serial",
        &serial,
        "--console",
        "off",
        "--api-socket",
        &api,
    ]);
    Ok(Invocation::new(PROGRAM, args))
}

/// Reads the header of every image of the chain and checks that each names the next image of
/// `spec`'s chain as its backing file, with that image's format pinned in the header, and that
/// the last names none (cloud-hypervisor follows the headers, and probes a format that is not
/// pinned).
pub fn check_chain_headers(spec: &VmSpec) -> Result<()> {
    for pair in spec.disks.windows(2) {
        let (layer, below) = (&pair[0], &pair[1]);
        let info = imagefmt::ops::info::image_info(&layer.path)
            .map_err(|e| VmError::Invalid(format!("reading {}: {e}", layer.path.display())))?;
        let named = info.full_backing_filename.as_deref().map(PathBuf::from);
        let same = named.as_deref().is_some_and(|named| {
            named == below.path
                || named.canonicalize().ok() == below.path.canonicalize().ok() && named.exists()
        });
        if !same {
            return Err(VmError::Invalid(format!(
                "{} names {} as its backing file, but the registered chain continues with {}: \
                 cloud-hypervisor would follow the header",
                layer.path.display(),
                info.backing_filename.as_deref().unwrap_or("nothing"),
                below.path.display()
            )));
        }
        if info.backing_filename_format.as_deref() != Some(below.format.name()) {
            return Err(VmError::Invalid(format!(
                "{} does not pin its backing file's format ({}) in its header, so \
                 cloud-hypervisor would probe it; rebase it with the format given",
                layer.path.display(),
                below.format.name()
            )));
        }
    }
    if let Some(last) = spec.disks.last() {
        if last.format == ImageFormat::Qcow2 {
            let info = imagefmt::ops::info::image_info(&last.path)
                .map_err(|e| VmError::Invalid(format!("reading {}: {e}", last.path.display())))?;
            if let Some(backing) = info.backing_filename {
                return Err(VmError::Invalid(format!(
                    "{} names a backing file ({backing}) outside the registered chain:                      cloud-hypervisor would open it or fail; register that file as a base",
                    last.path.display()
                )));
            }
        }
    }
    Ok(())
}

/// Starts `spec` detached: refuses a clone that is already running, checks the chain's headers,
/// removes stale runtime files, and runs cloud-hypervisor with its serial console in
/// `serial.log` and its own messages in `cloud-hypervisor.log`.
pub fn start(spec: &VmSpec, payload: &Payload) -> Result<i32> {
    let marker = api_socket(&spec.run_dir).to_string_lossy().into_owned();
    if let VmState::Running(pid) = daemon::state(&pidfile(&spec.run_dir), &marker) {
        return Err(VmError::AlreadyRunning {
            name: spec.name.clone(),
            pid,
        });
    }
    check_chain_headers(spec)?;
    let invocation = command_line(spec, payload)?;
    for stale in [api_socket(&spec.run_dir), pidfile(&spec.run_dir)] {
        let _ = std::fs::remove_file(stale);
    }
    daemon::spawn(
        &invocation,
        &spec.run_dir.join("cloud-hypervisor.out"),
        &spec.run_dir.join("cloud-hypervisor.log"),
        &pidfile(&spec.run_dir),
        &super::spec::command_log(&spec.run_dir),
    )
}

/// `ch-remote --api-socket SOCKET COMMAND`.
pub fn remote(run_dir: &Path, command: &str) -> Invocation {
    Invocation::new(
        REMOTE,
        vec![
            "--api-socket".into(),
            api_socket(run_dir).to_string_lossy().into_owned(),
            command.into(),
        ],
    )
}

/// Stops the clone's cloud-hypervisor: `power-button` (ACPI), waiting up to `timeout`; then
/// `shutdown-vmm`; then SIGKILL.
pub fn stop(run_dir: &Path, runner: &dyn CommandRunner, timeout: Duration) -> Result<Stopped> {
    daemon::stop(
        &pidfile(run_dir),
        &api_socket(run_dir).to_string_lossy(),
        &remote(run_dir, "power-button"),
        Some(&remote(run_dir, "shutdown-vmm")),
        runner,
        &super::spec::command_log(run_dir),
        timeout,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vm::spec::{DiskLayer, KernelBoot, PortForward};

    fn layer(path: &str, format: ImageFormat, read_only: bool) -> DiskLayer {
        DiskLayer {
            path: PathBuf::from(path),
            format,
            read_only,
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            run_dir: "/h/clones/web-1".into(),
            disks: vec![
                layer("/h/clones/web-1/disk.qcow2", ImageFormat::Qcow2, false),
                layer("/srv/deb12.raw", ImageFormat::Raw, true),
            ],
            memory: 1 << 30,
            cpus: 2,
            accel: Accel::Auto,
            ingress: vec![],
            egress: Egress::Deny,
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinux".into(),
                initrd: Some("/boot/initrd.img".into()),
                append: Some("console=ttyS0 root=/dev/vda1".into()),
            }),
            extra_drives: vec!["/h/clones/web-1/seed.img".into()],
            extra_serial_logs: vec![],
            egress_relay: None,
        }
    }

    /// The argv against cloud-hypervisor's documented CLI (`cloud-hypervisor --help`,
    /// vmm/src/config.rs `DiskConfig::SYNTAX`): one `--disk` per drive with the format given
    /// by `image_type=` and backing files enabled only for the chain's top image, the kernel
    /// payload, `--cpus boot=`, `--memory size=`, the serial port to a file, the virtio console
    /// off, and the API socket by path.
    #[test]
    fn the_command_line_is_cloud_hypervisors_documented_syntax() {
        let line = command_line(&spec(), &Payload::Kernel)
            .unwrap()
            .shell_line();
        assert_eq!(
            line,
            "cloud-hypervisor --kernel /boot/vmlinux --initramfs /boot/initrd.img \
             --cmdline 'console=ttyS0 root=/dev/vda1' --cpus boot=2 --memory size=1024M \
             --disk path=/h/clones/web-1/disk.qcow2,image_type=qcow2,backing_files=on \
             --disk path=/h/clones/web-1/seed.img,image_type=raw,readonly=on \
             --serial file=/h/clones/web-1/serial.log --console off \
             --api-socket path=/h/clones/web-1/cloud-hypervisor.sock"
        );
        // A single raw image (a reflink clone of a raw base): no backing files; firmware boot.
        let mut s = spec();
        s.disks = vec![layer("/h/clones/r/disk.raw", ImageFormat::Raw, false)];
        s.kernel = None;
        s.extra_drives.clear();
        let args = command_line(&s, &Payload::Firmware("/fw/CLOUDHV.fd".into()))
            .unwrap()
            .args;
        assert_eq!(args[..2], ["--firmware", "/fw/CLOUDHV.fd"]);
        let disk = args.iter().position(|a| a == "--disk").unwrap();
        assert_eq!(
            args[disk + 1],
            "path=/h/clones/r/disk.raw,image_type=raw,backing_files=off"
        );
    }

    #[test]
    fn paths_with_commas_are_quoted_and_quotes_refused() {
        let mut s = spec();
        s.disks.truncate(1);
        s.disks[0].path = "/h/a,b/disk.qcow2".into();
        let args = command_line(&s, &Payload::Kernel).unwrap().args;
        assert!(
            args.contains(&"path=\"/h/a,b/disk.qcow2\",image_type=qcow2,backing_files=off".into()),
            "{args:?}"
        );
        s.disks[0].path = "/h/a\"b/disk.qcow2".into();
        assert!(command_line(&s, &Payload::Kernel).is_err());
    }

    #[test]
    fn what_cloud_hypervisor_cannot_do_is_refused_with_the_reason() {
        let refused = |s: &VmSpec, payload: &Payload, needle: &str| {
            let err = command_line(s, payload).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        let mut s = spec();
        s.disks[1].format = ImageFormat::Vdi;
        refused(&s, &Payload::Kernel, "VDI");
        let mut s = spec();
        s.disks
            .insert(1, layer("/x/mid.raw", ImageFormat::Raw, true));
        refused(&s, &Payload::Kernel, "raw image with an image below it");
        let mut s = spec();
        s.ingress.push(PortForward {
            host: 2222,
            guest: 22,
        });
        refused(&s, &Payload::Kernel, "TAP");
        let mut s = spec();
        s.egress = "allow:10.0.0.1:443".parse().unwrap();
        refused(&s, &Payload::Kernel, "--egress allow");
        let mut s = spec();
        s.accel = Accel::Tcg;
        refused(&s, &Payload::Kernel, "KVM");
        let mut s = spec();
        s.kernel = None;
        refused(&s, &Payload::Kernel, "--firmware");
        refused(&spec(), &Payload::Firmware("/fw".into()), "exclude");
    }

    /// The chain cloud-hypervisor will follow is the one in the headers: a header naming
    /// another file, or not pinning the backing format, is refused; cowclone's own clones pass.
    #[test]
    fn headers_must_name_the_registered_chain_with_pinned_formats() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.raw");
        std::fs::write(&base, vec![0u8; 1 << 20]).unwrap();
        let top = dir.path().join("top.qcow2");
        // With the backing format pinned, or with its header extension (type 0xE2792ACA,
        // qcow2.rst) overwritten by the end-of-extensions marker, as images made without `-F`
        // have it.
        let build = |pinned: bool| {
            let _ = std::fs::remove_file(&top);
            imagefmt::Qcow2Builder::new(&top)
                .backing(base.to_string_lossy().into_owned())
                .backing_format(ImageFormat::Raw)
                .size(1 << 20)
                .without_opening_backing()
                .create()
                .unwrap();
            if !pinned {
                let mut bytes = std::fs::read(&top).unwrap();
                let at = bytes[..4096]
                    .windows(4)
                    .position(|w| w == [0xE2, 0x79, 0x2A, 0xCA])
                    .unwrap();
                bytes[at..at + 4].fill(0);
                std::fs::write(&top, bytes).unwrap();
            }
        };
        let mut s = spec();
        s.disks = vec![
            DiskLayer {
                path: top.clone(),
                format: ImageFormat::Qcow2,
                read_only: false,
            },
            DiskLayer {
                path: base.clone(),
                format: ImageFormat::Raw,
                read_only: true,
            },
        ];
        build(true);
        check_chain_headers(&s).unwrap();
        build(false);
        let err = check_chain_headers(&s).unwrap_err().to_string();
        assert!(err.contains("probe"), "{err}");
        build(true);
        s.disks[1].path = dir.path().join("other.raw");
        let err = check_chain_headers(&s).unwrap_err().to_string();
        assert!(err.contains("names"), "{err}");
        // A top image whose backing file the registry does not know.
        s.disks.truncate(1);
        let err = check_chain_headers(&s).unwrap_err().to_string();
        assert!(err.contains("outside the registered chain"), "{err}");
    }

    #[test]
    fn stop_asks_through_the_api_socket() {
        assert_eq!(
            remote(Path::new("/h/clones/web-1"), "power-button").shell_line(),
            "ch-remote --api-socket /h/clones/web-1/cloud-hypervisor.sock power-button"
        );
    }
}
