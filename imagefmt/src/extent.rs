//! The bottom floor of the engine: what lies at a guest range, and the trait every image
//! implements to read guest bytes and to say where they are.
//!
//! Formats (qcow2, VDI, raw) import this module; it imports no format, and neither does
//! anything it calls, so the chain layer ([`crate::chain`]) and the formats never import each
//! other.
//!
//! ```text
//! GuestRead::block_status(start, max_len) ─► Extent { start, len, depth, kind, host }
//!     kind: Data { compressed } | Zero | Unallocated (ask the layer below)
//!     host: where the bytes are (image file or external data file + HostOffset), when known
//! chain::block_status  merges the layers (qemu's bdrv_block_status_above)
//! ```

use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use crate::offsets::{GuestOffset, HostOffset};
use crate::{Error, Result};

/// Which file of a layer holds an extent's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HostFile {
    /// The image file itself (qcow2 data clusters, VDI blocks, raw bytes).
    Image,
    /// The qcow2 image's external data file.
    DataFile,
}

/// Where a layer stores an extent: a file of the layer and the offset in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HostLocation {
    /// The file.
    pub file: HostFile,
    /// The byte offset of the extent's first byte in that file.
    pub offset: HostOffset,
}

/// What a guest range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Stored as data by the layer at the extent's depth.
    Data {
        /// Stored compressed (a qcow2 compressed cluster): no host offset is given.
        compressed: bool,
        /// Allocated, but known to read as zeros: the host range is a hole in its file (what
        /// qemu reports as data + zero for images it detects as metadata-preallocated).
        zero: bool,
    },
    /// Reads as zeros, said so by the layer at the extent's depth (a zero cluster, a VDI ZERO
    /// block, a hole in a raw file, or the area past the end of a shorter backing file).
    Zero,
    /// No layer provides it: it reads as zeros. In a single layer's answer: ask the layer below.
    Unallocated,
}

/// One run of guest bytes with one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// First guest byte.
    pub start: GuestOffset,
    /// Length in bytes (never 0).
    pub len: u64,
    /// Which layer answered: 0 = the image itself, 1 = its backing file or parent, …; for an
    /// [`ExtentKind::Unallocated`] extent, the layer where the lookup stopped.
    pub depth: u32,
    /// What the range is.
    pub kind: ExtentKind,
    /// Where the layer at `depth` stores the range, when it says so (not for compressed data).
    pub host: Option<HostLocation>,
}

impl ExtentKind {
    /// Plain uncompressed data.
    pub const DATA: ExtentKind = ExtentKind::Data {
        compressed: false,
        zero: false,
    };
}

impl Extent {
    /// One past the last guest byte.
    pub fn end(&self) -> GuestOffset {
        GuestOffset(self.start.0 + self.len)
    }

    /// True if the extent reads as zeros without reading any data.
    pub fn reads_as_zeros(&self) -> bool {
        !matches!(self.kind, ExtentKind::Data { zero: false, .. })
    }

    /// Splits the extent at guest offset `at`: the part before (the whole extent if `at` is not
    /// inside it) and the rest, if any, its host offset advanced to match.
    pub fn split_at(&self, at: u64) -> (Extent, Option<Extent>) {
        if at <= self.start.0 || at >= self.end().0 {
            return (*self, None);
        }
        let head_len = at - self.start.0;
        let head = Extent {
            len: head_len,
            ..*self
        };
        let rest = Extent {
            start: GuestOffset(at),
            len: self.len - head_len,
            host: self.host.map(|h| HostLocation {
                offset: HostOffset(h.offset.0 + head_len),
                ..h
            }),
            ..*self
        };
        (head, Some(rest))
    }

    /// True if the layer at `depth` stores the range as data (compressed or not).
    pub fn is_data(&self) -> bool {
        matches!(self.kind, ExtentKind::Data { .. })
    }

    /// True if the layer at `depth` provides the range (qemu's "present"/allocated).
    pub fn is_allocated(&self) -> bool {
        !matches!(self.kind, ExtentKind::Unallocated)
    }
}

/// Reads guest data of an image (and whatever is below it), and says what lies where.
pub trait GuestRead: Send + Sync {
    /// The guest-visible size in bytes.
    fn virtual_size(&self) -> u64;

