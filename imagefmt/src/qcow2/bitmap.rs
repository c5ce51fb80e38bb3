//! Persistent dirty bitmaps: the bitmaps extension's directory, bitmap tables and bitmap data,
//! and the operations `qemu-img bitmap` performs on them.
//!
//! Spec: qemu `docs/interop/qcow2.rst`, "Bitmaps extension", "Bitmap directory", "Bitmap
//! table", "Bitmap data"; the bounds are qemu's (`block/qcow2-bitmap.c`); FORMATS.md §1.3.
//!
//! ```text
//! header extension 0x23852875 ─► bitmap directory (entries of 24 bytes + name, padded to 8)
//!                                   │ table offset, table size, flags, type, granularity, name
//!                                   ▼
//!                                bitmap table (u64 per cluster of bitmap data)
//!                                   │ 0: all zeros, 1: all ones, else host cluster offset
//!                                   ▼
//!                                bitmap data: bit i (LSB first) = guest bytes [i·g, (i+1)·g)
//! ```
//!
//! The extension is trusted only while the autoclear bit "bitmaps" is set. [`parse_directory`]
//! is a pure slice decoder (fuzzed) with every check qemu's `bitmap_list_load` makes; the
//! image-level functions read at most the directory (≤ 64 MiB, qemu's limit, and never more
//! than the file holds) and one bitmap table at a time (≤ 8 MiB, since qemu caps bitmap data at
//! 512 MiB). Bitmap data is changed in place, a few bytes at a time, only in clusters whose
//! refcount is exactly 1.
//!
//! Writers keep enabled bitmaps exact: every guest write, zero write and discard sets the bits
//! of its range in every enabled (`auto`) bitmap that is not `in_use`, before the data is
//! written (see ARCHITECTURE.md, "Persistent dirty bitmaps").

use bitflags::bitflags;
use byteorder::{BigEndian, ByteOrder};
use thiserror::Error;

use super::extensions::{BitmapsExtension, Extension, MAX_BITMAPS, MAX_BITMAP_DIRECTORY_SIZE};
use super::features::AutoclearFeatures;
use super::header::Version;
use super::header_cluster::HeaderCluster;
use super::image::Qcow2Image;
use crate::io::Backend;
use crate::{Error, Result};

/// qemu's `BME_MAX_TABLE_SIZE`: most entries in one bitmap table.
pub const MAX_TABLE_SIZE: u64 = 0x800_0000;
/// qemu's `BME_MAX_PHYS_SIZE`: most bytes of data one bitmap may occupy.
pub const MAX_PHYS_SIZE: u64 = 0x2000_0000;
/// Smallest granularity qemu supports: 512 bytes.
pub const MIN_GRANULARITY_BITS: u8 = 9;
/// Largest granularity qemu supports: 2 GiB.
pub const MAX_GRANULARITY_BITS: u8 = 31;
/// Longest bitmap name qemu supports, in bytes.
pub const MAX_NAME_SIZE: usize = 1023;
/// Fixed part of a directory entry.
pub const DIR_ENTRY_LEN: usize = 24;
/// Directory entry type 1: dirty tracking bitmap (the only type defined).
pub const TYPE_DIRTY_TRACKING: u8 = 1;
/// Bitmap table entry: reserved bits 1-8 and 56-63.
pub const TABLE_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry: host cluster offset, bits 9-55.
pub const TABLE_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bit 0 with offset 0: the cluster reads as all ones.
pub const TABLE_ALL_ONES: u64 = 1;

bitflags! {
    /// Bitmap directory entry flags (bytes 12-15).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct BitmapFlags: u32 {
        /// Bit 0: the bitmap was not saved correctly and may be inconsistent.
        const IN_USE = 1 << 0;
        /// Bit 1: the bitmap is enabled: it must reflect every change of the virtual disk.
        const AUTO = 1 << 1;
        /// Bit 2: unknown extra data may be left as is. qemu knows no extra data and treats
        /// this bit as reserved, and so does this implementation.
        const EXTRA_DATA_COMPATIBLE = 1 << 2;
    }
}

/// Flags qemu accepts (`BME_RESERVED_FLAGS` is everything else).
const KNOWN_FLAGS: BitmapFlags = BitmapFlags::IN_USE.union(BitmapFlags::AUTO);

/// What is wrong with a bitmap or a bitmap request; the messages are qemu's.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BitmapError {
    /// The extension says the directory is empty.
    #[error("Requested bitmap directory size is zero")]
    DirectorySizeZero,
    /// The extension's directory size exceeds qemu's limit.
    #[error("Requested bitmap directory size is too big")]
    DirectoryTooBig,
    /// An entry runs past the directory, or the entries do not end where it does.
    #[error("Broken bitmap directory")]
    BrokenDirectory,
    /// The directory holds more entries than the extension says.
    #[error("More bitmaps found than specified in header extension")]
    MoreThanExtension,
    /// The directory holds fewer entries than the extension says.
    #[error("Less bitmaps found than specified in header extension")]
    LessThanExtension,
    /// An entry has extra data (none is defined).
    #[error("Bitmap extra data is not supported")]
    ExtraData,
    /// An entry breaks one of qemu's bounds (table, granularity, flags, name, type, size).
    #[error("Bitmap '{name}' doesn't satisfy the constraints")]
    Constraints {
        /// The bitmap's name.
        name: String,
    },
    /// A bitmap table entry has reserved bits or an unaligned offset.
    #[error("Could not read bitmap_table table from image for bitmap '{name}': Invalid argument")]
    InvalidTable {
        /// The bitmap's name.
        name: String,
    },
    /// No bitmap has this name.
    #[error("Dirty bitmap '{name}' not found")]
    NotFound {
        /// The name asked for.
        name: String,
    },
    /// `--add` of a name that exists.
    #[error("Bitmap already exists: {name}")]
    Exists {
        /// The name.
        name: String,
    },
    /// `--add` with an empty name.
    #[error("Bitmap name cannot be empty")]
    EmptyName,
    /// A granularity that is not a power of two in 512 B..=2 GiB.
    #[error("Granularity must be power of 2 and at least 512")]
    Granularity,
    /// The bitmap cannot be stored in this image (qemu's `can_store_new_dirty_bitmap`).
    #[error("Can't make bitmap '{name}' persistent in '{image}': {reason}")]
    CannotStore {
        /// The bitmap's name.
        name: String,
        /// The image, as named by the caller.
        image: String,
        /// Why not.
        reason: &'static str,
    },
    /// The image's format has no persistent bitmaps (raw, VDI).
    #[error("Can't store persistent bitmaps to {image}: Operation not supported")]
    NotSupported {
        /// The image, as named by the caller.
        image: String,
    },
    /// The bitmap is flagged `in_use`: its contents cannot be trusted.
    #[error("Bitmap '{name}' is inconsistent and cannot be used\nTry block-dirty-bitmap-remove to delete this bitmap from disk")]
    Inconsistent {
        /// The bitmap's name.
        name: String,
    },
    /// `--merge` of bitmaps of disks of different sizes.
    #[error("Bitmaps are of different sizes (destination size is {destination}, source size is {source_size}) and can't be merged")]
    SizeMismatch {
        /// Destination disk size.
        destination: u64,
        /// Source disk size.
        source_size: u64,
    },
    /// A bitmap structure shares a cluster with something else: changing it in place could
    /// overwrite other data.
    #[error("bitmap cluster at {offset:#x} is shared or overlaps metadata; repair the image with check -r all first")]
    SharedCluster {
        /// Host offset of the cluster.
        offset: u64,
    },
}

