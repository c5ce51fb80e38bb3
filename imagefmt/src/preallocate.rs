//! Preallocation (`-o preallocation=off|metadata|falloc|full`, `resize --preallocation`): what
//! a new image, or the part a resize adds, gets allocated up front.
//!
//! | mode       | qcow2                                              | raw                    |
//! |------------|----------------------------------------------------|------------------------|
//! | `off`      | nothing                                            | nothing (sparse)       |
//! | `metadata` | L2 tables and refcounts for every cluster; data    | refused, as qemu does  |
//! |            | clusters allocated over a sparse file region       |                        |
//! | `falloc`   | as `metadata`, data clusters reserved (fallocate)  | fallocate              |
//! | `full`     | as `metadata`, data clusters written with zeros    | zeros written          |
//!
//! The qcow2 half lives with the writer ([`crate::qcow2::image::Qcow2Image::preallocate`]);
//! this file holds the mode and the host-file step both formats share ([`fill_host`]).

use crate::io::Backend;
use crate::qcow2::Qcow2Error;
use crate::{Error, Result};

/// What qemu's file driver writes of a new, otherwise sparse file (its first block).
const FIRST_BLOCK: u64 = 4096;

/// A preallocation mode, qemu's `PreallocMode` without `off`'s aliases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    /// `off` (default).
    #[default]
    Off,
    /// `metadata` (qcow2 only): tables and refcounts for every cluster, no data.
    Metadata,
    /// `falloc`: space reserved with `fallocate`, nothing written.
    Falloc,
    /// `full`: zeros written.
    Full,
}

impl Preallocation {
    /// Parses qemu's spelling (`off`, `metadata`, `falloc`, `full`). `metadata` is refused
    /// unless `metadata_ok` (qcow2), with qemu's wording for raw.
    pub fn parse(value: &str, metadata_ok: bool) -> Result<Self> {
        let invalid = |reason: &'static str| {
            Error::from(Qcow2Error::InvalidOption {
                option: "preallocation",
                value: value.to_owned(),
                reason,
            })
        };
        match value {
            "off" => Ok(Self::Off),
            "metadata" if metadata_ok => Ok(Self::Metadata),
            "metadata" => Err(invalid("Unsupported preallocation mode: metadata")),
            "falloc" => Ok(Self::Falloc),
            "full" => Ok(Self::Full),
            _ => Err(invalid("expected off, metadata (qcow2), falloc or full")),
        }
    }

    /// qemu's name of the mode.
    pub fn name(self) -> &'static str {
        match self {
            Self::Off => "off",
            Self::Metadata => "metadata",
            Self::Falloc => "falloc",
            Self::Full => "full",
        }
    }
}

/// Gives host bytes `offset..offset + len` of `backend` backing store as `mode` asks, extending
/// the file if it ends before them: `falloc` reserves them (`fallocate`; zeros written where the
/// backend has no file descriptor or the file system cannot), `full` writes zeros, `off` and
/// `metadata` only set the length (a sparse region).
pub fn fill_host<B: Backend + ?Sized>(
    backend: &B,
    offset: u64,
    len: u64,
    mode: Preallocation,
) -> Result<()> {
    let end = offset.checked_add(len).ok_or(Error::InvalidParameter {
        name: "preallocation",
        reason: "the region ends past the largest file offset",
    })?;
    let grow = |backend: &B| -> Result<()> {
        if backend
            .len()
            .map_err(Error::io("reading the file length"))?
            < end
        {
            backend
                .set_len(end)
                .map_err(Error::writing("preallocated file length"))?;
        }
        Ok(())
    };
    match mode {
        Preallocation::Off | Preallocation::Metadata => grow(backend),
        Preallocation::Falloc => {
            let reserved = backend.as_fd().is_some_and(|fd| {
                rustix::fs::fallocate(fd, rustix::fs::FallocateFlags::empty(), offset, len).is_ok()
            });
            if reserved {
                grow(backend)
            } else {
                crate::io::write_zeros(backend, offset, len, "preallocated zeros")
            }
        }
        Preallocation::Full => crate::io::write_zeros(backend, offset, len, "preallocated zeros"),
    }
}

