//! `qemu-img map`: which guest ranges of an image chain hold data, zeros or nothing, which layer
//! provides them and where they are stored.
//!
//! The entries match `qemu-img map --output=json` of qemu 7.2 (`qemu-img.c` `get_block_status`,
//! `entry_mergeable`; `block/qcow2.c` `qcow2_co_block_status`; `block/io.c`
//! `bdrv_co_block_status`):
//!
//! ```text
//! per (sub)cluster, top layer first:
//!   data (normal cluster)          depth k, present, data,  offset = host offset
//!   data (compressed)              depth k, present, data,  no offset
//!   zero (plain / preallocated)    depth k, present, zero   (preallocated: offset = host offset)
//!   unallocated, layer below       ask the layer below (depth k + 1) ...
//!   unallocated, nothing below     depth k, not present, zero
//!     (or the range lies past the end of the layer below: same, at depth k)
//! adjacent entries merge when all flags, the depth and the file agree and offsets are contiguous
//! ```
//!
//! Raw layers map every byte as data at its own offset. qemu asks the file system for holes
//! (`SEEK_DATA`/`SEEK_HOLE`) and reports holes in a sparse raw file as zeros; the standard library
//! offers no safe way to ask, so this implementation reports raw files as data throughout —
//! identical to qemu for raw files without holes.

use std::fs::File;
use std::path::{Path, PathBuf};

use byteorder::{BigEndian, ByteOrder};
use serde::Serialize;

use crate::backing::{BackingPolicy, ChainGuard};
use crate::chain::ChainOptions;
use crate::detect::ImageFormat;
use crate::image::ImageHeader;
use crate::io::Backend;
use crate::qcow2::features::IncompatibleFeatures;
use crate::qcow2::header::{Header, Version};
use crate::qcow2::tables::{COMPRESSED, L1_OFFSET_MASK, L2_OFFSET_MASK, ZERO};
use crate::qcow2::Qcow2Error;
use crate::vdi::{BlockEntry, VdiImage};
use crate::{Error, Result};

/// One extent of `qemu-img map --output=json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    /// First guest byte.
    pub start: u64,
    /// Bytes in the extent.
    pub length: u64,
    /// Which layer provides the extent: 0 = the image itself, 1 = its backing file, …; for an
    /// extent no layer provides, the layer where the lookup stopped.
    pub depth: u64,
    /// True if the layer at `depth` provides the extent (allocated there).
    pub present: bool,
    /// True if the extent reads as zeros.
    pub zero: bool,
    /// True if the extent is stored as data.
    pub data: bool,
    /// Where the extent is stored in `filename`, when it is stored uncompressed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// The file holding the extent when `offset` is set (the path as the chain resolved it);
    /// empty otherwise. Not part of the JSON (qemu-img's human format prints it).
    #[serde(skip)]
    pub filename: String,
}

impl MapEntry {
    /// qemu-img's `entry_mergeable`: `next` continues this extent.
    pub fn mergeable(&self, next: &MapEntry) -> bool {
        self.length != 0
            && self.zero == next.zero
            && self.data == next.data
            && self.depth == next.depth
            && self.present == next.present
            && self.offset.is_some() == next.offset.is_some()
            && self.filename == next.filename
            && self
                .offset
                .zip(next.offset)
                .is_none_or(|(a, b)| a.checked_add(self.length) == Some(b))
    }
}

/// Maps the image at `path` (format by content, raw if unrecognised, unless `format` names it)
/// and the backing files `policy` lets it follow, like `qemu-img map --output=json`.
///
/// qcow2 images with an external data file are refused unless `options.allow_data_files` (the
/// data file is then resolved under the policy, opened and locked, and named as the file the
/// extents are mapped to, as qemu-img does). VDI layers map as qemu maps a VDI base
/// (an unwritten block of a base reads as present zeros); in a differencing image an unwritten
/// (FREE) block falls through to the parent, found as [`map_with`] says. Corrupt metadata that
/// qemu refuses at run time (unaligned offsets, zero clusters in a version 2 image, invalid
/// subcluster bitmaps) is an error, as it is for qemu-img.
pub fn map(
    path: &Path,
    format: Option<ImageFormat>,
    policy: &BackingPolicy,
) -> Result<Vec<MapEntry>> {
    map_with(path, format, &ChainOptions::new(policy))
}

