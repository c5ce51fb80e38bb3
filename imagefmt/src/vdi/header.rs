//! The VDI pre-header and header (the first 0x1D8 bytes of the file): parse, validate, write.

use byteorder::{ByteOrder, LittleEndian};
use uuid::Uuid;

use super::{
    VdiError, BLOCK_ZERO, DATA_ALIGN, DEFAULT_BLOCK_SIZE, FLAGS_MASK, HEADER_REGION_LEN,
    HEADER_SIZE_V1_1, HEADER_SIZE_V1_1_PLUS, MAX_BLOCKS_IN_IMAGE, MAX_DISK_SIZE, SECTOR_SIZE,
    SIGNATURE, VERSION_1_1,
};

// Absolute byte offsets of the on-disk fields (FORMATS.md §2.1).
const OFF_SIGNATURE: usize = 0x040;
const OFF_VERSION: usize = 0x044;
const OFF_HEADER_SIZE: usize = 0x048;
const OFF_TYPE: usize = 0x04C;
const OFF_FLAGS: usize = 0x050;
const OFF_COMMENT: usize = 0x054;
const OFF_BLOCKS: usize = 0x154;
const OFF_DATA: usize = 0x158;
const OFF_LEGACY_GEOMETRY: usize = 0x15C;
const OFF_DUMMY: usize = 0x16C;
const OFF_DISK_SIZE: usize = 0x170;
const OFF_BLOCK_SIZE: usize = 0x178;
const OFF_BLOCK_EXTRA: usize = 0x17C;
const OFF_BLOCKS_IN_IMAGE: usize = 0x180;
const OFF_BLOCKS_ALLOCATED: usize = 0x184;
const OFF_UUID_CREATE: usize = 0x188;
const OFF_UUID_MODIFY: usize = 0x198;
const OFF_UUID_LINKAGE: usize = 0x1A8;
const OFF_UUID_PARENT_MODIFY: usize = 0x1B8;
const OFF_LCHS_GEOMETRY: usize = 0x1C8;
/// Length of the pre-header (text, signature, version); `header_size` counts from here.
const PRE_HEADER_LEN: usize = 0x48;
/// End of a v1.1 header (0x48 + 0x180).
const HEADER_END_V1_1: usize = PRE_HEADER_LEN + HEADER_SIZE_V1_1 as usize;
/// End of a 1.1+ header (0x48 + 0x190).
const HEADER_END_V1_1_PLUS: usize = PRE_HEADER_LEN + HEADER_SIZE_V1_1_PLUS as usize;

/// Info text VirtualBox writes into the pre-header of the images it creates.
const VBOX_TEXT: &[u8] = b"<<< Oracle VirtualBox Disk Image >>>\n";

/// VDI image type (`u32Type` at 0x04C).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageType {
    /// Dynamically growing base image.
    Normal = 1,
    /// Preallocated base image; the block map is the identity.
    Fixed = 2,
    /// Legacy undo image; VirtualBox treats it like a normal image.
    Undo = 3,
    /// Differencing image whose unallocated blocks come from a parent.
    Diff = 4,
}

impl ImageType {
    /// Decodes the on-disk value; `None` outside 1..=4.
    pub fn from_u32(value: u32) -> Option<ImageType> {
        match value {
            1 => Some(ImageType::Normal),
            2 => Some(ImageType::Fixed),
            3 => Some(ImageType::Undo),
            4 => Some(ImageType::Diff),
            _ => None,
        }
    }

    /// The on-disk value.
    pub fn to_u32(self) -> u32 {
        self as u32
    }
}

impl TryFrom<u32> for ImageType {
    type Error = VdiError;

    fn try_from(value: u32) -> Result<Self, VdiError> {
        ImageType::from_u32(value).ok_or(VdiError::UnknownImageType { found: value })
    }
}

impl From<ImageType> for u32 {
    fn from(value: ImageType) -> u32 {
        value.to_u32()
    }
}

/// A disk geometry record as stored in the header (four little-endian `u32`s).
///
/// VirtualBox writes all-zero C/H/S ("not calculated") with a 512-byte sector size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Geometry {
    /// Cylinder count.
    pub cylinders: u32,
    /// Head count.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
    /// Bytes per sector; must be 512.
    pub sector_size: u32,
}

impl Geometry {
    /// "Not calculated" geometry with 512-byte sectors, as VirtualBox and qemu write it.
    pub const UNSET: Geometry = Geometry {
        cylinders: 0,
        heads: 0,
        sectors: 0,
        sector_size: SECTOR_SIZE,
    };

    fn read(buf: &[u8], off: usize) -> Geometry {
        Geometry {
            cylinders: LittleEndian::read_u32(&buf[off..off + 4]),
            heads: LittleEndian::read_u32(&buf[off + 4..off + 8]),
            sectors: LittleEndian::read_u32(&buf[off + 8..off + 12]),
            sector_size: LittleEndian::read_u32(&buf[off + 12..off + 16]),
        }
    }

    fn write(&self, buf: &mut [u8], off: usize) {
        LittleEndian::write_u32(&mut buf[off..off + 4], self.cylinders);
        LittleEndian::write_u32(&mut buf[off + 4..off + 8], self.heads);
        LittleEndian::write_u32(&mut buf[off + 8..off + 12], self.sectors);
        LittleEndian::write_u32(&mut buf[off + 12..off + 16], self.sector_size);
    }
}

