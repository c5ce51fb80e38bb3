//! Host-cluster allocation for a writable qcow2 image: exact refcounts, refcount blocks created
//! as the file grows, and a refcount table that grows (relocated) when it can no longer list
//! every block.
//!
//! Allocation appends: a new cluster is the first cluster at or after the end of the file whose
//! refcount is 0. Freed clusters (refcount dropped to 0) are not reused — they are simply no
//! longer counted, which `qemu-img check` accepts.
//!
//! Ordering (crash safety): a cluster's refcount is raised before anything points at it, a new
//! refcount block is written (counting itself when it can) before the table entry that links
//! it, and a relocated table is complete before the header switches to it. A crash between two
//! steps therefore leaves at worst a cluster that is counted but unreferenced — a leak — never a
//! referenced cluster with a refcount of 0.

use byteorder::{BigEndian, ByteOrder};

use super::error::Qcow2Error;
use super::image::{check_inside, Qcow2Image};
use super::refcount::{self, REFTABLE_OFFSET_MASK};
use crate::io::Backend;
use crate::{Error, Result};

/// Upper bound on cached refcount blocks, in bytes.
pub const REFBLOCK_CACHE_BYTES: u64 = 4 << 20;

/// Mutable state of an image open for writing.
#[derive(Debug)]
pub struct WriteState {
    /// The refcount table, one entry per refcount block.
    pub(super) reftable: Vec<u64>,
    /// Cached refcount blocks, most recently used first: (offset, bytes). Write-through.
    pub(super) refblocks: Vec<(u64, Vec<u8>)>,
    /// How many refcount blocks the cache keeps.
    pub(super) refblock_cache_len: usize,
    /// First cluster index that may be free.
    pub(super) next_free: u64,
    /// fsync between dependent metadata updates.
    pub(super) durable: bool,
    /// Host clusters holding metadata (header, refcount table and blocks, L1 and L2 tables).
    /// Data is never written into them and they are never handed out: on a hostile image whose
    /// refcounts or L2 entries lie, this is what keeps a guest write from overwriting metadata
    /// (qemu's metadata overlap check).
    pub(super) metadata: std::collections::HashSet<u64>,
}

impl WriteState {
    /// Loads the refcount table of `header` from `backend` (bounded: ≤ 8 MiB and inside the file).
    pub(super) fn load<B: Backend>(
        backend: &B,
        header: &super::Header,
        file_len: u64,
        durable: bool,
    ) -> Result<Self> {
        let table_bytes = u64::from(header.refcount_table_clusters) << header.cluster_bits;
        check_inside(
            "refcount table",
            header.refcount_table_offset,
            table_bytes,
            file_len,
        )?;
        let mut raw = vec![0u8; table_bytes as usize];
        backend
            .read_exact_at(&mut raw, header.refcount_table_offset)
            .map_err(Error::reading("qcow2 refcount table"))?;
        let cluster_size = header.cluster_size();
        Ok(Self {
            reftable: raw.chunks_exact(8).map(BigEndian::read_u64).collect(),
            refblocks: Vec::new(),
            refblock_cache_len: (REFBLOCK_CACHE_BYTES / cluster_size).max(2) as usize,
            next_free: file_len.div_ceil(cluster_size),
            durable,
            metadata: std::collections::HashSet::new(),
        })
    }
}

impl<B: Backend> Qcow2Image<B> {
    pub(super) fn state(&mut self) -> &mut WriteState {
        self.writer
            .as_mut()
            .expect("write path used on an image opened read-only")
    }

    fn per_block(&self) -> u64 {
        refcount::entries_per_block(self.header.cluster_bits, self.header.refcount_order)
    }

    /// An ordering point between dependent metadata writes: fsync in durable mode.
    pub(super) fn barrier(&mut self) -> Result<()> {
        if self.state().durable {
            // Data written into an external data file must be durable before the entry
            // pointing at it is.
            if let Some(data_file) = &self.data_file {
                data_file
                    .sync_all()
                    .map_err(Error::io("syncing qcow2 external data file"))?;
            }
            self.backend
                .sync_all()
                .map_err(Error::io("syncing qcow2 metadata"))?;
        }
        Ok(())
    }

