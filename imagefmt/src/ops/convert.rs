//! `convert`: copy an image's guest content into a new qcow2, VDI or raw image, streaming in
//! bounded memory, writing nothing for zero runs (sparse output), optionally compressed (qcow2),
//! and with a backing file (`-B`: a qcow2 backing file, or the parent of a VDI differencing
//! image) writing only what differs from it.
//!
//! The source is never read where its extents ([`crate::chain::extents`]) say zeros or
//! unallocated. Without `-B` the copy is a pipeline:
//!
//! ```text
//! planner (chain extents, data only) ─► requests ≤ REQUEST_MAX (compressed output, or
//!   compressed source clusters: ≤ STREAM_REQUEST_MAX), aligned to the output's unit
//!    └─► N reader threads (-m N): pread each piece from its layer's file at its host offset,
//!        or for qcow2/VDI output from a locked source ([`ConvertOptions::map_source`]) map it
//!        (read_at for compressed clusters: decompressed on the reader threads); raw output:
//!        pwrite of the non-zero blocks (-S 0: copy_file_range where the bytes sit verbatim);
//!        compressed output: each non-zero cluster compressed ([`Packer`])
//!         └─► main thread: qcow2 / VDI writes in guest order (any order with -W), compressed
//!             clusters placed by the [`CompressedWriter`], progress
//! ```
//!
//! Memory: uncompressed qcow2 and VDI output keep at most `2 × N` request buffers of
//! [`REQUEST_MAX`] bytes and a page (for alignment) each, and no more than [`BUFFERED_MAX`] in
//! all (N ≤ [`MAX_PARALLEL`]); there the main thread writes from one buffer while the readers
//! fill the others. Where the readers do the work themselves (raw output: they write;
//! compressed output: they compress), N buffers: a request waits for the main thread only to be
//! counted or placed. Requests that decompress or compress are cut at [`STREAM_REQUEST_MAX`]
//! (a buffer grows only to the requests it serves), others at [`REQUEST_MAX`]. Compressed
//! output adds each request's compressed clusters and the writer's batch.

use std::path::{Path, PathBuf};

use std::os::fd::BorrowedFd;

use crate::backing::BackingPolicy;
use crate::chain::{self, open_chain};
use crate::detect::ImageFormat;
use crate::extent::{Extent, ExtentKind, GuestRead};
use crate::io::{Backend, MappedRange};
use crate::new_file::{create_with, NewFileMode};
use crate::offsets::GuestOffset;
use crate::qcow2::compressed_writer::{CompressedWriter, PackedCluster, Packer};
use crate::qcow2::create::{write_new_image, BackingReference};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::WriteOptions;
use crate::qcow2::{CreateOptions, HeaderCluster};
use crate::{Error, Result};

/// Bytes copied per step where the output is compared with a backing file (`-B`).
pub const RAW_CHUNK: u64 = 1 << 20;
/// Granularity of hole detection in raw output.
pub const SPARSE_BLOCK: usize = 4096;
/// Largest read request of the pipeline (qemu-img uses 2 MiB buffers).
pub const REQUEST_MAX: u64 = 2 << 20;
/// Largest read request where the reader threads compress (compressed output) or decompress
/// (compressed clusters of the source): smaller buffers keep such a reader's memory and cache
/// footprint small (zlib qcow2 to raw: 17 against 36 MiB peak, and faster), while plain copies
/// go faster in [`REQUEST_MAX`] pieces (measured in ARCHITECTURE.md).
pub const STREAM_REQUEST_MAX: u64 = 256 << 10;
/// The most request data the pipeline keeps in flight (its buffers), whatever `-m` says: with
/// the compressed writer's batches on top, convert stays well under 64 MiB of memory.
pub const BUFFERED_MAX: u64 = 16 << 20;
/// Default number of parallel requests (qemu-img's `-m` default).
pub const DEFAULT_PARALLEL: usize = 8;
/// Largest accepted `-m` (as qemu-img).
pub const MAX_PARALLEL: usize = 16;

/// What to make.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Output format: qcow2, vdi or raw.
    pub format: ImageFormat,
    /// VDI output: a fixed (preallocated) image instead of a dynamic one (`-o static=on`).
    pub vdi_static: bool,
    /// qcow2 creation options (`-o`).
    pub qcow2: CreateOptions,
    /// Write compressed clusters (`-c`, qcow2 only).
    pub compress: bool,
    /// Backing file of the output (`-B NAME`, `-F FMT`): only data that differs from it is
    /// written. The name is stored verbatim and resolved against the output's directory.
    pub backing: Option<(String, Option<ImageFormat>)>,
    /// Overwrite / durability of the new file.
    pub mode: NewFileMode,
    /// Parallel requests (`-m`, 1..=[`MAX_PARALLEL`]).
    pub parallel: usize,
    /// Let writes into qcow2/VDI output happen out of guest order (`-W`); raw output is always
    /// written in any order.
    pub out_of_order: bool,
    /// Preallocation of the new qcow2 or raw image (`-o preallocation=`).
    pub preallocation: crate::preallocate::Preallocation,
    /// `-S`: zero runs of this many bytes (aligned) stay holes in raw output ([`SPARSE_BLOCK`]
    /// by default); qcow2 and VDI output skip zero clusters and blocks. 0 writes everything,
    /// zeros included, as data (fully allocated output).
    pub sparse_size: u64,
    /// The source chain's files are held under qemu's image locks (opened without
    /// force-share), so qcow2/VDI output may read their data through memory mappings instead of
    /// copying it with `pread` (see [`crate::io`]'s `MappedRange`). Off: `pread` only.
    pub map_source: bool,
}

