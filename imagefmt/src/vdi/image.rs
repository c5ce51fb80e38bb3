//! An open VDI image: reading guest data through the block map (falling through to the parent
//! for never-written blocks), and writing it.
//!
//! Reading: virtual block `b` (1 MiB) has map entry `map[b]`. FREE (0xFFFFFFFF) reads from the
//! image below (the parent of a differencing image; zeros without one or past its end), ZERO
//! (0xFFFFFFFE) reads zeros, and index `i` reads at `offset_data + i × 1 MiB`. A read of an
//! allocated block whose bytes are not inside the file is an error, as in VirtualBox
//! (VERR_VD_READ_OUT_OF_RANGE). Every map entry is validated on open (index below
//! `blocks_allocated`, no index used twice) and the map is read only once it is known to lie
//! inside the file, so a hostile header cannot make us allocate more than the file holds.
//!
//! Writing ([`VdiImage::open_rw`]): writes into an allocated block go in place. A write into a
//! FREE or ZERO block allocates a new data block appended at index `blocks_allocated` (the only
//! place VirtualBox and qemu ever append), filled whole: the bytes not written come from the
//! parent for a FREE block (copy-on-write) and are zeros for a ZERO block. Whole-block zero writes
//! and discards need no data block: they set the ZERO entry (which also hides the parent in a
//! differencing image, as VirtualBox does for zero writes).
//!
//! Write ordering of an allocation, as VirtualBox (`vdiUpdateBlockInfo`: header, then the one map
//! entry) and qemu (`vdi_co_pwritev`: header, then map sectors) do it:
//!
//! 1. the whole data block at `offset_data + n × 1 MiB` (`n` = `blocks_allocated`);
//! 2. the header with `blocks_allocated = n + 1`;
//! 3. (durable mode: fsync) the block map entry pointing at `n`.
//!
//! A crash between any two steps leaves at worst a data block no entry points at (a leak, which
//! VirtualBox ignores, `qemu-img check` reports and the next discard trims when it is last).
//! Writing the map entry before the header count would be worse: a crash in between leaves an
//! entry pointing at index `n` while the header still says `n` blocks, so the next allocation by
//! any tool would hand out `n` a second time and two virtual blocks would share data.
//!
//! Freeing (whole-block [`VdiImage::write_zeroes`] and [`VdiImage::discard`] on an allocated
//! block of a dynamic or differencing image) does what VirtualBox's discard does, so files shrink
//! and indices stay dense: the entry becomes ZERO; the last data block (if in use) is copied into
//! the hole and its entry repointed; then trailing unused data blocks are dropped from the header
//! count and the file is truncated. Each step leaves at worst a leak. In durable mode an fsync
//! separates the dependent steps; otherwise the same holds for a crash of this process (the
//! kernel keeps the page cache) and [`VdiImage::flush`] makes everything durable.
//!
//! Fixed (static) images keep their preallocated data blocks: writes, including zero writes, go
//! in place, and discard does nothing (as qemu, which has no discard for VDI).
//!
//! The first modification of an image opened for writing gives it a fresh modification UUID, as
//! VirtualBox does (`vdSetModifiedFlag`): differencing images made on it before then can tell
//! (see [`super::ParentLink::modification_matches`]).

use std::fmt;

use uuid::Uuid;

use super::parent::ParentLink;
use super::{BlockEntry, BlockMap, ImageType, VdiError, VdiHeader, DEFAULT_BLOCK_SIZE};
use crate::extent::{
    check_range, read_below, Extent, ExtentKind, GuestRead, HostFile, HostLocation,
};
use crate::io::Backend;
use crate::offsets::{GuestOffset, HostOffset};
use crate::{Error, Result};

/// Reads the block map bytes of the image described by `header` (undecoded) and the file's
/// length, after checking that the map lies inside the file: a hostile header cannot make this
/// allocate more than the file holds.
pub(super) fn read_raw_block_map<B: Backend + ?Sized>(
    backend: &B,
    header: &VdiHeader,
) -> Result<(Vec<u8>, u64)> {
    let file_len = backend.len().map_err(Error::reading("VDI file length"))?;
    let offset = u64::from(header.offset_blocks);
    let len = header.block_map_len_bytes();
    let beyond = || VdiError::BlockMapBeyondEndOfFile {
        offset,
        len,
        file_len,
    };
    if offset.checked_add(len).is_none_or(|end| end > file_len) {
        return Err(beyond().into());
    }
    // Inside the file, so no larger than it.
    let mut raw = vec![0u8; usize::try_from(len).map_err(|_| beyond())?];
    backend
        .read_exact_at(&mut raw, offset)
        .map_err(Error::reading("VDI block map"))?;
    Ok((raw, file_len))
}

/// Marks a data block no map entry uses.
const UNUSED: u32 = u32::MAX;

