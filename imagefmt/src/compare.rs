//! Comparing the guest-visible content of two images, as `qemu-img compare` does.
//!
//! Images of different sizes compare equal if the longer one reads as zeros past the shorter
//! one's end (unless strict). The comparison streams in fixed-size chunks: memory stays constant.

use crate::chain::GuestRead;
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

/// Compares `a` and `b` chunk by chunk. With `strict`, different sizes are a mismatch.
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
        let len = (common - offset).min(CHUNK as u64) as usize;
        a.read_at(&mut buf_a[..len], offset)?;
        b.read_at(&mut buf_b[..len], offset)?;
        if let Some(i) = buf_a[..len]
            .iter()
            .zip(&buf_b[..len])
            .position(|(x, y)| x != y)
        {
            return Ok(Comparison::ContentMismatch {
                offset: offset + i as u64,
            });
        }
        offset += len as u64;
    }
    // The longer image must read as zeros past the common part.
    let longer = if size_a > size_b { a } else { b };
    let end = size_a.max(size_b);
    while offset < end {
        let len = (end - offset).min(CHUNK as u64) as usize;
        longer.read_at(&mut buf_a[..len], offset)?;
        if let Some(i) = buf_a[..len].iter().position(|&x| x != 0) {
            return Ok(Comparison::ContentMismatch {
                offset: offset + i as u64,
            });
        }
        offset += len as u64;
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