/// What a conversion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvertStats {
    /// Guest bytes examined.
    pub bytes_read: u64,
    /// Guest bytes written to the output (zero runs and data equal to the backing are skipped).
    pub bytes_written: u64,
}

/// Converts `source` into a new image at `dest`. `progress(done, total)` is called after each
/// step, in bytes: without `-B`, of the source's data copied so far and in all (every byte
/// with `-S 0`), as qemu-img counts its progress (each request moves it by its share; the
/// last call is `(total, total)`); with `-B`, of the disk compared so far. The output appears
/// under `dest` only when complete.
///
/// Every error names the file at fault: [`Error::InFile`] with role "source image" for reads
/// and block status of `source`, "destination" for everything about the output.
pub fn convert(
    source: &dyn GuestRead,
    dest: &Path,
    options: &ConvertOptions,
    policy: &BackingPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let size = source.virtual_size();
    let in_dest = |e: Error| e.in_file("destination", dest);
    if !(1..=MAX_PARALLEL).contains(&options.parallel) {
        return Err(Error::InvalidParameter {
            name: "-m",
            reason: "the number of parallel requests must be between 1 and 16",
        });
    }
    if options.compress && options.preallocation != crate::preallocate::Preallocation::Off {
        // qemu-img refuses this combination too.
        return Err(Error::InvalidParameter {
            name: "-c",
            reason: "Compression and preallocation not supported at the same time",
        });
    }
    match options.format {
        ImageFormat::Raw => {
            if options.backing.is_some() || options.compress {
                return Err(Error::UnsupportedFormat {
                    name: "raw output with -B or -c (only qcow2 has backing files and compression)"
                        .into(),
                });
            }
            create_with(dest, options.mode, |file| {
                crate::preallocate::new_raw(file, size, options.preallocation).map_err(in_dest)?;
                pipeline(source, 1, options, progress, Sink::Raw(file, dest))
            })
        }
        ImageFormat::Qcow2 => convert_to_qcow2(source, dest, options, policy, progress),
        ImageFormat::Vdi => convert_to_vdi(source, dest, options, policy, progress),
    }
}

/// VDI output: a dynamic (or fixed) base, or with `-B PARENT` a differencing image linked to the
/// VDI parent by UUID that stores only the 1 MiB blocks differing from the parent's chain.
fn convert_to_vdi(
    source: &dyn GuestRead,
    dest: &Path,
    options: &ConvertOptions,
    policy: &BackingPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    use crate::vdi::{create, VdiImage, DEFAULT_BLOCK_SIZE};
    let in_dest = |e: Error| e.in_file("destination", dest);
    if options.compress {
        return Err(Error::UnsupportedFormat {
            name: "compressed vdi output (only qcow2 compresses)".into(),
        });
    }
    let size = source.virtual_size();
    let parent = match &options.backing {
        None => None,
        Some((_, Some(format))) if *format != ImageFormat::Vdi => {
            return Err(in_dest(
                crate::vdi::VdiError::ParentNotVdi {
                    path: dest.to_owned(),
                    format: format.name(),
                }
                .into(),
            ))
        }
        Some((name, _)) => {
            if options.vdi_static {
                return Err(Error::UnsupportedFormat {
                    name: "a static (fixed) vdi differencing image".into(),
                });
            }
            let path: PathBuf =
                crate::backing::resolve(dest, name).map_err(|e| in_dest(e.into()))?;
            let in_parent = |e: Error| e.in_file("backing file", &path);
            let header = create::read_parent_header(&path).map_err(in_parent)?;
            if header.virtual_size() != size {
                return Err(in_dest(
                    crate::vdi::VdiError::DiffSizeMismatch {
                        parent: header.virtual_size(),
                        requested: size,
                    }
                    .into(),
                ));
            }
            let chain = open_chain(&path, Some(ImageFormat::Vdi), policy).map_err(in_parent)?;
            Some((header, chain))
        }
    };
    create_with(dest, options.mode, |file| {
        let (header, below) = match parent {
            Some((parent_header, chain)) => (
                create::write_differencing(file, &parent_header).map_err(in_dest)?,
                Some(chain),
            ),
            None if options.vdi_static => (create::write_fixed(file, size).map_err(in_dest)?, None),
            None => (create::write_dynamic(file, size).map_err(in_dest)?, None),
        };
        let has_parent = below.is_some();
        let mut image =
            VdiImage::open_rw(file, header, below, options.mode.durable).map_err(in_dest)?;
        let block = u64::from(DEFAULT_BLOCK_SIZE);
        if !has_parent {
            return pipeline(
                source,
                block,
                options,
                progress,
                Sink::Vdi(&mut image, dest),
            );
        }
        copy_differences(
            source,
            &mut image,
            block,
            progress,
            dest,
            |image, write| match write {
                Write::Zeroes(offset, len) => image.write_zeroes(offset, len),
                Write::Data(data, offset) => image.write_at(data, offset),
            },
        )
    })
}

