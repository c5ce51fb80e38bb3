//! The three feature bitmaps of a v3 header and the feature-name table qemu writes.
//!
//! Spec: qemu `docs/interop/qcow2.rst`, "Header", bytes 72-95; FORMATS.md §1.2.

use bitflags::bitflags;

bitflags! {
    /// Incompatible features (header bytes 72-79): a reader that does not know a set bit must
    /// refuse the image.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct IncompatibleFeatures: u64 {
        /// Bit 0: refcounts may be stale (lazy refcounts in use); repair before trusting them.
        const DIRTY = 1 << 0;
        /// Bit 1: metadata is known to be corrupt; open read-only only.
        const CORRUPT = 1 << 1;
        /// Bit 2: guest data lives in an external data file.
        const EXTERNAL_DATA_FILE = 1 << 2;
        /// Bit 3: the compression_type field (byte 104) is not deflate.
        const COMPRESSION_TYPE = 1 << 3;
        /// Bit 4: L2 entries are 128 bits with 32 subclusters each.
        const EXTENDED_L2 = 1 << 4;
    }
}

bitflags! {
    /// Compatible features (header bytes 80-87): unknown bits may be ignored.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CompatibleFeatures: u64 {
        /// Bit 0: refcount updates may be deferred; the image is marked dirty meanwhile.
        const LAZY_REFCOUNTS = 1 << 0;
    }
}

bitflags! {
    /// Autoclear features (header bytes 88-95): a writer that does not know a set bit clears it.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct AutoclearFeatures: u64 {
        /// Bit 0: the bitmaps extension is consistent.
        const BITMAPS = 1 << 0;
        /// Bit 1: the external data file is a valid raw image.
        const RAW_EXTERNAL = 1 << 1;
    }
}

impl IncompatibleFeatures {
    /// Every incompatible bit this implementation understands; any other set bit is refused.
    pub const SUPPORTED: Self = Self::all();
}

/// Which bitmap a feature-name table entry describes (first byte of the entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FeatureKind {
    /// 0: incompatible.
    Incompatible,
    /// 1: compatible.
    Compatible,
    /// 2: autoclear.
    Autoclear,
    /// Any other value; kept so that a table round-trips unchanged.
    Other(u8),
}

impl FeatureKind {
    /// Decodes the entry's type byte.
    pub fn from_byte(byte: u8) -> Self {
        match byte {
            0 => Self::Incompatible,
            1 => Self::Compatible,
            2 => Self::Autoclear,
            other => Self::Other(other),
        }
    }

    /// Encodes the entry's type byte.
    pub fn to_byte(self) -> u8 {
        match self {
            Self::Incompatible => 0,
            Self::Compatible => 1,
            Self::Autoclear => 2,
            Self::Other(byte) => byte,
        }
    }
}

/// One 48-byte entry of the feature-name table extension: a human name for a feature bit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct FeatureName {
    /// Which bitmap the bit belongs to.
    pub kind: FeatureKind,
    /// Bit number within that bitmap.
    pub bit: u8,
    /// The name, stored zero-padded in 46 bytes (exactly 46 bytes, padding included, so that a
    /// table round-trips byte for byte).
    pub name: [u8; FEATURE_NAME_LEN],
}

/// Bytes reserved for a feature name inside a table entry.
pub const FEATURE_NAME_LEN: usize = 46;
/// Size of one feature-name table entry.
pub const FEATURE_ENTRY_LEN: usize = 48;

impl FeatureName {
    /// Builds an entry from a name of at most 46 bytes (longer names are cut).
    pub fn new(kind: FeatureKind, bit: u8, name: &str) -> Self {
        let mut padded = [0u8; FEATURE_NAME_LEN];
        let len = name.len().min(FEATURE_NAME_LEN);
        padded[..len].copy_from_slice(&name.as_bytes()[..len]);
        Self {
            kind,
            bit,
            name: padded,
        }
    }

    /// The name up to its first NUL, lossily decoded.
    pub fn name_lossy(&self) -> String {
        let end = self
            .name
            .iter()
            .position(|&b| b == 0)
            .unwrap_or(FEATURE_NAME_LEN);
        String::from_utf8_lossy(&self.name[..end]).into_owned()
    }
}

/// The feature-name table qemu writes into every v3 image whose clusters are larger than 4 KiB,
/// in qemu's order (FORMATS.md §1.3, verified on qemu-img 7.2).
pub fn standard_feature_table() -> Vec<FeatureName> {
    use FeatureKind::{Autoclear, Compatible, Incompatible};
    vec![
        FeatureName::new(Incompatible, 0, "dirty bit"),
        FeatureName::new(Incompatible, 1, "corrupt bit"),
        FeatureName::new(Incompatible, 2, "external data file"),
        FeatureName::new(Incompatible, 3, "compression type"),
        FeatureName::new(Incompatible, 4, "extended L2 entries"),
        FeatureName::new(Compatible, 0, "lazy refcounts"),
        FeatureName::new(Autoclear, 0, "bitmaps"),
        FeatureName::new(Autoclear, 1, "raw external data"),
    ]
}

/// Names unknown incompatible `bits` from an image's feature-name `table`, as qemu does when it
/// refuses them: the table is read in order up to its first entry with an empty name, each
/// incompatible entry naming a bit still unnamed in `bits` contributes its name (once per bit,
/// the first entry wins). Returns the names in table order and the bits left unnamed.
pub fn name_incompatible(table: &[FeatureName], bits: u64) -> (Vec<String>, u64) {
    let mut names = Vec::new();
    let mut unnamed = bits;
    for entry in table.iter().take_while(|entry| entry.name[0] != 0) {
        let Some(mask) = 1u64.checked_shl(u32::from(entry.bit)) else {
            continue; // bit 64 or above names nothing
        };
        if entry.kind == FeatureKind::Incompatible && unnamed & mask != 0 {
            names.push(entry.name_lossy());
            unnamed &= !mask;
        }
    }
    (names, unnamed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_incompatible_bits_are_outside_the_supported_mask() {
        let bits = (1u64 << 5) | 1;
        let unknown = bits & !IncompatibleFeatures::SUPPORTED.bits();
        assert_eq!(unknown, 1 << 5);
    }

    #[test]
    fn unknown_bits_are_named_in_table_order_up_to_the_first_empty_name() {
        use FeatureKind::{Autoclear, Compatible, Incompatible};
        let table = [
            FeatureName::new(Compatible, 61, "compatible 61"),
            FeatureName::new(Incompatible, 62, "second"),
            FeatureName::new(Incompatible, 61, "first"),
            FeatureName::new(Incompatible, 61, "again"),
            FeatureName::new(Autoclear, 63, "autoclear 63"),
            FeatureName::new(Incompatible, 200, "out of range"),
            FeatureName::new(Incompatible, 60, ""),
            FeatureName::new(Incompatible, 63, "after the end"),
        ];
        let bits = 0xf << 60;
        assert_eq!(
            name_incompatible(&table, bits),
            (vec!["second".to_owned(), "first".to_owned()], 0x9 << 60)
        );
        assert_eq!(name_incompatible(&[], bits), (Vec::new(), bits));
    }

    #[test]
    fn feature_names_are_zero_padded_and_read_back() {
        let entry = FeatureName::new(FeatureKind::Compatible, 0, "lazy refcounts");
        assert_eq!(entry.name_lossy(), "lazy refcounts");
        assert_eq!(entry.name[14..], [0u8; 32]);
        assert_eq!(FeatureKind::from_byte(7).to_byte(), 7);
    }
}
