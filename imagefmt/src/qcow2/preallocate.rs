//! qcow2 preallocation (`-o preallocation=metadata|falloc|full`, `resize --preallocation`):
//! every cluster of a guest range gets its L2 table and a data cluster, as qemu's
//! `preallocate_co` lays them out — per L2 table, the table first, then that table's data
//! clusters contiguously after it — so `qemu-img map` shows the same host offsets. `metadata`
//! leaves the data clusters as a sparse region of the file (qemu then reports them as data
//! reading zeros) except for the parts of partly covered clusters outside the range, which get
//! zeros written as qemu's copy on write writes them; `falloc` reserves them, `full` writes
//! zeros.
//!
//! What the new L2 entries say follows qemu (checked with `qemu-img map` and the entries'
//! bits): a new image's clusters ([`Qcow2Image::preallocate`]) are plain allocated clusters,
//! with extended L2 entries marking no subcluster allocated (a backing file shows through them).
//! A grown image ([`Qcow2Image::grow_preallocated`], qemu's `qcow2_co_truncate`) gets its
//! clusters first and is zeroed after: the old last cluster is completed from the backing file
//! before it is preallocated; `metadata` marks the new clusters zero (keeping their host
//! clusters) where a backing file longer than the old size would show through, and always in
//! extended L2 entries; `falloc` and `full` clusters are allocated data that reads zeros.

use super::image::Qcow2Image;
use super::tables::{COPIED, ZERO};
use crate::extent::GuestRead;
use crate::io::Backend;
use crate::preallocate::{fill_host, Preallocation};
use crate::Result;

/// Allocation bits of an extended L2 entry's bitmap: every subcluster allocated.
const ALL_SUBCLUSTERS_ALLOCATED: u64 = 0xffff_ffff;
/// Zero bits of an extended L2 entry's bitmap: every subcluster reads zeros.
const ALL_SUBCLUSTERS_ZERO: u64 = 0xffff_ffff << 32;

/// What the L2 entries of newly preallocated clusters say beyond their host offset.
#[derive(Debug, Clone, Copy)]
struct NewEntries {
    /// Standard entries: the zero flag is set.
    zero_flag: bool,
    /// Extended entries: the subcluster bitmap.
    bitmap: u64,
}

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// Preallocates the clusters covering guest bytes `from..to` (clipped to the disk) that are
    /// still unallocated, as `mode` says, as qemu preallocates a new image; allocated clusters
    /// are left as they are. `Off` does nothing.
    pub fn preallocate(&mut self, from: u64, to: u64, mode: Preallocation) -> Result<()> {
        let entries = NewEntries {
            zero_flag: false,
            bitmap: 0,
        };
        self.preallocate_as(from, to, mode, entries)
    }

    /// Grows the disk to `new_size` (rounded up to whole sectors) with the added range
    /// preallocated as `mode` says, in qemu's order (see the module documentation). The added
    /// range reads as zeros even where a longer backing file lies below it.
    pub fn grow_preallocated(&mut self, new_size: u64, mode: Preallocation) -> Result<()> {
        let old_size = self.header.size;
        let new_size = super::create::round_size(new_size)
            .filter(|&size| size >= old_size)
            .ok_or(super::error::Qcow2Error::InvalidOption {
                option: "resize",
                value: new_size.to_string(),
                reason: "growing to a size smaller than the disk",
            })?;
        if mode == Preallocation::Off {
            return self.resize(new_size, false);
        }
        let cluster_size = self.header.cluster_size();
        self.set_virtual_size_only(new_size)?;
        let below_end = self.below.as_ref().map_or(0, |below| below.virtual_size());
        let head_end = old_size.next_multiple_of(cluster_size).min(new_size);
        let head_allocated = self
            .l2_entry(old_size)?
            .is_some_and(|e| e.entry != 0 || e.bitmap != 0);
        let shows_through = below_end > old_size;
        if head_end > old_size && (shows_through || head_allocated) {
            // The old last cluster's tail is zeroed (qemu writes these zeros after
            // preallocating; the cluster comes out as data either way).
            self.write_at(&vec![0u8; (head_end - old_size) as usize], old_size)?;
        }
        let entries = match mode {
            Preallocation::Metadata => NewEntries {
                zero_flag: shows_through,
                bitmap: ALL_SUBCLUSTERS_ZERO,
            },
            _ => NewEntries {
                zero_flag: false,
                bitmap: ALL_SUBCLUSTERS_ALLOCATED,
            },
        };
        self.preallocate_as(old_size, new_size, mode, entries)
    }

    /// [`Self::preallocate`] with `entries` saying what the new L2 entries hold.
    fn preallocate_as(
        &mut self,
        from: u64,
        to: u64,
        mode: Preallocation,
        entries: NewEntries,
    ) -> Result<()> {
        if mode == Preallocation::Off {
            return Ok(());
        }
        let cluster_size = self.header.cluster_size();
        let per_table = self.header.l2_entries();
        let extended = self.header.extended_l2();
        let end = to.min(self.header.size);
        let flags = COPIED | if entries.zero_flag { ZERO } else { 0 };
        let mut pos = from - from % cluster_size;
        while pos < end {
            // The L2 table first (allocated here if missing), as qemu does.
            let (table, index, entry) = self.l2_for_write(pos)?;
            let in_table = per_table - index as u64;
            let wanted = (end - pos).div_ceil(cluster_size).min(in_table);
            let mut count = u64::from(entry.entry == 0 && entry.bitmap == 0);
            if count == 0 {
                pos += cluster_size;
                continue;
            }
            while count < wanted {
                match self.l2_entry(pos + count * cluster_size)? {
                    Some(e) if e.entry == 0 && e.bitmap == 0 => count += 1,
                    _ => break,
                }
            }
            let host = self.alloc_data(pos, count, true)?;
            let in_data_file = self.has_data_file();
            match &self.data_file {
                // The data file is as long as the disk: nothing is filled past its end.
                Some(file) => fill_host(
                    file.as_ref(),
                    host,
                    (count * cluster_size).min(self.header.size - pos),
                    mode,
                )?,
                None => fill_host(&self.backend, host, count * cluster_size, mode)?,
            }
            // qemu copies on write the parts of the run's first and last clusters outside the
            // range: the guest data before it (from a backing file) and zeros after it (which
            // `falloc` and `full` have already); the rest of a `metadata` region stays sparse.
            if pos < from {
                let mut head = vec![0u8; (from - pos) as usize];
                self.read_at(&mut head, crate::offsets::GuestOffset(pos))?;
                self.write_data(&head, host)?;
            }
            let run_end = pos + count * cluster_size;
            if run_end > end && mode == Preallocation::Metadata && !in_data_file {
                let at = host + (end - pos);
                fill_host(&self.backend, at, run_end - end, Preallocation::Full)?;
            }
            self.barrier()?;
            if extended {
                for i in 0..count {
                    let entry = (host + i * cluster_size) | COPIED;
                    self.set_l2_entry(table, index + i as usize, entry, entries.bitmap)?;
                }
            } else {
                let new: Vec<u64> = (0..count)
                    .map(|i| (host + i * cluster_size) | flags)
                    .collect();
                self.set_l2_entries(table, index, &new)?;
            }
            pos += count * cluster_size;
        }
        Ok(())
    }
}

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// Maps every cluster of the disk to the same offset of an external data file, as qemu-img
    /// does when it creates an image with `data_file_raw=on` (its metadata preallocation with a
    /// data file): per L2 table, the table (allocated here, the only space taken in the image
    /// file), then its entries, each the guest offset with COPIED set (extended L2: no
    /// subcluster bits, as qemu writes them). Called on the new image before its header names
    /// the data file.
    pub(crate) fn map_raw_data_file(&mut self) -> Result<()> {
        self.map_data_file_range(0, self.header.size)
    }
}

