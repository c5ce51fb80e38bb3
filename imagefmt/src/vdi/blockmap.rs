//! The VDI block map: one little-endian `u32` per virtual block, at `offset_blocks`.

use byteorder::{ByteOrder, LittleEndian};

use super::{VdiError, VdiHeader, BLOCK_FREE, BLOCK_ZERO};

/// What one block map entry says about a virtual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockEntry {
    /// Never written: reads come from the parent in a differencing image, zeros otherwise.
    Free,
    /// Explicitly zeroed: reads as zeros, also in a differencing image.
    Zero,
    /// Stored in the data area at this block index (`offset_data + index × 1 MiB`).
    Allocated(u32),
}

impl BlockEntry {
    /// Decodes an on-disk entry; every `u32` has a meaning.
    pub fn decode(raw: u32) -> BlockEntry {
        match raw {
            BLOCK_FREE => BlockEntry::Free,
            BLOCK_ZERO => BlockEntry::Zero,
            index => BlockEntry::Allocated(index),
        }
    }

    /// Encodes to the on-disk entry.
    ///
    /// An `Allocated` index must be below [`BLOCK_ZERO`] (always true for maps that came through
    /// [`BlockMap::parse`] or [`BlockMap::set`]); a larger one would read back as `Free`/`Zero`.
    pub fn encode(self) -> u32 {
        match self {
            BlockEntry::Free => BLOCK_FREE,
            BlockEntry::Zero => BLOCK_ZERO,
            BlockEntry::Allocated(index) => index,
        }
    }
}

/// A decoded, validated block map.
///
/// Every allocated entry points below `blocks_allocated` and no two entries share a data block,
/// so a reader can trust each index and a writer can append at `blocks_allocated`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    entries: Vec<u32>,
}

impl BlockMap {
    /// Decodes and validates the block map of the image described by `header`.
    ///
    /// `bytes` must be exactly [`VdiHeader::block_map_len_bytes`] long. `header` should come from
    /// [`VdiHeader::parse`], which bounds the block count (so the map is at most 2 GiB); callers
    /// must still check that `offset_blocks` + the map length fits in the file before reading.
    pub fn parse(bytes: &[u8], header: &VdiHeader) -> Result<BlockMap, VdiError> {
        let expected = header.block_map_len_bytes();
        if bytes.len() as u64 != expected {
            return Err(VdiError::BlockMapLengthMismatch {
                len: bytes.len(),
                expected,
            });
        }
        let allocated = header.blocks_allocated;
        // Re-checked here so the bitmap below stays no larger than the map itself.
        if allocated > header.blocks_in_image {
            return Err(VdiError::AllocatedExceedsBlocks {
                allocated,
                blocks: header.blocks_in_image,
            });
        }
        let entries: Vec<u32> = bytes.chunks_exact(4).map(LittleEndian::read_u32).collect();
        let mut seen = vec![0u64; (allocated as usize).div_ceil(64)];
        for (block, &raw) in (0u32..).zip(&entries) {
            let BlockEntry::Allocated(index) = BlockEntry::decode(raw) else {
                continue;
            };
            let word = seen
                .get_mut(index as usize / 64)
                .filter(|_| index < allocated);
            let Some(word) = word else {
                return Err(VdiError::BlockIndexOutOfRange {
                    block,
                    index,
                    allocated,
                });
            };
            let bit = 1u64 << (index % 64);
            if *word & bit != 0 {
                let first_block = (0u32..)
                    .zip(&entries)
                    .find(|&(_, &e)| e == raw)
                    .map_or(block, |(b, _)| b);
                return Err(VdiError::DuplicateBlockIndex {
                    index,
                    first_block,
                    second_block: block,
                });
            }
            *word |= bit;
        }
        Ok(BlockMap { entries })
    }

    /// A map of `blocks` entries, all [`BlockEntry::Free`] (a new dynamic or differencing image).
    ///
    /// Allocates 4 bytes per block; pass a count from a validated header.
    pub fn new_free(blocks: u32) -> BlockMap {
        BlockMap {
            entries: vec![BLOCK_FREE; blocks as usize],
        }
    }

