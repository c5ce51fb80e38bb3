//! qcow2 preallocation (`-o preallocation=metadata|falloc|full`, `resize --preallocation`):
//! every cluster of a guest range gets its L2 table and a data cluster, as qemu's
//! `preallocate_co` lays them out — per L2 table, the table first, then that table's data
//! clusters contiguously after it — so `qemu-img map` shows the same host offsets. `metadata`
//! leaves the data clusters as a sparse region of the file (qemu then reports them as data
//! reading zeros), `falloc` reserves them, `full` writes zeros.

use super::image::Qcow2Image;
use super::tables::COPIED;
use crate::io::Backend;
use crate::preallocate::{fill_host, Preallocation};
use crate::Result;

/// Allocation bits of an extended L2 entry's bitmap: every subcluster allocated.
const ALL_SUBCLUSTERS_ALLOCATED: u64 = 0xffff_ffff;

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// Preallocates the clusters covering guest bytes `from..to` (clipped to the disk) that are
    /// still unallocated, as `mode` says; allocated clusters are left as they are. `Off` does
    /// nothing.
    pub fn preallocate(&mut self, from: u64, to: u64, mode: Preallocation) -> Result<()> {
        if mode == Preallocation::Off {
            return Ok(());
        }
        let cluster_size = self.header.cluster_size();
        let per_table = self.header.l2_entries();
        let extended = self.header.extended_l2();
        let end = to.min(self.header.size);
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
            let host = self.alloc_contiguous(count)?;
            fill_host(&self.backend, host, count * cluster_size, mode)?;
            self.barrier()?;
            let entries: Vec<u64> = (0..count)
                .map(|i| (host + i * cluster_size) | COPIED)
                .collect();
            if extended {
                for (i, entry) in entries.iter().enumerate() {
                    self.set_l2_entry(table, index + i, *entry, ALL_SUBCLUSTERS_ALLOCATED)?;
                }
            } else {
                self.set_l2_entries(table, index, &entries)?;
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
        let cluster_size = self.header.cluster_size();
        let per_table = self.header.l2_entries();
        let extended = self.header.extended_l2();
        let end = self.header.size;
        let mut pos = 0;
        while pos < end {
            let (table, index, _) = self.l2_for_write(pos)?;
            let count = (end - pos)
                .div_ceil(cluster_size)
                .min(per_table - index as u64);
            let entries: Vec<u64> = (0..count)
                .map(|i| (pos + i * cluster_size) | COPIED)
                .collect();
            if extended {
                for (i, entry) in entries.iter().enumerate() {
                    self.set_l2_entry(table, index + i, *entry, 0)?;
                }
            } else {
                self.set_l2_entries(table, index, &entries)?;
            }
            pos += count * cluster_size;
        }
        Ok(())
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
    fn extended_l2_entries_mark_every_subcluster_allocated() {
        let options = CreateOptions {
            extended_l2: true,
            ..CreateOptions::default()
        };
        let image = preallocated(256 << 10, Preallocation::Full, &options);
        let entry = image.l2_entry(0).unwrap().unwrap();
        assert_eq!(entry.bitmap, super::ALL_SUBCLUSTERS_ALLOCATED);
    }

    const COPIED_MASK: u64 = super::COPIED;
}
