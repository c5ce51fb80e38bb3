//! [`Fingerprint`]: a cheap identity of an image file, to notice a base modified under its
//! clones: size, modification time (ns) and a CRC-32 of the format's metadata (qcow2: cluster 0
//! and the L1 table; VDI: header and block map; raw: the first and last 64 KiB). A full SHA-256
//! ([`sha256_file`]) is computed on request.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use imagefmt::image::ImageHeader;
use imagefmt::io::Backend;
use imagefmt::ImageFormat;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::error::{RegistryError, Result};

/// Bytes hashed from each end of a raw image.
const RAW_SAMPLE: u64 = 64 << 10;
/// Most bytes hashed from one metadata region (a hostile header cannot make us read more).
const MAX_REGION: u64 = 64 << 20;
/// Read chunk for hashing.
const CHUNK: usize = 1 << 20;

/// Size, mtime and metadata checksum of an image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Fingerprint {
    /// File length in bytes.
    pub size: u64,
    /// Modification time, nanoseconds since the Unix epoch.
    pub mtime_ns: i64,
    /// CRC-32 of the metadata regions, in order.
    pub metadata_crc32: u32,
}

impl Fingerprint {
    /// What differs from `recorded`, e.g. `size 1048576 -> 2097152, metadata crc32 …`; `None`
    /// if nothing.
    pub fn changes_since(&self, recorded: &Fingerprint) -> Option<String> {
        let mut changes = Vec::new();
        if self.size != recorded.size {
            changes.push(format!("size {} -> {}", recorded.size, self.size));
        }
        if self.mtime_ns != recorded.mtime_ns {
            changes.push(format!(
                "mtime {} -> {}",
                show_ns(recorded.mtime_ns),
                show_ns(self.mtime_ns)
            ));
        }
        if self.metadata_crc32 != recorded.metadata_crc32 {
            changes.push(format!(
                "metadata crc32 {:08x} -> {:08x}",
                recorded.metadata_crc32, self.metadata_crc32
            ));
        }
        (!changes.is_empty()).then(|| changes.join(", "))
    }
}

fn show_ns(ns: i64) -> String {
    format!(
        "{}.{:09}",
        ns.div_euclid(1_000_000_000),
        ns.rem_euclid(1_000_000_000)
    )
}

/// Fingerprints the image at `path`, read as `format`.
pub fn fingerprint(path: &Path, format: ImageFormat) -> Result<Fingerprint> {
    let file =
        File::open(path).map_err(RegistryError::io(format!("opening {}", path.display())))?;
    let meta = file.metadata().map_err(RegistryError::io(format!(
        "reading metadata of {}",
        path.display()
    )))?;
    let size = meta.len();
    let header = ImageHeader::read_as(&file, format, path).map_err(RegistryError::image(
        format!("reading the header of {}", path.display()),
    ))?;
    let mut hasher = crc32fast::Hasher::new();
    for (offset, len) in metadata_regions(&header, size) {
        hash_range(&file, offset, len, path, |bytes| hasher.update(bytes))?;
    }
    Ok(Fingerprint {
        size,
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
        metadata_crc32: hasher.finalize(),
    })
}

/// (offset, length) of the regions whose bytes make up the metadata checksum, clamped to the
/// file.
fn metadata_regions(header: &ImageHeader, file_len: u64) -> Vec<(u64, u64)> {
    let regions = match header {
        ImageHeader::Qcow2(cluster) => {
            let h = &cluster.header;
            vec![
                (0, 1u64 << h.cluster_bits.min(21)),
                (h.l1_table_offset, u64::from(h.l1_size) * 8),
            ]
        }
        ImageHeader::Vdi(h) => vec![
            (0, imagefmt::vdi::HEADER_REGION_LEN as u64),
            (u64::from(h.offset_blocks), h.block_map_len_bytes()),
        ],
        ImageHeader::Raw { .. } => vec![
            (0, RAW_SAMPLE),
            (file_len.saturating_sub(RAW_SAMPLE), RAW_SAMPLE),
        ],
    };
    regions
        .into_iter()
        .map(|(offset, len)| {
            let offset = offset.min(file_len);
            (offset, len.min(MAX_REGION).min(file_len - offset))
        })
        .collect()
}

fn hash_range(
    file: &File,
    offset: u64,
    len: u64,
    path: &Path,
    mut update: impl FnMut(&[u8]),
) -> Result<()> {
    let mut buf = vec![0u8; CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let want = (len - done).min(buf.len() as u64) as usize;
        let got = file
            .read_prefix_at(&mut buf[..want], offset + done)
            .map_err(RegistryError::io(format!("reading {}", path.display())))?;
        if got == 0 {
            break;
        }
        update(&buf[..got]);
        done += got as u64;
    }
    Ok(())
}

/// SHA-256 of the whole file at `path`, as lowercase hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let file =
        File::open(path).map_err(RegistryError::io(format!("opening {}", path.display())))?;
    let len = file
        .metadata()
        .map_err(RegistryError::io(format!(
            "reading metadata of {}",
            path.display()
        )))?
        .len();
    let mut hasher = Sha256::new();
    hash_range(&file, 0, len, path, |bytes| hasher.update(bytes))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn a_metadata_change_changes_the_crc_and_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b.qcow2");
        imagefmt::Qcow2Builder::new(&path)
            .size(1 << 20)
            .create()
            .unwrap();
        let before = fingerprint(&path, ImageFormat::Qcow2).unwrap();
        assert_eq!(before, fingerprint(&path, ImageFormat::Qcow2).unwrap());
        assert_eq!(before.changes_since(&before), None);
        // Write into the L1 table's cluster region (cluster 0 here: a header field area).
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        FileExt::write_all_at(&file, &[0xAB], 500).unwrap();
        let after = fingerprint(&path, ImageFormat::Qcow2).unwrap();
        let changes = after.changes_since(&before).unwrap();
        assert!(changes.contains("metadata crc32"), "{changes}");
        assert_eq!(after.size, before.size);
    }

    #[test]
    fn sha256_of_a_known_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("abc");
        std::fs::write(&path, b"abc").unwrap();
        assert_eq!(
            sha256_file(&path).unwrap(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
