//! `rebase`: point an overlay at a different backing file. Unsafe mode (`-u`) only rewrites the
//! header. Safe mode first copies into the overlay every range it does not itself allocate whose
//! content differs between the old and the new backing chain, so the guest sees the same data,
//! and it writes what `qemu-img rebase` writes there (see [`copy_differences`]): the old chain's
//! data, zeros included, as data clusters — compressed with `-c` — and zero clusters past the
//! old backing file's end. Ranges both chains report as zeros are not read.

use std::path::Path;

use crate::backing::BackingPolicy;
use crate::chain::{self, open_chain_with, open_qcow2_rw_with, ChainOptions};
use crate::detect::ImageFormat;
use crate::extent::{Extent, GuestRead};
use crate::offsets::GuestOffset;
use crate::qcow2::compressed_writer::CompressedWriter;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::WriteOptions;
use crate::Result;

/// The new backing file: its name (stored verbatim) and format; `None` removes the backing file
/// (safe mode then copies all backing data into the image).
pub type NewBacking = Option<(String, ImageFormat)>;

/// What `qemu-img rebase` reads of the chains at once: one copy step never spans more, and the
/// old backing file's end is judged per step (see [`copy_differences`]).
pub const STEP: u64 = 2 << 20;

/// How [`rebase_with_progress`] rebases.
#[derive(Debug, Clone, Copy, Default)]
pub struct RebaseOptions {
    /// Unsafe mode (`-u`): only the header changes; no backing file is opened.
    pub unsafe_header_only: bool,
    /// `-c`: the clusters the safe copy writes are compressed (whole clusters, as `qemu-img
    /// rebase -c` aligns them).
    pub compress: bool,
}

/// Rebases the qcow2 image at `path`. Returns the guest bytes copied into it.
pub fn rebase(
    path: &Path,
    new: &NewBacking,
    unsafe_header_only: bool,
    policy: &BackingPolicy,
) -> Result<u64> {
    let options = RebaseOptions {
        unsafe_header_only,
        ..RebaseOptions::default()
    };
    rebase_with_progress(
        path,
        new,
        &options,
        &ChainOptions::new(policy),
        &mut |_, _| {},
    )
}

/// [`rebase`] as `options` say, calling `progress(done, size)` (guest offsets) after each step
/// of at most [`STEP`] bytes the safe copy compares, as `qemu-img rebase` advances its
/// progress by one step's share. Backing files are opened under `chain`'s policy, external
/// data files where it allows them (the image's own opened for writing; `chain.data_file`
/// names it).
pub fn rebase_with_progress(
    path: &Path,
    new: &NewBacking,
    options: &RebaseOptions,
    chain: &ChainOptions<'_>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let unsafe_header_only = options.unsafe_header_only;
    let mut image = if unsafe_header_only {
        open_without_backing(path)?
    } else {
        open_qcow2_rw_with(path, chain, WriteOptions::default())?
    };
    let mut copied = 0;
    let mut new_in_old_chain = None;
    let new_chain: Option<Box<dyn GuestRead>> = match new {
        Some((name, format)) if !unsafe_header_only => {
            let resolved = crate::backing::resolve(path, name)?;
            new_in_old_chain = depth_in_chain(&image, &resolved).map(|depth| depth - 1);
            let below = ChainOptions {
                data_file: None,
                ..*chain
            };
            Some(open_chain_with(&resolved, Some(*format), &below)?)
        }
        _ => None,
    };
    if !unsafe_header_only {
        copied = copy_differences(
            &mut image,
            new_chain.as_deref(),
            new_in_old_chain,
            options.compress,
            progress,
        )?;
    }
    image.set_backing(new.as_ref().map(|(n, f)| (n.as_str(), f.name())))?;
    image.set_below(new_chain);
    image.flush()?;
    Ok(copied)
}

/// `rebase -u -b NAME -F FORMAT` where FORMAT is named as qemu names it: only the header of the
/// image at `path` is rewritten, with any qemu block driver name
/// ([`crate::qcow2::create::QEMU_BACKING_FORMATS`]) written as given, also one cowclone does
/// not read (`host_device`), as qemu-img does; opening the backing file of such an image is then
/// refused.
pub fn rebase_header_only_named(path: &Path, name: &str, format_name: &str) -> Result<()> {
    if !crate::qcow2::create::QEMU_BACKING_FORMATS.contains(&format_name) {
        return Err(crate::qcow2::Qcow2Error::InvalidOption {
            option: "backing_fmt",
            value: format_name.to_owned(),
            reason: "not a qemu block driver name",
        }
        .into());
    }
    let mut image = open_without_backing(path)?;
    image.set_backing(Some((name, format_name)))?;
    image.flush()
}

