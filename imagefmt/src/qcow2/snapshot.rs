//! The internal snapshot table: one codec for every reader and writer of it (open, info, check,
//! the snapshot operations in [`super::snapshot_ops`]).
//!
//! Spec: docs/interop/qcow2.rst "Snapshots"; bounds as qemu's `qcow2_read_snapshots` enforces
//! them (FORMATS.md §1.10 item 6). The table starts at the cluster-aligned `snapshots_offset`
//! and holds `nb_snapshots` entries, each starting on an 8-byte boundary:
//!
//! ```text
//! 0   u64 l1_table_offset     the snapshot's L1 table (cluster-aligned)
//! 8   u32 l1_size             its entries
//! 12  u16 id_str_size         length of the id that follows the extra data
//! 14  u16 name_size           length of the name that follows the id
//! 16  u32 date_sec            wall clock when the snapshot was taken
//! 20  u32 date_nsec
//! 24  u64 vm_clock_nsec       guest clock
//! 32  u32 vm_state_size       VM state bytes (0 if it does not fit: see the extra data)
//! 36  u32 extra_data_size     bytes of extra data that follow (≤ 1024)
//! 40  extra data              u64 vm_state_size_large, u64 disk_size, u64 icount, unknown...
//!     id (no NUL), name (no NUL)
//! ```
//!
//! v3 images need at least 16 bytes of extra data (vm_state_size_large and disk_size). What is
//! missing reads as qemu reads it: the VM state size from the 32-bit field, the disk size from
//! the image's, no icount. Written entries always carry the 24 known bytes (and keep unknown
//! extra data), as qemu writes them.
//!
//! Memory is bounded whatever the header says: at most [`MAX_SNAPSHOTS`] entries and
//! [`MAX_TABLE_BYTES`] of table (qemu's `QCOW_MAX_SNAPSHOTS_SIZE`), extra data ≤
//! [`MAX_EXTRA_DATA`]; [`walk_table`] reads entry by entry without holding ids or names.
//!
//! Where the table is and how many entries it has ([`validate_pointer`]) is checked by whoever
//! reads the table, not by the header codec: qemu opens an image whose header declares too many
//! snapshots for `qemu-img check`, which reads the table its own way (and `check -r all` drops
//! the overhanging entries). An image opened for anything else reads its table once
//! ([`read_table`], a [`SnapshotTable`] the open image keeps) and fails to open if qemu's
//! `qcow2_read_snapshots` would fail.

use byteorder::{BigEndian, ByteOrder};
use thiserror::Error;

use super::MAX_SNAPSHOTS;
use crate::Result;

/// Size of an entry's fixed part (`QCowSnapshotHeader`).
pub const ENTRY_HEADER_LEN: u64 = 40;
/// qemu's `QCOW_MAX_SNAPSHOT_EXTRA_DATA`.
pub const MAX_EXTRA_DATA: u32 = 1024;
/// qemu's `QCOW_MAX_SNAPSHOTS_SIZE`: the largest table (fixed parts, extra data, ids, names).
pub const MAX_TABLE_BYTES: u64 = 1024 * MAX_SNAPSHOTS as u64;
/// Extra data every v3 entry needs: vm_state_size_large and disk_size.
pub const V3_MIN_EXTRA_DATA: u32 = 16;
/// Extra data this codec knows and writes: vm_state_size_large, disk_size, icount.
pub const KNOWN_EXTRA_DATA: u32 = 24;
/// The icount value that means "none" (qemu's `-1ULL`).
pub const NO_ICOUNT: u64 = u64::MAX;