fn convert_to_qcow2(
    source: &dyn GuestRead,
    dest: &Path,
    options: &ConvertOptions,
    policy: &BackingPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let size = source.virtual_size();
    let in_dest = |e: Error| e.in_file("destination", dest);
    let (reference, backing) = match &options.backing {
        None => (None, None),
        Some((name, format)) => {
            let path: PathBuf =
                crate::backing::resolve(dest, name).map_err(|e| in_dest(e.into()))?;
            let in_backing = |e: Error| e.in_file("backing file", &path);
            let chain = open_chain(&path, *format, policy).map_err(in_backing)?;
            let format = match format {
                Some(f) => *f,
                None => crate::image::read_file_header(&path)
                    .map_err(in_backing)?
                    .1
                    .format(),
            };
            let reference = BackingReference {
                name: name.clone(),
                format: format.name().to_owned(),
            };
            (Some(reference), Some(chain))
        }
    };
    create_with(dest, options.mode, |file| {
        write_new_image(file, size, &options.qcow2, reference.as_ref()).map_err(in_dest)?;
        let cluster = HeaderCluster::read_from(file).map_err(in_dest)?;
        // The output reads through to its backing chain for copy-on-write of partial clusters.
        let has_backing = backing.is_some();
        let mut image = Qcow2Image::open_rw(file, cluster, backing, WriteOptions::default())
            .map_err(in_dest)?;
        image
            .preallocate(0, size, options.preallocation)
            .map_err(in_dest)?;
        let chunk_size = image.header().cluster_size();
        // Compressed output goes through one writer that packs clusters as qemu does.
        let mut compressed = options.compress.then(|| CompressedWriter::new(&image));
        let stats = if has_backing {
            copy_differences(
                source,
                &mut image,
                chunk_size,
                progress,
                dest,
                |image, write| match write {
                    Write::Zeroes(offset, len) => image.write_zeroes(offset, len),
                    Write::Data(data, offset) => {
                        write_qcow2(image, compressed.as_mut(), data, offset)
                    }
                },
            )?
        } else {
            let sink = Sink::Qcow2 {
                image: &mut image,
                compressed: compressed.as_mut(),
                dest,
            };
            pipeline(source, chunk_size, options, progress, sink)?
        };
        if let Some(writer) = compressed {
            writer.finish(&mut image).map_err(in_dest)?;
        }
        if options.mode.durable {
            image.flush().map_err(in_dest)?;
        }
        Ok(stats)
    })
}

/// Writes one cluster-aligned piece of data into qcow2 output: the one place where compressed
/// output branches off (into the compressed writer).
fn write_qcow2(
    image: &mut Qcow2Image<&std::fs::File>,
    compressed: Option<&mut CompressedWriter>,
    data: &[u8],
    offset: u64,
) -> Result<()> {
    match compressed {
        Some(writer) => writer.write(image, data, offset),
        None => image.write_at(data, offset),
    }
}

/// A write [`copy_differences`] asks of the output.
enum Write<'a> {
    /// Zeros that must hide different data below: (offset, length).
    Zeroes(u64, u64),
    /// The bytes themselves, at the offset.
    Data(&'a [u8], u64),
}

/// Copies `source` into a new output `image` that reads through to a chain below it (`-B`),
/// in `unit` steps, asking `write` only for what differs from what `image` already reads there:
/// a chunk equal to the chain below is skipped, zeros over different data become zeros, the
/// rest is data. Ranges the source reports as zeros are not read; errors of the output name
/// `dest`.
fn copy_differences<I: GuestRead>(
    source: &dyn GuestRead,
    image: &mut I,
    unit: u64,
    progress: &mut dyn FnMut(u64, u64),
    dest: &Path,
    mut write: impl FnMut(&mut I, Write<'_>) -> Result<()>,
) -> Result<ConvertStats> {
    let size = source.virtual_size();
    let in_dest = |e: Error| e.in_file("destination", dest);
    let mut chunk = vec![0u8; unit as usize];
    let mut below = vec![0u8; unit as usize];
    let mut stats = ConvertStats::default();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(unit) as usize;
        let (chunk, below) = (&mut chunk[..len], &mut below[..len]);
        read_data_only(source, chunk, offset).map_err(|e| in_source(source, e))?;
        // Still unallocated in the output: this reads the chain below.
        image.read_at(below, GuestOffset(offset)).map_err(in_dest)?;
        if chunk != below {
            let request = if is_zero(chunk) {
                Write::Zeroes(offset, len as u64)
            } else {
                Write::Data(chunk, offset)
            };
            write(image, request).map_err(in_dest)?;
            stats.bytes_written += len as u64;
        }
        offset += len as u64;
        stats.bytes_read = offset;
        progress(offset, size);
    }
    Ok(stats)
}

/// Reads `buf` at guest `offset` of `source`, reading only what its extents call data.
fn read_data_only(source: &dyn GuestRead, buf: &mut [u8], offset: u64) -> Result<()> {
    let end = offset + buf.len() as u64;
    let mut at = GuestOffset(offset);
    while at.0 < end {
        let extent = chain::block_status(source, at, end - at.0)?;
        let piece = &mut buf[(at.0 - offset) as usize..(extent.end().0 - offset) as usize];
        chain::read_extent(source, &extent, piece)?;
        at = extent.end();
    }
    Ok(())
}

