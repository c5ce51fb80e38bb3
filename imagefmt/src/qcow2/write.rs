//! Writing guest data into a qcow2 image: L2 tables and data clusters allocated on demand,
//! copy-on-write of partial clusters from whatever lies below, zero writes, discard, resize.
//!
//! Write ordering (see also `super::allocator`): a data cluster is allocated (refcount 1)
//! and filled before the L2 entry that points at it is written; an L2 table is allocated and
//! zeroed before the L1 entry that points at it. Old clusters are freed only after the entry
//! that referenced them was rewritten. In durable mode an fsync separates each dependent step,
//! so even a power loss can at worst leak clusters; without it the same holds for a crash of
//! this process (the kernel keeps the page cache), and [`Qcow2Image::flush`] makes it durable.
//!
//! Unit of copy-on-write: the cluster, or with extended L2 entries the subcluster.

use byteorder::{BigEndian, ByteOrder};

use super::allocator::WriteState;
use super::error::Qcow2Error;
use super::features::{AutoclearFeatures, IncompatibleFeatures};
use super::header::Version;
use super::header_cluster::HeaderCluster;
use super::image::{corrupt, Qcow2Image};
use super::tables::{
    ClusterKind, EntryFormat, L1Entry, L2Entry, COPIED, L2_OFFSET_MASK, SUBCLUSTERS, ZERO,
};
use crate::extent::{check_range, GuestRead};
use crate::io::Backend;
use crate::offsets::GuestOffset;
use crate::{Error, Result};

/// How an image is opened for writing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WriteOptions {
    /// fsync between dependent metadata updates (crash-safe against power loss, slower).
    pub durable: bool,
}

