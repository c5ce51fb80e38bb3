//! Where a freshly created image's metadata goes, and writing it.
//!
//! qemu-img creates every qcow2 image the same way (FORMATS.md §1.9): cluster 0 the header,
//! cluster 1 the refcount table, cluster 2 the first refcount block, then the L1 table; when the
//! L1 table reaches past what the first refcount block covers, further refcount blocks are
//! appended after it. [`InitialLayout::compute`] reproduces that layout exactly while one
//! refcount-table cluster suffices (always, for 64 KiB clusters up to the 32 MiB L1 limit), and
//! otherwise grows the refcount table in place (a valid layout that differs from qemu's, which
//! relocates the table).

use super::error::Qcow2Error;
use super::refcount;
use super::MAX_L1_TABLE_BYTES;
use crate::io::Backend;

/// The metadata layout of a new, empty qcow2 image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitialLayout {
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// log2 of the refcount width.
    pub refcount_order: u32,
    /// Offset of the refcount table.
    pub refcount_table_offset: u64,
    /// Clusters in the refcount table.
    pub refcount_table_clusters: u32,
    /// Offsets of the refcount blocks; block `i` counts host clusters
    /// `i × entries_per_block ..`.
    pub refcount_blocks: Vec<u64>,
    /// Offset of the L1 table (0 if the image has no L1 entries).
    pub l1_table_offset: u64,
    /// Entries in the L1 table.
    pub l1_size: u32,
    /// Host clusters in use, each with refcount 1: `0..used_clusters`.
    pub used_clusters: u64,
    /// Length of the file: the end of the last metadata structure (not cluster-aligned when the
    /// L1 table ends the file, exactly as qemu leaves it).
    pub file_len: u64,
}

impl InitialLayout {
    /// Computes the layout for an image with `l1_size` L1 entries.
    pub fn compute(
        cluster_bits: u32,
        refcount_order: u32,
        l1_size: u64,
    ) -> Result<Self, Qcow2Error> {
        let cluster_size = 1u64 << cluster_bits;
        let l1_bytes = l1_size * 8;
        if l1_bytes > MAX_L1_TABLE_BYTES {
            return Err(Qcow2Error::L1TableTooLarge { entries: l1_size });
        }
        let l1_clusters = l1_bytes.div_ceil(cluster_size);
        let per_block = refcount::entries_per_block(cluster_bits, refcount_order);
        let (table_clusters, blocks, used) = qemu_placement(cluster_size, per_block, l1_clusters)
            .unwrap_or_else(|| grown_table_placement(cluster_size, per_block, l1_clusters));

        let table_offset = cluster_size;
        let l1_offset = if l1_size == 0 {
            0
        } else {
            (2 + table_clusters) * cluster_size
        };
        let refcount_blocks: Vec<u64> = blocks.iter().map(|c| c * cluster_size).collect();

        let last_block_end = refcount_blocks
            .iter()
            .max()
            .map_or(0, |&b| b + cluster_size);
        let l1_end = if l1_size == 0 {
            0
        } else {
            l1_offset + l1_bytes
        };
        Ok(Self {
            cluster_bits,
            refcount_order,
            refcount_table_offset: table_offset,
            refcount_table_clusters: u32::try_from(table_clusters)
                .map_err(|_| Qcow2Error::RefcountTableTooLarge { clusters: u32::MAX })?,
            refcount_blocks,
            l1_table_offset: l1_offset,
            l1_size: l1_size as u32,
            used_clusters: used,
            file_len: last_block_end.max(l1_end),
        })
    }

    /// Writes the refcount table and blocks plus `header_cluster` (the encoded cluster 0), then
    /// sets the file length. Only non-zero bytes are written, so the file stays sparse: the L1
    /// table and the unused parts of each cluster are holes.
    pub fn write<B: Backend + ?Sized>(
        &self,
        backend: &B,
        header_cluster: &[u8],
    ) -> std::io::Result<()> {
        backend.write_all_at(header_cluster, 0)?;

        let table: Vec<u8> = self
            .refcount_blocks
            .iter()
            .flat_map(|offset| offset.to_be_bytes())
            .collect();
        backend.write_all_at(&table, self.refcount_table_offset)?;

        let per_block = refcount::entries_per_block(self.cluster_bits, self.refcount_order);
        let bits = 1u64 << self.refcount_order;
        for (index, &offset) in self.refcount_blocks.iter().enumerate() {
            let first = index as u64 * per_block;
            let in_use = self.used_clusters.saturating_sub(first).min(per_block);
            let mut block = vec![0u8; (in_use * bits).div_ceil(8) as usize];
            for entry in 0..in_use {
                refcount::set(&mut block, entry, self.refcount_order, 1);
            }
            backend.write_all_at(&block, offset)?;
        }
        backend.set_len(self.file_len)
    }
}

