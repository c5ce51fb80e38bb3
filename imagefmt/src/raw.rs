//! A raw image: guest bytes are file bytes, and holes in a sparse file are zeros.
//!
//! Like qemu, the disk is the file length rounded up to whole 512-byte sectors; the bytes past
//! the end of the file read as zeros. Block status asks the file system with `SEEK_DATA` /
//! `SEEK_HOLE` (qemu's `file-posix.c` `find_allocation`): a hole is [`ExtentKind::Zero`] at its
//! own offset, anything else data. Where the file system cannot answer (or the storage is not a
//! file), everything is data. The answer is the kernel's, so it is qemu's too, including its
//! one quirk: an unwritten extent (ext4's zero range) counts as data once its pages are cached.

use std::os::fd::BorrowedFd;

use rustix::fs::SeekFrom;

use crate::extent::{check_range, Extent, ExtentKind, GuestRead, HostFile, HostLocation};
use crate::io::Backend;
use crate::offsets::{GuestOffset, HostOffset};
use crate::{Error, Result};

/// A raw image on any backend.
#[derive(Debug)]
pub struct RawReader<B> {
    backend: B,
    size: u64,
}

impl<B: Backend> RawReader<B> {
    /// Wraps a backend whose whole length is the disk.
    pub fn new(backend: B) -> Result<Self> {
        let size = backend
            .len()
            .map_err(Error::reading("raw image length"))?
            .next_multiple_of(512);
        Ok(Self { backend, size })
    }

    /// The storage under the image.
    pub fn backend(&self) -> &B {
        &self.backend
    }
}

/// What the file system says about `offset`: `Some((is_data, bytes))` of the run starting
/// there, or `None` if it cannot say.
fn seek_status(fd: BorrowedFd<'_>, offset: u64) -> Option<(bool, u64)> {
    match rustix::fs::seek(fd, SeekFrom::Data(offset)) {
        Ok(data) if data == offset => {
            let hole = rustix::fs::seek(fd, SeekFrom::Hole(offset)).ok()?;
            Some((true, hole.saturating_sub(offset)))
        }
        Ok(data) => Some((false, data - offset)),
        // ENXIO: no data at or after `offset` (a trailing hole, or past the end of the file).
        Err(rustix::io::Errno::NXIO) => Some((false, u64::MAX)),
        Err(_) => None,
    }
}

/// qemu's status of a host file (`file-posix.c` `raw_co_block_status` under `block/io.c`
/// `bdrv_co_block_status`) for `bytes` at `offset`, the file being `total` bytes long (its length
/// rounded up to 512).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FileStatus {
    /// The run reads as zeros (a hole, or past the end of the file).
    pub zero: bool,
    /// Bytes in the run (0 at or past the end of the file).
    pub len: u64,
    /// The run reaches the end of the file.
    pub eof: bool,
}

/// The status of `fd` (or, without one, "data throughout") at `offset`, at most `bytes`.
pub(crate) fn file_status(
    fd: Option<BorrowedFd<'_>>,
    offset: u64,
    bytes: u64,
    total: u64,
) -> FileStatus {
    if offset >= total {
        return FileStatus {
            zero: false,
            len: 0,
            eof: true,
        };
    }
    let bytes = bytes.min(total - offset);
    let (data, len) = fd
        .and_then(|fd| seek_status(fd, offset))
        .unwrap_or((true, bytes));
    // A data run ending in a partial sector at the end of the file is rounded up to the
    // sector, as qemu does; never report an empty run.
    let len = len.min(bytes).next_multiple_of(512).clamp(1, bytes);
    FileStatus {
        zero: !data,
        len,
        eof: offset + len == total,
    }
}

impl<B: Backend + Send + Sync> GuestRead for RawReader<B> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_range(offset.0, buf.len(), self.size)?;
        // A raw image's host offsets are its guest offsets.
        let got = self
            .backend
            .read_prefix_at(buf, offset.0)
            .map_err(Error::reading("raw image data"))?;
        buf[got..].fill(0);
        Ok(())
    }

    fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
        check_range(start.0, 1, self.size)?;
        let status = file_status(self.backend.as_fd(), start.0, max_len.max(1), self.size);
        Ok(Extent {
            start,
            len: status.len,
            depth: 0,
            kind: if status.zero {
                ExtentKind::Zero
            } else {
                ExtentKind::DATA
            },
            host: Some(HostLocation {
                file: HostFile::Image,
                offset: HostOffset(start.0),
            }),
        })
    }

    fn host_fd(&self, file: HostFile) -> Option<BorrowedFd<'_>> {
        match file {
            HostFile::Image => self.backend.as_fd(),
            HostFile::DataFile => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemBackend;

    #[test]
    fn sparse_files_answer_holes_as_zeros_and_memory_as_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.raw");
        let file = std::fs::File::create(&path).unwrap();
        file.set_len(4 << 20).unwrap();
        Backend::write_all_at(&file, &[1u8; 4096], 1 << 20).unwrap();
        let raw = RawReader::new(std::fs::File::open(&path).unwrap()).unwrap();
        let first = raw.block_status(GuestOffset(0), 4 << 20).unwrap();
        // tmpfs and every common Linux file system report holes; the data block must be data.
        let at_data = raw.block_status(GuestOffset(1 << 20), 4 << 20).unwrap();
        assert_eq!(at_data.kind, ExtentKind::DATA);
        assert_eq!(at_data.host.unwrap().offset, HostOffset(1 << 20));
        if first.kind == ExtentKind::Zero {
            assert_eq!(first.len, 1 << 20);
            assert_eq!(at_data.len, 4096);
        }
        let mem = RawReader::new(MemBackend::new(vec![0; 1000])).unwrap();
        let all = mem.block_status(GuestOffset(0), u64::MAX).unwrap();
        assert_eq!((all.len, all.kind), (1024, ExtentKind::DATA));
        assert!(mem.block_status(GuestOffset(1024), 1).is_err());
    }
}