/// Safe rebase's copy, decided as `qemu-img rebase` decides it (qemu-img.c, `img_rebase`): the
/// image is walked in steps of at most [`STEP`]; a step the image holds itself is passed over,
/// and so is one no image between it and the new backing file holds when the new backing file
/// lies in the old chain (both chains read the same there). Every other step, widened to whole
/// write units (subclusters, or clusters when compressing) the image does not hold, the old and
/// the new chain are read and compared in write units; each run of units that differ gets what
/// the old chain reads there, written as data (zeros included, so `qemu-img map` shows the same
/// allocation) — or as zero clusters past the old backing file's end, where qemu writes
/// zeroes. Ranges both chains report as zeros are not read. `progress(at, size)` is called after each step that was compared, as
/// qemu-img advances its progress. Returns the guest bytes written.
fn copy_differences<B: crate::io::Backend + Send + Sync>(
    image: &mut Qcow2Image<B>,
    new_chain: Option<&dyn GuestRead>,
    new_in_old_chain: Option<usize>,
    compress: bool,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let size = image.virtual_size();
    let unit = if compress {
        image.header().cluster_size()
    } else {
        image.unit_size()
    };
    let step = STEP.max(unit) / unit * unit;
    let old_end = image.below().map_or(0, |below| below.virtual_size());
    // A step widened to whole units spans at most two units more.
    let buffer = (step + 2 * unit) as usize;
    let (mut old, mut newer) = (vec![0u8; buffer], vec![0u8; buffer]);
    let mut compressed = compress.then(|| CompressedWriter::new(image));
    let mut copied = 0;
    let mut at = 0u64;
    while at < size {
        let own = image.block_status(GuestOffset(at), (size - at).min(step))?;
        let mut len = own.len;
        if own.is_allocated() {
            at += len;
            continue;
        }
        if let Some(layers) = new_in_old_chain {
            let (changed, run) = allocated_above(image.below(), layers, at, len)?;
            if !changed {
                at += run;
                continue;
            }
            len = run;
        }
        // qemu widens the range to whole write units (a skipped range may end inside one),
        // where the image holds none of them.
        let (start, end) = (at - at % unit, (at + len).next_multiple_of(unit).min(size));
        let (start, end) = if (start, end) != (at, at + len)
            && image
                .block_status(GuestOffset(start), end - start)
                .map(|e| !e.is_allocated() && e.len == end - start)?
        {
            (start, end)
        } else {
            (at, at + len)
        };
        // The part before the old backing file's end (its last unit included) takes the old
        // chain's data, the part after it zeros: compared apart.
        let mut part = start;
        while part < end {
            let mut part_end = end;
            if part < old_end {
                part_end = part_end.min(old_end.next_multiple_of(unit));
            }
            let n = (part_end - part) as usize;
            let (o, nw) = (&mut old[..n], &mut newer[..n]);
            let below = image.below();
            let old_extents = extents_of(below, part, n as u64)?;
            let new_extents = extents_of(new_chain, part, n as u64)?;
            let old_zero = reads_as_zeros(&old_extents);
            let new_zero = reads_as_zeros(&new_extents);
            if !(old_zero && new_zero) {
                // Both chains are read at once when both have data there (two page-cache
                // copies bound a rebase's time); a side that reads as zeros is not read.
                if old_zero || new_zero {
                    read_extents(below, &old_extents, o, part)?;
                    read_extents(new_chain, &new_extents, nw, part)?;
                } else {
                    std::thread::scope(|scope| {
                        let old_read =
                            scope.spawn(|| read_extents(below, &old_extents, &mut *o, part));
                        let new_read = read_extents(new_chain, &new_extents, &mut *nw, part);
                        let old_read = old_read.join().expect("a rebase read panicked");
                        old_read.and(new_read)
                    })?;
                }
            }
            if !(old_zero && new_zero) && o != nw {
                for (start, end) in differing_runs(o, nw, part, unit) {
                    let offset = part + start as u64;
                    if part >= old_end {
                        image.write_zeroes_over_backing(offset, (end - start) as u64)?;
                    } else if let Some(writer) = compressed.as_mut() {
                        write_compressed(image, writer, &o[start..end], offset, unit)?;
                    } else {
                        image.write_at(&o[start..end], offset)?;
                    }
                    copied += (end - start) as u64;
                }
            }
            part = part_end;
        }
        at = end;
        progress(at, size);
    }
    if let Some(writer) = compressed {
        writer.finish(image)?;
    }
    Ok(copied)
}