/// [`map`] with VDI parents proposed by `options.vdi_parents` (verified by UUID).
pub fn map_with(
    path: &Path,
    format: Option<ImageFormat>,
    options: &ChainOptions<'_>,
) -> Result<Vec<MapEntry>> {
    let layers = open_layers(path, format, options)?;
    let mut mapper = Mapper {
        layers,
        l2_cache: None,
    };
    let size = mapper.layers[0].size;
    let mut out: Vec<MapEntry> = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        // qemu probes at most 1 GiB at a time; merging makes the chunking invisible.
        let want = (size - offset).min(1 << 30);
        let next = mapper.block_status(offset, want)?;
        offset += next.length;
        match out.last_mut() {
            Some(last) if last.mergeable(&next) => last.length += next.length,
            _ => out.push(next),
        }
    }
    Ok(out)
}

/// Writes `entries` as `qemu-img map` prints them by default: a table of the extents stored as
/// data (`Offset Length Mapped to File`). Like qemu-img, data without a host offset (compressed
/// clusters) is an error once it is reached; the rows before it have been written.
pub fn write_human(
    out: &mut dyn std::io::Write,
    entries: &[MapEntry],
) -> Result<(), HumanMapError> {
    writeln!(
        out,
        "{:<16}{:<16}{:<16}File",
        "Offset", "Length", "Mapped to"
    )?;
    for e in entries {
        let Some(host) = e.offset.filter(|_| e.data) else {
            if e.data {
                return Err(HumanMapError::NoOffset);
            }
            continue;
        };
        if !e.zero {
            writeln!(
                out,
                "{:<16}{:<16}{:<16}{}",
                hex(e.start),
                hex(e.length),
                hex(host),
                e.filename
            )?;
        }
    }
    Ok(())
}