    /// Fills `buf` with guest bytes starting at `offset`; the range must lie inside the disk.
    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()>;

    /// This layer's own answer for the range starting at `start` (inside the disk), at most
    /// `max_len` (≥ 1) bytes and not past the end of the disk: depth 0, and
    /// [`ExtentKind::Unallocated`] where the layer below must be asked. The answer may be
    /// shorter than asked; it is never empty.
    fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent>;

    /// The image below this one (backing file, VDI parent), if one was opened.
    fn below(&self) -> Option<&dyn GuestRead> {
        None
    }

    /// The file this layer was opened from, when the opener recorded it.
    fn path(&self) -> Option<&Path> {
        None
    }

    /// The path of the file holding `file`'s bytes, when the opener recorded it: the image's
    /// own path, or its external data file's.
    fn host_path(&self, file: HostFile) -> Option<&Path> {
        match file {
            HostFile::Image => self.path(),
            HostFile::DataFile => None,
        }
    }

    /// The open file behind `file`, when it is a real file whose bytes at the offsets of
    /// [`Extent::host`] are the guest bytes verbatim (for `copy_file_range`).
    fn host_fd(&self, file: HostFile) -> Option<BorrowedFd<'_>> {
        let _ = file;
        None
    }
}

impl GuestRead for Box<dyn GuestRead> {
    fn virtual_size(&self) -> u64 {
        (**self).virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        (**self).read_at(buf, offset)
    }
    fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
        (**self).block_status(start, max_len)
    }
    fn below(&self) -> Option<&dyn GuestRead> {
        (**self).below()
    }
    fn path(&self) -> Option<&Path> {
        (**self).path()
    }
    fn host_path(&self, file: HostFile) -> Option<&Path> {
        (**self).host_path(file)
    }
    fn host_fd(&self, file: HostFile) -> Option<BorrowedFd<'_>> {
        (**self).host_fd(file)
    }
}

/// A layer together with the path it was opened from and its external data file's, if any
/// (for `map`'s file column).
pub(crate) struct Named {
    inner: Box<dyn GuestRead>,
    path: PathBuf,
    data_file: Option<PathBuf>,
}

impl Named {
    /// Records `path` as the file of `inner`.
    pub fn new(inner: Box<dyn GuestRead>, path: PathBuf) -> Self {
        Self {
            inner,
            path,
            data_file: None,
        }
    }

    /// Records `data_file` as the path of the layer's external data file.
    pub fn with_data_file(mut self, data_file: Option<PathBuf>) -> Self {
        self.data_file = data_file;
        self
    }
}

impl GuestRead for Named {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }
    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        self.inner.read_at(buf, offset)
    }
    fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
        self.inner.block_status(start, max_len)
    }
    fn below(&self) -> Option<&dyn GuestRead> {
        self.inner.below()
    }
    fn path(&self) -> Option<&Path> {
        Some(&self.path)
    }
    fn host_path(&self, file: HostFile) -> Option<&Path> {
        match file {
            HostFile::Image => Some(&self.path),
            HostFile::DataFile => self.data_file.as_deref(),
        }
    }
    fn host_fd(&self, file: HostFile) -> Option<BorrowedFd<'_>> {
        self.inner.host_fd(file)
    }
}

/// Reads `buf.len()` bytes at `offset` from an optional lower image: bytes beyond the lower
/// image's size (or with no lower image at all) read as zeros, as qemu defines for backing files.
pub(crate) fn read_below(
    below: Option<&dyn GuestRead>,
    buf: &mut [u8],
    offset: GuestOffset,
) -> Result<()> {
    let Some(below) = below else {
        buf.fill(0);
        return Ok(());
    };
    let size = below.virtual_size();
    let inside = size.saturating_sub(offset.0).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(inside);
    if !head.is_empty() {
        below.read_at(head, offset)?;
    }
    tail.fill(0);
    Ok(())
}

/// Refuses reads outside `0..size`.
pub(crate) fn check_range(offset: u64, len: usize, size: u64) -> Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange {
            offset,
            len: len as u64,
            size,
        }),
    }
}
