//! Choosing an accelerator for `--accel auto`: KVM only if a probe guest proves alive under it.
//!
//! `/dev/kvm` opening is not enough: under nested virtualization it can open and accept guests
//! that then make no progress (on the development machine a trivial guest needs 3–4 s under KVM
//! against 0.2 s under TCG, and a Linux kernel stops in its real-mode setup). The probe boots a
//! 40-byte multiboot kernel that writes one byte to qemu's `isa-debug-exit` port, which makes
//! qemu exit with status `(0x31 << 1) | 1` = 99. KVM is chosen only if that happens within the
//! probe timeout.

use std::fs;
use std::path::Path;
use std::time::Duration;

use super::runner::{CommandRunner, Invocation};
use super::spec::Accel;
use super::VmError;

/// How long the probe guest may take under KVM before KVM is declared unusable.
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// The exit status qemu reports when the probe guest wrote its byte.
pub const PROBE_EXIT_STATUS: i32 = (0x31 << 1) | 1;

/// An accelerator after `auto` was decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    /// KVM (`-accel kvm -cpu host`).
    Kvm,
    /// TCG (`-accel tcg`).
    Tcg,
}

impl Resolved {
    /// The name qemu's `-accel` takes.
    pub fn name(self) -> &'static str {
        match self {
            Resolved::Kvm => "kvm",
            Resolved::Tcg => "tcg",
        }
    }
}

/// The probe kernel: a multiboot header (a.out kludge, loaded and entered at 1 MiB) followed by
/// `mov al, 0x31; out 0xf4, al; cli; hlt; jmp $-2`.
pub fn probe_kernel() -> Vec<u8> {
    const MAGIC: u32 = 0x1BAD_B002;
    const FLAGS: u32 = 1 << 16; // the load addresses below are valid
    const LOAD: u32 = 0x10_0000;
    let header = [
        MAGIC,
        FLAGS,
        0u32.wrapping_sub(MAGIC.wrapping_add(FLAGS)), // checksum
        LOAD,                                         // header_addr
        LOAD,                                         // load_addr
        0,                                            // load_end_addr: the whole file
        0,                                            // bss_end_addr: no bss
        LOAD + 32,                                    // entry_addr: just after this header
    ];
    let mut image: Vec<u8> = header.iter().flat_map(|w| w.to_le_bytes()).collect();
    image.extend_from_slice(&[0xB0, 0x31, 0xE6, 0xF4, 0xFA, 0xF4, 0xEB, 0xFD]);
    image
}

/// The probe's command line, with the probe kernel at `kernel`.
pub fn probe_invocation(
    qemu: &str,
    kernel: &Path,
    timeout: Duration,
) -> Result<Invocation, VmError> {
    let kernel = super::spec::utf8(kernel)?;
    Ok(Invocation::new(
        qemu,
        [
            "-accel",
            "kvm",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-m",
            "16M",
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel",
            kernel,
        ],
    )
    .with_timeout(timeout))
}

/// Decides `accel`: `Kvm`/`Tcg` as asked; `Auto` runs the probe (its kernel written to
/// `scratch_dir`, removed afterwards) and picks KVM only if the probe guest exits as expected
/// within `timeout`.
pub fn resolve(
    accel: Accel,
    qemu: &str,
    runner: &dyn CommandRunner,
    scratch_dir: &Path,
    timeout: Duration,
) -> Result<Resolved, VmError> {
    match accel {
        Accel::Kvm => return Ok(Resolved::Kvm),
        Accel::Tcg => return Ok(Resolved::Tcg),
        Accel::Auto => {}
    }
    let kernel = scratch_dir.join("accel-probe.bin");
    fs::write(&kernel, probe_kernel()).map_err(VmError::io("writing the accel probe", &kernel))?;
    let outcome = runner.run(&probe_invocation(qemu, &kernel, timeout)?);
    let _ = fs::remove_file(&kernel);
    Ok(match outcome {
        Ok(done) if done.code == Some(PROBE_EXIT_STATUS) => Resolved::Kvm,
        // No KVM, a hang, or qemu missing (then the start itself reports it): TCG.
        _ => Resolved::Tcg,
    })
}

#[cfg(test)]
mod tests {
    use super::super::runner::{Completed, RecordingRunner};
    use super::*;

    #[test]
    fn the_probe_kernel_is_a_valid_multiboot_image() {
        let image = probe_kernel();
        let word = |i: usize| u32::from_le_bytes(image[i * 4..i * 4 + 4].try_into().unwrap());
        assert_eq!(word(0), 0x1BAD_B002);
        assert_eq!(word(0).wrapping_add(word(1)).wrapping_add(word(2)), 0);
        assert_eq!(word(7), 0x10_0020);
        assert_eq!(&image[32..36], &[0xB0, 0x31, 0xE6, 0xF4]);
    }

    #[test]
    fn auto_picks_kvm_only_when_the_probe_exits_with_its_status() {
        let dir = tempfile::tempdir().unwrap();
        for (code, timed_out, expected) in [
            (Some(PROBE_EXIT_STATUS), false, Resolved::Kvm),
            (None, true, Resolved::Tcg),
            (Some(1), false, Resolved::Tcg),
        ] {
            let runner = RecordingRunner::answering(move |_| Completed {
                code,
                timed_out,
                ..Completed::default()
            });
            let got = resolve(
                Accel::Auto,
                "qemu",
                &runner,
                dir.path(),
                DEFAULT_PROBE_TIMEOUT,
            )
            .unwrap();
            assert_eq!(got, expected);
            let recorded = runner.recorded();
            assert_eq!(recorded.len(), 1);
            assert_eq!(recorded[0].timeout, Some(DEFAULT_PROBE_TIMEOUT));
            assert!(recorded[0].args.windows(2).any(|w| w == ["-accel", "kvm"]));
        }
        let runner = RecordingRunner::new();
        assert_eq!(
            resolve(
                Accel::Tcg,
                "qemu",
                &runner,
                dir.path(),
                DEFAULT_PROBE_TIMEOUT
            )
            .unwrap(),
            Resolved::Tcg
        );
        assert!(runner.recorded().is_empty());
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "probe kernel left behind"
        );
    }
}
