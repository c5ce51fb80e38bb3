//! `qemu-img amend -p`'s progress: what an amend reports, and when, so that the lines printed
//! are qemu-img 10's (`block/qcow2.c` `qcow2_amend_helper_cb`, `block/qcow2-refcount.c`
//! `walk_over_reftable`, `block/qcow2-cluster.c` `qcow2_expand_zero_clusters`).
//!
//! ```text
//! operation                units of its own work                    reported
//! upgrade to v3            2 (snapshot table, header)               0, 1, 2 of 2
//! refcount width           refcount table entries × walks           before each entry and
//!                          (qemu walks the table until its          after each walk
//!                          allocations settle, then once to write)
//! downgrade to v2          L1 entries, active and every snapshot's  after each entry
//! ```
//!
//! [`AmendStatus`] folds the operations into one progress for the whole amend. The refcount
//! width change here places its structures differently from qemu (see `amend.rs`), so how many
//! walks qemu would need is worked out by [`Qcow2Image::qemu_refcount_walks`], a model of
//! qemu's first-fit allocations that only counts.

use std::collections::BTreeSet;

use super::image::Qcow2Image;
use super::refcount::{self, REFTABLE_OFFSET_MASK};
use crate::io::Backend;
use crate::Result;

/// Which long operation of an amend is running (qemu's `Qcow2AmendOperation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Operation {
    /// Upgrading to v3.
    Upgrading,
    /// Rewriting the refcount structures with another width.
    ChangingRefcountOrder,
    /// Downgrading to v2.
    Downgrading,
}

/// The progress of a whole amend, folded from what each long operation reports on its own
/// units of work, as qemu folds it: operations done count with their whole work, the running
/// one with what it has reported, and those still to come are projected at the average work
/// of the ones seen so far. Each report goes to the callback as (done, total) of the whole
/// amend; qemu-img prints `100 × done / total` in single precision.
pub(super) struct AmendStatus<'a> {
    report: &'a mut dyn FnMut(u64, u64),
    total_operations: u64,
    completed: u64,
    offset_completed: u64,
    current: Option<Operation>,
    last: Option<Operation>,
    last_work: u64,
}

impl<'a> AmendStatus<'a> {
    /// A status for an amend of `total_operations` long operations.
    pub(super) fn new(report: &'a mut dyn FnMut(u64, u64), total_operations: u64) -> Self {
        Self {
            report,
            total_operations,
            completed: 0,
            offset_completed: 0,
            current: None,
            last: None,
            last_work: 0,
        }
    }

    /// Marks `operation` as the running one; its reports follow.
    pub(super) fn begin(&mut self, operation: Operation) {
        self.current = Some(operation);
    }

    /// The running operation has done `offset` of its `work` units.
    pub(super) fn report(&mut self, offset: u64, work: u64) {
        if self.current != self.last {
            if self.last.is_some() {
                self.offset_completed += self.last_work;
                self.completed += 1;
            }
            self.last = self.current;
        }
        self.last_work = work;
        let current_work = self.offset_completed + work;
        let to_come = self.total_operations.saturating_sub(self.completed + 1);
        let projected = current_work * to_come / (self.completed + 1);
        (self.report)(self.offset_completed + offset, current_work + projected);
    }

    /// Reports walk `index` of `total` over a refcount table of `entries` entries, up to
    /// (including) entry `upto`, or the whole walk and its end if `upto` is `None`.
    pub(super) fn refcount_walk(
        &mut self,
        index: u64,
        total: u64,
        entries: u64,
        upto: Option<u64>,
    ) {
        let last = upto.map_or(entries, |u| (u + 1).min(entries));
        for entry in 0..last {
            self.report(index * entries + entry, total * entries);
        }
        if upto.is_none() {
            self.report((index + 1) * entries, total * entries);
        }
    }
}

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// How many walks over the refcount table qemu's refcount width change would make on this
    /// image to allocate the new refcount blocks and table (at least 2; the walk that writes the
    /// blocks comes after them). qemu allocates each new block first fit from the start of the
    /// file, counted in the old refcounts, then the new table, and walks again while a walk
    /// allocated anything (its own clusters may need blocks that were empty before).
    ///
    /// `nonempty` are the new blocks (indexes at the new width) that count a cluster in use.
    /// A model: where qemu would have to grow the old refcount table for its own allocations,
    /// it counts as if the table were large enough. Memory: the new structures' clusters.
    pub(super) fn qemu_refcount_walks(
        &mut self,
        new_order: u32,
        nonempty: &BTreeSet<u64>,
    ) -> Result<u64> {
        let cluster_bits = self.header.cluster_bits;
        let old_per_block = refcount::entries_per_block(cluster_bits, self.header.refcount_order);
        let new_per_block = refcount::entries_per_block(cluster_bits, new_order);
        let old_table = self.state().reftable.clone();
        let covered = old_table.len() as u64 * old_per_block;
        let blocks = covered.div_ceil(new_per_block);
        let table_step = (1u64 << cluster_bits) / 8;
        let mut model = QemuAllocator {
            taken: BTreeSet::new(),
            new_old_blocks: BTreeSet::new(),
            free_index: 0,
            old_table,
            old_per_block,
        };
        let mut new_table: Vec<u64> = Vec::new();
        let mut table_at: Option<(u64, u64)> = None;
        let mut walks = 0;
        loop {
            walks += 1;
            let mut allocated = false;
            // The blocks in use, in order: those the old counts fill, and those the model's
            // allocations reach (an allocation further on is seen in the same walk, as in qemu).
            let mut next = 0;
            loop {
                let counted = nonempty.range(next..).next().copied();
                let taken = model
                    .taken
                    .range(next * new_per_block..)
                    .next()
                    .map(|c| c / new_per_block);
                let Some(block) = counted.into_iter().chain(taken).min() else {
                    break;
                };
                if block >= blocks {
                    break;
                }
                next = block + 1;
                if new_table.get(block as usize).is_some_and(|&c| c != 0) {
                    continue;
                }
                if block as usize >= new_table.len() {
                    new_table.resize((block + 1).next_multiple_of(table_step) as usize, 0);
                }
                new_table[block as usize] = model.alloc(self, 1)?;
                allocated = true;
            }
            // A walk without allocations, or a runaway model: the walks are settled.
            if !allocated || walks > 64 {
                return Ok(walks);
            }
            if let Some((first, count)) = table_at {
                for cluster in first..first + count {
                    model.taken.remove(&cluster);
                }
                model.free_index = model.free_index.min(first);
            }
            let count = (new_table.len() as u64).div_ceil(table_step);
            table_at = Some((model.alloc(self, count)?, count));
        }
    }
}

