//! `convert --salvage`: a source whose read errors do not stop the copy. What cannot be read
//! is copied as zeros, and each failure is reported as qemu-img reports it, one sector at a
//! time.
//!
//! [`Salvage`] wraps the source disk (a chain, or several sources as one) and answers for it
//! as one layer without host locations, so every read goes through it:
//!
//! ```text
//! block_status(start) ─ ok ─► the chain's answer (depth 0, no host location)
//!        │ error: retried on a quarter of the range, down to one 512-byte sector
//!        └─ still failing ─► "error while reading block status at offset N: …";
//!                            the sector is called data (and read)
//! read_at(range) ─ ok ─► the bytes
//!        │ error
//!        └─ sector by sector: a sector that fails ─► "error while reading offset N: …",
//!                             and zeros in its place
//! ```
//!
//! These are qemu-img's rules (`qemu-img.c`, `convert_iteration_sectors` and
//! `convert_co_read`). In cowclone a read error is also what the engine refuses to read: a
//! corrupt L2 entry (its block status fails), a compressed cluster that does not decompress.
//!
//! qemu-img walks the source's block status once before the copy (to count what it will
//! copy) and again during the copy, where each range's status is followed by its read.
//! [`Salvage::count_pass`] is the first walk, reporting failures as they come; during the copy
//! a failed status is reported when its sector is read, just before that read's own failure,
//! so the warnings come in qemu-img's order however far ahead the copy plans (the copy must
//! read with one reader for the order to hold). A walk that starts again from an earlier
//! offset drops the reports that a previous walk left unread (a walk that only counted).
//! The reports waiting for their read are bounded ([`DEFERRED_MAX`]).

use std::collections::VecDeque;
use std::fmt;
use std::sync::Mutex;

use crate::chain;
use crate::extent::{check_range, Extent, ExtentKind, GuestRead};
use crate::offsets::GuestOffset;
use crate::{Error, Result};

/// The unit qemu-img salvages in: one sector.
pub const SECTOR: u64 = 512;

/// Most status failures kept waiting for their read (8 MiB of them: far more than the copy
/// plans ahead, 32 MiB of sectors at most). Older ones are dropped.
pub const DEFERRED_MAX: usize = 1 << 20;

/// One failure that salvaging stepped over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SalvageWarning {
    /// The block status at `offset` could not be read: the sector there is read as data.
    BlockStatus {
        /// Guest offset of the sector.
        offset: u64,
        /// Why, as C's `strerror` words it ("Input/output error").
        cause: String,
    },
    /// The sector at `offset` could not be read: zeros are copied instead.
    Read {
        /// Guest offset of the sector.
        offset: u64,
        /// Why, as C's `strerror` words it.
        cause: String,
    },
    /// The first data cluster found at an unaligned host offset: qemu's qcow2 driver reports
    /// the first corrupt entry it meets once, on a line of its own, before qemu-img's warning.
    UnalignedCluster {
        /// The unaligned host offset its L2 entry gives.
        host: u64,
        /// The host offset of its L2 table.
        l2_offset: u64,
        /// Its index in that table.
        l2_index: u64,
    },
}

impl fmt::Display for SalvageWarning {
    /// qemu-img's words (after its "warning: " prefix).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::BlockStatus { offset, cause } => {
                write!(
                    f,
                    "error while reading block status at offset {offset}: {cause}"
                )
            }
            Self::Read { offset, cause } => {
                write!(f, "error while reading offset {offset}: {cause}")
            }
            Self::UnalignedCluster { host, .. } => {
                write!(
                    f,
                    "qcow2 image is corrupt: data cluster at unaligned host offset {host:#x}"
                )
            }
        }
    }
}

/// What receives the warnings (called from the copy's reader threads).
pub type WarningSink<'a> = &'a (dyn Fn(&SalvageWarning) + Send + Sync);

