//! Internal snapshots on an open image: create, apply, delete, and the copy-on-write of L2
//! tables that snapshots share with the active state.
//!
//! The semantics are qemu's (`block/qcow2-snapshot.c`, `qcow2_update_snapshot_refcount` in
//! `block/qcow2-refcount.c`): a host cluster's refcount counts every L1 table (the active one
//! and each snapshot's) through which it is reached. An L2 table reached from two L1 tables has
//! refcount 2, and so has every cluster it maps, even though one table points at them. So:
//!
//! ```text
//! create   copy the active L1 to new clusters; +1 on every L2 table and cluster it reaches
//!          (compressed: every host cluster the data touches); COPIED cleared where the
//!          refcount is now > 1; new snapshot table written, then the header switched to it
//! apply    +1 on what the snapshot's L1 reaches; its L1 becomes the active L1 (in place);
//!          -1 on what the old active L1 reached; COPIED recomputed; the disk size follows
//! delete   entry dropped (new table, header switched); -1 on what its L1 reaches; its L1
//!          freed; COPIED recomputed in the active tables
//! write    an L2 table whose L1 entry lacks COPIED is copied first (the copy is the active
//!          one, the old table loses one reference: the data clusters' counts do not change,
//!          they are now reached through the copy instead); data clusters without COPIED are
//!          copied by the ordinary write path, which drops one reference from the old cluster
//! ```
//!
//! Crash safety: refcounts are raised before the new snapshot table (the only thing pointing at
//! a new snapshot L1) is switched in, and lowered only after the table no longer lists a deleted
//! snapshot; the header switch is preceded and followed by an fsync. A crash leaks clusters at
//! worst.

use byteorder::{BigEndian, ByteOrder};

use super::header::{l1_entries_for, Header};
use super::image::{corrupt, Qcow2Image};
use super::snapshot::{self, L1Problem, Snapshot, SnapshotError, SnapshotTable};
use super::tables::{ClusterKind, L1Entry, L2Entry, COPIED, L1_OFFSET_MASK};
use super::{Qcow2Error, MAX_L1_TABLE_BYTES, MAX_SNAPSHOTS};
use crate::io::Backend;
use crate::{Error, Result};

/// The longest name `create_snapshot` records: qemu-img copies the name into a 256-byte C
/// string, keeping 255 bytes.
pub const MAX_NAME_BYTES: usize = 255;

/// qemu's `QCOW_MAX_REFTABLE_SIZE` as `qcow2_refcount_area` compares it: with a count of
/// refcount-table entries.
const QEMU_MAX_REFTABLE_ENTRIES: u64 = 8 << 20;

/// Bytes the table reader fetches at a time: entries are small and read field by field.
const TABLE_READ_AHEAD: usize = 64 << 10;

/// Reads the snapshot table of the image whose header is `header`, as qemu's
/// `qcow2_read_snapshots` reads it when it opens an image: the table pointer is validated
/// first (also without snapshots), bytes past the end of the file read as zeros, and every
/// bound of [`snapshot::walk_table`] holds. This is the one reading of the table an open image
/// keeps ([`Qcow2Image::snapshot_table`]); `info` reads it the same way.
pub fn read_snapshots<B: Backend + ?Sized>(backend: &B, header: &Header) -> Result<SnapshotTable> {
    snapshot::validate_pointer(
        header.snapshots_offset,
        header.nb_snapshots,
        header.cluster_size(),
    )?;
    // Entries are read field by field: serve them from one read-ahead window at a time.
    let mut window: (u64, Vec<u8>) = (0, Vec::new());
    snapshot::read_table(
        |buf, at| {
            let (start, bytes) = &window;
            let inside = at >= *start && at + buf.len() as u64 <= *start + bytes.len() as u64;
            if !inside {
                if buf.len() >= TABLE_READ_AHEAD {
                    return read_padded(backend, buf, at);
                }
                let mut fresh = vec![0u8; TABLE_READ_AHEAD];
                read_padded(backend, &mut fresh, at)?;
                window = (at, fresh);
            }
            let from = (at - window.0) as usize;
            buf.copy_from_slice(&window.1[from..from + buf.len()]);
            Ok(())
        },
        header.snapshots_offset,
        header.nb_snapshots,
    )
}

