//! L1 and L2 table entries: how a guest cluster maps to host storage.
//!
//! Spec: "Cluster mapping", "Extended L2 Entries", "Compressed Clusters Descriptor";
//! FORMATS.md §1.5, §1.7, §1.8. An L1 entry points at an L2 table; an L2 entry says whether a
//! guest cluster is unallocated (read the backing file), zero, stored normally or compressed.

/// L1 entry bits 9-55: offset of the L2 table.
pub const L1_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L1 entry reserved bits (0-8, 56-62).
pub const L1_RESERVED_MASK: u64 = 0x7f00_0000_0000_01ff;
/// L2 standard entry bits 9-55: host cluster offset.
pub const L2_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// L2 standard entry reserved bits (1-8, 56-61).
pub const L2_RESERVED_MASK: u64 = 0x3f00_0000_0000_01fe;
/// Bit 63 of L1 and L2 entries: the cluster's refcount is exactly 1.
pub const COPIED: u64 = 1 << 63;
/// Bit 62 of an L2 entry: the cluster is compressed.
pub const COMPRESSED: u64 = 1 << 62;
/// Bit 0 of a standard L2 entry: the cluster reads as zeros (v3).
pub const ZERO: u64 = 1;
/// Subclusters per cluster with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// A decoded L1 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L1Entry(pub u64);

impl L1Entry {
    /// Offset of the L2 table, or `None` if this range is unallocated.
    pub fn l2_offset(self) -> Option<u64> {
        Some(self.0 & L1_OFFSET_MASK).filter(|&o| o != 0)
    }

    /// True if the COPIED flag is set.
    pub fn copied(self) -> bool {
        self.0 & COPIED != 0
    }

    /// Reserved bits that are set (corruption, reported by check).
    pub fn reserved_bits(self) -> u64 {
        self.0 & L1_RESERVED_MASK
    }
}

/// What a guest cluster (or subcluster) is, from its L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterKind {
    /// Not allocated here: read from the backing file (zeros without one).
    Unallocated,
    /// Reads as zeros and has no host cluster.
    ZeroPlain,
    /// Reads as zeros; a host cluster is still reserved (and refcounted) at this offset.
    ZeroAllocated {
        /// Host offset of the reserved cluster.
        host: u64,
    },
    /// Stored at this host offset.
    Normal {
        /// Host offset of the data cluster.
        host: u64,
    },
    /// Compressed: `len` bytes starting at host byte offset `host` decode to one cluster.
    Compressed {
        /// Host byte offset of the compressed data (not aligned).
        host: u64,
        /// Bytes to read.
        len: u64,
    },
}

/// A decoded L2 entry: the 64-bit entry plus, with extended L2, the subcluster bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct L2Entry {
    /// The first 64 bits.
    pub entry: u64,
    /// The extended-L2 bitmap (bits 0-31 allocated, 32-63 zero); 0 for standard entries.
    pub bitmap: u64,
}

impl L2Entry {
    /// True if the COPIED flag is set.
    pub fn copied(self) -> bool {
        self.entry & COPIED != 0
    }

    /// True if the entry describes a compressed cluster.
    pub fn is_compressed(self) -> bool {
        self.entry & COMPRESSED != 0
    }

    /// The kind of the whole cluster for a standard (non-extended) entry.
    pub fn kind(self, cluster_bits: u32) -> ClusterKind {
        if self.is_compressed() {
            let (host, len) = compressed_descriptor(self.entry, cluster_bits);
            return ClusterKind::Compressed { host, len };
        }
        let host = self.entry & L2_OFFSET_MASK;
        match (self.entry & ZERO != 0, host) {
            (true, 0) => ClusterKind::ZeroPlain,
            (true, host) => ClusterKind::ZeroAllocated { host },
            (false, 0) => ClusterKind::Unallocated,
            (false, host) => ClusterKind::Normal { host },
        }
    }

    /// Entry `index` of an L2 table's bytes: 8 bytes per entry, or 16 with extended L2.
    ///
    /// # Panics
    /// If `index` is outside `table` (a caller bug: indices come from the table's size).
    pub fn read(table: &[u8], index: usize, extended_l2: bool) -> L2Entry {
        let at = index * if extended_l2 { 16 } else { 8 };
        let word = |at: usize| u64::from_be_bytes(table[at..at + 8].try_into().expect("8 bytes"));
        L2Entry {
            entry: word(at),
            bitmap: if extended_l2 { word(at + 8) } else { 0 },
        }
    }

    /// The kind of the whole cluster as qemu's `qcow2_get_cluster_type` sees it: with extended
    /// L2 entries bit 0 is not a zero flag, and with an external data file an entry with offset
    /// 0 and COPIED set is a normal cluster at host offset 0 of the data file.
    pub fn cluster_kind(
        self,
        cluster_bits: u32,
        extended_l2: bool,
        data_file: bool,
    ) -> ClusterKind {
        let host = self.entry & L2_OFFSET_MASK;
        if self.is_compressed() || (self.entry & ZERO != 0 && !extended_l2) {
            return self.kind(cluster_bits);
        }
        if host != 0 || (data_file && self.copied()) {
            ClusterKind::Normal { host }
        } else {
            ClusterKind::Unallocated
        }
    }