/// A decoded VDI pre-header and v1.1 / 1.1+ header, in native types.
///
/// The signature is not stored (it is constant). Obtain one from [`VdiHeader::parse`] (which
/// validates) or from the writer constructors [`VdiHeader::new_dynamic`] and
/// [`VdiHeader::new_differencing`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VdiHeader {
    /// 0x000: free-form info text, NUL-padded; not validated.
    pub text: [u8; 64],
    /// 0x044: format version; always [`VERSION_1_1`] after a successful parse.
    pub version: u32,
    /// 0x048: header size counted from 0x48; 0x180 (v1.1) or 0x190 (1.1+, with LCHS geometry).
    pub header_size: u32,
    /// 0x04C: image type.
    pub image_type: ImageType,
    /// 0x050: image flags (within [`FLAGS_MASK`]); write 0.
    pub flags: u32,
    /// 0x054: user comment, UTF-8, NUL-terminated; kept as raw bytes for an exact round trip.
    pub comment: [u8; 256],
    /// 0x154: byte offset of the block map.
    pub offset_blocks: u32,
    /// 0x158: byte offset of the data area.
    pub offset_data: u32,
    /// 0x15C: legacy geometry; its sector size must be 512.
    pub legacy_geometry: Geometry,
    /// 0x16C: unused (formerly a translation mode); write 0.
    pub dummy: u32,
    /// 0x170: virtual disk size in bytes.
    pub disk_size: u64,
    /// 0x178: block size in bytes; always [`DEFAULT_BLOCK_SIZE`] after a successful parse.
    pub block_size: u32,
    /// 0x17C: per-block prefix bytes; always 0 after a successful parse.
    pub block_extra: u32,
    /// 0x180: number of virtual blocks (entries in the block map).
    pub blocks_in_image: u32,
    /// 0x184: number of data blocks present in the data area.
    pub blocks_allocated: u32,
    /// 0x188: this image's identity; non-null.
    pub uuid_create: Uuid,
    /// 0x198: changes on every modification session; non-null.
    pub uuid_modify: Uuid,
    /// 0x1A8: a differencing image's parent `uuid_create`; null in a base image.
    pub uuid_linkage: Uuid,
    /// 0x1B8: the parent's `uuid_modify` when this differencing image was made; null in a base.
    pub uuid_parent_modify: Uuid,
    /// 0x1C8: logical CHS geometry; present iff `header_size >= 0x190`, sector size 512.
    pub lchs_geometry: Option<Geometry>,
}

fn read_uuid(buf: &[u8], off: usize) -> Uuid {
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&buf[off..off + 16]);
    Uuid::from_bytes_le(bytes)
}

fn check_sector_aligned(field: &'static str, offset: u32) -> Result<(), VdiError> {
    if offset % SECTOR_SIZE == 0 {
        Ok(())
    } else {
        Err(VdiError::OffsetNotSectorAligned { field, offset })
    }
}

/// The header checks qemu's VDI driver makes when it opens an image, in its order, so that
/// a file refused for several reasons is refused for the one qemu names (`qemu-img -f vdi` on a
/// file in another format). Each of them is also one of [`VdiHeader::parse`]'s own checks.
fn qemu_open_checks(buf: &[u8; HEADER_END_V1_1_PLUS]) -> Result<(), VdiError> {
    let u32_at = |off: usize| LittleEndian::read_u32(&buf[off..off + 4]);
    let disk_size = LittleEndian::read_u64(&buf[OFF_DISK_SIZE..OFF_DISK_SIZE + 8]);
    if disk_size > MAX_DISK_SIZE {
        return Err(VdiError::DiskTooLarge {
            disk_size,
            max: MAX_DISK_SIZE,
        });
    }
    let signature = u32_at(OFF_SIGNATURE);
    if signature != SIGNATURE {
        return Err(VdiError::BadSignature { found: signature });
    }
    let version = u32_at(OFF_VERSION);
    if version != VERSION_1_1 {
        return Err(VdiError::UnsupportedVersion { found: version });
    }
    check_sector_aligned("block map offset", u32_at(OFF_BLOCKS))?;
    check_sector_aligned("data offset", u32_at(OFF_DATA))?;
    let sector_size = Geometry::read(buf, OFF_LEGACY_GEOMETRY).sector_size;
    if sector_size != SECTOR_SIZE {
        return Err(VdiError::BadLegacySectorSize { found: sector_size });
    }
    let block_size = u32_at(OFF_BLOCK_SIZE);
    if block_size != DEFAULT_BLOCK_SIZE {
        return Err(VdiError::UnsupportedBlockSize { found: block_size });
    }
    // qemu rounds an odd disk size up to whole sectors before this comparison.
    let blocks = u32_at(OFF_BLOCKS_IN_IMAGE);
    if disk_size.next_multiple_of(u64::from(SECTOR_SIZE))
        > u64::from(block_size) * u64::from(blocks)
    {
        return Err(VdiError::DiskLargerThanBlocks {
            disk_size,
            blocks,
            block_size,
        });
    }
    if blocks > MAX_BLOCKS_IN_IMAGE {
        return Err(VdiError::TooManyBlocks {
            blocks,
            max: MAX_BLOCKS_IN_IMAGE,
        });
    }
    Ok(())
}

