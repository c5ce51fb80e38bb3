//! L1 and L2 table entries: how a guest cluster maps to host storage.
//!
//! Spec: "Cluster mapping", "Extended L2 Entries", "Compressed Clusters Descriptor";
//! FORMATS.md §1.5, §1.7, §1.8. An L1 entry points at an L2 table; an L2 entry says whether a
//! guest cluster is unallocated (read the backing file), zero, stored normally or compressed.

use byteorder::{BigEndian, ByteOrder};

use crate::offsets::HostOffset;

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

/// What a guest cluster (or subcluster) is, from its L2 entry: the summary writes work with.
/// [`Subcluster`] is the full decoding that reads, block status and map use.
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

/// qemu's `QCow2SubclusterType` with its host offsets: what one (sub)cluster is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subcluster {
    /// Data at `host` (the start of the host cluster) in the image file or its data file.
    Normal {
        /// Host offset of the cluster.
        host: HostOffset,
    },
    /// Compressed: `len` bytes at host byte offset `host` decode to the whole cluster.
    Compressed {
        /// Host byte offset of the compressed data (not aligned).
        host: HostOffset,
        /// Bytes to read.
        len: u64,
    },
    /// Reads as zeros; no host cluster.
    ZeroPlain,
    /// Reads as zeros; the host cluster at `host` stays reserved.
    ZeroAlloc {
        /// Host offset of the cluster.
        host: HostOffset,
    },
    /// Not allocated: the layer below answers; no host cluster.
    UnallocatedPlain,
    /// Not allocated (an extended-L2 subcluster of an allocated cluster): the layer below
    /// answers, though the host cluster at `host` exists.
    UnallocatedAlloc {
        /// Host offset of the cluster.
        host: HostOffset,
    },
}

/// What the entry decoder needs to know about the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryFormat {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// 128-bit extended L2 entries with 32 subclusters.
    pub extended: bool,
    /// The image keeps its data in an external data file: host offset 0 with COPIED is a
    /// real cluster there (all its clusters have refcount 1), not "unallocated".
    pub data_file: bool,
}

impl EntryFormat {
    /// Bytes per L2 entry: 8, or 16 with extended entries.
    pub fn entry_bytes(self) -> usize {
        if self.extended {
            16
        } else {
            8
        }
    }

    /// Entries per L2 table.
    pub fn l2_entries(self) -> u64 {
        (1u64 << self.cluster_bits) / self.entry_bytes() as u64
    }

    /// log2 of the unit an entry describes separately: the subcluster or the cluster.
    pub fn unit_bits(self) -> u32 {
        if self.extended {
            self.cluster_bits - SUBCLUSTERS.trailing_zeros()
        } else {
            self.cluster_bits
        }
    }
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
    /// Entry `index` of the L2 table `table` (an entry past the end of a short table is 0).
    pub fn from_table(table: &[u8], index: usize, format: EntryFormat) -> Self {
        let at = index * format.entry_bytes();
        let word = |at: usize| table.get(at..at + 8).map_or(0, BigEndian::read_u64);
        Self {
            entry: word(at),
            bitmap: if format.extended { word(at + 8) } else { 0 },
        }
    }

    /// True if the COPIED flag is set.
    pub fn copied(self) -> bool {
        self.entry & COPIED != 0
    }

    /// True if the entry describes a compressed cluster.
    pub fn is_compressed(self) -> bool {
        self.entry & COMPRESSED != 0
    }