fn read_padded<B: Backend + ?Sized>(backend: &B, buf: &mut [u8], at: u64) -> Result<()> {
    let got = backend
        .read_prefix_at(buf, at)
        .map_err(Error::reading("qcow2 snapshot table"))?;
    buf[got..].fill(0);
    Ok(())
}

/// Where an L1 table's refcount walk writes changed COPIED flags of the L1 entries.
#[derive(Clone, Copy)]
enum L1WriteBack {
    /// Write the changed L1 table here (unless references are being dropped).
    At(u64),
    /// The table is going away: do not write it.
    Nowhere,
}

impl<B: Backend> Qcow2Image<B> {
    /// The image's internal snapshots, in table order (a copy of [`Self::snapshot_table`]'s
    /// entries).
    pub fn snapshots(&self) -> Result<Vec<Snapshot>> {
        Ok(self.snapshots.entries.clone())
    }

    /// The snapshot table as read when the image was opened (and kept up to date by the
    /// snapshot operations).
    pub fn snapshot_table(&self) -> &SnapshotTable {
        &self.snapshots
    }

    /// Checks every snapshot's L1 table as qemu's `qcow2_validate_table` does before an
    /// operation that needs them all (amend's downgrade): the first invalid one is
    /// [`SnapshotError::InvalidL1`]. Nothing is read.
    pub(crate) fn check_snapshot_l1_tables(&self) -> Result<()> {
        self.snapshots
            .entries
            .iter()
            .try_for_each(|sn| self.validate_snapshot_l1(sn).map_err(Error::from))
    }

    /// qemu's `qcow2_validate_table` for a snapshot's L1 table, plus: inside the file.
    fn validate_snapshot_l1(&self, sn: &Snapshot) -> std::result::Result<(), SnapshotError> {
        let bytes = u64::from(sn.l1_size) * 8;
        let problem = if bytes > MAX_L1_TABLE_BYTES {
            L1Problem::TooLarge
        } else if sn.l1_table_offset % self.header.cluster_size() != 0
            || sn.l1_table_offset.checked_add(bytes).is_none()
        {
            L1Problem::Unaligned
        } else if bytes > 0 && sn.l1_table_offset + bytes > self.file_len {
            L1Problem::PastEndOfFile
        } else {
            return Ok(());
        };
        Err(SnapshotError::InvalidL1 {
            id: sn.id_str(),
            offset: sn.l1_table_offset,
            l1_size: sn.l1_size,
            problem,
        })
    }

