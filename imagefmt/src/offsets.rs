//! Typed offsets: where guest and host offsets meet, they cannot be swapped.
//!
//! A [`GuestOffset`] is a byte offset in the virtual disk, a [`HostOffset`] a byte offset in a
//! file (the image file or its external data file), and a [`ClusterIndex`] the number of a guest
//! cluster. The qcow2 lookup goes `GuestOffset → ClusterIndex → (L1 index, L2 index)` and answers
//! with a `HostOffset`; nothing converts one into another implicitly.

use std::fmt;

/// A byte offset in the guest-visible disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct GuestOffset(pub u64);

/// A byte offset in a host file (an image file or an external data file).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct HostOffset(pub u64);

/// The number of a guest cluster (guest offset divided by the cluster size).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ClusterIndex(pub u64);

impl GuestOffset {
    /// The guest cluster holding this offset.
    pub fn cluster(self, cluster_bits: u32) -> ClusterIndex {
        ClusterIndex(self.0 >> cluster_bits)
    }

    /// The offset inside its cluster.
    pub fn in_cluster_offset(self, cluster_bits: u32) -> u64 {
        self.0 & ((1u64 << cluster_bits) - 1)
    }

    /// `self + len`, or `None` on overflow.
    pub fn checked_add(self, len: u64) -> Option<Self> {
        self.0.checked_add(len).map(Self)
    }

    /// Bytes from this offset up to `end` (0 if `end` is not after it).
    pub fn distance_to(self, end: GuestOffset) -> u64 {
        end.0.saturating_sub(self.0)
    }
}

impl HostOffset {
    /// `self + len`, or `None` on overflow.
    pub fn checked_add(self, len: u64) -> Option<Self> {
        self.0.checked_add(len).map(Self)
    }

    /// True if the offset is a multiple of `align` (a power of two).
    pub fn is_aligned(self, align: u64) -> bool {
        self.0 & (align - 1) == 0
    }
}

impl ClusterIndex {
    /// Index of the L1 entry covering this cluster, with `l2_entries` entries per L2 table.
    pub fn l1_index(self, l2_entries: u64) -> u64 {
        self.0 / l2_entries
    }

    /// Index of this cluster's entry inside its L2 table.
    pub fn l2_index(self, l2_entries: u64) -> usize {
        (self.0 % l2_entries) as usize
    }

    /// The guest offset where this cluster starts, or `None` on overflow.
    pub fn guest_offset(self, cluster_bits: u32) -> Option<GuestOffset> {
        self.0
            .checked_shl(cluster_bits)
            .filter(|o| o >> cluster_bits == self.0)
            .map(GuestOffset)
    }
}

impl fmt::Display for GuestOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "guest offset {:#x}", self.0)
    }
}

impl fmt::Display for HostOffset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host offset {:#x}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_offsets_split_into_table_indices() {
        // 64 KiB clusters, 8192 entries per L2 table: one table spans 512 MiB.
        let at = GuestOffset((512 << 20) * 3 + 5 * 65536 + 17);
        let cluster = at.cluster(16);
        assert_eq!(cluster.l1_index(8192), 3);
        assert_eq!(cluster.l2_index(8192), 5);
        assert_eq!(at.in_cluster_offset(16), 17);
        assert_eq!(cluster.guest_offset(16), Some(GuestOffset(at.0 - 17)));
        assert_eq!(ClusterIndex(u64::MAX).guest_offset(16), None);
        assert_eq!(GuestOffset(u64::MAX).checked_add(1), None);
        assert!(HostOffset(0x50000).is_aligned(0x10000));
        assert!(!HostOffset(0x50200).is_aligned(0x10000));
    }
}