/// What is wrong with a snapshot table or a snapshot request.
#[non_exhaustive]
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SnapshotError {
    /// The table's offset is not cluster-aligned, or its fixed parts alone would end past the
    /// largest file offset (qemu: "Snapshot table offset invalid", EINVAL).
    #[error("snapshot table offset {offset:#x} invalid")]
    TableOffsetInvalid {
        /// The offset found.
        offset: u64,
    },
    /// The header declares more than [`MAX_SNAPSHOTS`] snapshots (qemu: "Snapshot table too
    /// large", EFBIG).
    #[error("snapshot table too large: {count} snapshots (at most 65536)")]
    TooManyEntries {
        /// The count the header declares.
        count: u32,
    },
    /// An entry with more extra data than qemu accepts.
    #[error("too much extra metadata in snapshot table entry {index}")]
    TooMuchExtraData {
        /// The entry's index.
        index: u32,
        /// Its extra_data_size.
        size: u32,
    },
    /// The table is larger than qemu's limit, or runs past 2 GiB from its start.
    #[error("snapshot table is too big ({overhanging} snapshots past the limit)")]
    TableTooBig {
        /// Entries from the one that crosses the limit to the end (what `check -r all`
        /// drops).
        overhanging: u32,
    },
    /// No snapshot matches.
    #[error("snapshot {name:?} not found")]
    NotFound {
        /// The id or name asked for.
        name: String,
    },
    /// Already [`MAX_SNAPSHOTS`] snapshots.
    #[error("too many snapshots (at most 65536)")]
    TooMany,
    /// A name (or id) longer than an entry can record.
    #[error("snapshot name of {len} bytes is too long (at most 65535)")]
    NameTooLong {
        /// Its length.
        len: usize,
    },
    /// A refcount would overflow its width (1-bit refcounts cannot count any shared cluster;
    /// qemu fails too, after leaking clusters; this is refused before anything is written).
    #[error("refcounts of {bits} bits cannot count one more reference to a shared cluster")]
    RefcountTooNarrow {
        /// The image's refcount width.
        bits: u32,
    },
    /// Snapshots of an image with an external data file (qemu refuses them too).
    #[error("internal snapshots are not supported with an external data file")]
    DataFile,
    /// Applying a snapshot to an image with persistent dirty bitmaps: the bitmaps would no
    /// longer record every change since they were started (qemu refuses it too).
    #[error("the image has persistent dirty bitmaps, which applying a snapshot would leave wrong (remove them first)")]
    ActiveBitmaps,
    /// A resize of a v2 image with internal snapshots (qemu's words).
    #[error("Can't resize a v2 image which has snapshots")]
    V2Resize,
    /// A downgrade to v2 of an image with a snapshot that v2 cannot describe: one whose VM
    /// state does not fit v2's 32-bit size field, or with another disk size than the image's
    /// (qemu's words).
    #[error("Internal snapshots prevent downgrade of image")]
    PreventDowngrade,
    /// A snapshot's L1 table that cannot be valid (qemu's `qcow2_validate_table`, checked
    /// when an operation needs the table, not when the image is opened).
    #[error("snapshot {id} has an invalid L1 table ({l1_size} entries at {offset:#x}: {problem})")]
    InvalidL1 {
        /// The snapshot's id.
        id: String,
        /// The table's offset.
        offset: u64,
        /// Its entries.
        l1_size: u32,
        /// What is wrong with it.
        problem: L1Problem,
    },
    /// A snapshot operation would raise the refcount of a cluster that no refcount block
    /// covers (a corrupt image). qemu fails the operation with EAGAIN after hooking up a new
    /// refcount block; this refuses it before anything is written.
    #[error("cluster {cluster} is referenced but no refcount block covers it")]
    RefcountBlockMissing {
        /// The host cluster index.
        cluster: u64,
    },
}

/// What is wrong with a snapshot's L1 table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L1Problem {
    /// More than qemu's 32 MiB of entries (qemu: "too large", EFBIG).
    TooLarge,
    /// Not cluster-aligned, or ending past the largest offset (qemu: "offset invalid", EINVAL).
    Unaligned,
    /// Not inside the file (qemu would read zeros past its end; here it is an invalid offset).
    PastEndOfFile,
}

impl std::fmt::Display for L1Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            L1Problem::TooLarge => "larger than 32 MiB",
            L1Problem::Unaligned => "offset not cluster-aligned",
            L1Problem::PastEndOfFile => "not inside the file",
        })
    }
}

impl From<SnapshotError> for crate::Error {
    fn from(e: SnapshotError) -> Self {
        super::Qcow2Error::Snapshot(e).into()
    }
}