/// Why the human map could not be written.
#[derive(Debug, thiserror::Error)]
pub enum HumanMapError {
    /// Data without a host offset (compressed clusters): qemu-img's human format cannot show it.
    #[error("File contains external, encrypted or compressed clusters.")]
    NoOffset,
    /// Writing the output failed.
    #[error("writing the map failed")]
    Io(#[from] std::io::Error),
}

/// C's `%#x`: `0` for zero, `0x…` otherwise.
fn hex(value: u64) -> String {
    if value == 0 {
        "0".to_owned()
    } else {
        format!("{value:#x}")
    }
}

/// One image of the chain.
struct Layer {
    /// Guest size as qemu's block layer sees it (whole 512-byte sectors).
    size: u64,
    /// The path, for `MapEntry::filename` (a qcow2 image's external data file, if it has one).
    filename: String,
    kind: LayerKind,
    /// The external data file, held open (and locked) while the chain is mapped.
    _data_file: Option<File>,
}

enum LayerKind {
    Raw,
    Qcow2 {
        file: File,
        header: Header,
        /// L1 entries present in the file (the rest read as zero, like qemu).
        l1: Vec<u64>,
        file_len: u64,
    },
    /// A VDI image (its block map validated on open).
    Vdi(Box<VdiImage<File>>),
}

fn open_layers(
    path: &Path,
    format: Option<ImageFormat>,
    options: &ChainOptions<'_>,
) -> Result<Vec<Layer>> {
    let policy = options.policy;
    let mut guard = ChainGuard::default();
    let mut layers = Vec::new();
    let mut next: Option<(PathBuf, Option<ImageFormat>)> = Some((path.to_owned(), format));
    let mut top = true;
    while let Some((path, format)) = next.take() {
        let file = crate::open::open_image(&path, options.open_how())?;
        let meta = file
            .metadata()
            .map_err(Error::io(format!("reading metadata of {}", path.display())))?;
        guard.enter(&path, &meta)?;
        let header = match format {
            Some(format) => ImageHeader::read_as(&file, format, &path)?,
            None => ImageHeader::read_detected(&file, &path, top)?,
        };
        top = false;
        let filename = path.to_string_lossy().into_owned();
        match header {
            ImageHeader::Raw { len } => layers.push(Layer {
                size: len.next_multiple_of(512),
                filename,
                kind: LayerKind::Raw,
                _data_file: None,
            }),
            ImageHeader::Vdi(header) => {
                if header.is_differencing() && *policy != BackingPolicy::Detach {
                    let parent =
                        crate::vdi::find_parent(&path, &header, policy, options.vdi_resolver())?;
                    next = Some((parent, Some(ImageFormat::Vdi)));
                }
                layers.push(Layer {
                    size: header.virtual_size(),
                    filename,
                    kind: LayerKind::Vdi(Box::new(VdiImage::open(file, *header, None)?)),
                    _data_file: None,
                });
            }
            ImageHeader::Qcow2(cluster) => {
                let header = cluster.header.clone();
                let mut filename = filename;
                let mut data_file = None;
                if header
                    .incompatible_features
                    .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
                {
                    let name = cluster.data_file().unwrap_or_default();
                    if !options.allow_data_files {
                        return Err(Qcow2Error::ExternalDataFileRefused {
                            name: name.to_owned(),
                        }
                        .into());
                    }
                    let data_path = policy.resolve(&path, name)?;
                    data_file = Some(crate::open::open_image(&data_path, options.open_how())?);
                    filename = data_path.to_string_lossy().into_owned();
                }
                let file_len = file.len().map_err(Error::reading("qcow2 file length"))?;
                let l1 = read_l1(&file, &header, file_len)?;
                if let Some(name) = cluster.backing_file.as_deref() {
                    if *policy != BackingPolicy::Detach {
                        let backing = policy.resolve(&path, name)?;
                        let format = cluster.backing_format().map(str::parse).transpose()?;
                        next = Some((backing, format));
                    }
                }
                layers.push(Layer {
                    size: header.size / 512 * 512,
                    filename,
                    kind: LayerKind::Qcow2 {
                        file,
                        header,
                        l1,
                        file_len,
                    },
                    _data_file: data_file,
                });
            }
        }
    }
    Ok(layers)
}

/// The L1 entries that lie inside the file (≤ 32 MiB by the header checks, and only what the
/// file holds).
fn read_l1(file: &File, header: &Header, file_len: u64) -> Result<Vec<u64>> {
    let entries = file_len
        .saturating_sub(header.l1_table_offset)
        .div_ceil(8)
        .min(u64::from(header.l1_size));
    let mut raw = vec![0u8; entries as usize * 8];
    read_padded(
        file,
        &mut raw,
        header.l1_table_offset,
        file_len,
        "qcow2 L1 table",
    )?;
    Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
}

/// Reads at `offset`; bytes past the end of the file read as zeros.
fn read_padded(
    file: &File,
    buf: &mut [u8],
    offset: u64,
    file_len: u64,
    what: &'static str,
) -> Result<()> {
    let available = file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
    let (head, tail) = buf.split_at_mut(available);
    if !head.is_empty() {
        file.read_exact_at(head, offset)
            .map_err(Error::reading(what))?;
    }
    tail.fill(0);
    Ok(())
}

/// One layer's answer for a range (qemu's block status flags).
struct Status {
    length: u64,
    data: bool,
    zero: bool,
    offset: Option<u64>,
}

struct Mapper {
    layers: Vec<Layer>,
    /// (layer, L2 offset, table): lookups walk tables in order, so one table is enough.
    l2_cache: Option<(usize, u64, Vec<u8>)>,
}

impl Mapper {
    /// qemu-img's `get_block_status`: the extent starting at `offset` (at most `bytes` long).
    fn block_status(&mut self, offset: u64, bytes: u64) -> Result<MapEntry> {
        let mut bytes = bytes;
        let mut depth = 0usize;
        loop {
            let layer_size = self.layers[depth].size;
            bytes = bytes.min(layer_size.saturating_sub(offset)).max(1);
            let status = self.layer_status(depth, offset, bytes)?;
            bytes = status.length;
            let allocated = status.data || status.zero;
            let below = depth + 1 < self.layers.len();
            let past_below = below && offset >= self.layers[depth + 1].size;
            if allocated || !below || past_below {
                let present = allocated;
                let zero = status.zero || !allocated;
                let filename = if status.offset.is_some() {
                    self.layers[depth].filename.clone()
                } else {
                    String::new()
                };
                return Ok(MapEntry {
                    start: offset,
                    length: bytes,
                    depth: depth as u64,
                    present,
                    zero,
                    data: status.data,
                    offset: status.offset,
                    filename,
                });
            }
            depth += 1;
        }
    }

