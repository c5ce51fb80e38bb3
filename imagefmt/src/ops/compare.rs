//! Comparing the guest-visible content of two images, as `qemu-img compare` does.
//!
//! Images of different sizes compare equal if the longer one reads as zeros past the shorter
//! one's end (unless strict). Only ranges that are not zeros on both sides are read, in fixed-size
//! chunks into page-aligned buffers, on a few worker threads: memory stays constant.

use crate::chain;
use crate::extent::Extent;
use crate::extent::GuestRead;
use crate::offsets::GuestOffset;
use crate::ops::convert;
use crate::Result;

/// Bytes compared per step.
pub const CHUNK: usize = 1 << 20;

/// The outcome of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Comparison {
    /// Same guest content.
    Identical,
    /// The first guest offset whose byte differs.
    ContentMismatch {
        /// Offset of the first differing byte.
        offset: u64,
    },
    /// Strict mode only: the sizes differ.
    SizeMismatch {
        /// Size of the first image.
        first: u64,
        /// Size of the second image.
        second: u64,
    },
}

/// Compares `a` and `b`. With `strict`, different sizes are a mismatch.
///
/// Both chains are walked by their extents: a range both sides report as zeros or unallocated
/// is skipped without reading; the rest is read (data straight from its file) and compared in
/// [`CHUNK`] steps. Past the shorter image's end, the longer one's data ranges must read as
/// zeros.
pub fn compare(a: &dyn GuestRead, b: &dyn GuestRead, strict: bool) -> Result<Comparison> {
    let (size_a, size_b) = (a.virtual_size(), b.virtual_size());
    if strict && size_a != size_b {
        return Ok(Comparison::SizeMismatch {
            first: size_a,
            second: size_b,
        });
    }
    let common = size_a.min(size_b);
    if let Some(offset) = first_difference(a, b, common)? {
        return Ok(Comparison::ContentMismatch { offset });
    }
    let offset = common;
    let mut buf_a = vec![0u8; CHUNK];
    // The longer image must read as zeros past the common part.
    let longer = if size_a > size_b { a } else { b };
    for extent in chain::extents(longer, GuestOffset(offset)) {
        let extent = extent?;
        if extent.reads_as_zeros() {
            continue;
        }
        let mut piece = Some(extent);
        while let Some(current) = piece {
            let (head, rest) = current.split_at(current.start.0 + CHUNK as u64);
            let len = head.len as usize;
            chain::read_extent(longer, &head, &mut buf_a[..len])?;
            if convert::is_zero(&buf_a[..len]) {
                piece = rest;
                continue;
            }
            if let Some(i) = buf_a[..len].iter().position(|&x| x != 0) {
                return Ok(Comparison::ContentMismatch {
                    offset: head.start.0 + i as u64,
                });
            }
            piece = rest;
        }
    }
    Ok(Comparison::Identical)
}

/// Worker threads of [`first_difference`] (each holds two [`CHUNK`] buffers).
const WORKERS: usize = 2;

