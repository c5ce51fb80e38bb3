//! `qemu-img check` for qcow2: rebuild every host cluster's refcount from the metadata, compare it
//! with the refcounts on disk, verify the COPIED flags, and optionally repair.
//!
//! The semantics follow qemu 7.2 (`block/qcow2-refcount.c` `qcow2_check_refcounts` and its helpers,
//! `block/qcow2-snapshot.c` `qcow2_check_read_snapshot_table`, `block/qcow2-bitmap.c`
//! `qcow2_check_bitmaps_refcounts`; FORMATS.md §1.6, §1.11) so that the corruption and leak counts
//! are the ones `qemu-img check` reports for the same file:
//!
//! ```text
//! 1. snapshot table      parse it (bounded); v3 entries with < 16 bytes of extra data: corruption
//! 2. expected refcounts  +1 per reference: header, active L1 and its L2 tables and data clusters
//!                        (compressed: every host cluster the 512-byte-rounded range touches),
//!                        snapshot L1/L2 tables, snapshot table, refcount table, LUKS header,
//!                        bitmap directory/tables/data, refcount blocks (each must end up at 1)
//! 3. compare             every cluster below ceil(file length / cluster size):
//!                        on disk < expected: corruption; on disk > expected: leak
//! 4. COPIED flags        L1 and L2 entries: set iff the on-disk refcount is exactly 1
//! ```
//!
//! Like qemu, everything read past the end of the file reads as zeros, and references that run
//! one cluster or more past the end of the file are corruptions rather than errors.
//!
//! Repairs ([`Repair::Leaks`], [`Repair::All`]) write corrected refcount entries in place; when
//! the refcount structure itself is broken (a referenced cluster with refcount 0, a refcount block
//! that is unaligned, has reserved bits or a refcount other than 1) [`Repair::All`] writes a new
//! refcount table and new refcount blocks, as qemu's `rebuild_refcount_structure` does. Not
//! repaired (still reported): metadata overlaps (qemu
//! runs its overlap checks before every repair write; this implementation trusts the metadata it
//! just validated).
//!
//! The snapshot table under [`Repair::All`] is read as qemu's `check -r all` reads it: extra
//! data over 1024 bytes is cut, entries past the table size limit are dropped (the header's
//! count is lowered at once; their clusters leak and the refcount repair frees them), and
//! after the refcount repair a table with corruptions (also v3 entries without the 16 bytes
//! of extra data v3 needs) is written anew, as qemu's `qcow2_check_fix_snapshot_table` does:
//! new clusters, then the header switched, then the old clusters freed.

use std::io;

use byteorder::{BigEndian, ByteOrder};
use serde::Serialize;

use super::bitmap;
use super::extensions::Extension;
use super::features::IncompatibleFeatures;
use super::header::{Header, Version};
use super::header_cluster::HeaderCluster;
use super::refcount::{self, REFTABLE_OFFSET_MASK, REFTABLE_RESERVED_MASK};
use super::snapshot;
use super::tables::{ClusterKind, EntryFormat, L1Entry, L2Entry, COPIED, L2_RESERVED_MASK, ZERO};
use crate::io::Backend;
use crate::Error;

/// qemu's `QCOW_MAX_L1_SIZE` in entries.
const MAX_L1_ENTRIES: u64 = super::MAX_L1_TABLE_BYTES / 8;
/// Longest snapshot id or name kept for messages.
const MAX_NAME_IN_MESSAGE: usize = 256;
/// Largest in-memory refcount array a repair may grow the file to need (qemu has no limit).
const MAX_GROWN_REFCOUNT_BYTES: u64 = 256 << 20;
/// Largest growth of the file a repair may make beyond doubling it (qemu has no limit).
const MAX_GROWTH: u64 = 1 << 30;
/// Bytes of cached refcount blocks (a cluster each; at least two are kept).
const REFBLOCK_CACHE_BYTES: u64 = 4 << 20;
/// Largest in-memory refcount table a check without repair keeps at once; a larger file is
/// checked in windows of host clusters, walking the metadata once per window.
const MAX_IMRT_BYTES: u64 = 8 << 20;
/// Messages a check keeps for its report; the rest are counted (see [`Messages`]).
const MAX_MESSAGES: usize = 10_000;
/// L1 entries read at a time while walking an L1 table (64 KiB).
const L1_CHUNK_ENTRIES: u64 = 8192;

/// qemu's metadata sections (`QCow2MetadataOverlap`), checked before every repair write as
/// qemu's default `overlap-check=cached` does; a write may ignore the section it updates.
mod overlap {
    pub const MAIN_HEADER: u32 = 1 << 0;
    pub const ACTIVE_L1: u32 = 1 << 1;
    pub const ACTIVE_L2: u32 = 1 << 2;
    pub const REFCOUNT_TABLE: u32 = 1 << 3;
    pub const REFCOUNT_BLOCK: u32 = 1 << 4;
    pub const SNAPSHOT_TABLE: u32 = 1 << 5;
    pub const INACTIVE_L1: u32 = 1 << 6;
    pub const INACTIVE_L2: u32 = 1 << 7;
    pub const BITMAP_DIRECTORY: u32 = 1 << 8;
}

/// What to repair (`qemu-img check -r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Only report (the default).
    #[default]
    None,
    /// Lower refcounts that are too high (`-r leaks`).
    Leaks,
    /// Also raise refcounts that are too low, fix COPIED flags and rebuild broken refcount
    /// structures (`-r all`).
    All,
}

impl Repair {
    fn leaks(self) -> bool {
        self != Repair::None
    }
    fn errors(self) -> bool {
        self == Repair::All
    }
}

/// The outcome of a check, with `qemu-img check --output=json`'s keys.
///
/// Counts that are zero are left out of the JSON, as qemu-img does (`check-errors`, `filename`
/// and `format` are always present). Fields are declared in the order qemu-img 7.2 prints them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckReport {
    /// End of the last cluster that is referenced or has a refcount.
    #[serde(skip_serializing_if = "is_zero")]
    pub image_end_offset: u64,
    /// Compressed clusters in the active L1 table.
    #[serde(skip_serializing_if = "is_zero")]
    pub compressed_clusters: u64,
    /// Guest clusters of the virtual disk.
    #[serde(skip_serializing_if = "is_zero")]
    pub total_clusters: u64,
    /// Corruptions found and not repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    /// Corruptions repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    /// Internal errors (e.g. unreadable refcount blocks).
    pub check_errors: u64,
    /// Leaked clusters found and not repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    /// Leaked clusters repaired.
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    /// Guest clusters allocated in the active L1 table (data, preallocated zero, compressed).
    #[serde(skip_serializing_if = "is_zero")]
    pub allocated_clusters: u64,
    /// The image's file name, as the caller names it (empty unless the caller fills it in).
    pub filename: String,
    /// Always `qcow2`.
    pub format: String,
    /// Allocated clusters not contiguous with the previous one in their L2 table (compressed
    /// clusters always count).
    #[serde(skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    /// What qemu-img prints on stderr while checking, one line each.
    #[serde(skip)]
    pub messages: Vec<String>,
}

fn is_zero(value: &u64) -> bool {
    *value == 0
}

impl CheckReport {
    /// Records one corruption and the message qemu-img would print for it.
    pub fn corrupt(&mut self, message: String) {
        self.corruptions += 1;
        self.messages.push(message);
    }

    /// `qemu-img check`'s exit status for this result: 1 if the check had internal errors,
    /// 2 for corruptions, 3 for leaks only, 0 if clean.
    pub fn exit_code(&self) -> u8 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// True if the check repaired anything.
    pub fn repaired_anything(&self) -> bool {
        self.corruptions_fixed > 0 || self.leaks_fixed > 0
    }
}

/// Checks the qcow2 image on `backend` like `qemu-img check` (one pass, like qemu's
/// `bdrv_check`: after a repair, `qemu-img` checks again without repairing and reports that
/// second result with the first one's fixed counts — callers wanting that do the same).
///
/// An image whose header does not open is an error; so is a check qemu aborts ("Check failed"):
/// an unreadable snapshot table or bitmap directory, or refcount structures that need a rebuild
/// when only leaks may be repaired.
pub fn check<B: Backend + Sync>(backend: &B, repair: Repair) -> Result<CheckReport, Error> {
    let cluster = HeaderCluster::read_from(backend)?;
    let mut checker = Checker::new(backend, &cluster)?;
    checker.run(repair)
}

/// Counters of one check (qemu's `BdrvCheckResult`).
#[derive(Debug, Clone, Copy, Default)]
struct Counts {
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    corruptions_fixed: u64,
    leaks_fixed: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
}

