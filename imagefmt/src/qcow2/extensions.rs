//! Header extensions: the type-length-value records between the fixed header and the backing
//! file name.
//!
//! Spec: qemu `docs/interop/qcow2.rst`, "Header extensions"; FORMATS.md §1.3. Each record is
//! `u32 type, u32 length, data, zero padding to a multiple of 8`; type 0 ends the area. Unknown
//! types are kept verbatim so that rewriting a header loses nothing; a known type that appears
//! more than once counts as its last copy, as in qemu.

use byteorder::{BigEndian, ByteOrder};

use super::error::Qcow2Error;
use super::features::{
    AutoclearFeatures, FeatureKind, FeatureName, FEATURE_ENTRY_LEN, FEATURE_NAME_LEN,
};
use super::header::Header;

/// Type 0: end of the extension area.
pub const EXT_END: u32 = 0x0000_0000;
/// Backing file format name (`qcow2`, `raw`, ...).
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
/// Feature-name table.
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
/// Persistent dirty bitmaps.
pub const EXT_BITMAPS: u32 = 0x2385_2875;
/// Full-disk-encryption header pointer (LUKS).
pub const EXT_CRYPTO_HEADER: u32 = 0x0537_be77;
/// External data file name.
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// qemu keeps the backing format in a 16-byte buffer: names must be shorter.
pub const MAX_BACKING_FORMAT_LEN: usize = 15;
/// Largest bitmap directory qemu accepts (1024 bytes per bitmap × 65535 bitmaps).
pub const MAX_BITMAP_DIRECTORY_SIZE: u64 = 1024 * 65535;
/// Largest bitmap count qemu accepts.
pub const MAX_BITMAPS: u32 = 65535;

/// Contents of the bitmaps extension (24 bytes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapsExtension {
    /// Number of bitmaps in the directory (1..=65535).
    pub nb_bitmaps: u32,
    /// Reserved, must be zero.
    pub reserved: u32,
    /// Size of the bitmap directory in bytes.
    pub directory_size: u64,
    /// Offset of the bitmap directory (cluster-aligned).
    pub directory_offset: u64,
}

/// One header extension.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Extension {
    /// 0xE2792ACA: the backing file's format, so that it need never be probed.
    BackingFormat(String),
    /// 0x6803F857: names for feature bits, for error messages about unknown features.
    FeatureNameTable(Vec<FeatureName>),
    /// 0x23852875: persistent dirty bitmaps.
    Bitmaps(BitmapsExtension),
    /// 0x0537BE77: where the LUKS header lives.
    CryptoHeader {
        /// Offset of the LUKS header (cluster-aligned).
        offset: u64,
        /// Its length.
        length: u64,
    },
    /// 0x44415441: name of the external data file.
    ExternalDataFile(String),
    /// Any other type, kept verbatim (data without padding).
    Unknown {
        /// The type.
        kind: u32,
        /// The data.
        data: Vec<u8>,
    },
}

impl Extension {
    /// The extension's type number.
    pub fn kind(&self) -> u32 {
        match self {
            Self::BackingFormat(_) => EXT_BACKING_FORMAT,
            Self::FeatureNameTable(_) => EXT_FEATURE_TABLE,
            Self::Bitmaps(_) => EXT_BITMAPS,
            Self::CryptoHeader { .. } => EXT_CRYPTO_HEADER,
            Self::ExternalDataFile(_) => EXT_DATA_FILE,
            Self::Unknown { kind, .. } => *kind,
        }
    }

    /// Encodes the extension's data (without the type/length prefix or padding).
    pub fn data(&self) -> Vec<u8> {
        match self {
            Self::BackingFormat(name) | Self::ExternalDataFile(name) => name.as_bytes().to_vec(),
            Self::FeatureNameTable(entries) => {
                let mut out = Vec::with_capacity(entries.len() * FEATURE_ENTRY_LEN);
                for entry in entries {
                    out.push(entry.kind.to_byte());
                    out.push(entry.bit);
                    out.extend_from_slice(&entry.name);
                }
                out
            }
            Self::Bitmaps(b) => {
                let mut out = vec![0u8; 24];
                BigEndian::write_u32(&mut out[0..4], b.nb_bitmaps);
                BigEndian::write_u32(&mut out[4..8], b.reserved);
                BigEndian::write_u64(&mut out[8..16], b.directory_size);
                BigEndian::write_u64(&mut out[16..24], b.directory_offset);
                out
            }
            Self::CryptoHeader { offset, length } => {
                let mut out = vec![0u8; 16];
                BigEndian::write_u64(&mut out[0..8], *offset);
                BigEndian::write_u64(&mut out[8..16], *length);
                out
            }
            Self::Unknown { data, .. } => data.clone(),
        }
    }

