//! `commit`: fold an overlay's own clusters into its backing image, then (by default) empty the
//! overlay so it reads through to the updated backing image, as `qemu-img commit` does.

use std::path::Path;

use crate::backing::BackingPolicy;
use crate::chain::{open_qcow2_rw, GuestRead};
use crate::detect::ImageFormat;
use crate::io::Backend;
use crate::qcow2::write::WriteOptions;
use crate::{Error, Result};

/// What a commit did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CommitStats {
    /// Guest bytes copied into the backing image.
    pub bytes_committed: u64,
}

/// Commits the qcow2 overlay at `path` into its backing image (qcow2 or raw). With `keep`, the
/// overlay is left as it was (`qemu-img commit -d`); otherwise it is emptied.
pub fn commit(path: &Path, policy: &BackingPolicy, keep: bool) -> Result<CommitStats> {
    // The overlay alone: its own clusters are all that is read, and its backing file is opened
    // below for writing (a read-locked copy of it here would conflict with that write lock).
    let mut top = open_qcow2_rw(path, &BackingPolicy::Detach, WriteOptions::default())?;
    let cluster = crate::qcow2::HeaderCluster::read_from(top.backend())?;
    let Some(name) = cluster.backing_file.clone() else {
        return Err(Error::UnsupportedFormat {
            name: "commit of an image without a backing file".into(),
        });
    };
    let backing_path = policy.resolve(path, &name)?;
    let mut guard = crate::backing::ChainGuard::default();
    guard.enter(
        path,
        &top.backend()
            .metadata()
            .map_err(Error::io("reading metadata"))?,
    )?;
    guard.refuse_seen(&backing_path)?;
    let format = match cluster.backing_format() {
        Some(f) => f.parse()?,
        None => crate::image::read_file_header(&backing_path)?.1.format(),
    };
    let size = top.virtual_size();
    let unit = top.unit_size();
    let mut buf = vec![0u8; unit as usize];
    let mut stats = CommitStats::default();
    // The base stays locked until the overlay is emptied (a duplicate descriptor shares the
    // open file description, and so its locks).
    let _held_base: std::fs::File = match format {
        ImageFormat::Qcow2 => {
            let mut base = open_qcow2_rw(&backing_path, policy, WriteOptions::default())?;
            if base.virtual_size() < size {
                base.resize(size, false)?;
            }
            for_each_allocated(&top, size, unit, &mut buf, |data, offset| {
                stats.bytes_committed += data.len() as u64;
                base.write_at(data, offset)
            })?;
            base.flush()?;
            base.backend()
                .try_clone()
                .map_err(Error::io("duplicating the base's descriptor"))?
        }
        ImageFormat::Raw => {
            let file = crate::open::open_image(&backing_path, crate::open::OpenHow::write())?;
            for_each_allocated(&top, size, unit, &mut buf, |data, offset| {
                stats.bytes_committed += data.len() as u64;
                Backend::write_all_at(&file, data, offset)
                    .map_err(Error::writing("raw backing image"))
            })?;
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
    }
    top.flush()?;
    Ok(stats)
}

fn for_each_allocated<B: Backend + Send + Sync>(
    top: &crate::qcow2::image::Qcow2Image<B>,
    size: u64,
    unit: u64,
    buf: &mut [u8],
    mut apply: impl FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(unit) as usize;
        if top.is_allocated_here(offset)? {
            top.read_at(&mut buf[..len], offset)?;
            apply(&buf[..len], offset)?;
        }
        offset += len as u64;
    }
    Ok(())
}