/// One snapshot table entry, as far as the check needs it (decoded by [`snapshot::walk_table`]).
#[derive(Debug, Clone)]
struct Snapshot {
    l1_table_offset: u64,
    l1_size: u32,
    extra_data_size: u64,
    /// (offset, length) of the id and of the name in the file, read only for a message:
    /// 65,536 entries with names of up to 64 KiB each must not all be held.
    id: (u64, u64),
    name: (u64, u64),
}

/// The in-memory refcount table (qemu's "IMRT"): one refcount per host cluster, packed like a
/// refcount block so that slices of it can be written as refcount blocks when rebuilding.
///
/// It may hold only a window `[base, end)` of the clusters (a check without repair of a file
/// whose table would exceed [`MAX_IMRT_BYTES`] runs once per window): refcounts outside it read
/// as 0 and are not kept. Without a window, `base` is 0 and `end` unbounded.
struct Imrt {
    bytes: Vec<u8>,
    /// Logical length: clusters below it are counted (grows for references just past EOF).
    len: u64,
    base: u64,
    end: u64,
    order: u32,
    cluster_size: u64,
}

impl Imrt {
    fn byte_size(&self, entries: u64) -> Option<u64> {
        let bits = entries.checked_mul(1 << self.order)?;
        Some(bits.div_ceil(8).div_ceil(self.cluster_size) * self.cluster_size)
    }

    /// qemu's `realloc_refcount_array`: the logical size becomes `entries`, storage is whole
    /// clusters (for the part inside the window), new entries are zero. Allocation failure is
    /// reported, never an abort.
    fn resize(&mut self, entries: u64) -> Result<(), Error> {
        let stored = entries.min(self.end).saturating_sub(self.base);
        let bytes = self
            .byte_size(stored)
            .and_then(|b| usize::try_from(b).ok())
            .ok_or_else(|| aborted(io::ErrorKind::OutOfMemory, "refcount array too large"))?;
        if bytes > self.bytes.len() {
            self.bytes
                .try_reserve_exact(bytes - self.bytes.len())
                .map_err(|_| aborted(io::ErrorKind::OutOfMemory, "cannot allocate refcounts"))?;
        }
        self.bytes.resize(bytes, 0);
        self.len = entries;
        Ok(())
    }

    /// True if the refcount of `index` is kept (inside the logical length and the window).
    fn holds(&self, index: u64) -> bool {
        index < self.len && index >= self.base && index < self.end
    }

    fn get(&self, index: u64) -> u64 {
        if !self.holds(index) {
            return 0;
        }
        refcount::get(&self.bytes, index - self.base, self.order)
    }

    fn set(&mut self, index: u64, value: u64) {
        if self.holds(index) {
            refcount::set(&mut self.bytes, index - self.base, self.order, value);
        }
    }

    /// Starts counting the window `[base, end)` afresh.
    fn set_window(&mut self, base: u64, end: u64) {
        self.base = base;
        self.end = end;
        self.bytes = Vec::new();
    }
}

/// The messages of one check, in order. qemu prints each one on stderr as it goes; a hostile image
/// makes one per reference (an L1 table whose 8,192 entries share one L2 table whose entries share
/// one cluster: 67 million refcount overflows), so only the first [`MAX_MESSAGES`] are kept and
/// the rest are counted, keeping memory bounded whatever the image.
#[derive(Debug, Default)]
struct Messages {
    kept: Vec<String>,
    dropped: u64,
    /// While a window after the first is counted: only findings about the window's own
    /// clusters are new, everything else was reported by the first window.
    muted: bool,
}

impl Messages {
    fn is_full(&self) -> bool {
        self.kept.len() >= MAX_MESSAGES
    }

    fn push(&mut self, line: String) {
        if !self.muted {
            self.push_window(line);
        }
    }

    /// A finding about one cluster's refcount, new in every window.
    fn push_window(&mut self, line: String) {
        if !self.is_full() {
            self.kept.push(line);
        } else {
            self.dropped += 1;
        }
    }

    /// The kept lines, plus one line counting those that were not kept.
    fn take_lines(&mut self) -> Vec<String> {
        let mut lines = std::mem::take(&mut self.kept);
        let dropped = std::mem::take(&mut self.dropped);
        if dropped > 0 {
            lines.push(format!(
                "... and {dropped} more messages (only the first {MAX_MESSAGES} are kept)"
            ));
        }
        lines
    }
}

struct Checker<'a, B> {
    backend: &'a B,
    header: Header,
    cluster_bits: u32,
    cluster_size: u64,
    extended_l2: bool,
    has_data_file: bool,
    file_len: u64,
    /// The refcount table entries present in the file (the rest of the table reads as zeros).
    reftable: Vec<u64>,
    reftable_offset: u64,
    /// Entries in the refcount table (refcount_table_clusters × cluster_size / 8).
    reftable_entries: u64,
    /// log2 of the refcount entries per refcount block.
    refblock_bits: u32,
    /// The active L1 table (entries past the end of the file are zero), kept only while
    /// repairing: the overlap check of every repair write needs it.
    l1: Vec<u64>,
    snapshots: Vec<Snapshot>,
    snapshots_size: u64,
    crypto_header: Option<(u64, u64)>,
    bitmaps: Option<(u32, u64, u64)>,
    refblock_cache: Vec<(u64, Vec<u8>)>,
    l2_cache: Option<(u64, Vec<u8>)>,
    res: Counts,
    /// Corruptions found about single clusters' refcounts (new in every window).
    window_corruptions: u64,
    messages: Messages,
    imrt: Imrt,
    /// The image was marked corrupt after a refused write (qemu reports that only once).
    signalled_corruption: bool,
}