#[cfg(test)]
mod tests {
    use crate::extent::GuestRead;
    use crate::io::MemBackend;
    use crate::preallocate::Preallocation;
    use crate::qcow2::create::write_new_image;
    use crate::qcow2::image::Qcow2Image;
    use crate::qcow2::write::WriteOptions;
    use crate::qcow2::{CreateOptions, HeaderCluster};

    fn preallocated(
        size: u64,
        mode: Preallocation,
        options: &CreateOptions,
    ) -> Qcow2Image<MemBackend> {
        let backend = MemBackend::default();
        write_new_image(&backend, size, options, None).unwrap();
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        let mut image =
            Qcow2Image::open_rw(backend, cluster, None, WriteOptions::default()).unwrap();
        image.preallocate(0, size, mode).unwrap();
        image
    }

    #[test]
    fn metadata_allocates_the_table_then_its_data_clusters_and_reads_zeros() {
        let image = preallocated(1 << 20, Preallocation::Metadata, &CreateOptions::default());
        // header, refcount table, refcount block, L1; then the L2 table; then 16 data clusters.
        assert_eq!(image.l1[0] & !COPIED_MASK, 0x40000);
        for i in 0..16u64 {
            let entry = image.l2_entry(i << 16).unwrap().unwrap();
            assert_eq!(
                entry.entry & !COPIED_MASK,
                0x50000 + (i << 16),
                "cluster {i}"
            );
        }
        let mut buf = vec![1u8; 1 << 20];
        image
            .read_at(&mut buf, crate::offsets::GuestOffset(0))
            .unwrap();
        assert!(buf.iter().all(|&b| b == 0));
        assert_eq!(image.backend.to_vec().len(), 0x50000 + (1 << 20));
    }

    #[test]
    fn new_extended_l2_entries_mark_no_subcluster_allocated_as_qemu_does() {
        let options = CreateOptions {
            extended_l2: true,
            ..CreateOptions::default()
        };
        let image = preallocated(256 << 10, Preallocation::Full, &options);
        let entry = image.l2_entry(0).unwrap().unwrap();
        assert_ne!(entry.entry & !COPIED_MASK, 0);
        assert_eq!(entry.bitmap, 0);
    }

    const COPIED_MASK: u64 = super::COPIED;
}