/// A source-side error, naming the source file.
pub(crate) fn in_source(source: &dyn GuestRead, error: Error) -> Error {
    match source.path() {
        Some(path) => error.in_file("source image", path),
        None => error,
    }
}

/// True if every byte is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    // Word-wise: the common case (data) fails on the first word.
    let (head, words, tail) = {
        let (prefix, rest) = bytes.split_at(bytes.len().min(bytes.as_ptr().align_offset(8)));
        let (words, tail) = rest.split_at(rest.len() / 8 * 8);
        (prefix, words, tail)
    };
    head.iter().all(|&b| b == 0)
        && words
            .chunks_exact(8)
            .all(|w| u64::from_ne_bytes(w.try_into().unwrap_or([1; 8])) == 0)
        && tail.iter().all(|&b| b == 0)
}

// ------------------------------------------------------------------------------------------
// The pipeline.

/// One read request: a guest range and the data extents inside it (the rest reads as zeros).
struct Request {
    seq: u64,
    start: u64,
    end: u64,
    pieces: Vec<Extent>,
}

/// Turns the source's extents into requests: data only, coalesced while contiguous up to a
/// maximum, widened to whole output units (clusters, blocks; 1 for raw) so that no two requests
/// share a unit. The maximum is `max`, or `compressed_max` for a request holding compressed
/// source clusters.
struct Planner<'a> {
    extents: chain::Extents<'a>,
    unit: u64,
    size: u64,
    max: u64,
    compressed_max: u64,
    current: Option<Request>,
    /// The maximum of the current request.
    current_max: u64,
    /// The data extent being split into requests.
    pending: Option<Extent>,
    seq: u64,
    done: bool,
    /// Plan zero and unallocated extents too (`-S 0`: everything is written as data).
    zeros: bool,
}

impl<'a> Planner<'a> {
    fn new(source: &'a dyn GuestRead, unit: u64, max: u64, compressed_max: u64) -> Self {
        let whole_units = |max: u64| max.max(unit) / unit * unit;
        Self {
            extents: chain::extents(source, GuestOffset(0)),
            unit,
            size: source.virtual_size(),
            max: whole_units(max),
            compressed_max: whole_units(compressed_max.min(max)),
            current: None,
            current_max: 0,
            pending: None,
            seq: 0,
            done: false,
            zeros: false,
        }
    }

    fn emit(&mut self) -> Option<Request> {
        let mut request = self.current.take()?;
        request.seq = self.seq;
        self.seq += 1;
        Some(request)
    }

    fn next_request(&mut self) -> Result<Option<Request>> {
        loop {
            let extent = match self.pending.take() {
                Some(extent) => extent,
                None if self.done => return Ok(self.emit()),
                None => match self.extents.next() {
                    None => {
                        self.done = true;
                        continue;
                    }
                    Some(extent) => {
                        let extent = extent?;
                        if extent.reads_as_zeros() && !self.zeros {
                            continue;
                        }
                        extent
                    }
                },
            };
            let unit_start = extent.start.0 / self.unit * self.unit;
            let extent_max = match extent.kind {
                ExtentKind::Data {
                    compressed: true, ..
                } => self.compressed_max,
                _ => self.max,
            };
            if let Some(current) = &mut self.current {
                if extent.start.0 < current.end {
                    // The extent starts inside the current request's last unit.
                    let (head, rest) = extent.split_at(current.end);
                    current.pieces.push(head);
                    self.pending = rest;
                    continue;
                }
                let max = self.current_max.min(extent_max);
                if unit_start == current.end && current.end - current.start < max {
                    self.current_max = max;
                    let end =
                        (current.start + max).min(align_up(extent.end().0, self.unit, self.size));
                    current.end = end;
                    let (head, rest) = extent.split_at(end);
                    current.pieces.push(head);
                    self.pending = rest;
                    continue;
                }
                self.pending = Some(extent);
                return Ok(self.emit());
            }
            self.current_max = extent_max;
            let end = (unit_start + extent_max).min(align_up(extent.end().0, self.unit, self.size));
            let (head, rest) = extent.split_at(end);
            self.current = Some(Request {
                seq: 0,
                start: unit_start,
                end,
                pieces: vec![head],
            });
            self.pending = rest;
        }
    }
}

/// `x` rounded up to a multiple of `unit`, at most `size`.
fn align_up(x: u64, unit: u64, size: u64) -> u64 {
    x.div_ceil(unit).saturating_mul(unit).min(size)
}

/// Where the pipeline's data goes.
enum Sink<'a, 'f> {
    /// A raw file (and its name): the reader threads write (or copy) themselves.
    Raw(&'f std::fs::File, &'a Path),
    /// A qcow2 image, written on the main thread.
    Qcow2 {
        image: &'a mut Qcow2Image<&'f std::fs::File>,
        /// Set for compressed output (`-c`).
        compressed: Option<&'a mut CompressedWriter>,
        dest: &'a Path,
    },
    /// A VDI image, written on the main thread.
    Vdi(&'a mut crate::vdi::VdiImage<&'f std::fs::File>, &'a Path),
}

impl Sink<'_, '_> {
    /// True if the main thread writes (qcow2, VDI); raw output is written by the readers.
    fn writes_on_main(&self) -> bool {
        !matches!(self, Sink::Raw(..))
    }

