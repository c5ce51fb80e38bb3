//! End-to-end: real guests under qemu-system (TCG), started from cowclone clones.
//!
//! A tiny guest (see `guest.rs`) boots from a clone of a base that carries a known pattern,
//! reads the pattern through the chain and writes a marker. Afterwards the marker is in the
//! overlay (read by cowclone and by qemu-img), the base is byte-identical and `qemu-img check`
//! is clean. Every test kills its qemu on failure (a drop guard).

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cloner::vm::qemu::{QemuDriver, Stopped};
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
    assert!(
        matches!(driver.status(&spec), cloner::vm::qemu::Status::Running { pid, .. } if pid == started.pid)
    );
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
    assert_eq!(driver.status(&spec), cloner::vm::qemu::Status::Stopped);
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
    let _: Vec<PathBuf> = Vec::new();
}
