//! Image locks that qemu understands: the byte-range scheme of qemu's `block/file-posix.c`.
//!
//! qemu describes who uses an image file with open-file-description (OFD) byte-range locks,
//! one byte per block-layer permission (FORMATS.md has no entry; the facts come from qemu's
//! `raw_apply_lock_bytes` / `raw_check_lock_bytes` and `bdrv_perm_names`):
//!
//! ```text
//! byte 100 + i   "I hold permission i"          (a shared read lock on that byte)
//! byte 200 + i   "I do not share permission i"  (a shared read lock on that byte)
//!
//! i = 0 consistent read   1 write   2 write unchanged   3 resize
//! ```
//!
//! Taking a set of permissions is two steps, in qemu's order: first lock the bytes of what
//! this handle holds and of what it will not share; then test, with `F_OFD_GETLK` asking
//! whether an exclusive lock could be placed, (a) the "not shared" byte of every permission it
//! holds — someone refusing to share it fails with `Failed to get "write" lock` — and (b) the
//! "holds" byte of every permission it does not share — someone holding it fails with
//! `Failed to get shared "write" lock`. A test only sees other open file descriptions, so the
//! handle's own bytes never conflict with themselves, while two handles of one process do
//! (exactly as two qemu processes would). A conflict is looked at again for up to
//! [`CONFLICT_GRACE`] before it is reported: a descriptor this process just closed can live on
//! in a child between fork and exec, holding our own old lock for that moment.
//!
//! The locks belong to the open file description, so they live exactly as long as the
//! [`std::fs::File`] that took them (and its duplicates): dropping the handle releases them, and
//! a crash cannot leave one behind.
//!
//! What cowclone takes, matching what `qemu-io` and `qemu-img` take on the image file:
//!
//! | [`Access`] | holds (100+i) | does not share (200+i) | like |
//! |---|---|---|---|
//! | `Read` | consistent read | write, resize | `qemu-img check/map/compare/convert`, a backing file |
//! | `ForceShare` | consistent read | — | `qemu-img check/map/compare/convert -U` |
//! | `Metadata` | — | write, resize | `qemu-img info` (it opens without I/O) |
//! | `MetadataForceShare` | — | — (no lock at all) | `qemu-img info -U` |
//! | `Write` | consistent read, write, resize | write, resize | `qemu-img commit/resize/rebase`, a running VM |
//!
//! (Checked with `strace -e fcntl` against qemu-img 10.0: the same bytes, in the same order.)

use std::fmt;
use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// qemu's `RAW_LOCK_PERM_BASE`: byte `100 + i` is locked by a holder of permission `i`.
pub(crate) const PERM_BASE: i64 = 100;
/// qemu's `RAW_LOCK_SHARED_BASE`: byte `200 + i` is locked by whoever does not share
/// permission `i`.
pub(crate) const SHARED_BASE: i64 = 200;

/// One block-layer permission of qemu (`BLK_PERM_*`), as its bit index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Permission {
    /// `BLK_PERM_CONSISTENT_READ` (bit 0): reads see consistent data.
    ConsistentRead = 0,
    /// `BLK_PERM_WRITE` (bit 1): guest-visible writes.
    Write = 1,
    /// `BLK_PERM_WRITE_UNCHANGED` (bit 2): writes that do not change what is read.
    WriteUnchanged = 2,
    /// `BLK_PERM_RESIZE` (bit 3): changing the size.
    Resize = 3,
}

impl Permission {
    /// Every permission, in bit order (qemu's `PERM_FOREACH`).
    pub const ALL: [Permission; 4] = [
        Permission::ConsistentRead,
        Permission::Write,
        Permission::WriteUnchanged,
        Permission::Resize,
    ];

    /// The bit in a permission mask.
    pub const fn bit(self) -> u8 {
        1 << self as u8
    }

    /// The name qemu prints (`bdrv_perm_names`).
    pub const fn name(self) -> &'static str {
        match self {
            Permission::ConsistentRead => "consistent read",
            Permission::Write => "write",
            Permission::WriteUnchanged => "write unchanged",
            Permission::Resize => "resize",
        }
    }
}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How an operation uses an image file, and so which locks it takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Access {
    /// Reading: holds consistent read, does not share write or resize. Refused while another
    /// process writes the image; makes writers wait. qemu-img's read-only commands do this.
    #[default]
    Read,
    /// Reading an image that may be in use (`-U`/`--force-share`): holds consistent read and
    /// shares everything, so it neither blocks nor is blocked by writers. What is read may be
    /// inconsistent if someone writes meanwhile.
    ForceShare,
    /// Reading headers only (`info`, like qemu-img's open without I/O): holds no permission,
    /// still does not share write or resize, so it is refused while another process writes.
    Metadata,
    /// [`Access::Metadata`] with `--force-share`: takes no lock at all.
    MetadataForceShare,
    /// Writing: holds consistent read, write and resize, shares neither write nor resize.
    Write,
}