impl From<BitmapError> for Error {
    fn from(e: BitmapError) -> Self {
        super::Qcow2Error::Bitmap(e).into()
    }
}

/// One bitmap directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    /// Offset of the bitmap table (cluster-aligned).
    pub table_offset: u64,
    /// Entries in the bitmap table.
    pub table_size: u32,
    /// Flags.
    pub flags: BitmapFlags,
    /// Bytes of guest disk per bit: `1 << granularity_bits`.
    pub granularity_bits: u8,
    /// The name, as stored (not NUL-terminated, not necessarily UTF-8).
    pub name: Vec<u8>,
}

impl BitmapEntry {
    /// Bytes of guest disk one bit stands for.
    pub fn granularity(&self) -> u64 {
        1 << self.granularity_bits
    }

    /// The name for messages and JSON (invalid UTF-8 replaced).
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(&self.name).into_owned()
    }

    /// True if the bitmap records writes (`auto`) and its contents can be trusted (not
    /// `in_use`).
    pub fn tracks_writes(&self) -> bool {
        self.flags.contains(BitmapFlags::AUTO) && !self.flags.contains(BitmapFlags::IN_USE)
    }

    /// Bytes this entry occupies in the directory.
    pub fn encoded_len(&self) -> usize {
        directory_entry_len(self.name.len())
    }

    /// qemu's `check_dir_entry` for an image of `cluster_size` and guest size `disk_size`.
    pub fn satisfies_constraints(&self, cluster_size: u64, disk_size: u64) -> bool {
        let phys = u64::from(self.table_size).saturating_mul(cluster_size);
        let granularity_ok =
            (MIN_GRANULARITY_BITS..=MAX_GRANULARITY_BITS).contains(&self.granularity_bits);
        // Shifted only once the granularity is known to be at most 31 bits.
        let covers_disk = || {
            let covered = (u128::from(phys) * 8) << self.granularity_bits;
            u128::from(bitmap_len(disk_size)) <= covered
        };
        self.table_size != 0
            && self.table_offset != 0
            && self.table_offset.checked_rem(cluster_size) == Some(0)
            && u64::from(self.table_size) <= MAX_TABLE_SIZE
            && granularity_ok
            && KNOWN_FLAGS.contains(self.flags)
            && self.name.len() <= MAX_NAME_SIZE
            && phys <= MAX_PHYS_SIZE
            && (self.flags.contains(BitmapFlags::IN_USE) || covers_disk())
    }
}

/// Bytes a directory entry with a name of `name_len` bytes (and no extra data) occupies.
pub fn directory_entry_len(name_len: usize) -> usize {
    (DIR_ENTRY_LEN + name_len).next_multiple_of(8)
}

/// The guest length a bitmap covers: the disk size in whole 512-byte sectors, as qemu counts it.
pub fn bitmap_len(disk_size: u64) -> u64 {
    disk_size / 512 * 512
}

/// Bits in a bitmap of granularity `1 << granularity_bits` over a disk of `disk_size` bytes.
pub fn bit_count(disk_size: u64, granularity_bits: u8) -> u64 {
    bitmap_len(disk_size).div_ceil(1 << granularity_bits)
}

/// Entries of the bitmap table qemu writes (and requires when loading a bitmap).
pub fn table_size_for(disk_size: u64, granularity_bits: u8, cluster_size: u64) -> u64 {
    bit_count(disk_size, granularity_bits)
        .div_ceil(8)
        .div_ceil(cluster_size)
}

/// qemu's default granularity for a new bitmap: the cluster size, within 4 KiB..=64 KiB.
pub fn default_granularity(cluster_size: u64) -> u64 {
    cluster_size.clamp(4096, 65536)
}

/// qemu's `check_table_entry`: no reserved bits, and a data offset is cluster-aligned and
/// comes without the all-ones bit.
pub fn table_entry_valid(entry: u64, cluster_size: u64) -> bool {
    let offset = entry & TABLE_OFFSET_MASK;
    entry & TABLE_RESERVED_MASK == 0
        && (offset == 0 || (entry & TABLE_ALL_ONES == 0 && offset % cluster_size == 0))
}

/// Decodes a bitmap directory of `size` bytes whose first bytes are `dir` (bytes past the end
/// of `dir` read as zeros, as they do past the end of a file), with every check of qemu's
/// `bitmap_list_load`: `nb_bitmaps` entries exactly, each within bounds for an image of
/// `cluster_size` and guest size `disk_size`, ending exactly at `size`.
pub fn parse_directory(
    dir: &[u8],
    size: u64,
    nb_bitmaps: u32,
    cluster_size: u64,
    disk_size: u64,
) -> Result<Vec<BitmapEntry>, BitmapError> {
    if size == 0 {
        return Err(BitmapError::DirectorySizeZero);
    }
    if size > MAX_BITMAP_DIRECTORY_SIZE {
        return Err(BitmapError::DirectoryTooBig);
    }
    let byte = |at: u64| usize::try_from(at).ok().and_then(|i| dir.get(i)).copied();
    let be = |at: u64, len: u64| {
        (0..len).fold(0u64, |acc, i| {
            (acc << 8) | u64::from(byte(at + i).unwrap_or(0))
        })
    };
    let mut entries = Vec::new();
    let mut at = 0u64;
    while at < size {
        if at + DIR_ENTRY_LEN as u64 > size {
            return Err(BitmapError::BrokenDirectory);
        }
        if entries.len() as u64 >= u64::from(nb_bitmaps) {
            return Err(BitmapError::MoreThanExtension);
        }
        let name_size = be(at + 18, 2);
        let extra_data_size = be(at + 20, 4);
        let len = (DIR_ENTRY_LEN as u64 + name_size + extra_data_size).next_multiple_of(8);
        if at + len > size {
            return Err(BitmapError::BrokenDirectory);
        }
        if extra_data_size != 0 {
            return Err(BitmapError::ExtraData);
        }
        let name_start = at + DIR_ENTRY_LEN as u64;
        let name: Vec<u8> = (name_start..name_start + name_size)
            .map(|i| byte(i).unwrap_or(0))
            .collect();
        let entry = BitmapEntry {
            table_offset: be(at, 8),
            table_size: be(at + 8, 4) as u32,
            flags: BitmapFlags::from_bits_retain(be(at + 12, 4) as u32),
            granularity_bits: byte(at + 17).unwrap_or(0),
            name,
        };
        let kind = byte(at + 16).unwrap_or(0);
        if kind != TYPE_DIRTY_TRACKING || !entry.satisfies_constraints(cluster_size, disk_size) {
            return Err(BitmapError::Constraints {
                name: entry.name_lossy(),
            });
        }
        entries.push(entry);
        at += len;
    }
    if entries.len() as u64 != u64::from(nb_bitmaps) {
        return Err(BitmapError::LessThanExtension);
    }
    Ok(entries)
}

