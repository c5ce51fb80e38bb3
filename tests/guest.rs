//! A tiny Linux guest built at test time from Debian packages: the host's kernel
//! (`linux-image-amd64`, `/boot/vmlinuz-*`), its virtio and vfat modules, and a static busybox
//! (`busybox-static`), packed into a newc initramfs by the `cpio` crate. Debian builds the
//! virtio drivers as modules, so `/init` loads them (in dependency order) before it can see a
//! disk. A missing package fails the test with its name.

use std::fs::{self, File};
use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Modules the guest loads, in dependency order (paths under `/lib/modules/VERSION/kernel`,
/// without the `.ko` suffix). Missing optional ones are skipped at build time.
const MODULES: &[(&str, bool)] = &[
    ("drivers/virtio/virtio_ring", true),
    ("drivers/virtio/virtio", true),
    ("drivers/virtio/virtio_pci_legacy_dev", false),
    ("drivers/virtio/virtio_pci_modern_dev", false),
    ("drivers/virtio/virtio_pci", true),
    ("drivers/block/virtio_blk", true),
    ("fs/fat/fat", true),
    ("fs/fat/vfat", true),
    ("fs/nls/nls_cp437", false),
    ("fs/nls/nls_ascii", false),
    ("drivers/acpi/button", false),
    ("drivers/input/evdev", false),
];

/// The prelude every guest `/init` starts with: mounts, busybox applets, modules, and an ACPI
/// power-button watcher (the stand-in for a real init's `acpid`: qemu's `system_powerdown`
/// powers the guest off).
const PRELUDE: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /proc /sys /dev /tmp /mnt /sbin /usr/bin /usr/sbin
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /etc/modules.order); do insmod "/lib/modules/$m" 2>/dev/null || echo "insmod $m failed"; done
for e in /sys/class/input/event*; do
  if grep -q "Power Button" "$e/device/name" 2>/dev/null; then
    (head -c 1 "/dev/input/${e##*/}" >/dev/null; echo GUEST-ACPI-POWERDOWN; poweroff -f) &
  fi
done
"#;

/// A built guest: boot it with `-kernel`/`-initrd`.
#[derive(Debug, Clone)]
pub struct TinyGuest {
    /// The host kernel.
    pub kernel: PathBuf,
    /// The initramfs just built.
    pub initrd: PathBuf,
}

/// The newest `/boot/vmlinuz-*` and its version.
fn host_kernel() -> (PathBuf, String) {
    let mut kernels: Vec<PathBuf> = fs::read_dir("/boot")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    kernels.retain(|p| {
        p.file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
    });
    kernels.sort();
    let kernel = kernels
        .pop()
        .expect("no /boot/vmlinuz-*: install the Debian package linux-image-amd64");
    let version = kernel.file_name().unwrap().to_string_lossy()["vmlinuz-".len()..].to_owned();
    (kernel, version)
}

/// A module's bytes, decompressed if the kernel ships it as `.ko.xz` (with `xz`, from
/// `xz-utils`), or `None` if it does not exist.
fn module_bytes(dir: &Path, name: &str) -> Option<Vec<u8>> {
    let plain = dir.join(format!("{name}.ko"));
    if let Ok(bytes) = fs::read(&plain) {
        return Some(bytes);
    }
    let xz = dir.join(format!("{name}.ko.xz"));
    if !xz.exists() {
        return None;
    }
    let output = Command::new("xz")
        .arg("-dc")
        .arg(&xz)
        .output()
        .expect("xz not found: install the Debian package xz-utils");
    assert!(output.status.success(), "xz -dc {} failed", xz.display());
    Some(output.stdout)
}

/// Builds a guest whose `/init` is the prelude followed by `script` (which must end by powering
/// off or waiting), in `dir`.
pub fn build(dir: &Path, script: &str) -> TinyGuest {
    let (kernel, version) = host_kernel();
    let module_dir = Path::new("/lib/modules").join(&version).join("kernel");
    let busybox = fs::read("/bin/busybox")
        .expect("no /bin/busybox: install the Debian package busybox-static");
    let mut entries: Vec<(cpio::NewcBuilder, Cursor<Vec<u8>>)> = Vec::new();
    let dir_entry = |name: &str| {
        (
            cpio::NewcBuilder::new(name).mode(0o040_755).nlink(2),
            Cursor::new(Vec::new()),
        )
    };
    for d in ["bin", "etc", "lib", "lib/modules"] {
        entries.push(dir_entry(d));
    }
    let file = |name: &str, mode: u32, bytes: Vec<u8>| {
        (
            cpio::NewcBuilder::new(name).mode(0o100_000 | mode),
            Cursor::new(bytes),
        )
    };
    entries.push(file("bin/busybox", 0o755, busybox));
    let mut order = String::new();
    for (name, required) in MODULES {
        match module_bytes(&module_dir, name) {
            Some(bytes) => {
                let base = name.rsplit('/').next().unwrap();
                entries.push(file(&format!("lib/modules/{base}.ko"), 0o644, bytes));
                order.push_str(&format!("{base}.ko\n"));
            }
            None if *required => panic!(
                "kernel module {name} missing under {}: install the Debian package linux-image-amd64",
                module_dir.display()
            ),
            None => {}
        }
    }
    entries.push(file("etc/modules.order", 0o644, order.into_bytes()));
    entries.push(file(
        "init",
        0o755,
        format!("{PRELUDE}{script}").into_bytes(),
    ));
    let initrd = dir.join("initrd.cpio");
    let out = File::create(&initrd).unwrap();
    cpio::write_cpio(entries.into_iter(), out).expect("writing the initramfs");
    TinyGuest { kernel, initrd }
}