/// A VDI image opened for reading (and, through [`VdiImage::open_rw`], writing) guest data.
pub struct VdiImage<B> {
    backend: B,
    header: VdiHeader,
    map: BlockMap,
    file_len: u64,
    below: Option<Box<dyn GuestRead>>,
    writer: Option<WriteState>,
    pub(crate) links: Vec<ParentLink>,
}

/// What an image open for writing keeps besides the map.
struct WriteState {
    durable: bool,
    /// The modification UUID was refreshed in this session.
    modified: bool,
    /// For each data block index below `blocks_allocated`: the virtual block using it, or
    /// [`UNUSED`].
    owner: Vec<u32>,
}

impl<B> fmt::Debug for VdiImage<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VdiImage")
            .field("header", &self.header)
            .field("file_len", &self.file_len)
            .field("has_parent", &self.below.is_some())
            .field("writable", &self.writer.is_some())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> VdiImage<B> {
    /// Opens the image whose header is `header` (from [`VdiHeader::parse`]) on `backend`, reading
    /// FREE blocks from `below` (zeros if `None`).
    ///
    /// The block map must lie inside the file (checked before it is read) and pass
    /// [`BlockMap::parse`]. A differencing image opened without `below` reads its FREE blocks as
    /// zeros (a detached view); [`crate::chain::open_vdi`] finds and attaches the parent.
    pub fn open(backend: B, header: VdiHeader, below: Option<Box<dyn GuestRead>>) -> Result<Self> {
        // Re-checked so that a header built by hand cannot make block arithmetic divide by zero.
        if header.block_size != DEFAULT_BLOCK_SIZE {
            return Err(VdiError::UnsupportedBlockSize {
                found: header.block_size,
            }
            .into());
        }
        if header.block_extra != 0 {
            return Err(VdiError::BlockExtraNotSupported {
                found: header.block_extra,
            }
            .into());
        }
        let (raw, file_len) = read_raw_block_map(&backend, &header)?;
        let map = BlockMap::parse(&raw, &header)?;
        Ok(Self {
            backend,
            header,
            map,
            file_len,
            below,
            writer: None,
            links: Vec::new(),
        })
    }

    /// The image's header (as last written, when open for writing).
    pub fn header(&self) -> &VdiHeader {
        &self.header
    }

    /// The image's block map.
    pub fn block_map(&self) -> &BlockMap {
        &self.map
    }

    /// The storage under the image (e.g. to take the bytes of an in-memory image).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The links from this image down its chain of parents, nearest first (empty for a base or
    /// an image opened without its parents). Each tells whether the parent's modification UUID
    /// still is the one the child recorded.
    pub fn parent_links(&self) -> &[ParentLink] {
        &self.links
    }

    /// True if the image has a parent (or other image) below it.
    pub fn has_below(&self) -> bool {
        self.below.is_some()
    }

    fn block_size(&self) -> u64 {
        u64::from(self.header.block_size)
    }

    /// The map entry of virtual block `block`; an error (not a panic) past the map.
    fn entry(&self, block: u64) -> Result<BlockEntry> {
        let blocks = self.map.len();
        u32::try_from(block)
            .ok()
            .and_then(|b| self.map.get(b))
            .ok_or_else(|| {
                VdiError::BlockOutOfRange {
                    block: u32::try_from(block).unwrap_or(u32::MAX),
                    blocks,
                }
                .into()
            })
    }

    /// Reads from data block `index` (used by virtual block `block`) at `in_block`.
    fn read_data(&self, block: u64, index: u32, in_block: u64, buf: &mut [u8]) -> Result<()> {
        let host_offset = self.header.data_block_offset(index) + in_block;
        let inside = host_offset
            .checked_add(buf.len() as u64)
            .is_some_and(|end| end <= self.file_len);
        if !inside {
            return Err(VdiError::ReadOutOfRange {
                block: u32::try_from(block).unwrap_or(u32::MAX),
                index,
                host_offset,
                file_len: self.file_len,
            }
            .into());
        }
        self.backend
            .read_exact_at(buf, host_offset)
            .map_err(Error::reading("VDI data block"))
    }
}

