//! End-to-end: real guests under qemu-system (TCG), started from cowclone clones.
//!
//! A tiny guest (see `guest.rs`) boots from a clone of a base that carries a known pattern,
//! reads the pattern through the chain and writes a marker. Afterwards the marker is in the
//! overlay (read by cowclone and by qemu-img), the base is byte-identical and `qemu-img check`
//! is clean. Every test kills its qemu on failure (a drop guard).

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use cloner::vm::provision::{provision, ProvisionOptions, Provisioned};
use cloner::vm::qemu::{QemuDriver, Status, Stopped};
use cloner::vm::{pidfile, Accel, DiskLayer, KernelBoot, Logged, SystemRunner, VmSpec};
use cloner::CloneRequest;
use imagefmt::backing::BackingPolicy;
use imagefmt::chain::open_chain;
use imagefmt::ImageFormat;

use crate::guest;
use crate::util::{assert_qemu_check_clean, qemu_img_ok, qemu_io_ok};

/// How long a tiny guest may take to boot and finish under TCG (it takes about 5 s).
const GUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Where the base pattern lives and where the guest writes its marker.
const PATTERN_AT: u64 = 1 << 20;
const MARKER_AT: u64 = 2 << 20;

/// Kills the VM's qemu when dropped, so that a failing test leaves no guest running.
struct KillOnDrop<'a>(&'a VmSpec);

impl Drop for KillOnDrop<'_> {
    fn drop(&mut self) {
        let socket = self.0.qmp_socket();
        if let Some(pid) = pidfile::read_pid(&self.0.pidfile()) {
            if pidfile::is_ours(pid, &socket.to_string_lossy()) {
                pidfile::kill(pid);
            }
        }
    }
}

/// A spec for the tiny guest booting from `disks`, TCG, 256 MiB, runtime files in `run_dir`.
pub fn tiny_spec(
    name: &str,
    run_dir: &Path,
    disks: Vec<DiskLayer>,
    guest: &guest::TinyGuest,
) -> VmSpec {
    let mut spec = VmSpec::new(name, run_dir, disks);
    spec.memory = 256 << 20;
    spec.accel = Accel::Tcg;
    spec.kernel = Some(KernelBoot {
        kernel: guest.kernel.clone(),
        initrd: Some(guest.initrd.clone()),
        append: Some("console=ttyS0 panic=-1 quiet".into()),
    });
    spec
}

fn read_guest(path: &Path, policy: &BackingPolicy, offset: u64, len: usize) -> Vec<u8> {
    let chain = open_chain(path, None, policy).unwrap();
    let mut buf = vec![0; len];
    chain.read_at(&mut buf, offset).unwrap();
    buf
}

/// Creates a qcow2 base of 16 MiB whose 4 KiB at [`PATTERN_AT`] are `Z` (by qemu-io).
pub fn patterned_base(path: &Path) {
    qemu_img_ok(&[&"create", &"-f", &"qcow2", &path, &"16M"]);
    qemu_io_ok(&[
        &"-f",
        &"qcow2",
        &"-c",
        &format!("write -P 0x5a {PATTERN_AT} 4k"),
        &path,
    ]);
}

/// Clones `base` to `dir/NAME.qcow2` with cloner and returns the chain, nearest first.
pub fn clone_of(base: &Path, dir: &Path, name: &str, base_format: ImageFormat) -> Vec<DiskLayer> {
    let clone = dir.join(format!("{name}.qcow2"));
    cloner::clone_base(&CloneRequest {
        base: base.to_owned(),
        clone: clone.clone(),
        base_format: Some(base_format),
        durable: false,
    })
    .unwrap();
    vec![
        DiskLayer {
            path: clone,
            format: ImageFormat::Qcow2,
        },
        DiskLayer {
            path: base.to_owned(),
            format: base_format,
        },
    ]
}

