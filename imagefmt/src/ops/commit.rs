//! `commit`: fold an overlay's own clusters into its backing image, then (by default) empty the
//! overlay so it reads through to the updated backing image, as `qemu-img commit` does.
//!
//! Only what the overlay itself holds is touched, by its own extents: data ranges are copied
//! (read straight from the overlay's file, which the commit holds under its write lock,
//! through a memory mapping of up to 1 MiB at a time, as qemu's mirror job requests it), zero
//! ranges become zeros in the backing image without data (zero clusters in qcow2, holes in a
//! raw file), unallocated ranges are skipped. Emptying frees every cluster and shrinks the file, as qemu does.

use std::os::fd::AsFd;
use std::path::Path;

use crate::backing::BackingPolicy;
use crate::chain::{self, open_qcow2_rw_alone, open_qcow2_rw_with, ChainOptions};
use crate::detect::ImageFormat;
use crate::extent::GuestRead;
use crate::io::{start_writeback, Backend, MappedRange};
use crate::offsets::GuestOffset;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::WriteOptions;
use crate::{Error, Result};

/// The largest data request of qemu's mirror job (its `MAX_IO_BYTES`), which `qemu-img
/// commit` runs: commit copies in requests of this size and counts its progress by them.
const MIRROR_REQUEST: u64 = 1 << 20;

/// How far one pass of qemu's mirror job reaches from where a run of held ranges starts (its
/// default buffer, 16 requests): a request never crosses the end of such a window.
const MIRROR_WINDOW: u64 = 16 << 20;

/// Data bytes written into the backing image between two calls that start their writeback:
/// the disk then writes while the commit copies, and the final fsync waits for the rest only.
const WRITEBACK_STEP: u64 = 16 << 20;

/// Starts the base's writeback every [`WRITEBACK_STEP`] bytes written, so the final fsync
/// waits less.
#[derive(Default)]
struct Writeback {
    unsynced: u64,
}

impl Writeback {
    /// Counts `len` bytes just written to `fd`.
    fn wrote(&mut self, fd: std::os::fd::BorrowedFd<'_>, len: usize) {
        self.unsynced += len as u64;
        if self.unsynced >= WRITEBACK_STEP {
            start_writeback(fd);
            self.unsynced = 0;
        }
    }
}

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitStats {
    /// Guest bytes copied into the backing image.
    pub bytes_committed: u64,
}

/// Commits the qcow2 overlay at `path` into its backing image (qcow2 or raw). With `keep`, the
/// overlay is left as it was (`qemu-img commit -d`); otherwise it is emptied.
pub fn commit(path: &Path, policy: &BackingPolicy, keep: bool) -> Result<CommitStats> {
    commit_into(path, &ChainOptions::new(policy), keep, None, &mut |_, _| {})
}