/// Whether one of the `layers` images at the top of `chain` holds the range of `len` bytes at
/// guest offset `at`, and for how long that answer holds from `at` (qemu's
/// `bdrv_is_allocated_above` down to the new backing file). The first image's end stops the
/// run; past it the range counts as held (qemu compares what lies past the old backing file's
/// end).
fn allocated_above(
    chain: Option<&dyn GuestRead>,
    layers: usize,
    at: u64,
    len: u64,
) -> Result<(bool, u64)> {
    let mut run = len;
    let mut layer = chain;
    for index in 0..layers {
        let Some(image) = layer else { break };
        let end = image.virtual_size();
        if at >= end {
            if index == 0 {
                return Ok((true, len));
            }
        } else {
            let extent = image.block_status(GuestOffset(at), run.min(end - at))?;
            if extent.is_allocated() {
                return Ok((true, extent.len));
            }
            run = run.min(extent.len);
        }
        layer = image.below();
    }
    Ok((false, run))
}

/// How many images below `image` the new backing file at `path` lies (1: it is the backing file
/// itself), when it is one of them: qemu-img then skips what none of the images above it
/// holds.
fn depth_in_chain(image: &dyn GuestRead, path: &Path) -> Option<usize> {
    let mut depth = 0;
    let mut layer = image.below();
    while let Some(current) = layer {
        depth += 1;
        if current
            .path()
            .is_some_and(|p| crate::open::same_file(p, path))
        {
            return Some(depth);
        }
        layer = current.below();
    }
    None
}

/// The runs (`start..end` indices) of `old` that differ from `new`, compared in `unit`s of the
/// guest (the buffers start at guest offset `at`); adjacent differing units form one run.
fn differing_runs(old: &[u8], new: &[u8], at: u64, unit: u64) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0usize;
    while pos < old.len() {
        let end = (pos + (unit - (at + pos as u64) % unit) as usize).min(old.len());
        if old[pos..end] != new[pos..end] {
            match runs.last_mut() {
                Some(run) if run.1 == pos => run.1 = end,
                _ => runs.push((pos, end)),
            }
        }
        pos = end;
    }
    runs
}

/// Writes `data` at guest `offset` through the compressed writer, one `cluster` at a time (a
/// piece that is not a whole cluster is written uncompressed by it).
fn write_compressed<B: crate::io::Backend + Send + Sync>(
    image: &mut Qcow2Image<B>,
    writer: &mut CompressedWriter,
    data: &[u8],
    offset: u64,
    cluster: u64,
) -> Result<()> {
    let mut pos = 0usize;
    while pos < data.len() {
        let at = offset + pos as u64;
        let end = (pos + (cluster - at % cluster) as usize).min(data.len());
        writer.write(image, &data[pos..end], at)?;
        pos = end;
    }
    Ok(())
}

/// The extents `chain` reports for `len` bytes at guest offset `offset`, up to its end (none
/// without a chain); what lies past them reads as zeros.
fn extents_of(chain: Option<&dyn GuestRead>, offset: u64, len: u64) -> Result<Vec<Extent>> {
    chain.map_or(Ok(Vec::new()), |chain| {
        chain::extents_until(chain, GuestOffset(offset), offset + len).collect()
    })
}

/// True if every extent reads as zeros without reading data.
fn reads_as_zeros(extents: &[Extent]) -> bool {
    extents.iter().all(Extent::reads_as_zeros)
}

/// Fills `buf` (guest bytes from `offset`) from `extents` of `chain`, found by [`extents_of`]:
/// their data read, the rest zeros.
fn read_extents(
    chain: Option<&dyn GuestRead>,
    extents: &[Extent],
    buf: &mut [u8],
    offset: u64,
) -> Result<()> {
    let mut filled = 0usize;
    if let Some(chain) = chain {
        for extent in extents {
            let piece = (extent.start.0 - offset) as usize..(extent.end().0 - offset) as usize;
            filled = piece.end;
            chain::read_extent(chain, extent, &mut buf[piece])?;
        }
    }
    buf[filled..].fill(0);
    Ok(())
}

/// Opens an image for writing without opening any backing file or external data file, for
/// changes of its header alone (no guest data is read or written).
fn open_without_backing(path: &Path) -> Result<Qcow2Image<std::fs::File>> {
    let file = crate::open::open_image(path, crate::open::OpenHow::write())?;
    let cluster = crate::qcow2::HeaderCluster::read_from(&file)?;
    Qcow2Image::open_rw_tables_only(file, cluster, WriteOptions::default())
}