/// The source disk with read errors turned into zeros and warnings (see the module docs).
pub struct Salvage<'a> {
    inner: &'a dyn GuestRead,
    warn: WarningSink<'a>,
    /// What a failed status is taken as data for: one sector, or with [`Salvage::whole_units`]
    /// the rest of its unit.
    unit: u64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Start of the last block status asked for: a walk's starts increase.
    last_start: Option<u64>,
    /// Set by [`Salvage::count_pass`]: later walks report status failures at the read.
    counted: bool,
    /// Whether a corrupt entry was reported (only the first one is).
    corruption_reported: bool,
    /// Sectors whose status failed in this walk and that were not read yet, ascending.
    deferred: VecDeque<(u64, String)>,
}

impl<'a> Salvage<'a> {
    /// `inner` read with salvaging; warnings go to `warn`.
    pub fn new(inner: &'a dyn GuestRead, warn: WarningSink<'a>) -> Self {
        Self {
            inner,
            warn,
            unit: SECTOR,
            state: Mutex::new(State::default()),
        }
    }

    /// For output written in whole units of `unit` bytes (compressed qcow2 clusters): a sector
    /// whose status fails is taken as data to the end of its unit, as qemu-img widens what it
    /// copies there to a whole cluster (so the next status asked is the next unit's).
    pub fn whole_units(mut self, unit: u64) -> Self {
        self.unit = unit.max(SECTOR);
        self
    }

    /// qemu-img's first walk over the source's block status (it counts the data to copy):
    /// every status failure is reported now. Call it once, before the copy.
    pub fn count_pass(&self) -> Result<()> {
        for extent in chain::extents(self, GuestOffset(0)) {
            extent?;
        }
        let mut state = self.lock();
        state.counted = true;
        state.last_start = None;
        state.deferred.clear();
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Reports the failed status of the sector at `offset`: now during the counting walk,
    /// at its read afterwards.
    fn status_failed(&self, offset: u64, cause: String) {
        let mut state = self.lock();
        if !state.counted {
            drop(state);
            (self.warn)(&SalvageWarning::BlockStatus { offset, cause });
            return;
        }
        if state.deferred.len() >= DEFERRED_MAX {
            state.deferred.pop_front();
        }
        state.deferred.push_back((offset, cause));
    }

    /// The deferred status failures of sectors before `end`, in order, taken out.
    fn take_deferred(&self, end: u64) -> Vec<(u64, String)> {
        let mut state = self.lock();
        let count = state.deferred.iter().take_while(|(o, _)| *o < end).count();
        state.deferred.drain(..count).collect()
    }

    /// Reads `buf` at `offset` one sector at a time, reporting the deferred status failures
    /// of `pending` (ascending) before the read of their sector, and each failed read.
    fn read_by_sector(&self, buf: &mut [u8], offset: u64, pending: Vec<(u64, String)>) {
        let mut pending = pending.into_iter().peekable();
        let end = offset + buf.len() as u64;
        let mut at = offset;
        while at < end {
            let next = ((at / SECTOR + 1) * SECTOR).min(end);
            while let Some((sector, cause)) = pending.next_if(|(o, _)| *o < next) {
                (self.warn)(&SalvageWarning::BlockStatus {
                    offset: sector,
                    cause,
                });
            }
            let piece = &mut buf[(at - offset) as usize..(next - offset) as usize];
            if let Err(e) = self.inner.read_at(piece, GuestOffset(at)) {
                piece.fill(0);
                (self.warn)(&SalvageWarning::Read {
                    offset: at,
                    cause: strerror(&e),
                });
            }
            at = next;
        }
    }
}

impl GuestRead for Salvage<'_> {
    fn virtual_size(&self) -> u64 {
        self.inner.virtual_size()
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_range(offset.0, buf.len(), self.virtual_size())?;
        let end = offset.0 + buf.len() as u64;
        let pending = self.take_deferred(end);
        let whole = self.inner.read_at(buf, offset);
        if whole.is_ok() {
            for (sector, cause) in pending {
                (self.warn)(&SalvageWarning::BlockStatus {
                    offset: sector,
                    cause,
                });
            }
            return Ok(());
        }
        self.read_by_sector(buf, offset.0, pending);
        Ok(())
    }

    fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
        let size = self.virtual_size();
        check_range(start.0, 1, size)?;
        {
            let mut state = self.lock();
            // A walk's starts increase: one that does not begins a new walk, and what the
            // last one left unread belonged to a walk that read nothing.
            if state.last_start.is_some_and(|last| start.0 <= last) {
                state.deferred.clear();
            }
            state.last_start = Some(start.0);
        }
        let limit = start.0 + max_len.min(size - start.0).max(1);
        let cause = match self.probe(start.0, limit) {
            Ok(extent) => return Ok(extent),
            Err(cause) => cause,
        };
        // The sector is read as data, to the end of its unit; so are the failing ones after
        // it (each reported in turn), in one extent, so that the copy sees them together.
        self.status_failed(start.0, cause);
        let unit_end = |at: u64| (at / self.unit + 1).saturating_mul(self.unit).min(limit);
        let mut end = unit_end(start.0);
        while end < limit {
            match self.probe(end, limit) {
                Ok(_) => break,
                Err(cause) => {
                    self.status_failed(end, cause);
                    end = unit_end(end);
                }
            }
        }
        Ok(Extent {
            start,
            len: end - start.0,
            depth: 0,
            kind: ExtentKind::DATA,
            host: None,
        })
    }
}

impl Salvage<'_> {
    /// The status of the range from `at` to `limit` as qemu-img asks it: on failure, again on
    /// a quarter of the range (in sectors), down to one sector; the answer (depth 0, no host
    /// location), or why the status of that one sector cannot be read.
    fn probe(&self, at: u64, limit: u64) -> std::result::Result<Extent, String> {
        let mut len = limit - at;
        loop {
            match chain::block_status(self.inner, GuestOffset(at), len) {
                Ok(extent) => {
                    return Ok(Extent {
                        depth: 0,
                        host: None,
                        ..extent
                    })
                }
                Err(e) => {
                    self.report_corruption(&e);
                    if len <= SECTOR {
                        return Err(strerror(&e));
                    }
                    len = len.div_ceil(SECTOR).div_ceil(4) * SECTOR;
                }
            }
        }
    }
}

impl Salvage<'_> {
    /// Reports `e` if it is the first corrupt entry met (see
    /// [`SalvageWarning::UnalignedCluster`]).
    fn report_corruption(&self, e: &Error) {
        let Some(crate::qcow2::Qcow2Error::UnalignedCluster {
            host,
            l2_offset,
            l2_index,
            ..
        }) = unaligned_cluster(e)
        else {
            return;
        };
        let mut state = self.lock();
        if std::mem::replace(&mut state.corruption_reported, true) {
            return;
        }
        drop(state);
        (self.warn)(&SalvageWarning::UnalignedCluster {
            host: *host,
            l2_offset: *l2_offset,
            l2_index: *l2_index,
        });
    }
}

/// The unaligned data cluster `e` reports, if it does.
fn unaligned_cluster(e: &Error) -> Option<&crate::qcow2::Qcow2Error> {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(Error::Qcow2(q @ crate::qcow2::Qcow2Error::UnalignedCluster { .. })) =
            c.downcast_ref::<Error>()
        {
            return Some(q);
        }
        cause = c.source();
    }
    None
}