    /// The kind of subcluster `index` (0..32) for an extended entry. An invalid bitmap (a
    /// subcluster both allocated and zero, or allocated without a host cluster) is `Err`.
    pub fn subcluster_kind(
        self,
        index: u32,
        cluster_bits: u32,
    ) -> Result<ClusterKind, InvalidSubcluster> {
        if self.is_compressed() {
            return Ok(self.kind(cluster_bits));
        }
        let allocated = self.bitmap & (1 << index) != 0;
        let zero = self.bitmap & (1 << (index + SUBCLUSTERS)) != 0;
        let host = self.entry & L2_OFFSET_MASK;
        match (allocated, zero, host) {
            (true, true, _) | (true, false, 0) => Err(InvalidSubcluster { index }),
            (true, false, host) => Ok(ClusterKind::Normal { host }),
            (false, true, _) => Ok(ClusterKind::ZeroPlain),
            (false, false, _) => Ok(ClusterKind::Unallocated),
        }
    }
}

/// An extended-L2 bitmap that describes an impossible subcluster state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvalidSubcluster {
    /// The subcluster.
    pub index: u32,
}

/// Decodes a compressed cluster descriptor into (host byte offset, bytes to read).
///
/// With `x = 62 - (cluster_bits - 8)`, bits `0..x` are the host offset and bits `x..62` the
/// number of additional 512-byte sectors after the one holding the offset.
pub fn compressed_descriptor(entry: u64, cluster_bits: u32) -> (u64, u64) {
    let offset_bits = 62 - (cluster_bits - 8);
    let host = entry & ((1u64 << offset_bits) - 1);
    let extra_sectors = (entry & !COPIED & !COMPRESSED) >> offset_bits;
    let len = (extra_sectors + 1) * 512 - (host % 512);
    (host, len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_entries_decode_to_every_kind() {
        let kind = |entry| L2Entry { entry, bitmap: 0 }.kind(16);
        assert_eq!(kind(0), ClusterKind::Unallocated);
        assert_eq!(kind(1), ClusterKind::ZeroPlain);
        assert_eq!(
            kind(0x8000_0000_0005_0001),
            ClusterKind::ZeroAllocated { host: 0x50000 }
        );
        assert_eq!(
            kind(0x8000_0000_0005_0000),
            ClusterKind::Normal { host: 0x50000 }
        );
    }

    #[test]
    fn the_compressed_descriptor_from_the_spec_sheet_decodes() {
        // FORMATS.md §1.7: 0x4BC0000000050000 → offset 0x50000, 47 extra sectors.
        let entry = L2Entry {
            entry: 0x4BC0_0000_0005_0000,
            bitmap: 0,
        };
        assert_eq!(
            entry.kind(16),
            ClusterKind::Compressed {
                host: 0x50000,
                len: 48 * 512
            }
        );
        let (host, len) = compressed_descriptor(COMPRESSED | (0x50100), 16);
        assert_eq!((host, len), (0x50100, 256));
    }

    #[test]
    fn extended_bitmaps_decode_and_contradictions_are_errors() {
        // FORMATS.md §1.8: a 4 KiB write at guest 4 KiB with 64 KiB clusters (2 KiB subclusters).
        let entry = L2Entry {
            entry: 0x8000_0000_0005_0000,
            bitmap: 0xC,
        };
        assert_eq!(entry.subcluster_kind(1, 16), Ok(ClusterKind::Unallocated));
        assert_eq!(
            entry.subcluster_kind(2, 16),
            Ok(ClusterKind::Normal { host: 0x50000 })
        );
        let zero = L2Entry {
            entry: 0,
            bitmap: 1 << 32,
        };
        assert_eq!(zero.subcluster_kind(0, 16), Ok(ClusterKind::ZeroPlain));
        let both = L2Entry {
            entry: 0x50000,
            bitmap: (1 << 32) | 1,
        };
        assert_eq!(
            both.subcluster_kind(0, 16),
            Err(InvalidSubcluster { index: 0 })
        );
        let no_host = L2Entry {
            entry: 0,
            bitmap: 1,
        };
        assert!(no_host.subcluster_kind(0, 16).is_err());
    }

    #[test]
    fn cluster_kind_follows_qemu_for_extended_entries_and_data_files() {
        let entry = |entry| L2Entry { entry, bitmap: 0 };
        // Extended L2: bit 0 is no zero flag.
        assert_eq!(
            entry(1).cluster_kind(16, true, false),
            ClusterKind::Unallocated
        );
        assert_eq!(
            entry(0x50001).cluster_kind(16, true, false),
            ClusterKind::Normal { host: 0x50000 }
        );
        assert_eq!(
            entry(1).cluster_kind(16, false, false),
            ClusterKind::ZeroPlain
        );
        // Data file: offset 0 with COPIED is host offset 0.
        assert_eq!(
            entry(COPIED).cluster_kind(16, false, true),
            ClusterKind::Normal { host: 0 }
        );
        assert_eq!(
            entry(COPIED).cluster_kind(16, false, false),
            ClusterKind::Unallocated
        );
        let table = [0x80, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xC];
        assert_eq!(
            L2Entry::read(&table, 0, true),
            L2Entry {
                entry: 0x8000_0000_0005_0000,
                bitmap: 0xC
            }
        );
        assert_eq!(L2Entry::read(&table, 1, false).entry, 0xC);
    }

    #[test]
    fn l1_entries_expose_offset_copied_and_reserved_bits() {
        let e = L1Entry(0x8000_0000_0004_0000);
        assert_eq!(e.l2_offset(), Some(0x40000));
        assert!(e.copied());
        assert_eq!(L1Entry(0).l2_offset(), None);
        assert_eq!(L1Entry(0x40001).reserved_bits(), 1);
    }
}
