//! Choosing the accelerator for `--accel auto`: KVM only if a guest proves alive under it.
//!
//! `/dev/kvm` opening is not enough: nested under another hypervisor it can open and yet hang
//! every guest. The probe boots a one-sector guest (a boot sector that writes `K` to the first
//! serial port and halts) under KVM with a short deadline; KVM is used only if the `K` arrives.
//!
//! The deadline must sit below what a broken KVM manages, not only above what a working one
//! needs. On the development machine (nested, where a Linux kernel under KVM makes no progress
//! past its real-mode setup in 40 s) the probe's `K` still arrives, after 4.1–5.2 s, against
//! 0.2 s for the same guest under TCG: a 5 s deadline picked the hanging KVM about half the
//! time. A working KVM starts qemu and runs SeaBIOS to the boot sector in well under a second,
//! so [`PROBE_DEADLINE`] is 2 s; a slow host that misses it gets TCG, which is slower but runs.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::runner::{log_line, CommandRunner, Invocation, Until};
use super::spec::command_log;
use super::{io, Result, VmError};

/// How long the probe guest may take to speak under KVM.
pub const PROBE_DEADLINE: Duration = Duration::from_secs(2);

/// The probe's boot sector: `mov dx, 0x3f8; mov al, 'K'; out dx, al; cli; hlt; jmp $-2`, padded
/// to 512 bytes with the 0x55AA signature.
pub fn probe_boot_sector() -> [u8; 512] {
    let mut sector = [0u8; 512];
    let code = [
        0xBA, 0xF8, 0x03, // mov dx, 0x3f8
        0xB0, b'K', // mov al, 'K'
        0xEE, // out dx, al
        0xFA, // cli
        0xF4, // hlt
        0xEB, 0xFD, // jmp back to hlt
    ];
    sector[..code.len()].copy_from_slice(&code);
    sector[510] = 0x55;
    sector[511] = 0xAA;
    sector
}

/// What the probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Probe {
    /// True if the probe guest ran under KVM.
    pub kvm_alive: bool,
    /// Why (for logs and `status`).
    pub reason: String,
}

/// The device KVM is reached through.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// Boots the probe guest under KVM with `qemu` (e.g. `qemu-system-x86_64`) through `runner`,
/// working in `scratch`; false (with the reason) if `/dev/kvm` is missing, qemu fails, or the
/// guest stays silent past [`PROBE_DEADLINE`].
pub fn probe_kvm(qemu: &str, scratch: &Path, runner: &dyn CommandRunner) -> Result<Probe> {
    probe_kvm_via(qemu, Path::new(KVM_DEVICE), scratch, runner)
}

/// [`probe_kvm`] with the KVM device at `device` (tests name a stand-in).
fn probe_kvm_via(
    qemu: &str,
    device: &Path,
    scratch: &Path,
    runner: &dyn CommandRunner,
) -> Result<Probe> {
    if !device.exists() {
        return Ok(Probe {
            kvm_alive: false,
            reason: format!("{} does not exist", device.display()),
        });
    }
    let (disk, serial) = probe_files(scratch);
    std::fs::write(&disk, probe_boot_sector()).map_err(io("writing the KVM probe disk"))?;
    let _ = std::fs::remove_file(&serial);
    let invocation = probe_invocation(qemu, scratch)?;
    let spoke = || std::fs::read(&serial).is_ok_and(|out| out.contains(&b'K'));
    let until = runner.run_until(&invocation, PROBE_DEADLINE, &spoke)?;
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&serial);
    let (alive, reason) = match until {
        Until::Done(after) => (
            true,
            format!("a probe guest ran under KVM in {} ms", after.as_millis()),
        ),
        Until::Exited(status) => (false, format!("qemu with KVM exited ({status})")),
        Until::NotRun(e) => (false, format!("cannot run {qemu}: {e}")),
        Until::TimedOut => (
            false,
            format!(
                "{} opens but a probe guest stayed silent for {} s (nested KVM?)",
                device.display(),
                PROBE_DEADLINE.as_secs()
            ),
        ),
    };
    log_line(
        &command_log(scratch),
        &invocation.shell_line(),
        &format!("kvm {}: {reason}", if alive { "used" } else { "not used" }),
    )?;
    Ok(Probe {
        kvm_alive: alive,
        reason,
    })
}

/// The verdict file's name in a home's cache directory ([`crate::home::Home::cache_dir`]).
pub const VERDICT_FILE: &str = "kvm-verdict.json";

/// Largest verdict file read back (it is a few hundred bytes; anything larger is ignored).
const MAX_VERDICT_BYTES: u64 = 64 * 1024;

