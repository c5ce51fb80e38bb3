//! Facts about the machine a run measured on: the filesystem type of the bench directory.

use std::path::Path;

/// The name of the filesystem holding `path`, from `statfs`'s magic number (the numbers are
/// the kernel's, `include/uapi/linux/magic.h`); `"unknown (0x…)"` for others.
pub fn filesystem_name(path: &Path) -> String {
    let Ok(stat) = rustix::fs::statfs(path) else {
        return "unknown".to_owned();
    };
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets.
    let magic = stat.f_type as u64;
    let name = match magic {
        0xEF53 => "ext2/ext3/ext4",
        0x5846_5342 => "xfs",
        0x9123_683E => "btrfs",
        0x0102_1994 => "tmpfs",
        0x794C_7630 => "overlayfs",
        0x2FC1_2FC1 => "zfs",
        0xCA45_1A4E => "bcachefs",
        0xF2F5_2010 => "f2fs",
        0x6969 => "nfs",
        0xFF53_4D42 => "cifs",
        0x0102_1997 => "9p",
        0x6573_5546 => "fuse",
        _ => return format!("unknown (statfs magic {magic:#x})"),
    };
    name.to_owned()
}
