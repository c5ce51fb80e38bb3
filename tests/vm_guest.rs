//! A tiny Linux guest built at test time from Debian packages: the installed kernel
//! (`linux-image-amd64`, /boot/vmlinuz-*), its virtio and FAT modules (the Debian kernel builds
//! them as modules, so the initramfs must carry and load them), and `busybox-static`, packed into
//! a newc cpio initramfs by the `cpio` crate. Its /init:
//!
//! * with `cowclone.test=marker` on the kernel command line: prints the first 16 bytes of
//!   /dev/vda (`GUEST-PATTERN: ...`), writes `MARKER-FROM-GUEST` at 1 MiB, syncs, powers off;
//! * otherwise it stands in for cloud-init: mounts the NoCloud seed (/dev/vdb, FAT) and runs its
//!   `user-data` once (the provision wrapper then reports and powers off), and then stays up like
//!   a booted system (with `--keep-running` the wrapper leaves it running).
//!
//! In both modes it brings up `eth0` (qemu user networking: 10.0.2.15/24) when the VM has one,
//! and it stands in for `acpid`: a press of the ACPI power button (QMP `system_powerdown`, what
//! `cowclone stop` sends first) prints `GUEST: ACPI power button` and powers off.

use std::io::Cursor;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use cpio::NewcBuilder;

/// Modules to load, in dependency order, relative to /lib/modules/<version>/kernel.
const MODULES: &[&str] = &[
    "drivers/virtio/virtio_ring.ko",
    "drivers/virtio/virtio.ko",
    "drivers/virtio/virtio_pci_legacy_dev.ko",
    "drivers/virtio/virtio_pci_modern_dev.ko",
    "drivers/virtio/virtio_pci.ko",
    "drivers/block/virtio_blk.ko",
    "fs/fat/fat.ko",
    "fs/fat/vfat.ko",
    "fs/nls/nls_cp437.ko",
    "fs/nls/nls_iso8859-1.ko",
    "net/core/failover.ko",
    "drivers/net/net_failover.ko",
    "drivers/net/virtio_net.ko",
    "drivers/acpi/button.ko",
    "drivers/input/evdev.ko",
];

const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci virtio_blk fat vfat nls_cp437 nls_iso8859-1 failover net_failover virtio_net button evdev; do
  insmod /lib/modules/$m.ko || echo "GUEST: cannot load $m"
done
for e in /sys/class/input/event*; do
  if grep -q "Power Button" "$e/device/name" 2>/dev/null; then
    (head -c 1 "/dev/input/${e##*/}" >/dev/null; echo "GUEST: ACPI power button"; sync; poweroff -f) &
  fi
done
if [ -e /sys/class/net/eth0 ]; then
  ip link set lo up; ip link set eth0 up
  ip addr add 10.0.2.15/24 dev eth0; ip route add default via 10.0.2.2
fi
i=0; while [ ! -b /dev/vda ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
if grep -q cowclone.test=marker /proc/cmdline; then
  echo "GUEST-PATTERN: $(dd if=/dev/vda bs=16 count=1 2>/dev/null)"
  echo "MARKER-FROM-GUEST" | dd of=/dev/vda bs=512 seek=2048 conv=notrunc 2>/dev/null
  sync
  echo "GUEST: marker written"
else
  i=0; while [ ! -b /dev/vdb ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done
  mount -t vfat -o ro,codepage=437,iocharset=iso8859-1 /dev/vdb /mnt && cp /mnt/user-data /tmp/user-data
  chmod +x /tmp/user-data && /tmp/user-data
  echo "GUEST: user-data finished; staying up"
  while :; do sleep 3600; done
fi
sync
poweroff -f
"#;

/// The guest: kernel and initramfs paths (built once per test run).
pub struct Guest {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initramfs.
    pub initrd: PathBuf,
}

/// Builds (once) the tiny guest; fails naming the Debian packages if they are missing.
pub fn guest() -> &'static Guest {
    static GUEST: OnceLock<Guest> = OnceLock::new();
    GUEST.get_or_init(build)
}

fn kernel_version() -> String {
    let mut versions: Vec<String> = std::fs::read_dir("/lib/modules")
        .unwrap_or_else(|e| {
            panic!("/lib/modules unreadable ({e}): install the Debian package linux-image-amd64")
        })
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|v| Path::new(&format!("/boot/vmlinuz-{v}")).exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no /boot/vmlinuz-* with modules: install the Debian package linux-image-amd64")
}

fn build() -> Guest {
    let version = kernel_version();
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox not found: install the Debian package busybox-static");
    let file = |path: &str| {
        std::fs::read(path)
            .unwrap_or_else(|e| panic!("reading {path} ({e}): install linux-image-amd64"))
    };
    let mut entries: Vec<(NewcBuilder, Cursor<Vec<u8>>)> = Vec::new();
    for dir in [
        "bin",
        "dev",
        "proc",
        "sys",
        "mnt",
        "tmp",
        "lib",
        "lib/modules",
    ] {
        entries.push((
            NewcBuilder::new(dir).mode(0o040755),
            Cursor::new(Vec::new()),
        ));
    }
    entries.push((
        NewcBuilder::new("bin/busybox").mode(0o100755),
        Cursor::new(std::fs::read(busybox).unwrap()),
    ));
    entries.push((
        NewcBuilder::new("init").mode(0o100755),
        Cursor::new(INIT.as_bytes().to_vec()),
    ));
    for module in MODULES {
        let name = Path::new(module).file_name().unwrap().to_string_lossy();
        entries.push((
            NewcBuilder::new(&format!("lib/modules/{name}")).mode(0o100644),
            Cursor::new(file(&format!("/lib/modules/{version}/kernel/{module}"))),
        ));
    }
    let dir = std::env::temp_dir().join(format!("cowclone-test-guest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let initrd = dir.join("initrd.cpio.gz");
    let gz = flate2::write::GzEncoder::new(
        std::fs::File::create(&initrd).unwrap(),
        flate2::Compression::fast(),
    );
    let gz = cpio::write_cpio(entries.into_iter(), gz).unwrap();
    gz.finish().unwrap();
    Guest {
        kernel: PathBuf::from(format!("/boot/vmlinuz-{version}")),
        initrd,
    }
}
