//! `rebase`: point an overlay at a different backing file. Unsafe mode (`-u`) only rewrites the
//! header. Safe mode first copies into the overlay every unit it does not itself allocate whose
//! content differs between the old and the new backing chain, so the guest sees the same data.

use std::path::Path;

use crate::backing::BackingPolicy;
use crate::chain::{open_chain, open_qcow2_rw, read_below, GuestRead};
use crate::detect::ImageFormat;
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
        let size = image.virtual_size();
        let unit = image.unit_size();
        let mut old = vec![0u8; unit as usize];
        let mut newer = vec![0u8; unit as usize];
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(unit) as usize;
            if !image.is_allocated_here(offset)? {
                image.read_at(&mut old[..len], offset)?;
                read_below(new_chain.as_deref(), &mut newer[..len], offset)?;
                if old[..len] != newer[..len] {
                    image.write_at(&old[..len], offset)?;
                    copied += len as u64;
                }
            }
            offset += len as u64;
        }
    }
    image.set_backing(new.as_ref().map(|(n, f)| (n.as_str(), f.name())))?;
    image.set_below(new_chain);
    image.flush()?;
    Ok(copied)
}

/// Opens an image for writing without opening any backing file (for header-only changes).
fn open_without_backing(path: &Path) -> Result<crate::qcow2::image::Qcow2Image<std::fs::File>> {
    let file = crate::open::open_image(path, crate::open::OpenHow::write())?;
    let cluster = crate::qcow2::HeaderCluster::read_from(&file)?;
    crate::qcow2::image::Qcow2Image::open_rw(file, cluster, None, WriteOptions::default())
}