impl VdiHeader {
    /// Decodes and validates a header from the first bytes of a file.
    ///
    /// `bytes` should be the first [`HEADER_REGION_LEN`] bytes (or the whole file if shorter).
    /// Enforces every open-time check of VirtualBox and qemu that needs only the header
    /// (FORMATS.md §2.4, §2.5), except that differencing images are accepted and the block size
    /// must be exactly 1 MiB with no block extra. Checks against the file length are the caller's.
    pub fn parse(bytes: &[u8]) -> Result<VdiHeader, VdiError> {
        let len = bytes.len();
        if len < PRE_HEADER_LEN {
            return Err(VdiError::HeaderTooShort {
                len,
                needed: HEADER_END_V1_1,
            });
        }
        // Work on a fixed-size copy so that every field read below is in bounds.
        let mut buf = [0u8; HEADER_END_V1_1_PLUS];
        let n = len.min(HEADER_END_V1_1_PLUS);
        buf[..n].copy_from_slice(&bytes[..n]);
        let u32_at = |off: usize| LittleEndian::read_u32(&buf[off..off + 4]);
        qemu_open_checks(&buf)?;

        let signature = u32_at(OFF_SIGNATURE);
        if signature != SIGNATURE {
            return Err(VdiError::BadSignature { found: signature });
        }
        let version = u32_at(OFF_VERSION);
        if version != VERSION_1_1 {
            return Err(VdiError::UnsupportedVersion { found: version });
        }
        if len < HEADER_END_V1_1 {
            return Err(VdiError::HeaderTooShort {
                len,
                needed: HEADER_END_V1_1,
            });
        }
        let header_size = u32_at(OFF_HEADER_SIZE);
        if header_size < HEADER_SIZE_V1_1 {
            return Err(VdiError::HeaderSizeTooSmall { found: header_size });
        }
        let has_lchs = header_size >= HEADER_SIZE_V1_1_PLUS;
        if has_lchs && len < HEADER_END_V1_1_PLUS {
            return Err(VdiError::HeaderTooShort {
                len,
                needed: HEADER_END_V1_1_PLUS,
            });
        }

        let image_type = ImageType::try_from(u32_at(OFF_TYPE))?;
        let flags = u32_at(OFF_FLAGS);
        if flags & !FLAGS_MASK != 0 {
            return Err(VdiError::UnknownFlags { flags });
        }

        let offset_blocks = u32_at(OFF_BLOCKS);
        let offset_data = u32_at(OFF_DATA);
        check_sector_aligned("block map offset", offset_blocks)?;
        check_sector_aligned("data offset", offset_data)?;
        // VirtualBox compares against the v1.1 header end even for 1.1+ headers; with 512-byte
        // alignment both mean "at least 0x200".
        if (offset_blocks as usize) < HEADER_END_V1_1 {
            return Err(VdiError::BlockMapOffsetTooSmall {
                offset_blocks,
                min: HEADER_END_V1_1 as u32,
            });
        }

        let legacy_geometry = Geometry::read(&buf, OFF_LEGACY_GEOMETRY);
        if legacy_geometry.sector_size != SECTOR_SIZE {
            return Err(VdiError::BadLegacySectorSize {
                found: legacy_geometry.sector_size,
            });
        }
        let lchs_geometry = if has_lchs {
            let lchs = Geometry::read(&buf, OFF_LCHS_GEOMETRY);
            if lchs.sector_size != SECTOR_SIZE {
                return Err(VdiError::BadLchsSectorSize {
                    found: lchs.sector_size,
                });
            }
            Some(lchs)
        } else {
            None
        };

        let disk_size = LittleEndian::read_u64(&buf[OFF_DISK_SIZE..OFF_DISK_SIZE + 8]);
        let block_size = u32_at(OFF_BLOCK_SIZE);
        let block_extra = u32_at(OFF_BLOCK_EXTRA);
        let blocks_in_image = u32_at(OFF_BLOCKS_IN_IMAGE);
        let blocks_allocated = u32_at(OFF_BLOCKS_ALLOCATED);
        if disk_size == 0 {
            return Err(VdiError::ZeroDiskSize);
        }
        if blocks_in_image == 0 {
            return Err(VdiError::ZeroBlockCount);
        }
        if block_size != DEFAULT_BLOCK_SIZE {
            return Err(VdiError::UnsupportedBlockSize { found: block_size });
        }
        if block_extra != 0 {
            return Err(VdiError::BlockExtraNotSupported { found: block_extra });
        }
        if disk_size > MAX_DISK_SIZE {
            return Err(VdiError::DiskTooLarge {
                disk_size,
                max: MAX_DISK_SIZE,
            });
        }
        if blocks_in_image > MAX_BLOCKS_IN_IMAGE {
            return Err(VdiError::TooManyBlocks {
                blocks: blocks_in_image,
                max: MAX_BLOCKS_IN_IMAGE,
            });
        }
        if u64::from(block_size) * u64::from(blocks_in_image) < disk_size {
            return Err(VdiError::DiskLargerThanBlocks {
                disk_size,
                blocks: blocks_in_image,
                block_size,
            });
        }
        let block_map_end = u64::from(offset_blocks) + 4 * u64::from(blocks_in_image);
        if u64::from(offset_data) < block_map_end {
            return Err(VdiError::DataOffsetBeforeBlockMapEnd {
                offset_data,
                block_map_end,
            });
        }
        if blocks_allocated > blocks_in_image {
            return Err(VdiError::AllocatedExceedsBlocks {
                allocated: blocks_allocated,
                blocks: blocks_in_image,
            });
        }

        let uuid_create = read_uuid(&buf, OFF_UUID_CREATE);
        if uuid_create.is_nil() {
            return Err(VdiError::NullUuid { field: "creation" });
        }
        let uuid_modify = read_uuid(&buf, OFF_UUID_MODIFY);
        if uuid_modify.is_nil() {
            return Err(VdiError::NullUuid {
                field: "modification",
            });
        }

        let mut text = [0u8; 64];
        text.copy_from_slice(&buf[..OFF_SIGNATURE]);
        let mut comment = [0u8; 256];
        comment.copy_from_slice(&buf[OFF_COMMENT..OFF_BLOCKS]);
        Ok(VdiHeader {
            text,
            version,
            header_size,
            image_type,
            flags,
            comment,
            offset_blocks,
            offset_data,
            legacy_geometry,
            dummy: u32_at(OFF_DUMMY),
            disk_size,
            block_size,
            block_extra,
            blocks_in_image,
            blocks_allocated,
            uuid_create,
            uuid_modify,
            uuid_linkage: read_uuid(&buf, OFF_UUID_LINKAGE),
            uuid_parent_modify: read_uuid(&buf, OFF_UUID_PARENT_MODIFY),
            lchs_geometry,
        })
    }