    /// The entry of virtual block `block`, or `None` past the end of the map.
    pub fn get(&self, block: u32) -> Option<BlockEntry> {
        self.entries
            .get(block as usize)
            .map(|&raw| BlockEntry::decode(raw))
    }

    /// Sets the entry of virtual block `block` (for writers).
    ///
    /// Refuses a block past the end of the map and an index no image of this size can hold.
    /// Keeping indices unique and below `blocks_allocated` is the caller's job.
    pub fn set(&mut self, block: u32, entry: BlockEntry) -> Result<(), VdiError> {
        self.check_set(block, entry)?;
        let blocks = self.len();
        let slot = self
            .entries
            .get_mut(block as usize)
            .ok_or(VdiError::BlockOutOfRange { block, blocks })?;
        *slot = entry.encode();
        Ok(())
    }

    /// The checks of [`BlockMap::set`] without the update: a writer validates an entry before
    /// writing it to disk and records it after.
    pub fn check_set(&self, block: u32, entry: BlockEntry) -> Result<(), VdiError> {
        let blocks = self.len();
        if let BlockEntry::Allocated(index) = entry {
            if index >= blocks || index >= BLOCK_ZERO {
                return Err(VdiError::BlockIndexBeyondMap {
                    block,
                    index,
                    blocks,
                });
            }
        }
        if block >= blocks {
            return Err(VdiError::BlockOutOfRange { block, blocks });
        }
        Ok(())
    }

    /// Number of virtual blocks in the map.
    pub fn len(&self) -> u32 {
        u32::try_from(self.entries.len()).unwrap_or(u32::MAX)
    }