    /// Reads a snapshot's L1 table after [`Self::validate_snapshot_l1`] (aligned, at most
    /// 32 MiB, inside the file).
    pub(super) fn read_snapshot_l1(&self, sn: &Snapshot) -> Result<Vec<u64>> {
        self.validate_snapshot_l1(sn)?;
        let bytes = u64::from(sn.l1_size) * 8;
        if bytes == 0 {
            return Ok(Vec::new());
        }
        let mut raw = vec![0u8; bytes as usize];
        self.backend
            .read_exact_at(&mut raw, sn.l1_table_offset)
            .map_err(Error::reading("qcow2 snapshot L1 table"))?;
        Ok(raw.chunks_exact(8).map(BigEndian::read_u64).collect())
    }
}

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// `qemu-img snapshot -c NAME`: records the current state as snapshot `name`, taken at
    /// `date` (seconds, nanoseconds since the epoch). The id is the next free number, as qemu
    /// picks it; VM state size and VM clock are 0, the icount 0 (what qemu-img records). Names
    /// need not be unique (qemu-img does not require it either); like qemu-img, only the first
    /// [`MAX_NAME_BYTES`] bytes of a longer name are kept.
    pub fn create_snapshot(&mut self, name: &str, date: (u32, u32)) -> Result<Snapshot> {
        self.refuse_snapshot_data_file()?;
        self.allocate_first_fit();
        let mut table = self.snapshots()?;
        if table.len() >= MAX_SNAPSHOTS as usize {
            return Err(SnapshotError::TooMany.into());
        }
        let before = self.l1.clone();
        self.check_refcount_room(&before)?;
        // The references first: a cluster no refcount block covers is refused there, before
        // anything is written (qemu allocates the L1 copy first and leaks it then). The copy
        // holds the L1 entries as they were, as qemu's does.
        let mut active = self.l1.clone();
        let active_offset = self.header.l1_table_offset;
        self.update_refcounts(&mut active, L1WriteBack::At(active_offset), 1)?;
        self.l1 = active;
        let cluster_size = self.header.cluster_size();
        let l1_bytes = before.len() as u64 * 8;
        let l1_table_offset = if l1_bytes == 0 {
            0
        } else {
            let clusters = l1_bytes.div_ceil(cluster_size);
            let offset = self.alloc_contiguous(clusters)?;
            let first = offset >> self.header.cluster_bits;
            self.state().metadata.extend(first..first + clusters);
            let bytes: Vec<u8> = before.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write_host(&bytes, offset)?;
            offset
        };
        self.sync()?;
        let sn = Snapshot {
            l1_table_offset,
            l1_size: self.l1.len() as u32,
            id: snapshot::next_id(&table).into_bytes(),
            name: name.as_bytes()[..name.len().min(MAX_NAME_BYTES)].to_vec(),
            date_sec: date.0,
            date_nsec: date.1,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(self.header.size),
            icount: Some(0),
            extra_data_size: snapshot::KNOWN_EXTRA_DATA,
            unknown_extra: Vec::new(),
        };
        table.push(sn.clone());
        self.write_snapshot_table(&table)?;
        Ok(sn)
    }

    /// `qemu-img snapshot -a KEY`: makes the snapshot whose id (else whose name) is `key` the
    /// current state. The snapshot stays; the disk size becomes the snapshot's.
    /// Refused while the image has persistent dirty bitmaps, as qemu refuses it (checked
    /// before the snapshot is looked up, as qemu does; the directory was read at open).
    pub fn apply_snapshot(&mut self, key: &str) -> Result<Snapshot> {
        if self.has_bitmaps {
            return Err(SnapshotError::ActiveBitmaps.into());
        }
        self.refuse_snapshot_data_file()?;
        self.allocate_first_fit();
        let table = self.snapshots()?;
        let sn = snapshot::find_by_id_or_name(&table, key)
            .map(|i| table[i].clone())
            .ok_or_else(|| SnapshotError::NotFound {
                name: key.to_owned(),
            })?;
        let sn_l1 = self.read_snapshot_l1(&sn)?;
        let disk_size = sn.disk_size_or(self.header.size);
        let needed = l1_entries_for(
            disk_size,
            self.header.cluster_bits,
            self.header.extended_l2(),
        )
        .max(u64::from(sn.l1_size));
        if needed * 8 > MAX_L1_TABLE_BYTES {
            return Err(Qcow2Error::L1TableTooLarge { entries: needed }.into());
        }
        if needed > self.l1.len() as u64 {
            self.grow_l1(needed)?;
        }
        self.check_refcount_room(&sn_l1)?;
        // References through the snapshot first (its own L1 gets the COPIED flags qemu gives it).
        let mut raised = sn_l1.clone();
        self.update_refcounts(&mut raised, L1WriteBack::At(sn.l1_table_offset), 1)?;
        self.sync()?;
        let mut new_active = sn_l1;
        new_active.resize(self.l1.len(), 0);
        let bytes: Vec<u8> = new_active.iter().flat_map(|e| e.to_be_bytes()).collect();
        let active_offset = self.header.l1_table_offset;
        self.write_host(&bytes, active_offset)?;
        self.sync()?;
        let mut old = std::mem::replace(&mut self.l1, new_active);
        self.forget_l2_cache();
        self.update_refcounts(&mut old, L1WriteBack::Nowhere, -1)?;
        let mut active = self.l1.clone();
        self.update_refcounts(&mut active, L1WriteBack::At(active_offset), 0)?;
        self.l1 = active;
        let cluster_bits = self.header.cluster_bits;
        let tables: Vec<u64> = self
            .l1
            .iter()
            .filter_map(|&e| L1Entry(e).l2_offset())
            .map(|o| o >> cluster_bits)
            .collect();
        self.state().metadata.extend(tables);
        if disk_size != self.header.size {
            self.header.size = disk_size;
            self.write_fixed_header()?;
        }
        self.sync()?;
        Ok(sn)
    }

    /// `qemu-img snapshot -d NAME`: deletes the first snapshot whose name is `name` (qemu-img
    /// matches names only here), freeing what only it referenced.
    pub fn delete_snapshot(&mut self, name: &str) -> Result<Snapshot> {
        self.allocate_first_fit();
        let mut table = self.snapshots()?;
        let index =
            snapshot::find_by_name(&table, name).ok_or_else(|| SnapshotError::NotFound {
                name: name.to_owned(),
            })?;
        let sn = table[index].clone();
        let mut sn_l1 = self.read_snapshot_l1(&sn)?;
        table.remove(index);
        self.write_snapshot_table(&table)?;
        self.update_refcounts(&mut sn_l1, L1WriteBack::Nowhere, -1)?;
        let cluster_size = self.header.cluster_size();
        let l1_clusters = (u64::from(sn.l1_size) * 8).div_ceil(cluster_size);
        for k in 0..l1_clusters {
            let offset = sn.l1_table_offset + k * cluster_size;
            self.drop_reference(offset >> self.header.cluster_bits)?;
        }
        let mut active = self.l1.clone();
        let active_offset = self.header.l1_table_offset;
        self.update_refcounts(&mut active, L1WriteBack::At(active_offset), 0)?;
        self.l1 = active;
        self.forget_l2_cache();
        self.sync()?;
        Ok(sn)
    }

    /// Copies the L2 table of L1 entry `l1_index` (whose COPIED flag is clear: the table is
    /// shared with a snapshot) to a new cluster, links the copy from the active L1 table and
    /// drops one reference from the old table. Returns the copy's offset. `pos` is the guest
    /// offset being written (for error messages).
    pub(super) fn cow_l2_table(&mut self, l1_index: usize, pos: u64) -> Result<u64> {
        let raw = self.l1[l1_index];
        let old = L1Entry(raw)
            .l2_offset()
            .ok_or_else(|| corrupt("copy of an unallocated L2 table", pos, raw))?;
        let bytes = self.l2_table(old, pos, raw)?.to_vec();
        let new = self.alloc_cluster()?;
        let cluster_bits = self.header.cluster_bits;
        self.state().metadata.insert(new >> cluster_bits);
        self.write_host(&bytes, new)?;
        self.barrier()?;
        self.l1[l1_index] = new | COPIED;
        let entry_offset = self.header.l1_table_offset + l1_index as u64 * 8;
        self.write_host(&(new | COPIED).to_be_bytes(), entry_offset)?;
        self.barrier()?;
        self.drop_reference(old >> cluster_bits)?;
        Ok(new)
    }

    /// Adds the snapshot table's clusters, the snapshots' L1 tables and the L2 tables they
    /// reach to the clusters writes must never touch. A snapshot whose L1 table is invalid is
    /// not followed (nothing it names is read); as in qemu, the image still opens, and the
    /// operations that need that table fail ([`SnapshotError::InvalidL1`]). Its clusters keep
    /// their refcounts, so the allocator never hands them out.
    pub(super) fn collect_snapshot_metadata(&mut self) -> Result<()> {
        if self.snapshots.entries.is_empty() {
            return Ok(());
        }
        let cluster_bits = self.header.cluster_bits;
        let span = |offset: u64, len: u64| {
            (offset >> cluster_bits)..(offset + len).div_ceil(1 << cluster_bits)
        };
        let table = &self.snapshots;
        let mut clusters: Vec<u64> = span(table.offset, table.size).collect();
        for sn in &table.entries {
            let l1 = match self.read_snapshot_l1(sn) {
                Ok(l1) => l1,
                Err(Error::Qcow2(Qcow2Error::Snapshot(SnapshotError::InvalidL1 { .. }))) => {
                    continue
                }
                Err(e) => return Err(e),
            };
            clusters.extend(span(sn.l1_table_offset, u64::from(sn.l1_size) * 8));
            for &e in &l1 {
                if let Some(table) = L1Entry(e).l2_offset() {
                    if table % self.header.cluster_size() != 0 {
                        return Err(corrupt("unaligned snapshot L2 table offset", 0, e));
                    }
                    clusters.push(table >> cluster_bits);
                }
            }
        }
        self.state().metadata.extend(clusters);
        Ok(())
    }

    /// Makes the next allocations search for free clusters from the start of the file, as
    /// qemu's allocator does in every process that opens the image (the writer otherwise
    /// appends). Snapshot operations, amend and repairs then place their tables where
    /// qemu-img places them, reusing the holes earlier tables left.
    pub(super) fn allocate_first_fit(&mut self) {
        self.state().next_free = 0;
    }

    fn refuse_snapshot_data_file(&self) -> Result<()> {
        if self
            .header
            .incompatible_features
            .contains(super::features::IncompatibleFeatures::EXTERNAL_DATA_FILE)
        {
            return Err(SnapshotError::DataFile.into());
        }
        Ok(())
    }

    /// An fsync, whatever the durability option: snapshot operations switch tables.
    fn sync(&mut self) -> Result<()> {
        self.backend
            .sync_all()
            .map_err(Error::io("syncing qcow2 image"))
    }

    fn forget_l2_cache(&mut self) {
        self.l2_cache
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// Refuses, before anything is written, a +1 on what `l1` reaches that a refcount entry
    /// could not hold (narrow refcounts: 1 bit cannot count any shared cluster, 2 bits three
    /// references). qemu finds out halfway and leaves leaks; this walks first. With refcounts of
    /// 16 bits and more there is always room (at most 65,536 snapshots), so nothing is walked.
    fn check_refcount_room(&mut self, l1: &[u64]) -> Result<()> {
        let order = self.header.refcount_order;
        if order >= 4 {
            return Ok(());
        }
        let limit = super::refcount::max_refcount(order);
        let format = self.entry_format();
        let cluster_bits = self.header.cluster_bits;
        let cluster_size = self.header.cluster_size();
        let full = |count: u64| count >= limit;
        let mut no_room = false;
        for &raw in l1 {
            let Some(l2_offset) = L1Entry(raw).l2_offset() else {
                continue;
            };
            if full(self.refcount(l2_offset >> cluster_bits)?) {
                no_room = true;
                break;
            }
            let table = self.l2_table(l2_offset, 0, raw)?;
            for j in 0..format.l2_entries() as usize {
                let clusters = match L2Entry::from_table(&table, j, format).cluster_kind(format) {
                    ClusterKind::Compressed { host, len } => {
                        host / cluster_size..=(host + len - 1) / cluster_size
                    }
                    ClusterKind::Normal { host } | ClusterKind::ZeroAllocated { host } => {
                        host >> cluster_bits..=host >> cluster_bits
                    }
                    ClusterKind::ZeroPlain | ClusterKind::Unallocated => continue,
                };
                for cluster in clusters {
                    no_room |= full(self.refcount(cluster)?);
                }
            }
            if no_room {
                break;
            }
        }
        if no_room {
            return Err(SnapshotError::RefcountTooNarrow {
                bits: self.header.refcount_bits(),
            }
            .into());
        }
        Ok(())
    }

    /// Refuses a +1 on a cluster that no refcount block covers (only a corrupt image references
    /// one), as qemu's `alloc_refcount_block` fails the snapshot's refcount update: EFBIG when
    /// the refcount table would have to grow past qemu's limit to list the block, else EAGAIN
    /// ([`SnapshotError::RefcountBlockMissing`]), after qemu has hooked up a new block. Here
    /// nothing is written.
    fn refuse_uncovered(&mut self, clusters: &[u64]) -> Result<()> {
        let per_block = super::refcount::entries_per_block(
            self.header.cluster_bits,
            self.header.refcount_order,
        );
        let entries_per_cluster = self.header.cluster_size() / 8;
        for &cluster in clusters {
            let index = cluster / per_block;
            let reftable = &self.state().reftable;
            let covered = reftable
                .get(index as usize)
                .is_some_and(|&e| e & super::refcount::REFTABLE_OFFSET_MASK != 0);
            if covered {
                continue;
            }
            if index >= reftable.len() as u64 {
                // qemu's qcow2_refcount_area: the new table lists the blocks so far plus half
                // as many again, in whole clusters, and may not exceed QCOW_MAX_REFTABLE_SIZE
                // entries (8 Mi).
                let blocks = index + 1;
                let table = (blocks + blocks.div_ceil(2)).next_multiple_of(entries_per_cluster);
                if blocks > QEMU_MAX_REFTABLE_ENTRIES || table > QEMU_MAX_REFTABLE_ENTRIES {
                    return Err(Qcow2Error::RefcountTableTooLarge {
                        clusters: u32::try_from(table / entries_per_cluster).unwrap_or(u32::MAX),
                    }
                    .into());
                }
            }
            return Err(SnapshotError::RefcountBlockMissing { cluster }.into());
        }
        Ok(())
    }

    /// Drops one reference from a metadata cluster; at 0 it is metadata no more.
    fn drop_reference(&mut self, cluster: u64) -> Result<()> {
        self.adjust_refcounts(&mut [cluster], -1)?;
        if self.refcount(cluster)? == 0 {
            self.state().metadata.remove(&cluster);
        }
        Ok(())
    }

    /// qemu's `qcow2_update_snapshot_refcount`: adds `addend` (+1, -1 or 0) to the refcount of
    /// every L2 table and every cluster reachable from `l1`, and sets the COPIED flag of each
    /// L2 entry and L1 entry met to "refcount is 1" (compressed clusters never get it). Changed
    /// L2 tables are written in place; a changed `l1` is written to `write_back` unless the
    /// references are being dropped.
    fn update_refcounts(
        &mut self,
        l1: &mut [u64],
        write_back: L1WriteBack,
        addend: i64,
    ) -> Result<()> {
        let format = self.entry_format();
        let cluster_bits = self.header.cluster_bits;
        let cluster_size = self.header.cluster_size();
        let width = format.entry_bytes();
        // First every refcount change, with one write per refcount block (qemu batches them
        // in its refcount cache); then the COPIED flags, from the new refcounts.
        if addend != 0 {
            let mut clusters = Vec::new();
            for (i, &raw) in l1.iter().enumerate() {
                let Some(l2_offset) = L1Entry(raw).l2_offset() else {
                    continue;
                };
                let guest = (i as u64 * format.l2_entries()) << cluster_bits;
                if l2_offset % cluster_size != 0 {
                    return Err(corrupt("L2 table offset unaligned", guest, raw));
                }
                let table = self.l2_table(l2_offset, guest, raw)?;
                for j in 0..format.l2_entries() as usize {
                    let entry = L2Entry::from_table(&table, j, format);
                    match entry.cluster_kind(format) {
                        ClusterKind::Compressed { host, len } => {
                            clusters.extend(host / cluster_size..=(host + len - 1) / cluster_size)
                        }
                        ClusterKind::Normal { host } | ClusterKind::ZeroAllocated { host } => {
                            if host % cluster_size != 0 || host == 0 {
                                let at = guest + ((j as u64) << cluster_bits);
                                return Err(corrupt(
                                    "cluster allocation offset unaligned",
                                    at,
                                    entry.entry,
                                ));
                            }
                            clusters.push(host >> cluster_bits);
                        }
                        ClusterKind::ZeroPlain | ClusterKind::Unallocated => {}
                    }
                }
                clusters.push(l2_offset >> cluster_bits);
            }
            if addend > 0 {
                self.refuse_uncovered(&clusters)?;
            }
            self.adjust_refcounts(&mut clusters, addend)?;
        }
        let mut l1_modified = false;
        for (i, slot) in l1.iter_mut().enumerate() {
            let raw = *slot;
            let Some(l2_offset) = L1Entry(raw).l2_offset() else {
                continue;
            };
            let guest = (i as u64 * format.l2_entries()) << cluster_bits;
            if l2_offset % cluster_size != 0 {
                return Err(corrupt("L2 table offset unaligned", guest, raw));
            }
            let old_table = self.l2_table(l2_offset, guest, raw)?;
            let mut table = old_table.to_vec();
            let mut changed = false;
            for j in 0..format.l2_entries() as usize {
                let old = L2Entry::from_table(&old_table, j, format);
                let refcount = match old.cluster_kind(format) {
                    ClusterKind::Compressed { .. } => 2, // never written in place
                    ClusterKind::Normal { host } | ClusterKind::ZeroAllocated { host } => {
                        if host % cluster_size != 0 || host == 0 {
                            let at = guest + ((j as u64) << cluster_bits);
                            return Err(corrupt(
                                "cluster allocation offset unaligned",
                                at,
                                old.entry,
                            ));
                        }
                        self.refcount(host >> cluster_bits)?
                    }
                    ClusterKind::ZeroPlain | ClusterKind::Unallocated => 0,
                };
                let mut entry = old.entry & !COPIED;
                if refcount == 1 {
                    entry |= COPIED;
                }
                if entry != old.entry {
                    BigEndian::write_u64(&mut table[j * width..j * width + 8], entry);
                    changed = true;
                }
            }
            if changed {
                self.write_host(&table, l2_offset)?;
                let cache = self.l2_cache.get_mut().unwrap_or_else(|e| e.into_inner());
                cache.retain(|(o, _)| *o != l2_offset);
            }
            let table_refcount = self.refcount(l2_offset >> cluster_bits)?;
            if table_refcount == 0 {
                self.state().metadata.remove(&(l2_offset >> cluster_bits));
            }
            let mut entry = raw & L1_OFFSET_MASK;
            if table_refcount == 1 {
                entry |= COPIED;
            }
            if entry != raw {
                *slot = entry;
                l1_modified = true;
            }
        }
        self.barrier()?;
        if let (L1WriteBack::At(offset), true) = (write_back, addend >= 0 && l1_modified) {
            let bytes: Vec<u8> = l1.iter().flat_map(|e| e.to_be_bytes()).collect();
            self.write_host(&bytes, offset)?;
        }
        Ok(())
    }

    /// Writes `table` as the new snapshot table in new clusters, switches the header to it
    /// (fsync before and after) and frees the old table's clusters.
    pub(super) fn write_snapshot_table(&mut self, table: &[Snapshot]) -> Result<()> {
        let (old_offset, old_size) = (self.snapshots.offset, self.snapshots.size);
        self.replace_snapshot_table(table, old_offset, old_size)
    }

    /// [`Self::write_snapshot_table`] for an old table the caller has measured: `old_size`
    /// bytes at `old_offset` are freed once the header points at the new table. The repair of
    /// a table qemu does not open (`check -r all`) needs this: the image is opened without
    /// it. The table the image holds becomes the new one, as a reader would read it back.
    pub(super) fn replace_snapshot_table(
        &mut self,
        table: &[Snapshot],
        old_offset: u64,
        old_size: u64,
    ) -> Result<()> {
        let bytes = snapshot::encode_table(table, self.header.size)?;
        let cluster_size = self.header.cluster_size();
        let cluster_bits = self.header.cluster_bits;
        let new_offset = if bytes.is_empty() {
            0
        } else {
            let clusters = (bytes.len() as u64).div_ceil(cluster_size);
            let offset = self.alloc_contiguous(clusters)?;
            self.state()
                .metadata
                .extend((offset >> cluster_bits)..(offset >> cluster_bits) + clusters);
            self.write_host(&bytes, offset)?;
            offset
        };
        self.sync()?;
        self.header.nb_snapshots = table.len() as u32;
        self.header.snapshots_offset = new_offset;
        self.write_fixed_header()?;
        self.sync()?;
        let image_size = self.header.size;
        self.snapshots = SnapshotTable {
            offset: new_offset,
            size: bytes.len() as u64,
            entries: table.iter().map(|sn| sn.as_written(image_size)).collect(),
        };
        if old_size > 0 {
            let first = old_offset >> cluster_bits;
            let end = (old_offset + old_size).div_ceil(cluster_size);
            for cluster in first..end {
                self.drop_reference(cluster)?;
            }
        }
        Ok(())
    }
}