    /// The packer of compressed output, for the reader threads.
    fn packer(&self) -> Option<Packer> {
        match self {
            Sink::Qcow2 {
                compressed: Some(writer),
                ..
            } => Some(writer.packer()),
            _ => None,
        }
    }

    /// True where the reader threads do the heavy work on a request themselves (raw output:
    /// they write it; compressed output: they compress it), so that the main thread holds a
    /// request only briefly.
    fn readers_work(&self) -> bool {
        !self.writes_on_main() || self.packer().is_some()
    }

    /// Writes a filled request (qcow2/VDI) unit by unit, skipping all-zero units and joining
    /// neighbouring non-zero units into one write; for compressed output, places the clusters
    /// the reader compressed. Returns the bytes written.
    fn write(&mut self, filled: &mut Filled, unit: u64, sparse: bool) -> Result<u64> {
        if let Sink::Qcow2 {
            image,
            compressed: Some(writer),
            dest,
        } = self
        {
            let size = image.virtual_size();
            let mut written = 0;
            for (offset, cluster) in std::mem::take(&mut filled.packed) {
                writer
                    .write_packed(image, offset, cluster)
                    .map_err(|e| e.in_file("destination", dest))?;
                written += unit.min(size - offset);
            }
            return Ok(written);
        }
        let (start, end) = (filled.request.start, filled.request.end);
        let (from, content) = filled.content();
        let to = from + content.len() as u64;
        // The bytes of guest range [a, b) that `content` holds (the rest of the request reads
        // as zeros).
        let held = |a: u64, b: u64| -> &[u8] {
            let (a, b) = (a.clamp(from, to), b.clamp(from, to));
            &content[(a - from) as usize..(b - from) as usize]
        };
        let mut written = 0;
        let mut run: Option<u64> = None;
        let mut at = start;
        loop {
            let (next, zero) = if at < end {
                let next = (at + unit - at % unit).min(end);
                (next, sparse && is_zero(held(at, next)))
            } else {
                (at, true)
            };
            if zero {
                if let Some(run_start) = run.take() {
                    self.write_run(held(run_start, at), run_start, at, from, unit)?;
                    written += at - run_start;
                }
            }
            if !zero {
                run.get_or_insert(at);
            }
            if at >= end {
                return Ok(written);
            }
            at = next;
        }
    }

    /// Writes the run of whole units from guest `start` to `end`, of which `data` holds the
    /// bytes that may be non-zero, from guest `max(start, from)` on (the rest reads as zeros).
    /// The units `data` covers entirely go straight from `data`; a first or last unit it
    /// covers only in part (a mapped request starting or ending inside a unit) is padded with
    /// zeros.
    fn write_run(&mut self, data: &[u8], start: u64, end: u64, from: u64, unit: u64) -> Result<()> {
        let d0 = start.max(from);
        let d1 = d0 + data.len() as u64;
        // `start` is a unit boundary and a partial edge is at most one unit.
        let head_end = if d0 == start {
            start
        } else {
            (start + unit).min(end)
        };
        let tail_start = if d1 == end {
            end
        } else {
            (d1 / unit * unit).max(head_end)
        };
        let padded = |a: u64, b: u64| {
            let mut unit = vec![0u8; (b - a) as usize];
            let (x, y) = (a.max(d0), b.min(d1));
            if x < y {
                unit[(x - a) as usize..(y - a) as usize]
                    .copy_from_slice(&data[(x - d0) as usize..(y - d0) as usize]);
            }
            unit
        };
        if head_end > start {
            self.write_piece(&padded(start, head_end), start)?;
        }
        if tail_start > head_end {
            let whole = &data[(head_end - d0) as usize..(tail_start - d0) as usize];
            self.write_piece(whole, head_end)?;
        }
        if end > tail_start {
            self.write_piece(&padded(tail_start, end), tail_start)?;
        }
        Ok(())
    }