/// Encodes a bitmap directory (what [`parse_directory`] reads back).
pub fn encode_directory(entries: &[BitmapEntry]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entries.iter().map(BitmapEntry::encoded_len).sum());
    for entry in entries {
        let start = out.len();
        out.resize(start + entry.encoded_len(), 0);
        let e = &mut out[start..];
        BigEndian::write_u64(&mut e[0..8], entry.table_offset);
        BigEndian::write_u32(&mut e[8..12], entry.table_size);
        BigEndian::write_u32(&mut e[12..16], entry.flags.bits());
        e[16] = TYPE_DIRTY_TRACKING;
        e[17] = entry.granularity_bits;
        BigEndian::write_u16(&mut e[18..20], entry.name.len() as u16);
        e[DIR_ENTRY_LEN..DIR_ENTRY_LEN + entry.name.len()].copy_from_slice(&entry.name);
    }
    out
}

/// The bitmaps extension of `cluster` if qemu would use it: present and the autoclear bit
/// "bitmaps" set (without the bit the extension is stale and qemu drops it).
pub fn extension(cluster: &HeaderCluster) -> Option<BitmapsExtension> {
    if !cluster
        .header
        .autoclear_features
        .contains(AutoclearFeatures::BITMAPS)
    {
        return None;
    }
    cluster.extensions.iter().find_map(|e| match e {
        Extension::Bitmaps(b) => Some(b.clone()),
        _ => None,
    })
}

/// Reads and decodes the bitmap directory of the image whose cluster 0 is `cluster`. Empty if
/// the image has no (valid) bitmaps extension. Reads at most what the file holds.
pub fn read_directory<B: Backend + ?Sized>(
    backend: &B,
    cluster: &HeaderCluster,
) -> Result<Vec<BitmapEntry>> {
    let Some(ext) = extension(cluster) else {
        return Ok(Vec::new());
    };
    if ext.nb_bitmaps == 0 {
        return Ok(Vec::new());
    }
    let size = ext.directory_size;
    if size == 0 || size > MAX_BITMAP_DIRECTORY_SIZE {
        // Refused before anything is read.
        parse_directory(&[], size, ext.nb_bitmaps, 1, 0)?;
    }
    let file_len = backend.len().map_err(Error::reading("qcow2 file length"))?;
    let in_file = file_len.saturating_sub(ext.directory_offset).min(size) as usize;
    let mut dir = vec![0u8; in_file];
    if in_file > 0 {
        backend
            .read_exact_at(&mut dir, ext.directory_offset)
            .map_err(Error::reading("qcow2 bitmap directory"))?;
    }
    let h = &cluster.header;
    Ok(parse_directory(
        &dir,
        size,
        ext.nb_bitmaps,
        h.cluster_size(),
        h.size,
    )?)
}

/// Reads the bitmap table of `entry` (≤ 8 MiB: the entry satisfied qemu's constraints) and
/// checks every entry as qemu's `bitmap_table_load` does.
pub fn read_table<B: Backend + ?Sized>(
    backend: &B,
    entry: &BitmapEntry,
    cluster_size: u64,
) -> Result<Vec<u64>> {
    let mut raw = vec![0u8; entry.table_size as usize * 8];
    backend
        .read_exact_at(&mut raw, entry.table_offset)
        .map_err(Error::reading("qcow2 bitmap table"))?;
    let table: Vec<u64> = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
    if !table.iter().all(|&e| table_entry_valid(e, cluster_size)) {
        return Err(BitmapError::InvalidTable {
            name: entry.name_lossy(),
        }
        .into());
    }
    Ok(table)
}

/// What one bitmap table entry says about its cluster of bitmap data.
enum ClusterBits {
    /// Every bit clear.
    Zeros,
    /// Every bit set.
    Ones,
    /// The data, read from the file.
    Data,
}

/// Reads the cluster of bitmap data that table entry `t` describes into `data` (only for
/// [`ClusterBits::Data`]).
fn read_cluster_bits<B: Backend + ?Sized>(
    backend: &B,
    t: u64,
    data: &mut [u8],
) -> Result<ClusterBits> {
    let offset = t & TABLE_OFFSET_MASK;
    if offset == 0 {
        return Ok(if t & TABLE_ALL_ONES != 0 {
            ClusterBits::Ones
        } else {
            ClusterBits::Zeros
        });
    }
    backend
        .read_exact_at(data, offset)
        .map_err(Error::reading("qcow2 bitmap data"))?;
    Ok(ClusterBits::Data)
}

/// Calls `f(start, end)` for every run of set bits among the first `limit` bits of `data`.
fn for_each_run_in(
    data: &[u8],
    limit: u64,
    mut f: impl FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let set = |bit: u64| data[(bit / 8) as usize] >> (bit % 8) & 1 == 1;
    let mut bit = 0u64;
    while bit < limit {
        if bit % 8 == 0 && data[(bit / 8) as usize] == 0 {
            bit += 8;
            continue;
        }
        if !set(bit) {
            bit += 1;
            continue;
        }
        let start = bit;
        while bit < limit && set(bit) {
            bit += 1;
        }
        f(start, bit)?;
    }
    Ok(())
}

/// Calls `f(first_bit, end_bit)` for every run of set bits of the bitmap `entry` of the image
/// on `backend`, in order (a run crossing a cluster of bitmap data is reported in pieces).
/// Reads the table (≤ 8 MiB) and one cluster of data at a time.
pub fn for_each_dirty_run<B: Backend + ?Sized>(
    backend: &B,
    entry: &BitmapEntry,
    cluster_size: u64,
    disk_size: u64,
    mut f: impl FnMut(u64, u64) -> Result<()>,
) -> Result<()> {
    let table = read_table(backend, entry, cluster_size)?;
    let bits = bit_count(disk_size, entry.granularity_bits);
    let per_cluster = cluster_size * 8;
    let mut data = vec![0u8; cluster_size as usize];
    for (i, &t) in table.iter().enumerate() {
        let base = i as u64 * per_cluster;
        if base >= bits {
            break;
        }
        let limit = (bits - base).min(per_cluster);
        match read_cluster_bits(backend, t, &mut data)? {
            ClusterBits::Zeros => {}
            ClusterBits::Ones => f(base, base + limit)?,
            ClusterBits::Data => for_each_run_in(&data, limit, |s, e| f(base + s, base + e))?,
        }
    }
    Ok(())
}

