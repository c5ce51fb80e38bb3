//! Several source images read as one disk, one after the other (`qemu-img convert A B C OUT`):
//! the disk is as large as the sources together, and each source's extents appear shifted by
//! the sizes of the sources before it.
//!
//! ```text
//! guest 0 ─ A (size a) ─ a ─ B (size b) ─ a+b ─ C ─ a+b+c
//! block_status(x) = chain::block_status(part holding x, x − its start), shifted back
//! ```
//!
//! Each part is a whole chain: its own answers are already merged through its backing files
//! ([`chain::block_status`]), so the concatenation is one layer with nothing below it. Its
//! extents carry no host location (their bytes are read through the part, not by offset).

use std::path::Path;

use crate::chain;
use crate::extent::{check_range, Extent, GuestRead};
use crate::offsets::GuestOffset;
use crate::{Error, Result};

/// Source images read one after the other as one disk.
pub struct Concat {
    parts: Vec<Box<dyn GuestRead>>,
    /// The guest offset where each part starts (ascending; parts of size 0 included).
    starts: Vec<u64>,
    size: u64,
}

impl Concat {
    /// The disk of `parts` one after the other (at least one).
    pub fn new(parts: Vec<Box<dyn GuestRead>>) -> Result<Self> {
        if parts.is_empty() {
            return Err(Error::InvalidParameter {
                name: "sources",
                reason: "at least one source image is needed",
            });
        }
        let mut starts = Vec::with_capacity(parts.len());
        let mut size = 0u64;
        for part in &parts {
            starts.push(size);
            size = size
                .checked_add(part.virtual_size())
                .ok_or(Error::InvalidParameter {
                    name: "sources",
                    reason: "the source images together are larger than 2^64 bytes",
                })?;
        }
        Ok(Self {
            parts,
            starts,
            size,
        })
    }

    /// The part holding guest `offset` (inside the disk) and where it starts.
    fn part_at(&self, offset: u64) -> (&dyn GuestRead, u64) {
        // The last part starting at or before `offset` that is not empty there.
        let index = self.starts.partition_point(|&s| s <= offset) - 1;
        let mut index = index;
        while self.parts[index].virtual_size() == 0 || offset >= self.end_of(index) {
            index += 1;
        }
        (self.parts[index].as_ref(), self.starts[index])
    }

    fn end_of(&self, index: usize) -> u64 {
        self.starts[index] + self.parts[index].virtual_size()
    }

    /// An error of `part`, naming its file.
    fn in_part(part: &dyn GuestRead, error: Error) -> Error {
        match part.path() {
            Some(path) => error.in_file("source image", path),
            None => error,
        }
    }
}

impl GuestRead for Concat {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_range(offset.0, buf.len(), self.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset.0 + done as u64;
            let (part, start) = self.part_at(at);
            let inside = at - start;
            let len = (part.virtual_size() - inside).min((buf.len() - done) as u64) as usize;
            part.read_at(&mut buf[done..done + len], GuestOffset(inside))
                .map_err(|e| Self::in_part(part, e))?;
            done += len;
        }
        Ok(())
    }

    fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
        check_range(start.0, 1, self.size)?;
        let (part, part_start) = self.part_at(start.0);
        let inside = start.0 - part_start;
        let len = max_len.min(part.virtual_size() - inside).max(1);
        let extent = chain::block_status(part, GuestOffset(inside), len)
            .map_err(|e| Self::in_part(part, e))?;
        Ok(Extent {
            start,
            len: extent.len,
            depth: 0,
            kind: extent.kind,
            host: None,
        })
    }

    fn path(&self) -> Option<&Path> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::ExtentKind;

    /// A disk of `size` bytes that all read as `byte` (data) or, for 0, unallocated.
    struct Filled {
        size: u64,
        byte: u8,
    }

    impl GuestRead for Filled {
        fn virtual_size(&self) -> u64 {
            self.size
        }
        fn read_at(&self, buf: &mut [u8], _: GuestOffset) -> Result<()> {
            buf.fill(self.byte);
            Ok(())
        }
        fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
            let kind = if self.byte == 0 {
                ExtentKind::Unallocated
            } else {
                ExtentKind::DATA
            };
            Ok(Extent {
                start,
                len: max_len.min(self.size - start.0),
                depth: 0,
                kind,
                host: None,
            })
        }
    }

    #[test]
    fn parts_follow_each_other() {
        let concat = Concat::new(vec![
            Box::new(Filled { size: 3, byte: 1 }),
            Box::new(Filled { size: 0, byte: 9 }),
            Box::new(Filled { size: 2, byte: 0 }),
            Box::new(Filled { size: 4, byte: 7 }),
        ])
        .unwrap();
        assert_eq!(concat.virtual_size(), 9);
        let mut buf = [0xffu8; 9];
        concat.read_at(&mut buf, GuestOffset(0)).unwrap();
        assert_eq!(buf, [1, 1, 1, 0, 0, 7, 7, 7, 7]);
        let extents: Vec<(u64, u64, bool)> = chain::extents(&concat, GuestOffset(0))
            .map(|e| e.unwrap())
            .map(|e| (e.start.0, e.len, e.is_data()))
            .collect();
        assert_eq!(extents, [(0, 3, true), (3, 2, false), (5, 4, true)]);
        let mut middle = [0u8; 4];
        concat.read_at(&mut middle, GuestOffset(2)).unwrap();
        assert_eq!(middle, [1, 0, 0, 7]);
    }
}