/// [`commit`] into `base` (`qemu-img commit -b BASE`): an image further down the backing chain,
/// named as the chain names it or by a path to the same file (relative to the directory of the image
/// whose backing file it is, as qemu-img takes it). What the overlay and the images
/// between it and `base` (qcow2) hold is written into `base`; as with qemu-img, naming a base
/// implies `keep` (the images above it would no longer read what they did). `progress(done,
/// total)` counts bytes committed as qemu's commit job counts them: `(0, 0)` once the overlay
/// is open, `(0, total)` before the first write, then after each write (of at most 1 MiB of
/// data, as qemu's mirror job requests it). Backing files are found under `chain`'s policy; the
/// external data files of the images (top, intermediates, base) are opened for writing where
/// `chain` allows data files (`chain.data_file` names the top image's).
pub fn commit_into(
    path: &Path,
    chain: &ChainOptions<'_>,
    keep: bool,
    base: Option<&str>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<CommitStats> {
    let keep = keep || base.is_some();
    let policy = chain.policy;
    // The overlay alone: its own clusters are all that is read, and its backing file is opened
    // below for writing (a read-locked copy of it here would conflict with that write lock).
    let mut top = open_qcow2_rw_alone(path, chain, WriteOptions::default())?;
    progress(0, 0);
    // The images below have data files of their own, never the one named for the top.
    let below_top = ChainOptions {
        data_file: None,
        ..*chain
    };
    let mut guard = crate::backing::ChainGuard::default();
    guard.enter(
        path,
        &top.backend()
            .metadata()
            .map_err(Error::io("reading metadata"))?,
    )?;
    // Walk down to the base: every image passed on the way is an intermediate, opened for
    // writing without its backing file (qemu-img takes write permission on them too).
    let mut intermediates: Vec<Qcow2Image<std::fs::File>> = Vec::new();
    let mut cluster = crate::qcow2::HeaderCluster::read_from(top.backend())?;
    let mut above = path.to_owned();
    let (backing_path, format) = loop {
        let Some(name) = cluster.backing_file.clone() else {
            return Err(match base {
                Some(base) => Error::BaseNotInChain {
                    base: base.to_owned(),
                    image: path.to_owned(),
                },
                None => Error::UnsupportedFormat {
                    name: "commit of an image without a backing file".into(),
                },
            });
        };
        let backing_path = policy.resolve(&above, &name)?;
        guard.refuse_seen(&backing_path)?;
        let format = match cluster.backing_format() {
            Some(f) => f.parse()?,
            None => crate::image::read_file_header(&backing_path)?.1.format(),
        };
        if base.is_none_or(|base| names_base(base, &name, &above, &backing_path)) {
            break (backing_path, format);
        }
        if format != ImageFormat::Qcow2 {
            return Err(Error::UnsupportedFormat {
                name: format!("commit through a {} intermediate image", format.name()),
            });
        }
        let image = open_qcow2_rw_alone(&backing_path, &below_top, WriteOptions::default())?;
        guard.enter(
            &backing_path,
            &image
                .backend()
                .metadata()
                .map_err(Error::io("reading metadata"))?,
        )?;
        cluster = crate::qcow2::HeaderCluster::read_from(image.backend())?;
        above = backing_path;
        intermediates.push(image);
    };
    let through = !intermediates.is_empty();
    let mut below: Option<Box<dyn GuestRead>> = None;
    for mut image in intermediates.into_iter().rev() {
        image.set_below(below);
        below = Some(Box::new(image));
    }
    if through {
        top.set_below(below);
    }
    let mut stats = CommitStats::default();
    // The base stays locked until the overlay is emptied (a duplicate descriptor shares the
    // open file description, and so its locks).
    let _held_base: std::fs::File = match format {
        ImageFormat::Qcow2 => {
            let mut base = open_qcow2_rw_with(&backing_path, &below_top, WriteOptions::default())?;
            if base.virtual_size() < top.virtual_size() {
                base.resize(top.virtual_size(), false)?;
            }
            let mut writeback = Writeback::default();
            for_each_own_extent(
                &top,
                through,
                &mut stats,
                progress,
                |piece, offset| match piece {
                    Piece::Data(data) => {
                        base.write_at(data, offset)?;
                        writeback.wrote(AsFd::as_fd(base.backend()), data.len());
                        Ok(())
                    }
                    Piece::Zeros(len) => base.write_zeroes(offset, len),
                },
            )?;
            base.flush()?;
            base.backend()
                .try_clone()
                .map_err(Error::io("duplicating the base's descriptor"))?
        }
        ImageFormat::Raw => {
            let file = crate::open::open_image(&backing_path, crate::open::OpenHow::write())?;
            if file
                .metadata()
                .map_err(Error::io("reading metadata"))?
                .len()
                < top.virtual_size()
            {
                file.set_len(top.virtual_size())
                    .map_err(Error::writing("raw backing image length"))?;
            }
            let mut writeback = Writeback::default();
            for_each_own_extent(
                &top,
                through,
                &mut stats,
                progress,
                |piece, offset| match piece {
                    Piece::Data(data) => {
                        Backend::write_all_at(&file, data, offset)
                            .map_err(Error::writing("raw backing image"))?;
                        writeback.wrote(AsFd::as_fd(&file), data.len());
                        Ok(())
                    }
                    Piece::Zeros(len) => zero_raw(&file, offset, len),
                },
            )?;
            file.sync_all()
                .map_err(Error::io("syncing the backing image"))?;
            file
        }
        ImageFormat::Vdi => {
            return Err(Error::UnsupportedFormat {
                name: "commit into a VDI backing image (arrives with the VDI engine)".into(),
            })
        }
    };
    if !keep {
        top.make_empty()?;
        top.shrink_to_used()?;
    }
    top.flush()?;
    Ok(stats)
}

/// A piece of the overlay's own content.
enum Piece<'a> {
    /// Data bytes.
    Data(&'a [u8]),
    /// A run of zeros of this length.
    Zeros(u64),
}

/// Hands every range the overlay itself holds to `apply`, by the overlay's own extents (not
/// its backing chain's; with `through`, those of the overlay and the intermediate images below
/// it, which end above the base), in the requests of qemu's mirror job, which `qemu-img
/// commit` runs: a window of at most [`MIRROR_WINDOW`] bytes from where a run of held ranges
/// starts (the next window where it ends), cut into data requests of at most
/// [`MIRROR_REQUEST`] bytes and one zero request per zero range. `progress(done, total)`
/// counts bytes as that job does: once before the first request (`done` 0, `total` every
/// byte the overlay holds), then after each request.
fn for_each_own_extent<B: Backend + Send + Sync>(
    top: &Qcow2Image<B>,
    through: bool,
    stats: &mut CommitStats,
    progress: &mut dyn FnMut(u64, u64),
    mut apply: impl FnMut(Piece<'_>, u64) -> Result<()>,
) -> Result<()> {
    let size = top.virtual_size();
    let status = |at: GuestOffset| {
        if through {
            chain::block_status(top, at, size - at.0)
        } else {
            top.block_status(at, size - at.0)
        }
    };
    // What the job will copy, counted from the metadata before the first request.
    let mut total = 0;
    let mut at = GuestOffset(0);
    while at.0 < size {
        let extent = status(at)?;
        if extent.is_allocated() {
            total += extent.len;
        }
        at = extent.end();
    }
    progress(0, total);
    let mut done = 0;
    let mut window_end = 0;
    let mut buf = Vec::new();
    let mut at = GuestOffset(0);
    while at.0 < size {
        let extent = status(at)?;
        at = extent.end();
        if !extent.is_allocated() {
            continue;
        }
        stats.bytes_committed += extent.len;
        let mut piece = Some(extent);
        while let Some(current) = piece {
            if current.start.0 >= window_end {
                window_end = current.start.0 + MIRROR_WINDOW;
            }
            let cut = if current.reads_as_zeros() {
                window_end
            } else {
                window_end.min(current.start.0 + MIRROR_REQUEST)
            };
            let (head, rest) = current.split_at(cut);
            piece = rest;
            if head.reads_as_zeros() {
                apply(Piece::Zeros(head.len), head.start.0)?;
                done += head.len;
                progress(done, total);
                continue;
            }
            // The overlay is held under its write lock: its data can be read through a
            // mapping, without a copy (pread where the range cannot be mapped).
            let mapped = match chain::verbatim_source(top, &head) {
                Some((fd, host)) => MappedRange::new(fd, host, head.len as usize)
                    .map_err(Error::reading("overlay data"))?,
                None => None,
            };
            if let Some(map) = mapped {
                apply(Piece::Data(map.bytes()), head.start.0)?;
            } else {
                buf.resize(head.len as usize, 0);
                chain::read_extent(top, &head, &mut buf)?;
                apply(Piece::Data(&buf), head.start.0)?;
            }
            done += head.len;
            progress(done, total);
        }
    }
    Ok(())
}

/// True if `base` (as given to `-b`) names the backing file of `above` stored as `name`, found
/// at `path`: spelled the same, or the same file — a relative `base` taken, as qemu takes it,
/// relative to `above`'s directory (not the working directory).
fn names_base(base: &str, name: &str, above: &Path, path: &Path) -> bool {
    if base == name {
        return true;
    }
    crate::backing::resolve(above, base).is_ok_and(|base| crate::open::same_file(&base, path))
}

/// Makes `len` bytes at `offset` of a raw file read as zeros ([`crate::io::zero_range`]).
pub(crate) fn zero_raw(file: &std::fs::File, offset: u64, len: u64) -> Result<()> {
    crate::io::zero_range(file, offset, len, "raw backing image")
}