/// One snapshot table entry, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    /// Offset of the snapshot's L1 table.
    pub l1_table_offset: u64,
    /// Entries of the snapshot's L1 table.
    pub l1_size: u32,
    /// Unique id (qemu numbers them "1", "2", ...), as stored.
    pub id: Vec<u8>,
    /// Name (qemu's "tag"), as stored.
    pub name: Vec<u8>,
    /// Wall clock seconds when taken.
    pub date_sec: u32,
    /// Wall clock nanoseconds.
    pub date_nsec: u32,
    /// Guest clock at the snapshot, nanoseconds.
    pub vm_clock_nsec: u64,
    /// VM state bytes (from vm_state_size_large when the entry has it).
    pub vm_state_size: u64,
    /// Virtual disk size of the snapshot; `None` when the entry does not record it (then it is
    /// the image's current size, as qemu reads it).
    pub disk_size: Option<u64>,
    /// Instruction count of record/replay; `None` when absent (or stored as -1).
    pub icount: Option<u64>,
    /// The entry's extra_data_size as stored.
    pub extra_data_size: u32,
    /// Extra data after the 24 known bytes, kept verbatim.
    pub unknown_extra: Vec<u8>,
}

impl Snapshot {
    /// The id as text, as qemu sees it: up to its first NUL byte (qemu keeps ids and names as
    /// C strings), invalid UTF-8 replaced.
    pub fn id_str(&self) -> String {
        String::from_utf8_lossy(c_string(&self.id)).into_owned()
    }

    /// The name as text, as qemu sees it (see [`Self::id_str`]).
    pub fn name_str(&self) -> String {
        String::from_utf8_lossy(c_string(&self.name)).into_owned()
    }

    /// The snapshot's disk size, `image_size` when the entry does not record one.
    pub fn disk_size_or(&self, image_size: u64) -> u64 {
        self.disk_size.unwrap_or(image_size)
    }

    /// Bytes this entry takes when encoded (without the alignment before it).
    fn encoded_len(&self) -> u64 {
        ENTRY_HEADER_LEN
            + u64::from(KNOWN_EXTRA_DATA)
            + self.unknown_extra.len() as u64
            + self.id.len() as u64
            + self.name.len() as u64
    }
}

impl Snapshot {
    /// The entry as [`encode_table`] writes it and a reader then reads it back: the 24 known
    /// bytes of extra data plus the unknown ones, the disk size recorded (`image_size` where
    /// it was not).
    pub fn as_written(&self, image_size: u64) -> Snapshot {
        Snapshot {
            extra_data_size: KNOWN_EXTRA_DATA + self.unknown_extra.len() as u32,
            disk_size: Some(self.disk_size_or(image_size)),
            ..self.clone()
        }
    }
}

/// A snapshot table as read from an image: where it lies, its size and its entries. An open
/// image holds one ([`super::image::Qcow2Image`]); info, snapshot operations and the writer's
/// metadata guard all derive what they need from it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SnapshotTable {
    /// File offset of the table (as the header says; 0 when there is none).
    pub offset: u64,
    /// Bytes from `offset` to the end of the last name (qemu's `snapshots_size`).
    pub size: u64,
    /// The entries, in table order.
    pub entries: Vec<Snapshot>,
}

/// qemu's `qcow2_validate_table` for the snapshot table (done on open, and by check before it
/// reads the table): at most [`MAX_SNAPSHOTS`] entries, a cluster-aligned offset, and fixed
/// parts that could end inside the 64-bit range. Checked even when there are no snapshots.
pub fn validate_pointer(offset: u64, count: u32, cluster_size: u64) -> Result<(), SnapshotError> {
    if count > MAX_SNAPSHOTS {
        return Err(SnapshotError::TooManyEntries { count });
    }
    if u64::MAX - u64::from(count) * ENTRY_HEADER_LEN < offset || offset % cluster_size != 0 {
        return Err(SnapshotError::TableOffsetInvalid { offset });
    }
    Ok(())
}

/// Where one entry lies and what its fixed part and known extra data say, before its id and
/// name are read ([`walk_table`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryLayout {
    /// Index in the table.
    pub index: u32,
    /// The entry with empty id, name and unknown extra data.
    pub fields: Snapshot,
    /// File offset of the extra data after the known 24 bytes (if any).
    pub unknown_extra_at: u64,
    /// File offset and length of the id.
    pub id: (u64, u16),
    /// File offset and length of the name.
    pub name: (u64, u16),
}

/// What a repairing walk ([`walk_table_repairing`]) dropped, as qemu's `check -r all` drops it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableRepairs {
    /// One line per repair, as qemu prints them.
    pub messages: Vec<String>,
    /// Entries whose extra data was cut to [`MAX_EXTRA_DATA`] bytes.
    pub extra_data_dropped: u32,
    /// Entries dropped off the end because the table was too big.
    pub overhanging: u32,
}

