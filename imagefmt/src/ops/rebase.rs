//! `rebase`: point an overlay at a different backing file. Unsafe mode (`-u`) only rewrites the
//! header. Safe mode first copies into the overlay every range it does not itself allocate whose
//! content differs between the old and the new backing chain, so the guest sees the same data:
//! ranges both chains report as zeros are not read, and zeros are written as zero clusters.

use std::path::Path;

use crate::backing::BackingPolicy;
use crate::chain::{self, open_chain, open_qcow2_rw};
use crate::detect::ImageFormat;
use crate::extent::GuestRead;
use crate::offsets::GuestOffset;
use crate::ops::compare::CHUNK;
use crate::ops::convert;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::WriteOptions;
use crate::Result;

/// The new backing file: its name (stored verbatim) and format; `None` removes the backing file
/// (safe mode then copies all backing data into the image).
pub type NewBacking = Option<(String, ImageFormat)>;

/// Rebases the qcow2 image at `path`. Returns the guest bytes copied into it.
pub fn rebase(
    path: &Path,
    new: &NewBacking,
    unsafe_header_only: bool,
    policy: &BackingPolicy,
) -> Result<u64> {
    rebase_with_progress(path, new, unsafe_header_only, policy, &mut |_, _| {})
}

/// [`rebase`], calling `progress(done, total)` (guest offsets) as the safe copy proceeds.
pub fn rebase_with_progress(
    path: &Path,
    new: &NewBacking,
    unsafe_header_only: bool,
    policy: &BackingPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let header_policy = if unsafe_header_only {
        &BackingPolicy::Deny
    } else {
        policy
    };
    let mut image = if unsafe_header_only {
        open_without_backing(path)?
    } else {
        open_qcow2_rw(path, header_policy, WriteOptions::default())?
    };
    let mut copied = 0;
    let new_chain: Option<Box<dyn GuestRead>> = match new {
        Some((name, format)) if !unsafe_header_only => {
            let resolved = crate::backing::resolve(path, name)?;
            Some(open_chain(&resolved, Some(*format), policy)?)
        }
        _ => None,
    };
    if !unsafe_header_only {
        copied = copy_differences(&mut image, new_chain.as_deref(), progress)?;
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

/// Safe rebase's copy: for every range the image does not hold itself (by its own extents),
/// compares what the old chain and the new one read there, skipping ranges both report as zeros
/// without reading; a range that differs gets the old content: data as data, zeros as zero
/// clusters (never allocated data). Returns the guest bytes written.
fn copy_differences<B: crate::io::Backend + Send + Sync>(
    image: &mut Qcow2Image<B>,
    new_chain: Option<&dyn GuestRead>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<u64> {
    let size = image.virtual_size();
    let unit = image.unit_size();
    let step = unit.max(CHUNK as u64) / unit * unit;
    let (mut old, mut newer) = (vec![0u8; step as usize], vec![0u8; step as usize]);
    let mut copied = 0;
    let mut at = 0u64;
    while at < size {
        let own = image.block_status(GuestOffset(at), (size - at).min(step))?;
        let len = own.len;
        if !own.is_allocated() {
            let (o, n) = (&mut old[..len as usize], &mut newer[..len as usize]);
            let old_zero = read_or_zeros(image.below(), o, at)?;
            let new_zero = read_or_zeros(new_chain, n, at)?;
            if !(old_zero && new_zero) && o != n {
                // Only the units that differ.
                let mut pos = 0usize;
                while pos < o.len() {
                    let end = (pos + (unit - (at + pos as u64) % unit) as usize).min(o.len());
                    let (a, b) = (&o[pos..end], &n[pos..end]);
                    if a != b {
                        if convert::is_zero(a) {
                            // The new chain reads data here: zero it even if the old reads zero.
                            image.write_zeroes_over_backing(at + pos as u64, a.len() as u64)?;
                        } else {
                            image.write_at(a, at + pos as u64)?;
                        }
                        copied += a.len() as u64;
                    }
                    pos = end;
                }
            }
        }
        at += len;
        progress(at, size);
    }
    Ok(copied)
}

/// Reads `buf` at `offset` from `chain` (zeros past its end or without one), reading only what
/// its extents call data; returns true if the whole range was known to be zeros without reading.
fn read_or_zeros(chain: Option<&dyn GuestRead>, buf: &mut [u8], offset: u64) -> Result<bool> {
    let end = offset + buf.len() as u64;
    let Some(chain) = chain else {
        buf.fill(0);
        return Ok(true);
    };
    let inside = chain.virtual_size().clamp(offset, end);
    buf[(inside - offset) as usize..].fill(0);
    let mut all_zero = true;
    let mut at = offset;
    while at < inside {
        let extent = chain::block_status(chain, GuestOffset(at), inside - at)?;
        let piece = &mut buf[(at - offset) as usize..(extent.end().0 - offset) as usize];
        all_zero &= extent.reads_as_zeros();
        chain::read_extent(chain, &extent, piece)?;
        at = extent.end().0;
    }
    Ok(all_zero)
}

/// Opens an image for writing without opening any backing file (for header-only changes).
fn open_without_backing(path: &Path) -> Result<Qcow2Image<std::fs::File>> {
    let file = crate::open::open_image(path, crate::open::OpenHow::write())?;
    let cluster = crate::qcow2::HeaderCluster::read_from(&file)?;
    Qcow2Image::open_rw(file, cluster, None, WriteOptions::default())
}