    /// True for a map of zero blocks (never the case for a valid image).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Encodes the map as it is stored on disk (4 × len bytes, little-endian).
    pub fn to_bytes(&self) -> Vec<u8> {
        self.entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::super::header::tests::qemu_1g_fixture;
    use super::*;
    use proptest::prelude::*;

    fn header(blocks: u32, allocated: u32) -> VdiHeader {
        let mut h = VdiHeader::parse(&qemu_1g_fixture()).unwrap();
        h.blocks_in_image = blocks;
        h.blocks_allocated = allocated;
        h.disk_size = u64::from(blocks) << 20;
        h
    }

    fn map_bytes(entries: &[u32]) -> Vec<u8> {
        entries.iter().flat_map(|e| e.to_le_bytes()).collect()
    }

    #[test]
    fn entries_decode_and_encode() {
        assert_eq!(BlockEntry::decode(0xFFFF_FFFF), BlockEntry::Free);
        assert_eq!(BlockEntry::decode(0xFFFF_FFFE), BlockEntry::Zero);
        assert_eq!(BlockEntry::decode(0), BlockEntry::Allocated(0));
        assert_eq!(
            BlockEntry::decode(0xFFFF_FFFD),
            BlockEntry::Allocated(0xFFFF_FFFD)
        );
        for raw in [0, 1, 7, 0xFFFF_FFFD, 0xFFFF_FFFE, 0xFFFF_FFFF] {
            assert_eq!(BlockEntry::decode(raw).encode(), raw);
        }
    }

    #[test]
    fn parses_the_fresh_qemu_map() {
        let h = VdiHeader::parse(&qemu_1g_fixture()).unwrap();
        let bytes = vec![0xFFu8; 4096];
        let map = BlockMap::parse(&bytes, &h).unwrap();
        assert_eq!(map.len(), 1024);
        assert!(!map.is_empty());
        assert!((0..1024).all(|b| map.get(b) == Some(BlockEntry::Free)));
        assert_eq!(map.get(1024), None);
        assert_eq!(map.to_bytes(), bytes);
        assert_eq!(map, BlockMap::new_free(1024));
    }

    #[test]
    fn parses_qemu_map_after_two_writes() {
        // FORMATS.md §2.6: write at guest 1 MiB then at 0 → map[1] = 0, map[0] = 1.
        let mut entries = vec![BLOCK_FREE; 1024];
        entries[0] = 1;
        entries[1] = 0;
        entries[2] = BLOCK_ZERO;
        let bytes = map_bytes(&entries);
        let map = BlockMap::parse(&bytes, &header(1024, 2)).unwrap();
        assert_eq!(map.get(0), Some(BlockEntry::Allocated(1)));
        assert_eq!(map.get(1), Some(BlockEntry::Allocated(0)));
        assert_eq!(map.get(2), Some(BlockEntry::Zero));
        assert_eq!(map.get(3), Some(BlockEntry::Free));
        assert_eq!(map.to_bytes(), bytes);
    }

    #[test]
    fn rejects_wrong_length() {
        let e = BlockMap::parse(&[0xFF; 4095], &header(1024, 0)).unwrap_err();
        assert_eq!(
            e,
            VdiError::BlockMapLengthMismatch {
                len: 4095,
                expected: 4096
            }
        );
    }

    #[test]
    fn rejects_index_at_or_past_allocated() {
        let bytes = map_bytes(&[BLOCK_FREE, 0, 2, BLOCK_FREE]);
        let e = BlockMap::parse(&bytes, &header(4, 2)).unwrap_err();
        assert_eq!(
            e,
            VdiError::BlockIndexOutOfRange {
                block: 2,
                index: 2,
                allocated: 2
            }
        );
        // With nothing allocated, any index is out of range.
        let e = BlockMap::parse(&map_bytes(&[0]), &header(1, 0)).unwrap_err();
        assert_eq!(
            e,
            VdiError::BlockIndexOutOfRange {
                block: 0,
                index: 0,
                allocated: 0
            }
        );
    }

    #[test]
    fn rejects_duplicate_index() {
        let bytes = map_bytes(&[BLOCK_FREE, 1, 0, BLOCK_ZERO, 1]);
        let e = BlockMap::parse(&bytes, &header(5, 2)).unwrap_err();
        assert_eq!(
            e,
            VdiError::DuplicateBlockIndex {
                index: 1,
                first_block: 1,
                second_block: 4
            }
        );
    }

    #[test]
    fn rejects_a_header_with_more_allocated_than_blocks() {
        let e = BlockMap::parse(&map_bytes(&[0]), &header(1, u32::MAX)).unwrap_err();
        assert_eq!(
            e,
            VdiError::AllocatedExceedsBlocks {
                allocated: u32::MAX,
                blocks: 1
            }
        );
    }

    #[test]
    fn set_updates_and_refuses_out_of_range() {
        let mut map = BlockMap::new_free(4);
        map.set(3, BlockEntry::Allocated(0)).unwrap();
        map.set(0, BlockEntry::Zero).unwrap();
        assert_eq!(map.get(3), Some(BlockEntry::Allocated(0)));
        assert_eq!(map.get(0), Some(BlockEntry::Zero));
        assert_eq!(
            map.set(4, BlockEntry::Free),
            Err(VdiError::BlockOutOfRange {
                block: 4,
                blocks: 4
            })
        );
        assert_eq!(
            map.set(1, BlockEntry::Allocated(4)),
            Err(VdiError::BlockIndexBeyondMap {
                block: 1,
                index: 4,
                blocks: 4
            })
        );
        let parsed = BlockMap::parse(&map.to_bytes(), &header(4, 1)).unwrap();
        assert_eq!(parsed, map);
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_round_trips(
            entries in proptest::collection::vec(
                prop_oneof![Just(BLOCK_FREE), Just(BLOCK_ZERO), 0u32..16, any::<u32>()],
                0..64,
            ),
            blocks in 0u32..80,
            allocated in prop_oneof![0u32..20, any::<u32>()],
            trim in 0usize..4,
        ) {
            let mut bytes = map_bytes(&entries);
            bytes.truncate(bytes.len().saturating_sub(trim));
            let mut h = VdiHeader::parse(&qemu_1g_fixture()).unwrap();
            h.blocks_in_image = blocks;
            h.blocks_allocated = allocated;
            if let Ok(map) = BlockMap::parse(&bytes, &h) {
                prop_assert_eq!(map.to_bytes(), bytes);
                prop_assert_eq!(map.len(), blocks);
            }
        }
    }
}