    /// Encodes the header into the first [`HEADER_REGION_LEN`] bytes of a file.
    ///
    /// Everything after the header is zero. The LCHS geometry is written only when present
    /// (1.1+ form); `header_size` is written as stored.
    pub fn to_bytes(&self) -> [u8; HEADER_REGION_LEN] {
        let mut out = [0u8; HEADER_REGION_LEN];
        out[..OFF_SIGNATURE].copy_from_slice(&self.text);
        let mut put_u32 = |off: usize, v: u32| LittleEndian::write_u32(&mut out[off..off + 4], v);
        put_u32(OFF_SIGNATURE, SIGNATURE);
        put_u32(OFF_VERSION, self.version);
        put_u32(OFF_HEADER_SIZE, self.header_size);
        put_u32(OFF_TYPE, self.image_type.to_u32());
        put_u32(OFF_FLAGS, self.flags);
        put_u32(OFF_BLOCKS, self.offset_blocks);
        put_u32(OFF_DATA, self.offset_data);
        put_u32(OFF_DUMMY, self.dummy);
        put_u32(OFF_BLOCK_SIZE, self.block_size);
        put_u32(OFF_BLOCK_EXTRA, self.block_extra);
        put_u32(OFF_BLOCKS_IN_IMAGE, self.blocks_in_image);
        put_u32(OFF_BLOCKS_ALLOCATED, self.blocks_allocated);
        out[OFF_COMMENT..OFF_BLOCKS].copy_from_slice(&self.comment);
        LittleEndian::write_u64(&mut out[OFF_DISK_SIZE..OFF_DISK_SIZE + 8], self.disk_size);
        self.legacy_geometry.write(&mut out, OFF_LEGACY_GEOMETRY);
        let uuids = [
            (OFF_UUID_CREATE, self.uuid_create),
            (OFF_UUID_MODIFY, self.uuid_modify),
            (OFF_UUID_LINKAGE, self.uuid_linkage),
            (OFF_UUID_PARENT_MODIFY, self.uuid_parent_modify),
        ];
        for (off, uuid) in uuids {
            out[off..off + 16].copy_from_slice(&uuid.to_bytes_le());
        }
        if let Some(lchs) = &self.lchs_geometry {
            lchs.write(&mut out, OFF_LCHS_GEOMETRY);
        }
        out
    }

    /// True for a differencing image: type [`ImageType::Diff`] or a non-null linkage UUID
    /// (VirtualBox treats either as a diff).
    pub fn is_differencing(&self) -> bool {
        self.image_type == ImageType::Diff || !self.uuid_linkage.is_nil()
    }

    /// How many leading bytes of [`VdiHeader::to_bytes`] hold the pre-header and header proper:
    /// 0x1D8 with LCHS geometry (1.1+), 0x1C8 without. A writer updating the header of an
    /// existing file rewrites only these, so bytes after the header are never touched.
    pub fn encoded_len(&self) -> usize {
        if self.lchs_geometry.is_some() {
            HEADER_END_V1_1_PLUS
        } else {
            HEADER_END_V1_1
        }
    }

    /// Byte offset in the file of data block `index` (`offset_data + index × block_size`).
    pub fn data_block_offset(&self, index: u32) -> u64 {
        u64::from(self.offset_data) + u64::from(index) * u64::from(self.block_size)
    }

    /// File length that holds the header, block map and `blocks_allocated` whole data blocks.
    pub fn allocated_end(&self) -> u64 {
        self.data_block_offset(self.blocks_allocated)
    }

    /// Length of the block map in bytes (4 × `blocks_in_image`); at most 2 GiB for a parsed
    /// header. Callers must check `offset_blocks` + this fits in the file before reading it.
    pub fn block_map_len_bytes(&self) -> u64 {
        4 * u64::from(self.blocks_in_image)
    }

    /// The virtual disk size in bytes, as stored.
    ///
    /// Not rounded: for a size that is not a multiple of 512 VirtualBox rounds down and qemu
    /// rounds up; images we write never have such sizes.
    pub fn virtual_size(&self) -> u64 {
        self.disk_size
    }

    /// A new dynamic (type 1) base image header laid out as VirtualBox lays out its own.
    ///
    /// 0x190 header, geometries "unset" with 512-byte sectors, 1 MiB blocks, block map at 1 MiB,
    /// data area at the next 1 MiB boundary after the map, fresh random creation and modification
    /// UUIDs. `disk_size` must be a non-zero multiple of 512 no larger than [`MAX_DISK_SIZE`].
    pub fn new_dynamic(disk_size: u64) -> Result<VdiHeader, VdiError> {
        if disk_size == 0 {
            return Err(VdiError::ZeroDiskSize);
        }
        if disk_size % u64::from(SECTOR_SIZE) != 0 {
            return Err(VdiError::DiskSizeNotSectorMultiple { disk_size });
        }
        if disk_size > MAX_DISK_SIZE {
            return Err(VdiError::DiskTooLarge {
                disk_size,
                max: MAX_DISK_SIZE,
            });
        }
        Ok(Self::vbox_layout(disk_size, ImageType::Normal))
    }

    /// A new differencing (type 4) image header on top of `parent`.
    ///
    /// Links to the parent by UUID (linkage = parent's creation UUID, parent-modify = parent's
    /// modification UUID), takes the parent's disk size and otherwise matches
    /// [`VdiHeader::new_dynamic`]. `parent` should be a validated header (e.g. from
    /// [`VdiHeader::parse`]); otherwise the result may not validate either.
    pub fn new_differencing(parent: &VdiHeader) -> VdiHeader {
        let mut header = Self::vbox_layout(parent.disk_size, ImageType::Diff);
        header.uuid_linkage = parent.uuid_create;
        header.uuid_parent_modify = parent.uuid_modify;
        header
    }

