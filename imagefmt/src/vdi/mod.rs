//! VDI (VirtualBox Disk Image): header and block map codecs, reading and writing guest data,
//! creating bases and differencing images, and finding parents.
//!
//! A VDI file starts with a 0x48-byte pre-header (free text, signature, version), followed by the
//! header proper (sizes, offsets, geometry, UUIDs), then a block map of one little-endian `u32`
//! per 1 MiB virtual block, then the data area where allocated blocks are appended in order.
//! A differencing image names its parent only by UUID (its linkage UUID is the parent's creation
//! UUID); the file stores no parent path. Facts: FORMATS.md §2.
//!
//! Files: `header` and `blockmap` (codecs), `image` ([`VdiImage`]: read, write, discard),
//! [`create`] (new dynamic, fixed and differencing images), `parent` (finding the parent of a
//! differencing image: [`ParentResolver`]; the chain walker in [`crate::chain`] opens it).

mod blockmap;
pub mod check;
pub mod create;
mod error;
mod header;
mod image;
mod parent;

// The format's API: the private files' types, and the creators at the format's root.
pub use blockmap::{BlockEntry, BlockMap};
pub use create::{create_differencing, create_dynamic, create_fixed};
pub use error::VdiError;
pub use header::{Geometry, ImageType, VdiHeader};
pub use image::VdiImage;
pub(crate) use parent::{check_parent, find_parent};
pub use parent::{Explicit, ParentLink, ParentResolver, SameDirectory, MAX_DIRECTORY_CANDIDATES};

/// The signature at [`SIGNATURE_OFFSET`] (bytes `7F 10 DA BE` on disk).
pub const SIGNATURE: u32 = 0xBEDA_107F;
/// Where the signature sits: right after the 64-byte info text.
pub const SIGNATURE_OFFSET: u64 = 0x40;
/// Version 1.1, the only version both VirtualBox and qemu open and the one we write.
pub const VERSION_1_1: u32 = 0x0001_0001;
/// Header size of a v1.1 header without LCHS geometry (qemu writes this).
pub const HEADER_SIZE_V1_1: u32 = 0x180;
/// Header size of a "1.1+" header with LCHS geometry (VirtualBox writes this).
pub const HEADER_SIZE_V1_1_PLUS: u32 = 0x190;
/// The block size we read and write (the only one qemu supports).
pub const DEFAULT_BLOCK_SIZE: u32 = 1 << 20;
/// Block map entry of a block never written (reads fall through to the parent, or zeros).
pub const BLOCK_FREE: u32 = 0xFFFF_FFFF;
/// Block map entry of a block explicitly zeroed (reads as zeros, also in a differencing image).
pub const BLOCK_ZERO: u32 = 0xFFFF_FFFE;
/// How many leading bytes of the file a caller must pass to [`VdiHeader::parse`]; also the
/// length [`VdiHeader::to_bytes`] returns (header, then zero padding).
pub const HEADER_REGION_LEN: usize = 0x200;
/// Sector size: offsets must be multiples of it and geometry sector sizes must equal it.
pub const SECTOR_SIZE: u32 = 512;
/// Alignment VirtualBox uses for the block map and data area of the images it creates.
pub const DATA_ALIGN: u32 = 1 << 20;
/// Image flag bits VirtualBox accepts on open; anything else is refused.
pub const FLAGS_MASK: u32 = 0x0003_0100;
/// Largest block count qemu opens (keeps the block map under 2 GiB).
pub const MAX_BLOCKS_IN_IMAGE: u32 = 0x1FFF_FF80;
/// Largest virtual disk size qemu opens: [`MAX_BLOCKS_IN_IMAGE`] blocks of 1 MiB.
pub const MAX_DISK_SIZE: u64 = MAX_BLOCKS_IN_IMAGE as u64 * DEFAULT_BLOCK_SIZE as u64;