impl<B: Backend + Send + Sync> GuestRead for VdiImage<B> {
    fn virtual_size(&self) -> u64 {
        self.header.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_range(offset.0, buf.len(), self.header.virtual_size())?;
        let block_size = self.block_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset.0 + done as u64;
            let (block, in_block) = (pos / block_size, pos % block_size);
            // One piece never crosses a block boundary.
            let len = (block_size - in_block).min((buf.len() - done) as u64) as usize;
            let piece = &mut buf[done..done + len];
            match self.entry(block)? {
                BlockEntry::Free => read_below(self.below.as_deref(), piece, GuestOffset(pos))?,
                BlockEntry::Zero => piece.fill(0),
                BlockEntry::Allocated(index) => self.read_data(block, index, in_block, piece)?,
            }
            done += len;
        }
        Ok(())
    }

    /// qemu's `vdi_co_block_status`, block by block, merging blocks with the same status (and
    /// contiguous data): an allocated block is data at its host offset; ZERO and, in a base,
    /// FREE read as zeros; FREE in a differencing image is unallocated (the parent answers).
    fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
        let size = self.header.virtual_size();
        check_range(start.0, 1, size)?;
        let end = start.0 + max_len.min(size - start.0).max(1);
        let block_size = self.block_size();
        let status = |pos: u64| -> Result<(ExtentKind, Option<HostLocation>)> {
            let (block, in_block) = (pos / block_size, pos % block_size);
            Ok(match self.entry(block)? {
                BlockEntry::Allocated(index) => (
                    ExtentKind::DATA,
                    Some(HostLocation {
                        file: HostFile::Image,
                        offset: HostOffset(self.header.data_block_offset(index) + in_block),
                    }),
                ),
                BlockEntry::Free if self.header.is_differencing() => {
                    (ExtentKind::Unallocated, None)
                }
                BlockEntry::Free | BlockEntry::Zero => (ExtentKind::Zero, None),
            })
        };
        let (kind, host) = status(start.0)?;
        let mut extent = Extent {
            start,
            len: (block_size - start.0 % block_size).min(end - start.0),
            depth: 0,
            kind,
            host,
        };
        while extent.end().0 < end {
            let (kind, host) = status(extent.end().0)?;
            let contiguous = match (extent.host, host) {
                (None, None) => true,
                (Some(a), Some(b)) => a.offset.checked_add(extent.len) == Some(b.offset),
                _ => false,
            };
            if kind != extent.kind || !contiguous {
                break;
            }
            extent.len += block_size.min(end - extent.end().0);
        }
        Ok(extent)
    }

    fn below(&self) -> Option<&dyn GuestRead> {
        self.below.as_deref()
    }

    fn host_fd(&self, file: HostFile) -> Option<std::os::fd::BorrowedFd<'_>> {
        match file {
            HostFile::Image => self.backend.as_fd(),
            HostFile::DataFile => None,
        }
    }
}

impl<B: Backend + Send + Sync> VdiImage<B> {
    /// Opens an image for reading and writing; `below` is its parent chain (read-only), which a
    /// differencing image must have (copy-on-write reads it).
    ///
    /// Refused: a data area shorter than `blocks_allocated` whole blocks (new blocks would be
    /// appended after a hole). With `durable`, an fsync separates dependent metadata updates.
    pub fn open_rw(
        backend: B,
        header: VdiHeader,
        below: Option<Box<dyn GuestRead>>,
        durable: bool,
    ) -> Result<Self> {
        if header.is_differencing() && below.is_none() {
            return Err(VdiError::ParentRequired.into());
        }
        let mut image = Self::open(backend, header, below)?;
        let needed = image.header.allocated_end();
        if image.file_len < needed {
            return Err(VdiError::DataAreaTruncated {
                allocated: image.header.blocks_allocated,
                needed,
                file_len: image.file_len,
            }
            .into());
        }
        // blocks_allocated ≤ blocks_in_image (validated), so this is no larger than the map.
        let mut owner = vec![UNUSED; image.header.blocks_allocated as usize];
        for block in 0..image.map.len() {
            if let Some(BlockEntry::Allocated(index)) = image.map.get(block) {
                if let Some(slot) = owner.get_mut(index as usize) {
                    *slot = block;
                }
            }
        }
        image.writer = Some(WriteState {
            durable,
            modified: false,
            owner,
        });
        Ok(image)
    }