/// What a KVM verdict holds for: the running kernel (release and boot) and the qemu binary.
/// A verdict is reused only while all of these are unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostKey {
    /// `uname -r` (from `/proc/sys/kernel/osrelease`).
    pub kernel_release: String,
    /// This boot's id (`/proc/sys/kernel/random/boot_id`).
    pub boot_id: String,
    /// The qemu binary, as found in `PATH`.
    pub qemu_path: PathBuf,
    /// Its modification time: seconds and nanoseconds since the epoch.
    pub qemu_mtime: (i64, i64),
    /// Its size in bytes.
    pub qemu_size: u64,
}

impl HostKey {
    /// The key of this host and `qemu` (a program name looked up in `PATH`, or a path);
    /// `None` if the binary or the kernel facts cannot be read (then nothing is remembered).
    pub fn current(qemu: &str) -> Option<HostKey> {
        use std::os::unix::fs::MetadataExt;
        let read = |p: &str| std::fs::read_to_string(p).ok().map(|s| s.trim().to_owned());
        let qemu_path = find_program(qemu)?;
        let meta = std::fs::metadata(&qemu_path).ok()?;
        Some(HostKey {
            kernel_release: read("/proc/sys/kernel/osrelease")?,
            boot_id: read("/proc/sys/kernel/random/boot_id")?,
            qemu_mtime: (meta.mtime(), meta.mtime_nsec()),
            qemu_size: meta.size(),
            qemu_path,
        })
    }
}

/// A remembered probe result and what it holds for.
#[derive(Debug, Serialize, Deserialize)]
struct Verdict {
    key: HostKey,
    kvm_alive: bool,
    reason: String,
}

/// `program` itself if it names a path, else the first executable file of that name in `PATH`.
fn find_program(program: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    if program.contains('/') {
        return Some(PathBuf::from(program));
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(program))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// The KVM verdict for `--accel auto`: the one remembered in `cache_dir` if it was made under
/// the same kernel boot with the same qemu binary ([`HostKey`]), else a fresh [`probe_kvm`]
/// through `runner`, then remembered. A missing `/dev/kvm` is cheap to see and never
/// remembered; a cache that cannot be written only costs the next start a probe.
pub fn kvm_verdict(
    cache_dir: &Path,
    qemu: &str,
    scratch: &Path,
    runner: &dyn CommandRunner,
) -> Result<Probe> {
    kvm_verdict_via(cache_dir, qemu, Path::new(KVM_DEVICE), scratch, runner)
}

/// [`kvm_verdict`] with the KVM device at `device`.
fn kvm_verdict_via(
    cache_dir: &Path,
    qemu: &str,
    device: &Path,
    scratch: &Path,
    runner: &dyn CommandRunner,
) -> Result<Probe> {
    let file = cache_dir.join(VERDICT_FILE);
    let key = HostKey::current(qemu);
    if let (Some(key), true) = (&key, device.exists()) {
        if let Some(known) = read_verdict(&file).filter(|v| v.key == *key) {
            return Ok(Probe {
                kvm_alive: known.kvm_alive,
                reason: format!(
                    "{} (remembered for this boot and qemu binary)",
                    known.reason
                ),
            });
        }
    }
    let probe = probe_kvm_via(qemu, device, scratch, runner)?;
    if let (Some(key), true) = (key, device.exists()) {
        let verdict = Verdict {
            key,
            kvm_alive: probe.kvm_alive,
            reason: probe.reason.clone(),
        };
        let _ = write_verdict(cache_dir, &file, &verdict);
    }
    Ok(probe)
}

fn read_verdict(file: &Path) -> Option<Verdict> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(file)
        .ok()?
        .take(MAX_VERDICT_BYTES)
        .read_to_string(&mut text)
        .ok()?;
    serde_json::from_str(&text).ok()
}

/// Writes the verdict to a temporary file (named after this process) in `cache_dir` (made
/// private if missing) and renames it into place, so a concurrent start reads a verdict whole.
fn write_verdict(cache_dir: &Path, file: &Path, verdict: &Verdict) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(crate::home::PRIVATE_DIR)
        .create(cache_dir)?;
    let tmp = cache_dir.join(format!(".{VERDICT_FILE}.{}", std::process::id()));
    let written = serde_json::to_vec(verdict)
        .map_err(std::io::Error::other)
        .and_then(|bytes| std::fs::write(&tmp, bytes))
        .and_then(|()| std::fs::rename(&tmp, file));
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The probe's disk image and serial log in `scratch`.
fn probe_files(scratch: &Path) -> (PathBuf, PathBuf) {
    (
        scratch.join("kvm-probe.img"),
        scratch.join("kvm-probe.serial"),
    )
}

