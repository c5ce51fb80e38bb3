//! Cluster 0 as a whole: fixed header, extension area and backing file name.
//!
//! This is the unit qemu rewrites when it changes a backing file (`qcow2_update_header`), and the
//! unit an overlay creator writes. [`HeaderCluster::parse`] decodes and bounds-checks all three
//! parts; [`HeaderCluster::to_bytes`] lays them out as qemu does: header, extensions, end
//! marker, then the backing name right after the marker.

use super::error::Qcow2Error;
use super::extensions::{
    encode_extensions, extension_area_end, feature_table_for_refusal, parse_extensions, Extension,
};
use super::features::{name_incompatible, IncompatibleFeatures};
use super::header::{Header, Version};
use crate::io::Backend;

/// Bytes of cluster 0 read first; more only if the extension area needs it.
const PREFIX_READ: u64 = 4096;

/// The decoded contents of a qcow2 image's first cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderCluster {
    /// The fixed header. Its backing-name offset and size are recomputed by [`Self::to_bytes`].
    pub header: Header,
    /// Header extensions in file order.
    pub extensions: Vec<Extension>,
    /// The backing file name exactly as stored (untrusted: resolve it through
    /// [`crate::backing`] before opening anything).
    pub backing_file: Option<String>,
}

impl HeaderCluster {
    /// Decodes cluster 0 from the start of the file. `bytes` may be shorter than a cluster if the
    /// file is; anything the header points at must be inside `bytes`.
    pub fn parse(bytes: &[u8]) -> Result<Self, Qcow2Error> {
        let header = Header::parse(bytes).map_err(|e| name_unsupported_features(e, bytes))?;
        let (extensions, _) = parse_extensions(bytes, &header)?;
        // An empty name means no backing file, as qemu reads it.
        let backing_file = if header.backing_file_offset != 0 && header.backing_file_size != 0 {
            let start = header.backing_file_offset as usize;
            let end = start + header.backing_file_size as usize; // both ≤ cluster size (validated)
            let raw = bytes.get(start..end).ok_or(Qcow2Error::Truncated {
                len: bytes.len(),
                needed: end,
            })?;
            if raw.contains(&0) {
                return Err(Qcow2Error::BackingFileNameInvalid);
            }
            Some(String::from_utf8(raw.to_vec()).map_err(|_| Qcow2Error::BackingFileNameInvalid)?)
        } else {
            None
        };
        let cluster = Self {
            header,
            extensions,
            backing_file,
        };
        cluster.validate_data_file()?;
        Ok(cluster)
    }

    /// Reads and decodes cluster 0 of an image. Reads at most one cluster (≤ 2 MiB).
    pub fn read_from<B: Backend + ?Sized>(backend: &B) -> Result<Self, crate::Error> {
        // First the fixed header: 112 bytes, or header_length if a v3 header says it is longer
        // (bounded by the cluster size, which Header::parse checks before asking for more).
        let mut want = super::header::V3_HEADER_LEN as usize;
        let header = loop {
            let mut start = vec![0u8; want];
            let got = backend
                .read_prefix_at(&mut start, 0)
                .map_err(crate::Error::reading("qcow2 header"))?;
            match Header::parse(&start[..got]) {
                Err(Qcow2Error::Truncated { needed, .. }) if got == want && needed > want => {
                    want = needed
                }
                Err(e @ Qcow2Error::UnsupportedIncompatibleFeatures { .. }) => {
                    return Err(Self::name_features_from(backend, &start[..got], e).into())
                }
                result => break result?,
            }
        };
        let area_end = extension_area_end(&header);
        let name_end = header.backing_file_offset + u64::from(header.backing_file_size);
        let wanted = area_end
            .max(name_end)
            .max(header.encoded_len() as u64)
            .min(header.cluster_size());
        // Extensions and name almost always sit in the first 4 KiB: read that first, and the
        // rest of the area only if parsing needs it (a base's area runs to the cluster's end).
        let first = wanted.min(PREFIX_READ.max(name_end).max(header.encoded_len() as u64));
        for len in [first, wanted] {
            let mut cluster0 = vec![0u8; len as usize];
            let got = backend
                .read_prefix_at(&mut cluster0, 0)
                .map_err(crate::Error::reading("qcow2 header cluster"))?;
            cluster0.truncate(got);
            match Self::parse(&cluster0) {
                Err(Qcow2Error::Truncated { .. }) if got as u64 == len && len < wanted => continue,
                result => return Ok(result?),
            }
        }
        unreachable!("the second pass reads the whole area")
    }