/// True if `first_bytes` (the start of a file) carries the VDI signature at 0x40.
///
/// Used by format detection; short input simply yields `false`.
pub fn probe(first_bytes: &[u8]) -> bool {
    first_bytes.get(0x40..0x44) == Some(&SIGNATURE.to_le_bytes()[..])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_finds_the_signature_and_tolerates_short_input() {
        let mut bytes = vec![0u8; 0x44];
        assert!(!probe(&bytes));
        bytes[0x40..0x44].copy_from_slice(&[0x7F, 0x10, 0xDA, 0xBE]);
        assert!(probe(&bytes));
        for len in 0..0x44 {
            assert!(!probe(&bytes[..len]));
        }
        assert!(!probe(&[]));
    }

    /// Runs `qemu-img create -f vdi` with `args` and returns the resulting file's bytes.
    fn qemu_img_create(name: &str, args: &[&str], size: &str) -> Vec<u8> {
        let dir =
            std::env::temp_dir().join(format!("cowclone-vdi-{}-{}", std::process::id(), name));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("x.vdi");
        let output = std::process::Command::new("qemu-img")
            .arg("create")
            .arg("-f")
            .arg("vdi")
            .args(args)
            .arg(&path)
            .arg(size)
            .output();
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                panic!(
                    "qemu-img is required for this cross-check (Debian package `qemu-utils`): {e}"
                );
            }
        };
        let bytes = std::fs::read(&path);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            output.status.success(),
            "qemu-img create failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        bytes.unwrap()
    }

    fn block_map_of(bytes: &[u8], header: &VdiHeader) -> BlockMap {
        let start = header.offset_blocks as usize;
        let end = start + header.block_map_len_bytes() as usize;
        assert!(
            end <= bytes.len(),
            "block map lies past the end of the file"
        );
        BlockMap::parse(&bytes[start..end], header).unwrap()
    }

    #[test]
    fn parses_what_qemu_img_creates_dynamic() {
        let bytes = qemu_img_create("dynamic", &[], "1G");
        assert!(probe(&bytes));
        assert_eq!(bytes.len(), 4608);
        let h = VdiHeader::parse(&bytes[..HEADER_REGION_LEN]).unwrap();
        assert_eq!(h.virtual_size(), 1 << 30);
        assert_eq!(h.image_type, ImageType::Normal);
        assert_eq!(h.header_size, HEADER_SIZE_V1_1);
        assert_eq!(h.blocks_in_image, 1024);
        assert_eq!(h.blocks_allocated, 0);
        assert_eq!(h.offset_blocks, 0x200);
        assert_eq!(h.offset_data, 0x1200);
        assert_eq!(h.uuid_create.get_version_num(), 4);
        assert!(!h.is_differencing());
        // Everything after the header is zero, so the header re-encodes byte for byte.
        assert_eq!(&h.to_bytes()[..], &bytes[..HEADER_REGION_LEN]);
        let map = block_map_of(&bytes, &h);
        assert_eq!(map, BlockMap::new_free(1024));
    }

    #[test]
    fn parses_what_qemu_img_creates_static() {
        let bytes = qemu_img_create("static", &["-o", "static=on"], "5M");
        let h = VdiHeader::parse(&bytes[..HEADER_REGION_LEN]).unwrap();
        assert_eq!(h.virtual_size(), 5 << 20);
        assert_eq!(h.image_type, ImageType::Fixed);
        assert_eq!(h.blocks_in_image, 5);
        assert_eq!(h.blocks_allocated, 5);
        assert_eq!(h.offset_blocks, 0x200);
        assert_eq!(h.offset_data, 0x400);
        assert_eq!(bytes.len() as u64, 0x400 + (5 << 20));
        let map = block_map_of(&bytes, &h);
        for block in 0..5 {
            assert_eq!(map.get(block), Some(BlockEntry::Allocated(block)));
        }
    }

    #[test]
    fn limits_match_qemu() {
        assert_eq!(MAX_DISK_SIZE, 0x1FFF_FF80u64 << 20);
        assert_eq!(DEFAULT_BLOCK_SIZE, 0x10_0000);
    }
}