    fn write_piece(&mut self, data: &[u8], offset: u64) -> Result<()> {
        match self {
            Sink::Raw(..) => Ok(()),
            Sink::Qcow2 { image, dest, .. } => image
                .write_at(data, offset)
                .map_err(|e| e.in_file("destination", dest)),
            Sink::Vdi(image, dest) => image
                .write_at(data, offset)
                .map_err(|e| e.in_file("destination", dest)),
        }
    }
}

/// A filled request on its way to the main thread.
struct Filled {
    request: Request,
    /// The buffer: the request's bytes at `at` (qcow2/VDI output, unless `mapped`), or
    /// anything (raw: already written; mapped: unused).
    data: Vec<u8>,
    /// Where the request's bytes start in `data` (a page-aligned window).
    at: usize,
    /// The request's data read through a mapping of the file that holds it verbatim instead,
    /// and the guest offset of its first byte: the rest of the request reads as zeros.
    mapped: Option<(u64, MappedRange)>,
    /// Bytes the reader wrote to raw output.
    written: u64,
    /// Compressed output: the request's non-zero clusters, compressed by the reader.
    packed: Vec<(u64, PackedCluster)>,
}

impl Filled {
    /// The request's bytes that may be non-zero and the guest offset of the first; the rest
    /// of the request reads as zeros (qcow2/VDI output).
    fn content(&self) -> (u64, &[u8]) {
        match &self.mapped {
            Some((from, map)) => (*from, map.bytes()),
            None => {
                let len = (self.request.end - self.request.start) as usize;
                (self.request.start, &self.data[self.at..self.at + len])
            }
        }
    }
}

/// Maps the request's data when its pieces follow each other without a gap, both in the
/// guest and verbatim in one file; `None` (read it instead) otherwise.
fn map_request(source: &dyn GuestRead, request: &Request) -> Option<(u64, MappedRange)> {
    use std::os::fd::AsRawFd;
    let first = request.pieces.first()?;
    let (fd, host) = chain::verbatim_source(source, first)?;
    let (mut guest_end, mut host_end) = (first.start.0, host);
    for piece in &request.pieces {
        let (piece_fd, piece_host) = chain::verbatim_source(source, piece)?;
        if piece_fd.as_raw_fd() != fd.as_raw_fd()
            || piece_host != host_end
            || piece.start.0 != guest_end
        {
            return None;
        }
        guest_end += piece.len;
        host_end += piece.len;
    }
    let map = MappedRange::new(fd, host, usize::try_from(host_end - host).ok()?).ok()??;
    Some((first.start.0, map))
}

/// Reads `request` into a page-aligned window of `buf` (zeros between its pieces), or with
/// `map` through a mapping where [`map_request`] can; for raw output `out`, writes it too:
/// `pwrite` of the non-zero `sparse_block`s ([`SPARSE_BLOCK`] by default), or with
/// `sparse_block` 0 `copy_file_range` for pieces that sit verbatim in a file. For compressed
/// output (`pack`: the packer and the cluster size), compresses each cluster of the request,
/// skipping zero clusters unless `sparse_block` is 0.
fn fill(
    source: &dyn GuestRead,
    request: Request,
    mut buf: Vec<u8>,
    out: Option<(&std::fs::File, &Path)>,
    sparse_block: u64,
    map: bool,
    pack: Option<(Packer, u64)>,
) -> Result<Filled> {
    let mut written = 0;
    let Some((file, dest)) = out else {
        if let Some(mapped) = map.then(|| map_request(source, &request)).flatten() {
            return Ok(Filled {
                request,
                data: buf,
                at: 0,
                mapped: Some(mapped),
                written,
                packed: Vec::new(),
            });
        }
        let len = (request.end - request.start) as usize;
        let window = super::aligned_window(&mut buf, len);
        let data = &mut buf[window..window + len];
        // Pieces come in guest order; only the gaps between them are zeroed.
        let mut filled_to = 0;
        for piece in &request.pieces {
            let at = (piece.start.0 - request.start) as usize;
            data[filled_to..at].fill(0);
            filled_to = at + piece.len as usize;
            chain::read_extent(source, piece, &mut data[at..filled_to])
                .map_err(|e| in_source(source, e))?;
        }
        data[filled_to..].fill(0);
        let mut packed = Vec::new();
        if let Some((packer, cluster)) = pack {
            // Requests start at a cluster and end at one or at the end of the disk.
            let mut at = request.start;
            while at < request.end {
                let next = (at + cluster - at % cluster).min(request.end);
                let bytes = &data[(at - request.start) as usize..(next - request.start) as usize];
                if sparse_block == 0 || !is_zero(bytes) {
                    packed.push((at, packer.pack(bytes)));
                }
                at = next;
            }
        }
        return Ok(Filled {
            request,
            data: buf,
            at: window,
            mapped: None,
            written,
            packed,
        });
    };
    // Raw output: each piece read and its non-zero blocks written, so that zero blocks inside
    // data stay holes as qemu-img leaves them; with -S 0 (everything written) copied in the
    // kernel where the bytes sit verbatim in a file. The buffer is only used (and only as long
    // as needed) for reading.
    for piece in &request.pieces {
        let verbatim = (sparse_block == 0)
            .then(|| chain::verbatim_source(source, piece))
            .flatten();
        let copied = match verbatim {
            Some((fd, host)) => copy_range(fd, host, file, piece.start.0, piece.len),
            None => 0,
        };
        written += copied;
        let Some(rest) = (if copied == 0 {
            Some(*piece)
        } else {
            piece.split_at(piece.start.0 + copied).1
        }) else {
            continue;
        };
        let len = rest.len as usize;
        let window = super::aligned_window(&mut buf, len);
        let data = &mut buf[window..window + len];
        chain::read_extent(source, &rest, data).map_err(|e| in_source(source, e))?;
        written += write_sparse(file, data, rest.start.0, sparse_block)
            .map_err(|e| e.in_file("destination", dest))?;
    }
    Ok(Filled {
        request,
        data: buf,
        at: 0,
        mapped: None,
        written,
        packed: Vec::new(),
    })
}

/// Copies `len` bytes from `from` at `from_offset` to `to` at `to_offset` in the kernel; returns
/// how many were copied (fewer, down to 0, where the file system cannot: the caller copies the
/// rest itself).
fn copy_range(
    from: BorrowedFd<'_>,
    from_offset: u64,
    to: &std::fs::File,
    to_offset: u64,
    len: u64,
) -> u64 {
    let (mut off_in, mut off_out) = (from_offset, to_offset);
    let mut done = 0;
    while done < len {
        let want = (len - done).min(1 << 30) as usize;
        match rustix::fs::copy_file_range(from, Some(&mut off_in), to, Some(&mut off_out), want) {
            Ok(0) => break,
            Ok(n) => done += n as u64,
            Err(rustix::io::Errno::INTR) => {}
            Err(_) => break,
        }
    }
    done
}

/// Writes the non-zero `block`s (aligned to guest offsets; [`SPARSE_BLOCK`] by default) of
/// `data` at `offset`; zero blocks stay holes. Block 0 writes everything. Returns the bytes
/// written.
fn write_sparse(file: &std::fs::File, data: &[u8], offset: u64, block: u64) -> Result<u64> {
    if block == 0 {
        Backend::write_all_at(file, data, offset).map_err(Error::writing("raw image data"))?;
        return Ok(data.len() as u64);
    }
    let mut written = 0;
    let mut at = 0usize;
    while at < data.len() {
        // Find a run of non-zero blocks.
        let next = |from: usize| {
            (from + (block - (offset + from as u64) % block) as usize).min(data.len())
        };
        let mut end = next(at);
        if is_zero(&data[at..end]) {
            at = end;
            continue;
        }
        while end < data.len() {
            let after = next(end);
            if is_zero(&data[end..after]) {
                break;
            }
            end = after;
        }
        Backend::write_all_at(file, &data[at..end], offset + at as u64)
            .map_err(Error::writing("raw image data"))?;
        written += (end - at) as u64;
        at = end;
    }
    Ok(written)
}

/// Runs the pipeline: planner and readers on `options.parallel` threads, writes per `sink`.
fn pipeline(
    source: &dyn GuestRead,
    unit: u64,
    options: &ConvertOptions,
    progress: &mut dyn FnMut(u64, u64),
    mut sink: Sink<'_, '_>,
) -> Result<ConvertStats> {
    use std::collections::BTreeMap;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Mutex};