/// The first guest offset below `common` where `a` and `b` differ. Ranges that are not zeros on
/// both sides are handed out in guest order, up to [`CHUNK`] at a time, to [`WORKERS`] threads
/// that read both sides and compare. Once a difference is found no further ranges are handed
/// out; ranges already taken lie before it or are finished, so the lowest difference found is
/// the first one.
fn first_difference(a: &dyn GuestRead, b: &dyn GuestRead, common: u64) -> Result<Option<u64>> {
    use std::sync::Mutex;
    /// Shared between the workers: the next offset to plan from, and the findings.
    struct Shared {
        next: u64,
        found: Option<u64>,
        /// The first error met, with the offset of the range it came from.
        error: Option<(u64, crate::Error)>,
    }
    let shared = Mutex::new(Shared {
        next: 0,
        found: None,
        error: None,
    });
    let lock = || shared.lock().unwrap_or_else(|e| e.into_inner());
    // The next range both sides do not report as zeros, with its extents on each side.
    let plan =
        |state: &mut Shared| -> std::result::Result<Option<(Extent, Extent)>, (u64, crate::Error)> {
            let at_next = |state: &Shared, e| (state.next, e);
            while state.next < common && state.found.is_none() && state.error.is_none() {
                let at = GuestOffset(state.next);
                let ea = chain::block_status(a, at, (common - state.next).min(CHUNK as u64))
                    .map_err(|e| at_next(state, e))?;
                let eb = chain::block_status(b, at, ea.len).map_err(|e| at_next(state, e))?;
                let (ea, _) = ea.split_at(eb.end().0);
                state.next += ea.len;
                if !(ea.reads_as_zeros() && eb.reads_as_zeros()) {
                    return Ok(Some((ea, eb)));
                }
            }
            Ok(None)
        };
    let work = || -> std::result::Result<(), (u64, crate::Error)> {
        let (mut store_a, mut store_b) = (Vec::new(), Vec::new());
        let at_a = super::aligned_window(&mut store_a, CHUNK);
        let at_b = super::aligned_window(&mut store_b, CHUNK);
        let buf_a = &mut store_a[at_a..at_a + CHUNK];
        let buf_b = &mut store_b[at_b..at_b + CHUNK];
        loop {
            let planned = plan(&mut lock());
            let Some((ea, eb)) = planned? else {
                return Ok(());
            };
            let len = ea.len as usize;
            let read = chain::read_extent(a, &ea, &mut buf_a[..len])
                .and_then(|()| chain::read_extent(b, &eb, &mut buf_b[..len]));
            read.map_err(|e| (ea.start.0, e))?;
            if buf_a[..len] == buf_b[..len] {
                continue;
            }
            if let Some(i) = buf_a[..len]
                .iter()
                .zip(&buf_b[..len])
                .position(|(x, y)| x != y)
            {
                let offset = ea.start.0 + i as u64;
                let mut state = lock();
                state.found = Some(state.found.map_or(offset, |f| f.min(offset)));
            }
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..WORKERS {
            scope.spawn(|| {
                if let Err((at, e)) = work() {
                    let mut state = lock();
                    if state.error.as_ref().is_none_or(|(first, _)| at < *first) {
                        state.error = Some((at, e));
                    }
                }
            });
        }
    });
    let state = shared.into_inner().unwrap_or_else(|e| e.into_inner());
    // Whichever comes first in guest order, as a serial comparison would meet it.
    match (state.error, state.found) {
        (Some((at, e)), found) if found.is_none_or(|f| at <= f) => Err(e),
        (_, found) => Ok(found),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemBackend;
    use crate::raw::RawReader;

    fn raw(bytes: Vec<u8>) -> RawReader<MemBackend> {
        RawReader::new(MemBackend::new(bytes)).unwrap()
    }

    #[test]
    fn finds_the_first_difference_even_past_a_chunk_boundary() {
        let mut b = vec![7u8; CHUNK + 10];
        let a = b.clone();
        assert_eq!(
            compare(&raw(a.clone()), &raw(b.clone()), false).unwrap(),
            Comparison::Identical
        );
        b[CHUNK + 3] = 8;
        assert_eq!(
            compare(&raw(a), &raw(b), false).unwrap(),
            Comparison::ContentMismatch {
                offset: CHUNK as u64 + 3
            }
        );
    }

    #[test]
    fn a_longer_image_matches_only_if_its_tail_is_zero_and_never_in_strict_mode() {
        let short = vec![1u8; 512];
        let mut long = short.clone();
        long.resize(1536, 0);
        assert_eq!(
            compare(&raw(short.clone()), &raw(long.clone()), false).unwrap(),
            Comparison::Identical
        );
        assert_eq!(
            compare(&raw(short.clone()), &raw(long.clone()), true).unwrap(),
            Comparison::SizeMismatch {
                first: 512,
                second: 1536
            }
        );
        long[1000] = 9;
        assert_eq!(
            compare(&raw(long), &raw(short), false).unwrap(),
            Comparison::ContentMismatch { offset: 1000 }
        );
    }
}