impl Access {
    /// The permissions held (bit mask of [`Permission::bit`]).
    pub const fn held(self) -> u8 {
        let read = Permission::ConsistentRead.bit();
        match self {
            Access::Read | Access::ForceShare => read,
            Access::Metadata | Access::MetadataForceShare => 0,
            Access::Write => read | Permission::Write.bit() | Permission::Resize.bit(),
        }
    }

    /// The permissions shared with other users (bit mask of [`Permission::bit`]).
    pub const fn shared(self) -> u8 {
        let all = 0b1111;
        match self {
            Access::ForceShare | Access::MetadataForceShare => all,
            Access::Read | Access::Metadata | Access::Write => {
                all & !(Permission::Write.bit() | Permission::Resize.bit())
            }
        }
    }
}

/// A lock refused or failed.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum LockError {
    /// Another user does not share a permission this access needs (qemu: `Failed to get
    /// "write" lock`).
    #[error("Failed to get \"{permission}\" lock: Is another process using the image [{path}]?")]
    NotShared {
        /// The image file.
        path: PathBuf,
        /// The permission wanted.
        permission: Permission,
    },
    /// Another user holds a permission this access does not share (qemu: `Failed to get
    /// shared "write" lock`).
    #[error(
        "Failed to get shared \"{permission}\" lock: Is another process using the image [{path}]?"
    )]
    Held {
        /// The image file.
        path: PathBuf,
        /// The permission another user holds.
        permission: Permission,
    },
    /// The lock call itself failed (e.g. a filesystem without OFD locks).
    #[error("Failed to lock byte {byte} of {path}")]
    Io {
        /// The image file.
        path: PathBuf,
        /// The byte.
        byte: i64,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl LockError {
    /// True if another process uses the image (as opposed to the locking call failing).
    pub(crate) fn is_conflict(&self) -> bool {
        matches!(self, LockError::NotShared { .. } | LockError::Held { .. })
    }
}

/// Takes the locks of `access` on `file` (the image at `path`, named in errors), in qemu's
/// order: lock own bytes, then test the other side's. On a conflict the caller drops `file`,
/// which releases whatever was locked.
pub(crate) fn lock(file: &File, path: &Path, access: Access) -> Result<(), LockError> {
    let held = access.held();
    let unshared = !access.shared();
    let io_error = |byte| lock_call_failed(path, byte);
    for p in Permission::ALL {
        if held & p.bit() != 0 {
            let byte = PERM_BASE + p as i64;
            ofd::read_lock(file.as_fd(), byte).map_err(io_error(byte))?;
        }
    }
    for p in Permission::ALL {
        if unshared & p.bit() != 0 {
            let byte = SHARED_BASE + p as i64;
            ofd::read_lock(file.as_fd(), byte).map_err(io_error(byte))?;
        }
    }
    // A conflict seen for a moment may be our own lock: a descriptor this process just closed
    // can live on in a child between fork and exec (close-on-exec closes it only at exec), so
    // a conflict is looked at again for up to CONFLICT_GRACE before it is reported. A process
    // really using the image holds its locks far longer.
    let started = std::time::Instant::now();
    loop {
        match conflict(file, path, held, unshared) {
            Err(e) if e.is_conflict() && started.elapsed() < CONFLICT_GRACE => {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// The error of a failed `fcntl` on `byte` of the image at `path`.
fn lock_call_failed(path: &Path, byte: i64) -> impl FnOnce(io::Error) -> LockError + '_ {
    move |source| LockError::Io {
        path: path.to_owned(),
        byte,
        source,
    }
}

/// How long a conflicting lock is looked at again before it is reported (see the module docs).
pub const CONFLICT_GRACE: std::time::Duration = std::time::Duration::from_millis(200);

/// Tests the other side's bytes, as qemu's `raw_check_lock_bytes` does: the first conflict.
fn conflict(file: &File, path: &Path, held: u8, unshared: u8) -> Result<(), LockError> {
    let io_error = |byte| lock_call_failed(path, byte);
    for p in Permission::ALL {
        let byte = SHARED_BASE + p as i64;
        if held & p.bit() != 0
            && ofd::locked_by_other(file.as_fd(), byte).map_err(io_error(byte))?
        {
            return Err(LockError::NotShared {
                path: path.to_owned(),
                permission: p,
            });
        }
    }
    for p in Permission::ALL {
        let byte = PERM_BASE + p as i64;
        if unshared & p.bit() != 0
            && ofd::locked_by_other(file.as_fd(), byte).map_err(io_error(byte))?
        {
            return Err(LockError::Held {
                path: path.to_owned(),
                permission: p,
            });
        }
    }
    Ok(())
}

/// The two `fcntl` calls qemu uses, on one byte each. Neither rustix nor std exposes
/// `F_OFD_SETLK`/`F_OFD_GETLK` on a byte range (rustix's `fcntl_lock` is a whole-file,
/// process-owned lock), so this is the crate's one use of `unsafe`: a `libc::fcntl` call with a
/// valid descriptor and a `flock` that lives across the call.
#[allow(unsafe_code)]
mod ofd {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};

    fn one_byte(kind: libc::c_int, byte: i64) -> libc::flock {
        libc::flock {
            l_type: kind as libc::c_short,
            l_whence: libc::SEEK_SET as libc::c_short,
            l_start: byte as libc::off_t,
            l_len: 1,
            // Must be 0 for OFD locks.
            l_pid: 0,
        }
    }

    /// Places a shared (read) OFD lock on `byte`, without waiting.
    pub(super) fn read_lock(fd: BorrowedFd<'_>, byte: i64) -> io::Result<()> {
        let lock = one_byte(libc::F_RDLCK, byte);
        // SAFETY: `fd` is a borrowed, open descriptor for the whole call; F_OFD_SETLK reads
        // the `flock` through the pointer, which points at a live, initialised local.
        let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
        if ret == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// True if another open file description holds a lock on `byte` that would keep an
    /// exclusive lock out (qemu's `qemu_lock_fd_test(fd, byte, 1, true)`).
    pub(super) fn locked_by_other(fd: BorrowedFd<'_>, byte: i64) -> io::Result<bool> {
        let mut lock = one_byte(libc::F_WRLCK, byte);
        // SAFETY: as above; F_OFD_GETLK writes the answer into the `flock`, which is a live,
        // exclusively borrowed local of the right type.
        let ret = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) };
        if ret == -1 {
            return Err(io::Error::last_os_error());
        }
        Ok(lock.l_type != libc::F_UNLCK as libc::c_short)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image() -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        (dir, path)
    }

    fn take(path: &Path, access: Access) -> Result<File, LockError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(access == Access::Write)
            .open(path)
            .unwrap();
        lock(&file, path, access).map(|()| file)
    }

    #[test]
    fn readers_share_and_keep_writers_out() {
        let (_dir, path) = image();
        let first = take(&path, Access::Read).unwrap();
        let _second = take(&path, Access::Read).unwrap();
        let err = take(&path, Access::Write).unwrap_err();
        assert!(
            matches!(
                err,
                LockError::NotShared {
                    permission: Permission::Write,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(
            err.to_string(),
            format!(
                "Failed to get \"write\" lock: Is another process using the image [{}]?",
                path.display()
            )
        );
        drop(first);
        drop(_second);
        take(&path, Access::Write).unwrap();
    }

    #[test]
    fn a_writer_keeps_readers_and_writers_out_but_not_force_share() {
        let (_dir, path) = image();
        let writer = take(&path, Access::Write).unwrap();
        let err = take(&path, Access::Read).unwrap_err();
        assert!(
            matches!(
                err,
                LockError::Held {
                    permission: Permission::Write,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err
            .to_string()
            .starts_with("Failed to get shared \"write\" lock"));
        assert!(take(&path, Access::Write).unwrap_err().is_conflict());
        take(&path, Access::ForceShare).unwrap();
        drop(writer);
        take(&path, Access::Read).unwrap();
    }

    #[test]
    fn force_share_blocks_nobody() {
        let (_dir, path) = image();
        let _shared = take(&path, Access::ForceShare).unwrap();
        take(&path, Access::Write).unwrap();
    }

    #[test]
    fn the_bytes_are_qemus() {
        // Read: holds 100, does not share 201 and 203; write adds 101 and 103.
        assert_eq!(Access::Read.held(), 0b0001);
        assert_eq!(!Access::Read.shared() & 0b1111, 0b1010);
        assert_eq!(Access::Write.held(), 0b1011);
        assert_eq!(!Access::Write.shared() & 0b1111, 0b1010);
        assert_eq!(Access::ForceShare.shared(), 0b1111);
        // info: holds nothing, still keeps writers out; info -U: no lock at all.
        assert_eq!(Access::Metadata.held(), 0);
        assert_eq!(!Access::Metadata.shared() & 0b1111, 0b1010);
        assert_eq!(Access::MetadataForceShare.held(), 0);
        assert_eq!(Access::MetadataForceShare.shared(), 0b1111);
    }

    #[test]
    fn metadata_readers_keep_writers_out_and_are_kept_out_by_them() {
        let (_dir, path) = image();
        let info = take(&path, Access::Metadata).unwrap();
        assert!(take(&path, Access::Write).unwrap_err().is_conflict());
        drop(info);
        let _writer = take(&path, Access::Write).unwrap();
        assert!(take(&path, Access::Metadata).unwrap_err().is_conflict());
        take(&path, Access::MetadataForceShare).unwrap();
    }
}