    /// Names the features of an unsupported-features error from the feature-name table of the
    /// image on `backend`, whose fixed header is `start` (reads at most the first cluster; a
    /// read failure names nothing).
    fn name_features_from<B: Backend + ?Sized>(
        backend: &B,
        start: &[u8],
        e: Qcow2Error,
    ) -> Qcow2Error {
        let Ok(header) = Header::parse_fields(start) else {
            return e;
        };
        let len = extension_area_end(&header).min(header.cluster_size()) as usize;
        let mut cluster0 = vec![0u8; len];
        match backend.read_prefix_at(&mut cluster0, 0) {
            Ok(got) => name_unsupported_features(e, &cluster0[..got]),
            Err(_) => e,
        }
    }

    /// The backing file format recorded in the backing-format extension, if any.
    pub fn backing_format(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            Extension::BackingFormat(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// The external data file name, if any.
    pub fn data_file(&self) -> Option<&str> {
        self.extensions.iter().find_map(|e| match e {
            Extension::ExternalDataFile(name) => Some(name.as_str()),
            _ => None,
        })
    }

    /// FORMATS.md §1.10 item 9: the raw-external bit needs the data-file bit.
    fn validate_data_file(&self) -> Result<(), Qcow2Error> {
        let data_file_bit = self
            .header
            .incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
        let raw_external = self
            .header
            .autoclear_features
            .contains(super::features::AutoclearFeatures::RAW_EXTERNAL);
        if raw_external && !data_file_bit {
            return Err(Qcow2Error::InconsistentDataFile);
        }
        Ok(())
    }

    /// Encodes cluster 0 up to the end of the backing file name (the rest of the cluster is
    /// zero). Fills in `backing_file_offset`/`backing_file_size` and checks that everything fits
    /// in the first cluster and that the header itself is valid.
    pub fn to_bytes(&self) -> Result<Vec<u8>, Qcow2Error> {
        let mut header = self.header.clone();
        if header.version == Version::V3 && header.header_length % 8 != 0 {
            return Err(Qcow2Error::HeaderLengthUnaligned {
                found: header.header_length,
            });
        }
        let mut out = header.to_bytes();
        encode_extensions(&self.extensions, &mut out);
        match &self.backing_file {
            Some(name) => {
                let name_len = name.len() as u64;
                if name_len > super::MAX_BACKING_FILE_NAME {
                    return Err(Qcow2Error::BackingFileNameTooLong {
                        size: u32::try_from(name_len).unwrap_or(u32::MAX),
                        max: super::MAX_BACKING_FILE_NAME,
                    });
                }
                if name.as_bytes().contains(&0) {
                    return Err(Qcow2Error::BackingFileNameInvalid);
                }
                header.backing_file_offset = out.len() as u64;
                header.backing_file_size = name_len as u32;
                out.extend_from_slice(name.as_bytes());
            }
            None => {
                header.backing_file_offset = 0;
                header.backing_file_size = 0;
            }
        }
        let cluster_size = header.cluster_size();
        if out.len() as u64 > cluster_size {
            return Err(Qcow2Error::HeaderClusterOverflow {
                needed: out.len() as u64,
                cluster_size,
            });
        }
        header.validate()?;
        let fixed = header.to_bytes();
        out[..fixed.len()].copy_from_slice(&fixed);
        Ok(out)
    }
}

/// Fills in the names of an unsupported-features error from the feature-name table in
/// `cluster0` (the start of the image); any other error is returned as it is.
fn name_unsupported_features(e: Qcow2Error, cluster0: &[u8]) -> Qcow2Error {
    let Qcow2Error::UnsupportedIncompatibleFeatures { bits, .. } = e else {
        return e;
    };
    // The bounds the table walk needs (backing name inside cluster 0) were checked before the
    // feature bits; a header that does not decode names nothing.
    let Ok(header) = Header::parse_fields(cluster0) else {
        return e;
    };
    let table = feature_table_for_refusal(cluster0, &header);
    let (names, unnamed) = name_incompatible(&table, bits);
    Qcow2Error::UnsupportedIncompatibleFeatures {
        bits,
        names,
        unnamed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qcow2::extensions::{EXT_BACKING_FORMAT, EXT_FEATURE_TABLE};
    use crate::qcow2::features::FeatureKind;
    use crate::qcow2::header::tests::qemu_overlay_header;

    /// Cluster 0 of qemu-img 7.2's overlay up to the end of the backing name (FORMATS.md §1.9).
    fn qemu_overlay_cluster0() -> Vec<u8> {
        let mut b = qemu_overlay_header(); // 0x000 fixed header, 112 bytes
        b.extend_from_slice(&EXT_BACKING_FORMAT.to_be_bytes()); // 0x070 ext: backing format
        b.extend_from_slice(&5u32.to_be_bytes()); //                  length 5
        b.extend_from_slice(b"qcow2\0\0\0"); //                      "qcow2" + 3 bytes padding
        b.extend_from_slice(&EXT_FEATURE_TABLE.to_be_bytes()); // 0x080 ext: feature-name table
        b.extend_from_slice(&0x180u32.to_be_bytes()); //             8 entries × 48 bytes
        for (kind, bit, name) in [
            (0u8, 0u8, "dirty bit"),
            (0, 1, "corrupt bit"),
            (0, 2, "external data file"),
            (0, 3, "compression type"),
            (0, 4, "extended L2 entries"),
            (1, 0, "lazy refcounts"),
            (2, 0, "bitmaps"),
            (2, 1, "raw external data"),
        ] {
            b.push(kind); //                                         entry type
            b.push(bit); //                                          bit number
            let mut padded = [0u8; 46]; //                           name, zero-padded
            padded[..name.len()].copy_from_slice(name.as_bytes());
            b.extend_from_slice(&padded);
        }
        b.extend_from_slice(&[0; 8]); // 0x208 end-of-extensions marker
        b.extend_from_slice(b"base.qcow2"); // 0x210 backing file name, no NUL
        assert_eq!(b.len(), 0x21a);
        b
    }

    #[test]
    fn qemu_overlay_cluster0_decodes_and_reencodes_byte_for_byte() {
        let bytes = qemu_overlay_cluster0();
        let cluster = HeaderCluster::parse(&bytes).unwrap();
        assert_eq!(cluster.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(cluster.backing_format(), Some("qcow2"));
        let Extension::FeatureNameTable(table) = &cluster.extensions[1] else {
            panic!(
                "second extension is not the feature table: {:?}",
                cluster.extensions[1]
            );
        };
        assert_eq!(table.len(), 8);
        assert_eq!(table[5].kind, FeatureKind::Compatible);
        assert_eq!(table[5].name_lossy(), "lazy refcounts");
        assert_eq!(cluster.to_bytes().unwrap(), bytes);
    }

    #[test]
    fn our_overlay_plan_writes_exactly_qemus_cluster0() {
        let backing = crate::qcow2::create::BackingReference {
            name: "base.qcow2".into(),
            format: "qcow2".into(),
        };
        let (cluster, _) =
            crate::qcow2::create::plan(1 << 30, &Default::default(), Some(&backing)).unwrap();
        assert_eq!(cluster.to_bytes().unwrap(), qemu_overlay_cluster0());
    }

    #[test]
    fn unknown_extensions_survive_a_rewrite() {
        let mut cluster = HeaderCluster::parse(&qemu_overlay_cluster0()).unwrap();
        cluster.extensions.insert(
            1,
            Extension::Unknown {
                kind: 0x1234_5678,
                data: vec![1, 2, 3],
            },
        );
        let bytes = cluster.to_bytes().unwrap();
        let reread = HeaderCluster::parse(&bytes).unwrap();
        assert_eq!(reread.extensions, cluster.extensions);
        assert_eq!(reread.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(reread.header.backing_file_offset, 0x210 + 16); // 8-byte prefix + data padded to 8
    }

    #[test]
    fn an_extension_running_past_the_backing_name_is_refused() {
        let mut bytes = qemu_overlay_cluster0();
        bytes[0x84..0x88].copy_from_slice(&0x190u32.to_be_bytes()); // feature table 16 bytes longer
        assert!(matches!(
            HeaderCluster::parse(&bytes),
            Err(Qcow2Error::ExtensionTooLarge {
                kind: EXT_FEATURE_TABLE,
                offset: 0x80,
                end: 0x210
            })
        ));
        bytes[0x84..0x88].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            HeaderCluster::parse(&bytes),
            Err(Qcow2Error::ExtensionTooLarge { .. })
        ));
    }

    #[test]
    fn a_repeated_known_extension_counts_once_as_its_last_copy_and_a_malformed_one_is_refused() {
        let mut cluster = HeaderCluster::parse(&qemu_overlay_cluster0()).unwrap();
        let before = cluster.extensions.len();
        cluster
            .extensions
            .push(Extension::BackingFormat("raw".into()));
        let bytes = cluster.to_bytes().unwrap();
        let parsed = HeaderCluster::parse(&bytes).unwrap();
        assert_eq!(parsed.backing_format(), Some("raw"));
        assert_eq!(parsed.extensions.len(), before);

        let mut long_format = qemu_overlay_cluster0();
        long_format[0x74..0x78].copy_from_slice(&16u32.to_be_bytes());
        assert!(matches!(
            HeaderCluster::parse(&long_format),
            Err(Qcow2Error::InvalidExtension {
                kind: EXT_BACKING_FORMAT,
                ..
            })
        ));

        let mut ragged_table = qemu_overlay_cluster0();
        ragged_table[0x84..0x88].copy_from_slice(&0x17fu32.to_be_bytes());
        assert!(matches!(
            HeaderCluster::parse(&ragged_table),
            Err(Qcow2Error::InvalidExtension {
                kind: EXT_FEATURE_TABLE,
                ..
            })
        ));
    }

    #[test]
    fn backing_names_with_nul_or_past_the_end_of_the_input_are_refused() {
        let mut nul = qemu_overlay_cluster0();
        nul[0x214] = 0;
        assert_eq!(
            HeaderCluster::parse(&nul),
            Err(Qcow2Error::BackingFileNameInvalid)
        );
        let short = &qemu_overlay_cluster0()[..0x215];
        assert!(matches!(
            HeaderCluster::parse(short),
            Err(Qcow2Error::Truncated { .. })
        ));
    }

    #[test]
    fn an_empty_backing_name_means_no_backing_file_as_in_qemu() {
        let mut bytes = qemu_overlay_cluster0();
        bytes[16..20].copy_from_slice(&0u32.to_be_bytes()); // backing_file_size 0, offset kept
        assert_eq!(HeaderCluster::parse(&bytes).unwrap().backing_file, None);
    }

    #[test]
    fn raw_external_data_without_the_data_file_bit_is_refused() {
        let mut bytes = qemu_overlay_cluster0();
        bytes[88..96].copy_from_slice(&2u64.to_be_bytes());
        assert_eq!(
            HeaderCluster::parse(&bytes),
            Err(Qcow2Error::InconsistentDataFile)
        );
    }

    #[test]
    fn names_too_long_for_qemu_or_the_cluster_are_refused_when_writing() {
        let mut cluster = HeaderCluster::parse(&qemu_overlay_cluster0()).unwrap();
        cluster.backing_file = Some("x".repeat(1024));
        assert!(matches!(
            cluster.to_bytes(),
            Err(Qcow2Error::BackingFileNameTooLong { size: 1024, .. })
        ));
        // 512-byte clusters: header + feature table + end marker leave no room for the name.
        cluster.header.cluster_bits = 9;
        cluster.header.l1_size = 1 << 15;
        cluster.header.l1_table_offset = 0x600;
        cluster.header.refcount_table_offset = 0x200;
        cluster.backing_file = Some("b".repeat(100));
        assert!(matches!(
            cluster.to_bytes(),
            Err(Qcow2Error::HeaderClusterOverflow {
                cluster_size: 512,
                ..
            })
        ));
    }

    #[test]
    fn read_from_a_backend_reads_only_cluster0() {
        let backend = crate::io::MemBackend::new(qemu_overlay_cluster0());
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        assert_eq!(cluster.backing_file.as_deref(), Some("base.qcow2"));
    }
}