    let size = source.virtual_size();
    let workers = options.parallel;
    // qemu-img decides between data and zeros in blocks of -S rounded down to a power of two
    // (its `alignment`), at least a cluster: so does uncompressed qcow2 output (compressed
    // output ignores -S, as qemu-img's does).
    let unit = match &sink {
        Sink::Qcow2 {
            compressed: None, ..
        } if options.sparse_size > 0 => unit.max(1 << (63 - options.sparse_size.leading_zeros())),
        _ => unit,
    };
    let request_max = if sink.packer().is_some() {
        STREAM_REQUEST_MAX
    } else {
        REQUEST_MAX
    };
    let mut plan = Planner::new(source, unit, request_max, STREAM_REQUEST_MAX);
    plan.zeros = options.sparse_size == 0;
    // Progress counts the bytes the planner will hand out (data; everything with -S 0), as
    // qemu-img counts its allocated sectors, so that each request moves it by its share.
    let total = planned_bytes(source, plan.zeros)?;
    let planner = Mutex::new(plan);
    let sparse_block = options.sparse_size;
    // Into preallocated qcow2 clusters only the non-zero blocks are written, as qemu-img does
    // (the rest of a metadata-preallocated cluster stays a hole).
    let write_unit = match &sink {
        Sink::Qcow2 { .. } if options.preallocation != crate::preallocate::Preallocation::Off => {
            unit.min(SPARSE_BLOCK as u64)
        }
        _ => unit,
    };
    let stop = AtomicBool::new(false);
    let raw_out = match &sink {
        Sink::Raw(file, dest) => Some((*file, *dest)),
        _ => None,
    };
    let in_order = sink.writes_on_main() && !options.out_of_order;
    // Compressed output: the readers compress each cluster of what they read.
    let pack = sink.packer().map(|packer| (packer, unit));
    // Mappings serve qcow2/VDI output (raw output copies in the kernel), not compressed output
    // (which spends its time compressing).
    let map = options.map_source && sink.writes_on_main() && pack.is_none();
    // Buffers circulate between the readers and the main thread: one per reader where the
    // readers do the work, else 2 × workers of them (the main thread writes from some while
    // the readers fill the others); never more than BUFFERED_MAX bytes' worth, so memory stays
    // bounded whatever -m asks for.
    let per_reader = if sink.readers_work() { 1 } else { 2 };
    let buffers = (per_reader * workers)
        .min((BUFFERED_MAX / request_max) as usize)
        .max(1);
    // No more readers than buffers: a reader that finds the plan done ends and drops the
    // buffer it holds, so with more readers than buffers the last ones would wait for a buffer
    // forever (and the main thread for them): `-m 16` with 2 MiB requests hung so.
    let readers = workers.min(buffers);
    // A used buffer comes back with the mapping its request was read through, if any, so that
    // a reader thread unmaps it (unmapping is not cheap; the main thread is the busier one).
    let (give_back, pool) = mpsc::sync_channel::<(Vec<u8>, Option<MappedRange>)>(buffers);
    for _ in 0..buffers {
        let _ = give_back.send((Vec::new(), None));
    }
    let pool = Mutex::new(pool);
    let (filled_tx, filled_rx) = mpsc::sync_channel::<Result<Filled>>(2 * workers);
    let mut stats = ConvertStats::default();
    let mut first_error: Option<Error> = None;
    std::thread::scope(|scope| {
        for _ in 0..readers {
            let filled_tx = filled_tx.clone();
            let (planner, pool, stop, map, pack) = (&planner, &pool, &stop, map, pack);
            let raw = raw_out;
            scope.spawn(move || loop {
                if stop.load(Ordering::Relaxed) {
                    return;
                }
                let Ok((buf, used_map)) = pool.lock().unwrap_or_else(|e| e.into_inner()).recv()
                else {
                    return;
                };
                drop(used_map);
                let next = planner
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .next_request();
                let message = match next {
                    Ok(None) => return,
                    Ok(Some(request)) => fill(source, request, buf, raw, sparse_block, map, pack),
                    Err(e) => Err(in_source(source, e)),
                };
                let failed = message.is_err();
                if filled_tx.send(message).is_err() || failed {
                    return;
                }
            });
        }
        drop(filled_tx);
        let mut waiting: BTreeMap<u64, Filled> = BTreeMap::new();
        let mut next_seq = 0u64;
        let mut done = 0u64;
        for message in filled_rx.iter() {
            let filled = match message {
                Ok(filled) => filled,
                Err(e) => {
                    first_error.get_or_insert(e);
                    break;
                }
            };
            let mut ready = Vec::new();
            if in_order {
                waiting.insert(filled.request.seq, filled);
                while let Some(f) = waiting.remove(&next_seq) {
                    next_seq += 1;
                    ready.push(f);
                }
            } else {
                ready.push(filled);
            }
            for mut f in ready {
                let written = if sink.writes_on_main() {
                    sink.write(&mut f, write_unit, sparse_block != 0)
                } else {
                    Ok(f.written)
                };
                match written {
                    Ok(n) => stats.bytes_written += n,
                    Err(e) => {
                        first_error.get_or_insert(e);
                    }
                }
                done += f.request.pieces.iter().map(|piece| piece.len).sum::<u64>();
                progress(done, total);
                let used_map = f.mapped.take().map(|(_, map)| map);
                let _ = give_back.send((std::mem::take(&mut f.data), used_map));
            }
            if first_error.is_some() {
                break;
            }
        }
        // Unblock and end the readers: no more buffers, nobody listening.
        stop.store(true, Ordering::Relaxed);
        drop(give_back);
        drop(filled_rx);
    });
    if let Some(e) = first_error {
        return Err(e);
    }
    stats.bytes_read = size;
    progress(total, total);
    Ok(stats)
}