#[test]
fn a_guest_booted_from_a_clone_reads_the_base_and_writes_only_to_the_overlay() {
    let dir = tempfile::tempdir().unwrap();
    let guest = guest::build(
        dir.path(),
        &format!(
            "seen=$(dd if=/dev/vda bs=1 skip={PATTERN_AT} count=16 2>/dev/null)\n\
             echo \"GUEST-READ $seen\"\n\
             printf 'SEEN:%s' \"$seen\" | dd of=/dev/vda bs=512 seek={} conv=notrunc,fsync 2>/dev/null\n\
             sync\n\
             echo GUEST-DONE\n\
             poweroff -f\n",
            MARKER_AT / 512
        ),
    );
    let base = dir.path().join("base.qcow2");
    patterned_base(&base);
    let base_before = fs::read(&base).unwrap();
    let run_dir = dir.path().join("vm1");
    fs::create_dir(&run_dir).unwrap();
    let disks = clone_of(&base, &run_dir, "disk", ImageFormat::Qcow2);
    let overlay = disks[0].path.clone();
    let spec = tiny_spec("vm1", &run_dir, disks, &guest);
    let runner = Logged::new(SystemRunner, spec.invocation_log());
    let driver = QemuDriver::new(&runner);
    let _guard = KillOnDrop(&spec);

    let started_at = Instant::now();
    let started = driver.start(&spec).unwrap();
    assert_eq!(started.accel, "tcg");
    assert!(matches!(driver.status(&spec), Status::Running { pid, .. } if pid == started.pid));
    let stopped = driver.wait_stopped(&spec, GUEST_TIMEOUT);
    let serial = fs::read_to_string(spec.serial_log()).unwrap_or_default();
    assert!(
        stopped,
        "the guest did not power off within {GUEST_TIMEOUT:?}; console:\n{serial}"
    );
    eprintln!(
        "tiny guest boot-to-poweroff: {:.1} s",
        started_at.elapsed().as_secs_f64()
    );
    assert!(
        serial.contains("GUEST-READ ZZZZZZZZZZZZZZZZ"),
        "console:\n{serial}"
    );
    assert!(serial.contains("GUEST-DONE"), "console:\n{serial}");
    assert_eq!(driver.status(&spec), Status::Stopped);
    assert_eq!(
        driver.stop(&spec, Duration::from_secs(1)).unwrap(),
        Stopped::WasNotRunning
    );

    // The marker, read through the chain by cowclone and by qemu-img, and in the overlay alone.
    let expected = b"SEEN:ZZZZZZZZZZZZZZZZ";
    let follow = BackingPolicy::FollowLocal;
    assert_eq!(
        read_guest(&overlay, &follow, MARKER_AT, expected.len()),
        expected
    );
    assert_eq!(
        read_guest(&overlay, &BackingPolicy::Detach, MARKER_AT, expected.len()),
        expected
    );
    assert_eq!(read_guest(&overlay, &follow, PATTERN_AT, 4), b"ZZZZ");
    let flat = dir.path().join("flat.raw");
    qemu_img_ok(&[&"convert", &"-O", &"raw", &overlay, &flat]);
    let flat = fs::read(&flat).unwrap();
    let at = MARKER_AT as usize;
    assert_eq!(&flat[at..at + expected.len()], expected);
    // The base is untouched, and the overlay is consistent.
    assert!(fs::read(&base).unwrap() == base_before, "the base changed");
    assert_eq!(
        read_guest(&base, &follow, MARKER_AT, expected.len()),
        vec![0; expected.len()]
    );
    assert_qemu_check_clean(&overlay, "overlay after the guest ran");

    // Every invocation was logged: the qemu start, nothing else (TCG asked, so no probe).
    let log = fs::read_to_string(spec.invocation_log()).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{log}");
    assert_eq!(lines[0]["program"], "qemu-system-x86_64");
    assert_eq!(lines[0]["code"], 0);
}

/// The stand-in for cloud-init in the tiny guest: find the NoCloud seed by content, run its
/// `user-data` once, then stay up like a booted system (until the ACPI power button).
const CLOUD_INIT_STAND_IN: &str = r#"mkdir -p /seed
for d in /dev/vd[b-z]; do
  mount -t vfat -o ro "$d" /seed 2>/dev/null || continue
  [ -f /seed/user-data ] && break
  umount /seed
done
echo "GUEST-SEED $(ls /seed | tr '\n' ' ')"
cp /seed/user-data /tmp/user-data && chmod 700 /tmp/user-data && /tmp/user-data
echo GUEST-USER-DATA-DONE
while true; do sleep 3600; done
"#;

/// A provisioning script: metadata in a no-op here-document, output on both streams, and a
/// read of the base pattern through the clone.
const SCRIPT: &str = "#!/bin/sh\n\
: <<'META'\n\
/* rexxjs-vm-base: tiny */\n\
/* rexxjs-vm-timeout: 120 */\n\
META\n\
echo \"hello from $(uname -s)\"\n\
dd if=/dev/vda bs=1 skip=1048576 count=4 2>/dev/null; echo\n\
echo to-stderr >&2\n\
exit 3\n";