    /// VirtualBox's creation layout; never panics, saturating for out-of-range sizes.
    fn vbox_layout(disk_size: u64, image_type: ImageType) -> VdiHeader {
        let block_size = u64::from(DEFAULT_BLOCK_SIZE);
        let align = u64::from(DATA_ALIGN);
        let blocks = disk_size.div_ceil(block_size);
        let offset_blocks = (HEADER_END_V1_1_PLUS as u64).next_multiple_of(align);
        let offset_data = offset_blocks.saturating_add((4 * blocks).next_multiple_of(align));
        let mut text = [0u8; 64];
        text[..VBOX_TEXT.len()].copy_from_slice(VBOX_TEXT);
        VdiHeader {
            text,
            version: VERSION_1_1,
            header_size: HEADER_SIZE_V1_1_PLUS,
            image_type,
            flags: 0,
            comment: [0u8; 256],
            offset_blocks: u32::try_from(offset_blocks).unwrap_or(u32::MAX),
            offset_data: u32::try_from(offset_data).unwrap_or(u32::MAX),
            legacy_geometry: Geometry::UNSET,
            dummy: 0,
            disk_size,
            block_size: DEFAULT_BLOCK_SIZE,
            block_extra: 0,
            blocks_in_image: u32::try_from(blocks).unwrap_or(BLOCK_ZERO),
            blocks_allocated: 0,
            uuid_create: Uuid::new_v4(),
            uuid_modify: Uuid::new_v4(),
            uuid_linkage: Uuid::nil(),
            uuid_parent_modify: Uuid::nil(),
            lchs_geometry: Some(Geometry::UNSET),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn put_u32(buf: &mut [u8], off: usize, v: u32) {
        buf[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn put_u64(buf: &mut [u8], off: usize, v: u64) {
        buf[off..off + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// UUID bytes of the fixture as stored on disk (LE-GUID order: the first three groups are
    /// byte-swapped, so both read back as version-4 UUIDs).
    pub(crate) const CREATE_BYTES: [u8; 16] = [
        0xF8, 0x7E, 0xA3, 0xAC, 0xAA, 0xDD, 0x1C, 0x4B, 0xA9, 0xF0, 0x11, 0x22, 0x33, 0x44, 0x55,
        0x66,
    ];
    const MODIFY_BYTES: [u8; 16] = [
        0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x08, 0x47, 0x89, 0x0A, 0x0B, 0x0C, 0x0D, 0x0E, 0x0F,
        0x10,
    ];

    /// The first 0x200 bytes of `qemu-img create -f vdi x.vdi 1G` (qemu 7.2), with fixed UUIDs.
    pub(crate) fn qemu_1g_fixture() -> Vec<u8> {
        let mut b = vec![0u8; 0x200];
        let text = b"<<< QEMU VM Virtual Disk Image >>>\n";
        b[..text.len()].copy_from_slice(text); // 0x000 text (35 bytes + 29 NUL)
        b[0x40..0x44].copy_from_slice(&[0x7F, 0x10, 0xDA, 0xBE]); // 0x040 signature
        b[0x44..0x48].copy_from_slice(&[0x01, 0x00, 0x01, 0x00]); // 0x044 version 1.1
        put_u32(&mut b, 0x048, 0x180); // 0x048 header_size
        put_u32(&mut b, 0x04C, 1); // 0x04C image type: normal
        put_u32(&mut b, 0x050, 0); // 0x050 flags
                                   // 0x054 comment: 256 zero bytes (already zero)
        put_u32(&mut b, 0x154, 0x200); // 0x154 offset_blocks
        put_u32(&mut b, 0x158, 0x1200); // 0x158 offset_data
        put_u32(&mut b, 0x15C, 0); // 0x15C legacy cylinders
        put_u32(&mut b, 0x160, 0); // 0x160 legacy heads
        put_u32(&mut b, 0x164, 0); // 0x164 legacy sectors
        put_u32(&mut b, 0x168, 512); // 0x168 legacy sector size
        put_u32(&mut b, 0x16C, 0); // 0x16C dummy
        put_u64(&mut b, 0x170, 1 << 30); // 0x170 disk_size 1 GiB
        put_u32(&mut b, 0x178, 1 << 20); // 0x178 block_size 1 MiB
        put_u32(&mut b, 0x17C, 0); // 0x17C block_extra
        put_u32(&mut b, 0x180, 1024); // 0x180 blocks_in_image
        put_u32(&mut b, 0x184, 0); // 0x184 blocks_allocated
        b[0x188..0x198].copy_from_slice(&CREATE_BYTES); // 0x188 uuid_create
        b[0x198..0x1A8].copy_from_slice(&MODIFY_BYTES); // 0x198 uuid_modify
                                                        // 0x1A8 uuid_linkage, 0x1B8 uuid_parent_modify, 0x1C8 LCHS area, then padding:
                                                        // all zero up to 0x200
        b
    }

    #[test]
    fn parses_the_qemu_fixture_field_by_field() {
        let h = VdiHeader::parse(&qemu_1g_fixture()).unwrap();
        assert_eq!(&h.text[..35], b"<<< QEMU VM Virtual Disk Image >>>\n");
        assert!(h.text[35..].iter().all(|&c| c == 0));
        assert_eq!(h.version, VERSION_1_1);
        assert_eq!(h.header_size, 0x180);
        assert_eq!(h.image_type, ImageType::Normal);
        assert_eq!(h.flags, 0);
        assert_eq!(h.comment, [0u8; 256]);
        assert_eq!(h.offset_blocks, 0x200);
        assert_eq!(h.offset_data, 0x1200);
        assert_eq!(h.legacy_geometry, Geometry::UNSET);
        assert_eq!(h.dummy, 0);
        assert_eq!(h.disk_size, 1 << 30);
        assert_eq!(h.virtual_size(), 1 << 30);
        assert_eq!(h.block_size, 1 << 20);
        assert_eq!(h.block_extra, 0);
        assert_eq!(h.blocks_in_image, 1024);
        assert_eq!(h.blocks_allocated, 0);
        assert_eq!(
            h.uuid_create,
            Uuid::parse_str("aca37ef8-ddaa-4b1c-a9f0-112233445566").unwrap()
        );
        assert_eq!(
            h.uuid_modify,
            Uuid::parse_str("04030201-0605-4708-890a-0b0c0d0e0f10").unwrap()
        );
        assert_eq!(h.uuid_create.get_version_num(), 4);
        assert_eq!(h.uuid_modify.get_version_num(), 4);
        assert!(h.uuid_linkage.is_nil());
        assert!(h.uuid_parent_modify.is_nil());
        assert_eq!(h.lchs_geometry, None);
        assert!(!h.is_differencing());
        assert_eq!(h.block_map_len_bytes(), 4096);
        // 0x200 + 4096 = 0x1200: the data area follows the map directly.
        assert_eq!(u64::from(h.offset_blocks) + h.block_map_len_bytes(), 0x1200);
    }

    #[test]
    fn round_trips_the_qemu_fixture_byte_for_byte() {
        let bytes = qemu_1g_fixture();
        let h = VdiHeader::parse(&bytes).unwrap();
        assert_eq!(h.to_bytes().to_vec(), bytes);
        assert_eq!(VdiHeader::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn round_trips_a_plus_header_with_comment_and_lchs() {
        let mut h = VdiHeader::new_dynamic(10 << 20).unwrap();
        h.comment[..5].copy_from_slice(b"hello");
        h.lchs_geometry = Some(Geometry {
            cylinders: 20,
            heads: 16,
            sectors: 63,
            sector_size: 512,
        });
        h.blocks_allocated = 3;
        let bytes = h.to_bytes();
        assert_eq!(&bytes[0x1C8..0x1CC], &20u32.to_le_bytes());
        assert!(bytes[0x1D8..].iter().all(|&c| c == 0));
        assert_eq!(VdiHeader::parse(&bytes).unwrap(), h);
    }

    #[test]
    fn accepts_a_file_exactly_as_long_as_the_header() {
        let bytes = qemu_1g_fixture();
        assert!(VdiHeader::parse(&bytes[..0x1C8]).is_ok());
        let plus = VdiHeader::new_dynamic(1 << 20).unwrap().to_bytes();
        assert!(VdiHeader::parse(&plus[..0x1D8]).is_ok());
    }

    fn mutated(f: impl FnOnce(&mut Vec<u8>)) -> VdiError {
        let mut bytes = qemu_1g_fixture();
        f(&mut bytes);
        VdiHeader::parse(&bytes).unwrap_err()
    }

    #[test]
    fn rejects_short_input() {
        let bytes = qemu_1g_fixture();
        assert_eq!(
            VdiHeader::parse(&[]).unwrap_err(),
            VdiError::HeaderTooShort {
                len: 0,
                needed: 0x1C8
            }
        );
        assert_eq!(
            VdiHeader::parse(&bytes[..0x1C7]).unwrap_err(),
            VdiError::HeaderTooShort {
                len: 0x1C7,
                needed: 0x1C8
            }
        );
        let mut plus = bytes.clone();
        put_u32(&mut plus, 0x48, 0x190);
        assert_eq!(
            VdiHeader::parse(&plus[..0x1D7]).unwrap_err(),
            VdiError::HeaderTooShort {
                len: 0x1D7,
                needed: 0x1D8
            }
        );
    }

    #[test]
    fn rejects_bad_signature() {
        let e = mutated(|b| put_u32(b, 0x40, 0xBEDA_1080));
        assert_eq!(e, VdiError::BadSignature { found: 0xBEDA_1080 });
    }

    #[test]
    fn rejects_other_versions() {
        // VirtualBox's legacy 0x00000002 and a future 1.2 are both refused (qemu refuses them).
        for v in [0x0000_0002, 0x0001_0002, 0x0002_0001] {
            let e = mutated(|b| put_u32(b, 0x44, v));
            assert_eq!(e, VdiError::UnsupportedVersion { found: v });
        }
    }

    #[test]
    fn rejects_small_header_size() {
        let e = mutated(|b| put_u32(b, 0x48, 0x17F));
        assert_eq!(e, VdiError::HeaderSizeTooSmall { found: 0x17F });
    }

    #[test]
    fn rejects_unknown_image_type() {
        for t in [0, 5] {
            let e = mutated(|b| put_u32(b, 0x4C, t));
            assert_eq!(e, VdiError::UnknownImageType { found: t });
        }
    }

    #[test]
    fn rejects_unknown_flags_but_accepts_the_vbox_mask() {
        let e = mutated(|b| put_u32(b, 0x50, 1));
        assert_eq!(e, VdiError::UnknownFlags { flags: 1 });
        let mut bytes = qemu_1g_fixture();
        put_u32(&mut bytes, 0x50, FLAGS_MASK);
        assert_eq!(VdiHeader::parse(&bytes).unwrap().flags, FLAGS_MASK);
    }

    #[test]
    fn rejects_unaligned_offsets() {
        let e = mutated(|b| put_u32(b, 0x154, 0x201));
        assert_eq!(
            e,
            VdiError::OffsetNotSectorAligned {
                field: "block map offset",
                offset: 0x201
            }
        );
        let e = mutated(|b| put_u32(b, 0x158, 0x1201));
        assert_eq!(
            e,
            VdiError::OffsetNotSectorAligned {
                field: "data offset",
                offset: 0x1201
            }
        );
    }

    #[test]
    fn rejects_block_map_overlapping_the_header() {
        let e = mutated(|b| put_u32(b, 0x154, 0));
        assert_eq!(
            e,
            VdiError::BlockMapOffsetTooSmall {
                offset_blocks: 0,
                min: 0x1C8
            }
        );
    }

    #[test]
    fn rejects_data_area_overlapping_the_block_map() {
        let e = mutated(|b| put_u32(b, 0x158, 0x1000));
        assert_eq!(
            e,
            VdiError::DataOffsetBeforeBlockMapEnd {
                offset_data: 0x1000,
                block_map_end: 0x1200
            }
        );
    }

    #[test]
    fn rejects_bad_legacy_sector_size() {
        let e = mutated(|b| put_u32(b, 0x168, 4096));
        assert_eq!(e, VdiError::BadLegacySectorSize { found: 4096 });
    }

    #[test]
    fn rejects_bad_lchs_sector_size_only_in_plus_headers() {
        // A 0x190 header whose LCHS area is still zero.
        let e = mutated(|b| put_u32(b, 0x48, 0x190));
        assert_eq!(e, VdiError::BadLchsSectorSize { found: 0 });
        // The same bytes in a 0x180 header are not looked at.
        let mut bytes = qemu_1g_fixture();
        put_u32(&mut bytes, 0x1D4, 4096);
        assert!(VdiHeader::parse(&bytes).is_ok());
    }

    #[test]
    fn rejects_zero_disk_size() {
        assert_eq!(mutated(|b| put_u64(b, 0x170, 0)), VdiError::ZeroDiskSize);
    }

    #[test]
    fn rejects_zero_block_count() {
        // qemu's check comes first: no block leaves no room for the disk.
        assert_eq!(
            mutated(|b| put_u32(b, 0x180, 0)),
            VdiError::DiskLargerThanBlocks {
                disk_size: 1 << 30,
                blocks: 0,
                block_size: 1 << 20
            }
        );
    }

    #[test]
    fn refuses_for_the_first_check_qemu_makes() {
        // A qcow2 header read as VDI: the disk size field (feature name text) is checked first.
        let e = mutated(|b| {
            put_u64(b, 0x170, 0x7374_6e75_6f63_6665);
            put_u32(b, 0x40, 0);
        });
        assert!(matches!(e, VdiError::DiskTooLarge { .. }), "{e:?}");
        let e = mutated(|b| {
            put_u32(b, 0x40, 0);
            put_u32(b, 0x178, 4096);
        });
        assert_eq!(e, VdiError::BadSignature { found: 0 });
    }

    #[test]
    fn rejects_other_block_sizes() {
        for size in [0, 1 << 19, 1 << 21, (1 << 20) + 1] {
            let e = mutated(|b| put_u32(b, 0x178, size));
            assert_eq!(e, VdiError::UnsupportedBlockSize { found: size });
        }
    }

    #[test]
    fn rejects_block_extra() {
        let e = mutated(|b| put_u32(b, 0x17C, 512));
        assert_eq!(e, VdiError::BlockExtraNotSupported { found: 512 });
    }

    #[test]
    fn rejects_disk_larger_than_blocks() {
        let e = mutated(|b| put_u64(b, 0x170, (1 << 30) + 512));
        assert_eq!(
            e,
            VdiError::DiskLargerThanBlocks {
                disk_size: (1 << 30) + 512,
                blocks: 1024,
                block_size: 1 << 20
            }
        );
    }

    #[test]
    fn rejects_too_many_blocks() {
        let e = mutated(|b| put_u32(b, 0x180, MAX_BLOCKS_IN_IMAGE + 1));
        assert_eq!(
            e,
            VdiError::TooManyBlocks {
                blocks: MAX_BLOCKS_IN_IMAGE + 1,
                max: MAX_BLOCKS_IN_IMAGE
            }
        );
    }

    #[test]
    fn rejects_too_large_disk() {
        let e = mutated(|b| put_u64(b, 0x170, MAX_DISK_SIZE + 512));
        assert_eq!(
            e,
            VdiError::DiskTooLarge {
                disk_size: MAX_DISK_SIZE + 512,
                max: MAX_DISK_SIZE
            }
        );
    }

    #[test]
    fn rejects_more_allocated_than_blocks() {
        let e = mutated(|b| put_u32(b, 0x184, 1025));
        assert_eq!(
            e,
            VdiError::AllocatedExceedsBlocks {
                allocated: 1025,
                blocks: 1024
            }
        );
    }

    #[test]
    fn rejects_null_uuids() {
        let e = mutated(|b| b[0x188..0x198].fill(0));
        assert_eq!(e, VdiError::NullUuid { field: "creation" });
        let e = mutated(|b| b[0x198..0x1A8].fill(0));
        assert_eq!(
            e,
            VdiError::NullUuid {
                field: "modification"
            }
        );
    }

    #[test]
    fn accepts_differencing_images() {
        let mut bytes = qemu_1g_fixture();
        bytes[0x1A8..0x1B8].copy_from_slice(&MODIFY_BYTES);
        let h = VdiHeader::parse(&bytes).unwrap();
        assert!(h.is_differencing());
        assert_eq!(h.image_type, ImageType::Normal);
        put_u32(&mut bytes, 0x4C, 4);
        bytes[0x1A8..0x1B8].fill(0);
        assert!(VdiHeader::parse(&bytes).unwrap().is_differencing());
    }

    #[test]
    fn image_type_converts_both_ways() {
        for t in [
            ImageType::Normal,
            ImageType::Fixed,
            ImageType::Undo,
            ImageType::Diff,
        ] {
            assert_eq!(ImageType::try_from(u32::from(t)).unwrap(), t);
        }
        assert_eq!(ImageType::from_u32(0), None);
    }

    #[test]
    fn new_dynamic_matches_virtualbox_layout() {
        let h = VdiHeader::new_dynamic(1 << 30).unwrap();
        assert_eq!(&h.text[..VBOX_TEXT.len()], VBOX_TEXT);
        assert_eq!(h.header_size, 0x190);
        assert_eq!(h.image_type, ImageType::Normal);
        assert_eq!(h.offset_blocks, 0x10_0000);
        assert_eq!(h.offset_data, 0x20_0000);
        assert_eq!(h.blocks_in_image, 1024);
        assert_eq!(h.lchs_geometry, Some(Geometry::UNSET));
        assert_eq!(h.legacy_geometry, Geometry::UNSET);
        assert_eq!(h.uuid_create.get_version_num(), 4);
        assert_eq!(h.uuid_modify.get_version_num(), 4);
        assert_ne!(h.uuid_create, h.uuid_modify);
        assert!(!h.is_differencing());
        assert_eq!(VdiHeader::parse(&h.to_bytes()).unwrap(), h);

        // A partial last block still gets a block; a map just over 1 MiB needs two MiB.
        let h = VdiHeader::new_dynamic((1 << 20) + 512).unwrap();
        assert_eq!(h.blocks_in_image, 2);
        assert_eq!(h.offset_data, 0x20_0000);
        let h = VdiHeader::new_dynamic((262_145u64) << 20).unwrap();
        assert_eq!(h.offset_data, 0x30_0000);
        // The largest disk still fits the u32 offsets.
        let h = VdiHeader::new_dynamic(MAX_DISK_SIZE).unwrap();
        assert_eq!(h.blocks_in_image, MAX_BLOCKS_IN_IMAGE);
        assert_eq!(VdiHeader::parse(&h.to_bytes()).unwrap(), h);
    }

    #[test]
    fn new_dynamic_rejects_bad_sizes() {
        assert_eq!(VdiHeader::new_dynamic(0), Err(VdiError::ZeroDiskSize));
        assert_eq!(
            VdiHeader::new_dynamic(513),
            Err(VdiError::DiskSizeNotSectorMultiple { disk_size: 513 })
        );
        assert_eq!(
            VdiHeader::new_dynamic(MAX_DISK_SIZE + 512),
            Err(VdiError::DiskTooLarge {
                disk_size: MAX_DISK_SIZE + 512,
                max: MAX_DISK_SIZE
            })
        );
    }

    #[test]
    fn new_differencing_links_to_the_parent() {
        let parent = VdiHeader::parse(&qemu_1g_fixture()).unwrap();
        let diff = VdiHeader::new_differencing(&parent);
        assert_eq!(diff.image_type, ImageType::Diff);
        assert_eq!(diff.uuid_linkage, parent.uuid_create);
        assert_eq!(diff.uuid_parent_modify, parent.uuid_modify);
        assert_eq!(diff.disk_size, parent.disk_size);
        assert_eq!(diff.blocks_in_image, parent.blocks_in_image);
        assert_ne!(diff.uuid_create, parent.uuid_create);
        assert_ne!(diff.uuid_modify, parent.uuid_modify);
        assert_eq!(diff.blocks_allocated, 0);
        assert_eq!(diff.offset_blocks, 0x10_0000);
        assert_eq!(diff.offset_data, 0x20_0000);
        assert!(diff.is_differencing());
        let bytes = diff.to_bytes();
        assert_eq!(&bytes[0x1A8..0x1B8], &CREATE_BYTES);
        assert_eq!(&bytes[0x1B8..0x1C8], &MODIFY_BYTES);
        assert_eq!(VdiHeader::parse(&bytes).unwrap(), diff);
    }

    #[test]
    fn new_differencing_does_not_panic_on_a_nonsense_parent() {
        let mut parent = VdiHeader::parse(&qemu_1g_fixture()).unwrap();
        parent.disk_size = u64::MAX;
        let diff = VdiHeader::new_differencing(&parent);
        assert!(VdiHeader::parse(&diff.to_bytes()).is_err());
    }

    /// Where the parsed header ends (later bytes are not part of the round trip).
    fn header_end(h: &VdiHeader) -> usize {
        if h.lchs_geometry.is_some() {
            HEADER_END_V1_1_PLUS
        } else {
            HEADER_END_V1_1
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics_on_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..1024)) {
            let _ = VdiHeader::parse(&bytes);
        }

        #[test]
        fn parse_never_panics_on_mutated_headers(
            plus in any::<bool>(),
            len in 0usize..=0x200,
            edits in proptest::collection::vec((0usize..0x200, any::<u8>()), 1..8),
        ) {
            let mut bytes = if plus {
                VdiHeader::new_dynamic(1 << 30).unwrap().to_bytes().to_vec()
            } else {
                qemu_1g_fixture()
            };
            for (at, value) in edits {
                bytes[at] = value;
            }
            bytes.truncate(len);
            if let Ok(h) = VdiHeader::parse(&bytes) {
                prop_assert_eq!(VdiHeader::parse(&h.to_bytes()).unwrap(), h.clone());
                let end = header_end(&h);
                if bytes[end..].iter().all(|&c| c == 0) {
                    prop_assert_eq!(&h.to_bytes()[..bytes.len()], &bytes[..]);
                }
            }
        }

        #[test]
        fn new_dynamic_round_trips(sectors in 1u64..=(MAX_DISK_SIZE / 512)) {
            let h = VdiHeader::new_dynamic(sectors * 512).unwrap();
            prop_assert_eq!(VdiHeader::parse(&h.to_bytes()).unwrap(), h);
        }
    }
}
