//! Cluster 0 as a whole: fixed header, extension area and backing file name.
//!
//! This is the unit qemu rewrites when it changes a backing file (`qcow2_update_header`), and the
//! unit an overlay creator writes. [`HeaderCluster::parse`] decodes and bounds-checks all three
//! parts; [`HeaderCluster::to_bytes`] lays them out as qemu does: header, extensions, end
//! marker, then the backing name right after the marker.

use super::error::Qcow2Error;
use super::extensions::{encode_extensions, extension_area_end, parse_extensions, Extension};
use super::features::IncompatibleFeatures;
use super::header::{Header, Version};
use crate::io::Backend;

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
        let header = Header::parse(bytes)?;
        let (extensions, _) = parse_extensions(bytes, &header)?;
        let backing_file = if header.backing_file_offset != 0 {
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
        let mut start = [0u8; super::header::V3_HEADER_LEN as usize];
        let got = backend
            .read_prefix_at(&mut start, 0)
            .map_err(crate::Error::reading("qcow2 header"))?;
        let header = Header::parse(&start[..got])?;
        let area_end = extension_area_end(&header);
        let name_end = header.backing_file_offset + u64::from(header.backing_file_size);
        let wanted = area_end.max(name_end).min(header.cluster_size());
        let mut cluster0 = vec![0u8; wanted as usize];
        let got = backend
            .read_prefix_at(&mut cluster0, 0)
            .map_err(crate::Error::reading("qcow2 header cluster"))?;
        cluster0.truncate(got);
        Ok(Self::parse(&cluster0)?)
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
