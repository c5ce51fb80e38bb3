//! The one way an image file is opened: file type first, then the open, then qemu's locks —
//! before a single byte of metadata is read.
//!
//! Every image cowclone touches goes through [`open_image`]: the image named on the command
//! line, its backing files, VDI parents and external data files, the base a commit writes, the
//! file `create --overwrite` replaces. A name taken from an image header is untrusted, so:
//!
//! 1. `stat` the path (following symlinks, like qemu): only regular files pass; block devices
//!    only when the caller asks ([`OpenHow::block_devices`]); FIFOs, sockets, character
//!    devices and directories are refused *before* any open, so a FIFO cannot hang a reader
//!    and a device cannot be poked.
//! 2. Open with `O_NONBLOCK | O_NOCTTY | O_CLOEXEC`, so that a file swapped for a FIFO between
//!    the two steps cannot block the open either.
//! 3. `fstat` the descriptor: it must be the same device and inode, of the same type, as step 1
//!    saw; then clear `O_NONBLOCK`.
//! 4. Take the locks of [`Access`] ([`crate::lock`]); a conflict is an error naming the file.
//!
//! The returned [`File`] carries the locks: they hold for as long as the operation keeps the
//! handle (images keep their handle until they are dropped).

use std::fs::File;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustix::fs::OFlags;
use thiserror::Error;

use crate::lock::{self, Access};
use crate::{Error, Result};

/// How to open an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpenHow {
    /// Read, read with `--force-share`, or write (opens read-write); decides the locks.
    pub access: Access,
    /// Accept a block device (only on the user's explicit request).
    pub block_devices: bool,
}

impl OpenHow {
    /// Reading, taking shared-read locks (refused while another process writes the image).
    pub const fn read() -> Self {
        Self {
            access: Access::Read,
            block_devices: false,
        }
    }

    /// Reading with `--force-share`: no lock keeps writers out, none is checked against them.
    pub const fn force_share() -> Self {
        Self {
            access: Access::ForceShare,
            block_devices: false,
        }
    }

    /// Reading with `force_share` as given.
    pub const fn reading(force_share: bool) -> Self {
        if force_share {
            Self::force_share()
        } else {
            Self::read()
        }
    }

    /// Reading and writing, taking the write locks (one writer at a time, no readers).
    pub const fn write() -> Self {
        Self {
            access: Access::Write,
            block_devices: false,
        }
    }

    /// The same, reading headers only (`info`): [`Access::Metadata`] for a read,
    /// [`Access::MetadataForceShare`] for a forced-share read; a write is left as it is.
    pub const fn metadata_only(mut self) -> Self {
        self.access = match self.access {
            Access::Read => Access::Metadata,
            Access::ForceShare => Access::MetadataForceShare,
            other => other,
        };
        self
    }

    /// The same, also accepting block devices.
    pub const fn with_block_devices(mut self, allowed: bool) -> Self {
        self.block_devices = allowed;
        self
    }
}

/// A file refused before or while opening it.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum OpenError {
    /// The path is not a regular file (nor an allowed block device).
    #[error("{path} is a {kind}, not a regular file; images, backing, parent and data files must be regular files")]
    NotRegularFile {
        /// The file.
        path: PathBuf,
        /// What it is: "FIFO", "socket", "character device", "directory", "block device".
        kind: &'static str,
    },
    /// The file was replaced between the check and the open.
    #[error("{path} changed while it was being opened")]
    Replaced {
        /// The file.
        path: PathBuf,
    },
}

/// Opens the image file at `path` as `how` says: refuses anything but a regular file (or an
/// allowed block device) before opening it, and takes qemu-compatible locks before returning.
pub fn open_image(path: &Path, how: OpenHow) -> Result<File> {
    let before =
        std::fs::metadata(path).map_err(Error::io(format!("opening {}", path.display())))?;
    check_type(path, &before.file_type(), how)?;
    let write = how.access == Access::Write;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags((OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC).bits() as i32)
        .open(path)
        .map_err(Error::io(format!(
            "opening {}{}",
            path.display(),
            if write { " for writing" } else { "" }
        )))?;
    let after = file
        .metadata()
        .map_err(Error::io(format!("reading metadata of {}", path.display())))?;
    if (after.dev(), after.ino()) != (before.dev(), before.ino())
        || after.file_type() != before.file_type()
    {
        return Err(OpenError::Replaced {
            path: path.to_owned(),
        }
        .into());
    }
    let flags = rustix::fs::fcntl_getfl(&file)
        .map_err(|e| Error::io(format!("reading the flags of {}", path.display()))(e.into()))?;
    rustix::fs::fcntl_setfl(&file, flags - OFlags::NONBLOCK)
        .map_err(|e| Error::io(format!("setting the flags of {}", path.display()))(e.into()))?;
    lock::lock(&file, path, how.access)?;
    Ok(file)
}

fn check_type(path: &Path, kind: &std::fs::FileType, how: OpenHow) -> Result<(), OpenError> {
    let refused = if kind.is_file() {
        return Ok(());
    } else if kind.is_block_device() {
        if how.block_devices {
            return Ok(());
        }
        "block device"
    } else if kind.is_fifo() {
        "FIFO"
    } else if kind.is_socket() {
        "socket"
    } else if kind.is_char_device() {
        "character device"
    } else if kind.is_dir() {
        "directory"
    } else {
        "special file"
    };
    Err(OpenError::NotRegularFile {
        path: path.to_owned(),
        kind: refused,
    })
}

/// True if `a` and `b` name the same file (the same device and inode, symlinks followed);
/// false when either cannot be looked at. `a` is looked at first: pass the one that may not
/// exist (a file about to be created) there, so that one `stat` settles it.
pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    let Ok(a) = std::fs::metadata(a) else {
        return false;
    };
    std::fs::metadata(b).is_ok_and(|b| (a.dev(), a.ino()) == (b.dev(), b.ino()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fifos_sockets_devices_and_directories_are_refused_without_blocking() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            rustix::fs::FileType::Fifo,
            rustix::fs::Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let socket = dir.path().join("sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        for (path, kind) in [
            (fifo.as_path(), "FIFO"),
            (socket.as_path(), "socket"),
            (Path::new("/dev/null"), "character device"),
            (dir.path(), "directory"),
        ] {
            for how in [OpenHow::read(), OpenHow::write(), OpenHow::force_share()] {
                match open_image(path, how) {
                    Err(Error::Open(OpenError::NotRegularFile { kind: k, .. })) => {
                        assert_eq!(k, kind)
                    }
                    other => panic!("{} opened: {other:?}", path.display()),
                }
            }
        }
    }

    #[test]
    fn a_regular_file_opens_blocking_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, b"data").unwrap();
        let file = open_image(&path, OpenHow::write()).unwrap();
        let flags = rustix::fs::fcntl_getfl(&file).unwrap();
        assert!(!flags.contains(OFlags::NONBLOCK));
        match open_image(&path, OpenHow::read()) {
            Err(Error::Lock(e)) => assert!(e.is_conflict()),
            other => panic!("read while written: {other:?}"),
        }
        open_image(&path, OpenHow::force_share()).unwrap();
        drop(file);
        open_image(&path, OpenHow::read()).unwrap();
    }
}
