//! Creating VDI images natively: dynamic and fixed bases, and differencing images (which
//! `qemu-img` cannot create).
//!
//! Layout as VirtualBox lays out its own images ([`VdiHeader::new_dynamic`]): a 0x190-byte header,
//! the block map at 1 MiB, the data area at the next 1 MiB boundary after the map, and the file
//! exactly as long as the header, map and data blocks (`offset_data` for a new dynamic or
//! differencing image; `offset_data + blocks × 1 MiB` for a fixed one, extended sparsely).
//! Files are created through [`create_with`]: never half-written under the final name, never
//! replacing a file unless asked, durable on request.

use std::path::Path;

use super::image::VdiImage;
use super::{BlockEntry, ImageType, VdiError, VdiHeader, BLOCK_FREE, MAX_DISK_SIZE, SECTOR_SIZE};
use crate::image::ImageHeader;
use crate::io::Backend;
use crate::new_file::{create_with, NewFileMode};
use crate::{Error, Result};

/// Block map entries written per I/O while creating an image (1 MiB of map).
const MAP_CHUNK_ENTRIES: u32 = 1 << 18;

/// Rounds a requested size up to whole 512-byte sectors, as `qemu-img create` does.
fn round_size(size: u64) -> Result<u64> {
    size.checked_next_multiple_of(u64::from(SECTOR_SIZE))
        .ok_or_else(|| {
            VdiError::DiskTooLarge {
                disk_size: size,
                max: MAX_DISK_SIZE,
            }
            .into()
        })
}

/// Creates a dynamic (type 1) VDI base image of `size` bytes (rounded up to 512) at `path`.
pub fn create_dynamic(path: &Path, size: u64, mode: NewFileMode) -> Result<VdiHeader> {
    create_with(path, mode, |file| write_dynamic(file, size))
}

/// Creates a fixed (type 2, "static") VDI base image of `size` bytes (rounded up to 512) at
/// `path`: identity block map, every block allocated, the file extended (sparsely) to hold them.
pub fn create_fixed(path: &Path, size: u64, mode: NewFileMode) -> Result<VdiHeader> {
    create_with(path, mode, |file| write_fixed(file, size))
}

/// Creates a differencing (type 4) VDI image at `diff_path` on top of the VDI image at
/// `parent_path` (which may itself be a differencing image).
///
/// The parent is opened natively and its header and block map validated; a parent that is not
/// a VDI image is refused with [`VdiError::ParentNotVdi`] naming it, and `diff_path` naming the
/// parent itself with [`Error::BackingIsTarget`]. The new image links to the parent by UUID
/// (linkage = parent's creation UUID, parent-modification = parent's modification UUID), has the
/// parent's size and fresh random UUIDs of its own. The file stores no parent path: readers find
/// the parent by UUID ([`super::ParentResolver`]).
pub fn create_differencing(
    parent_path: &Path,
    diff_path: &Path,
    mode: NewFileMode,
) -> Result<VdiHeader> {
    let parent = read_parent_header(parent_path)?;
    if crate::open::same_file(diff_path, parent_path) {
        return Err(Error::BackingIsTarget {
            path: diff_path.to_owned(),
        });
    }
    create_with(diff_path, mode, |file| write_differencing(file, &parent))
}

/// Reads and validates the header (and block map) of the VDI image meant as a parent.
pub fn read_parent_header(parent_path: &Path) -> Result<VdiHeader> {
    // Headers only, no lock, as for a qcow2 overlay's backing file (see `builder.rs`).
    let file = crate::open::open_image(
        parent_path,
        crate::open::OpenHow::force_share().metadata_only(),
    )?;
    let header = match ImageHeader::read_detected(&file, parent_path, true)? {
        ImageHeader::Vdi(header) => *header,
        other => {
            return Err(VdiError::ParentNotVdi {
                path: parent_path.to_owned(),
                format: other.format().name(),
            }
            .into())
        }
    };
    VdiImage::open(&file, header.clone(), None)?;
    Ok(header)
}

/// Writes a new dynamic image of `size` bytes (rounded up to 512) onto an empty `backend`.
pub fn write_dynamic<B: Backend + ?Sized>(backend: &B, size: u64) -> Result<VdiHeader> {
    let header = VdiHeader::new_dynamic(round_size(size)?)?;
    write_image(backend, &header)?;
    Ok(header)
}

/// Writes a new fixed image of `size` bytes (rounded up to 512) onto an empty `backend`.
pub(crate) fn write_fixed<B: Backend + ?Sized>(backend: &B, size: u64) -> Result<VdiHeader> {
    let mut header = VdiHeader::new_dynamic(round_size(size)?)?;
    header.image_type = ImageType::Fixed;
    header.blocks_allocated = header.blocks_in_image;
    write_image(backend, &header)?;
    Ok(header)
}

/// Writes a new differencing image on top of the image whose header is `parent` onto an empty
/// `backend`.
pub(crate) fn write_differencing<B: Backend + ?Sized>(
    backend: &B,
    parent: &VdiHeader,
) -> Result<VdiHeader> {
    let header = VdiHeader::new_differencing(parent);
    // A parent header that did not come from `parse` could give a header no reader accepts.
    VdiHeader::parse(&header.to_bytes())?;
    write_image(backend, &header)?;
    Ok(header)
}