/// qemu's cluster allocator as seen from a refcount width change: first fit from
/// `free_index`, over the image's refcounts plus what the model took.
struct QemuAllocator {
    /// Clusters the model allocated (each refcount 1 in qemu's old refcounts).
    taken: BTreeSet<u64>,
    /// Old refcount block indexes whose block the model created.
    new_old_blocks: BTreeSet<u64>,
    /// qemu's `free_cluster_index`.
    free_index: u64,
    old_table: Vec<u64>,
    old_per_block: u64,
}

impl QemuAllocator {
    fn free<B: Backend + Send + Sync>(
        &self,
        image: &mut Qcow2Image<B>,
        cluster: u64,
    ) -> Result<bool> {
        Ok(!self.taken.contains(&cluster) && image.refcount(cluster)? == 0)
    }

    /// qemu's `alloc_clusters_noref`: the next `count` free clusters in a row from the free
    /// index, which moves past them.
    fn next_run<B: Backend + Send + Sync>(
        &mut self,
        image: &mut Qcow2Image<B>,
        count: u64,
    ) -> Result<u64> {
        let mut found = 0;
        while found < count {
            let cluster = self.free_index;
            self.free_index += 1;
            found = if self.free(image, cluster)? {
                found + 1
            } else {
                0
            };
        }
        Ok(self.free_index - count)
    }

    /// qemu's `qcow2_alloc_clusters`: a run, counted; where no old refcount block covers it,
    /// qemu first allocates that block (the next free cluster) and then searches again.
    fn alloc<B: Backend + Send + Sync>(
        &mut self,
        image: &mut Qcow2Image<B>,
        count: u64,
    ) -> Result<u64> {
        loop {
            let first = self.next_run(image, count)?;
            let uncovered = (first..first + count)
                .map(|c| c / self.old_per_block)
                .find(|&index| {
                    let entry = self.old_table.get(index as usize).copied().unwrap_or(0);
                    entry & REFTABLE_OFFSET_MASK == 0 && !self.new_old_blocks.contains(&index)
                });
            match uncovered {
                Some(index) if (index as usize) < self.old_table.len() => {
                    let block = self.next_run(image, 1)?;
                    self.taken.insert(block);
                    self.new_old_blocks.insert(index);
                    self.new_old_blocks.insert(block / self.old_per_block);
                }
                _ => {
                    self.taken.extend(first..first + count);
                    return Ok(first);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_fold_as_qemu_folds_them() {
        let mut seen = Vec::new();
        let mut record = |done, total| seen.push((done, total));
        let mut status = AmendStatus::new(&mut record, 2);
        status.begin(Operation::Upgrading);
        for step in 0..=2 {
            status.report(step, 2);
        }
        status.begin(Operation::Downgrading);
        status.report(1, 4);
        status.report(4, 4);
        // Upgrade alone: the second operation is projected at the upgrade's 2 units.
        // Then 2 done + the downgrade's 4, nothing projected.
        assert_eq!(seen, [(0, 4), (1, 4), (2, 4), (3, 6), (6, 6)]);
    }

    #[test]
    fn a_walk_reports_each_entry_then_its_end() {
        let mut seen = Vec::new();
        let mut record = |done, total| seen.push((done, total));
        let mut status = AmendStatus::new(&mut record, 1);
        status.begin(Operation::ChangingRefcountOrder);
        status.refcount_walk(1, 3, 2, None);
        status.refcount_walk(0, 3, 4, Some(1));
        assert_eq!(seen, [(2, 6), (3, 6), (4, 6), (0, 12), (1, 12)]);
    }
}