/// Walks the `count` entries of the table at `offset`, reading through `read` (which must read
/// exactly `buf.len()` bytes; qemu reads past the end of the file as zeros, and so may `read`),
/// and hands each entry's layout to `visit`. Returns the table's size in bytes (from `offset`
/// to the end of the last name), as qemu's `snapshots_size`.
///
/// Errors as qemu's `qcow2_read_snapshots`: extra data over [`MAX_EXTRA_DATA`], a table over
/// [`MAX_TABLE_BYTES`] (or ending more than `i32::MAX` bytes after its start), and an offset
/// whose fixed parts would end past `i64::MAX`. More than [`MAX_SNAPSHOTS`] entries are
/// refused too (callers check [`validate_pointer`] first; this keeps the walk bounded anyway).
pub fn walk_table(
    read: impl FnMut(&mut [u8], u64) -> Result<()>,
    offset: u64,
    count: u32,
    visit: impl FnMut(&EntryLayout) -> Result<()>,
) -> Result<u64> {
    walk(read, offset, count, None, visit)
}

/// [`walk_table`] as qemu's `check -r all` reads the table: an entry with too much extra data
/// keeps only [`MAX_EXTRA_DATA`] bytes of it (its layout says so; the bytes after it are still
/// skipped), and when the table grows too big the entry that crosses the limit and all after
/// it are dropped (not visited; the size returned ends before them). What was dropped is
/// added to `repairs`.
pub fn walk_table_repairing(
    read: impl FnMut(&mut [u8], u64) -> Result<()>,
    offset: u64,
    count: u32,
    repairs: &mut TableRepairs,
    visit: impl FnMut(&EntryLayout) -> Result<()>,
) -> Result<u64> {
    walk(read, offset, count, Some(repairs), visit)
}

fn walk(
    mut read: impl FnMut(&mut [u8], u64) -> Result<()>,
    offset: u64,
    count: u32,
    mut repairs: Option<&mut TableRepairs>,
    mut visit: impl FnMut(&EntryLayout) -> Result<()>,
) -> Result<u64> {
    if count == 0 {
        return Ok(0);
    }
    if count > MAX_SNAPSHOTS {
        return Err(SnapshotError::TooManyEntries { count }.into());
    }
    if (i64::MAX as u64).saturating_sub(u64::from(count) * ENTRY_HEADER_LEN) < offset {
        return Err(SnapshotError::TableOffsetInvalid { offset }.into());
    }
    let mut at = offset;
    let mut table_length = 0u64;
    for index in 0..count {
        let before = at;
        table_length = table_length.next_multiple_of(8);
        at = at.next_multiple_of(8);
        let mut h = [0u8; ENTRY_HEADER_LEN as usize];
        read(&mut h, at)?;
        at += ENTRY_HEADER_LEN;
        let id_size = BigEndian::read_u16(&h[12..14]);
        let name_size = BigEndian::read_u16(&h[14..16]);
        let vm_state_size32 = BigEndian::read_u32(&h[32..36]);
        let stored_extra_data_size = BigEndian::read_u32(&h[36..40]);
        let mut extra_data_size = stored_extra_data_size;
        if extra_data_size > MAX_EXTRA_DATA {
            let Some(repairs) = repairs.as_deref_mut() else {
                return Err(SnapshotError::TooMuchExtraData {
                    index,
                    size: extra_data_size,
                }
                .into());
            };
            repairs.messages.push(format!(
                "Discarding too much extra metadata in snapshot table entry {index} \
                 ({extra_data_size} > {MAX_EXTRA_DATA})"
            ));
            repairs.extra_data_dropped += 1;
            extra_data_size = MAX_EXTRA_DATA;
        }
        let mut extra = [0u8; KNOWN_EXTRA_DATA as usize];
        let known = extra_data_size.min(KNOWN_EXTRA_DATA) as usize;
        read(&mut extra[..known], at)?;
        let unknown_extra_at = at + u64::from(KNOWN_EXTRA_DATA);
        at += u64::from(stored_extra_data_size);
        let id = (at, id_size);
        at += u64::from(id_size);
        let name = (at, name_size);
        at += u64::from(name_size);
        table_length += ENTRY_HEADER_LEN
            + u64::from(extra_data_size)
            + u64::from(id_size)
            + u64::from(name_size);
        if table_length > MAX_TABLE_BYTES || at - offset > i32::MAX as u64 {
            let Some(repairs) = repairs.as_deref_mut() else {
                return Err(SnapshotError::TableTooBig {
                    overhanging: count - index,
                }
                .into());
            };
            repairs.messages.push(format!(
                "Discarding {} overhanging snapshots (snapshot table is too big)",
                count - index
            ));
            repairs.overhanging += count - index;
            return Ok(before - offset);
        }
        let word = |i: usize| BigEndian::read_u64(&extra[i * 8..i * 8 + 8]);
        let fields = Snapshot {
            l1_table_offset: BigEndian::read_u64(&h[0..8]),
            l1_size: BigEndian::read_u32(&h[8..12]),
            id: Vec::new(),
            name: Vec::new(),
            date_sec: BigEndian::read_u32(&h[16..20]),
            date_nsec: BigEndian::read_u32(&h[20..24]),
            vm_clock_nsec: BigEndian::read_u64(&h[24..32]),
            vm_state_size: if known >= 8 {
                word(0)
            } else {
                u64::from(vm_state_size32)
            },
            disk_size: (known >= 16).then(|| word(1)),
            icount: (known >= 24).then(|| word(2)).filter(|&i| i != NO_ICOUNT),
            extra_data_size,
            unknown_extra: Vec::new(),
        };
        visit(&EntryLayout {
            index,
            fields,
            unknown_extra_at,
            id,
            name,
        })?;
    }
    Ok(at - offset)
}

