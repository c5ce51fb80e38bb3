//! Everything that can be wrong with a VDI header or block map, one variant per check.

use std::path::PathBuf;

use thiserror::Error;
use uuid::Uuid;

/// A VDI header, block map or creation request that cowclone refuses.
///
/// Every open-time bound of FORMATS.md §2.4 and §2.5 has its own variant carrying the offending
/// values, so callers (and tests) can tell exactly which check failed.
#[non_exhaustive]
#[derive(Debug, Error, PartialEq, Eq)]
pub enum VdiError {
    /// Fewer bytes than the pre-header and header need.
    #[error("VDI header is truncated: {len} bytes, need at least {needed}")]
    HeaderTooShort {
        /// Bytes available.
        len: usize,
        /// Bytes the header needs.
        needed: usize,
    },
    /// The signature at offset 0x40 is not 0xBEDA107F.
    #[error("not a VDI image (signature {found:#010x})")]
    BadSignature {
        /// The signature found.
        found: u32,
    },
    /// A version other than 1.1 (0x00010001), the only one both VirtualBox and qemu open.
    #[error("VDI version {found:#010x} is not supported (only 1.1)")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// A header size below the 0x180 bytes of a v1.1 header.
    #[error("VDI header size {found:#x} is below 0x180")]
    HeaderSizeTooSmall {
        /// The header size found.
        found: u32,
    },
    /// An image type outside 1..=4.
    #[error("VDI image type {found} is unknown (expected 1..=4)")]
    UnknownImageType {
        /// The type found.
        found: u32,
    },
    /// Flag bits outside the mask VirtualBox accepts.
    #[error("VDI image flags {flags:#010x} contain unknown bits")]
    UnknownFlags {
        /// The flags found.
        flags: u32,
    },
    /// A block map that would overlap the header.
    #[error("VDI block map offset {offset_blocks:#x} is below the header end {min:#x}")]
    BlockMapOffsetTooSmall {
        /// The block map offset found.
        offset_blocks: u32,
        /// The smallest acceptable offset.
        min: u32,
    },
    /// A data area that starts before the block map ends.
    #[error("VDI data offset {offset_data:#x} is before the block map end {block_map_end:#x}")]
    DataOffsetBeforeBlockMapEnd {
        /// The data offset found.
        offset_data: u32,
        /// Where the block map ends.
        block_map_end: u64,
    },
    /// An offset that is not a multiple of 512 (qemu refuses these).
    #[error("VDI {field} {offset:#x} is not a multiple of 512")]
    OffsetNotSectorAligned {
        /// Which header field.
        field: &'static str,
        /// The offset found.
        offset: u32,
    },
    /// A legacy geometry sector size other than 512 (qemu refuses these).
    #[error("VDI legacy geometry sector size {found} is not 512")]
    BadLegacySectorSize {
        /// The sector size found.
        found: u32,
    },
    /// An LCHS geometry sector size other than 512 in a 0x190-byte header (VirtualBox refuses these).
    #[error("VDI LCHS geometry sector size {found} is not 512")]
    BadLchsSectorSize {
        /// The sector size found.
        found: u32,
    },
    /// A virtual disk size of zero.
    #[error("VDI disk size is zero")]
    ZeroDiskSize,
    /// A disk size that is not a multiple of 512 (refused only when creating).
    #[error("VDI disk size {disk_size} is not a multiple of 512")]
    DiskSizeNotSectorMultiple {
        /// The requested disk size.
        disk_size: u64,
    },
    /// A block count of zero.
    #[error("VDI block count is zero")]
    ZeroBlockCount,
    /// A block size other than 1 MiB (the only one qemu supports).
    #[error("VDI block size {found} is not supported (only 1 MiB)")]
    UnsupportedBlockSize {
        /// The block size found.
        found: u32,
    },
    /// Non-zero per-block extra data (qemu ignores the field, so such images are ambiguous).
    #[error("VDI block extra size {found} is not supported (only 0)")]
    BlockExtraNotSupported {
        /// The extra size found.
        found: u32,
    },
    /// A disk size larger than the blocks can hold.
    #[error("VDI disk size {disk_size} exceeds {blocks} blocks of {block_size} bytes")]
    DiskLargerThanBlocks {
        /// The disk size found.
        disk_size: u64,
        /// The block count found.
        blocks: u32,
        /// The block size found.
        block_size: u32,
    },
    /// More blocks than qemu's limit.
    #[error("VDI block count {blocks} exceeds the limit {max}")]
    TooManyBlocks {
        /// The block count found.
        blocks: u32,
        /// The limit.
        max: u32,
    },
    /// A disk size above qemu's limit.
    #[error("VDI disk size {disk_size} exceeds the limit {max}")]
    DiskTooLarge {
        /// The disk size found or requested.
        disk_size: u64,
        /// The limit.
        max: u64,
    },
    /// More allocated blocks than blocks in the image.
    #[error("VDI allocated block count {allocated} exceeds the block count {blocks}")]
    AllocatedExceedsBlocks {
        /// The allocated count found.
        allocated: u32,
        /// The block count found.
        blocks: u32,
    },
    /// A creation or modification UUID that is all zero (VirtualBox refuses these).
    #[error("VDI {field} UUID is null")]
    NullUuid {
        /// Which UUID field.
        field: &'static str,
    },
    /// A block map whose byte length is not 4 × the block count.
    #[error("VDI block map is {len} bytes, expected {expected}")]
    BlockMapLengthMismatch {
        /// Bytes supplied.
        len: usize,
        /// Bytes expected.
        expected: u64,
    },
    /// A block map entry pointing at or past the allocated block count.
    #[error("VDI block {block} points at data block {index}, but only {allocated} are allocated")]
    BlockIndexOutOfRange {
        /// The virtual block.
        block: u32,
        /// The data block index it points at.
        index: u32,
        /// The allocated block count.
        allocated: u32,
    },
    /// Two block map entries pointing at the same data block.
    #[error("VDI blocks {first_block} and {second_block} both point at data block {index}")]
    DuplicateBlockIndex {
        /// The shared data block index.
        index: u32,
        /// The first virtual block using it.
        first_block: u32,
        /// The second virtual block using it.
        second_block: u32,
    },
    /// An update to a virtual block past the end of the block map.
    #[error("VDI block {block} is outside the map of {blocks} blocks")]
    BlockOutOfRange {
        /// The virtual block.
        block: u32,
        /// The number of blocks in the map.
        blocks: u32,
    },
    /// An update that would point a block at a data index no image of this map's size can hold.
    #[error(
        "VDI block {block} cannot point at data block {index}: the map has only {blocks} blocks"
    )]
    BlockIndexBeyondMap {
        /// The virtual block.
        block: u32,
        /// The data block index requested.
        index: u32,
        /// The number of blocks in the map.
        blocks: u32,
    },
    /// The block map does not lie inside the file (checked before it is read or allocated).
    #[error("VDI block map at {offset:#x} ({len} bytes) extends past the end of the file ({file_len} bytes)")]
    BlockMapBeyondEndOfFile {
        /// The block map offset.
        offset: u64,
        /// The block map length in bytes.
        len: u64,
        /// The file length.
        file_len: u64,
    },
    /// An allocated block whose data is not inside the file (VirtualBox: VERR_VD_READ_OUT_OF_RANGE).
    #[error("VDI block {block} (data block {index}) at {host_offset:#x} is past the end of the file ({file_len} bytes)")]
    ReadOutOfRange {
        /// The virtual block.
        block: u32,
        /// The data block index.
        index: u32,
        /// Where the bytes read would start in the file.
        host_offset: u64,
        /// The file length.
        file_len: u64,
    },
    /// A data area shorter than the header's allocated block count (refused for writing: new
    /// blocks would be appended after a hole).
    #[error("VDI data area is truncated: {allocated} allocated blocks need {needed} bytes, the file has {file_len}")]
    DataAreaTruncated {
        /// The allocated block count.
        allocated: u32,
        /// The file length the allocated blocks need.
        needed: u64,
        /// The file length.
        file_len: u64,
    },
    /// No data block index is left for a new block (every index below the block count is used).
    #[error("VDI data area is full: {allocated} of {blocks} data blocks are allocated")]
    DataAreaFull {
        /// The allocated block count.
        allocated: u32,
        /// The block count.
        blocks: u32,
    },
    /// A differencing image opened for writing without its parent (copy-on-write must read it).
    #[error("a VDI differencing image can only be written with its parent chain attached")]
    ParentRequired,
    /// A write to an image opened read-only.
    #[error("VDI image was opened read-only")]
    NotOpenForWriting,
    /// A differencing image's parent candidate whose creation UUID is not the child's linkage.
    #[error("{parent} is not the parent of this differencing image: its UUID is {{{found}}}, the image links to {{{expected}}}")]
    ParentMismatch {
        /// The child's linkage UUID (the parent's creation UUID it expects).
        expected: Uuid,
        /// The candidate's creation UUID.
        found: Uuid,
        /// The candidate.
        parent: PathBuf,
    },
    /// No parent with the linkage UUID was found.
    #[error(
        "parent of differencing image {child} (UUID {{{linkage}}}) not found; name it explicitly"
    )]
    ParentNotFound {
        /// The child's linkage UUID.
        linkage: Uuid,
        /// The differencing image.
        child: PathBuf,
    },
    /// Two candidate parents carry the same creation UUID (a copied image): which one is meant
    /// cannot be told.
    #[error("parent UUID {{{linkage}}} is carried by both {first} and {second}; name the parent explicitly")]
    AmbiguousParent {
        /// The linkage UUID.
        linkage: Uuid,
        /// One candidate.
        first: PathBuf,
        /// Another candidate.
        second: PathBuf,
    },
    /// A directory searched for a parent holds more VDI files than the search looks at.
    #[error("{dir} holds more than {limit} VDI files; name the parent explicitly")]
    TooManyCandidates {
        /// The directory.
        dir: PathBuf,
        /// The limit.
        limit: usize,
    },
    /// A differencing image at the bottom of a chain (VirtualBox refuses one as a base).
    #[error("{path} is a differencing image without a parent (null linkage UUID)")]
    DiffWithoutParent {
        /// The image.
        path: PathBuf,
    },
    /// A differencing image was requested on a parent that is not a VDI image.
    #[error("{path} is a {format} image, not VDI: a VDI differencing image needs a VDI parent")]
    ParentNotVdi {
        /// The intended parent.
        path: PathBuf,
        /// Its format.
        format: &'static str,
    },
    /// A differencing image was requested with a size other than its parent's (a VDI diff always
    /// has its parent's size).
    #[error("a VDI differencing image has its parent's size ({parent} bytes), not {requested}")]
    DiffSizeMismatch {
        /// The parent's virtual size.
        parent: u64,
        /// The size asked for.
        requested: u64,
    },
}
