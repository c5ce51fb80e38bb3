//! Refcount entries: one `refcount_bits`-wide counter per host cluster, packed in refcount blocks.
//!
//! Spec: "Host cluster management"; FORMATS.md §1.6. Widths of 8 bits and more are big-endian
//! integers; 1, 2 and 4-bit entries are packed starting from the least significant bit of each
//! byte.

/// Refcount-table entry bits 9-63: offset of the refcount block (0: not allocated).
pub const REFTABLE_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Refcount-table entry bits 0-8: reserved (check reports them).
pub const REFTABLE_RESERVED_MASK: u64 = 0x1ff;

/// Refcount entries in one refcount block.
pub fn entries_per_block(cluster_bits: u32, refcount_order: u32) -> u64 {
    ((1u64 << cluster_bits) * 8) >> refcount_order
}

/// Largest refcount a `refcount_order` entry can hold.
pub fn max_refcount(refcount_order: u32) -> u64 {
    let bits = 1u32 << refcount_order;
    if bits == 64 {
        u64::MAX
    } else {
        (1u64 << bits) - 1
    }
}

/// Reads entry `index` of a refcount block.
///
/// # Panics
/// If `index` is outside `block` (a caller bug: indices come from [`entries_per_block`]).
pub fn get(block: &[u8], index: u64, refcount_order: u32) -> u64 {
    let bits = 1u64 << refcount_order;
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let start = index as usize * width;
        block[start..start + width]
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    } else {
        let bit = index * bits;
        let byte = block[(bit / 8) as usize];
        (u64::from(byte) >> (bit % 8)) & ((1 << bits) - 1)
    }
}

/// Writes entry `index` of a refcount block. `value` must fit the width.
///
/// # Panics
/// If `index` is outside `block` or `value` exceeds [`max_refcount`] (caller bugs).
pub fn set(block: &mut [u8], index: u64, refcount_order: u32, value: u64) {
    assert!(
        value <= max_refcount(refcount_order),
        "refcount {value} too wide"
    );
    let bits = 1u64 << refcount_order;
    if bits >= 8 {
        let width = (bits / 8) as usize;
        let start = index as usize * width;
        let be = value.to_be_bytes();
        block[start..start + width].copy_from_slice(&be[8 - width..]);
    } else {
        let bit = index * bits;
        let byte = &mut block[(bit / 8) as usize];
        let mask = (((1u16 << bits) - 1) << (bit % 8)) as u8;
        *byte = (*byte & !mask) | (((value as u8) << (bit % 8)) & mask);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_width_round_trips_and_leaves_neighbours_alone() {
        for order in 0..=6 {
            let mut block = vec![0u8; 64];
            let n = entries_per_block(9, order).min((64 * 8) >> order);
            let max = max_refcount(order);
            for i in (0..n).step_by(3) {
                set(&mut block, i, order, max - (i % 2).min(max));
            }
            for i in 0..n {
                let expected = if i % 3 == 0 {
                    max - (i % 2).min(max)
                } else {
                    0
                };
                assert_eq!(get(&block, i, order), expected, "order {order} index {i}");
            }
        }
    }

    #[test]
    fn sixteen_bit_entries_are_big_endian_and_one_bit_entries_start_at_the_lsb() {
        let mut block = vec![0u8; 8];
        set(&mut block, 1, 4, 0x0102);
        assert_eq!(block[..4], [0, 0, 0x01, 0x02]);
        let mut block = vec![0u8; 2];
        set(&mut block, 0, 0, 1);
        set(&mut block, 9, 0, 1);
        assert_eq!(block, [0b0000_0001, 0b0000_0010]);
        assert_eq!(entries_per_block(16, 4), 32768);
        assert_eq!(entries_per_block(16, 0), 524288);
    }
}