/// Reads the whole table: every entry with its id, name and unknown extra data. Bounded by
/// [`walk_table`]'s limits (the table, and so what is held, is at most [`MAX_TABLE_BYTES`]).
pub fn read_table(
    read: impl FnMut(&mut [u8], u64) -> Result<()>,
    offset: u64,
    count: u32,
) -> Result<SnapshotTable> {
    read_whole(read, offset, count, None)
}

/// [`read_table`] as `check -r all` reads it ([`walk_table_repairing`]).
pub fn read_table_repairing(
    read: impl FnMut(&mut [u8], u64) -> Result<()>,
    offset: u64,
    count: u32,
    repairs: &mut TableRepairs,
) -> Result<SnapshotTable> {
    read_whole(read, offset, count, Some(repairs))
}

fn read_whole(
    read: impl FnMut(&mut [u8], u64) -> Result<()>,
    offset: u64,
    count: u32,
    repairs: Option<&mut TableRepairs>,
) -> Result<SnapshotTable> {
    // The walker and the visitor take turns with the reader, never at once.
    let read = std::cell::RefCell::new(read);
    let mut out = Vec::new();
    let size = walk(
        |buf, at| (read.borrow_mut())(buf, at),
        offset,
        count,
        repairs,
        |layout| {
            let mut read = read.borrow_mut();
            let mut sn = layout.fields.clone();
            let unknown = sn.extra_data_size.saturating_sub(KNOWN_EXTRA_DATA) as usize;
            sn.unknown_extra = vec![0u8; unknown];
            read(&mut sn.unknown_extra, layout.unknown_extra_at)?;
            sn.id = vec![0u8; usize::from(layout.id.1)];
            read(&mut sn.id, layout.id.0)?;
            sn.name = vec![0u8; usize::from(layout.name.1)];
            read(&mut sn.name, layout.name.0)?;
            out.push(sn);
            Ok(())
        },
    )?;
    Ok(SnapshotTable {
        offset,
        size,
        entries: out,
    })
}