/// qemu's placement with a one-cluster refcount table: table in cluster 1, block 0 in cluster 2,
/// L1 from cluster 3, then blocks appended as qemu's allocator appends them. Walking the clusters
/// in order, each refcount block not yet present goes to the next free cluster; if that cluster
/// falls in a range whose block is also missing, that block is placed next (and so on), before
/// the walk goes on. Returns (table clusters, block cluster per block index, clusters in use),
/// or `None` if one table cluster cannot list every block.
fn qemu_placement(
    cluster_size: u64,
    per_block: u64,
    l1_clusters: u64,
) -> Option<(u64, Vec<u64>, u64)> {
    let l1_end = 3 + l1_clusters;
    let mut blocks: std::collections::BTreeMap<u64, u64> = [(0, 2)].into();
    let mut next = l1_end;
    for index in 0..l1_end.div_ceil(per_block) {
        let mut index = index;
        while !blocks.contains_key(&index) {
            blocks.insert(index, next);
            index = next / per_block;
            next += 1;
        }
    }
    let count = blocks.len() as u64;
    // Indices are contiguous from 0 (clusters in use are 0..next).
    if count * 8 > cluster_size || blocks.keys().next_back() != Some(&(count - 1)) {
        return None;
    }
    Some((1, blocks.into_values().collect(), next))
}

/// A layout for images whose refcount blocks do not fit one table cluster: a table of `T`
/// clusters from cluster 1, block 0 after it, the L1 table, then the other blocks in order
/// (qemu relocates its table instead; this layout is equally valid and simpler).
fn grown_table_placement(
    cluster_size: u64,
    per_block: u64,
    l1_clusters: u64,
) -> (u64, Vec<u64>, u64) {
    let (mut table, mut blocks) = (1u64, 1u64);
    let used = loop {
        let used = 1 + table + l1_clusters + blocks;
        let need_blocks = used.div_ceil(per_block);
        let need_table = (need_blocks * 8).div_ceil(cluster_size);
        if need_blocks == blocks && need_table == table {
            break used;
        }
        blocks = need_blocks;
        table = need_table;
    };
    let first = 1 + table;
    let extra_start = first + 1 + l1_clusters;
    let mut placed = vec![first];
    placed.extend((0..blocks - 1).map(|i| extra_start + i));
    (table, placed, used)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_layout_matches_qemu_img() {
        // qemu-img create -f qcow2 x 1G: table 0x10000, block 0x20000, L1 0x30000 (2 entries),
        // four clusters in use, file 0x30010 (FORMATS.md §1.9).
        let layout = InitialLayout::compute(16, 4, 2).unwrap();
        assert_eq!(layout.refcount_table_offset, 0x10000);
        assert_eq!(layout.refcount_table_clusters, 1);
        assert_eq!(layout.refcount_blocks, vec![0x20000]);
        assert_eq!(layout.l1_table_offset, 0x30000);
        assert_eq!(layout.used_clusters, 4);
        assert_eq!(layout.file_len, 0x30010);
    }

    #[test]
    fn small_clusters_append_refcount_blocks_after_the_l1_table_like_qemu() {
        // qemu-img create -o cluster_size=512 x 1G: L1 of 0x8000 entries at 0x600, extra
        // refcount blocks at 0x40600 and 0x40800, file 264704 bytes (checked on qemu-img 7.2).
        let layout = InitialLayout::compute(9, 4, 0x8000).unwrap();
        assert_eq!(layout.l1_table_offset, 0x600);
        assert_eq!(layout.refcount_blocks, vec![0x400, 0x40600, 0x40800]);
        assert_eq!(layout.file_len, 264704);
        assert_eq!(layout.used_clusters, 517);
    }

    #[test]
    fn a_block_landing_in_an_uncovered_range_is_placed_before_the_walk_goes_on() {
        // qemu-img create -o cluster_size=512 x 10G: block 1 at cluster 5123 lies in block 20's
        // range, so block 20 goes to 5124 and blocks 2..19 follow (checked on qemu-img 7.2).
        let layout = InitialLayout::compute(9, 4, 327680).unwrap();
        let clusters: Vec<u64> = layout.refcount_blocks.iter().map(|b| b / 512).collect();
        assert_eq!(clusters[..3], [2, 5123, 5125]);
        assert_eq!(clusters[19..], [5142, 5124]);
        assert_eq!(layout.file_len, 2633216);
    }

    #[test]
    fn empty_image_has_no_l1_table_and_three_clusters() {
        let layout = InitialLayout::compute(16, 4, 0).unwrap();
        assert_eq!(layout.l1_table_offset, 0);
        assert_eq!(layout.used_clusters, 3);
        assert_eq!(layout.file_len, 3 * 0x10000);
    }

    #[test]
    fn refcount_table_grows_when_one_cluster_cannot_list_every_block() {
        // 512-byte clusters with 64-bit refcounts: 64 entries per block, 64 blocks per table
        // cluster. The largest L1 table needs far more.
        let layout = InitialLayout::compute(9, 6, 4 << 20).unwrap();
        let per_block = 64;
        assert!(layout.refcount_table_clusters > 1);
        assert!(layout.refcount_blocks.len() as u64 * per_block >= layout.used_clusters);
        assert!(layout.refcount_table_clusters as u64 * 64 >= layout.refcount_blocks.len() as u64);
    }
}