    /// Writes `bytes` at `offset`, extending the known file length.
    pub(super) fn write_host(&mut self, bytes: &[u8], offset: u64) -> Result<()> {
        self.backend
            .write_all_at(bytes, offset)
            .map_err(Error::writing("qcow2 image"))?;
        self.file_len = self.file_len.max(offset + bytes.len() as u64);
        Ok(())
    }

    /// The refcount block at `offset`, from the cache or the file (cluster-aligned, inside it).
    fn refblock(&mut self, offset: u64) -> Result<&mut Vec<u8>> {
        let cluster_size = self.header.cluster_size();
        let state = self
            .writer
            .as_mut()
            .expect("write path used on an image opened read-only");
        if let Some(i) = state.refblocks.iter().position(|(o, _)| *o == offset) {
            let hit = state.refblocks.remove(i);
            state.refblocks.insert(0, hit);
        } else {
            if offset % cluster_size != 0 {
                return Err(Qcow2Error::UnalignedOffset {
                    table: "refcount block",
                    offset,
                }
                .into());
            }
            check_inside("refcount block", offset, cluster_size, self.file_len)?;
            let mut block = vec![0u8; cluster_size as usize];
            self.backend
                .read_exact_at(&mut block, offset)
                .map_err(Error::reading("qcow2 refcount block"))?;
            let state = self.writer.as_mut().expect("checked above");
            state.refblocks.insert(0, (offset, block));
            state.refblocks.truncate(state.refblock_cache_len);
        }
        Ok(&mut self.writer.as_mut().expect("checked above").refblocks[0].1)
    }

    /// The refcount of host cluster `cluster` (0 where no refcount block covers it).
    pub(super) fn refcount(&mut self, cluster: u64) -> Result<u64> {
        let per_block = self.per_block();
        let index = (cluster / per_block) as usize;
        let entry = self.state().reftable.get(index).copied().unwrap_or(0);
        let block = entry & REFTABLE_OFFSET_MASK;
        if block == 0 {
            return Ok(0);
        }
        let order = self.header.refcount_order;
        let bytes = self.refblock(block)?;
        Ok(refcount::get(bytes, cluster % per_block, order))
    }

    /// Sets the refcount of host cluster `cluster`, creating its refcount block (and growing
    /// the table) if needed.
    pub(super) fn set_refcount(&mut self, cluster: u64, value: u64) -> Result<()> {
        self.set_refcounts(cluster, 1, value)
    }

    /// Sets the refcounts of the `count` host clusters from `first` on to `value`, creating
    /// their refcount blocks (and growing the table) if needed: one read-modify-write per
    /// refcount block the range touches, not one per cluster.
    pub(super) fn set_refcounts(&mut self, first: u64, count: u64, value: u64) -> Result<()> {
        let order = self.header.refcount_order;
        if value > refcount::max_refcount(order) {
            return Err(Qcow2Error::CorruptEntry {
                what: "refcount overflow",
                guest_offset: 0,
                entry: first,
            }
            .into());
        }
        let per_block = self.per_block();
        let end = first.checked_add(count).ok_or(Qcow2Error::CorruptEntry {
            what: "host cluster index overflow",
            guest_offset: 0,
            entry: first,
        })?;
        let mut cluster = first;
        while cluster < end {
            let index = cluster / per_block;
            let in_block = (end - cluster).min(per_block - cluster % per_block);
            if index as usize >= self.state().reftable.len() {
                self.grow_reftable(index)?;
            }
            let mut block = self.state().reftable[index as usize] & REFTABLE_OFFSET_MASK;
            if block == 0 {
                block = self.new_refblock(index)?;
            }
            let from = cluster % per_block;
            let bytes = self.refblock(block)?;
            for entry in from..from + in_block {
                refcount::set(bytes, entry, order, value);
            }
            // Write back only the bytes holding these entries.
            let bits = 1u64 << order;
            let start = (from * bits / 8) as usize;
            let stop = ((from + in_block) * bits).div_ceil(8) as usize;
            let chunk = bytes[start..stop].to_vec();
            self.write_host(&chunk, block + start as u64)?;
            cluster += in_block;
        }
        Ok(())
    }