/// Encodes `snapshots` as a table, as qemu's `qcow2_write_snapshots` writes it: each entry on
/// an 8-byte boundary, the 24 known bytes of extra data plus any unknown extra data, the 32-bit
/// VM state size 0 when the size does not fit. A missing disk size is written as
/// `image_size`, a missing icount as -1.
pub fn encode_table(snapshots: &[Snapshot], image_size: u64) -> Result<Vec<u8>> {
    if snapshots.len() > MAX_SNAPSHOTS as usize {
        return Err(SnapshotError::TooMany.into());
    }
    let mut out = Vec::new();
    for (index, sn) in snapshots.iter().enumerate() {
        for text in [&sn.id, &sn.name] {
            if text.len() > usize::from(u16::MAX) {
                return Err(SnapshotError::NameTooLong { len: text.len() }.into());
            }
        }
        if sn.unknown_extra.len() > (MAX_EXTRA_DATA - KNOWN_EXTRA_DATA) as usize {
            return Err(SnapshotError::TooMuchExtraData {
                index: index as u32,
                size: KNOWN_EXTRA_DATA + sn.unknown_extra.len() as u32,
            }
            .into());
        }
        let start = out.len().next_multiple_of(8);
        if (start as u64 + sn.encoded_len()) > MAX_TABLE_BYTES {
            return Err(SnapshotError::TableTooBig {
                overhanging: (snapshots.len() - index) as u32,
            }
            .into());
        }
        out.resize(start, 0);
        let mut h = [0u8; ENTRY_HEADER_LEN as usize];
        BigEndian::write_u64(&mut h[0..8], sn.l1_table_offset);
        BigEndian::write_u32(&mut h[8..12], sn.l1_size);
        BigEndian::write_u16(&mut h[12..14], sn.id.len() as u16);
        BigEndian::write_u16(&mut h[14..16], sn.name.len() as u16);
        BigEndian::write_u32(&mut h[16..20], sn.date_sec);
        BigEndian::write_u32(&mut h[20..24], sn.date_nsec);
        BigEndian::write_u64(&mut h[24..32], sn.vm_clock_nsec);
        BigEndian::write_u32(&mut h[32..36], u32::try_from(sn.vm_state_size).unwrap_or(0));
        let extra_len = KNOWN_EXTRA_DATA + sn.unknown_extra.len() as u32;
        BigEndian::write_u32(&mut h[36..40], extra_len);
        out.extend_from_slice(&h);
        out.extend_from_slice(&sn.vm_state_size.to_be_bytes());
        out.extend_from_slice(&sn.disk_size.unwrap_or(image_size).to_be_bytes());
        out.extend_from_slice(&sn.icount.unwrap_or(NO_ICOUNT).to_be_bytes());
        out.extend_from_slice(&sn.unknown_extra);
        out.extend_from_slice(&sn.id);
        out.extend_from_slice(&sn.name);
    }
    Ok(out)
}

/// `bytes` up to its first NUL byte: what qemu's C strings hold of a stored id or name.
fn c_string(bytes: &[u8]) -> &[u8] {
    bytes.split(|&b| b == 0).next().unwrap_or(bytes)
}

/// qemu's `find_new_snapshot_id`: one more than the largest id read as a decimal number
/// (`strtoul`: leading digits, anything else counts as 0).
pub fn next_id(snapshots: &[Snapshot]) -> String {
    let max = snapshots
        .iter()
        .map(|sn| {
            let text = sn.id_str();
            let trimmed = text.trim_start();
            let digits: String = trimmed
                .strip_prefix('+')
                .unwrap_or(trimmed)
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            digits
                .parse::<u64>()
                .unwrap_or(if digits.is_empty() { 0 } else { u64::MAX })
        })
        .max()
        .unwrap_or(0);
    max.saturating_add(1).to_string()
}

/// qemu's `find_snapshot_by_id_or_name` (what `snapshot -a` uses): the first entry whose id
/// is `key`, else the first whose name is.
pub fn find_by_id_or_name(snapshots: &[Snapshot], key: &str) -> Option<usize> {
    let key = key.as_bytes();
    snapshots
        .iter()
        .position(|sn| c_string(&sn.id) == key)
        .or_else(|| snapshots.iter().position(|sn| c_string(&sn.name) == key))
}