    /// qemu's `qcow2_get_subcluster_type`: what subcluster `index` (0 for standard entries)
    /// is. An impossible bitmap (a subcluster both allocated and zero, or allocated subclusters
    /// without a host cluster) is `Err`, as qemu reports it.
    pub fn subcluster(
        self,
        index: u32,
        format: EntryFormat,
    ) -> Result<Subcluster, InvalidSubcluster> {
        if self.is_compressed() {
            let (host, len) = compressed_descriptor(self.entry, format.cluster_bits);
            return Ok(Subcluster::Compressed {
                host: HostOffset(host),
                len,
            });
        }
        let host = self.entry & L2_OFFSET_MASK;
        // Offset 0 means unallocated, except in an external data file, where 0 is a real
        // offset and COPIED (refcount 1, always true there) tells them apart.
        let allocated = host != 0 || (format.data_file && self.copied());
        let host = HostOffset(host);
        if !format.extended {
            return Ok(match (self.entry & ZERO != 0, host.0 != 0, allocated) {
                (true, false, _) => Subcluster::ZeroPlain,
                (true, true, _) => Subcluster::ZeroAlloc { host },
                (false, _, true) => Subcluster::Normal { host },
                (false, _, false) => Subcluster::UnallocatedPlain,
            });
        }
        let alloc = self.bitmap & (1 << index) != 0;
        let zero = self.bitmap & (1 << (index + SUBCLUSTERS)) != 0;
        if allocated {
            if (self.bitmap >> SUBCLUSTERS) & self.bitmap != 0 {
                Err(InvalidSubcluster { index })
            } else if zero {
                Ok(Subcluster::ZeroAlloc { host })
            } else if alloc {
                Ok(Subcluster::Normal { host })
            } else {
                Ok(Subcluster::UnallocatedAlloc { host })
            }
        } else if self.bitmap & 0xffff_ffff != 0 {
            Err(InvalidSubcluster { index })
        } else if zero {
            Ok(Subcluster::ZeroPlain)
        } else {
            Ok(Subcluster::UnallocatedPlain)
        }
    }

    /// The kind of the whole cluster for a standard (non-extended) entry.
    pub fn kind(self, cluster_bits: u32) -> ClusterKind {
        self.cluster_kind(EntryFormat {
            cluster_bits,
            extended: false,
            data_file: false,
        })
    }

    /// The kind of the whole cluster as qemu's `qcow2_get_cluster_type` sees it (what `check`
    /// counts): the subcluster bitmap is not looked at, with extended L2 entries bit 0 is no
    /// zero flag, and in an external data file offset 0 with COPIED is a normal cluster.
    pub fn cluster_kind(self, format: EntryFormat) -> ClusterKind {
        let (entry, format) = if format.extended {
            let whole = L2Entry {
                entry: self.entry & !ZERO,
                bitmap: 0,
            };
            let standard = EntryFormat {
                extended: false,
                ..format
            };
            (whole, standard)
        } else {
            (self, format)
        };
        match entry.subcluster(0, format) {
            Ok(Subcluster::Normal { host }) => ClusterKind::Normal { host: host.0 },
            Ok(Subcluster::Compressed { host, len }) => {
                ClusterKind::Compressed { host: host.0, len }
            }
            Ok(Subcluster::ZeroAlloc { host }) => ClusterKind::ZeroAllocated { host: host.0 },
            Ok(Subcluster::ZeroPlain) => ClusterKind::ZeroPlain,
            Ok(Subcluster::UnallocatedPlain | Subcluster::UnallocatedAlloc { .. }) | Err(_) => {
                ClusterKind::Unallocated
            }
        }
    }