/// The errno text qemu would report for `e`: the operating system's own for an I/O error,
/// else EIO's ("Input/output error"), which is what qemu's drivers return for corrupt
/// metadata and undecodable compressed clusters.
fn strerror(e: &Error) -> String {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(c) = cause {
        if let Some(io) = c.downcast_ref::<std::io::Error>() {
            if io.raw_os_error().is_some() {
                let text = io.to_string();
                return match text.find(" (os error ") {
                    Some(at) => text[..at].to_owned(),
                    None => text,
                };
            }
        }
        cause = c.source();
    }
    "Input/output error".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4 KiB disk of bytes 7 whose status fails in sector 2 and whose reads fail in
    /// sectors 2 and 5.
    struct Flaky;

    const BAD_STATUS: u64 = 2 * SECTOR;
    const BAD_READS: [u64; 2] = [2 * SECTOR, 5 * SECTOR];

    impl GuestRead for Flaky {
        fn virtual_size(&self) -> u64 {
            8 * SECTOR
        }
        fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
            let end = offset.0 + buf.len() as u64;
            if BAD_READS.iter().any(|&b| b < end && offset.0 < b + SECTOR) {
                return Err(Error::reading("test data")(
                    std::io::Error::from_raw_os_error(5),
                ));
            }
            buf.fill(7);
            Ok(())
        }
        fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
            let end = start.0 + max_len;
            if start.0 < BAD_STATUS + SECTOR && BAD_STATUS < end {
                return Err(Error::InvalidParameter {
                    name: "test",
                    reason: "status fails here",
                });
            }
            Ok(Extent {
                start,
                len: max_len.min(self.virtual_size() - start.0),
                depth: 0,
                kind: ExtentKind::DATA,
                host: None,
            })
        }
    }

    fn run(count_first: bool) -> (Vec<u8>, Vec<String>) {
        run_in_units(count_first, SECTOR)
    }

    fn run_in_units(count_first: bool, unit: u64) -> (Vec<u8>, Vec<String>) {
        let warnings = Mutex::new(Vec::new());
        let sink = |w: &SalvageWarning| warnings.lock().unwrap().push(w.to_string());
        let salvage = Salvage::new(&Flaky, &sink).whole_units(unit);
        if count_first {
            salvage.count_pass().unwrap();
        }
        let mut disk = vec![0xffu8; Flaky.virtual_size() as usize];
        for extent in chain::extents(&salvage, GuestOffset(0)) {
            let extent = extent.unwrap();
            let range = extent.start.0 as usize..extent.end().0 as usize;
            chain::read_extent(&salvage, &extent, &mut disk[range]).unwrap();
        }
        (disk, warnings.into_inner().unwrap())
    }

    #[test]
    fn unreadable_sectors_become_zeros_with_qemus_warnings_in_order() {
        let (disk, warnings) = run(true);
        for (i, sector) in disk.chunks(SECTOR as usize).enumerate() {
            let expected = if i == 2 || i == 5 { 0 } else { 7 };
            assert!(sector.iter().all(|&b| b == expected), "sector {i}");
        }
        assert_eq!(
            warnings,
            [
                "error while reading block status at offset 1024: Input/output error",
                "error while reading block status at offset 1024: Input/output error",
                "error while reading offset 1024: Input/output error",
                "error while reading offset 2560: Input/output error",
            ]
        );
    }

    #[test]
    fn without_the_counting_walk_status_failures_are_reported_at_once() {
        let (_, warnings) = run(false);
        assert_eq!(
            warnings,
            [
                "error while reading block status at offset 1024: Input/output error",
                "error while reading offset 1024: Input/output error",
                "error while reading offset 2560: Input/output error",
            ]
        );
    }

    #[test]
    fn in_whole_units_a_failed_status_covers_the_rest_of_its_unit() {
        // Units of 4 sectors: the failed status at sector 2 covers sectors 2 and 3, so the
        // next status asked is sector 4's; the reads still fail and warn per sector.
        let (disk, warnings) = run_in_units(true, 4 * SECTOR);
        for (i, sector) in disk.chunks(SECTOR as usize).enumerate() {
            let expected = if i == 2 || i == 5 { 0 } else { 7 };
            assert!(sector.iter().all(|&b| b == expected), "sector {i}");
        }
        assert_eq!(
            warnings,
            [
                "error while reading block status at offset 1024: Input/output error",
                "error while reading block status at offset 1024: Input/output error",
                "error while reading offset 1024: Input/output error",
                "error while reading offset 2560: Input/output error",
            ]
        );
    }
}