    /// Makes everything written so far durable (fsync).
    pub fn flush(&mut self) -> Result<()> {
        self.backend
            .sync_all()
            .map_err(Error::io("syncing VDI image"))
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.state()?;
        check_range(offset, buf.len(), self.header.virtual_size())?;
        let block_size = self.block_size();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let (block, in_block) = (pos / block_size, pos % block_size);
            let len = (block_size - in_block).min((buf.len() - done) as u64) as usize;
            self.write_piece(block, in_block, &buf[done..done + len])?;
            done += len;
        }
        Ok(())
    }

    /// Makes `len` bytes at `offset` read as zeros.
    ///
    /// Whole blocks need no data: a FREE or allocated block becomes ZERO (an allocated one is
    /// freed, see the module docs); partial blocks get zeros written (allocating with
    /// copy-on-write where the block is FREE and a parent lies below). Fixed images get zeros
    /// written in place.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.state()?;
        let size = self.header.virtual_size();
        let end = offset
            .checked_add(len)
            .filter(|&end| end <= size)
            .ok_or(crate::qcow2::Qcow2Error::ReadOutOfRange { offset, len, size })?;
        let block_size = self.block_size();
        let zeros = vec![0u8; block_size.min(len) as usize];
        let mut pos = offset;
        while pos < end {
            let (block, in_block) = (pos / block_size, pos % block_size);
            let piece = (block_size - in_block).min(end - pos);
            let whole = self.covers_block(block, in_block, piece);
            match self.entry(block)? {
                BlockEntry::Zero => {}
                BlockEntry::Free if self.below.is_none() => {}
                BlockEntry::Free if whole => {
                    self.begin_modification()?;
                    self.set_entry(block, BlockEntry::Zero)?;
                }
                BlockEntry::Allocated(index)
                    if whole && self.header.image_type != ImageType::Fixed =>
                {
                    self.begin_modification()?;
                    self.release(block, index)?;
                }
                _ => self.write_piece(block, in_block, &zeros[..piece as usize])?,
            }
            pos += piece;
        }
        Ok(())
    }

    /// Discards the whole blocks in the range: they read as zeros afterwards and their data
    /// blocks are freed (the file shrinks). Partial blocks are left as they are, as discard
    /// permits; the disk's last block counts as whole if the range reaches the end of the disk.
    /// Fixed images cannot free blocks: discard does nothing there.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        self.state()?;
        if self.header.image_type == ImageType::Fixed {
            return Ok(());
        }
        let size = self.header.virtual_size();
        let block_size = self.block_size();
        let end = offset.saturating_add(len).min(size);
        let start = offset
            .checked_next_multiple_of(block_size)
            .unwrap_or(u64::MAX);
        let whole_end = if end == size {
            end
        } else {
            end - end % block_size
        };
        if start >= whole_end {
            return Ok(());
        }
        self.write_zeroes(start, whole_end - start)
    }

    fn state(&mut self) -> Result<&mut WriteState> {
        self.writer
            .as_mut()
            .ok_or_else(|| VdiError::NotOpenForWriting.into())
    }

    /// True if `len` bytes at `in_block` of `block` cover the block, or all of it inside the
    /// disk (the last block of a disk that is not a whole number of blocks).
    fn covers_block(&self, block: u64, in_block: u64, len: u64) -> bool {
        let start = block * self.block_size();
        in_block == 0 && (len == self.block_size() || start + len == self.header.virtual_size())
    }

    /// Writes one piece lying inside virtual block `block`.
    fn write_piece(&mut self, block: u64, in_block: u64, data: &[u8]) -> Result<()> {
        let entry = self.entry(block)?;
        if let BlockEntry::Allocated(index) = entry {
            self.begin_modification()?;
            let host = self.header.data_block_offset(index) + in_block;
            return self
                .backend
                .write_all_at(data, host)
                .map_err(Error::writing("VDI data block"));
        }
        if data.iter().all(|&b| b == 0) {
            // As VirtualBox: zeros into a block that reads as zeros change nothing, and a whole
            // block of zeros needs only the ZERO entry.
            match entry {
                BlockEntry::Zero => return Ok(()),
                BlockEntry::Free if self.below.is_none() => return Ok(()),
                BlockEntry::Free if self.covers_block(block, in_block, data.len() as u64) => {
                    self.begin_modification()?;
                    return self.set_entry(block, BlockEntry::Zero);
                }
                _ => {}
            }
        }
        self.begin_modification()?;
        self.allocate(block, entry, in_block, data)
    }

    /// Appends a new data block for virtual block `block` (currently FREE or ZERO), filled with
    /// `data` at `in_block` and, around it, the parent's bytes (FREE) or zeros (ZERO).
    fn allocate(
        &mut self,
        block: u64,
        entry: BlockEntry,
        in_block: u64,
        data: &[u8],
    ) -> Result<()> {
        let index = self.header.blocks_allocated;
        if index >= self.header.blocks_in_image {
            return Err(VdiError::DataAreaFull {
                allocated: index,
                blocks: self.header.blocks_in_image,
            }
            .into());
        }
        let block_size = self.block_size();
        let mut buf = vec![0u8; block_size as usize];
        let start = block * block_size;
        // Copy-on-write: the parent's bytes around the write (none needed for a whole block).
        if entry == BlockEntry::Free && !self.covers_block(block, in_block, data.len() as u64) {
            let inside = (self.header.virtual_size() - start).min(block_size) as usize;
            read_below(
                self.below.as_deref(),
                &mut buf[..inside],
                GuestOffset(start),
            )?;
        }
        let at = in_block as usize;
        buf[at..at + data.len()].copy_from_slice(data);

        // 1. The data block, appended.
        let host = self.header.data_block_offset(index);
        self.backend
            .write_all_at(&buf, host)
            .map_err(Error::writing("VDI data block"))?;
        self.file_len = self.file_len.max(host + block_size);
        // 2. The header's count: from here the block is allocated (at worst leaked).
        self.set_allocated(index + 1)?;
        self.sync_if_durable()?;
        // 3. The map entry.
        let block = u32::try_from(block).unwrap_or(u32::MAX);
        self.set_entry(u64::from(block), BlockEntry::Allocated(index))?;
        if let Some(slot) = self.state()?.owner.get_mut(index as usize) {
            *slot = block;
        }
        Ok(())
    }

    /// Frees data block `index`, used by virtual block `block`, which then reads as zeros.
    fn release(&mut self, block: u64, index: u32) -> Result<()> {
        // 1. Unreference it (from here it is at worst leaked).
        self.set_entry(block, BlockEntry::Zero)?;
        self.mark_unused(index)?;
        self.sync_if_durable()?;
        // 2. Fill the hole with the last data block, if one uses it.
        let allocated = self.header.blocks_allocated;
        let last = allocated.saturating_sub(1);
        let moved = self.state()?.owner.get(last as usize).copied();
        if let Some(moved) = moved.filter(|&m| index < last && m != UNUSED) {
            let mut buf = vec![0u8; self.block_size() as usize];
            self.read_data(u64::from(moved), last, 0, &mut buf)?;
            self.backend
                .write_all_at(&buf, self.header.data_block_offset(index))
                .map_err(Error::writing("VDI data block"))?;
            self.sync_if_durable()?;
            self.set_entry(u64::from(moved), BlockEntry::Allocated(index))?;
            let owner = &mut self.state()?.owner;
            if let Some(slot) = owner.get_mut(index as usize) {
                *slot = moved;
            }
            if let Some(slot) = owner.get_mut(last as usize) {
                *slot = UNUSED;
            }
            self.sync_if_durable()?;
        }
        // 3. Drop unused data blocks from the end and shrink the file.
        let owner = &self.state()?.owner;
        let keep = owner
            .iter()
            .rposition(|&o| o != UNUSED)
            .map_or(0, |i| i + 1);
        let keep = u32::try_from(keep).unwrap_or(allocated);
        if keep < allocated {
            self.set_allocated(keep)?;
            self.state()?.owner.truncate(keep as usize);
            self.sync_if_durable()?;
            let end = self.header.allocated_end();
            if self.file_len > end {
                self.backend
                    .set_len(end)
                    .map_err(Error::writing("VDI file length"))?;
                self.file_len = end;
            }
        }
        Ok(())
    }

    fn mark_unused(&mut self, index: u32) -> Result<()> {
        if let Some(slot) = self.state()?.owner.get_mut(index as usize) {
            *slot = UNUSED;
        }
        Ok(())
    }

    /// Writes the map entry of `block` and records it.
    fn set_entry(&mut self, block: u64, entry: BlockEntry) -> Result<()> {
        let block32 = u32::try_from(block).unwrap_or(u32::MAX);
        // Validate before touching the file.
        self.map.check_set(block32, entry)?;
        let at = u64::from(self.header.offset_blocks) + 4 * u64::from(block32);
        self.backend
            .write_all_at(&entry.encode().to_le_bytes(), at)
            .map_err(Error::writing("VDI block map entry"))?;
        self.map.set(block32, entry)?;
        Ok(())
    }

    /// Writes the header with a new allocated-block count.
    fn set_allocated(&mut self, count: u32) -> Result<()> {
        let mut header = self.header.clone();
        header.blocks_allocated = count;
        self.write_header(&header)?;
        self.header = header;
        if let Some(state) = self.writer.as_mut() {
            state.owner.resize(count as usize, UNUSED);
        }
        Ok(())
    }

    fn write_header(&self, header: &VdiHeader) -> Result<()> {
        let bytes = header.to_bytes();
        self.backend
            .write_all_at(&bytes[..header.encoded_len()], 0)
            .map_err(Error::writing("VDI header"))
    }

    /// Gives the image a fresh modification UUID before its first change in this session.
    fn begin_modification(&mut self) -> Result<()> {
        if self.state()?.modified {
            return Ok(());
        }
        let mut header = self.header.clone();
        header.uuid_modify = Uuid::new_v4();
        self.write_header(&header)?;
        self.header = header;
        self.state()?.modified = true;
        Ok(())
    }

    fn sync_if_durable(&mut self) -> Result<()> {
        if self.state()?.durable {
            self.backend
                .sync_all()
                .map_err(Error::io("syncing VDI image"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::create::{write_differencing, write_dynamic, write_fixed};
    use super::*;
    use crate::io::MemBackend;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    /// Five and a half blocks: the last block is partial.
    const SIZE: u64 = 5 * MIB + MIB / 2;

    fn header_of(mem: &MemBackend) -> VdiHeader {
        let bytes = mem.to_vec();
        VdiHeader::parse(&bytes[..bytes.len().min(0x200)]).unwrap()
    }

    /// Re-opens image bytes read-only (checks what is on disk, not what is in memory).
    fn reopen(bytes: Vec<u8>, below: Option<Box<dyn GuestRead>>) -> VdiImage<MemBackend> {
        let mem = MemBackend::new(bytes);
        let header = header_of(&mem);
        VdiImage::open(mem, header, below).unwrap()
    }

    fn read_all(image: &dyn GuestRead) -> Vec<u8> {
        let mut buf = vec![0u8; image.virtual_size() as usize];
        image.read_at(&mut buf, GuestOffset(0)).unwrap();
        buf
    }

    fn new_base(fixed: bool) -> VdiImage<MemBackend> {
        let mem = MemBackend::default();
        let header = if fixed {
            write_fixed(&mem, SIZE).unwrap()
        } else {
            write_dynamic(&mem, SIZE).unwrap()
        };
        VdiImage::open_rw(mem, header, None, false).unwrap()
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed) | 1)
            .collect()
    }

    /// The on-disk invariants every writer step must keep: a valid map with dense, unique
    /// indices, and the file exactly as long as the allocated blocks.
    fn assert_consistent(image: &VdiImage<MemBackend>) {
        let bytes = image.backend().to_vec();
        let h = header_of(image.backend());
        assert_eq!(&h, image.header());
        let start = h.offset_blocks as usize;
        let map =
            BlockMap::parse(&bytes[start..start + h.block_map_len_bytes() as usize], &h).unwrap();
        assert_eq!(&map, image.block_map());
        let used = (0..map.len())
            .filter(|&b| matches!(map.get(b), Some(BlockEntry::Allocated(_))))
            .count() as u32;
        if h.image_type != ImageType::Fixed {
            assert_eq!(used, h.blocks_allocated, "no leaked data blocks");
            assert_eq!(bytes.len() as u64, h.allocated_end());
        }
    }

    #[test]
    fn dynamic_writes_allocate_densely_and_read_back() {
        let mut image = new_base(false);
        let mut model = vec![0u8; SIZE as usize];
        let writes = [
            (MIB + 4096, 4096usize, 1u8),
            (0, 512, 2),
            (3 * MIB - 100, 300, 3), // straddles blocks 2 and 3
            (SIZE - 1000, 1000, 4),  // the partial last block
            (MIB + 8192, 100, 5),    // into an allocated block
        ];
        for (offset, len, seed) in writes {
            let data = pattern(len, seed);
            image.write_at(&data, offset).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
            assert_consistent(&image);
        }
        assert_eq!(image.header().blocks_allocated, 5);
        // Appended in the order first written (FORMATS.md §2.6: block 1 first, then 0).
        assert_eq!(image.block_map().get(1), Some(BlockEntry::Allocated(0)));
        assert_eq!(image.block_map().get(0), Some(BlockEntry::Allocated(1)));
        assert_eq!(image.block_map().get(4), Some(BlockEntry::Free));
        assert_eq!(read_all(&image), model);
        assert_eq!(read_all(&reopen(image.backend().to_vec(), None)), model);
    }

    #[test]
    fn zero_writes_need_no_data_blocks() {
        let mut image = new_base(false);
        image.write_at(&vec![0u8; 4096], 0).unwrap();
        image.write_at(&vec![0u8; MIB as usize], MIB).unwrap();
        assert_eq!(image.header().blocks_allocated, 0);
        // A base's FREE block already reads as zeros: nothing to record.
        assert_eq!(image.block_map().get(1), Some(BlockEntry::Free));
        assert_consistent(&image);
    }

    #[test]
    fn first_write_refreshes_the_modification_uuid_once() {
        let mut image = new_base(false);
        let before = image.header().uuid_modify;
        let create = image.header().uuid_create;
        image.write_at(b"x", 10).unwrap();
        let after = image.header().uuid_modify;
        assert_ne!(before, after);
        image.write_at(b"y", 3 * MIB).unwrap();
        assert_eq!(image.header().uuid_modify, after);
        assert_eq!(image.header().uuid_create, create);
        assert_eq!(header_of(image.backend()).uuid_modify, after);
    }

    #[test]
    fn freeing_moves_the_last_block_into_the_hole_and_shrinks_the_file() {
        let mut image = new_base(false);
        let mut model = vec![0u8; SIZE as usize];
        for (i, block) in [2u64, 0, 4, 1].into_iter().enumerate() {
            let data = pattern(MIB as usize, i as u8 * 16);
            image.write_at(&data, block * MIB).unwrap();
            model[(block * MIB) as usize..((block + 1) * MIB) as usize].copy_from_slice(&data);
        }
        assert_eq!(image.header().blocks_allocated, 4);
        // Block 0 holds data block 1; block 1 (data block 3, the last) moves into its place.
        image.write_zeroes(0, MIB).unwrap();
        model[..MIB as usize].fill(0);
        assert_eq!(image.block_map().get(0), Some(BlockEntry::Zero));
        assert_eq!(image.block_map().get(1), Some(BlockEntry::Allocated(1)));
        assert_eq!(image.header().blocks_allocated, 3);
        assert_consistent(&image);
        assert_eq!(read_all(&image), model);
        // Discard: partial blocks stay; whole ones (the last, partial block counts as whole when
        // the range reaches the end of the disk) are freed.
        image.discard(MIB + 1, SIZE - MIB - 1).unwrap();
        for block in 2..6 {
            let start = (block * MIB) as usize;
            let end = (((block + 1) * MIB).min(SIZE)) as usize;
            model[start..end].fill(0);
        }
        // Freeing block 2 (data 0) moved block 4 (data 2) there; freeing block 4 then moved
        // block 1 (data 1, the last) into data block 0.
        assert_eq!(image.block_map().get(1), Some(BlockEntry::Allocated(0)));
        assert_eq!(image.header().blocks_allocated, 1);
        assert_consistent(&image);
        assert_eq!(read_all(&image), model);
        assert_eq!(read_all(&reopen(image.backend().to_vec(), None)), model);
    }

    #[test]
    fn fixed_images_write_in_place_and_keep_their_blocks() {
        let mut image = new_base(true);
        let len = image.backend().len().unwrap();
        let mut model = vec![0u8; SIZE as usize];
        let data = pattern(3000, 9);
        image.write_at(&data, 2 * MIB - 1500).unwrap();
        model[(2 * MIB - 1500) as usize..(2 * MIB + 1500) as usize].copy_from_slice(&data);
        image.write_zeroes(2 * MIB - 1000, MIB).unwrap();
        model[(2 * MIB - 1000) as usize..(3 * MIB - 1000) as usize].fill(0);
        image.discard(0, SIZE).unwrap();
        assert_eq!(image.backend().len().unwrap(), len);
        for block in 0..6 {
            assert_eq!(
                image.block_map().get(block),
                Some(BlockEntry::Allocated(block))
            );
        }
        assert_consistent(&image);
        assert_eq!(read_all(&image), model);
    }

    /// A base with data in blocks 0..=2, and a differencing image on it.
    fn base_and_diff() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut base = new_base(false);
        let data = pattern(3 * MIB as usize, 7);
        base.write_at(&data, 0).unwrap();
        let mut model = vec![0u8; SIZE as usize];
        model[..data.len()].copy_from_slice(&data);
        let diff = MemBackend::default();
        write_differencing(&diff, base.header()).unwrap();
        (base.backend().to_vec(), diff.into_inner(), model)
    }

    fn open_diff_rw(base: &[u8], diff: Vec<u8>) -> VdiImage<MemBackend> {
        let below: Box<dyn GuestRead> = Box::new(reopen(base.to_vec(), None));
        let mem = MemBackend::new(diff);
        let header = header_of(&mem);
        VdiImage::open_rw(mem, header, Some(below), false).unwrap()
    }

    #[test]
    fn differencing_writes_copy_the_parent_around_them() {
        let (base, diff, mut model) = base_and_diff();
        let mut image = open_diff_rw(&base, diff);
        assert_eq!(read_all(&image), model);
        let data = pattern(5000, 42);
        image.write_at(&data, MIB - 2500).unwrap(); // straddles blocks 0 and 1
        model[(MIB - 2500) as usize..(MIB + 2500) as usize].copy_from_slice(&data);
        // Zeros over parent data: partial → a data block; whole → ZERO entry (hides the parent).
        image.write_zeroes(2 * MIB + 10, 20).unwrap();
        model[(2 * MIB + 10) as usize..(2 * MIB + 30) as usize].fill(0);
        image.write_at(&vec![0u8; MIB as usize], 0).unwrap();
        model[..MIB as usize].fill(0);
        assert_eq!(image.block_map().get(3), Some(BlockEntry::Free));
        assert_consistent(&image);
        assert_eq!(read_all(&image), model);
        let below: Box<dyn GuestRead> = Box::new(reopen(base.clone(), None));
        assert_eq!(
            read_all(&reopen(image.backend().to_vec(), Some(below))),
            model
        );
        // Detached, FREE blocks read as zeros.
        let detached = read_all(&reopen(image.backend().to_vec(), None));
        assert!(detached[3 * MIB as usize..].iter().all(|&b| b == 0));
    }

    #[test]
    fn refusals_are_errors_not_panics() {
        let (base, diff, _) = base_and_diff();
        // Writing a read-only image.
        let mut ro = reopen(base.clone(), None);
        assert!(matches!(
            ro.write_at(b"x", 0),
            Err(Error::Vdi(VdiError::NotOpenForWriting))
        ));
        // A differencing image written without its parent.
        let mem = MemBackend::new(diff);
        let header = header_of(&mem);
        assert!(matches!(
            VdiImage::open_rw(mem, header, None, false),
            Err(Error::Vdi(VdiError::ParentRequired))
        ));
        // A block map past the end of the file is refused before anything is allocated.
        let header = VdiHeader::parse(&base[..0x200]).unwrap();
        let short = MemBackend::new(base[..0x10_0000 + 8].to_vec());
        assert!(matches!(
            VdiImage::open(short, header.clone(), None),
            Err(Error::Vdi(VdiError::BlockMapBeyondEndOfFile { .. }))
        ));
        // A truncated data area: reads of the missing block fail, writing is refused.
        let cut = header.allocated_end() - MIB / 2;
        let truncated = MemBackend::new(base[..cut as usize].to_vec());
        let image = VdiImage::open(&truncated, header.clone(), None).unwrap();
        let mut buf = vec![0u8; 4096];
        image.read_at(&mut buf, GuestOffset(0)).unwrap();
        let last_block = (0..3)
            .find(|&b| image.block_map().get(b) == Some(BlockEntry::Allocated(2)))
            .unwrap();
        let e = image
            .read_at(
                &mut buf,
                GuestOffset(u64::from(last_block) * MIB + MIB - 4096),
            )
            .unwrap_err();
        assert!(
            matches!(e, Error::Vdi(VdiError::ReadOutOfRange { .. })),
            "{e}"
        );
        assert!(matches!(
            VdiImage::open_rw(&truncated, header.clone(), None, false),
            Err(Error::Vdi(VdiError::DataAreaTruncated { .. }))
        ));
        // Reads outside the disk.
        assert!(image.read_at(&mut buf, GuestOffset(SIZE - 100)).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Write(u64, usize, u8),
        Zeroes(u64, u64),
        Discard(u64, u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let offset = prop_oneof![
            0..SIZE,
            (0..6u64).prop_map(|b| b * MIB),
            (1..6u64).prop_map(|b| b * MIB - 512),
        ];
        let len = prop_oneof![1..5000u64, Just(MIB), MIB - 512..2 * MIB + 512];
        (0..3u8, offset, len, any::<u8>()).prop_map(|(kind, offset, len, seed)| {
            let len = len.min(SIZE - offset).max(1).min(SIZE - offset);
            match kind {
                0 => Op::Write(offset, len as usize, seed),
                1 => Op::Zeroes(offset, len),
                _ => Op::Discard(offset, len),
            }
        })
    }

    fn apply(image: &mut VdiImage<MemBackend>, model: &mut [u8], op: &Op) {
        match *op {
            Op::Write(offset, len, seed) => {
                let data = pattern(len, seed);
                image.write_at(&data, offset).unwrap();
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            Op::Zeroes(offset, len) => {
                image.write_zeroes(offset, len).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            Op::Discard(offset, len) => {
                image.discard(offset, len).unwrap();
                if image.header().image_type != ImageType::Fixed {
                    let end = (offset + len).min(SIZE);
                    let start = offset.next_multiple_of(MIB);
                    let whole_end = if end == SIZE { end } else { end - end % MIB };
                    if start < whole_end {
                        model[start as usize..whole_end as usize].fill(0);
                    }
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]

        #[test]
        fn random_ops_match_a_model(
            kind in 0u8..3,
            ops in proptest::collection::vec(op(), 1..10),
        ) {
            let (base, diff, base_model) = base_and_diff();
            let (mut image, mut model) = match kind {
                0 => (new_base(false), vec![0u8; SIZE as usize]),
                1 => (new_base(true), vec![0u8; SIZE as usize]),
                _ => (open_diff_rw(&base, diff), base_model),
            };
            for op in &ops {
                apply(&mut image, &mut model, op);
                assert_consistent(&image);
            }
            prop_assert_eq!(read_all(&image), model.clone());
            let below = (kind == 2)
                .then(|| Box::new(reopen(base.clone(), None)) as Box<dyn GuestRead>);
            prop_assert_eq!(read_all(&reopen(image.backend().to_vec(), below)), model);
        }

        #[test]
        fn hostile_images_never_panic(
            edits in proptest::collection::vec((0usize..0x1000, any::<u8>()), 1..12),
            map_edits in proptest::collection::vec((0usize..8, any::<u32>()), 0..4),
            cut in 0usize..(3 << 20),
        ) {
            let (base, _, _) = base_and_diff();
            let mut bytes = base;
            for (at, value) in edits {
                let at = if at < 0x200 { at } else { 0x10_0000 + at };
                bytes[at] = value;
            }
            for (entry, value) in map_edits {
                let at = 0x10_0000 + 4 * entry;
                bytes[at..at + 4].copy_from_slice(&value.to_le_bytes());
            }
            bytes.truncate(bytes.len().saturating_sub(cut));
            let Ok(header) = VdiHeader::parse(&bytes[..bytes.len().min(0x200)]) else {
                return Ok(());
            };
            let mem = MemBackend::new(bytes);
            if let Ok(image) = VdiImage::open(&mem, header.clone(), None) {
                let size = image.virtual_size().min(8 << 20);
                let mut buf = vec![0u8; MIB as usize];
                let mut pos = 0;
                while pos < size {
                    let len = (size - pos).min(MIB);
                    let _ = image.read_at(&mut buf[..len as usize], GuestOffset(pos));
                    pos += len;
                }
            }
            if let Ok(mut image) = VdiImage::open_rw(&mem, header, None, false) {
                let size = image.virtual_size();
                let _ = image.write_at(b"data", size / 2);
                let _ = image.write_zeroes(0, size.min(2 * MIB));
                let _ = image.discard(0, size);
            }
        }
    }
}
