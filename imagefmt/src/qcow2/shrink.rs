//! Shrinking that drops data, as `qemu-img resize --shrink` does: the clusters wholly past the
//! new end are unmapped and freed before [`Qcow2Image::resize`] cuts the size. cowclone's own
//! `resize --shrink` refuses instead when data lies there; this is the qemu-img behaviour.

use super::image::Qcow2Image;
use crate::io::Backend;
use crate::Result;

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// Unmaps every cluster that starts at or after `new_size` (rounded up to a cluster) and
    /// frees its host cluster, so that a following `resize(new_size, true)` succeeds; the
    /// cluster holding the new end keeps its data, as in qemu.
    pub fn drop_past(&mut self, new_size: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let mut pos = new_size.next_multiple_of(cluster_size);
        while pos < self.header.size {
            if let Some((table, index, entry)) = self.existing_entry(pos)? {
                if entry.entry != 0 || entry.bitmap != 0 {
                    self.set_l2_entry(table, index, 0, 0)?;
                    self.release(entry)?;
                }
            }
            pos += cluster_size;
        }
        Ok(())
    }
}
