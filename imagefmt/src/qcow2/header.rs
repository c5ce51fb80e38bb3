//! The fixed qcow2 header at offset 0 (72 bytes in v2, `header_length` bytes in v3).
//!
//! Spec: qemu `docs/interop/qcow2.rst`, "Header"; FORMATS.md §1.1. All integers are big-endian.
//! [`Header::parse`] enforces every bound of FORMATS.md §1.10 that the fixed fields alone decide;
//! the extension area and backing name are checked by [`super::HeaderCluster`].

use byteorder::{BigEndian, ByteOrder};

use super::error::Qcow2Error;
use super::features::{AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures};
use super::{
    MAX_BACKING_FILE_NAME, MAX_CLUSTER_BITS, MAX_L1_TABLE_BYTES, MAX_REFCOUNT_ORDER,
    MAX_REFCOUNT_TABLE_BYTES, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS,
};

/// `QFI\xfb`, the first four bytes of every qcow2 image.
pub const MAGIC: u32 = 0x5146_49fb;
/// Length of the v2 header; also where v3 fields begin.
pub const V2_HEADER_LEN: u32 = 72;
/// Smallest legal v3 header_length (fields up to and including header_length).
pub const V3_MIN_HEADER_LEN: u32 = 104;
/// The header_length qemu 7.2 writes for v3: the compression type byte plus 7 bytes of padding.
pub const V3_HEADER_LEN: u32 = 112;

/// Largest file offset qemu accepts for the end of a table (`INT64_MAX`).
const MAX_FILE_OFFSET: u64 = i64::MAX as u64;

/// Header version: 2 (`compat=0.10`) or 3 (`compat=1.1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Version {
    /// Version 2, written by `compat=0.10`.
    V2,
    /// Version 3, written by `compat=1.1` (qemu's default).
    V3,
}

impl Version {
    /// The on-disk number.
    pub fn number(self) -> u32 {
        match self {
            Self::V2 => 2,
            Self::V3 => 3,
        }
    }

    /// The `compat` string qemu-img uses for this version.
    pub fn compat(self) -> &'static str {
        match self {
            Self::V2 => "0.10",
            Self::V3 => "1.1",
        }
    }
}

/// How compressed clusters are encoded (byte 104, v3 only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    /// 0: raw deflate (qemu-img calls it `zlib`).
    #[default]
    Deflate,
    /// 1: zstd.
    Zstd,
}

impl CompressionType {
    /// The on-disk byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Deflate => 0,
            Self::Zstd => 1,
        }
    }

    /// Decodes the on-disk byte.
    pub fn from_byte(byte: u8) -> Result<Self, Qcow2Error> {
        match byte {
            0 => Ok(Self::Deflate),
            1 => Ok(Self::Zstd),
            found => Err(Qcow2Error::UnknownCompressionType { found }),
        }
    }

    /// The name qemu-img prints and accepts (`zlib`, `zstd`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Deflate => "zlib",
            Self::Zstd => "zstd",
        }
    }
}