    /// qemu's `qcow2_co_block_status` / raw: the status of `[offset, offset + bytes)` in one
    /// layer, possibly shorter. Consecutive (sub)clusters of one L2 table with the same status
    /// (and contiguous host offsets) are answered at once, as qemu does.
    fn layer_status(&mut self, index: usize, offset: u64, bytes: u64) -> Result<Status> {
        let Mapper { layers, l2_cache } = self;
        let (file, header, l1, file_len) = match &layers[index].kind {
            LayerKind::Raw => {
                return Ok(Status {
                    length: bytes,
                    data: true,
                    zero: false,
                    offset: Some(offset),
                })
            }
            LayerKind::Vdi(image) => return Ok(vdi_block_status(image, offset, bytes)),
            LayerKind::Qcow2 {
                file,
                header,
                l1,
                file_len,
            } => (file, header, l1, *file_len),
        };
        let cluster_bits = header.cluster_bits;
        let cluster_size = header.cluster_size();
        let l2_entries = header.l2_entries();
        let table_span = l2_entries << cluster_bits;
        let l1_entry = l1.get((offset / table_span) as usize).copied().unwrap_or(0);
        let l2_offset = l1_entry & L1_OFFSET_MASK;
        let to_table_end = table_span - (offset % table_span);
        if l2_offset == 0 {
            // The whole range of this L2 table is unallocated.
            return Ok(Status {
                length: to_table_end.min(bytes),
                data: false,
                zero: false,
                offset: None,
            });
        }
        if l2_offset % cluster_size != 0 {
            return Err(corrupt("L2 table offset unaligned", offset, l1_entry));
        }
        let cached = matches!(l2_cache, Some((i, o, _)) if *i == index && *o == l2_offset);
        if !cached {
            let mut table = vec![0u8; cluster_size as usize];
            read_padded(file, &mut table, l2_offset, file_len, "qcow2 L2 table")?;
            *l2_cache = Some((index, l2_offset, table));
        }
        let table: &[u8] = match l2_cache {
            Some((_, _, table)) => table,
            None => &[],
        };
        let end = offset + to_table_end.min(bytes);
        let first = subcluster_status(header, table, offset)?;
        let mut status = Status {
            length: first.length.min(end - offset),
            ..first
        };
        while offset + status.length < end {
            let pos = offset + status.length;
            let next = subcluster_status(header, table, pos)?;
            let contiguous = match (status.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + status.length == b,
                _ => false,
            };
            if next.data != status.data || next.zero != status.zero || !contiguous {
                break;
            }
            status.length += next.length.min(end - pos);
        }
        Ok(status)
    }
}

/// qemu's `vdi_co_block_status` for the block holding `offset`, up to the block's end: an
/// allocated block is data at its host offset; ZERO and, in a base, FREE read as zeros; FREE in
/// a differencing image is unallocated (the parent answers).
fn vdi_block_status(image: &VdiImage<File>, offset: u64, bytes: u64) -> Status {
    let header = image.header();
    let block_size = u64::from(header.block_size);
    let in_block = offset % block_size;
    let length = (block_size - in_block).min(bytes);
    let entry = u32::try_from(offset / block_size)
        .ok()
        .and_then(|block| image.block_map().get(block));
    let (data, zero, host) = match entry {
        Some(BlockEntry::Allocated(index)) => (
            true,
            false,
            Some(header.data_block_offset(index) + in_block),
        ),
        Some(BlockEntry::Free) if header.is_differencing() => (false, false, None),
        _ => (false, true, None),
    };
    Status {
        length,
        data,
        zero,
        offset: host,
    }
}

/// The status of the (sub)cluster holding guest `offset`, up to its end, from its L2 table.
fn subcluster_status(header: &Header, table: &[u8], offset: u64) -> Result<Status> {
    let cluster_bits = header.cluster_bits;
    let cluster_size = header.cluster_size();
    let extended = header.extended_l2();
    let l2_index = ((offset >> cluster_bits) % header.l2_entries()) as usize;
    let in_cluster = offset & (cluster_size - 1);
    let width = if extended { 16 } else { 8 };
    let word = |at: usize| table.get(at..at + 8).map_or(0, BigEndian::read_u64);
    let entry = word(l2_index * width);
    let bitmap = if extended {
        word(l2_index * width + 8)
    } else {
        0
    };
    let (sub_size, sub_index) = if extended {
        let sub = cluster_size / 32;
        (sub, (in_cluster / sub) as u32)
    } else {
        (cluster_size, 0)
    };
    let length = sub_size - (offset & (sub_size - 1));
    let host = entry & L2_OFFSET_MASK;
    let kind = subcluster_type(entry, bitmap, sub_index, extended)
        .ok_or_else(|| corrupt("invalid subcluster allocation bitmap", offset, entry))?;
    let host_offset = || {
        if host % cluster_size != 0 {
            Err(corrupt(
                "cluster allocation offset unaligned",
                offset,
                entry,
            ))
        } else {
            Ok(Some(host + in_cluster))
        }
    };
    let (data, zero, offset) = match kind {
        Subcluster::Normal => (true, false, host_offset()?),
        Subcluster::Compressed => (true, false, None),
        Subcluster::ZeroPlain | Subcluster::ZeroAlloc if header.version == Version::V2 => {
            return Err(corrupt(
                "zero cluster entry in a version 2 image",
                offset,
                entry,
            ));
        }
        Subcluster::ZeroPlain => (false, true, None),
        Subcluster::ZeroAlloc => (false, true, host_offset()?),
        Subcluster::UnallocatedPlain => (false, false, None),
        Subcluster::UnallocatedAlloc => (false, false, host_offset()?),
    };
    Ok(Status {
        length,
        data,
        zero,
        offset,
    })
}

/// qemu's `QCow2SubclusterType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subcluster {
    Normal,
    Compressed,
    ZeroPlain,
    ZeroAlloc,
    UnallocatedPlain,
    UnallocatedAlloc,
}

