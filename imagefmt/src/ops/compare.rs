//! Comparing the guest-visible content of two images, as `qemu-img compare` does.
//!
//! Images of different sizes compare equal if the longer one reads as zeros past the shorter
//! one's end (unless strict). Only ranges that are not zeros on both sides are read, in fixed-size
//! chunks: memory stays constant.

use crate::chain::{self, GuestRead};
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
    let mut buf_a = vec![0u8; CHUNK];
    let mut buf_b = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < common {
        let ea = chain::block_status(a, GuestOffset(offset), (common - offset).min(CHUNK as u64))?;
        let eb = chain::block_status(b, GuestOffset(offset), ea.len)?;
        let (ea, _) = ea.split_at(eb.end().0);
        let len = ea.len as usize;
        if !(ea.reads_as_zeros() && eb.reads_as_zeros()) {
            chain::read_extent(a, &ea, &mut buf_a[..len])?;
            chain::read_extent(b, &eb, &mut buf_b[..len])?;
            if buf_a[..len] == buf_b[..len] {
                offset += len as u64;
                continue;
            }
            if let Some(i) = buf_a[..len]
                .iter()
                .zip(&buf_b[..len])
                .position(|(x, y)| x != y)
            {
                return Ok(Comparison::ContentMismatch {
                    offset: offset + i as u64,
                });
            }
        }
        offset += len as u64;
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chain::RawReader;
    use crate::io::MemBackend;

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