/// The bytes of `source` the pipeline's planner hands out: its data extents, and with `zeros`
/// every extent (the whole disk).
fn planned_bytes(source: &dyn GuestRead, zeros: bool) -> Result<u64> {
    if zeros {
        return Ok(source.virtual_size());
    }
    let mut total = 0;
    for extent in chain::extents(source, GuestOffset(0)) {
        let extent = extent.map_err(|e| in_source(source, e))?;
        if !extent.reads_as_zeros() {
            total += extent.len;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk of plain data up to `compressed_from`, compressed clusters after it.
    struct HalfCompressed {
        size: u64,
        compressed_from: u64,
    }

    impl GuestRead for HalfCompressed {
        fn virtual_size(&self) -> u64 {
            self.size
        }

        fn read_at(&self, buf: &mut [u8], _offset: GuestOffset) -> Result<()> {
            buf.fill(1);
            Ok(())
        }

        fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
            let compressed = start.0 >= self.compressed_from;
            let end = if compressed {
                start.0 + (64 << 10)
            } else {
                self.compressed_from
            };
            Ok(Extent {
                start,
                len: (end - start.0).min(max_len),
                depth: 0,
                kind: ExtentKind::Data {
                    compressed,
                    zero: false,
                },
                host: None,
            })
        }
    }

    fn request_ranges(source: &dyn GuestRead, max: u64) -> Vec<(u64, u64)> {
        let mut planner = Planner::new(source, 64 << 10, max, STREAM_REQUEST_MAX);
        let mut ranges = Vec::new();
        while let Some(request) = planner.next_request().unwrap() {
            ranges.push((request.start, request.end));
        }
        ranges
    }

    #[test]
    fn plain_data_goes_in_large_requests_and_compressed_clusters_in_small_ones() {
        let source = HalfCompressed {
            size: 8 << 20,
            compressed_from: (4 << 20) + (64 << 10),
        };
        let ranges = request_ranges(&source, REQUEST_MAX);
        let mut expected = vec![(0, 2 << 20), (2 << 20, 4 << 20)];
        // The plain cluster before the compressed ones starts a request the first compressed
        // cluster joins: together they stay under the small maximum.
        let mut start = 4 << 20;
        while start < 8 << 20 {
            expected.push((start, start + STREAM_REQUEST_MAX));
            start += STREAM_REQUEST_MAX;
        }
        assert_eq!(ranges, expected);
        // Compressed output takes small requests everywhere.
        let small = request_ranges(&source, STREAM_REQUEST_MAX);
        assert_eq!(small.len(), 32);
        assert!(small.iter().all(|(s, e)| e - s == STREAM_REQUEST_MAX));
    }
}