/// What a read-write open does with an image's external data file.
enum DataFileAccess {
    /// An image that has one is refused.
    Refused,
    /// Guest data goes into this file, opened for writing.
    Open(Box<dyn Backend + Send + Sync>),
    /// Not opened: the image's tables alone may change.
    TablesOnly,
}

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// Opens an image for reading and writing.
    ///
    /// Refused: images marked corrupt or dirty (their refcounts cannot be trusted: repair them
    /// with check first), encrypted images and images with an external data file (those open
    /// through `open_rw_with_data_file`). Clusters shared with internal snapshots are copied
    /// before they are written (see [`super::snapshot_ops`]). Unknown autoclear bits are
    /// cleared, as qemu does; persistent bitmaps are kept and every later write sets its range
    /// in the enabled ones ([`super::bitmap`]).
    pub fn open_rw(
        backend: B,
        cluster: HeaderCluster,
        below: Option<Box<dyn GuestRead>>,
        options: WriteOptions,
    ) -> Result<Self> {
        Self::open_rw_over(backend, cluster, below, DataFileAccess::Refused, options)
    }

    /// [`Self::open_rw`] for an image that keeps its guest data in the external data file
    /// `data_file` (opened for writing by the caller, which decides whether that file may be
    /// opened at all). New data clusters go into the data file at their guest offsets, without
    /// refcounts, as qemu allocates them; the image file gets metadata only.
    pub(crate) fn open_rw_with_data_file(
        backend: B,
        cluster: HeaderCluster,
        below: Option<Box<dyn GuestRead>>,
        data_file: Box<dyn Backend + Send + Sync>,
        options: WriteOptions,
    ) -> Result<Self> {
        Self::open_rw_over(
            backend,
            cluster,
            below,
            DataFileAccess::Open(data_file),
            options,
        )
    }

    /// [`Self::open_rw`] for changes of the image's tables alone, also of an image with an
    /// external data file, which is not opened: every read or write of guest data then fails
    /// (no data cluster ever goes into the image file).
    pub(crate) fn open_rw_tables_only(
        backend: B,
        cluster: HeaderCluster,
        options: WriteOptions,
    ) -> Result<Self> {
        Self::open_rw_over(backend, cluster, None, DataFileAccess::TablesOnly, options)
    }

    fn open_rw_over(
        backend: B,
        cluster: HeaderCluster,
        below: Option<Box<dyn GuestRead>>,
        data_file: DataFileAccess,
        options: WriteOptions,
    ) -> Result<Self> {
        let h = &cluster.header;
        let refuse = |reason: &'static str| {
            Err(Error::from(Qcow2Error::InvalidOption {
                option: "open for writing",
                value: String::new(),
                reason,
            }))
        };
        if h.incompatible_features
            .contains(IncompatibleFeatures::CORRUPT)
        {
            return Err(Qcow2Error::MarkedCorrupt.into());
        }
        if h.incompatible_features
            .contains(IncompatibleFeatures::DIRTY)
        {
            return refuse("the image is dirty (lazy refcounts after a crash); repair it with check -r all first");
        }
        let bitmaps = super::bitmap::extension(&cluster);
        let mut image = match data_file {
            DataFileAccess::Open(data_file) => {
                Self::open_with_data_file(backend, cluster, below, data_file)?
            }
            DataFileAccess::TablesOnly => Self::open_without_data_file(backend, cluster, below)?,
            // `open` refuses an image that has a data file.
            DataFileAccess::Refused => Self::open(backend, cluster, below)?,
        };
        image.writer = Some(WriteState::load(
            &image.backend,
            &image.header,
            image.file_len,
            options.durable,
        )?);
        if !image.collect_metadata() {
            return refuse("metadata structures overlap (the image is corrupt); repair it with check -r all first");
        }
        image.collect_snapshot_metadata()?;
        // A raw data file stays raw: its autoclear bit is kept with the bitmaps'.
        let kept = image.start_bitmap_tracking(bitmaps)?
            | (image.header.autoclear_features & AutoclearFeatures::RAW_EXTERNAL);
        if image.header.autoclear_features != kept {
            image.header.autoclear_features = kept;
            image.write_fixed_header()?;
        }
        Ok(image)
    }

    /// Makes everything written so far durable (fsync).
    pub fn flush(&mut self) -> Result<()> {
        if let Some(data_file) = &self.data_file {
            data_file
                .sync_all()
                .map_err(Error::io("syncing qcow2 external data file"))?;
        }
        self.backend
            .sync_all()
            .map_err(Error::io("syncing qcow2 image"))
    }

    /// Writes `buf` at guest `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.header.size)?;
        self.mark_bitmaps_dirty(offset, buf.len() as u64)?;
        let unit = self.cow_unit();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let fresh = self.write_fresh_run(pos, &buf[done..])?;
            if fresh > 0 {
                done += fresh;
                continue;
            }
            let in_place = self.write_in_place_run(pos, &buf[done..])?;
            if in_place > 0 {
                done += in_place;
                continue;
            }
            let len = (unit - (pos % unit)).min((buf.len() - done) as u64) as usize;
            self.write_unit(pos, &buf[done..done + len])?;
            done += len;
        }
        Ok(())
    }

    /// Writes the leading whole clusters of `data` at cluster-aligned guest `pos` that are
    /// still unallocated (entry 0) and share one L2 table as one run: contiguous host clusters
    /// (their refcounts raised with one write per refcount block), one data write, one write of
    /// their L2 entries. Returns the bytes written (0: nothing fits, the caller writes unit by
    /// unit). Standard L2 entries only.
    fn write_fresh_run(&mut self, pos: u64, data: &[u8]) -> Result<usize> {
        let cluster_size = self.header.cluster_size();
        let whole = data.len() as u64 / cluster_size;
        if self.header.extended_l2() || pos % cluster_size != 0 || whole == 0 {
            return Ok(0);
        }
        let per_table = self.header.l2_entries();
        let (table, index, entry) = self.l2_for_write(pos)?;
        if entry.entry != 0 {
            return Ok(0);
        }
        let in_table = per_table - (pos >> self.header.cluster_bits) % per_table;
        let mut count = 1;
        while count < whole.min(in_table) {
            match self.l2_entry(pos + count * cluster_size)? {
                Some(e) if e.entry == 0 => count += 1,
                _ => break,
            }
        }
        let len = (count * cluster_size) as usize;
        // The data write right after covers the whole run and so extends the file.
        let host = self.alloc_data(pos, count, false)?;
        self.write_data(&data[..len], host)?;
        self.barrier()?;
        let entries: Vec<u64> = (0..count)
            .map(|i| (host + i * cluster_size) | COPIED)
            .collect();
        self.set_l2_entries(table, index, &entries)?;
        Ok(len)
    }

    /// Writes the leading whole clusters of `data` at cluster-aligned guest `pos` that this
    /// image already holds as data clusters it owns alone (COPIED, refcount 1, no metadata) at
    /// contiguous host offsets in one L2 table: in place, with one data write and no metadata
    /// change. Returns the bytes written (0: the first cluster is not such a cluster; the
    /// caller writes unit by unit). Standard L2 entries only.
    fn write_in_place_run(&mut self, pos: u64, data: &[u8]) -> Result<usize> {
        let cluster_size = self.header.cluster_size();
        let whole = data.len() as u64 / cluster_size;
        if self.header.extended_l2() || pos % cluster_size != 0 || whole == 0 {
            return Ok(0);
        }
        // Refuses an L2 table shared with a snapshot (its L1 entry without COPIED).
        self.l2_for_write(pos)?;
        let per_table = self.header.l2_entries();
        let in_table = per_table - (pos >> self.header.cluster_bits) % per_table;
        let mut first_host = None;
        let mut count = 0;
        while count < whole.min(in_table) {
            let Some(entry) = self.l2_entry(pos + count * cluster_size)? else {
                break;
            };
            let ClusterKind::Normal { host } = self.kind_of(entry) else {
                break;
            };
            let expected = first_host.map_or(host, |first| first + count * cluster_size);
            // Anything unusual (shared, misaligned, overlapping metadata) goes the unit path,
            // which copies or refuses it.
            if !entry.copied()
                || host % cluster_size != 0
                || host != expected
                || !self.owns_data_cluster(host)?
            {
                break;
            }
            first_host.get_or_insert(host);
            count += 1;
        }
        let Some(host) = first_host else {
            return Ok(0);
        };
        let len = (count * cluster_size) as usize;
        self.write_data(&data[..len], host)?;
        Ok(len)
    }

    /// Turns the whole clusters from cluster-aligned `pos` up to `end` (the disk's last
    /// cluster counts as whole if `end` is the end of the disk) that share one L2 table into
    /// zero clusters with one write of their L2 entries, then frees the host clusters they
    /// used; with `skip_zeros`, clusters that already read as zeros keep their entries (not for
    /// a rebase, whose new backing file may show through them). Returns the bytes done
    /// (0: not one whole cluster). v3 images with standard L2 entries only.
    fn zero_cluster_run(&mut self, pos: u64, end: u64, skip_zeros: bool) -> Result<u64> {
        let cluster_size = self.header.cluster_size();
        if self.header.version != Version::V3
            || self.header.extended_l2()
            || pos % cluster_size != 0
        {
            return Ok(0);
        }
        let per_table = self.header.l2_entries();
        let in_table = per_table - (pos >> self.header.cluster_bits) % per_table;
        let mut count = (end - pos) / cluster_size;
        if end == self.header.size && (end - pos) % cluster_size != 0 {
            count += 1;
        }
        let count = count.min(in_table);
        if count == 0 {
            return Ok(0);
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut replaced = Vec::new();
        for i in 0..count {
            let at = pos + i * cluster_size;
            let entry = self.l2_entry(at)?.unwrap_or(L2Entry {
                entry: 0,
                bitmap: 0,
            });
            if skip_zeros && self.reads_zero_already(at)? {
                entries.push(entry.entry);
            } else {
                entries.push(ZERO);
                replaced.push(entry);
            }
        }
        if !replaced.is_empty() {
            // Only now: a range that reads as zeros already needs no L2 table.
            let (table, index, _) = self.l2_for_write(pos)?;
            self.set_l2_entries(table, index, &entries)?;
            for entry in replaced {
                self.release(entry)?;
            }
        }
        Ok((count * cluster_size).min(end - pos))
    }

    /// Makes `len` bytes at `offset` read as zeros: whole clusters (subclusters) by metadata
    /// only (zero flag, host cluster freed), partial ones by writing zeros.
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, true)
    }

    /// [`Self::write_zeroes`] even where the image reads zeros already: for a rebase, whose new
    /// backing file may hold data where the old chain reads zeros.
    pub fn write_zeroes_over_backing(&mut self, offset: u64, len: u64) -> Result<()> {
        self.zero_range(offset, len, false)
    }

    fn zero_range(&mut self, offset: u64, len: u64, skip_zeros: bool) -> Result<()> {
        check_range(offset, 0, self.header.size)?;
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= self.header.size)
            .ok_or(Qcow2Error::ReadOutOfRange {
                offset,
                len,
                size: self.header.size,
            })?;
        self.mark_bitmaps_dirty(offset, len)?;
        if self.data_file_is_raw() {
            // A raw data file must read as the guest disk does: zeros there too (qemu zeroes
            // the whole range in the data file before it changes any entry).
            self.zero_data_file(offset, len)?;
        }
        let unit = self.cow_unit();
        let mut pos = offset;
        while pos < end {
            let run = self.zero_cluster_run(pos, end, skip_zeros)?;
            if run > 0 {
                pos += run;
                continue;
            }
            let piece = (unit - pos % unit).min(end - pos);
            let whole = pos % unit == 0 && (piece == unit || pos + piece == self.header.size);
            if skip_zeros && self.reads_zero_already(pos)? {
                // Nothing to do: unallocated with nothing below, or already a zero cluster.
            } else if whole && self.header.version == Version::V3 {
                self.zero_unit(pos)?;
            } else {
                self.write_at(&vec![0u8; piece as usize], pos)?;
            }
            pos += piece;
        }
        Ok(())
    }

    /// Discards whole clusters in the range: their host clusters are freed; they then read as
    /// zeros (v3) or from the backing file (v2, which has no zero flag). Partial clusters are
    /// left as they are, as discard permits.
    pub fn discard(&mut self, offset: u64, len: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let end = offset.saturating_add(len).min(self.header.size);
        let start = offset.next_multiple_of(cluster_size);
        // Whole clusters only; the disk's last cluster counts as whole if the range reaches
        // the end of the disk.
        let whole_end = if end == self.header.size {
            end
        } else {
            end - end % cluster_size
        };
        if start >= whole_end {
            return Ok(());
        }
        self.mark_bitmaps_dirty(start, whole_end - start)?;
        if self.header.version == Version::V3 {
            return self.write_zeroes(start, whole_end - start);
        }
        let mut pos = start;
        while pos < whole_end {
            if let Some((_, _, entry)) = self.existing_entry(pos)? {
                if entry.entry != 0 {
                    let (table, index, entry) = self.l2_for_write(pos)?;
                    self.set_l2_entry(table, index, 0, 0)?;
                    self.release(entry)?;
                }
            }
            pos += cluster_size;
        }
        Ok(())
    }

    /// Changes the virtual size (refused for a v2 image with internal snapshots, as qemu
    /// refuses it). Growing may relocate the L1 table. Shrinking is refused unless
    /// `allow_shrink`, and even then refused if any cluster past the new end holds data (so no
    /// allocated data is ever lost silently).
    pub fn resize(&mut self, new_size: u64, allow_shrink: bool) -> Result<()> {
        // A v2 snapshot table entry need not record its disk size (qemu refuses this too).
        if self.header.version == super::header::Version::V2 && self.header.nb_snapshots > 0 {
            return Err(super::snapshot::SnapshotError::V2Resize.into());
        }
        let new_size = super::create::round_size(new_size).ok_or(Qcow2Error::DiskTooLarge {
            size: new_size,
            cluster_size: self.header.cluster_size(),
        })?;
        if new_size < self.header.size {
            if !allow_shrink {
                return Err(Qcow2Error::InvalidOption {
                    option: "resize",
                    value: new_size.to_string(),
                    reason: "shrinking needs --shrink",
                }
                .into());
            }
            let cluster_size = self.header.cluster_size();
            let mut pos = new_size - new_size % cluster_size;
            while pos < self.header.size {
                if let Some((_, _, entry)) = self.existing_entry(pos)? {
                    let kind = self.kind_of(entry);
                    let holds_data =
                        !matches!(kind, ClusterKind::Unallocated | ClusterKind::ZeroPlain)
                            || (self.header.extended_l2() && entry.bitmap & 0xffff_ffff != 0);
                    if holds_data && pos + cluster_size > new_size {
                        return Err(Qcow2Error::InvalidOption {
                            option: "resize",
                            value: new_size.to_string(),
                            reason: "data is allocated past the new end; shrinking would lose it",
                        }
                        .into());
                    }
                }
                pos += cluster_size;
            }
        }
        self.set_virtual_size(new_size)
    }

    /// Sets the virtual size to `new_size` (already rounded), growing the L1 table if needed.
    /// A grown range reads as zeros: where a backing file longer than the old size would show
    /// through, the whole grown range is zeroed, as qemu zeroes it (zero clusters, the old last
    /// cluster's tail written); otherwise only an allocated old last cluster's tail (data a
    /// shrink left there) is.
    fn set_virtual_size(&mut self, new_size: u64) -> Result<()> {
        let old_size = self.header.size;
        self.set_virtual_size_only(new_size)?;
        if new_size > old_size {
            let below_end = self.below.as_ref().map_or(0, |below| below.virtual_size());
            let tail_end = new_size.min(old_size.next_multiple_of(self.header.cluster_size()));
            if below_end > old_size {
                self.write_zeroes(old_size, new_size - old_size)?;
            } else if tail_end > old_size
                && self
                    .l2_entry(old_size)?
                    .is_some_and(|e| e.entry != 0 || e.bitmap != 0)
            {
                self.write_zeroes(old_size, tail_end - old_size)?;
            }
        }
        Ok(())
    }

    pub(super) fn set_virtual_size_only(&mut self, new_size: u64) -> Result<()> {
        let needed = super::header::l1_entries_for(
            new_size,
            self.header.cluster_bits,
            self.header.extended_l2(),
        );
        if needed * 8 > super::MAX_L1_TABLE_BYTES {
            return Err(Qcow2Error::DiskTooLarge {
                size: new_size,
                cluster_size: self.header.cluster_size(),
            }
            .into());
        }
        let bitmaps = self.begin_bitmap_resize(new_size)?;
        if needed > self.l1.len() as u64 {
            self.grow_l1(needed)?;
        }
        let old_size = self.header.size;
        self.header.size = new_size;
        self.write_fixed_header()?;
        self.resize_data_file(old_size, new_size)?;
        self.finish_bitmap_resize(bitmaps)
    }

    pub(super) fn grow_l1(&mut self, entries: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let clusters = (entries * 8).div_ceil(cluster_size);
        let offset = self.alloc_contiguous(clusters)?;
        let first = offset >> self.header.cluster_bits;
        self.state().metadata.extend(first..first + clusters);
        let mut table = self.l1.clone();
        table.resize(entries as usize, 0);
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_host(&bytes, offset)?;
        self.barrier()?;
        let (old_offset, old_len) = (self.header.l1_table_offset, self.l1.len() as u64);
        self.header.l1_table_offset = offset;
        self.header.l1_size = entries as u32;
        self.write_fixed_header()?;
        self.barrier()?;
        self.l1 = table;
        for cluster in 0..(old_len * 8).div_ceil(cluster_size) {
            let old = old_offset + cluster * cluster_size;
            let cluster = old >> self.header.cluster_bits;
            self.state().metadata.remove(&cluster);
            self.free_cluster(old)?;
        }
        Ok(())
    }

    /// Copy-on-write unit: a cluster, or a subcluster with extended L2 entries.
    fn cow_unit(&self) -> u64 {
        let cluster_size = self.header.cluster_size();
        if self.header.extended_l2() {
            cluster_size / u64::from(SUBCLUSTERS)
        } else {
            cluster_size
        }
    }

    /// True if the unit at `pos` already reads as zeros without any write (unallocated with
    /// nothing below, or a zero cluster).
    fn reads_zero_already(&self, pos: u64) -> Result<bool> {
        let kind = match self.l2_entry(pos)? {
            None => ClusterKind::Unallocated,
            Some(entry) => self.unit_kind(entry, pos)?,
        };
        Ok(match kind {
            ClusterKind::Unallocated => self.below.is_none(),
            ClusterKind::ZeroPlain | ClusterKind::ZeroAllocated { .. } => true,
            _ => false,
        })
    }

    fn unit_kind(&self, entry: L2Entry, pos: u64) -> Result<ClusterKind> {
        if self.header.extended_l2() {
            let unit = self.cow_unit();
            let index = ((pos % self.header.cluster_size()) / unit) as u32;
            entry
                .subcluster_kind(index, self.header.cluster_bits, self.has_data_file())
                .map_err(|_| corrupt("invalid subcluster bitmap", pos, entry.bitmap))
        } else {
            Ok(self.kind_of(entry))
        }
    }

    /// The kind of a standard L2 entry of this image (in an image with an external data file,
    /// offset 0 with COPIED is guest cluster 0's data cluster, not an unallocated one).
    pub(super) fn kind_of(&self, entry: L2Entry) -> ClusterKind {
        entry.cluster_kind(EntryFormat {
            extended: false,
            ..self.entry_format()
        })
    }

    /// The L2 table offset, entry index and entry for `pos`, if its L2 table exists.
    pub(super) fn existing_entry(&self, pos: u64) -> Result<Option<(u64, usize, L2Entry)>> {
        let cluster_index = pos >> self.header.cluster_bits;
        let per_table = self.header.l2_entries();
        let l1_raw = self
            .l1
            .get((cluster_index / per_table) as usize)
            .copied()
            .unwrap_or(0);
        let Some(l2) = L1Entry(l1_raw).l2_offset() else {
            return Ok(None);
        };
        let entry = self.l2_entry(pos)?.unwrap_or(L2Entry {
            entry: 0,
            bitmap: 0,
        });
        Ok(Some((l2, (cluster_index % per_table) as usize, entry)))
    }

    /// The L2 table for `pos`, allocated (zeroed, then linked from L1) if missing.
    pub(super) fn l2_for_write(&mut self, pos: u64) -> Result<(u64, usize, L2Entry)> {
        if let Some(found) = self.existing_entry(pos)? {
            let l1_index = ((pos >> self.header.cluster_bits) / self.header.l2_entries()) as usize;
            if !L1Entry(self.l1[l1_index]).copied() {
                // Shared with a snapshot: write into a copy.
                let table = self.cow_l2_table(l1_index, pos)?;
                return Ok((table, found.1, found.2));
            }
            return Ok(found);
        }
        let cluster_size = self.header.cluster_size();
        let table = self.alloc_cluster()?;
        let cluster = table >> self.header.cluster_bits;
        self.state().metadata.insert(cluster);
        self.write_host(&vec![0u8; cluster_size as usize], table)?;
        self.barrier()?;
        let cluster_index = pos >> self.header.cluster_bits;
        let per_table = self.header.l2_entries();
        let l1_index = (cluster_index / per_table) as usize;
        self.l1[l1_index] = table | COPIED;
        let l1_entry_offset = self.header.l1_table_offset + l1_index as u64 * 8;
        self.write_host(&(table | COPIED).to_be_bytes(), l1_entry_offset)?;
        Ok((
            table,
            (cluster_index % per_table) as usize,
            L2Entry {
                entry: 0,
                bitmap: 0,
            },
        ))
    }

    /// Writes one L2 entry (and bitmap) to disk and to the cached table.
    pub(super) fn set_l2_entry(
        &mut self,
        table: u64,
        index: usize,
        entry: u64,
        bitmap: u64,
    ) -> Result<()> {
        let extended = self.header.extended_l2();
        let width = if extended { 16 } else { 8 };
        let mut bytes = [0u8; 16];
        BigEndian::write_u64(&mut bytes[..8], entry);
        BigEndian::write_u64(&mut bytes[8..], bitmap);
        self.write_host(&bytes[..width], table + (index * width) as u64)?;
        let cache = self.l2_cache.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some((_, cached)) = cache.iter_mut().find(|(o, _)| *o == table) {
            // In place unless a reader still holds the table (then a copy).
            std::sync::Arc::make_mut(cached)[index * width..index * width + width]
                .copy_from_slice(&bytes[..width]);
        }
        Ok(())
    }

    /// Writes consecutive standard (8-byte) L2 entries from `index` on, to disk in one write
    /// and to the cached table.
    pub(super) fn set_l2_entries(
        &mut self,
        table: u64,
        index: usize,
        entries: &[u64],
    ) -> Result<()> {
        let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_host(&bytes, table + index as u64 * 8)?;
        let cache = self.l2_cache.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some((_, cached)) = cache.iter_mut().find(|(o, _)| *o == table) {
            // In place unless a reader still holds the table (then a copy).
            std::sync::Arc::make_mut(cached)[index * 8..index * 8 + bytes.len()]
                .copy_from_slice(&bytes);
        }
        Ok(())
    }

    /// Drops the host clusters an entry referenced (after the entry was rewritten).
    pub(super) fn release(&mut self, old: L2Entry) -> Result<()> {
        let mut clusters = Vec::new();
        self.clusters_of(old, &mut clusters);
        self.free_clusters(&mut clusters)
    }

    /// Adds the host cluster indices an entry references to `out` (a compressed cluster's
    /// data may span two or more).
    /// Data clusters of an external data file have no refcounts and add nothing.
    fn clusters_of(&self, entry: L2Entry, out: &mut Vec<u64>) {
        let bits = self.header.cluster_bits;
        match self.kind_of(entry) {
            ClusterKind::Normal { .. } | ClusterKind::ZeroAllocated { .. }
                if self.has_data_file() => {}
            ClusterKind::Normal { host } | ClusterKind::ZeroAllocated { host } => {
                out.push(host >> bits)
            }
            ClusterKind::Compressed { host, len } => {
                out.extend(((host & !511) >> bits)..=((host + len - 1) >> bits));
            }
            ClusterKind::Unallocated | ClusterKind::ZeroPlain => {}
        }
    }

    /// The current guest content of the unit starting at `unit_start`, with `data` laid over it
    /// at `pos`.
    fn merged_unit(&self, unit_start: u64, unit: u64, pos: u64, data: &[u8]) -> Result<Vec<u8>> {
        let mut full = vec![0u8; unit as usize];
        let inside = (self.header.size - unit_start).min(unit) as usize;
        if data.len() as u64 != unit {
            self.read_at(&mut full[..inside], GuestOffset(unit_start))?;
        }
        let at = (pos - unit_start) as usize;
        full[at..at + data.len()].copy_from_slice(data);
        Ok(full)
    }

    /// Writes `data` (inside one unit) at guest `pos`.
    fn write_unit(&mut self, pos: u64, data: &[u8]) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let unit = self.cow_unit();
        let (table, index, entry) = self.l2_for_write(pos)?;
        let kind = self.unit_kind(entry, pos)?;
        let cluster_start = pos - pos % cluster_size;
        if !self.header.extended_l2() {
            match kind {
                ClusterKind::Normal { host } if entry.copied() => {
                    if host % cluster_size != 0 {
                        return Err(corrupt("unaligned data cluster offset", pos, entry.entry));
                    }
                    self.refuse_metadata_overlap(host, pos, entry.entry)?;
                    return self.write_data(data, host + pos % cluster_size);
                }
                ClusterKind::ZeroAllocated { host }
                    if entry.copied() && host % cluster_size == 0 =>
                {
                    self.refuse_metadata_overlap(host, pos, entry.entry)?;
                    let mut full = vec![0u8; cluster_size as usize];
                    let at = (pos % cluster_size) as usize;
                    full[at..at + data.len()].copy_from_slice(data);
                    self.write_data(&full, host)?;
                    self.barrier()?;
                    return self.set_l2_entry(table, index, host | COPIED, 0);
                }
                _ => {}
            }
            let full = self.merged_unit(cluster_start, cluster_size, pos, data)?;
            let host = self.alloc_data(cluster_start, 1, true)?;
            self.write_data(&full, host)?;
            self.barrier()?;
            self.set_l2_entry(table, index, host | COPIED, 0)?;
            return self.release(entry);
        }

        // Extended L2: the host cluster holds up to 32 subclusters, each allocated on its own.
        let sub_index = ((pos % cluster_size) / unit) as u32;
        let unit_start = pos - pos % unit;
        let host = entry.entry & L2_OFFSET_MASK;
        if entry.is_compressed() || (host != 0 && !entry.copied()) {
            // Compressed or shared: copy the whole cluster's guest view into a new host cluster
            // (every subcluster allocated), then release the old one.
            let full = self.merged_unit(cluster_start, cluster_size, pos, data)?;
            let host = self.alloc_data(cluster_start, 1, true)?;
            self.write_data(&full, host)?;
            self.barrier()?;
            self.set_l2_entry(table, index, host | COPIED, 0xffff_ffff)?;
            return self.release(entry);
        }
        if host != 0 {
            if host % cluster_size != 0 {
                return Err(corrupt("unaligned data cluster offset", pos, entry.entry));
            }
            self.refuse_metadata_overlap(host, pos, entry.entry)?;
        }
        if matches!(kind, ClusterKind::Normal { .. }) {
            return self.write_data(data, host + pos % cluster_size);
        }
        let merged = self.merged_unit(unit_start, unit, pos, data)?;
        let host = if host == 0 {
            self.alloc_data(cluster_start, 1, true)?
        } else {
            host
        };
        self.write_data(&merged, host + (unit_start - cluster_start))?;
        self.barrier()?;
        let bitmap = (entry.bitmap | (1 << sub_index)) & !(1u64 << (sub_index + SUBCLUSTERS));
        self.set_l2_entry(table, index, host | COPIED, bitmap)
    }

    /// Checks a host cluster before a guest write goes into it in place: it must not hold
    /// metadata (qemu's overlap check) and its refcount must really be 1, as the COPIED flag
    /// claims — a cluster the refcounts call free could be handed out again and overwritten.
    /// A corrupt or hostile L2 entry is refused instead of damaging other data.
    /// (A data cluster of an external data file is checked for neither: that file holds no
    /// metadata and no refcounts.)
    fn refuse_metadata_overlap(&mut self, host: u64, pos: u64, entry: u64) -> Result<()> {
        if self.has_data_file() {
            return Ok(());
        }
        if self.is_metadata(host) {
            return Err(corrupt("data cluster overlaps metadata", pos, entry));
        }
        if self.refcount(host >> self.header.cluster_bits)? != 1 {
            return Err(corrupt(
                "data cluster refcount is not 1 despite the COPIED flag",
                pos,
                entry,
            ));
        }
        Ok(())
    }

    /// True if a guest write may go in place into the data cluster at `host` that a COPIED
    /// entry names: in the image file, only a cluster that holds no metadata and whose
    /// refcount really is 1; in an external data file, always (no metadata, no refcounts).
    fn owns_data_cluster(&mut self, host: u64) -> Result<bool> {
        if self.has_data_file() {
            return Ok(true);
        }
        Ok(!self.is_metadata(host) && self.refcount(host >> self.header.cluster_bits)? == 1)
    }

    /// Turns the whole unit at `pos` into zeros by metadata (v3 only).
    fn zero_unit(&mut self, pos: u64) -> Result<()> {
        if !self.header.extended_l2() {
            let (table, index, entry) = self.l2_for_write(pos)?;
            self.set_l2_entry(table, index, ZERO, 0)?;
            return self.release(entry);
        }
        let (table, index, entry) = self.l2_for_write(pos)?;
        if entry.is_compressed() {
            let unit = self.cow_unit();
            return self.write_unit(pos, &vec![0u8; unit as usize]);
        }
        let sub_index = ((pos % self.header.cluster_size()) / self.cow_unit()) as u32;
        let bitmap = (entry.bitmap & !(1u64 << sub_index)) | (1u64 << (sub_index + SUBCLUSTERS));
        let host = entry.entry & L2_OFFSET_MASK;
        if bitmap & 0xffff_ffff == 0 && entry.entry != 0 {
            // No subcluster uses the host cluster any more: free it.
            self.set_l2_entry(table, index, 0, bitmap)?;
            return self.free_data_cluster(host);
        }
        self.set_l2_entry(table, index, entry.entry, bitmap)
    }
}

