//! Facts about the machine a run measured on and the files it made: the filesystem type of the
//! bench directory, a file's settled size, the host's name and kernel, and [`Machine`], what
//! every bench JSON records about the run.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::{BenchError, Result};

/// The machine, software and moment of a run, recorded in every bench JSON (flattened into
/// its `environment`).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Machine {
    /// The host's name.
    pub host: String,
    /// The kernel release.
    pub kernel: String,
    /// CPUs available to the run.
    pub cpus: usize,
    /// The filesystem the run wrote to (or read from).
    pub filesystem: String,
    /// `qemu-img --version`'s first line, or null if it is not installed.
    pub qemu_img_version: Option<String>,
    /// The cowclone measured: `cowclone VERSION` (the measured binary's `--version` where a
    /// binary is measured, else this library's version).
    pub cowclone_version: String,
    /// When the run started, RFC 3339 UTC.
    pub date: String,
}

impl Machine {
    /// The facts now, for a run in `dir`.
    pub fn now(dir: &Path) -> Self {
        Self {
            host: kernel_fact("hostname"),
            kernel: kernel_fact("osrelease"),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
            filesystem: filesystem_name(dir),
            qemu_img_version: crate::tools::version("qemu-img"),
            cowclone_version: format!("cowclone {}", env!("CARGO_PKG_VERSION")),
            date: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        }
    }
}

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

/// fsyncs `path` (so that delayed allocation is settled) and returns (st_size, st_blocks×512).
pub fn settled_bytes(path: &Path) -> Result<(u64, u64)> {
    let file = File::open(path).map_err(BenchError::io(format!("opening {}", path.display())))?;
    file.sync_all()
        .map_err(BenchError::io(format!("syncing {}", path.display())))?;
    let meta = file.metadata().map_err(BenchError::io(format!(
        "reading metadata of {}",
        path.display()
    )))?;
    Ok((meta.len(), meta.blocks() * 512))
}

/// Writes back every dirty page of the filesystem holding `path` (`syncfs`), so that writeback
/// left by one measured command does not fall on the next.
pub fn sync_filesystem(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| rustix::fs::syncfs(&f).map_err(std::io::Error::from))
        .map_err(BenchError::io(format!(
            "syncing the filesystem of {}",
            path.display()
        )))
}

/// A line of `/proc/sys/kernel/<name>` (hostname, osrelease), or `"unknown"`.
pub fn kernel_fact(name: &str) -> String {
    std::fs::read_to_string(Path::new("/proc/sys/kernel").join(name))
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The 1-, 5- and 15-minute load averages from `/proc/loadavg`, as the kernel prints them.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".to_owned())
}
