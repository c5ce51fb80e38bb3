//! VDI header and block map from arbitrary bytes: `VdiHeader::parse`, then `BlockMap::parse`
//! on the bytes after the header region.
//!
//! Properties checked (beyond "never panics, never allocates without bound"):
//! 1. `VdiHeader::parse` accepts ⇒ `parse(to_bytes(h)) == h`, and `to_bytes` reproduces the
//!    input byte for byte up to the end of the header (0x1C8, or 0x1D8 with LCHS geometry).
//! 2. An accepted header's invariants hold: block map no larger than qemu's limit, data area
//!    after the block map, allocated ≤ blocks.
//! 3. `BlockMap::parse` accepts exactly when an independent reference check does (length is
//!    4 × blocks, every allocated index below `blocks_allocated`, no index used twice), and an
//!    accepted map re-encodes to its input. Checked twice: with the header as parsed (on the map
//!    at `offset_blocks` if the input holds it, else on the bytes after the header region) and
//!    with the header's block counts fitted to the bytes after the header region, so the entry
//!    checks see fuzzed maps.
#![no_main]

use std::collections::HashSet;

use imagefmt::vdi::{
    BlockEntry, BlockMap, VdiHeader, BLOCK_FREE, BLOCK_ZERO, HEADER_REGION_LEN, MAX_BLOCKS_IN_IMAGE,
};
use libfuzzer_sys::{fuzz_target, Corpus};

/// Pre-header length: anything shorter cannot carry the signature.
const PRE_HEADER_LEN: usize = 0x48;
/// Inputs above this are refused: the block map part only needs a few thousand entries.
const MAX_INPUT: usize = 64 << 10;

/// What `BlockMap::parse` should decide, computed independently.
fn reference_accepts(bytes: &[u8], header: &VdiHeader) -> bool {
    if bytes.len() as u64 != 4 * u64::from(header.blocks_in_image) {
        return false;
    }
    if header.blocks_allocated > header.blocks_in_image {
        return false;
    }
    let mut seen = HashSet::new();
    bytes.chunks_exact(4).all(|c| {
        let raw = u32::from_le_bytes(c.try_into().unwrap());
        raw == BLOCK_FREE
            || raw == BLOCK_ZERO
            || (raw < header.blocks_allocated && seen.insert(raw))
    })
}

fn check_map(bytes: &[u8], header: &VdiHeader) {
    let parsed = BlockMap::parse(bytes, header);
    assert_eq!(
        parsed.is_ok(),
        reference_accepts(bytes, header),
        "BlockMap::parse disagrees with the reference: {parsed:?}"
    );
    let Ok(map) = parsed else { return };
    assert_eq!(map.to_bytes(), bytes, "block map re-encode");
    assert_eq!(map.len(), header.blocks_in_image);
    assert_eq!(map.get(map.len()), None);
    for block in 0..map.len() {
        if let Some(BlockEntry::Allocated(index)) = map.get(block) {
            assert!(index < header.blocks_allocated);
        }
    }
}

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() < PRE_HEADER_LEN || data.len() > MAX_INPUT {
        return Corpus::Reject;
    }
    let Ok(header) = VdiHeader::parse(data) else {
        return Corpus::Keep;
    };

    // 1. Round trip and byte-exact re-encoding of the header.
    let bytes = header.to_bytes();
    assert_eq!(
        VdiHeader::parse(&bytes).as_ref(),
        Ok(&header),
        "VDI header round trip"
    );
    let end = if header.lchs_geometry.is_some() {
        0x1D8
    } else {
        0x1C8
    };
    assert_eq!(
        &bytes[..end],
        &data[..end],
        "to_bytes does not reproduce the header bytes"
    );

    // 2. Invariants of an accepted header.
    assert!(header.blocks_in_image > 0 && header.blocks_in_image <= MAX_BLOCKS_IN_IMAGE);
    assert!(header.blocks_allocated <= header.blocks_in_image);
    assert!(
        u64::from(header.offset_data)
            >= u64::from(header.offset_blocks) + header.block_map_len_bytes()
    );
    let _ = (header.virtual_size(), header.is_differencing());

    // 3. The block map: where the header puts it if the input reaches that far (else the bytes
    //    after the header region, usually a length mismatch), then fitted to the bytes at hand.
    let rest = &data[data.len().min(HEADER_REGION_LEN)..];
    let map_start = header.offset_blocks as usize;
    let map_end = map_start as u64 + header.block_map_len_bytes();
    if map_end <= data.len() as u64 {
        check_map(&data[map_start..map_end as usize], &header);
    } else {
        check_map(rest, &header);
    }
    let blocks = (rest.len() / 4) as u32;
    if blocks > 0 {
        let mut fitted = header.clone();
        fitted.blocks_in_image = blocks;
        fitted.blocks_allocated = header.blocks_allocated.min(blocks);
        check_map(&rest[..blocks as usize * 4], &fitted);
    }
    Corpus::Keep
});