/// The fixed part of a qcow2 header, with native integers.
///
/// Field docs give the byte offset and the spec's meaning. v3-only fields read as their defaults
/// in a v2 image (features 0, refcount_order 4, header_length 72).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    /// 4-7: format version.
    pub version: Version,
    /// 8-15: offset of the backing file name in the file (0 = no backing file).
    pub backing_file_offset: u64,
    /// 16-19: length of the backing file name in bytes, without a terminating NUL.
    pub backing_file_size: u32,
    /// 20-23: log2 of the cluster size (9..=21).
    pub cluster_bits: u32,
    /// 24-31: virtual disk size in bytes.
    pub size: u64,
    /// 32-35: encryption method: 0 none, 1 AES (legacy), 2 LUKS.
    pub crypt_method: u32,
    /// 36-39: number of entries in the active L1 table.
    pub l1_size: u32,
    /// 40-47: offset of the active L1 table (cluster-aligned).
    pub l1_table_offset: u64,
    /// 48-55: offset of the refcount table (cluster-aligned).
    pub refcount_table_offset: u64,
    /// 56-59: number of clusters the refcount table occupies.
    pub refcount_table_clusters: u32,
    /// 60-63: number of internal snapshots.
    pub nb_snapshots: u32,
    /// 64-71: offset of the snapshot table (cluster-aligned).
    pub snapshots_offset: u64,
    /// 72-79 (v3): incompatible feature bits.
    pub incompatible_features: IncompatibleFeatures,
    /// 80-87 (v3): compatible feature bits (unknown bits kept).
    pub compatible_features: CompatibleFeatures,
    /// 88-95 (v3): autoclear feature bits (unknown bits kept).
    pub autoclear_features: AutoclearFeatures,
    /// 96-99 (v3): refcount width is `1 << refcount_order` bits; 4 (16 bits) in v2.
    pub refcount_order: u32,
    /// 100-103 (v3): length of the header structure; 72 in v2.
    pub header_length: u32,
    /// 104 (v3, if header_length > 104): compression type.
    pub compression_type: CompressionType,
    /// 105..header_length: padding and fields newer than this implementation, kept verbatim so
    /// that a rewritten header loses nothing.
    pub trailing: Vec<u8>,
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// Refcount width in bits (1..=64).
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// True if L2 entries are 128-bit extended entries.
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features
            .contains(IncompatibleFeatures::EXTENDED_L2)
    }

    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        l2_entries(self.cluster_bits, self.extended_l2())
    }

    /// Bytes the fixed header occupies on disk (72 for v2, header_length for v3).
    pub fn encoded_len(&self) -> usize {
        match self.version {
            Version::V2 => V2_HEADER_LEN as usize,
            Version::V3 => self.header_length as usize,
        }
    }

    /// Decodes and validates the fixed header from the start of an image.
    ///
    /// `bytes` is the beginning of the file; it must hold at least the header (72 bytes for v2,
    /// header_length for v3). Nothing is allocated beyond `header_length`, itself bounded by the
    /// cluster size (≤ 2 MiB).
    pub fn parse(bytes: &[u8]) -> Result<Self, Qcow2Error> {
        let header = Self::parse_fields(bytes)?;
        header.validate()?;
        Ok(header)
    }

    /// Decodes the fixed header with only the checks decoding itself needs (magic, version,
    /// cluster_bits, header_length, compression type), not [`Header::validate`]'s bounds.
    pub(crate) fn parse_fields(bytes: &[u8]) -> Result<Self, Qcow2Error> {
        need(bytes, V2_HEADER_LEN as usize)?;
        let be32 = |off: usize| BigEndian::read_u32(&bytes[off..off + 4]);
        let be64 = |off: usize| BigEndian::read_u64(&bytes[off..off + 8]);

        let magic = be32(0);
        if magic != MAGIC {
            return Err(Qcow2Error::BadMagic { found: magic });
        }
        let version = match be32(4) {
            2 => Version::V2,
            3 => Version::V3,
            found => return Err(Qcow2Error::UnsupportedVersion { found }),
        };
        let cluster_bits = be32(20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Qcow2Error::InvalidClusterBits {
                found: cluster_bits,
            });
        }
        let cluster_size = 1u64 << cluster_bits;

        let mut header = Header {
            version,
            backing_file_offset: be64(8),
            backing_file_size: be32(16),
            cluster_bits,
            size: be64(24),
            crypt_method: be32(32),
            l1_size: be32(36),
            l1_table_offset: be64(40),
            refcount_table_offset: be64(48),
            refcount_table_clusters: be32(56),
            nb_snapshots: be32(60),
            snapshots_offset: be64(64),
            incompatible_features: IncompatibleFeatures::empty(),
            compatible_features: CompatibleFeatures::empty(),
            autoclear_features: AutoclearFeatures::empty(),
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Deflate,
            trailing: Vec::new(),
        };

        if version == Version::V3 {
            need(bytes, V3_MIN_HEADER_LEN as usize)?;
            let header_length = be32(100);
            if header_length < V3_MIN_HEADER_LEN {
                return Err(Qcow2Error::HeaderLengthTooSmall {
                    found: header_length,
                });
            }
            if u64::from(header_length) > cluster_size {
                return Err(Qcow2Error::HeaderLengthTooLarge {
                    found: header_length,
                    cluster_size,
                });
            }
            need(bytes, header_length as usize)?;
            header.header_length = header_length;
            header.incompatible_features = IncompatibleFeatures::from_bits_retain(be64(72));
            header.compatible_features = CompatibleFeatures::from_bits_retain(be64(80));
            header.autoclear_features = AutoclearFeatures::from_bits_retain(be64(88));
            header.refcount_order = be32(96);
            if header_length > V3_MIN_HEADER_LEN {
                let byte = bytes[V3_MIN_HEADER_LEN as usize];
                header.compression_type = CompressionType::from_byte(byte)?;
                header.trailing =
                    bytes[V3_MIN_HEADER_LEN as usize + 1..header_length as usize].to_vec();
            }
        }
        Ok(header)
    }

    /// Checks every bound that the fixed fields decide (FORMATS.md §1.10 items 1-7 and the
    /// backing-name bounds of §1.4), except the snapshot table's (item 6), which the table's
    /// reader checks ([`super::snapshot::validate_pointer`]). [`Header::parse`] calls it;
    /// writers call it before writing.
    pub fn validate(&self) -> Result<(), Qcow2Error> {
        let cluster_size = self.cluster_size();
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&self.cluster_bits) {
            return Err(Qcow2Error::InvalidClusterBits {
                found: self.cluster_bits,
            });
        }
        if self.version == Version::V3 {
            if self.header_length < V3_MIN_HEADER_LEN {
                return Err(Qcow2Error::HeaderLengthTooSmall {
                    found: self.header_length,
                });
            }
            if u64::from(self.header_length) > cluster_size {
                return Err(Qcow2Error::HeaderLengthTooLarge {
                    found: self.header_length,
                    cluster_size,
                });
            }
        }
        if self.backing_file_offset > cluster_size {
            return Err(Qcow2Error::BackingFileOffsetOutsideCluster0 {
                offset: self.backing_file_offset,
            });
        }
        if self.backing_file_offset != 0 {
            let max = MAX_BACKING_FILE_NAME.min(cluster_size - self.backing_file_offset);
            if u64::from(self.backing_file_size) > max {
                return Err(Qcow2Error::BackingFileNameTooLong {
                    size: self.backing_file_size,
                    max,
                });
            }
        }

        // Checked after the backing-name bounds: HeaderCluster relies on them to read the
        // extension area for the names of these features.
        let unknown = self.incompatible_features.bits() & !IncompatibleFeatures::SUPPORTED.bits();
        if unknown != 0 {
            return Err(Qcow2Error::UnsupportedIncompatibleFeatures {
                bits: unknown,
                names: Vec::new(),
                unnamed: unknown,
            });
        }
        let bit_set = self
            .incompatible_features
            .contains(IncompatibleFeatures::COMPRESSION_TYPE);
        if bit_set != (self.compression_type != CompressionType::Deflate) {
            return Err(Qcow2Error::CompressionTypeBitMismatch {
                compression_type: self.compression_type.to_byte(),
                bit_set,
            });
        }
        if self.extended_l2() && self.cluster_bits < MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(Qcow2Error::ExtendedL2ClusterTooSmall { cluster_size });
        }
        if self.refcount_order > MAX_REFCOUNT_ORDER {
            return Err(Qcow2Error::InvalidRefcountOrder {
                found: self.refcount_order,
            });
        }
        if self.crypt_method > 2 {
            return Err(Qcow2Error::UnknownEncryptionMethod {
                found: self.crypt_method,
            });
        }

        // Refcount table: non-empty, at most 8 MiB, aligned, ending before INT64_MAX.
        if self.refcount_table_clusters == 0 {
            return Err(Qcow2Error::RefcountTableEmpty);
        }
        let reftable_bytes = u64::from(self.refcount_table_clusters) << self.cluster_bits;
        if reftable_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Qcow2Error::RefcountTableTooLarge {
                clusters: self.refcount_table_clusters,
            });
        }
        check_table(
            "refcount table",
            self.refcount_table_offset,
            reftable_bytes,
            cluster_size,
        )?;

        // The snapshot table's pointer is the table reader's to check
        // (snapshot::validate_pointer): qemu-img check opens an image whose count or offset
        // qemu refuses everywhere else, and repairs it.

        // L1 table: at most 32 MiB, aligned, large enough for the virtual size.
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_TABLE_BYTES {
            return Err(Qcow2Error::L1TableTooLarge {
                entries: u64::from(self.l1_size),
            });
        }
        check_table("L1 table", self.l1_table_offset, l1_bytes, cluster_size)?;
        let needed = l1_entries_for(self.size, self.cluster_bits, self.extended_l2());
        if u64::from(self.l1_size) < needed {
            return Err(Qcow2Error::L1TableTooSmall {
                entries: self.l1_size,
                needed,
            });
        }
        Ok(())
    }

    /// Encodes the header into exactly [`Header::encoded_len`] bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.encoded_len().max(V2_HEADER_LEN as usize)];
        BigEndian::write_u32(&mut out[0..4], MAGIC);
        BigEndian::write_u32(&mut out[4..8], self.version.number());
        BigEndian::write_u64(&mut out[8..16], self.backing_file_offset);
        BigEndian::write_u32(&mut out[16..20], self.backing_file_size);
        BigEndian::write_u32(&mut out[20..24], self.cluster_bits);
        BigEndian::write_u64(&mut out[24..32], self.size);
        BigEndian::write_u32(&mut out[32..36], self.crypt_method);
        BigEndian::write_u32(&mut out[36..40], self.l1_size);
        BigEndian::write_u64(&mut out[40..48], self.l1_table_offset);
        BigEndian::write_u64(&mut out[48..56], self.refcount_table_offset);
        BigEndian::write_u32(&mut out[56..60], self.refcount_table_clusters);
        BigEndian::write_u32(&mut out[60..64], self.nb_snapshots);
        BigEndian::write_u64(&mut out[64..72], self.snapshots_offset);
        if self.version == Version::V3 && out.len() >= V3_MIN_HEADER_LEN as usize {
            BigEndian::write_u64(&mut out[72..80], self.incompatible_features.bits());
            BigEndian::write_u64(&mut out[80..88], self.compatible_features.bits());
            BigEndian::write_u64(&mut out[88..96], self.autoclear_features.bits());
            BigEndian::write_u32(&mut out[96..100], self.refcount_order);
            BigEndian::write_u32(&mut out[100..104], self.header_length);
            if out.len() > V3_MIN_HEADER_LEN as usize {
                out[V3_MIN_HEADER_LEN as usize] = self.compression_type.to_byte();
                let start = V3_MIN_HEADER_LEN as usize + 1;
                let len = self.trailing.len().min(out.len() - start);
                out[start..start + len].copy_from_slice(&self.trailing[..len]);
            }
        }
        out
    }
}