impl<'a, B: Backend + Sync> Checker<'a, B> {
    fn new(backend: &'a B, cluster: &HeaderCluster) -> Result<Self, Error> {
        let header = cluster.header.clone();
        let cluster_bits = header.cluster_bits;
        let cluster_size = header.cluster_size();
        let file_len = backend.len().map_err(Error::reading("qcow2 file length"))?;
        let crypto_header = cluster.extensions.iter().find_map(|e| match e {
            Extension::CryptoHeader { offset, length } => Some((*offset, *length)),
            _ => None,
        });
        let bitmaps = bitmap::extension(cluster)
            .map(|b| (b.nb_bitmaps, b.directory_offset, b.directory_size));
        let mut checker = Self {
            backend,
            cluster_bits,
            cluster_size,
            extended_l2: header.extended_l2(),
            has_data_file: header
                .incompatible_features
                .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE),
            file_len,
            reftable: Vec::new(),
            reftable_offset: header.refcount_table_offset,
            reftable_entries: u64::from(header.refcount_table_clusters) << (cluster_bits - 3),
            refblock_bits: cluster_bits + 3 - header.refcount_order,
            l1: Vec::new(),
            snapshots: Vec::new(),
            snapshots_size: 0,
            crypto_header,
            bitmaps,
            refblock_cache: Vec::new(),
            l2_cache: None,
            res: Counts::default(),
            window_corruptions: 0,
            messages: Messages::default(),
            signalled_corruption: false,
            imrt: Imrt {
                bytes: Vec::new(),
                len: 0,
                base: 0,
                end: u64::MAX,
                order: header.refcount_order,
                cluster_size,
            },
            header,
        };
        // Both tables are bounded by the header checks (8 MiB, 32 MiB) and, here, by the file.
        checker.reftable = checker.read_u64_table(
            checker.reftable_offset,
            checker.reftable_entries,
            "qcow2 refcount table",
        )?;
        Ok(checker)
    }

    // ---------------------------------------------------------------------------------------
    // Reading and writing the file.

    /// Reads `buf.len()` bytes at `offset`; whatever lies past the end of the file reads as
    /// zeros (qemu's block layer does the same).
    fn read_padded(&self, buf: &mut [u8], offset: u64, what: &'static str) -> Result<(), Error> {
        let available = self.file_len.saturating_sub(offset).min(buf.len() as u64) as usize;
        let (head, tail) = buf.split_at_mut(available);
        if !head.is_empty() {
            self.backend
                .read_exact_at(head, offset)
                .map_err(Error::reading(what))?;
        }
        tail.fill(0);
        Ok(())
    }

    /// Reads a table of big-endian u64 entries, keeping only the entries that start inside the
    /// file (the rest are zero and need no memory).
    fn read_u64_table(
        &self,
        offset: u64,
        entries: u64,
        what: &'static str,
    ) -> Result<Vec<u64>, Error> {
        let in_file = self
            .file_len
            .saturating_sub(offset)
            .div_ceil(8)
            .min(entries);
        let mut table = Vec::new();
        table
            .try_reserve_exact(in_file as usize)
            .map_err(|_| aborted(io::ErrorKind::OutOfMemory, "cannot allocate a table"))?;
        // Through a small buffer, so that only the decoded table is held.
        let mut raw = [0u8; 8192];
        let mut done = 0u64;
        while done < in_file {
            let n = (in_file - done).min(raw.len() as u64 / 8) as usize;
            self.read_padded(&mut raw[..n * 8], offset + done * 8, what)?;
            table.extend(raw[..n * 8].chunks_exact(8).map(BigEndian::read_u64));
            done += n as u64;
        }
        Ok(table)
    }

    fn write(&mut self, buf: &[u8], offset: u64, what: &'static str) -> Result<(), Error> {
        self.l2_cache = None;
        self.backend
            .write_all_at(buf, offset)
            .map_err(Error::writing(what))?;
        let end = offset.saturating_add(buf.len() as u64);
        self.file_len = self.file_len.max(end);
        Ok(())
    }

    /// qemu's `qcow2_check_metadata_overlap` in its default (`cached`) mode: the metadata
    /// section the clusters of `[offset, offset + size)` would overwrite, if any.
    fn overlap(&self, offset: u64, size: u64, ignore: u32) -> Option<&'static str> {
        let cs = self.cluster_size;
        let start = offset / cs * cs;
        let end = offset.saturating_add(size.max(1) - 1).saturating_add(cs) / cs * cs;
        let hits = |at: u64, len: u64| len != 0 && at < end && start < at.saturating_add(len);
        let check = |section: u32| ignore & section == 0;
        if check(overlap::MAIN_HEADER) && hits(0, cs) {
            return Some("qcow2_header");
        }
        if check(overlap::ACTIVE_L1)
            && hits(
                self.header.l1_table_offset,
                u64::from(self.header.l1_size) * 8,
            )
        {
            return Some("active L1 table");
        }
        if check(overlap::REFCOUNT_TABLE) && hits(self.reftable_offset, self.reftable_entries * 8) {
            return Some("refcount table");
        }
        if check(overlap::SNAPSHOT_TABLE) && hits(self.header.snapshots_offset, self.snapshots_size)
        {
            return Some("snapshot table");
        }
        if check(overlap::INACTIVE_L1)
            && self
                .snapshots
                .iter()
                .any(|sn| hits(sn.l1_table_offset, u64::from(sn.l1_size) * 8))
        {
            return Some("inactive L1 table");
        }
        if check(overlap::ACTIVE_L2)
            && self
                .l1
                .iter()
                .any(|e| L1Entry(*e).l2_offset().is_some_and(|l2| hits(l2, cs)))
        {
            return Some("active L2 table");
        }
        if check(overlap::REFCOUNT_BLOCK)
            && self.reftable.iter().any(|e| {
                let block = e & REFTABLE_OFFSET_MASK;
                block != 0 && hits(block, cs)
            })
        {
            return Some("refcount block");
        }
        if check(overlap::BITMAP_DIRECTORY) {
            if let Some((_, dir_offset, dir_size)) = self.bitmaps {
                if hits(dir_offset, dir_size) {
                    return Some("bitmap directory");
                }
            }
        }
        None
    }

    /// A repair write, refused (and the image marked corrupt, as qemu does) when it would
    /// overwrite metadata other than `ignore`.
    fn write_checked(
        &mut self,
        buf: &[u8],
        offset: u64,
        ignore: u32,
        what: &'static str,
    ) -> Result<(), Error> {
        if let Some(section) = self.overlap(offset, buf.len() as u64, ignore) {
            let reason = format!("Preventing invalid write on metadata (overlaps with {section})");
            if !self.signalled_corruption {
                self.signalled_corruption = true;
                self.messages.push(format!(
                    "qcow2: Marking image as corrupt: {reason}; further corruption events will \
                     be suppressed"
                ));
                if self.header.version == Version::V3 {
                    let bits = self.header.incompatible_features | IncompatibleFeatures::CORRUPT;
                    self.write(
                        &bits.bits().to_be_bytes(),
                        72,
                        "qcow2 header (feature bits)",
                    )?;
                    self.header.incompatible_features = bits;
                }
            }
            return Err(aborted(
                io::ErrorKind::InvalidData,
                format!("writing {what}: {reason}"),
            ));
        }
        self.write(buf, offset, what)
    }

    /// One cluster at `offset` (an L2 table), cached while the same table is read again.
    fn read_cluster(&mut self, offset: u64) -> Result<Vec<u8>, Error> {
        if let Some((cached, table)) = &self.l2_cache {
            if *cached == offset {
                return Ok(table.clone());
            }
        }
        let mut table = vec![0u8; self.cluster_size as usize];
        self.read_padded(&mut table, offset, "qcow2 L2 table")?;
        self.l2_cache = Some((offset, table.clone()));
        Ok(table)
    }

    /// Reads a short string (snapshot id or name) for messages.
    fn read_text(&self, offset: u64, len: u64) -> String {
        let len = len.min(MAX_NAME_IN_MESSAGE as u64) as usize;
        let mut buf = vec![0u8; len];
        if self
            .read_padded(&mut buf, offset, "qcow2 snapshot table")
            .is_err()
        {
            return String::new();
        }
        String::from_utf8_lossy(&buf).into_owned()
    }

    // ---------------------------------------------------------------------------------------
    // On-disk refcounts.

    /// The refcount block at `offset`, from the cache or the file.
    fn refblock(&mut self, offset: u64) -> Result<usize, Error> {
        if let Some(i) = self.refblock_cache.iter().position(|(o, _)| *o == offset) {
            return Ok(i);
        }
        let mut block = vec![0u8; self.cluster_size as usize];
        self.read_padded(&mut block, offset, "qcow2 refcount block")?;
        let entries = (REFBLOCK_CACHE_BYTES / self.cluster_size).clamp(2, 8) as usize;
        if self.refblock_cache.len() >= entries {
            self.refblock_cache.remove(0);
        }
        self.refblock_cache.push((offset, block));
        Ok(self.refblock_cache.len() - 1)
    }

    /// Where the refcount of `cluster` lives: `None` if its refcount block is not allocated
    /// (refcount 0), an error if the refcount table entry is unaligned (qemu: -EIO).
    fn refcount_location(&self, cluster: u64) -> Result<Option<(u64, u64)>, Error> {
        let table_index = cluster >> self.refblock_bits;
        if table_index >= self.reftable_entries {
            return Ok(None);
        }
        let entry = self
            .reftable
            .get(table_index as usize)
            .copied()
            .unwrap_or(0);
        let block_offset = entry & REFTABLE_OFFSET_MASK;
        if block_offset == 0 {
            return Ok(None);
        }
        if block_offset % self.cluster_size != 0 {
            return Err(aborted(
                io::ErrorKind::InvalidData,
                format!(
                    "refcount block offset {block_offset:#x} unaligned (reftable index {table_index:#x})"
                ),
            ));
        }
        let index = cluster & ((1 << self.refblock_bits) - 1);
        Ok(Some((block_offset, index)))
    }

    /// qemu's `qcow2_get_refcount`.
    fn disk_refcount(&mut self, cluster: u64) -> Result<u64, Error> {
        let Some((block_offset, index)) = self.refcount_location(cluster)? else {
            return Ok(0);
        };
        let slot = self.refblock(block_offset)?;
        Ok(refcount::get(
            &self.refblock_cache[slot].1,
            index,
            self.header.refcount_order,
        ))
    }

    /// Writes `value` as the on-disk refcount of `cluster` (its refcount block must exist).
    fn set_disk_refcount(&mut self, cluster: u64, value: u64) -> Result<(), Error> {
        let order = self.header.refcount_order;
        if value > refcount::max_refcount(order) {
            return Err(aborted(io::ErrorKind::InvalidInput, "refcount overflow"));
        }
        let Some((block_offset, index)) = self.refcount_location(cluster)? else {
            return Err(aborted(
                io::ErrorKind::InvalidData,
                format!("cluster {cluster} has no refcount block"),
            ));
        };
        let slot = self.refblock(block_offset)?;
        let block = &mut self.refblock_cache[slot].1;
        refcount::set(block, index, order, value);
        let bits = 1u64 << order;
        let start = ((index * bits) / 8) as usize;
        let width = (bits / 8).max(1) as usize;
        let bytes = block[start..start + width].to_vec();
        self.write_checked(
            &bytes,
            block_offset + start as u64,
            overlap::REFCOUNT_BLOCK,
            "qcow2 refcount block",
        )
    }

    // ---------------------------------------------------------------------------------------
    // Expected refcounts (qemu's calculate_refcounts and helpers).

    /// qemu's `qcow2_inc_refcounts_imrt`: +1 for every cluster `[offset, offset + size)`
    /// touches. `offset` is taken as qemu's signed 64-bit value.
    fn inc_refcounts(&mut self, offset: u64, size: u64) -> Result<(), Error> {
        if size == 0 {
            return Ok(());
        }
        let signed = i128::from(offset as i64);
        if signed + i128::from(size) - i128::from(self.file_len) >= i128::from(self.cluster_size) {
            self.messages.push(format!(
                "ERROR: counting reference for region exceeding the end of the file by one \
                 cluster or more: offset {offset:#x} size {size:#x}"
            ));
            self.res.corruptions += 1;
            return Ok(());
        }
        let first = offset >> self.cluster_bits;
        let last = offset.wrapping_add(size - 1) >> self.cluster_bits;
        // Legitimate references end less than a cluster past the end of the file; only a
        // "negative" (≥ 2^63) offset gets here with a huge index, where qemu fails to allocate.
        let limit = self.file_len.div_ceil(self.cluster_size) + 1;
        let max_refcount = refcount::max_refcount(self.header.refcount_order);
        for k in first..=last {
            if k >= self.imrt.len {
                if k >= limit.max(self.imrt.len) {
                    self.res.check_errors += 1;
                    return Err(aborted(
                        io::ErrorKind::OutOfMemory,
                        format!("cannot count references to cluster {k}"),
                    ));
                }
                self.imrt.resize(k + 1).inspect_err(|_| {
                    self.res.check_errors += 1;
                })?;
            }
            if !self.imrt.holds(k) {
                continue; // counted in its own window
            }
            let count = self.imrt.get(k);
            if count == max_refcount {
                self.res.corruptions += 1;
                self.window_corruptions += 1;
                if self.messages.is_full() {
                    // Millions of these are possible: do not even format them.
                    self.messages.dropped += 2;
                    continue;
                }
                self.messages.push_window(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.cluster_bits
                ));
                self.messages.push_window(
                    "Use qemu-img amend to increase the refcount entry width or qemu-img convert \
                     to create a clean copy if the image cannot be opened for writing"
                        .to_owned(),
                );
                continue;
            }
            self.imrt.set(k, count + 1);
        }
        Ok(())
    }

    /// Entry `index` of an L2 table and its kind, decoded by [`L2Entry`].
    fn l2_entry_at(&self, table: &[u8], index: usize) -> (L2Entry, ClusterKind) {
        let format = EntryFormat {
            cluster_bits: self.cluster_bits,
            extended: self.extended_l2,
            data_file: self.has_data_file,
        };
        let entry = L2Entry::from_table(table, index, format);
        let kind = entry.cluster_kind(format);
        (entry, kind)
    }

    fn l2_entry_size(&self) -> usize {
        if self.extended_l2 {
            16
        } else {
            8
        }
    }

    /// qemu's `check_refcounts_l2`. `frag` (frag info) is set for the active table only, so it
    /// also tells active from snapshot tables.
    fn check_l2(&mut self, l2_offset: u64, frag: bool, repair: Repair) -> Result<(), Error> {
        let mut table = self.read_cluster(l2_offset)?;
        let entries = self.cluster_size as usize / self.l2_entry_size();
        let mut next_contiguous = 0u64;
        for i in 0..entries {
            let (decoded, kind) = self.l2_entry_at(&table, i);
            let (mut entry, bitmap) = (decoded.entry, decoded.bitmap);
            let compressed = matches!(kind, ClusterKind::Compressed { .. });
            if !compressed && entry & L2_RESERVED_MASK != 0 {
                self.messages.push(format!(
                    "ERROR found l2 entry with reserved bits set: {entry:x}"
                ));
                self.res.corruptions += 1;
            }
            match kind {
                ClusterKind::Compressed {
                    host: coffset,
                    len: csize,
                } => {
                    if entry & COPIED != 0 {
                        self.messages.push(format!(
                            "ERROR: coffset={coffset:#x}: copied flag must never be set for \
                             compressed clusters"
                        ));
                        entry &= !COPIED;
                        self.res.corruptions += 1;
                    }
                    if self.has_data_file {
                        self.messages.push(format!(
                            "ERROR compressed cluster {i} with data file, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    if bitmap != 0 {
                        self.messages.push(format!(
                            "ERROR compressed cluster {i} with non-zero subcluster allocation \
                             bitmap, entry={entry:#x}"
                        ));
                        self.res.corruptions += 1;
                        continue;
                    }
                    self.inc_refcounts(coffset, csize)?;
                    if frag {
                        self.res.allocated_clusters += 1;
                        self.res.compressed_clusters += 1;
                        self.res.fragmented_clusters += 1;
                    }
                }
                ClusterKind::ZeroAllocated { host: offset }
                | ClusterKind::Normal { host: offset } => {
                    if (bitmap >> 32) & bitmap != 0 {
                        self.res.corruptions += 1;
                        self.messages.push(format!(
                            "ERROR offset={offset:x}: Allocated cluster has corrupted \
                             subcluster allocation bitmap"
                        ));
                    }
                    if offset % self.cluster_size != 0 {
                        self.res.corruptions += 1;
                        let contains_data = if self.extended_l2 {
                            bitmap & 0xffff_ffff != 0
                        } else {
                            entry & ZERO == 0
                        };
                        if !contains_data {
                            let verb = if repair.errors() {
                                "Repairing"
                            } else {
                                "ERROR"
                            };
                            self.messages.push(format!(
                                "{verb} offset={offset:x}: Preallocated cluster is not properly \
                                 aligned; L2 entry corrupted."
                            ));
                            if repair.errors() {
                                self.zero_l2_entry(l2_offset, &mut table, i, bitmap, frag)?;
                                continue;
                            }
                        } else {
                            self.messages.push(format!(
                                "ERROR offset={offset:x}: Data cluster is not properly aligned; \
                                 L2 entry corrupted."
                            ));
                        }
                    }
                    if frag {
                        self.res.allocated_clusters += 1;
                        if next_contiguous != 0 && offset != next_contiguous {
                            self.res.fragmented_clusters += 1;
                        }
                        next_contiguous = offset.wrapping_add(self.cluster_size);
                    }
                    if !self.has_data_file {
                        self.inc_refcounts(offset, self.cluster_size)?;
                    }
                }
                ClusterKind::ZeroPlain => {}
                ClusterKind::Unallocated => {
                    if bitmap & 0xffff_ffff != 0 {
                        self.res.corruptions += 1;
                        self.messages.push(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .to_owned(),
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// qemu's `fix_l2_entry_by_zero`: a preallocated zero cluster with an unaligned offset
    /// becomes a plain zero cluster (all its subclusters zero with extended L2).
    fn zero_l2_entry(
        &mut self,
        l2_offset: u64,
        table: &mut [u8],
        index: usize,
        bitmap: u64,
        active: bool,
    ) -> Result<(), Error> {
        let size = self.l2_entry_size();
        let at = index * size;
        if self.extended_l2 {
            let zeroed = (bitmap | (bitmap << 32)) & 0xffff_ffff_0000_0000;
            BigEndian::write_u64(&mut table[at..], 0);
            BigEndian::write_u64(&mut table[at + 8..], zeroed);
        } else {
            BigEndian::write_u64(&mut table[at..], ZERO);
        }
        let bytes = table[at..at + size].to_vec();
        let ignore = if active {
            overlap::ACTIVE_L2
        } else {
            overlap::INACTIVE_L2
        };
        match self.write_checked(&bytes, l2_offset + at as u64, ignore, "qcow2 L2 entry") {
            Ok(()) => {
                self.res.corruptions = self.res.corruptions.saturating_sub(1);
                self.res.corruptions_fixed += 1;
                Ok(())
            }
            Err(e) => {
                self.messages
                    .push("ERROR: Failed to overwrite L2 table entry".to_owned());
                self.res.check_errors += 1;
                Err(e)
            }
        }
    }

    /// qemu's `check_refcounts_l1`.
    fn check_l1(
        &mut self,
        l1_offset: u64,
        l1_size: u64,
        frag: bool,
        repair: Repair,
    ) -> Result<(), Error> {
        if l1_size == 0 {
            return Ok(());
        }
        self.inc_refcounts(l1_offset, l1_size * 8)?;
        // In chunks: an L1 table may be 32 MiB, and a snapshot's is read besides the active one.
        let mut first = 0u64;
        while first < l1_size {
            let count = L1_CHUNK_ENTRIES.min(l1_size - first);
            let chunk = self.read_u64_table(l1_offset + first * 8, count, "qcow2 L1 table")?;
            for entry in chunk {
                self.check_l1_entry(L1Entry(entry), frag, repair)?;
            }
            first += count;
        }
        Ok(())
    }

    /// One L1 entry of [`Self::check_l1`].
    fn check_l1_entry(&mut self, entry: L1Entry, frag: bool, repair: Repair) -> Result<(), Error> {
        if entry.0 == 0 {
            return Ok(());
        }
        if entry.reserved_bits() != 0 {
            self.messages.push(format!(
                "ERROR found L1 entry with reserved bits set: {:x}",
                entry.0
            ));
            self.res.corruptions += 1;
        }
        // Like qemu, an entry with only flag bits counts a reference to cluster 0.
        let l2_offset = entry.l2_offset().unwrap_or(0);
        self.inc_refcounts(l2_offset, self.cluster_size)?;
        if l2_offset % self.cluster_size != 0 {
            self.messages.push(format!(
                "ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry \
                 corrupted"
            ));
            self.res.corruptions += 1;
        }
        self.check_l2(l2_offset, frag, repair)
    }

    /// qemu's `check_refblocks`: every refcount block is referenced once.
    fn check_refblocks(&mut self, repair: Repair, rebuild: &mut bool) -> Result<(), Error> {
        for i in 0..self.reftable.len() {
            let entry = self.reftable[i];
            let offset = entry & REFTABLE_OFFSET_MASK;
            let cluster = offset >> self.cluster_bits;
            if entry & REFTABLE_RESERVED_MASK != 0 {
                self.messages.push(format!(
                    "ERROR refcount table entry {i} has reserved bits set"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if offset % self.cluster_size != 0 {
                self.messages.push(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                self.res.corruptions += 1;
                *rebuild = true;
                continue;
            }
            if cluster >= self.imrt.len {
                self.res.corruptions += 1;
                let verb = if repair.errors() {
                    "Repairing"
                } else {
                    "ERROR"
                };
                self.messages
                    .push(format!("{verb} refcount block {i} is outside image"));
                if repair.errors() {
                    match self.grow_for_refblock(offset) {
                        Ok(true) => {
                            self.res.corruptions -= 1;
                            self.res.corruptions_fixed += 1;
                            self.inc_refcounts(offset, self.cluster_size)?;
                            continue;
                        }
                        Ok(false) => {}
                        Err(e) => {
                            self.res.check_errors += 1;
                            return Err(e);
                        }
                    }
                    *rebuild = true;
                    self.messages.push(
                        "ERROR could not resize image: refcount block too far outside the image"
                            .to_owned(),
                    );
                }
                continue;
            }
            if offset != 0 {
                self.inc_refcounts(offset, self.cluster_size)?;
                let count = self.imrt.get(cluster);
                if count != 1 && self.imrt.holds(cluster) {
                    self.messages
                        .push_window(format!("ERROR refcount block {i} refcount={count}"));
                    self.res.corruptions += 1;
                    self.window_corruptions += 1;
                    *rebuild = true;
                }
            }
        }
        Ok(())
    }

    /// What qemu does for a refcount block past the end of the file under `-r all`: grow the
    /// file (sparsely) to hold it. Refused (`false`, qemu's path for a failed resize) when the
    /// file would more than double and grow by more than [`MAX_GROWTH`], or the in-memory
    /// refcounts for it would exceed [`MAX_GROWN_REFCOUNT_BYTES`].
    fn grow_for_refblock(&mut self, offset: u64) -> Result<bool, Error> {
        let Some(new_len) = offset
            .checked_add(self.cluster_size)
            .filter(|&len| len <= i64::MAX as u64)
        else {
            return Ok(false);
        };
        // Never let a hostile refcount table entry make a huge (if sparse) file.
        if new_len
            > self
                .file_len
                .saturating_mul(2)
                .max(self.file_len + MAX_GROWTH)
        {
            return Ok(false);
        }
        let clusters = new_len.div_ceil(self.cluster_size);
        match self.imrt.byte_size(clusters) {
            Some(bytes) if bytes <= MAX_GROWN_REFCOUNT_BYTES => {}
            _ => return Ok(false),
        }
        if self.backend.set_len(new_len).is_err() {
            return Ok(false);
        }
        self.file_len = self
            .backend
            .len()
            .map_err(Error::reading("qcow2 file length"))?;
        let clusters = self.file_len.div_ceil(self.cluster_size);
        if clusters > self.imrt.len {
            self.imrt.resize(clusters)?;
        }
        Ok(offset >> self.cluster_bits < self.imrt.len)
    }

    /// qemu's `qcow2_check_bitmaps_refcounts`: the bitmap directory, bitmap tables and bitmap
    /// data clusters. A directory or table qemu cannot load aborts the check, as in qemu.
    fn check_bitmaps(&mut self) -> Result<(), Error> {
        let Some((nb_bitmaps, dir_offset, dir_size)) = self.bitmaps else {
            return Ok(());
        };
        if nb_bitmaps == 0 {
            return Ok(());
        }
        self.inc_refcounts(dir_offset, dir_size)?;
        let tables = match self.load_bitmap_directory(nb_bitmaps, dir_offset, dir_size)? {
            Some(tables) => tables,
            None => {
                self.res.corruptions += 1;
                return Err(aborted(
                    io::ErrorKind::InvalidData,
                    "bitmap directory is broken",
                ));
            }
        };
        for (table_offset, table_size) in tables {
            self.inc_refcounts(table_offset, table_size * 8)?;
            // Entries past the end of the file are zero: valid and unallocated.
            let table = self.read_u64_table(table_offset, table_size, "qcow2 bitmap table")?;
            if !table
                .iter()
                .all(|&e| bitmap::table_entry_valid(e, self.cluster_size))
            {
                self.res.corruptions += 1;
                return Err(aborted(
                    io::ErrorKind::InvalidData,
                    "bitmap table has invalid entries",
                ));
            }
            for entry in table {
                let offset = entry & bitmap::TABLE_OFFSET_MASK;
                if offset != 0 {
                    self.inc_refcounts(offset, self.cluster_size)?;
                }
            }
        }
        Ok(())
    }

    /// qemu's `bitmap_list_load` (through the one directory codec, [`bitmap::parse_directory`]):
    /// the (offset, entries) of every bitmap table, or `None` if the directory does not satisfy
    /// qemu's constraints.
    fn load_bitmap_directory(
        &self,
        nb_bitmaps: u32,
        offset: u64,
        size: u64,
    ) -> Result<Option<Vec<(u64, u64)>>, Error> {
        if size == 0 || size > super::extensions::MAX_BITMAP_DIRECTORY_SIZE {
            return Ok(None);
        }
        // Bytes past the end of the file read as zeros: keep only what the file holds.
        let in_file = self.file_len.saturating_sub(offset).min(size) as usize;
        let mut dir = vec![0u8; in_file];
        self.read_padded(&mut dir, offset, "qcow2 bitmap directory")?;
        Ok(
            bitmap::parse_directory(&dir, size, nb_bitmaps, self.cluster_size, self.header.size)
                .ok()
                .map(|entries| {
                    entries
                        .iter()
                        .map(|e| (e.table_offset, u64::from(e.table_size)))
                        .collect()
                }),
        )
    }

    /// qemu's `calculate_refcounts`.
    fn calculate_refcounts(&mut self, repair: Repair, rebuild: &mut bool) -> Result<(), Error> {
        self.inc_refcounts(0, self.cluster_size)?;
        self.check_l1(
            self.header.l1_table_offset,
            u64::from(self.header.l1_size),
            true,
            repair,
        )?;
        if self.has_data_file && !self.snapshots.is_empty() {
            self.messages.push(format!(
                "ERROR {} snapshots in image with data file",
                self.snapshots.len()
            ));
            self.res.corruptions += 1;
        }
        for i in 0..self.snapshots.len() {
            let sn = self.snapshots[i].clone();
            let label = |c: &Self| {
                (
                    c.read_text(sn.id.0, sn.id.1),
                    c.read_text(sn.name.0, sn.name.1),
                )
            };
            if sn.l1_table_offset % self.cluster_size != 0 {
                let (id, name) = label(self);
                self.messages.push(format!(
                    "ERROR snapshot {id} ({name}) l1_offset={:#x}: L1 table is not cluster \
                     aligned; snapshot table entry corrupted",
                    sn.l1_table_offset
                ));
                self.res.corruptions += 1;
                continue;
            }
            if u64::from(sn.l1_size) > MAX_L1_ENTRIES {
                let (id, name) = label(self);
                self.messages.push(format!(
                    "ERROR snapshot {id} ({name}) l1_size={:#x}: L1 table is too large; \
                     snapshot table entry corrupted",
                    sn.l1_size
                ));
                self.res.corruptions += 1;
                continue;
            }
            self.check_l1(sn.l1_table_offset, u64::from(sn.l1_size), false, repair)?;
        }
        self.inc_refcounts(self.header.snapshots_offset, self.snapshots_size)?;
        self.inc_refcounts(self.reftable_offset, self.reftable_entries * 8)?;
        if let Some((offset, length)) = self.crypto_header {
            self.inc_refcounts(offset, length)?;
        }
        self.check_bitmaps()?;
        self.check_refblocks(repair, rebuild)
    }

    /// qemu's `compare_refcounts`; returns the highest cluster in use.
    fn compare_refcounts(&mut self, repair: Repair, rebuild: &mut bool) -> Result<u64, Error> {
        let mut highest = 0;
        for i in self.imrt.base..self.imrt.len.min(self.imrt.end) {
            let on_disk = match self.disk_refcount(i) {
                Ok(count) => count,
                Err(e) => {
                    self.messages.push(format!(
                        "Can't get refcount for cluster {i}: {}",
                        std::error::Error::source(&e).map_or(e.to_string(), |s| s.to_string())
                    ));
                    self.res.check_errors += 1;
                    continue;
                }
            };
            let expected = self.imrt.get(i);
            if on_disk > 0 || expected > 0 {
                highest = i;
            }
            if on_disk == expected {
                continue;
            }
            let fixable = if on_disk == 0 {
                *rebuild = true;
                false
            } else if on_disk > expected {
                repair.leaks()
            } else {
                repair.errors()
            };
            let verb = if fixable {
                "Repairing"
            } else if on_disk < expected {
                "ERROR"
            } else {
                "Leaked"
            };
            self.messages.push(format!(
                "{verb} cluster {i} refcount={on_disk} reference={expected}"
            ));
            if fixable && self.set_disk_refcount(i, expected).is_ok() {
                if on_disk > expected {
                    self.res.leaks_fixed += 1;
                } else {
                    self.res.corruptions_fixed += 1;
                }
                continue;
            }
            if on_disk < expected {
                self.res.corruptions += 1;
            } else {
                self.res.leaks += 1;
            }
        }
        Ok(highest)
    }

    /// qemu's `check_oflag_copied`.
    fn check_oflag_copied(&mut self, repair: Repair) -> Result<(), Error> {
        let fix = match repair {
            Repair::All => true,
            Repair::Leaks => {
                self.res.check_errors == 0 && self.res.corruptions == 0 && self.res.leaks == 0
            }
            Repair::None => false,
        };
        let verb = if fix { "Repairing" } else { "ERROR" };
        // In chunks, from the file (the same entries as at open: only this pass writes them).
        let l1_size = u64::from(self.header.l1_size);
        let mut first = 0u64;
        while first < l1_size {
            let count = L1_CHUNK_ENTRIES.min(l1_size - first);
            let at = self.header.l1_table_offset + first * 8;
            let chunk = self.read_u64_table(at, count, "qcow2 L1 table")?;
            for (j, l1_entry) in chunk.into_iter().enumerate() {
                self.check_oflag_copied_l1(first as usize + j, l1_entry, fix, verb)?;
            }
            first += count;
        }
        Ok(())
    }

    /// One L1 entry of [`Self::check_oflag_copied`]: its own flag, then its L2 table's.
    fn check_oflag_copied_l1(
        &mut self,
        i: usize,
        l1_entry: u64,
        fix: bool,
        verb: &str,
    ) -> Result<(), Error> {
        let Some(l2_offset) = L1Entry(l1_entry).l2_offset() else {
            return Ok(());
        };
        let Ok(count) = self.disk_refcount(l2_offset >> self.cluster_bits) else {
            return Ok(());
        };
        if (count == 1) != (l1_entry & COPIED != 0) {
            self.res.corruptions += 1;
            self.messages.push(format!(
                "{verb} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1_entry:x} \
                 refcount={count}"
            ));
            if fix {
                let fixed = if count == 1 {
                    l1_entry | COPIED
                } else {
                    l1_entry & !COPIED
                };
                if let Some(kept) = self.l1.get_mut(i) {
                    *kept = fixed;
                }
                let at = self.header.l1_table_offset + i as u64 * 8;
                if let Err(e) = self.write_checked(
                    &fixed.to_be_bytes(),
                    at,
                    overlap::ACTIVE_L1,
                    "qcow2 L1 entry",
                ) {
                    self.res.check_errors += 1;
                    return Err(e);
                }
                self.res.corruptions = self.res.corruptions.saturating_sub(1);
                self.res.corruptions_fixed += 1;
            }
        }
        let mut table = self.read_cluster(l2_offset)?;
        let entries = self.cluster_size as usize / self.l2_entry_size();
        let mut dirty = 0u64;
        for j in 0..entries {
            let (decoded, kind) = self.l2_entry_at(&table, j);
            let entry = decoded.entry;
            let (ClusterKind::Normal { host } | ClusterKind::ZeroAllocated { host }) = kind else {
                continue;
            };
            let count = if self.has_data_file {
                1
            } else {
                match self.disk_refcount(host >> self.cluster_bits) {
                    Ok(count) => count,
                    Err(_) => continue,
                }
            };
            if (count == 1) != (entry & COPIED != 0) {
                self.res.corruptions += 1;
                self.messages.push(format!(
                    "{verb} OFLAG_COPIED data cluster: l2_entry={entry:x} refcount={count}"
                ));
                if fix {
                    let fixed = if count == 1 {
                        entry | COPIED
                    } else {
                        entry & !COPIED
                    };
                    let at = j * self.l2_entry_size();
                    BigEndian::write_u64(&mut table[at..], fixed);
                    dirty += 1;
                }
            }
        }
        if dirty > 0 {
            if let Err(e) =
                self.write_checked(&table, l2_offset, overlap::ACTIVE_L2, "qcow2 L2 table")
            {
                self.messages
                    .push("ERROR: Could not write L2 table".to_owned());
                self.res.check_errors += 1;
                return Err(e);
            }
            self.res.corruptions = self.res.corruptions.saturating_sub(dirty);
            self.res.corruptions_fixed += dirty;
        }
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Rebuilding the refcount structure (qemu's rebuild_refcount_structure).

    /// qemu's `alloc_clusters_imrt`: `count` free clusters from `*first_free` on, marked used;
    /// the in-memory table grows when the free space at its end is too short.
    fn alloc_clusters_imrt(&mut self, count: u64, first_free: &mut u64) -> Result<u64, Error> {
        let mut cluster = *first_free;
        let mut contiguous = 0u64;
        let mut first_gap = true;
        while cluster < self.imrt.len && contiguous < count {
            if self.imrt.get(cluster) == 0 {
                contiguous += 1;
                if first_gap {
                    *first_free = cluster;
                    first_gap = false;
                }
            } else {
                contiguous = 0;
            }
            cluster += 1;
        }
        if contiguous < count {
            self.imrt.resize(cluster + count - contiguous)?;
        }
        cluster -= contiguous;
        for i in 0..count {
            self.imrt.set(cluster + i, 1);
        }
        Ok(cluster << self.cluster_bits)
    }

    /// qemu's `rebuild_refcounts_write_refblocks`: writes a refcount block for every block of
    /// clusters in `[first, end)` that has a non-zero refcount; returns whether `table` grew.
    fn write_refblocks(
        &mut self,
        first: u64,
        end: u64,
        table: &mut Vec<u64>,
    ) -> Result<bool, Error> {
        let block_entries = 1u64 << self.refblock_bits;
        let mut first_free = 0u64;
        let mut grown = false;
        let mut end = end;
        let mut cluster = first;
        while cluster < end {
            if self.imrt.get(cluster) == 0 {
                cluster += 1;
                continue;
            }
            let index = cluster >> self.refblock_bits;
            let start = index << self.refblock_bits;
            let existing = table.get(index as usize).copied().unwrap_or(0);
            let block_offset = if existing != 0 {
                existing
            } else {
                first_free = first_free.max(start);
                let offset = self.alloc_clusters_imrt(1, &mut first_free)?;
                let block_cluster = offset >> self.cluster_bits;
                if block_cluster >= end {
                    end = block_cluster + 1;
                }
                if table.len() as u64 <= index {
                    let entries = ((index + 1) * 8).next_multiple_of(self.cluster_size) / 8;
                    if entries * 8 > super::MAX_REFCOUNT_TABLE_BYTES {
                        return Err(aborted(
                            io::ErrorKind::OutOfMemory,
                            "rebuilt refcount table would be too large",
                        ));
                    }
                    table.resize(entries as usize, 0);
                    grown = true;
                }
                table[index as usize] = offset;
                offset
            };
            let from = (index * self.cluster_size) as usize;
            let to = from + self.cluster_size as usize;
            let block = self.imrt.bytes[from..to].to_vec();
            self.write_checked(&block, block_offset, 0, "qcow2 refcount block")?;
            cluster = start + block_entries;
        }
        Ok(grown)
    }

    fn rebuild_refcount_structure(&mut self) -> Result<(), Error> {
        self.refblock_cache.clear();
        let mut table: Vec<u64> = Vec::new();
        self.write_refblocks(0, self.imrt.len, &mut table)?;
        let (offset, clusters) = loop {
            let clusters = (table.len() as u64 * 8).div_ceil(self.cluster_size);
            let mut first_free = 0;
            let offset = self.alloc_clusters_imrt(clusters, &mut first_free)?;
            let start = offset >> self.cluster_bits;
            if !self.write_refblocks(start, start + clusters, &mut table)? {
                break (offset, clusters);
            }
        };
        let mut bytes = vec![0u8; table.len() * 8];
        for (chunk, entry) in bytes.chunks_exact_mut(8).zip(&table) {
            BigEndian::write_u64(chunk, *entry);
        }
        self.write_checked(&bytes, offset, 0, "qcow2 refcount table")?;
        let mut pointer = [0u8; 12];
        BigEndian::write_u64(&mut pointer[..8], offset);
        BigEndian::write_u32(&mut pointer[8..], clusters as u32);
        self.backend
            .sync_all()
            .map_err(Error::writing("qcow2 refcount structure"))?;
        self.write(&pointer, 48, "qcow2 header (refcount table pointer)")?;
        self.backend
            .sync_all()
            .map_err(Error::writing("qcow2 header"))?;
        self.header.refcount_table_offset = offset;
        self.header.refcount_table_clusters = clusters as u32;
        self.reftable_offset = offset;
        self.reftable_entries = table.len() as u64;
        self.reftable = table;
        self.refblock_cache.clear();
        Ok(())
    }

    // ---------------------------------------------------------------------------------------
    // Snapshot table (qemu's qcow2_check_read_snapshot_table).

    fn read_snapshot_table(
        &mut self,
        snapshot_res: &mut Counts,
        repair: Repair,
    ) -> Result<(), Error> {
        let (offset, declared) = (self.header.snapshots_offset, self.header.nb_snapshots);
        let mut count = declared;
        // More entries than qemu allows: -r all drops the overhanging ones first; without it,
        // the pointer check below fails ("snapshot table too large").
        let mut reduced = 0;
        if count > super::MAX_SNAPSHOTS && repair.errors() {
            reduced = count - super::MAX_SNAPSHOTS;
            self.messages
                .push(format!("Discarding {reduced} overhanging snapshots"));
            count = super::MAX_SNAPSHOTS;
        }
        if let Err(e) = snapshot::validate_pointer(offset, count, self.cluster_size) {
            snapshot_res.check_errors += 1;
            return Err(e.into());
        }
        let mut snapshots = Vec::new();
        let mut repairs = snapshot::TableRepairs::default();
        let read = |buf: &mut [u8], at| self.read_padded(buf, at, "qcow2 snapshot table");
        let visit = |layout: &snapshot::EntryLayout| {
            snapshots.push(Snapshot {
                l1_table_offset: layout.fields.l1_table_offset,
                l1_size: layout.fields.l1_size,
                extra_data_size: u64::from(layout.fields.extra_data_size),
                id: (layout.id.0, u64::from(layout.id.1)),
                name: (layout.name.0, u64::from(layout.name.1)),
            });
            Ok(())
        };
        let walked = if repair.errors() {
            snapshot::walk_table_repairing(read, offset, count, &mut repairs, visit)
        } else {
            snapshot::walk_table(read, offset, count, visit)
        };
        // The table's errors stop the check (qemu-img: "ERROR failed to read the snapshot
        // table: ...", then "Check failed").
        let size = walked.inspect_err(|_| snapshot_res.check_errors += 1)?;
        for line in repairs.messages {
            self.messages.push(line);
        }
        self.snapshots = snapshots;
        self.snapshots_size = size;
        reduced += repairs.overhanging;
        snapshot_res.corruptions += u64::from(reduced) + u64::from(repairs.extra_data_dropped);
        if reduced > 0 {
            // Written at once (qemu does too): the refcount check must count what the header
            // lists. The dropped entries' clusters leak, and the refcount repair frees them.
            let remaining = declared - reduced;
            self.write(
                &remaining.to_be_bytes(),
                60,
                "qcow2 header (snapshot count)",
            )?;
            self.backend
                .sync_all()
                .map_err(Error::writing("qcow2 image"))?;
            self.header.nb_snapshots = remaining;
            snapshot_res.corruptions -= u64::from(reduced);
            snapshot_res.corruptions_fixed += u64::from(reduced);
        }
        if self.header.version == Version::V3 {
            let prefix = if repair.errors() {
                "Repairing"
            } else {
                "ERROR"
            };
            for (i, sn) in self.snapshots.iter().enumerate() {
                if sn.extra_data_size < u64::from(snapshot::V3_MIN_EXTRA_DATA) {
                    snapshot_res.corruptions += 1;
                    self.messages
                        .push(format!("{prefix} snapshot table entry {i} is incomplete"));
                }
            }
        }
        Ok(())
    }

    /// qemu's `qcow2_check_fix_snapshot_table`: after the refcounts were repaired, a table with
    /// corruptions (incomplete entries, extra data cut) is written anew as every other table
    /// write does it: new clusters, then the header, then the old clusters freed.
    fn fix_snapshot_table(&mut self, snapshot_res: &mut Counts) -> Result<(), Error> {
        let mut repairs = snapshot::TableRepairs::default();
        let table = snapshot::read_table_repairing(
            |buf, at| self.read_padded(buf, at, "qcow2 snapshot table"),
            self.header.snapshots_offset,
            self.header.nb_snapshots,
            &mut repairs,
        )?;
        let mut cluster = HeaderCluster::read_from(self.backend)?;
        // The writer opens the image without its broken table (which it would refuse), and
        // without the dirty and corrupt bits (cleared by the check afterwards if it can).
        let kept_bits = cluster.header.incompatible_features;
        cluster.header.incompatible_features -=
            IncompatibleFeatures::DIRTY | IncompatibleFeatures::CORRUPT;
        cluster.header.nb_snapshots = 0;
        cluster.header.snapshots_offset = 0;
        let mut image =
            super::image::Qcow2Image::open_rw(self.backend, cluster, None, Default::default())?;
        image.header.incompatible_features = kept_bits;
        image.allocate_first_fit();
        image.replace_snapshot_table(
            &table.entries,
            self.header.snapshots_offset,
            self.snapshots_size,
        )?;
        image.flush()?;
        self.header.nb_snapshots = image.header.nb_snapshots;
        self.header.snapshots_offset = image.header.snapshots_offset;
        drop(image);
        self.file_len = self
            .backend
            .len()
            .map_err(Error::reading("qcow2 file length"))?;
        self.refblock_cache.clear();
        self.l2_cache = None;
        snapshot_res.corruptions_fixed += snapshot_res.corruptions;
        snapshot_res.corruptions = 0;
        Ok(())
    }

    // ---------------------------------------------------------------------------------------

    /// qemu's `qcow2_check_refcounts`.
    fn check_refcounts(&mut self, repair: Repair) -> Result<(), Error> {
        let nb_clusters = self.file_len.div_ceil(self.cluster_size);
        if nb_clusters > i32::MAX as u64 {
            self.res.check_errors += 1;
            return Err(aborted(
                io::ErrorKind::FileTooLarge,
                "image file too large to check",
            ));
        }
        self.res.total_clusters = (self.header.size / 512 * 512).div_ceil(self.cluster_size);
        let window = (MAX_IMRT_BYTES * 8) >> self.header.refcount_order;
        if repair == Repair::None && nb_clusters > window {
            return self.check_refcounts_windowed(nb_clusters, window);
        }
        self.imrt.resize(nb_clusters).inspect_err(|_| {
            self.res.check_errors += 1;
        })?;
        let mut rebuild = false;
        self.calculate_refcounts(repair, &mut rebuild)?;
        let pre_compare = self.res;
        let mut highest = self.compare_refcounts(Repair::None, &mut rebuild)?;

        if rebuild && repair.errors() {
            let old = self.res;
            self.messages
                .push("Rebuilding refcount structure".to_owned());
            if let Err(e) = self.rebuild_refcount_structure() {
                self.res.check_errors += 1;
                return Err(e);
            }
            self.res.corruptions = 0;
            self.res.leaks = 0;
            rebuild = false;
            self.imrt.bytes.fill(0);
            self.calculate_refcounts(Repair::None, &mut rebuild)?;
            // The old structures are leaked now; repair that, keeping only leaks the rebuild
            // itself could not fix.
            let saved = self.res;
            self.res = Counts::default();
            highest = self.compare_refcounts(Repair::Leaks, &mut rebuild)?;
            if rebuild {
                self.messages
                    .push("ERROR rebuilt refcount structure is still broken".to_owned());
            }
            let fresh_leaks = self.res.leaks;
            self.res = saved;
            if self.res.corruptions < old.corruptions {
                self.res.corruptions_fixed += old.corruptions - self.res.corruptions;
            }
            if self.res.leaks < old.leaks {
                self.res.leaks_fixed += old.leaks - self.res.leaks;
            }
            self.res.leaks += fresh_leaks;
        } else if repair != Repair::None {
            if rebuild {
                self.messages
                    .push("ERROR need to rebuild refcount structures".to_owned());
                self.res.check_errors += 1;
                return Err(aborted(
                    io::ErrorKind::InvalidData,
                    "the refcount structures need to be rebuilt (repair all)",
                ));
            }
            if self.res.leaks > 0 || self.res.corruptions > 0 {
                self.res = pre_compare;
                highest = self.compare_refcounts(repair, &mut rebuild)?;
            }
        }

        self.check_oflag_copied(repair)?;
        self.res.image_end_offset = (highest + 1) * self.cluster_size;
        Ok(())
    }

    /// [`Self::check_refcounts`] without repair for a file whose in-memory refcount table
    /// would exceed [`MAX_IMRT_BYTES`]: the metadata is walked once per window of `window`
    /// host clusters and each window compared on its own, so memory stays bounded whatever the
    /// file size. The first walk reports everything; later walks add only what concerns their
    /// own clusters (refcount overflows, refcount blocks not counted once, refcount
    /// mismatches), so the counts are those of a single pass.
    fn check_refcounts_windowed(&mut self, nb_clusters: u64, window: u64) -> Result<(), Error> {
        let mut rebuild = false;
        let mut highest = 0;
        let mut base = 0;
        loop {
            let first = base == 0;
            self.imrt.set_window(base, base + window);
            self.imrt.len = 0;
            self.imrt.resize(nb_clusters).inspect_err(|_| {
                self.res.check_errors += 1;
            })?;
            let saved = (self.res, self.window_corruptions);
            self.messages.muted = !first;
            let walked = self.calculate_refcounts(Repair::None, &mut rebuild);
            self.messages.muted = false;
            walked?;
            if !first {
                self.res = saved.0;
                self.res.corruptions += self.window_corruptions - saved.1;
            }
            highest = highest.max(self.compare_refcounts(Repair::None, &mut rebuild)?);
            base += window;
            // The table may have grown past the file for references just beyond its end.
            if base >= self.imrt.len {
                break;
            }
        }
        self.check_oflag_copied(Repair::None)?;
        self.res.image_end_offset = (highest + 1) * self.cluster_size;
        Ok(())
    }

    /// qemu's `qcow2_co_check_locked`.
    fn run(&mut self, repair: Repair) -> Result<CheckReport, Error> {
        if repair != Repair::None {
            self.l1 = self.read_u64_table(
                self.header.l1_table_offset,
                u64::from(self.header.l1_size),
                "qcow2 L1 table",
            )?;
        }
        let mut snapshot_res = Counts::default();
        self.read_snapshot_table(&mut snapshot_res, repair)?;
        self.check_refcounts(repair)?;
        if repair.errors() && snapshot_res.corruptions > 0 {
            if let Err(e) = self.fix_snapshot_table(&mut snapshot_res) {
                self.messages
                    .push(format!("ERROR failed to update snapshot table: {e}"));
                snapshot_res.check_errors += 1;
            }
        }
        let mut res = self.res;
        res.corruptions += snapshot_res.corruptions;
        res.leaks += snapshot_res.leaks;
        res.check_errors += snapshot_res.check_errors;
        res.corruptions_fixed += snapshot_res.corruptions_fixed;
        res.leaks_fixed += snapshot_res.leaks_fixed;

        if repair != Repair::None {
            if res.check_errors == 0 && res.corruptions == 0 {
                self.mark_clean_and_consistent()?;
            }
            self.backend
                .sync_all()
                .map_err(Error::writing("qcow2 image"))?;
        }
        Ok(CheckReport {
            image_end_offset: res.image_end_offset,
            compressed_clusters: res.compressed_clusters,
            total_clusters: res.total_clusters,
            corruptions: res.corruptions,
            corruptions_fixed: res.corruptions_fixed,
            check_errors: res.check_errors,
            leaks: res.leaks,
            leaks_fixed: res.leaks_fixed,
            allocated_clusters: res.allocated_clusters,
            filename: String::new(),
            format: "qcow2".to_owned(),
            fragmented_clusters: res.fragmented_clusters,
            messages: self.messages.take_lines(),
        })
    }

    /// Clears the dirty and corrupt bits after a successful repair (qemu's `qcow2_mark_clean`
    /// and `qcow2_mark_consistent`).
    fn mark_clean_and_consistent(&mut self) -> Result<(), Error> {
        if self.header.version != Version::V3 {
            return Ok(());
        }
        let stale = IncompatibleFeatures::DIRTY | IncompatibleFeatures::CORRUPT;
        if !self.header.incompatible_features.intersects(stale) {
            return Ok(());
        }
        self.backend
            .sync_all()
            .map_err(Error::writing("qcow2 image"))?;
        let bits = self.header.incompatible_features - stale;
        self.write(
            &bits.bits().to_be_bytes(),
            72,
            "qcow2 header (feature bits)",
        )?;
        self.header.incompatible_features = bits;
        Ok(())
    }
}

/// An error for a check qemu-img would abandon ("Check failed").
fn aborted(kind: io::ErrorKind, message: impl Into<String>) -> Error {
    Error::Io {
        step: "checking the qcow2 image".to_owned(),
        source: io::Error::new(kind, message.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemBackend;
    use crate::qcow2::create::CreateOptions;

    /// A fresh image made by our own creator, as bytes.
    fn fresh(size: u64, options: &CreateOptions) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        crate::Qcow2Builder::new(&path)
            .size(size)
            .options(options.clone())
            .create()
            .unwrap();
        std::fs::read(&path).unwrap()
    }

    fn be16_at(bytes: &mut [u8], at: usize, value: u16) {
        bytes[at..at + 2].copy_from_slice(&value.to_be_bytes());
    }

    #[test]
    fn check_a_fresh_image_is_clean_like_qemu() {
        let bytes = fresh(1 << 30, &CreateOptions::default());
        let report = check(&MemBackend::new(bytes), Repair::None).unwrap();
        assert_eq!(report.exit_code(), 0, "{:?}", report.messages);
        // FORMATS.md §1.9: "Image end offset: 262144", 16384 guest clusters.
        assert_eq!(report.image_end_offset, 262_144);
        assert_eq!(report.total_clusters, 16384);
        assert_eq!(report.allocated_clusters, 0);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["image-end-offset"], 262_144);
        assert_eq!(json["check-errors"], 0);
        assert!(json.get("corruptions").is_none() && json.get("leaks").is_none());
    }

    #[test]
    fn check_counts_a_leak_and_repairs_it() {
        let mut bytes = fresh(1 << 20, &CreateOptions::default());
        // Refcount block 0 at 0x20000: give cluster 3 (the L1 table) refcount 2.
        be16_at(&mut bytes, 0x20000 + 6, 2);
        let mem = MemBackend::new(bytes);
        let report = check(&mem, Repair::None).unwrap();
        assert_eq!(
            (report.corruptions, report.leaks),
            (0, 1),
            "{:?}",
            report.messages
        );
        assert_eq!(report.exit_code(), 3);
        assert_eq!(report.messages, ["Leaked cluster 3 refcount=2 reference=1"]);
        let fixed = check(&mem, Repair::Leaks).unwrap();
        assert_eq!((fixed.leaks, fixed.leaks_fixed), (0, 1));
        assert_eq!(check(&mem, Repair::None).unwrap().exit_code(), 0);
    }

    #[test]
    fn check_rebuilds_a_refcount_structure_with_a_zero_refcount() {
        let mut bytes = fresh(1 << 20, &CreateOptions::default());
        be16_at(&mut bytes, 0x20000 + 4, 0); // the refcount block's own refcount
        let mem = MemBackend::new(bytes);
        let report = check(&mem, Repair::None).unwrap();
        // qemu 7.2: one corruption ("ERROR cluster 2 refcount=0 reference=1").
        assert_eq!(report.corruptions, 1, "{:?}", report.messages);
        assert!(check(&mem, Repair::Leaks).is_err());
        let fixed = check(&mem, Repair::All).unwrap();
        assert_eq!(fixed.corruptions, 0, "{:?}", fixed.messages);
        let again = check(&mem, Repair::None).unwrap();
        assert_eq!(again.exit_code(), 0, "{:?}", again.messages);
    }

    #[test]
    fn check_survives_garbage_without_panicking() {
        let bytes = fresh(1 << 20, &CreateOptions::default());
        for seed in 0..64u64 {
            let mut b = bytes.clone();
            let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
            for _ in 0..64 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let at = 0x10000 + (x as usize % (b.len() - 0x10000));
                b[at] = (x >> 32) as u8;
            }
            for repair in [Repair::None, Repair::Leaks, Repair::All] {
                let mem = MemBackend::new(b.clone()).with_limit(64 << 20);
                let _ = check(&mem, repair);
            }
        }
    }
}
