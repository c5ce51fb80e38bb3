//! `qemu-img check` for VDI images: the block map's consistency, counted as qemu counts it, plus
//! the checks a reader needs that qemu leaves out.
//!
//! qemu (`block/vdi.c` `vdi_co_check`, FORMATS.md §2.5) reports as corruptions: a map entry
//! pointing at or past `blocks_in_image`, two entries pointing at the same data block, and a
//! header `blocks_allocated` that differs from the number of valid entries. It never repairs.
//!
//! cowclone adds two corruptions qemu does not look for, both of which make the image unreadable
//! or unsafe to extend (VirtualBox refuses the first on read and assumes the second when it
//! appends): an allocated data block that is not wholly inside the file, and an entry pointing
//! at or past `blocks_allocated` (the next append would hand that data block out twice). On
//! images qemu can open, clean images and qemu's own findings therefore give the same counts.
//!
//! The linkage of a differencing image (its parent found and matching by UUID) is checked by
//! whoever resolves parents ([`crate::chain::open_vdi`]); this module looks at one file.

use byteorder::{ByteOrder, LittleEndian};

use super::{BlockEntry, VdiHeader, HEADER_REGION_LEN};
use crate::io::Backend;
use crate::qcow2::check::CheckReport;
use crate::{Error, Result};

/// Marks a data block no map entry has claimed yet.
const UNCLAIMED: u32 = u32::MAX;

/// Checks the VDI image in `backend` as `qemu-img check` does (never repairing).
///
/// A header that does not parse, or a block map that does not lie inside the file, is an error
/// (the image cannot be opened, qemu-img's exit 1); findings in the map are counted in
/// [`CheckReport::corruptions`], each with a message in [`CheckReport::messages`].
pub fn check<B: Backend + ?Sized>(backend: &B) -> Result<CheckReport> {
    let mut head = [0u8; HEADER_REGION_LEN];
    let got = backend
        .read_prefix_at(&mut head, 0)
        .map_err(Error::reading("VDI header"))?;
    let header = VdiHeader::parse(&head[..got])?;
    let (raw, file_len) = super::image::read_raw_block_map(backend, &header)?;
    Ok(check_map(&header, &raw, file_len))
}

/// Counts the findings in block map bytes `raw` of an image described by `header` whose file is
/// `file_len` bytes long.
fn check_map(header: &VdiHeader, raw: &[u8], file_len: u64) -> CheckReport {
    let blocks = header.blocks_in_image;
    let mut report = CheckReport {
        format: "vdi".into(),
        ..CheckReport::default()
    };
    // Which virtual block first claimed each data block; as long as the map itself.
    let mut claimed = vec![UNCLAIMED; blocks as usize];
    let mut counted: u32 = 0;
    for (block, entry) in (0u32..).zip(raw.chunks_exact(4)) {
        let BlockEntry::Allocated(index) = BlockEntry::decode(LittleEndian::read_u32(entry)) else {
            continue;
        };
        let Some(owner) = claimed.get_mut(index as usize) else {
            report.corrupt(format!("ERROR: block index {block} too large, is {index}"));
            continue;
        };
        counted += 1;
        if *owner != UNCLAIMED {
            report.corrupt(format!(
                "ERROR: block index {index} also used by blocks {} and {block}",
                *owner
            ));
            continue;
        }
        *owner = block;
        if index >= header.blocks_allocated {
            report.corrupt(format!(
                "ERROR: block {block} points at data block {index}, past the {} allocated \
                 blocks (the next new block would be given out twice)",
                header.blocks_allocated
            ));
        } else if header.data_block_offset(index + 1) > file_len {
            report.corrupt(format!(
                "ERROR: data block {index} of block {block} ends at {}, past the end of the \
                 file ({file_len} bytes)",
                header.data_block_offset(index + 1)
            ));
        }
    }
    if counted != header.blocks_allocated {
        report.corrupt(format!(
            "ERROR: allocated blocks mismatch, is {counted}, should be {}",
            header.blocks_allocated
        ));
    }
    report
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemBackend;
    use crate::vdi::create::{write_differencing, write_dynamic};
    use crate::vdi::VdiImage;

    /// A 4 MiB dynamic image with blocks 0 and 2 written (data blocks 0 and 1).
    fn two_blocks() -> MemBackend {
        let mem = MemBackend::default();
        let header = write_dynamic(&mem, 4 << 20).unwrap();
        let mut image = VdiImage::open_rw(&mem, header, None, false).unwrap();
        image.write_at(&[1; 512], 0).unwrap();
        image.write_at(&[2; 512], 2 << 20).unwrap();
        mem
    }

    fn header_of(mem: &MemBackend) -> VdiHeader {
        let mut head = [0u8; HEADER_REGION_LEN];
        mem.read_exact_at(&mut head, 0).unwrap();
        VdiHeader::parse(&head).unwrap()
    }

    fn set_entry(mem: &MemBackend, block: u64, value: u32) {
        let at = u64::from(header_of(mem).offset_blocks) + 4 * block;
        mem.write_all_at(&value.to_le_bytes(), at).unwrap();
    }

    #[test]
    fn clean_images_have_no_findings() {
        let mem = two_blocks();
        let report = check(&mem).unwrap();
        assert_eq!(report.corruptions, 0, "{:?}", report.messages);
        assert_eq!(report.format, "vdi");
        let diff = MemBackend::default();
        write_differencing(&diff, &header_of(&mem)).unwrap();
        assert_eq!(check(&diff).unwrap().corruptions, 0);
    }

    #[test]
    fn counts_what_qemu_counts() {
        // Entry past blocks_in_image; the count then mismatches too.
        let mem = two_blocks();
        set_entry(&mem, 2, 9);
        let report = check(&mem).unwrap();
        assert_eq!(report.corruptions, 2, "{:?}", report.messages);
        assert!(report.messages[0].contains("too large, is 9"));

        // Two entries sharing data block 0: one duplicate, and three entries counted for two.
        let mem = two_blocks();
        set_entry(&mem, 3, 0);
        let report = check(&mem).unwrap();
        assert_eq!(report.corruptions, 2, "{:?}", report.messages);
        assert!(report.messages[0].contains("also used by blocks 0 and 3"));
    }

    #[test]
    fn finds_what_a_reader_would_trip_on() {
        // Entry beyond blocks_allocated but inside the image.
        let mem = two_blocks();
        set_entry(&mem, 1, 3);
        let report = check(&mem).unwrap();
        assert!(report
            .messages
            .iter()
            .any(|m| m.contains("past the 2 allocated")));
        // A data block cut off by truncation.
        let mem = two_blocks();
        let end = mem.len().unwrap();
        mem.set_len(end - 4096).unwrap();
        let report = check(&mem).unwrap();
        assert_eq!(report.corruptions, 1, "{:?}", report.messages);
        assert!(report.messages[0].contains("past the end of the file"));
    }

    #[test]
    fn unreadable_headers_and_maps_are_errors() {
        assert!(check(&MemBackend::default()).is_err());
        let mem = two_blocks();
        let offset = header_of(&mem).offset_blocks;
        mem.set_len(u64::from(offset) + 8).unwrap();
        assert!(check(&mem).is_err());
    }
}