    /// Bytes this extension occupies on disk: 8-byte prefix plus data padded to 8.
    pub fn encoded_len(&self) -> usize {
        8 + self.data().len().next_multiple_of(8)
    }
}

/// Where the extension area of an image ends: the backing file name if there is one, else the
/// end of the first cluster (qemu's `ext_end`).
pub fn extension_area_end(header: &Header) -> u64 {
    if header.backing_file_offset != 0 {
        header.backing_file_offset
    } else {
        header.cluster_size()
    }
}

/// Decodes the extension area of `cluster0` (the start of the file) for `header`.
///
/// Parsing starts at the end of the fixed header and stops at the end marker or at
/// [`extension_area_end`]. Returns the extensions and the offset just past the end marker (or
/// the area end if there is none). Allocation is bounded by the area, itself inside cluster 0.
pub fn parse_extensions(
    cluster0: &[u8],
    header: &Header,
) -> Result<(Vec<Extension>, u64), Qcow2Error> {
    let end = extension_area_end(header);
    let mut offset = header.encoded_len() as u64;
    let mut extensions: Vec<Extension> = Vec::new();
    while offset < end {
        let data_start = offset + 8;
        if data_start > end {
            return Err(Qcow2Error::ExtensionTooLarge {
                kind: 0,
                offset,
                end,
            });
        }
        let prefix = slice(cluster0, offset, 8)?;
        let kind = BigEndian::read_u32(&prefix[0..4]);
        let len = u64::from(BigEndian::read_u32(&prefix[4..8]));
        if kind == EXT_END {
            return Ok((extensions, data_start));
        }
        if len > end - data_start {
            return Err(Qcow2Error::ExtensionTooLarge { kind, offset, end });
        }
        let data = slice(cluster0, data_start, len)?;
        let extension = decode_one(kind, data, header)?;
        // A known extension that appears again replaces the earlier copy: qemu reads each into
        // one place (the last one wins) and writes one of each back.
        if !matches!(extension, Extension::Unknown { .. }) {
            extensions.retain(|e| e.kind() != kind);
        }
        extensions.push(extension);
        offset = data_start + len.next_multiple_of(8);
    }
    Ok((extensions, end))
}

/// The feature-name table qemu would use to name unknown incompatible features of an image it
/// refuses: the last table in the extension area, as far as the area can be walked (a record
/// that does not decode ends the walk, keeping a table found before it). A table whose length is
/// not a whole number of entries ends in a zero-padded one. Never fails; bounded by `cluster0`.
pub fn feature_table_for_refusal(cluster0: &[u8], header: &Header) -> Vec<FeatureName> {
    let end = extension_area_end(header);
    let mut offset = header.encoded_len() as u64;
    let mut table = Vec::new();
    while let Some(data_start) = offset.checked_add(8).filter(|&start| start <= end) {
        let Ok(prefix) = slice(cluster0, offset, 8) else {
            break;
        };
        let kind = BigEndian::read_u32(&prefix[0..4]);
        let len = u64::from(BigEndian::read_u32(&prefix[4..8]));
        if kind == EXT_END || len > end - data_start {
            break;
        }
        let Ok(data) = slice(cluster0, data_start, len) else {
            break;
        };
        // qemu reads a table into a zeroed buffer: a partial last entry counts, zero-padded.
        let mut padded;
        let data = match kind {
            EXT_FEATURE_TABLE => {
                padded = data.to_vec();
                padded.resize(data.len().next_multiple_of(FEATURE_ENTRY_LEN), 0);
                &padded[..]
            }
            _ => data,
        };
        match decode_one(kind, data, header) {
            Ok(Extension::FeatureNameTable(entries)) => table = entries,
            Ok(_) => {}
            Err(_) => break,
        }
        offset = data_start + len.next_multiple_of(8);
    }
    table
}