    /// Creates the refcount block for table index `index` in a fresh cluster and links it.
    fn new_refblock(&mut self, index: u64) -> Result<u64> {
        let per_block = self.per_block();
        let cluster_size = self.header.cluster_size();
        let own = self.take_free_cluster()?;
        self.state().metadata.insert(own);
        let offset = own * cluster_size;
        let mut bytes = vec![0u8; cluster_size as usize];
        let counts_itself = own / per_block == index;
        if counts_itself {
            refcount::set(&mut bytes, own % per_block, self.header.refcount_order, 1);
        }
        self.write_host(&bytes, offset)?;
        let state = self.state();
        state.refblocks.insert(0, (offset, bytes));
        state.refblocks.truncate(state.refblock_cache_len);
        if !counts_itself {
            self.set_refcount(own, 1)?;
        }
        self.barrier()?;
        self.state().reftable[index as usize] = offset;
        let table_entry = self.header.refcount_table_offset + index * 8;
        self.write_host(&offset.to_be_bytes(), table_entry)?;
        Ok(offset)
    }

    /// The next cluster index whose refcount is 0, at or after the end of the file.
    fn take_free_cluster(&mut self) -> Result<u64> {
        loop {
            let cluster = self.state().next_free;
            self.state().next_free += 1;
            if !self.state().metadata.contains(&cluster) && self.refcount(cluster)? == 0 {
                self.forget_cached_tables(cluster, 1);
                return Ok(cluster);
            }
        }
    }

