//! Shrinking that drops data, as `qemu-img resize --shrink` does
//! ([`Qcow2Image::shrink_dropping`]): the clusters wholly past the new end are unmapped and
//! freed, the data clusters freed are punched out of the file (qemu always passes this discard
//! down), the size is cut and the file truncated after its last cluster in use. cowclone's own
//! `resize --shrink` ([`Qcow2Image::resize`]) refuses instead when data lies past the new end.

use super::image::Qcow2Image;
use super::tables::{ClusterKind, COPIED};
use crate::io::Backend;
use crate::Result;

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// Shrinks the disk to `new_size` (rounded up to whole sectors) as `qemu-img resize
    /// --shrink` does: the clusters past the new end are dropped, their host clusters freed and
    /// the file cut after its last cluster in use. Growing is [`Qcow2Image::resize`]'s job.
    pub fn shrink_dropping(&mut self, new_size: u64) -> Result<()> {
        let new_size = super::create::round_size(new_size)
            .filter(|&size| size <= self.header.size)
            .ok_or(super::error::Qcow2Error::InvalidOption {
                option: "resize",
                value: new_size.to_string(),
                reason: "shrinking to a size larger than the disk",
            })?;
        let freed = self.drop_past(new_size)?;
        if !self.has_data_file() {
            // (A data file is truncated to the new size instead.)
            self.punch_holes(&freed);
        }
        let old_size = self.header.size;
        self.header.size = new_size;
        self.write_fixed_header()?;
        self.resize_data_file(old_size, new_size)?;
        self.shrink_to_used()
    }

    /// Unmaps every cluster that starts at or after `new_size` (rounded up to a cluster) and
    /// frees its host cluster, so that a following `resize(new_size, true)` succeeds; the
    /// cluster holding the new end keeps its data, as in qemu. Returns the host offsets of the
    /// data clusters this freed (those only this entry referenced).
    pub fn drop_past(&mut self, new_size: u64) -> Result<Vec<u64>> {
        let cluster_size = self.header.cluster_size();
        let mut freed = Vec::new();
        let mut pos = new_size.next_multiple_of(cluster_size);
        while pos < self.header.size {
            if let Some((table, index, entry)) = self.existing_entry(pos)? {
                if entry.entry != 0 || entry.bitmap != 0 {
                    self.set_l2_entry(table, index, 0, 0)?;
                    self.release(entry)?;
                    match self.kind_of(entry) {
                        ClusterKind::Normal { host } | ClusterKind::ZeroAllocated { host }
                            if entry.entry & COPIED != 0 =>
                        {
                            freed.push(host)
                        }
                        _ => {}
                    }
                }
            }
            pos += cluster_size;
        }
        Ok(freed)
    }

    /// Punches the host clusters at `hosts` out of the image file (runs of adjacent clusters at
    /// once), where the file system can; a discard, so failures are ignored.
    fn punch_holes(&self, hosts: &[u64]) {
        use rustix::fs::FallocateFlags;
        let Some(fd) = self.backend.as_fd() else {
            return;
        };
        let cluster_size = self.header.cluster_size();
        let mut sorted = hosts.to_vec();
        sorted.sort_unstable();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for host in sorted {
            match runs.last_mut() {
                Some((start, len)) if *start + *len == host => *len += cluster_size,
                _ => runs.push((host, cluster_size)),
            }
        }
        for (start, len) in runs {
            let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
            let _ = rustix::fs::fallocate(fd, flags, start, len);
        }
    }
}