/// qemu's `qcow2_get_subcluster_type`; `None` for an invalid bitmap.
fn subcluster_type(entry: u64, bitmap: u64, index: u32, extended: bool) -> Option<Subcluster> {
    let host = entry & L2_OFFSET_MASK;
    if entry & COMPRESSED != 0 {
        return Some(Subcluster::Compressed);
    }
    if !extended {
        return Some(match (entry & ZERO != 0, host != 0) {
            (true, false) => Subcluster::ZeroPlain,
            (true, true) => Subcluster::ZeroAlloc,
            (false, false) => Subcluster::UnallocatedPlain,
            (false, true) => Subcluster::Normal,
        });
    }
    let alloc = bitmap & (1 << index) != 0;
    let zero = bitmap & (1 << (index + 32)) != 0;
    if host != 0 {
        if (bitmap >> 32) & bitmap != 0 {
            None
        } else if zero {
            Some(Subcluster::ZeroAlloc)
        } else if alloc {
            Some(Subcluster::Normal)
        } else {
            Some(Subcluster::UnallocatedAlloc)
        }
    } else if bitmap & 0xffff_ffff != 0 {
        None
    } else if zero {
        Some(Subcluster::ZeroPlain)
    } else {
        Some(Subcluster::UnallocatedPlain)
    }
}

fn corrupt(what: &'static str, guest_offset: u64, entry: u64) -> Error {
    Qcow2Error::CorruptEntry {
        what,
        guest_offset,
        entry,
    }
    .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(start: u64, length: u64, zero: bool, data: bool, offset: Option<u64>) -> MapEntry {
        MapEntry {
            start,
            length,
            depth: 0,
            present: true,
            zero,
            data,
            offset,
            filename: if offset.is_some() {
                "f".into()
            } else {
                String::new()
            },
        }
    }

    #[test]
    fn map_entries_merge_only_when_contiguous_and_alike() {
        let a = entry(0, 4096, false, true, Some(0x50000));
        assert!(a.mergeable(&entry(4096, 4096, false, true, Some(0x51000))));
        assert!(!a.mergeable(&entry(4096, 4096, false, true, Some(0x60000))));
        assert!(!a.mergeable(&entry(4096, 4096, true, false, None)));
        let z = entry(0, 4096, true, false, None);
        assert!(z.mergeable(&entry(4096, 4096, true, false, None)));
        let json = serde_json::to_string(&z).unwrap();
        assert_eq!(
            json,
            r#"{"start":0,"length":4096,"depth":0,"present":true,"zero":true,"data":false}"#
        );
    }

    #[test]
    fn map_human_output_is_qemus_table() {
        let mut out = Vec::new();
        let entries = [
            entry(0, 0x10000, false, true, Some(0x50000)),
            entry(0x10000, 0x10000, true, false, None),
        ];
        write_human(&mut out, &entries).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "Offset          Length          Mapped to       File\n\
             0               0x10000         0x50000         f\n"
        );
        let compressed = [entry(0, 0x10000, false, true, None)];
        assert!(matches!(
            write_human(&mut Vec::new(), &compressed),
            Err(HumanMapError::NoOffset)
        ));
    }

    #[test]
    fn map_of_a_fresh_image_is_one_unallocated_extent() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        crate::Qcow2Builder::new(&path)
            .size(1 << 30)
            .create()
            .unwrap();
        let entries = map(&path, None, &BackingPolicy::Deny).unwrap();
        assert_eq!(
            entries,
            [MapEntry {
                start: 0,
                length: 1 << 30,
                depth: 0,
                present: false,
                zero: true,
                data: false,
                offset: None,
                filename: String::new(),
            }]
        );
    }
}