/// Byte offset of the autoclear feature bits in a v3 header.
const AUTOCLEAR_FEATURES_OFFSET: u64 = 88;

/// What qemu does to an image it opens for writing (its `qcow2_do_open`): autoclear bits it
/// does not know are cleared in the file, since a writer that does not know a feature cannot
/// keep it consistent. Returns true if the header was changed.
pub(crate) fn clear_unknown_autoclear<B: crate::io::Backend + ?Sized>(
    backend: &B,
    header: &Header,
) -> Result<bool, crate::Error> {
    let known = header.autoclear_features & AutoclearFeatures::all();
    if header.version != Version::V3 || known == header.autoclear_features {
        return Ok(false);
    }
    backend
        .write_all_at(&known.bits().to_be_bytes(), AUTOCLEAR_FEATURES_OFFSET)
        .map_err(crate::Error::writing("qcow2 autoclear feature bits"))?;
    Ok(true)
}

/// Entries per L2 table for a cluster size and entry width.
pub fn l2_entries(cluster_bits: u32, extended_l2: bool) -> u64 {
    let entry_bytes = if extended_l2 { 16 } else { 8 };
    (1u64 << cluster_bits) / entry_bytes
}

/// L1 entries needed to map `size` bytes (qemu's `size_to_l1`).
pub fn l1_entries_for(size: u64, cluster_bits: u32, extended_l2: bool) -> u64 {
    let bytes_per_l2 = (1u64 << cluster_bits) * l2_entries(cluster_bits, extended_l2);
    size.div_ceil(bytes_per_l2)
}

