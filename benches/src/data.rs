//! Deterministic pseudo-random bytes and offsets: base images full of data that no filesystem
//! can compress or deduplicate away, and reproducible random I/O offsets.

/// A xorshift64* generator: fast, deterministic, and good enough to defeat compression. Not
/// for anything that needs real randomness.
#[derive(Debug, Clone)]
pub struct XorShift(u64);

impl XorShift {
    /// A generator from `seed` (zero is replaced: xorshift never leaves the all-zero state).
    pub fn new(seed: u64) -> Self {
        Self(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// The next 64 pseudo-random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Fills `buf` with pseudo-random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fill_is_deterministic_and_not_constant() {
        let (mut a, mut b) = (vec![0u8; 1001], vec![0u8; 1001]);
        XorShift::new(7).fill(&mut a);
        XorShift::new(7).fill(&mut b);
        assert_eq!(a, b);
        assert!(a.iter().any(|&x| x != a[0]));
        XorShift::new(8).fill(&mut b);
        assert_ne!(a, b);
    }
}