/// One action of `qemu-img bitmap`, applied to the bitmap the command names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BitmapAction {
    /// `--add`, with `-g` (default: [`default_granularity`]); enabled, like qemu's.
    Add {
        /// Bytes per bit.
        granularity: Option<u64>,
    },
    /// `--remove`.
    Remove,
    /// `--clear`: every bit unset.
    Clear,
    /// `--enable`: record future writes.
    Enable,
    /// `--disable`: stop recording.
    Disable,
    /// `--merge SOURCE`: set every bit that is set in bitmap `source` (of the source image, or
    /// of this image if the caller gives none).
    Merge {
        /// Name of the source bitmap.
        source: String,
    },
}

impl BitmapAction {
    /// The action's name in qemu-img's messages ("Operation add on bitmap ... failed").
    pub fn name(&self) -> &'static str {
        match self {
            Self::Add { .. } => "add",
            Self::Remove => "remove",
            Self::Clear => "clear",
            Self::Enable => "enable",
            Self::Disable => "disable",
            Self::Merge { .. } => "merge",
        }
    }
}

/// A source image for [`BitmapAction::Merge`]: its storage and cluster 0.
pub struct MergeSource<'a> {
    /// The source image's storage.
    pub backend: &'a dyn Backend,
    /// Its cluster 0.
    pub cluster: &'a HeaderCluster,
}