fn run_checked(program: &str, package: &str, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let output = std::process::Command::new(program)
        .args(args.iter().map(|a| a.as_ref()))
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run {program} ({e}): install the Debian package {package}")
        });
    assert!(
        output.status.success(),
        "{program} failed: {}",
        crate::util::describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn provision_in(dir: &Path, base_format: ImageFormat, keep_running: bool) -> (VmSpec, Provisioned) {
    let guest = guest::build(dir, CLOUD_INIT_STAND_IN);
    let base = dir.join(format!("base.{base_format}"));
    patterned_base(&dir.join("pattern.qcow2"));
    qemu_img_ok(&[
        &"convert",
        &"-O",
        &base_format.to_string(),
        &dir.join("pattern.qcow2"),
        &base,
    ]);
    let run_dir = dir.join("prov");
    fs::create_dir(&run_dir).unwrap();
    let disks = clone_of(&base, &run_dir, "disk", base_format);
    let spec = tiny_spec("prov", &run_dir, disks, &guest);
    let runner = Logged::new(SystemRunner, spec.invocation_log());
    let driver = QemuDriver::new(&runner);
    let guard = KillOnDrop(&spec);
    let options = ProvisionOptions {
        timeout: GUEST_TIMEOUT,
        keep_running,
        stop_timeout: Duration::from_secs(30),
    };
    let done = provision(&driver, spec.clone(), SCRIPT.as_bytes(), &options).unwrap_or_else(|e| {
        let console = fs::read_to_string(spec.serial_log()).unwrap_or_default();
        panic!("provision failed: {e}\nconsole:\n{console}")
    });
    eprintln!(
        "provision ({base_format} base): result after {} ms",
        done.elapsed_ms
    );
    // The seed is a FAT volume the kernel mounted; fsck.fat and blkid agree with what was built.
    let seed = run_dir.join("cidata.img");
    run_checked("fsck.fat", "dosfstools", &[&"-n", &seed]);
    let label = run_checked(
        "blkid",
        "util-linux",
        &[&"-o", &"value", &"-s", &"LABEL", &seed],
    );
    assert_eq!(label.trim(), "CIDATA");
    let console = fs::read_to_string(spec.serial_log()).unwrap();
    assert!(
        console.contains("GUEST-SEED meta-data user-data"),
        "console:\n{console}"
    );
    // The caller takes over the VM (it may still run) and guards it itself.
    std::mem::forget(guard);
    (spec, done)
}

#[test]
fn provision_returns_the_scripts_output_and_status_and_keep_running_keeps_the_vm() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, done) = provision_in(dir.path(), ImageFormat::Qcow2, true);
    let _guard = KillOnDrop(&spec);
    assert_eq!(
        String::from_utf8_lossy(&done.output),
        "hello from Linux\nZZZZ\nto-stderr\n"
    );
    assert_eq!(done.exit_status, 3);
    assert_eq!(done.stopped, None);
    let runner = Logged::new(SystemRunner, spec.invocation_log());
    let driver = QemuDriver::new(&runner);
    assert!(
        matches!(driver.status(&spec), Status::Running { ref guest, .. } if guest == "running"),
        "{:?}",
        driver.status(&spec)
    );
    // The stand-in init powers off on the ACPI power button, so stop needs no quit.
    assert_eq!(
        driver.stop(&spec, Duration::from_secs(60)).unwrap(),
        Stopped::PoweredDown
    );
    assert_eq!(driver.status(&spec), Status::Stopped);
    let console = fs::read_to_string(spec.serial_log()).unwrap();
    assert!(
        console.contains("GUEST-ACPI-POWERDOWN"),
        "console:\n{console}"
    );
    assert!(!spec.pidfile().exists() && !spec.qmp_socket().exists());
    let log = fs::read_to_string(spec.invocation_log()).unwrap();
    assert!(
        log.contains(r#""program":"qmp","args":["system_powerdown"]"#),
        "{log}"
    );
}

#[test]
fn provision_over_a_raw_base_stops_the_vm_and_leaves_the_base_alone() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    let (spec, done) = provision_in(dir.path(), ImageFormat::Raw, false);
    let _guard = KillOnDrop(&spec);
    assert_eq!(done.exit_status, 3);
    assert_eq!(
        String::from_utf8_lossy(&done.output),
        "hello from Linux\nZZZZ\nto-stderr\n"
    );
    assert_eq!(done.stopped, Some(Stopped::PoweredDown));
    let fresh = dir.path().join("fresh.raw");
    qemu_img_ok(&[
        &"convert",
        &"-O",
        &"raw",
        &dir.path().join("pattern.qcow2"),
        &fresh,
    ]);
    // The raw base equals a fresh conversion of the same pattern: nothing wrote to it.
    assert!(
        fs::read(&base).unwrap() == fs::read(&fresh).unwrap(),
        "the raw base changed"
    );
    assert_qemu_check_clean(&spec.disks[0].path, "overlay after provisioning");
}