/// qemu's `bdrv_snapshot_find` (what `snapshot -d` uses to pick the entry): the first entry
/// whose name is `key`. Ids are not matched (qemu-img 10 cannot delete by id).
pub fn find_by_name(snapshots: &[Snapshot], key: &str) -> Option<usize> {
    snapshots
        .iter()
        .position(|sn| c_string(&sn.name) == key.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_from(bytes: &[u8]) -> impl FnMut(&mut [u8], u64) -> Result<()> + '_ {
        move |buf: &mut [u8], at: u64| {
            let at = at as usize;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = bytes.get(at + i).copied().unwrap_or(0);
            }
            Ok(())
        }
    }

    fn entry(id: &str, name: &str) -> Snapshot {
        Snapshot {
            l1_table_offset: 0x50000,
            l1_size: 1,
            id: id.as_bytes().to_vec(),
            name: name.as_bytes().to_vec(),
            date_sec: 1_796_180_101,
            date_nsec: 742_414_000,
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(64 << 20),
            icount: Some(0),
            extra_data_size: KNOWN_EXTRA_DATA,
            unknown_extra: Vec::new(),
        }
    }

    /// The first entry of a table `qemu-img snapshot -c first` wrote (qemu 10.0.2).
    #[test]
    fn decodes_an_entry_as_qemu_wrote_it() {
        let bytes: Vec<u8> = [
            &0x70000u64.to_be_bytes()[..], // l1_table_offset
            &1u32.to_be_bytes(),           // l1_size
            &1u16.to_be_bytes(),           // id_str_size
            &5u16.to_be_bytes(),           // name_size
            &0x6b0f_8885u32.to_be_bytes(), // date_sec
            &0x2c40_56b0u32.to_be_bytes(), // date_nsec
            &0u64.to_be_bytes(),           // vm_clock_nsec
            &0u32.to_be_bytes(),           // vm_state_size
            &24u32.to_be_bytes(),          // extra_data_size
            &0u64.to_be_bytes(),           // vm_state_size_large
            &0x0400_0000u64.to_be_bytes(), // disk_size
            &0u64.to_be_bytes(),           // icount
            b"1",
            b"first",
        ]
        .concat();
        let table = read_table(read_from(&bytes), 0, 1).unwrap();
        assert_eq!((table.offset, table.size), (0, bytes.len() as u64));
        let table = table.entries;
        assert_eq!(table.len(), 1);
        let sn = &table[0];
        assert_eq!((sn.l1_table_offset, sn.l1_size), (0x70000, 1));
        assert_eq!((sn.id_str(), sn.name_str()), ("1".into(), "first".into()));
        assert_eq!((sn.date_sec, sn.date_nsec), (1_796_180_101, 742_414_000));
        assert_eq!((sn.disk_size, sn.icount), (Some(64 << 20), Some(0)));
        assert_eq!(encode_table(&table, 0).unwrap(), bytes);
    }

    #[test]
    fn entries_are_aligned_to_eight_bytes_and_round_trip() {
        let mut b = entry("12", "a name");
        b.unknown_extra = vec![7; 5];
        b.extra_data_size = KNOWN_EXTRA_DATA + 5;
        b.icount = None;
        b.vm_state_size = 5 << 32;
        let table = vec![entry("1", "x"), b];
        let bytes = encode_table(&table, 0).unwrap();
        // First entry: 40 + 24 + 1 + 1 = 66 bytes, so the second starts at 72.
        assert_eq!(BigEndian::read_u64(&bytes[72..80]), 0x50000);
        assert_eq!(
            BigEndian::read_u32(&bytes[72 + 32..72 + 36]),
            0,
            "VM state too big for u32"
        );
        let mut sizes = Vec::new();
        let size = walk_table(read_from(&bytes), 0, 2, |l| {
            sizes.push(l.fields.extra_data_size);
            Ok(())
        })
        .unwrap();
        assert_eq!(size, bytes.len() as u64);
        assert_eq!(sizes, [24, 29]);
        let read = read_table(read_from(&bytes), 0, 2).unwrap();
        assert_eq!((read.size, &read.entries), (size, &table));
        // What the held list becomes after a write is what a reader reads back.
        let mut v2 = entry("3", "v2");
        (v2.extra_data_size, v2.disk_size, v2.icount) = (0, None, None);
        let written: Vec<Snapshot> = [table[0].clone(), table[1].clone(), v2]
            .iter()
            .map(|sn| sn.as_written(1 << 30))
            .collect();
        let bytes = encode_table(&written, 1 << 30).unwrap();
        assert_eq!(
            read_table(read_from(&bytes), 0, 3).unwrap().entries,
            written
        );
    }

    #[test]
    fn short_extra_data_reads_as_qemu_reads_it() {
        let mut bytes = encode_table(&[entry("1", "n")], 0).unwrap();
        // Cut the extra data to 8 bytes: disk size and icount become absent.
        BigEndian::write_u32(&mut bytes[36..40], 8);
        BigEndian::write_u32(&mut bytes[32..36], 99);
        bytes.drain(48..64);
        let sn = &read_table(read_from(&bytes), 0, 1).unwrap().entries[0];
        assert_eq!((sn.disk_size, sn.icount, sn.vm_state_size), (None, None, 0));
        assert_eq!((sn.id_str(), sn.name_str()), ("1".into(), "n".into()));
        BigEndian::write_u32(&mut bytes[36..40], 0);
        bytes.drain(40..48);
        let sn = &read_table(read_from(&bytes), 0, 1).unwrap().entries[0];
        assert_eq!(sn.vm_state_size, 99, "the 32-bit field without extra data");
    }

    #[test]
    fn hostile_tables_are_errors_not_allocations() {
        let mut bytes = encode_table(&[entry("1", "n")], 0).unwrap();
        BigEndian::write_u32(&mut bytes[36..40], 1025);
        let err = read_table(read_from(&bytes), 0, 1).unwrap_err();
        assert!(matches!(
            err,
            crate::Error::Qcow2(super::super::Qcow2Error::Snapshot(
                SnapshotError::TooMuchExtraData {
                    index: 0,
                    size: 1025
                }
            ))
        ));
        // 65536 entries of 40 + 1024 + 65535 + 65535 bytes (all zeros past the end) exceed the
        // 64 MiB table limit long before the last one.
        let mut big = [0u8; 40];
        BigEndian::write_u16(&mut big[12..14], u16::MAX);
        BigEndian::write_u16(&mut big[14..16], u16::MAX);
        BigEndian::write_u32(&mut big[36..40], 1024);
        let mut visited = 0;
        let err = walk_table(
            |buf: &mut [u8], _| {
                let n = buf.len().min(40);
                buf[..n].copy_from_slice(&big[..n]);
                Ok(())
            },
            0,
            MAX_SNAPSHOTS,
            |_| {
                visited += 1;
                Ok(())
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("too big"), "{err}");
        assert!(visited < 600, "{visited}");
        assert!(matches!(
            err,
            crate::Error::Qcow2(super::super::Qcow2Error::Snapshot(
                SnapshotError::TableTooBig { overhanging }
            )) if overhanging == MAX_SNAPSHOTS - visited
        ));
        let err = walk_table(read_from(&[]), i64::MAX as u64 - 10, 1, |_| Ok(())).unwrap_err();
        assert!(
            err.to_string()
                .contains("offset 0x7ffffffffffffff5 invalid"),
            "{err}"
        );
        // A count over the limit is refused before anything is read.
        let err = walk_table(
            |_: &mut [u8], _| panic!("read"),
            0,
            MAX_SNAPSHOTS + 1,
            |_| Ok(()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("65537 snapshots"), "{err}");
    }

    /// qemu's `qcow2_validate_table` for the table pointer, as iotest 080 pokes it.
    #[test]
    fn the_table_pointer_is_validated_as_qemu_validates_it() {
        let cluster = 1 << 16;
        assert_eq!(validate_pointer(0, 0, cluster), Ok(()));
        assert_eq!(validate_pointer(0x10_0000, MAX_SNAPSHOTS, cluster), Ok(()));
        assert_eq!(
            validate_pointer(0x10_0000, u32::MAX, cluster),
            Err(SnapshotError::TooManyEntries { count: u32::MAX })
        );
        assert_eq!(
            validate_pointer(0x1234_5678_90ab_cdef, 0, cluster),
            Err(SnapshotError::TableOffsetInvalid {
                offset: 0x1234_5678_90ab_cdef
            }),
            "unaligned, even without snapshots"
        );
        let near_end = 0xffff_ffff_ffff_0000;
        assert_eq!(
            validate_pointer(near_end, 0xffff, cluster),
            Err(SnapshotError::TableOffsetInvalid { offset: near_end })
        );
        assert_eq!(validate_pointer(near_end, 0x10, cluster), Ok(()));
    }

    #[test]
    fn ids_and_lookups_follow_qemu() {
        let table = vec![entry("1", "2"), entry("7", "a"), entry("x", "b")];
        assert_eq!(next_id(&table), "8");
        assert_eq!(next_id(&[]), "1");
        assert_eq!(find_by_id_or_name(&table, "2"), Some(0));
        assert_eq!(find_by_id_or_name(&table, "7"), Some(1));
        assert_eq!(find_by_id_or_name(&table, "b"), Some(2));
        assert_eq!(find_by_name(&table, "2"), Some(0));
        assert_eq!(find_by_name(&table, "7"), None, "names only");
        let table = vec![entry("1", "x"), entry("2", "1")];
        assert_eq!(find_by_id_or_name(&table, "1"), Some(0), "id first");
        assert_eq!(find_by_name(&table, "1"), Some(1));
    }
}