/// Bitmap operations on an image open for writing, and the write hook.
impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// The image's bitmaps, as the directory lists them now.
    pub fn bitmaps(&self) -> Result<Vec<BitmapEntry>> {
        let cluster = HeaderCluster::read_from(&self.backend)?;
        read_directory(&self.backend, &cluster)
    }

    /// Called by `open_rw` with the bitmaps extension of the image (see [`extension`]):
    /// loads the directory, refuses an image whose directory is shared with anything else
    /// (bitmap tables and data are checked cluster by cluster when written, which keeps this
    /// bounded whatever the directory says), and remembers the bitmaps that must record writes. Returns the autoclear bits to
    /// keep: "bitmaps" if the image has a consistent extension.
    pub(super) fn start_bitmap_tracking(
        &mut self,
        ext: Option<BitmapsExtension>,
    ) -> Result<AutoclearFeatures> {
        self.tracked_bitmaps.clear();
        self.has_bitmaps = false;
        let Some(ext) = ext else {
            return Ok(AutoclearFeatures::empty());
        };
        let cluster = HeaderCluster::read_from(&self.backend)?;
        let entries = read_directory(&self.backend, &cluster)?;
        let cluster_size = self.header.cluster_size();
        let cluster_bits = self.header.cluster_bits;
        let mut structures = Vec::new();
        if ext.nb_bitmaps != 0 {
            let clusters = ext.directory_size.div_ceil(cluster_size);
            structures.extend((0..clusters).map(|i| ext.directory_offset + i * cluster_size));
        }
        for &offset in &structures {
            if self.is_metadata(offset) || self.refcount(offset >> cluster_bits)? != 1 {
                return Err(BitmapError::SharedCluster { offset }.into());
            }
        }
        for &offset in &structures {
            self.state().metadata.insert(offset >> cluster_bits);
        }
        self.has_bitmaps = !entries.is_empty();
        self.tracked_bitmaps = entries.into_iter().filter(|e| e.tracks_writes()).collect();
        Ok(AutoclearFeatures::BITMAPS)
    }

    /// Sets the bits covering guest `[offset, offset + len)` in every bitmap that records
    /// writes. Writers call this before they change guest data.
    pub(super) fn mark_bitmaps_dirty(&mut self, offset: u64, len: u64) -> Result<()> {
        if self.tracked_bitmaps.is_empty() || len == 0 {
            return Ok(());
        }
        for i in 0..self.tracked_bitmaps.len() {
            let entry = self.tracked_bitmaps[i].clone();
            let g = entry.granularity_bits;
            let end = offset.saturating_add(len);
            self.set_bits(&entry, offset >> g, end.div_ceil(1 << g))?;
        }
        Ok(())
    }

    /// Before a resize to `new_size`: refuses bitmaps that are in use (as qemu does) or that
    /// would grow past qemu's limits, and marks the others in use, so that a crash before
    /// [`Self::finish_bitmap_resize`] leaves them inconsistent, never unreadable. Returns the
    /// bitmaps as they were.
    pub(super) fn begin_bitmap_resize(&mut self, new_size: u64) -> Result<Vec<BitmapEntry>> {
        let entries = self.bitmaps()?;
        let cluster_size = self.header.cluster_size();
        for e in &entries {
            if e.flags.contains(BitmapFlags::IN_USE) {
                return Err(BitmapError::Inconsistent {
                    name: e.name_lossy(),
                }
                .into());
            }
            let table_size = table_size_for(new_size, e.granularity_bits, cluster_size);
            if table_size == 0
                || table_size > MAX_TABLE_SIZE
                || table_size * cluster_size > MAX_PHYS_SIZE
            {
                return Err(BitmapError::Constraints {
                    name: e.name_lossy(),
                }
                .into());
            }
        }
        if !entries.is_empty() {
            let mut marked = entries.clone();
            for e in &mut marked {
                e.flags |= BitmapFlags::IN_USE;
            }
            self.store_directory(&marked)?;
        }
        Ok(entries)
    }

    /// After a resize: gives every bitmap of `entries` a table for the new size (new bits
    /// clear; when shrinking, the bits past the new end cleared and their clusters freed), as
    /// qemu's bitmaps follow a resize, and stores them without the in-use flag again.
    pub(super) fn finish_bitmap_resize(&mut self, mut entries: Vec<BitmapEntry>) -> Result<()> {
        if entries.is_empty() {
            return Ok(());
        }
        let cluster_size = self.header.cluster_size();
        let per_cluster = cluster_size * 8;
        let mut old_tables = Vec::new();
        let mut dropped = Vec::new();
        for e in &mut entries {
            let mut table = read_table(&self.backend, e, cluster_size)?;
            let bits = bit_count(self.header.size, e.granularity_bits);
            let table_size = table_size_for(self.header.size, e.granularity_bits, cluster_size);
            for &t in table.iter().skip(table_size as usize) {
                if t & TABLE_OFFSET_MASK != 0 {
                    dropped.push(t & TABLE_OFFSET_MASK);
                }
            }
            table.resize(table_size as usize, 0);
            // The tail of the last cluster must be zero: clear the bits past the new end.
            if let Some(last) = table.last_mut() {
                let keep = bits - (table_size - 1) * per_cluster;
                let data = *last & TABLE_OFFSET_MASK;
                if keep < per_cluster && (data != 0 || *last & TABLE_ALL_ONES != 0) {
                    let mut bytes = vec![0u8; cluster_size as usize];
                    if data == 0 {
                        set_bit_range(&mut bytes, 0, keep);
                        let host = self.alloc_cluster()?;
                        self.write_host(&bytes, host)?;
                        *last = host;
                    } else {
                        if self.is_metadata(data)
                            || self.refcount(data >> self.header.cluster_bits)? != 1
                        {
                            return Err(BitmapError::SharedCluster { offset: data }.into());
                        }
                        self.backend
                            .read_exact_at(&mut bytes, data)
                            .map_err(Error::reading("qcow2 bitmap data"))?;
                        clear_bits_from(&mut bytes, keep);
                        self.write_host(&bytes, data)?;
                    }
                }
            }
            let encoded: Vec<u8> = table.iter().flat_map(|t| t.to_be_bytes()).collect();
            let clusters = (encoded.len() as u64).div_ceil(cluster_size);
            let offset = self.alloc_contiguous(clusters)?;
            let mut padded = encoded;
            padded.resize((clusters * cluster_size) as usize, 0);
            self.write_host(&padded, offset)?;
            let first = offset >> self.header.cluster_bits;
            self.state().metadata.extend(first..first + clusters);
            old_tables.push((e.table_offset, u64::from(e.table_size)));
            e.table_offset = offset;
            e.table_size = table_size as u32;
        }
        self.barrier()?;
        self.store_directory(&entries)?;
        for (offset, size) in old_tables {
            for i in 0..(size * 8).div_ceil(cluster_size) {
                let cluster = offset + i * cluster_size;
                let index = cluster >> self.header.cluster_bits;
                self.state().metadata.remove(&index);
                self.free_cluster(cluster)?;
            }
        }
        for offset in dropped {
            self.free_cluster(offset)?;
        }
        Ok(())
    }

    /// Sets bits `[first, end)` of bitmap `entry` (clamped to the bitmap), allocating data
    /// clusters for table entries that read as zeros and changing existing ones in place.
    fn set_bits(&mut self, entry: &BitmapEntry, first: u64, end: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let end = end.min(bit_count(self.header.size, entry.granularity_bits));
        let per_cluster = cluster_size * 8;
        let mut bit = first;
        while bit < end {
            let index = bit / per_cluster;
            let stop = end.min((index + 1) * per_cluster);
            let (lo, hi) = (bit - index * per_cluster, stop - index * per_cluster);
            self.set_bits_in_cluster(entry, index, lo, hi)?;
            bit = stop;
        }
        Ok(())
    }

    /// Sets bits `[lo, hi)` of data cluster `index` of bitmap `entry`.
    fn set_bits_in_cluster(
        &mut self,
        entry: &BitmapEntry,
        index: u64,
        lo: u64,
        hi: u64,
    ) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        if index >= u64::from(entry.table_size) {
            return Err(BitmapError::Constraints {
                name: entry.name_lossy(),
            }
            .into());
        }
        let slot = entry.table_offset + index * 8;
        let mut raw = [0u8; 8];
        self.backend
            .read_exact_at(&mut raw, slot)
            .map_err(Error::reading("qcow2 bitmap table"))?;
        let t = u64::from_be_bytes(raw);
        if !table_entry_valid(t, cluster_size) {
            return Err(BitmapError::InvalidTable {
                name: entry.name_lossy(),
            }
            .into());
        }
        let data = t & TABLE_OFFSET_MASK;
        if data == 0 {
            if t & TABLE_ALL_ONES != 0 {
                return Ok(());
            }
            let mut bytes = vec![0u8; cluster_size as usize];
            set_bit_range(&mut bytes, lo, hi);
            let table_cluster = slot - slot % cluster_size;
            if self.refcount(table_cluster >> self.header.cluster_bits)? != 1 {
                return Err(BitmapError::SharedCluster {
                    offset: table_cluster,
                }
                .into());
            }
            let host = self.alloc_cluster()?;
            self.write_host(&bytes, host)?;
            self.barrier()?;
            return self.write_host(&host.to_be_bytes(), slot);
        }
        if self.is_metadata(data) || self.refcount(data >> self.header.cluster_bits)? != 1 {
            return Err(BitmapError::SharedCluster { offset: data }.into());
        }
        let (start, stop) = (lo / 8, hi.div_ceil(8));
        let mut bytes = vec![0u8; (stop - start) as usize];
        self.backend
            .read_exact_at(&mut bytes, data + start)
            .map_err(Error::reading("qcow2 bitmap data"))?;
        let before = bytes.clone();
        set_bit_range(&mut bytes, lo - start * 8, hi - start * 8);
        if bytes != before {
            self.write_host(&bytes, data + start)?;
        }
        Ok(())
    }

    /// Applies `actions` in order to the bitmap `name`, as `qemu-img bitmap` does; `image`
    /// names the image in messages and `source` is the `-b` image for merges (else this one).
    /// Stops at the first action that fails, returning its index and error.
    pub fn apply_bitmap_actions(
        &mut self,
        name: &str,
        actions: &[BitmapAction],
        image: &str,
        source: Option<MergeSource<'_>>,
    ) -> std::result::Result<(), (usize, Error)> {
        for (i, action) in actions.iter().enumerate() {
            self.apply_bitmap_action(name, action, image, source.as_ref())
                .map_err(|e| (i, e))?;
        }
        Ok(())
    }

    fn apply_bitmap_action(
        &mut self,
        name: &str,
        action: &BitmapAction,
        image: &str,
        source: Option<&MergeSource<'_>>,
    ) -> Result<()> {
        let mut entries = self.bitmaps()?;
        let found = entries.iter().position(|e| e.name == name.as_bytes());
        if let BitmapAction::Add { granularity } = action {
            return self.add_bitmap(entries, found, name, *granularity, image);
        }
        let Some(index) = found else {
            return Err(BitmapError::NotFound { name: name.into() }.into());
        };
        let inconsistent = || BitmapError::Inconsistent { name: name.into() };
        match action {
            BitmapAction::Add { .. } => unreachable!("handled above"),
            BitmapAction::Remove => {
                let removed = entries.remove(index);
                self.store_directory(&entries)?;
                self.free_bitmap_data(&removed, true)
            }
            BitmapAction::Clear => {
                if entries[index].flags.contains(BitmapFlags::IN_USE) {
                    return Err(inconsistent().into());
                }
                self.free_bitmap_data(&entries[index].clone(), false)
            }
            BitmapAction::Enable | BitmapAction::Disable => {
                let entry = &mut entries[index];
                if entry.flags.contains(BitmapFlags::IN_USE) {
                    return Err(inconsistent().into());
                }
                entry
                    .flags
                    .set(BitmapFlags::AUTO, matches!(action, BitmapAction::Enable));
                self.store_directory(&entries)
            }
            BitmapAction::Merge { source: src_name } => {
                let dest = entries[index].clone();
                if dest.flags.contains(BitmapFlags::IN_USE) {
                    return Err(inconsistent().into());
                }
                let own;
                let (src_backend, src_cluster): (&dyn Backend, &HeaderCluster) = match source {
                    Some(s) => (s.backend, s.cluster),
                    None => {
                        own = HeaderCluster::read_from(&self.backend)?;
                        (&self.backend, &own)
                    }
                };
                let src_entries = read_directory(src_backend, src_cluster)?;
                let src = src_entries
                    .into_iter()
                    .find(|e| e.name == src_name.as_bytes())
                    .ok_or_else(|| BitmapError::NotFound {
                        name: src_name.clone(),
                    })?;
                if src.flags.contains(BitmapFlags::IN_USE) {
                    return Err(BitmapError::Inconsistent {
                        name: src_name.clone(),
                    }
                    .into());
                }
                let (dest_len, src_len) = (
                    bitmap_len(self.header.size),
                    bitmap_len(src_cluster.header.size),
                );
                if dest_len != src_len {
                    return Err(BitmapError::SizeMismatch {
                        destination: dest_len,
                        source_size: src_len,
                    }
                    .into());
                }
                let src_cluster_size = src_cluster.header.cluster_size();
                let table = read_table(src_backend, &src, src_cluster_size)?;
                let src_backend = source.map(|s| s.backend);
                self.merge_bits(&dest, &src, &table, src_cluster_size, src_backend)
            }
        }
    }

    /// Sets in `dest` every bit covering guest bytes that are dirty in `src` (table `table`,
    /// clusters of `src_cluster_size`), reading the source's data from `src_backend`, or from
    /// this image when `None`. One cluster of source data is held at a time.
    fn merge_bits(
        &mut self,
        dest: &BitmapEntry,
        src: &BitmapEntry,
        table: &[u64],
        src_cluster_size: u64,
        src_backend: Option<&dyn Backend>,
    ) -> Result<()> {
        let bits = bit_count(self.header.size, src.granularity_bits);
        let per_cluster = src_cluster_size * 8;
        let (sg, dg) = (src.granularity_bits, dest.granularity_bits);
        let mut data = vec![0u8; src_cluster_size as usize];
        for (i, &t) in table.iter().enumerate() {
            let base = i as u64 * per_cluster;
            if base >= bits {
                break;
            }
            let limit = (bits - base).min(per_cluster);
            let kind = match src_backend {
                Some(b) => read_cluster_bits(b, t, &mut data)?,
                None => read_cluster_bits(&self.backend, t, &mut data)?,
            };
            let mut set = |s: u64, e: u64| {
                let (s, e) = (base + s, base + e);
                self.set_bits(dest, (s << sg) >> dg, (e << sg).div_ceil(1 << dg))
            };
            match kind {
                ClusterBits::Zeros => {}
                ClusterBits::Ones => set(0, limit)?,
                ClusterBits::Data => for_each_run_in(&data, limit, set)?,
            }
        }
        Ok(())
    }

    fn add_bitmap(
        &mut self,
        mut entries: Vec<BitmapEntry>,
        found: Option<usize>,
        name: &str,
        granularity: Option<u64>,
        image: &str,
    ) -> Result<()> {
        if name.is_empty() {
            return Err(BitmapError::EmptyName.into());
        }
        if found.is_some() {
            return Err(BitmapError::Exists { name: name.into() }.into());
        }
        let cluster_size = self.header.cluster_size();
        let granularity = granularity.unwrap_or_else(|| default_granularity(cluster_size));
        if !granularity.is_power_of_two()
            || !(1u64 << MIN_GRANULARITY_BITS..=1u64 << MAX_GRANULARITY_BITS).contains(&granularity)
        {
            return Err(BitmapError::Granularity.into());
        }
        let granularity_bits = granularity.trailing_zeros() as u8;
        let cannot = |reason| BitmapError::CannotStore {
            name: name.into(),
            image: image.into(),
            reason,
        };
        if self.header.version == Version::V2 {
            return Err(cannot("Cannot store dirty bitmaps in qcow2 v2 files").into());
        }
        if entries.len() >= MAX_BITMAPS as usize {
            return Err(cannot("Too many persistent bitmaps").into());
        }
        let table_size = table_size_for(self.header.size, granularity_bits, cluster_size);
        let data_bytes = bit_count(self.header.size, granularity_bits).div_ceil(8);
        if data_bytes > MAX_PHYS_SIZE || table_size > MAX_TABLE_SIZE {
            return Err(cannot(
                "Too much space will be occupied by the bitmap. Use larger granularity",
            )
            .into());
        }
        if name.len() > MAX_NAME_SIZE {
            return Err(cannot("Name length exceeds maximum (1023 characters)").into());
        }
        let mut entry = BitmapEntry {
            table_offset: 0,
            table_size: table_size as u32,
            flags: BitmapFlags::AUTO,
            granularity_bits,
            name: name.as_bytes().to_vec(),
        };
        let dir_size: usize =
            entries.iter().map(BitmapEntry::encoded_len).sum::<usize>() + entry.encoded_len();
        if dir_size as u64 > MAX_BITMAP_DIRECTORY_SIZE {
            return Err(cannot("Bitmap directory is too large").into());
        }
        // qemu adds the bitmap in memory and stores every bitmap when it closes the image:
        // the existing ones are copied to fresh clusters first, in directory order, then the
        // new (empty) table is written, then the directory; the old copies are freed last.
        // Doing the same gives qemu's layout (and file length).
        let old = entries.clone();
        for existing in entries.iter_mut() {
            *existing = self.copy_bitmap(existing)?;
        }
        let table_bytes = table_size.max(1) * 8;
        entry.table_offset = self.write_fresh(&vec![0u8; table_bytes as usize])?;
        entries.push(entry);
        self.store_directory(&entries)?;
        for replaced in &old {
            self.free_bitmap_data(replaced, true)?;
        }
        Ok(())
    }

    /// Writes `bytes` to fresh contiguous clusters (counted as metadata) and returns their
    /// offset. The last cluster is written only as far as `bytes` go, as qemu writes bitmap
    /// tables and directories.
    fn write_fresh(&mut self, bytes: &[u8]) -> Result<u64> {
        let clusters = (bytes.len() as u64)
            .div_ceil(self.header.cluster_size())
            .max(1);
        let offset = self.alloc_run(clusters)?;
        self.write_host(bytes, offset)?;
        let first = offset >> self.header.cluster_bits;
        self.state().metadata.extend(first..first + clusters);
        self.barrier()?;
        Ok(offset)
    }

    /// Copies the bitmap `entry` to fresh clusters as qemu stores a loaded bitmap: a new data
    /// cluster for every cluster of bits with a bit set (in table order), none for one without,
    /// then a new table. Returns the entry pointing at the copy; the original stays as it was.
    fn copy_bitmap(&mut self, entry: &BitmapEntry) -> Result<BitmapEntry> {
        let cluster_size = self.header.cluster_size();
        let table = read_table(&self.backend, entry, cluster_size)?;
        let bits = bit_count(self.header.size, entry.granularity_bits);
        let per_cluster = cluster_size * 8;
        let mut data = vec![0u8; cluster_size as usize];
        let mut copy = Vec::with_capacity(table.len() * 8);
        for (i, &t) in table.iter().enumerate() {
            let base = i as u64 * per_cluster;
            let limit = bits.saturating_sub(base).min(per_cluster);
            let new = match read_cluster_bits(&self.backend, t, &mut data)? {
                ClusterBits::Zeros => 0,
                ClusterBits::Ones => {
                    data.fill(0);
                    set_bit_range(&mut data, 0, limit);
                    self.write_fresh(&data)?
                }
                ClusterBits::Data => {
                    clear_bits_from(&mut data, limit);
                    if data.iter().all(|&b| b == 0) {
                        0
                    } else {
                        self.write_fresh(&data)?
                    }
                }
            };
            copy.extend_from_slice(&new.to_be_bytes());
        }
        let table_offset = self.write_fresh(&copy)?;
        Ok(BitmapEntry {
            table_offset,
            ..entry.clone()
        })
    }

    /// Frees the data clusters of `entry` (table entries set to 0 first); with `table`, also
    /// the table itself (the entry must already be out of the directory).
    fn free_bitmap_data(&mut self, entry: &BitmapEntry, table: bool) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let entries = read_table(&self.backend, entry, cluster_size)?;
        let data: Vec<u64> = entries
            .iter()
            .map(|e| e & TABLE_OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect();
        if !table {
            // The table is rewritten in place: it must be this bitmap's alone.
            for i in 0..(entries.len() as u64 * 8).div_ceil(cluster_size) {
                let offset = entry.table_offset + i * cluster_size;
                if self.refcount(offset >> self.header.cluster_bits)? != 1 {
                    return Err(BitmapError::SharedCluster { offset }.into());
                }
            }
            let zeros = vec![0u8; entries.len() * 8];
            self.write_host(&zeros, entry.table_offset)?;
            self.barrier()?;
        }
        for offset in data {
            self.free_cluster(offset)?;
        }
        if table {
            let clusters = (u64::from(entry.table_size) * 8).div_ceil(cluster_size);
            for i in 0..clusters {
                let offset = entry.table_offset + i * cluster_size;
                let cluster = offset >> self.header.cluster_bits;
                self.state().metadata.remove(&cluster);
                self.free_cluster(offset)?;
            }
        }
        Ok(())
    }

    /// Writes `entries` as a new directory in fresh clusters, points the header at it (or drops
    /// the extension and the autoclear bit if there are none), then frees the old directory.
    fn store_directory(&mut self, entries: &[BitmapEntry]) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let cluster_bits = self.header.cluster_bits;
        let mut cluster = HeaderCluster::read_from(&self.backend)?;
        let old = extension(&cluster).filter(|e| e.nb_bitmaps > 0);
        let old_len = cluster.to_bytes()?.len();
        cluster.header = self.header.clone();
        cluster
            .extensions
            .retain(|e| !matches!(e, Extension::Bitmaps(_)));
        if entries.is_empty() {
            cluster.header.autoclear_features -= AutoclearFeatures::BITMAPS;
        } else {
            let dir = encode_directory(entries);
            let offset = self.write_fresh(&dir)?;
            // qemu's order: backing format, data file, encryption, feature table, bitmaps,
            // then unknown extensions.
            let at = cluster
                .extensions
                .iter()
                .position(|e| matches!(e, Extension::Unknown { .. }))
                .unwrap_or(cluster.extensions.len());
            cluster.extensions.insert(
                at,
                Extension::Bitmaps(BitmapsExtension {
                    nb_bitmaps: entries.len() as u32,
                    reserved: 0,
                    directory_size: dir.len() as u64,
                    directory_offset: offset,
                }),
            );
            cluster.header.autoclear_features |= AutoclearFeatures::BITMAPS;
        }
        let mut bytes = cluster.to_bytes()?;
        bytes.resize(bytes.len().max(old_len), 0);
        self.header = HeaderCluster::parse(&bytes)?.header;
        self.write_host(&bytes, 0)?;
        self.barrier()?;
        if let Some(old) = old {
            let clusters = old.directory_size.div_ceil(cluster_size);
            for i in 0..clusters {
                let offset = old.directory_offset + i * cluster_size;
                self.state().metadata.remove(&(offset >> cluster_bits));
                self.free_cluster(offset)?;
            }
        }
        self.has_bitmaps = !entries.is_empty();
        self.tracked_bitmaps = entries
            .iter()
            .filter(|e| e.tracks_writes())
            .cloned()
            .collect();
        Ok(())
    }
}

