//! Writing an image that keeps its guest data in an external data file (incompatible bit 2),
//! as qemu writes one: a data cluster lives in the data file at its guest offset, so
//! `Qcow2Image::alloc_data` hands out the guest offset and no refcount is kept for it; the
//! image file holds metadata only. This module keeps the data file in step with the image:
//! its length follows the virtual size (qemu grows and truncates it with the disk), and with
//! `data_file_raw` it stays a valid raw image of the disk — every cluster mapped at its guest
//! offset (also the clusters a resize adds) and zeros written into it wherever the disk is
//! zeroed. Compressed clusters cannot live in a data file and are refused
//! ([`super::compressed_writer`]); internal snapshots are refused as qemu refuses them
//! ([`super::snapshot_ops`]).

use super::features::AutoclearFeatures;
use super::image::Qcow2Image;
use super::tables::COPIED;
use crate::io::Backend;
use crate::{Error, Result};

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// True if the image's data file is kept a raw image of the disk (`data_file_raw`).
    pub(super) fn data_file_is_raw(&self) -> bool {
        self.has_data_file()
            && self
                .header
                .autoclear_features
                .contains(AutoclearFeatures::RAW_EXTERNAL)
    }

    /// Makes `len` bytes at `offset` of the data file read as zeros.
    pub(super) fn zero_data_file(&self, offset: u64, len: u64) -> Result<()> {
        crate::io::zero_range(
            self.data_file_backend()?,
            offset,
            len,
            "qcow2 external data file",
        )
    }

    /// After the virtual size changed from `old_size` to `new_size`: the data file grows to the
    /// new size (never shrinks on growth) or is truncated to it, as qemu resizes it; a raw data
    /// file gets the added clusters mapped at their guest offsets.
    pub(super) fn resize_data_file(&mut self, old_size: u64, new_size: u64) -> Result<()> {
        if !self.has_data_file() {
            return Ok(());
        }
        let file = self.data_file_backend()?;
        let len = file
            .len()
            .map_err(Error::reading("qcow2 external data file length"))?;
        if new_size < old_size || len < new_size {
            file.set_len(new_size)
                .map_err(Error::writing("qcow2 external data file length"))?;
        }
        if self.data_file_is_raw() && new_size > old_size {
            self.map_data_file_range(old_size, new_size)?;
        }
        Ok(())
    }

    /// Maps every unallocated cluster covering guest bytes `from..to` to the same offset of
    /// the data file: per L2 table, the table (allocated if missing), then its entries, each the
    /// guest offset with COPIED set (extended L2: no subcluster bits, as qemu writes them).
    pub(super) fn map_data_file_range(&mut self, from: u64, to: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let per_table = self.header.l2_entries();
        let extended = self.header.extended_l2();
        let end = to.min(self.header.size);
        let mut pos = from - from % cluster_size;
        while pos < end {
            let (table, index, _) = self.l2_for_write(pos)?;
            let count = (end - pos)
                .div_ceil(cluster_size)
                .min(per_table - index as u64);
            let mut entries = Vec::with_capacity(count as usize);
            for i in 0..count {
                let at = pos + i * cluster_size;
                let entry = self.l2_entry(at)?.map_or((0, 0), |e| (e.entry, e.bitmap));
                let unallocated = entry == (0, 0);
                if extended && unallocated {
                    self.set_l2_entry(table, index + i as usize, at | COPIED, 0)?;
                }
                entries.push(if unallocated { at | COPIED } else { entry.0 });
            }
            if !extended {
                // One write for the table's entries (the allocated ones rewritten as they are).
                self.set_l2_entries(table, index, &entries)?;
            }
            pos += count * cluster_size;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::io::{Backend, MemBackend};
    use crate::qcow2::compressed_writer::CompressedWriter;
    use crate::qcow2::create::{write_new_image_with_data_file, DataFileReference};
    use crate::qcow2::image::Qcow2Image;
    use crate::qcow2::write::WriteOptions;
    use crate::qcow2::{CreateOptions, HeaderCluster};

    const SIZE: u64 = 1 << 20;

    /// A new 1 MiB image keeping its data in an in-memory data file.
    fn image(raw: bool) -> Qcow2Image<MemBackend> {
        let backend = MemBackend::default();
        let reference = DataFileReference {
            name: "d.raw".to_owned(),
            raw,
        };
        let options = CreateOptions::default();
        write_new_image_with_data_file(&backend, SIZE, &options, None, &reference, raw).unwrap();
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        let data = MemBackend::new(vec![0u8; SIZE as usize]);
        Qcow2Image::open_rw_with_data_file(
            backend,
            cluster,
            None,
            Box::new(data),
            WriteOptions::default(),
        )
        .unwrap()
    }

    fn data_file_bytes(image: &Qcow2Image<MemBackend>, offset: u64, len: usize) -> Vec<u8> {
        let mut buf = vec![0u8; len];
        let file = image.data_file.as_deref().unwrap();
        file.read_exact_at(&mut buf, offset).unwrap();
        buf
    }

    #[test]
    fn data_goes_into_the_data_file_at_its_guest_offset_and_the_image_file_stays_small() {
        let mut image = image(false);
        let len_before = image.backend.len().unwrap();
        image.write_at(&[7u8; 100], 0x30010).unwrap();
        image.write_at(&[8u8; 0x20000], 0).unwrap();
        assert_eq!(data_file_bytes(&image, 0x30010, 100), vec![7u8; 100]);
        assert_eq!(data_file_bytes(&image, 0x30000, 16), vec![0u8; 16]);
        assert_eq!(data_file_bytes(&image, 0, 4), vec![8u8; 4]);
        // One L2 table, nothing else: no data cluster, no refcount block for data.
        let cluster_size = image.header.cluster_size();
        assert_eq!(
            image.backend.len().unwrap(),
            len_before.next_multiple_of(cluster_size) + cluster_size
        );
        let entry = image.l2_entry(0).unwrap().unwrap();
        assert_eq!(
            entry.entry,
            super::COPIED,
            "guest cluster 0 at data file offset 0"
        );
    }

    #[test]
    fn zeroing_a_raw_data_file_image_zeroes_the_data_file() {
        let mut image = image(true);
        image.write_at(&[9u8; 0x20000], 0x10000).unwrap();
        image.write_zeroes(0x10000, 0x10000).unwrap();
        image.discard(0x20000, 0x10000).unwrap();
        assert_eq!(
            data_file_bytes(&image, 0x10000, 0x20000),
            vec![0u8; 0x20000]
        );
    }

    #[test]
    fn compressed_writes_are_refused() {
        let mut image = image(false);
        let mut writer = CompressedWriter::new(&image);
        let cluster = vec![1u8; image.header.cluster_size() as usize];
        assert!(writer.write(&mut image, &cluster, 0).is_err());
    }

    #[test]
    fn an_image_opened_without_its_data_file_refuses_guest_writes() {
        let image = image(false);
        let backend = MemBackend::new(image.backend.to_vec());
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        let mut tables =
            Qcow2Image::open_rw_tables_only(backend, cluster, WriteOptions::default()).unwrap();
        let before = tables.backend.to_vec();
        assert!(tables.write_at(&[1u8; 512], 0x40000).is_err());
        let after = tables.backend.to_vec().len();
        // At most the L2 table the write looked its entry up in.
        let limit = (before.len() as u64).next_multiple_of(1 << 16) + (1 << 16);
        assert!(after as u64 <= limit, "{} -> {after}", before.len());
        // Whatever the failed write left (at most an L2 table), no data reached the image file.
        assert!(!tables
            .backend
            .to_vec()
            .windows(512)
            .any(|w| w == [1u8; 512]));
    }
}