/// Writes `header`, its block map (identity for a fixed image, all FREE otherwise) and sets the
/// length to [`VdiHeader::allocated_end`]. `backend` should be empty.
pub(crate) fn write_image<B: Backend + ?Sized>(backend: &B, header: &VdiHeader) -> Result<()> {
    backend
        .write_all_at(&header.to_bytes(), 0)
        .map_err(Error::writing("VDI header"))?;
    let fixed = header.image_type == ImageType::Fixed;
    let blocks = header.blocks_in_image;
    let mut chunk = Vec::with_capacity(4 * MAP_CHUNK_ENTRIES.min(blocks) as usize);
    let mut first = 0u32;
    while first < blocks {
        let count = MAP_CHUNK_ENTRIES.min(blocks - first);
        chunk.clear();
        for block in first..first + count {
            let raw = if fixed {
                BlockEntry::Allocated(block).encode()
            } else {
                BLOCK_FREE
            };
            chunk.extend_from_slice(&raw.to_le_bytes());
        }
        let at = u64::from(header.offset_blocks) + 4 * u64::from(first);
        backend
            .write_all_at(&chunk, at)
            .map_err(Error::writing("VDI block map"))?;
        first += count;
    }
    backend
        .set_len(header.allocated_end())
        .map_err(Error::writing("VDI file length"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::GuestRead;
    use crate::io::MemBackend;
    use crate::offsets::GuestOffset;

    #[test]
    fn dynamic_layout_matches_virtualbox() {
        let mem = MemBackend::default();
        let h = write_dynamic(&mem, (3 << 20) + 1000).unwrap();
        assert_eq!(h.disk_size, (3 << 20) + 1024);
        assert_eq!(h.blocks_in_image, 4);
        assert_eq!(h.image_type, ImageType::Normal);
        let bytes = mem.to_vec();
        assert_eq!(bytes.len(), 0x20_0000);
        assert_eq!(VdiHeader::parse(&bytes[..0x200]).unwrap(), h);
        assert!(bytes[0x10_0000..0x10_0010].iter().all(|&b| b == 0xFF));
        let image = VdiImage::open(&mem, h, None).unwrap();
        let mut buf = vec![1u8; 4096];
        image.read_at(&mut buf, GuestOffset(0)).unwrap();
        assert!(buf.iter().all(|&b| b == 0));
    }

    #[test]
    fn fixed_layout_is_identity_and_preallocated() {
        let mem = MemBackend::default();
        let h = write_fixed(&mem, 3 << 20).unwrap();
        assert_eq!(h.image_type, ImageType::Fixed);
        assert_eq!(h.blocks_allocated, 3);
        assert_eq!(mem.len().unwrap(), 0x20_0000 + (3 << 20));
        let image = VdiImage::open(&mem, h, None).unwrap();
        for b in 0..3 {
            assert_eq!(image.block_map().get(b), Some(BlockEntry::Allocated(b)));
        }
    }

    #[test]
    fn differencing_links_to_the_parent() {
        let parent = VdiHeader::new_dynamic(5 << 20).unwrap();
        let mem = MemBackend::default();
        let h = write_differencing(&mem, &parent).unwrap();
        assert_eq!(h.image_type, ImageType::Diff);
        assert_eq!(h.uuid_linkage, parent.uuid_create);
        assert_eq!(h.uuid_parent_modify, parent.uuid_modify);
        assert_eq!(h.disk_size, parent.disk_size);
        assert_eq!(VdiHeader::parse(&mem.to_vec()[..0x200]).unwrap(), h);
    }

    #[test]
    fn refuses_bad_sizes() {
        let mem = MemBackend::default();
        assert!(write_dynamic(&mem, 0).is_err());
        assert!(write_dynamic(&mem, u64::MAX).is_err());
        assert!(write_fixed(&mem, MAX_DISK_SIZE + 1).is_err());
        assert_eq!(mem.len().unwrap(), 0);
    }

    #[test]
    fn creates_files_atomically_and_refuses_non_vdi_parents() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.vdi");
        let h = create_dynamic(&base, 4 << 20, NewFileMode::default()).unwrap();
        assert!(matches!(
            create_dynamic(&base, 4 << 20, NewFileMode::default()),
            Err(Error::AlreadyExists { .. })
        ));
        let diff = dir.path().join("diff.vdi");
        let d = create_differencing(&base, &diff, NewFileMode::default()).unwrap();
        assert_eq!(d.uuid_linkage, h.uuid_create);
        let mode = NewFileMode {
            overwrite: true,
            durable: false,
        };
        assert!(matches!(
            create_differencing(&base, &base, mode),
            Err(Error::BackingIsTarget { .. })
        ));
        let raw = dir.path().join("disk.img");
        std::fs::write(&raw, vec![0u8; 4096]).unwrap();
        let e = create_differencing(&raw, &dir.path().join("x.vdi"), mode).unwrap_err();
        assert!(e.to_string().contains("disk.img"), "{e}");
        assert!(matches!(
            e,
            Error::Vdi(VdiError::ParentNotVdi { format: "raw", .. })
        ));
        assert!(!dir.path().join("x.vdi").exists());
    }
}