/// Clears every bit of `bytes` from bit `from` on.
fn clear_bits_from(bytes: &mut [u8], from: u64) {
    let byte = (from / 8) as usize;
    if from % 8 != 0 {
        bytes[byte] &= (1u8 << (from % 8)) - 1;
        bytes[byte + 1..].fill(0);
    } else {
        bytes[byte..].fill(0);
    }
}

/// Sets bits `[lo, hi)` of `bytes` (bit i is bit `i % 8`, LSB first, of byte `i / 8`).
fn set_bit_range(bytes: &mut [u8], lo: u64, hi: u64) {
    let mut bit = lo;
    while bit < hi {
        if bit % 8 == 0 && hi - bit >= 8 {
            bytes[(bit / 8) as usize] = 0xff;
            bit += 8;
        } else {
            bytes[(bit / 8) as usize] |= 1 << (bit % 8);
            bit += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(name: &str, flags: BitmapFlags) -> BitmapEntry {
        BitmapEntry {
            table_offset: 0x5_0000,
            table_size: 1,
            flags,
            granularity_bits: 16,
            name: name.as_bytes().to_vec(),
        }
    }

    /// A directory entry as qemu writes it for `b1` (auto, 64 KiB granularity, table at
    /// 0x50000 with one entry), field by field.
    fn qemu_entry_b1() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&0x5_0000u64.to_be_bytes()); // bitmap_table_offset
        b.extend_from_slice(&1u32.to_be_bytes()); //         bitmap_table_size
        b.extend_from_slice(&2u32.to_be_bytes()); //         flags: auto
        b.push(1); //                                        type: dirty tracking
        b.push(16); //                                       granularity_bits
        b.extend_from_slice(&2u16.to_be_bytes()); //         name_size
        b.extend_from_slice(&0u32.to_be_bytes()); //         extra_data_size
        b.extend_from_slice(b"b1\0\0\0\0\0\0"); //            name + padding to 32
        b
    }

    #[test]
    fn parses_and_encodes_qemu_entry() {
        let bytes = qemu_entry_b1();
        let parsed = parse_directory(&bytes, 32, 1, 65536, 100 << 20).unwrap();
        assert_eq!(parsed, vec![entry("b1", BitmapFlags::AUTO)]);
        assert_eq!(encode_directory(&parsed), bytes);
    }

    #[test]
    fn counts_and_bounds_are_qemus() {
        let bytes = qemu_entry_b1();
        let parse = |b: &[u8], size, nb| parse_directory(b, size, nb, 65536, 100 << 20);
        assert_eq!(parse(&bytes, 32, 2), Err(BitmapError::LessThanExtension));
        assert_eq!(parse(&bytes, 0, 1), Err(BitmapError::DirectorySizeZero));
        assert_eq!(parse(&bytes, 24, 1), Err(BitmapError::BrokenDirectory));
        let mut two = bytes.clone();
        two.extend_from_slice(&bytes);
        assert_eq!(parse(&two, 64, 1), Err(BitmapError::MoreThanExtension));
        let mut flags = bytes.clone();
        flags[15] |= 4; // extra_data_compatible: reserved for qemu
        assert!(matches!(
            parse(&flags, 32, 1),
            Err(BitmapError::Constraints { .. })
        ));
        // A table too small for a 100 GiB disk at 64 KiB granularity needs in_use.
        let big = parse_directory(&bytes, 32, 1, 65536, 100 << 30);
        assert!(matches!(big, Err(BitmapError::Constraints { .. })));
        let mut in_use = bytes.clone();
        in_use[15] |= 1;
        assert!(parse_directory(&in_use, 32, 1, 65536, 100 << 30).is_ok());
    }

    #[test]
    fn sizes_follow_qemu() {
        // 100 MiB at 64 KiB: 1600 bits, 200 bytes, one cluster.
        assert_eq!(bit_count(100 << 20, 16), 1600);
        assert_eq!(table_size_for(100 << 20, 16, 65536), 1);
        // 8 TiB at 512 B with 64 KiB clusters: 2 GiB of bits → 256 MiB → 4096 clusters.
        assert_eq!(table_size_for(8 << 40, 9, 65536), 32768);
        assert_eq!(default_granularity(512), 4096);
        assert_eq!(default_granularity(2 << 20), 65536);
    }

    /// Every writer records itself: plain, zero and compressed writes, and a discard, each set
    /// their range in an enabled bitmap and leave a disabled one alone; check stays clean.
    #[test]
    fn every_write_path_marks_enabled_bitmaps() {
        use crate::io::MemBackend;
        use crate::qcow2::check::{check, Repair};
        use crate::qcow2::compressed_writer::CompressedWriter;
        use crate::qcow2::create::{write_new_image, CreateOptions};
        use crate::qcow2::write::WriteOptions;

        let backend = MemBackend::default();
        let opts = CreateOptions::default();
        write_new_image(&backend, 64 << 20, &opts, None).unwrap();
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        let mut image =
            Qcow2Image::open_rw(backend, cluster, None, WriteOptions::default()).unwrap();
        let add = BitmapAction::Add { granularity: None };
        image
            .apply_bitmap_actions("on", std::slice::from_ref(&add), "mem", None)
            .unwrap();
        image
            .apply_bitmap_actions("off", &[add, BitmapAction::Disable], "mem", None)
            .unwrap();
        image.write_at(&[1; 100], 70_000).unwrap();
        image.write_zeroes(1 << 20, 128 << 10).unwrap();
        image.discard(8 << 20, 64 << 10).unwrap();
        let mut writer = CompressedWriter::new(&image);
        writer.write(&mut image, &[7; 65536], 16 << 20).unwrap();
        writer.finish(&mut image).unwrap();
        let runs = |image: &Qcow2Image<MemBackend>, name: &str| {
            let entry = image
                .bitmaps()
                .unwrap()
                .into_iter()
                .find(|e| e.name == name.as_bytes())
                .unwrap();
            let mut runs = Vec::new();
            for_each_dirty_run(image.backend(), &entry, 65536, 64 << 20, |s, e| {
                runs.push((s, e));
                Ok(())
            })
            .unwrap();
            runs
        };
        // 64 KiB granularity: bit 1; bits 16-17; bit 128; bit 256.
        assert_eq!(
            runs(&image, "on"),
            vec![(1, 2), (16, 18), (128, 129), (256, 257)]
        );
        assert_eq!(runs(&image, "off"), vec![]);
        let report = check(image.backend(), Repair::None).unwrap();
        assert_eq!(report.exit_code(), 0, "{report:?}");
    }

    /// `snapshot -a` is refused while any bitmap exists, enabled or not: the fact read at open
    /// follows the bitmaps added and removed while the image stays open.
    #[test]
    fn applying_a_snapshot_is_refused_while_any_bitmap_exists() {
        use crate::io::MemBackend;
        use crate::qcow2::create::{write_new_image, CreateOptions};
        use crate::qcow2::snapshot::SnapshotError;
        use crate::qcow2::write::WriteOptions;

        let refused = |image: &mut Qcow2Image<MemBackend>| {
            matches!(
                image.apply_snapshot("s"),
                Err(Error::Qcow2(super::super::Qcow2Error::Snapshot(
                    SnapshotError::ActiveBitmaps
                )))
            )
        };
        let backend = MemBackend::default();
        write_new_image(&backend, 1 << 20, &CreateOptions::default(), None).unwrap();
        let open = |backend: MemBackend| {
            let cluster = HeaderCluster::read_from(&backend).unwrap();
            Qcow2Image::open_rw(backend, cluster, None, WriteOptions::default()).unwrap()
        };
        let mut image = open(backend);
        image.create_snapshot("s", (1, 2)).unwrap();
        let add = BitmapAction::Add { granularity: None };
        image
            .apply_bitmap_actions("b", &[add, BitmapAction::Disable], "mem", None)
            .unwrap();
        assert!(refused(&mut image), "a disabled bitmap added while open");
        let mut image = open(MemBackend::new(image.backend().to_vec()));
        assert!(refused(&mut image), "a bitmap found at open");
        image
            .apply_bitmap_actions("b", &[BitmapAction::Remove], "mem", None)
            .unwrap();
        image.apply_snapshot("s").unwrap();
    }

    #[test]
    fn bit_ranges_are_lsb_first() {
        let mut b = vec![0u8; 3];
        set_bit_range(&mut b, 3, 17);
        assert_eq!(b, vec![0xf8, 0xff, 0x01]);
    }
}