/// Lays out a new raw image of `size` bytes on an empty `backend` as qemu's file driver creates
/// one: sparse (`off`) with its first 4 KiB written, so that the first block is allocated as
/// qemu allocates it; reserved (`falloc`) or written (`full`) throughout. `metadata` is refused.
pub fn new_raw<B: Backend + ?Sized>(backend: &B, size: u64, mode: Preallocation) -> Result<()> {
    match mode {
        Preallocation::Metadata => Preallocation::parse("metadata", false).map(drop),
        Preallocation::Off => {
            backend
                .set_len(size)
                .map_err(Error::writing("raw image length"))?;
            crate::io::write_zeros(backend, 0, size.min(FIRST_BLOCK), "preallocated zeros")
        }
        Preallocation::Falloc | Preallocation::Full => fill_host(backend, 0, size, mode),
    }
}

/// Lays out a new external data file of a qcow2 disk of `size` bytes on an empty `backend`, as
/// qemu-img leaves it after creating the image with preallocation `mode`. qemu creates the file
/// empty, then maps every cluster (unless `off`): the copy on write of the last, partly covered
/// cluster (subcluster, with extended L2 entries: `cow_granularity`) writes zeros from `size` to
/// its end, which also makes the file longer than the disk. Only a file still shorter than the
/// disk is then grown to it as [`new_raw`] grows a raw image, `metadata` as `off`.
pub fn new_data_file<B: Backend + ?Sized>(
    backend: &B,
    size: u64,
    mode: Preallocation,
    cow_granularity: u64,
) -> Result<()> {
    let tail_end = size
        .checked_next_multiple_of(cow_granularity.max(1))
        .ok_or(Error::InvalidParameter {
            name: "preallocation",
            reason: "the region ends past the largest file offset",
        })?;
    match mode {
        Preallocation::Off => new_raw(backend, size, mode),
        _ if tail_end > size => {
            crate::io::write_zeros(backend, size, tail_end - size, "preallocated zeros")
        }
        Preallocation::Metadata => new_raw(backend, size, Preallocation::Off),
        _ => new_raw(backend, size, mode),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_as_qemu_spells_them() {
        assert_eq!(
            Preallocation::parse("off", false).unwrap(),
            Preallocation::Off
        );
        assert_eq!(
            Preallocation::parse("metadata", true).unwrap(),
            Preallocation::Metadata
        );
        assert!(Preallocation::parse("metadata", false).is_err());
        assert!(Preallocation::parse("sometimes", true).is_err());
        for mode in ["off", "metadata", "falloc", "full"] {
            assert_eq!(Preallocation::parse(mode, true).unwrap().name(), mode);
        }
    }

    #[test]
    fn a_data_file_ends_with_the_last_clusters_copy_on_write_as_qemu_leaves_it() {
        // Cluster-aligned disk: grown as a raw image (first block written for off/metadata).
        let aligned = crate::io::MemBackend::default();
        new_data_file(&aligned, 1 << 20, Preallocation::Metadata, 1 << 16).unwrap();
        assert_eq!(aligned.to_vec().len(), 1 << 20);
        // A partly covered last cluster: zeros to its end, and nothing else.
        let tail = crate::io::MemBackend::default();
        new_data_file(&tail, 3_072_000, Preallocation::Full, 1 << 16).unwrap();
        assert_eq!(tail.to_vec().len(), 3_080_192);
        // No preallocation: just the disk's length.
        let off = crate::io::MemBackend::default();
        new_data_file(&off, 3_072_000, Preallocation::Off, 1 << 16).unwrap();
        assert_eq!(off.to_vec().len(), 3_072_000);
    }

    #[test]
    fn full_writes_zeros_and_off_only_extends() {
        let backend = crate::io::MemBackend::new(vec![7u8; 16]);
        fill_host(&backend, 8, 24, Preallocation::Full).unwrap();
        let bytes = backend.to_vec();
        assert_eq!(bytes.len(), 32);
        assert_eq!(&bytes[..8], &[7u8; 8]);
        assert!(bytes[8..].iter().all(|&b| b == 0));
        let sparse = crate::io::MemBackend::default();
        fill_host(&sparse, 0, 100, Preallocation::Off).unwrap();
        assert_eq!(sparse.to_vec(), vec![0u8; 100]);
        // falloc on memory (no descriptor) falls back to zeros.
        let mem = crate::io::MemBackend::new(vec![1u8; 4]);
        fill_host(&mem, 0, 4, Preallocation::Falloc).unwrap();
        assert_eq!(mem.to_vec(), vec![0u8; 4]);
    }
}