/// Operations that whole-image commands (convert, commit, rebase) build on.
impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// True if this image itself decides the content of the unit at `offset` (data, zero or
    /// compressed here), false if reads fall through to the image below.
    pub fn is_allocated_here(&self, offset: u64) -> Result<bool> {
        Ok(match self.l2_entry(offset)? {
            None => false,
            Some(entry) => !matches!(self.unit_kind(entry, offset)?, ClusterKind::Unallocated),
        })
    }

    /// The copy-on-write unit in bytes: the cluster size, or the subcluster size with extended
    /// L2 entries. Whole-image operations step through the disk in these units.
    pub(crate) fn unit_size(&self) -> u64 {
        self.cow_unit()
    }

    /// Drops every cluster of this image, so that all reads fall through to the image below
    /// (what `qemu-img commit` leaves behind). L2 tables and data clusters are freed.
    pub(crate) fn make_empty(&mut self) -> Result<()> {
        for l1_index in 0..self.l1.len() {
            let Some((table, entries)) = self.l2_entries_of(l1_index)? else {
                continue;
            };
            // Unlink the table first, then free what it referenced.
            self.l1[l1_index] = 0;
            let l1_entry_offset = self.header.l1_table_offset + l1_index as u64 * 8;
            self.write_host(&0u64.to_be_bytes(), l1_entry_offset)?;
            self.barrier()?;
            self.l2_cache
                .get_mut()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|(o, _)| *o != table);
            // Every reference the table held, and the table itself, dropped together: one
            // write per refcount block.
            let mut clusters = Vec::new();
            for entry in entries {
                self.clusters_of(entry, &mut clusters);
            }
            let cluster = table >> self.header.cluster_bits;
            clusters.push(cluster);
            self.state().metadata.remove(&cluster);
            self.free_clusters(&mut clusters)?;
        }
        Ok(())
    }

    /// Points the image at a new backing file (or none), rewriting cluster 0: the header, the
    /// backing-format extension and the name. Guest data is not touched (`rebase -u`).
    pub(crate) fn set_backing(&mut self, backing: Option<(&str, &str)>) -> Result<()> {
        let mut cluster = HeaderCluster::read_from(&self.backend)?;
        let old_len = cluster.to_bytes()?.len();
        cluster.header = self.header.clone();
        cluster
            .extensions
            .retain(|e| !matches!(e, super::extensions::Extension::BackingFormat(_)));
        match backing {
            Some((name, format)) => {
                cluster.extensions.insert(
                    0,
                    super::extensions::Extension::BackingFormat(format.to_owned()),
                );
                cluster.backing_file = Some(name.to_owned());
            }
            None => cluster.backing_file = None,
        }
        let mut bytes = cluster.to_bytes()?;
        bytes.resize(bytes.len().max(old_len), 0);
        self.header = HeaderCluster::parse(&bytes)?.header;
        self.write_host(&bytes, 0)
    }

    /// Replaces what lies below this image (after [`Self::set_backing`]).
    pub(crate) fn set_below(&mut self, below: Option<Box<dyn GuestRead>>) {
        self.below = below;
    }
}