fn decode_one(kind: u32, data: &[u8], header: &Header) -> Result<Extension, Qcow2Error> {
    let invalid = |reason| Qcow2Error::InvalidExtension { kind, reason };
    Ok(match kind {
        EXT_BACKING_FORMAT => {
            if data.len() > MAX_BACKING_FORMAT_LEN {
                return Err(invalid("backing format name longer than 15 bytes"));
            }
            Extension::BackingFormat(
                text(data).ok_or_else(|| invalid("backing format is not text"))?,
            )
        }
        EXT_FEATURE_TABLE => {
            if data.len() % FEATURE_ENTRY_LEN != 0 {
                return Err(invalid(
                    "feature table is not a whole number of 48-byte entries",
                ));
            }
            let entries = data
                .chunks_exact(FEATURE_ENTRY_LEN)
                .map(|entry| {
                    let mut name = [0u8; FEATURE_NAME_LEN];
                    name.copy_from_slice(&entry[2..]);
                    FeatureName {
                        kind: FeatureKind::from_byte(entry[0]),
                        bit: entry[1],
                        name,
                    }
                })
                .collect();
            Extension::FeatureNameTable(entries)
        }
        EXT_BITMAPS => {
            if data.len() != 24 {
                return Err(invalid("bitmaps extension is not 24 bytes"));
            }
            let bitmaps = BitmapsExtension {
                nb_bitmaps: BigEndian::read_u32(&data[0..4]),
                reserved: BigEndian::read_u32(&data[4..8]),
                directory_size: BigEndian::read_u64(&data[8..16]),
                directory_offset: BigEndian::read_u64(&data[16..24]),
            };
            // qemu ignores (and later drops) the extension when the autoclear bit is clear.
            if header
                .autoclear_features
                .contains(AutoclearFeatures::BITMAPS)
            {
                if bitmaps.reserved != 0 {
                    return Err(invalid("bitmaps extension reserved field is not zero"));
                }
                if bitmaps.nb_bitmaps == 0 || bitmaps.nb_bitmaps > MAX_BITMAPS {
                    return Err(invalid("bitmap count outside 1..=65535"));
                }
                if bitmaps.directory_size > MAX_BITMAP_DIRECTORY_SIZE {
                    return Err(invalid("bitmap directory too large"));
                }
                if bitmaps.directory_offset % header.cluster_size() != 0 {
                    return Err(invalid("bitmap directory offset not cluster-aligned"));
                }
            }
            Extension::Bitmaps(bitmaps)
        }
        EXT_CRYPTO_HEADER => {
            if data.len() != 16 {
                return Err(invalid("encryption header pointer is not 16 bytes"));
            }
            if header.crypt_method != 2 {
                return Err(invalid("encryption header pointer without LUKS encryption"));
            }
            let offset = BigEndian::read_u64(&data[0..8]);
            if offset % header.cluster_size() != 0 {
                return Err(invalid("encryption header offset not cluster-aligned"));
            }
            Extension::CryptoHeader {
                offset,
                length: BigEndian::read_u64(&data[8..16]),
            }
        }
        EXT_DATA_FILE => Extension::ExternalDataFile(
            text(data).ok_or_else(|| invalid("data file name is not text"))?,
        ),
        _ => Extension::Unknown {
            kind,
            data: data.to_vec(),
        },
    })
}

/// Appends the encoded extensions and the end marker to `out`.
pub fn encode_extensions(extensions: &[Extension], out: &mut Vec<u8>) {
    for extension in extensions {
        let data = extension.data();
        let mut prefix = [0u8; 8];
        BigEndian::write_u32(&mut prefix[0..4], extension.kind());
        BigEndian::write_u32(&mut prefix[4..8], data.len() as u32);
        out.extend_from_slice(&prefix);
        out.extend_from_slice(&data);
        out.resize(out.len().next_multiple_of(8), 0);
    }
    out.extend_from_slice(&[0u8; 8]);
}

fn slice(bytes: &[u8], offset: u64, len: u64) -> Result<&[u8], Qcow2Error> {
    let end = offset.saturating_add(len);
    usize::try_from(end)
        .ok()
        .and_then(|end| bytes.get(offset as usize..end))
        .ok_or(Qcow2Error::Truncated {
            len: bytes.len(),
            needed: usize::try_from(end).unwrap_or(usize::MAX),
        })
}

/// A name stored without NUL: must be UTF-8 and contain no NUL byte.
fn text(data: &[u8]) -> Option<String> {
    if data.contains(&0) {
        return None;
    }
    String::from_utf8(data.to_vec()).ok()
}