/// The probe's qemu command line (what `--dry-run` shows for `--accel auto`). Its disk and
/// serial log live in `scratch`; paths go through `-blockdev` JSON and `-chardev` (commas
/// doubled), so any directory name works.
pub fn probe_invocation(qemu: &str, scratch: &Path) -> Result<Invocation> {
    let (disk, serial) = probe_files(scratch);
    let utf8 = |p: &Path| {
        p.to_str()
            .map(str::to_owned)
            .ok_or_else(|| VmError::Invalid(format!("{} is not UTF-8", p.display())))
    };
    let blockdev = serde_json::json!({
        "driver": "raw",
        "node-name": "probe",
        "file": { "driver": "file", "filename": utf8(&disk)? },
    });
    let chardev = format!("file,id=probe,path={}", utf8(&serial)?.replace(',', ",,"));
    let args = [
        "-accel",
        "kvm",
        "-machine",
        "pc",
        "-m",
        "16",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-chardev",
        &chardev,
        "-serial",
        "chardev:probe",
        "-blockdev",
        &blockdev.to_string(),
        "-device",
        "ide-hd,drive=probe,bootindex=0",
    ];
    Ok(Invocation::new(
        qemu,
        args.iter().map(|a| (*a).to_owned()).collect(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_probe_sector_is_bootable() {
        let sector = probe_boot_sector();
        assert_eq!(&sector[510..], &[0x55, 0xAA]);
        assert_eq!(sector[4], b'K');
    }

    /// Counts the probes that reach the runner: the recording runner stands in for qemu.
    fn probes(runner: &super::super::runner::RecordingRunner) -> usize {
        runner
            .calls()
            .iter()
            .filter(|c| c.args.iter().any(|a| a == "kvm"))
            .count()
    }

    #[test]
    fn the_verdict_is_remembered_until_the_qemu_binary_changes() {
        use super::super::runner::RecordingRunner;
        let dir = tempfile::tempdir().unwrap();
        let cache = dir.path().join("cache");
        let scratch = dir.path().join("run");
        std::fs::create_dir(&scratch).unwrap();
        // Stand-ins: a "KVM device" that exists and a "qemu" binary whose identity we change.
        let device = dir.path().join("kvm");
        std::fs::write(&device, b"").unwrap();
        let qemu = dir.path().join("qemu-system-x86_64");
        std::fs::write(&qemu, b"#!/bin/sh\n").unwrap();
        let qemu = qemu.to_str().unwrap();
        let runner = RecordingRunner::default();

        let first = kvm_verdict_via(&cache, qemu, &device, &scratch, &runner).unwrap();
        assert_eq!(probes(&runner), 1, "the first start probes");
        assert!(!first.kvm_alive, "the recorded probe guest never speaks");
        assert!(cache.join(VERDICT_FILE).is_file());

        let second = kvm_verdict_via(&cache, qemu, &device, &scratch, &runner).unwrap();
        assert_eq!(probes(&runner), 1, "the second start must not probe");
        assert_eq!(second.kvm_alive, first.kvm_alive);
        assert!(second.reason.contains("remembered"), "{}", second.reason);

        // A different qemu binary (size and mtime change) is probed again.
        std::fs::write(qemu, b"#!/bin/sh\n# upgraded\n").unwrap();
        kvm_verdict_via(&cache, qemu, &device, &scratch, &runner).unwrap();
        assert_eq!(probes(&runner), 2, "a changed qemu binary re-probes");
        kvm_verdict_via(&cache, qemu, &device, &scratch, &runner).unwrap();
        assert_eq!(probes(&runner), 2, "and that verdict is remembered in turn");

        // A verdict from another boot is not reused.
        let mut verdict = read_verdict(&cache.join(VERDICT_FILE)).unwrap();
        verdict.key.boot_id = "another-boot".into();
        std::fs::write(
            cache.join(VERDICT_FILE),
            serde_json::to_vec(&verdict).unwrap(),
        )
        .unwrap();
        kvm_verdict_via(&cache, qemu, &device, &scratch, &runner).unwrap();
        assert_eq!(probes(&runner), 3, "another boot re-probes");

        // Without a KVM device nothing is probed and nothing is remembered.
        let missing = dir.path().join("no-kvm");
        std::fs::remove_file(cache.join(VERDICT_FILE)).unwrap();
        let none = kvm_verdict_via(&cache, qemu, &missing, &scratch, &runner).unwrap();
        assert!(!none.kvm_alive);
        assert_eq!(probes(&runner), 3);
        assert!(!cache.join(VERDICT_FILE).exists());
    }
}
