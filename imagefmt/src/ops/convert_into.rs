//! `convert -n`: copy an image's guest content into an existing image instead of a new one
//! (qemu-img's "skip target creation"). The target must be at least as large as the source.
//!
//! A new image starts out reading zeros, so [`super::convert`] skips zero runs; an existing
//! one may hold anything, so here every range of the source is written: data as data, zero and
//! unallocated ranges as zeros — zero clusters in a qcow2 target (v3: all of them, even where
//! the target read zeros already), punched holes in a raw one — as qemu-img does when the
//! target is not known to be zero-initialised (with `--target-is-zero` the caller says it is,
//! and zero ranges are left alone, as qemu-img leaves them). With `-S 0`
//! (`sparse_size` 0) zeros are written as data. The copy is serial, in requests of up to
//! [`REQUEST_MAX`] bytes, reading only what the source's extents call data.
//!
//! Unlike qemu-img, a target recognised as qcow2 or VDI is not overwritten as raw bytes when
//! the format given is raw (the default of `-O`): its format must be named.

use std::path::Path;

use crate::chain;
use crate::detect::ImageFormat;
use crate::extent::GuestRead;
use crate::io::Backend;
use crate::offsets::GuestOffset;
use crate::ops::commit::zero_raw;
use crate::ops::convert::{in_source, is_zero, ConvertStats, REQUEST_MAX};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::WriteOptions;
use crate::{Error, Result};

/// The existing image being written.
enum Target {
    Qcow2(Box<Qcow2Image<std::fs::File>>),
    Raw(std::fs::File),
}

impl Target {
    fn write(&mut self, data: &[u8], offset: u64) -> Result<()> {
        match self {
            Target::Qcow2(image) => image.write_at(data, offset),
            Target::Raw(file) => {
                Backend::write_all_at(file, data, offset).map_err(Error::writing("raw image data"))
            }
        }
    }

    /// Zeros over whatever the target holds: in a v3 qcow2 target zero clusters even where it
    /// reads zeros already (as qemu-img marks a whole `-n` target), in a v2 one (no zero flag)
    /// zeros only where it does not.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        match self {
            Target::Qcow2(image) if image.header().version == crate::qcow2::Version::V3 => {
                image.write_zeroes_over_backing(offset, len)
            }
            Target::Qcow2(image) => image.write_zeroes(offset, len),
            Target::Raw(file) => zero_raw(file, offset, len),
        }
    }
}

/// Converts `source` into the existing image `dest` of format `format` (qcow2 or raw), opened
/// for writing as `chain` says (a qcow2 target's own backing chain is opened for copy-on-write
/// of partial clusters; its external data file, where `chain` allows it, for writing).
/// `sparse_size` is `-S` (0: zeros written as data). `target_is_zero` (`--target-is-zero`):
/// the caller vouches that the target reads as zeros, so zero ranges are not written (as for
/// a new image), unless `-S 0`. Errors name the file at fault.
pub fn convert_into(
    source: &dyn GuestRead,
    dest: &Path,
    format: ImageFormat,
    chain: &chain::ChainOptions<'_>,
    sparse_size: u64,
    target_is_zero: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let in_dest = |e: Error| e.in_file("destination", dest);
    let file = crate::open::open_image(dest, crate::open::OpenHow::write()).map_err(in_dest)?;
    let (mut target, target_size, unit) = match format {
        ImageFormat::Qcow2 => {
            let image = chain::qcow2_rw_from_file(file, dest, chain, WriteOptions::default())
                .map_err(in_dest)?;
            let (size, unit) = (image.virtual_size(), image.unit_size());
            (Target::Qcow2(Box::new(image)), size, unit)
        }
        ImageFormat::Raw => {
            // Raw bytes written over a qcow2 or VDI image would destroy it: its format must
            // be named (qemu-img would write them; cowclone refuses).
            if let Ok(header) = crate::image::ImageHeader::read_detected(&file, dest, false) {
                if header.format() != ImageFormat::Raw {
                    return Err(in_dest(Error::InvalidParameter {
                        name: "-O",
                        reason: "the existing target is not a raw image: name its format with -O",
                    }));
                }
            }
            let len = file
                .metadata()
                .map_err(Error::io("reading the target's length"))?;
            let block = if sparse_size == 0 {
                crate::ops::convert::SPARSE_BLOCK as u64
            } else {
                sparse_size
            };
            (Target::Raw(file), len.len(), block)
        }
        ImageFormat::Vdi => {
            return Err(Error::UnsupportedFormat {
                name: "vdi as an existing convert target (-n)".into(),
            })
        }
    };
    let size = source.virtual_size();
    if target_size < size {
        return Err(in_dest(Error::InvalidParameter {
            name: "-n",
            reason: "output file is smaller than input file",
        }));
    }
    let mut stats = ConvertStats::default();
    let mut buf = Vec::new();
    for extent in chain::extents(source, GuestOffset(0)) {
        let extent = extent.map_err(|e| in_source(source, e))?;
        if extent.reads_as_zeros() && sparse_size != 0 {
            if !target_is_zero {
                target
                    .write_zeroes(extent.start.0, extent.len)
                    .map_err(in_dest)?;
            }
        } else {
            let mut piece = Some(extent);
            while let Some(current) = piece {
                let (head, rest) = current.split_at(current.start.0 + REQUEST_MAX);
                buf.resize(head.len as usize, 0);
                chain::read_extent(source, &head, &mut buf).map_err(|e| in_source(source, e))?;
                let zeros = match (sparse_size, target_is_zero) {
                    (0, _) => Zeros::AsData,
                    (_, true) => Zeros::Skipped,
                    (_, false) => Zeros::Written,
                };
                write_units(&mut target, &buf, head.start.0, unit, zeros).map_err(in_dest)?;
                stats.bytes_written += head.len;
                progress(head.end().0, size);
                piece = rest;
            }
        }
        stats.bytes_read = extent.end().0;
        progress(extent.end().0, size);
    }
    if let Target::Qcow2(image) = &mut target {
        image.flush().map_err(in_dest)?;
    }
    progress(size, size);
    Ok(stats)
}

/// What [`write_units`] does with units that read as zeros.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Zeros {
    /// Written as data (`-S 0`).
    AsData,
    /// Written as zeros (zero clusters, holes).
    Written,
    /// Not written: the target reads as zeros already (`--target-is-zero`).
    Skipped,
}

/// Writes `data` at `offset` unit by unit (units aligned to guest offsets): runs of non-zero
/// units as data, runs of zero units as `zeros` says.
fn write_units(
    target: &mut Target,
    data: &[u8],
    offset: u64,
    unit: u64,
    zeros: Zeros,
) -> Result<()> {
    if zeros == Zeros::AsData {
        return target.write(data, offset);
    }
    let mut at = 0usize;
    while at < data.len() {
        let unit_end =
            |from: usize| (from + (unit - (offset + from as u64) % unit) as usize).min(data.len());
        let zero = is_zero(&data[at..unit_end(at)]);
        let mut end = unit_end(at);
        while end < data.len() && is_zero(&data[end..unit_end(end)]) == zero {
            end = unit_end(end);
        }
        if zero {
            if zeros == Zeros::Written {
                target.write_zeroes(offset + at as u64, (end - at) as u64)?;
            }
        } else {
            target.write(&data[at..end], offset + at as u64)?;
        }
        at = end;
    }
    Ok(())
}