    /// Drops cached L2 tables in the `count` clusters from cluster index `first`, which are
    /// being handed out anew: a table freed earlier (an old active table after a snapshot
    /// apply, say) may still be cached there, and a new table written at its offset must never
    /// be read back from that stale copy (a write through it released the stale entries
    /// instead of the real ones and leaked clusters).
    fn forget_cached_tables(&mut self, first: u64, count: u64) {
        let bits = self.header.cluster_bits;
        self.l2_cache
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(offset, _)| !(first..first + count).contains(&(offset >> bits)));
    }

    /// Allocates one host cluster with refcount 1 and returns its offset. The file is extended
    /// (sparsely) to cover it, so no reference ever points past the end of the file.
    pub(super) fn alloc_cluster(&mut self) -> Result<u64> {
        let cluster = self.take_free_cluster()?;
        self.set_refcount(cluster, 1)?;
        let cluster_size = self.header.cluster_size();
        let end = (cluster + 1) * cluster_size;
        if self.file_len < end {
            self.backend
                .set_len(end)
                .map_err(Error::writing("qcow2 file length"))?;
            self.file_len = end;
        }
        Ok(cluster * cluster_size)
    }

    /// True if the image keeps its guest data in an external data file (incompatible bit 2).
    pub(super) fn has_data_file(&self) -> bool {
        self.header
            .incompatible_features
            .contains(super::features::IncompatibleFeatures::EXTERNAL_DATA_FILE)
    }

    /// The host offset for `count` new data clusters that will hold the guest clusters from
    /// guest offset `guest` on: the one place that decides where new guest data goes. With an
    /// external data file, the guest offset itself in that file (as qemu places data there:
    /// nothing is allocated and no refcount is kept); else contiguous clusters of the image
    /// file with refcount 1, the file extended over them only with `extend_file` (otherwise the
    /// caller's data write covering the whole run extends it).
    pub(super) fn alloc_data(&mut self, guest: u64, count: u64, extend_file: bool) -> Result<u64> {
        if self.has_data_file() {
            return Ok(guest - guest % self.header.cluster_size());
        }
        match (count, extend_file) {
            (1, true) => self.alloc_cluster(),
            (_, true) => self.alloc_contiguous(count),
            (_, false) => self.alloc_run(count),
        }
    }

    /// The open external data file (an image with the data-file bit opened without it refuses
    /// every write of guest data).
    pub(super) fn data_file_backend(&self) -> Result<&(dyn Backend + Send + Sync)> {
        Ok(self
            .data_file
            .as_deref()
            .ok_or(Qcow2Error::DataFileRequired)?)
    }

    /// Writes guest data at `host`, an offset [`Self::alloc_data`] or an L2 entry gave: into
    /// the external data file when the image has one, else into the image file. An image with
    /// the data-file bit but no data file open refuses: its data never goes into the image file.
    pub(super) fn write_data(&mut self, bytes: &[u8], host: u64) -> Result<()> {
        if !self.has_data_file() {
            return self.write_host(bytes, host);
        }
        self.data_file_backend()?
            .write_all_at(bytes, host)
            .map_err(Error::writing("qcow2 external data file"))
    }

    /// Drops the reference an L2 entry held to the data cluster at `host` (after the entry was
    /// rewritten): a refcount in the image file; nothing for a cluster of an external data
    /// file, which has none.
    pub(super) fn free_data_cluster(&mut self, host: u64) -> Result<()> {
        if self.has_data_file() {
            return Ok(());
        }
        self.free_cluster(host)
    }

    /// Truncates the file after its last cluster in use (refcount > 0 or metadata), as qemu
    /// leaves an image it emptied (`qemu-img commit`); later allocations continue from the new
    /// end. Nothing in use is cut: the scan stops at the first counted cluster from the end.
    pub fn shrink_to_used(&mut self) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let mut end = self.file_len.div_ceil(cluster_size);
        while end > 0 && !self.state().metadata.contains(&(end - 1)) && self.refcount(end - 1)? == 0
        {
            end -= 1;
        }
        if end * cluster_size >= self.file_len {
            return Ok(());
        }
        self.barrier()?;
        self.backend
            .set_len(end * cluster_size)
            .map_err(Error::writing("qcow2 file length"))?;
        self.file_len = end * cluster_size;
        let state = self.state();
        state.next_free = state.next_free.min(end);
        Ok(())
    }

    /// Drops one reference to the host cluster at `offset`.
    pub(super) fn free_cluster(&mut self, offset: u64) -> Result<()> {
        self.free_clusters(&mut [offset >> self.header.cluster_bits])
    }

    /// Drops one reference to each host cluster index in `clusters` (in any order; a cluster
    /// listed twice loses two), with one write per refcount block touched. Refcounts already 0
    /// stay 0.
    pub(super) fn free_clusters(&mut self, clusters: &mut [u64]) -> Result<()> {
        clusters.sort_unstable();
        let per_block = self.per_block();
        let order = self.header.refcount_order;
        let bits = 1u64 << order;
        let mut rest = &clusters[..];
        while let Some(&first) = rest.first() {
            let index = first / per_block;
            let in_block = rest.partition_point(|&c| c / per_block == index);
            let (group, after) = rest.split_at(in_block);
            rest = after;
            let entry = self
                .state()
                .reftable
                .get(index as usize)
                .copied()
                .unwrap_or(0);
            let block = entry & REFTABLE_OFFSET_MASK;
            if block == 0 {
                continue;
            }
            let bytes = self.refblock(block)?;
            for &cluster in group {
                let count = refcount::get(bytes, cluster % per_block, order);
                if count > 0 {
                    refcount::set(bytes, cluster % per_block, order, count - 1);
                }
            }
            // Write back the bytes from the first to the last entry changed.
            let start = ((group[0] % per_block) * bits / 8) as usize;
            let stop = ((group[group.len() - 1] % per_block + 1) * bits).div_ceil(8) as usize;
            let chunk = bytes[start..stop].to_vec();
            self.write_host(&chunk, block + start as u64)?;
        }
        Ok(())
    }

    /// Adds `addend` (+1 or -1) to the refcount of each host cluster index in `clusters` (in
    /// any order; a cluster listed twice changes twice), with one write per refcount block
    /// touched. An underflow or an overflow of the refcount width is corruption.
    pub(super) fn adjust_refcounts(&mut self, clusters: &mut [u64], addend: i64) -> Result<()> {
        clusters.sort_unstable();
        let per_block = self.per_block();
        let order = self.header.refcount_order;
        let bits = 1u64 << order;
        let max = refcount::max_refcount(order);
        let cluster_bits = self.header.cluster_bits;
        let mut rest = &clusters[..];
        while let Some(&first) = rest.first() {
            let index = first / per_block;
            let in_block = rest.partition_point(|&c| c / per_block == index);
            let (group, after) = rest.split_at(in_block);
            rest = after;
            if addend > 0 && index as usize >= self.state().reftable.len() {
                self.grow_reftable(index)?;
            }
            let entry = self
                .state()
                .reftable
                .get(index as usize)
                .copied()
                .unwrap_or(0);
            let mut block = entry & REFTABLE_OFFSET_MASK;
            if block == 0 && addend > 0 {
                block = self.new_refblock(index)?;
            }
            let bad = |what, cluster: u64| Qcow2Error::CorruptEntry {
                what,
                guest_offset: 0,
                entry: cluster << cluster_bits,
            };
            if block == 0 {
                return Err(bad("refcount underflow", first).into());
            }
            let bytes = self.refblock(block)?;
            for &cluster in group {
                let count = refcount::get(bytes, cluster % per_block, order);
                let new = if addend > 0 {
                    count.checked_add(1).filter(|&n| n <= max)
                } else {
                    count.checked_sub(1)
                };
                let Some(new) = new else {
                    let what = if addend > 0 {
                        "refcount overflow"
                    } else {
                        "refcount underflow"
                    };
                    return Err(bad(what, cluster).into());
                };
                refcount::set(bytes, cluster % per_block, order, new);
            }
            // Write back the bytes from the first to the last entry changed.
            let start = ((group[0] % per_block) * bits / 8) as usize;
            let stop = ((group[group.len() - 1] % per_block + 1) * bits).div_ceil(8) as usize;
            let chunk = bytes[start..stop].to_vec();
            self.write_host(&chunk, block + start as u64)?;
        }
        Ok(())
    }

    /// Allocates `count` contiguous free clusters (refcount 1 each) and returns the first offset.
    /// The file is extended (sparsely) to cover them.
    pub(super) fn alloc_contiguous(&mut self, count: u64) -> Result<u64> {
        let offset = self.alloc_run(count)?;
        let end = offset + count * self.header.cluster_size();
        if self.file_len < end {
            self.backend
                .set_len(end)
                .map_err(Error::writing("qcow2 file length"))?;
            self.file_len = end;
        }
        Ok(offset)
    }

    /// Allocates `count` contiguous free clusters (refcount 1 each, raised with one write per
    /// refcount block) and returns the first offset, without extending the file: for a caller
    /// that writes the whole run next (its data write extends the file; a crash before it
    /// leaves counted clusters past the end, a leak).
    pub(super) fn alloc_run(&mut self, count: u64) -> Result<u64> {
        let start = self.reserve_contiguous(count)?;
        self.set_refcounts(start, count, 1)?;
        Ok(start * self.header.cluster_size())
    }

    /// Finds `count` contiguous clusters with refcount 0 at or after `next_free` and moves
    /// `next_free` past them, without counting them.
    fn reserve_contiguous(&mut self, count: u64) -> Result<u64> {
        'search: loop {
            let start = self.state().next_free;
            for cluster in start..start + count {
                if self.state().metadata.contains(&cluster) || self.refcount(cluster)? != 0 {
                    self.state().next_free = cluster + 1;
                    continue 'search;
                }
            }
            self.state().next_free = start + count;
            self.forget_cached_tables(start, count);
            return Ok(start);
        }
    }

    /// Replaces the refcount table by a larger one that can list block `needed_index`.
    ///
    /// The new table and any refcount blocks its own clusters need are written in free space
    /// at the end of the file, counted in blocks reachable only from the new table, then the
    /// header is switched and the old table's clusters are freed.
    fn grow_reftable(&mut self, needed_index: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let per_block = self.per_block();
        let entries_per_cluster = cluster_size / 8;
        let old_len = self.state().reftable.len() as u64;
        let mut table_clusters = (needed_index + 1)
            .max(old_len * 2)
            .div_ceil(entries_per_cluster);
        if table_clusters * cluster_size > super::MAX_REFCOUNT_TABLE_BYTES {
            return Err(Qcow2Error::RefcountTableTooLarge {
                clusters: u32::try_from(table_clusters).unwrap_or(u32::MAX),
            }
            .into());
        }
        // Fixed point: the area holds the table and the blocks that count the area itself.
        let start = self.reserve_contiguous(0)?;
        let (mut new_blocks, mut area_end);
        loop {
            new_blocks = Vec::new();
            area_end = start + table_clusters;
            loop {
                let missing: Vec<u64> = (start / per_block..=(area_end - 1) / per_block)
                    .filter(|&i| self.state().reftable.get(i as usize).copied().unwrap_or(0) == 0)
                    .filter(|i| !new_blocks.contains(i))
                    .collect();
                if missing.is_empty() {
                    break;
                }
                area_end += missing.len() as u64;
                new_blocks.extend(missing);
            }
            let needed = needed_index.max((area_end - 1) / per_block) + 1;
            if needed <= table_clusters * entries_per_cluster {
                break;
            }
            table_clusters = needed.div_ceil(entries_per_cluster);
        }
        // The area must be free: it lies at or past next_free, where nothing is counted, unless
        // stray refcounts exist past the end of the file; then start over further on.
        for cluster in start..area_end {
            if self.state().metadata.contains(&cluster) || self.refcount(cluster)? != 0 {
                self.state().next_free = cluster + 1;
                return self.grow_reftable(needed_index);
            }
        }
        self.state().next_free = area_end;
        self.state().metadata.extend(start..area_end);

        let mut table = self.state().reftable.clone();
        table.resize((table_clusters * entries_per_cluster) as usize, 0);
        let first_block = start + table_clusters;
        for (k, &index) in new_blocks.iter().enumerate() {
            table[index as usize] = (first_block + k as u64) * cluster_size;
        }
        // Write the new blocks, counting every area cluster they cover.
        let order = self.header.refcount_order;
        for (k, &index) in new_blocks.iter().enumerate() {
            let mut bytes = vec![0u8; cluster_size as usize];
            for cluster in start..area_end {
                if cluster / per_block == index {
                    refcount::set(&mut bytes, cluster % per_block, order, 1);
                }
            }
            self.write_host(&bytes, (first_block + k as u64) * cluster_size)?;
        }
        // Area clusters covered by existing blocks are counted there (live: a crash leaks them).
        for cluster in start..area_end {
            if !new_blocks.contains(&(cluster / per_block)) {
                self.set_refcount(cluster, 1)?;
            }
        }
        let encoded: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_host(&encoded, start * cluster_size)?;
        self.barrier()?;

        let old_offset = self.header.refcount_table_offset;
        let old_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_table_offset = start * cluster_size;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.write_fixed_header()?;
        self.barrier()?;
        self.state().reftable = table;
        self.state().refblocks.clear();
        let old_first = old_offset / cluster_size;
        for cluster in old_first..old_first + old_clusters {
            self.state().metadata.remove(&cluster);
        }
        for cluster in 0..old_clusters {
            self.free_cluster(old_offset + cluster * cluster_size)?;
        }
        Ok(())
    }

    /// Records every cluster that holds metadata now (called once when opening for writing).
    /// Returns false if two metadata structures share a cluster: such an image cannot be
    /// written safely.
    pub(super) fn collect_metadata(&mut self) -> bool {
        let cluster_bits = self.header.cluster_bits;
        let span = |offset: u64, len: u64| {
            (offset >> cluster_bits)..(offset + len).div_ceil(1 << cluster_bits)
        };
        let mut all: Vec<u64> = vec![0];
        all.extend(span(
            self.header.refcount_table_offset,
            u64::from(self.header.refcount_table_clusters) << cluster_bits,
        ));
        all.extend(span(self.header.l1_table_offset, self.l1.len() as u64 * 8));
        all.extend(
            self.l1
                .iter()
                .filter_map(|&e| super::tables::L1Entry(e).l2_offset())
                .map(|o| o >> cluster_bits),
        );
        all.extend(
            self.state()
                .reftable
                .iter()
                .map(|e| e & REFTABLE_OFFSET_MASK)
                .filter(|&o| o != 0)
                .map(|o| o >> cluster_bits),
        );
        let count = all.len();
        let clusters: std::collections::HashSet<u64> = all.into_iter().collect();
        let disjoint = clusters.len() == count;
        self.state().metadata = clusters;
        disjoint
    }

    /// True if the host cluster at `offset` holds metadata.
    pub(super) fn is_metadata(&self, offset: u64) -> bool {
        self.writer
            .as_ref()
            .is_some_and(|w| w.metadata.contains(&(offset >> self.header.cluster_bits)))
    }

    /// Rewrites the fixed header fields (never the extension area or backing name).
    pub(super) fn write_fixed_header(&mut self) -> Result<()> {
        let bytes = self.header.to_bytes();
        self.write_host(&bytes, 0)
    }
}