    /// The kind of subcluster `index` (0..32) for an extended entry (`data_file`: of an image with
    /// an external data file, where offset 0 with COPIED is allocated). An invalid bitmap is `Err`.
    pub fn subcluster_kind(
        self,
        index: u32,
        cluster_bits: u32,
        data_file: bool,
    ) -> Result<ClusterKind, InvalidSubcluster> {
        let format = EntryFormat {
            cluster_bits,
            extended: true,
            data_file,
        };
        Ok(match self.subcluster(index, format)? {
            Subcluster::Normal { host } => ClusterKind::Normal { host: host.0 },
            Subcluster::Compressed { host, len } => ClusterKind::Compressed { host: host.0, len },
            Subcluster::ZeroAlloc { .. } | Subcluster::ZeroPlain => ClusterKind::ZeroPlain,
            Subcluster::UnallocatedPlain | Subcluster::UnallocatedAlloc { .. } => {
                ClusterKind::Unallocated
            }
        })
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
        assert_eq!(
            entry.subcluster_kind(1, 16, false),
            Ok(ClusterKind::Unallocated)
        );
        assert_eq!(
            entry.subcluster_kind(2, 16, false),
            Ok(ClusterKind::Normal { host: 0x50000 })
        );
        let zero = L2Entry {
            entry: 0,
            bitmap: 1 << 32,
        };
        assert_eq!(
            zero.subcluster_kind(0, 16, false),
            Ok(ClusterKind::ZeroPlain)
        );
        let both = L2Entry {
            entry: 0x50000,
            bitmap: (1 << 32) | 1,
        };
        assert_eq!(
            both.subcluster_kind(0, 16, false),
            Err(InvalidSubcluster { index: 0 })
        );
        let no_host = L2Entry {
            entry: 0,
            bitmap: 1,
        };
        assert!(no_host.subcluster_kind(0, 16, false).is_err());
    }

    #[test]
    fn host_offset_zero_is_data_only_in_an_external_data_file() {
        let entry = L2Entry {
            entry: COPIED,
            bitmap: 0,
        };
        let mut format = EntryFormat {
            cluster_bits: 16,
            extended: false,
            data_file: false,
        };
        assert_eq!(
            entry.subcluster(0, format),
            Ok(Subcluster::UnallocatedPlain)
        );
        format.data_file = true;
        assert_eq!(
            entry.subcluster(0, format),
            Ok(Subcluster::Normal {
                host: HostOffset(0)
            })
        );
        let not_copied = L2Entry {
            entry: 0,
            bitmap: 0,
        };
        assert_eq!(
            not_copied.subcluster(0, format),
            Ok(Subcluster::UnallocatedPlain)
        );
        format.extended = true;
        let sub = L2Entry {
            entry: COPIED,
            bitmap: 0b10,
        };
        assert_eq!(
            sub.subcluster(1, format),
            Ok(Subcluster::Normal {
                host: HostOffset(0)
            })
        );
        assert_eq!(
            sub.subcluster(0, format),
            Ok(Subcluster::UnallocatedAlloc {
                host: HostOffset(0)
            })
        );
    }

    #[test]
    fn l1_entries_expose_offset_copied_and_reserved_bits() {
        let e = L1Entry(0x8000_0000_0004_0000);
        assert_eq!(e.l2_offset(), Some(0x40000));
        assert!(e.copied());
        assert_eq!(L1Entry(0).l2_offset(), None);
        assert_eq!(L1Entry(0x40001).reserved_bits(), 1);
    }

    #[test]
    fn cluster_kind_follows_qemu_for_extended_entries_and_data_files() {
        let entry = |entry| L2Entry { entry, bitmap: 0 };
        let format = |extended, data_file| EntryFormat {
            cluster_bits: 16,
            extended,
            data_file,
        };
        // Extended L2: bit 0 is no zero flag.
        assert_eq!(
            entry(1).cluster_kind(format(true, false)),
            ClusterKind::Unallocated
        );
        assert_eq!(
            entry(0x50001).cluster_kind(format(true, false)),
            ClusterKind::Normal { host: 0x50000 }
        );
        assert_eq!(
            entry(1).cluster_kind(format(false, false)),
            ClusterKind::ZeroPlain
        );
        // Data file: offset 0 with COPIED is host offset 0.
        assert_eq!(
            entry(COPIED).cluster_kind(format(false, true)),
            ClusterKind::Normal { host: 0 }
        );
        assert_eq!(
            entry(COPIED).cluster_kind(format(false, false)),
            ClusterKind::Unallocated
        );
        let table = [0x80, 0, 0, 0, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xC];
        assert_eq!(
            L2Entry::from_table(&table, 0, format(true, false)),
            L2Entry {
                entry: 0x8000_0000_0005_0000,
                bitmap: 0xC
            }
        );
        assert_eq!(
            L2Entry::from_table(&table, 1, format(false, false)).entry,
            0xC
        );
    }
}
