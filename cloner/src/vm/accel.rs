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
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::runner::{log_line, Invocation};
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

/// Boots the probe guest under KVM with `qemu` (e.g. `qemu-system-x86_64`), working in
/// `scratch`; false (with the reason) if `/dev/kvm` is missing, qemu fails, or the guest stays
/// silent past [`PROBE_DEADLINE`].
pub fn probe_kvm(qemu: &str, scratch: &Path) -> Result<Probe> {
    if !Path::new("/dev/kvm").exists() {
        return Ok(Probe {
            kvm_alive: false,
            reason: "/dev/kvm does not exist".into(),
        });
    }
    let (disk, serial) = probe_files(scratch);
    std::fs::write(&disk, probe_boot_sector()).map_err(io("writing the KVM probe disk"))?;
    let _ = std::fs::remove_file(&serial);
    let invocation = probe_invocation(qemu, scratch)?;
    let mut child = match Command::new(&invocation.program)
        .args(&invocation.args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    {
        Ok(child) => child,
        Err(e) => {
            return Ok(Probe {
                kvm_alive: false,
                reason: format!("cannot run {qemu}: {e}"),
            })
        }
    };
    let start = Instant::now();
    let mut alive = false;
    let mut exited = None;
    while start.elapsed() < PROBE_DEADLINE {
        if std::fs::read(&serial).is_ok_and(|out| out.contains(&b'K')) {
            alive = true;
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            exited = Some(status);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    let _ = std::fs::remove_file(&disk);
    let _ = std::fs::remove_file(&serial);
    let reason = match (alive, exited) {
        (true, _) => format!(
            "a probe guest ran under KVM in {} ms",
            start.elapsed().as_millis()
        ),
        (false, Some(status)) => format!("qemu with KVM exited ({status})"),
        (false, None) => format!(
            "/dev/kvm opens but a probe guest stayed silent for {} s (nested KVM?)",
            PROBE_DEADLINE.as_secs()
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
}