fn need(bytes: &[u8], needed: usize) -> Result<(), Qcow2Error> {
    if bytes.len() < needed {
        return Err(Qcow2Error::Truncated {
            len: bytes.len(),
            needed,
        });
    }
    Ok(())
}

fn check_table(
    table: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
) -> Result<(), Qcow2Error> {
    if offset % cluster_size != 0 {
        return Err(Qcow2Error::UnalignedOffset { table, offset });
    }
    match offset.checked_add(len) {
        Some(end) if end <= MAX_FILE_OFFSET => Ok(()),
        _ => Err(Qcow2Error::TableOffsetInvalid { table, offset, len }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The first 112 bytes of `qemu-img create -f qcow2 -b base.qcow2 -F qcow2 ov.qcow2` over a
    /// 1 GiB base (qemu-img 7.2, FORMATS.md §1.9), field by field.
    pub(crate) fn qemu_overlay_header() -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&[0x51, 0x46, 0x49, 0xfb]); // 0   magic "QFI\xfb"
        b.extend_from_slice(&3u32.to_be_bytes()); // 4   version 3
        b.extend_from_slice(&0x210u64.to_be_bytes()); // 8   backing_file_offset
        b.extend_from_slice(&10u32.to_be_bytes()); // 16  backing_file_size ("base.qcow2")
        b.extend_from_slice(&16u32.to_be_bytes()); // 20  cluster_bits (64 KiB)
        b.extend_from_slice(&(1u64 << 30).to_be_bytes()); // 24  size 1 GiB
        b.extend_from_slice(&0u32.to_be_bytes()); // 32  crypt_method none
        b.extend_from_slice(&2u32.to_be_bytes()); // 36  l1_size
        b.extend_from_slice(&0x30000u64.to_be_bytes()); // 40  l1_table_offset
        b.extend_from_slice(&0x10000u64.to_be_bytes()); // 48  refcount_table_offset
        b.extend_from_slice(&1u32.to_be_bytes()); // 56  refcount_table_clusters
        b.extend_from_slice(&0u32.to_be_bytes()); // 60  nb_snapshots
        b.extend_from_slice(&0u64.to_be_bytes()); // 64  snapshots_offset
        b.extend_from_slice(&0u64.to_be_bytes()); // 72  incompatible_features
        b.extend_from_slice(&0u64.to_be_bytes()); // 80  compatible_features
        b.extend_from_slice(&0u64.to_be_bytes()); // 88  autoclear_features
        b.extend_from_slice(&4u32.to_be_bytes()); // 96  refcount_order (16 bits)
        b.extend_from_slice(&112u32.to_be_bytes()); // 100 header_length
        b.push(0); // 104 compression_type deflate
        b.extend_from_slice(&[0; 7]); // 105 padding
        assert_eq!(b.len(), 112);
        b
    }

    fn with(mut bytes: Vec<u8>, offset: usize, field: &[u8]) -> Vec<u8> {
        bytes[offset..offset + field.len()].copy_from_slice(field);
        bytes
    }

    /// The proptest's find (byte 103 set to 104): a v3 header without the compression-type
    /// byte is legal and re-encodes as its own 104 bytes, not qemu's usual 112.
    #[test]
    fn a_104_byte_v3_header_reencodes_as_104_bytes() {
        let bytes = with(qemu_overlay_header(), 103, &[104]);
        let header = Header::parse(&bytes).unwrap();
        assert_eq!(header.header_length, 104);
        assert_eq!(header.encoded_len(), 104);
        assert_eq!(header.to_bytes(), &bytes[..104]);
    }

    fn parse_with(offset: usize, field: &[u8]) -> Result<Header, Qcow2Error> {
        Header::parse(&with(qemu_overlay_header(), offset, field))
    }

    #[test]
    fn qemu_overlay_header_decodes_field_by_field() {
        let h = Header::parse(&qemu_overlay_header()).unwrap();
        assert_eq!(h.version, Version::V3);
        assert_eq!((h.backing_file_offset, h.backing_file_size), (0x210, 10));
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 30);
        assert_eq!((h.l1_size, h.l1_table_offset), (2, 0x30000));
        assert_eq!(
            (h.refcount_table_offset, h.refcount_table_clusters),
            (0x10000, 1)
        );
        assert_eq!((h.nb_snapshots, h.snapshots_offset), (0, 0));
        assert_eq!(h.refcount_bits(), 16);
        assert_eq!(h.header_length, 112);
        assert_eq!(h.compression_type, CompressionType::Deflate);
        assert_eq!(h.trailing, vec![0; 7]);
        assert_eq!(h.to_bytes(), qemu_overlay_header());
    }

    #[test]
    fn v2_header_is_72_bytes_with_v3_fields_defaulted() {
        let mut b = with(qemu_overlay_header(), 4, &2u32.to_be_bytes());
        b.truncate(72);
        let h = Header::parse(&b).unwrap();
        assert_eq!(h.version, Version::V2);
        assert_eq!((h.refcount_order, h.header_length), (4, 72));
        assert!(h.incompatible_features.is_empty());
        assert_eq!(h.to_bytes(), b);
    }

    #[test]
    fn every_open_time_bound_has_its_own_error() {
        use Qcow2Error as E;
        type Case = (usize, Vec<u8>, fn(&Qcow2Error) -> bool);
        let cases: Vec<Case> = vec![
            (0, b"QFI\xfa".to_vec(), |e| {
                matches!(e, E::BadMagic { found: 0x514649fa })
            }),
            (4, 4u32.to_be_bytes().to_vec(), |e| {
                matches!(e, E::UnsupportedVersion { found: 4 })
            }),
            (20, 8u32.to_be_bytes().to_vec(), |e| {
                matches!(e, E::InvalidClusterBits { found: 8 })
            }),
            (20, 22u32.to_be_bytes().to_vec(), |e| {
                matches!(e, E::InvalidClusterBits { found: 22 })
            }),
            (100, 100u32.to_be_bytes().to_vec(), |e| {
                matches!(e, E::HeaderLengthTooSmall { found: 100 })
            }),
            (8, 0x10001u64.to_be_bytes().to_vec(), |e| {
                matches!(e, E::BackingFileOffsetOutsideCluster0 { offset: 0x10001 })
            }),
            (16, 1024u32.to_be_bytes().to_vec(), |e| {
                matches!(
                    e,
                    E::BackingFileNameTooLong {
                        size: 1024,
                        max: 1023
                    }
                )
            }),
            (72, (1u64 << 5).to_be_bytes().to_vec(), |e| {
                matches!(e, E::UnsupportedIncompatibleFeatures { bits: 32, .. })
            }),
            (72, (1u64 << 3).to_be_bytes().to_vec(), |e| {
                matches!(
                    e,
                    E::CompressionTypeBitMismatch {
                        compression_type: 0,
                        bit_set: true
                    }
                )
            }),
            (104, vec![1], |e| {
                matches!(
                    e,
                    E::CompressionTypeBitMismatch {
                        compression_type: 1,
                        bit_set: false
                    }
                )
            }),
            (104, vec![2], |e| {
                matches!(e, E::UnknownCompressionType { found: 2 })
            }),
            (96, 7u32.to_be_bytes().to_vec(), |e| {
                matches!(e, E::InvalidRefcountOrder { found: 7 })
            }),
            (32, 3u32.to_be_bytes().to_vec(), |e| {
                matches!(e, E::UnknownEncryptionMethod { found: 3 })
            }),
            (56, 0u32.to_be_bytes().to_vec(), |e| {
                matches!(e, E::RefcountTableEmpty)
            }),
            (56, 129u32.to_be_bytes().to_vec(), |e| {
                matches!(e, E::RefcountTableTooLarge { clusters: 129 })
            }),
            (48, 0x10200u64.to_be_bytes().to_vec(), |e| {
                matches!(
                    e,
                    E::UnalignedOffset {
                        table: "refcount table",
                        ..
                    }
                )
            }),
            (
                48,
                (i64::MAX as u64 & !0xffff).to_be_bytes().to_vec(),
                |e| {
                    matches!(
                        e,
                        E::TableOffsetInvalid {
                            table: "refcount table",
                            ..
                        }
                    )
                },
            ),
            (36, u32::MAX.to_be_bytes().to_vec(), |e| {
                matches!(e, E::L1TableTooLarge { .. })
            }),
            (36, 1u32.to_be_bytes().to_vec(), |e| {
                matches!(
                    e,
                    E::L1TableTooSmall {
                        entries: 1,
                        needed: 2
                    }
                )
            }),
            (40, 0x30008u64.to_be_bytes().to_vec(), |e| {
                matches!(
                    e,
                    E::UnalignedOffset {
                        table: "L1 table",
                        ..
                    }
                )
            }),
        ];
        for (offset, field, expected) in cases {
            let err = parse_with(offset, &field).unwrap_err();
            assert!(
                expected(&err),
                "offset {offset} field {field:02x?}: got {err:?}"
            );
        }
    }

    #[test]
    fn header_length_beyond_the_cluster_and_extended_l2_on_small_clusters_are_refused() {
        let small = with(qemu_overlay_header(), 20, &12u32.to_be_bytes()); // 4 KiB clusters
        let small = with(small, 8, &0u64.to_be_bytes()); // no backing name
        let long = with(small.clone(), 100, &4104u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&long),
            Err(Qcow2Error::HeaderLengthTooLarge {
                found: 4104,
                cluster_size: 4096
            })
        ));
        let mut ext = with(small, 72, &(1u64 << 4).to_be_bytes());
        ext = with(ext, 36, &512u32.to_be_bytes()); // enough L1 entries for 1 GiB either way
        assert!(matches!(
            Header::parse(&ext),
            Err(Qcow2Error::ExtendedL2ClusterTooSmall { cluster_size: 4096 })
        ));
    }

    #[test]
    fn truncated_input_is_an_error_at_every_length() {
        let full = qemu_overlay_header();
        for len in 0..full.len() {
            assert!(
                matches!(
                    Header::parse(&full[..len]),
                    Err(Qcow2Error::Truncated { .. })
                ),
                "len {len}"
            );
        }
    }

    proptest::proptest! {
        #[test]
        fn any_bytes_parse_or_fail_without_panicking(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = Header::parse(&bytes);
        }

        #[test]
        fn a_valid_header_with_any_byte_changed_never_panics_and_reencodes_exactly(
            index in 0usize..112, value in proptest::num::u8::ANY
        ) {
            let bytes = with(qemu_overlay_header(), index, &[value]);
            // A changed header_length may shorten the header (104 is legal): only its own bytes
            // must come back.
            if let Ok(header) = Header::parse(&bytes) {
                proptest::prop_assert_eq!(header.to_bytes(), &bytes[..header.encoded_len()]);
            }
        }
    }
}
