//! `qemu-img map`: which guest ranges of an image chain hold data, zeros or nothing, which layer
//! provides them and where they are stored.
//!
//! The entries match `qemu-img map --output=json` of qemu 10 (`qemu-img.c` `get_block_status`,
//! `entry_mergeable`, `dump_map_entry`). They are the chain's extents ([`crate::chain::extents`],
//! qemu's `bdrv_block_status_above`) rendered with qemu's flags:
//!
//! ```text
//! Extent kind            present  zero   data   compressed  offset
//! Data (uncompressed)    true     false  true   false       host offset
//! Data (compressed)      true     false  true   true        -
//! Data over a host hole  true     true   true   false       host offset (metadata-preallocated)
//! Zero                   true     true   false  false       host offset if preallocated / raw hole
//! Unallocated            false    true   false  false       host offset if the cluster exists
//! adjacent entries merge when all flags, the depth and the file agree and offsets are contiguous
//! ```
//!
//! Raw layers ask the file system for holes (`SEEK_DATA`/`SEEK_HOLE`), as qemu does: a hole is
//! present zeros at its own offset.

use std::path::Path;

use serde::Serialize;

use crate::backing::BackingPolicy;
use crate::chain::{self, extents, open_chain_with, ChainOptions};
use crate::detect::ImageFormat;
use crate::extent::{Extent, ExtentKind, GuestRead};
use crate::offsets::GuestOffset;
use crate::Result;

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
    /// True if the extent is stored compressed (qemu 10 prints this key).
    pub compressed: bool,
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
    pub(crate) fn mergeable(&self, next: &MapEntry) -> bool {
        self.length != 0
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
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
/// qcow2 images with an external data file are refused. VDI layers map as qemu maps a VDI base
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
    let mut out = Vec::new();
    map_each(path, format, options, |entry| {
        out.push(entry);
        Ok(())
    })?;
    Ok(out)
}

/// [`map_with`], streaming: `emit` gets each merged entry as soon as it is complete, so memory
/// stays constant however many entries the image has.
pub fn map_each(
    path: &Path,
    format: Option<ImageFormat>,
    options: &ChainOptions<'_>,
    mut emit: impl FnMut(MapEntry) -> Result<()>,
) -> Result<()> {
    let top = open_chain_with(path, format, options)?;
    let mut pending: Option<MapEntry> = None;
    for extent in extents(&*top, GuestOffset(0)) {
        let next = MapEntry::from_extent(&extent?, &*top);
        match &mut pending {
            Some(last) if last.mergeable(&next) => last.length += next.length,
            _ => {
                if let Some(done) = pending.replace(next) {
                    emit(done)?;
                }
            }
        }
    }
    pending.map_or(Ok(()), emit)
}

/// Writes `entries` as `qemu-img map` prints them by default: a table of the extents stored as
/// data (`Offset Length Mapped to File`). Like qemu-img, data without a host offset (compressed
/// clusters) is an error once it is reached; the rows before it have been written.
pub fn write_human(
    out: &mut dyn std::io::Write,
    entries: &[MapEntry],
) -> Result<(), HumanMapError> {
    write_human_header(out)?;
    entries.iter().try_for_each(|e| write_human_row(out, e))
}

/// The header line of the human map.
pub fn write_human_header(out: &mut dyn std::io::Write) -> Result<(), HumanMapError> {
    writeln!(
        out,
        "{:<16}{:<16}{:<16}File",
        "Offset", "Length", "Mapped to"
    )?;
    Ok(())
}

/// One entry of the human map: a row for data with a host offset, nothing for zeros and
/// unallocated ranges, an error for data without an offset.
pub fn write_human_row(out: &mut dyn std::io::Write, e: &MapEntry) -> Result<(), HumanMapError> {
    let Some(host) = e.offset.filter(|_| e.data) else {
        return if e.data {
            Err(HumanMapError::NoOffset)
        } else {
            Ok(())
        };
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

impl MapEntry {
    /// The map entry of one chain extent of `top`.
    pub(crate) fn from_extent(extent: &Extent, top: &dyn GuestRead) -> Self {
        let offset = extent.host.map(|h| h.offset.0);
        let filename = match extent.host {
            Some(host) => chain::layer_at(top, extent.depth)
                .and_then(|layer| layer.host_path(host.file))
                .map(|p| p.to_string_lossy().into_owned())
                .unwrap_or_default(),
            None => String::new(),
        };
        Self {
            start: extent.start.0,
            length: extent.len,
            depth: u64::from(extent.depth),
            present: extent.is_allocated(),
            zero: extent.reads_as_zeros(),
            data: extent.is_data(),
            compressed: matches!(
                extent.kind,
                ExtentKind::Data {
                    compressed: true,
                    ..
                }
            ),
            offset,
            filename,
        }
    }
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
            compressed: false,
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
            r#"{"start":0,"length":4096,"depth":0,"present":true,"zero":true,"data":false,"compressed":false}"#
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
                compressed: false,
                offset: None,
                filename: String::new(),
            }]
        );
    }
}
