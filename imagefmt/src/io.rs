//! The positioned-I/O seam every format reads and writes through.
//!
//! Formats never seek: they read and write at explicit offsets, like
//! [`std::os::unix::fs::FileExt`], so one handle can be shared and the same code runs on a real
//! file ([`std::fs::File`]) or on memory ([`MemBackend`]) in tests, fuzzers and benches.

use std::fs::File;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Positioned, synchronous byte storage under an image.
///
/// Method names follow [`std::os::unix::fs::FileExt`] so that the [`File`] implementation is a
/// one-line forward.
pub trait Backend {
    /// Fills `buf` from `offset`; reading past the end is an [`io::ErrorKind::UnexpectedEof`].
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, extending the storage if needed.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Truncates or extends (with zeros, sparsely where the storage can) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes written data durable (fsync for files; nothing for memory).
    fn sync_all(&self) -> io::Result<()>;

    /// True when the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }

    /// Reads up to `buf.len()` bytes at `offset`, stopping at the end of the storage, and
    /// returns how many were read. Used to read "the first N bytes, if there are that many".
    fn read_prefix_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let len = self.len()?;
        let available = len.saturating_sub(offset).min(buf.len() as u64) as usize;
        self.read_exact_at(&mut buf[..available], offset)?;
        Ok(available)
    }

    /// The open file behind this storage, if it is one (for `SEEK_DATA`/`SEEK_HOLE` and
    /// `copy_file_range`); `None` for memory.
    fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
}

impl Backend for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        FileExt::write_all_at(self, buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }
    fn sync_all(&self) -> io::Result<()> {
        File::sync_all(self)
    }
    fn read_prefix_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        // Read until full or end of file: no fstat needed.
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }
    fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(AsFd::as_fd(self))
    }
}

impl<B: Backend + ?Sized> Backend for &B {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        (**self).write_all_at(buf, offset)
    }
    fn len(&self) -> io::Result<u64> {
        (**self).len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        (**self).set_len(len)
    }
    fn sync_all(&self) -> io::Result<()> {
        (**self).sync_all()
    }
    fn read_prefix_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        (**self).read_prefix_at(buf, offset)
    }
    fn as_fd(&self) -> Option<BorrowedFd<'_>> {
        (**self).as_fd()
    }
}

/// A read-only memory mapping of a byte range of an image file, its pages populated when it
/// is made: what readers use instead of copying data into a buffer with `pread`.
///
/// A file truncated underneath a mapping makes reads of the lost pages raise SIGBUS, so only
/// files held under qemu's image locks are mapped (a reader's locks do not share resize: no
/// qemu or cowclone process may shrink the file while they are held), and only ranges that lie
/// inside the file when mapped. Callers keep a `pread` path for everything else.
pub(crate) struct MappedRange {
    map: memmap2::Mmap,
}

impl MappedRange {
    /// Maps `len` bytes of `file` from `offset` and populates the mapping's pages (so the
    /// thread that maps takes the page faults, not the one that uses the bytes). `Ok(None)`
    /// when the range does not lie wholly inside the file (the caller reads it the usual way).
    ///
    /// The caller must hold `file` under the image lock for as long as the mapping lives.
    #[allow(unsafe_code)]
    pub(crate) fn new(file: BorrowedFd<'_>, offset: u64, len: usize) -> io::Result<Option<Self>> {
        let size = rustix::fs::fstat(file)?.st_size as u64;
        if len == 0 || offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Ok(None);
        }
        // SAFETY: memmap2 requires that the mapped part of the file is not truncated (SIGBUS)
        // nor modified (the slice would change underneath) while the mapping lives. The range
        // lies inside the file now (checked above), and the caller holds the file under
        // qemu's image locks, which keep every cooperating writer (qemu, cowclone) from
        // writing or resizing it until the lock is released, after this mapping is dropped.
        let map = unsafe {
            memmap2::MmapOptions::new()
                .offset(offset)
                .len(len)
                .map(file.as_raw_fd())?
        };
        // Best effort: kernels before 5.14 lack MADV_POPULATE_READ; then the pages fault in
        // as they are used.
        let _ = map.advise(memmap2::Advice::PopulateRead);
        Ok(Some(Self { map }))
    }

    /// The mapped bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.map
    }
}

/// Largest piece of zeros [`write_zeros`] writes at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// Writes `len` zero bytes at `offset` of `backend`, in pieces of at most 1 MiB; an error names
/// `what` was being written.
pub(crate) fn write_zeros<B: Backend + ?Sized>(
    backend: &B,
    offset: u64,
    len: u64,
    what: &'static str,
) -> crate::Result<()> {
    let zeros = vec![0u8; len.min(ZERO_CHUNK) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(ZERO_CHUNK);
        backend
            .write_all_at(&zeros[..n as usize], offset + done)
            .map_err(crate::Error::writing(what))?;
        done += n;
    }
    Ok(())
}

/// Makes `len` bytes at `offset` of `backend` read as zeros: a hole punched where the file
/// system can (a backend with a file descriptor), else zeros written ([`write_zeros`]).
pub(crate) fn zero_range<B: Backend + ?Sized>(
    backend: &B,
    offset: u64,
    len: u64,
    what: &'static str,
) -> crate::Result<()> {
    use rustix::fs::FallocateFlags;
    if let Some(fd) = backend.as_fd() {
        let flags = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        if rustix::fs::fallocate(fd, flags, offset, len).is_ok() {
            return Ok(());
        }
    }
    write_zeros(backend, offset, len, what)
}

/// Starts writing `file`'s dirty pages back to its disk (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`, the whole file) without waiting for them, so that a later fsync
/// waits only for what is still in flight rather than for everything written. Best effort:
/// an error here is ignored, the fsync that must follow reports any.
#[allow(unsafe_code)]
pub(crate) fn start_writeback(file: BorrowedFd<'_>) {
    // SAFETY: sync_file_range takes a descriptor and three integers and touches no memory of
    // ours; the descriptor is borrowed, so it stays open for the duration of the call.
    let _ = unsafe { libc::sync_file_range(file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE) };
}

/// An in-memory [`Backend`] for tests, fuzzing and benches.
///
/// Growth is bounded by `limit` so that a hostile image cannot make a writer allocate without
/// end; the default limit is 1 GiB.
#[derive(Debug)]
pub struct MemBackend {
    bytes: Mutex<Vec<u8>>,
    limit: u64,
}

impl Default for MemBackend {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl MemBackend {
    /// Default growth limit: 1 GiB.
    pub const DEFAULT_LIMIT: u64 = 1 << 30;

    /// Wraps existing bytes (e.g. a fuzz input or a fixture).
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            bytes: Mutex::new(bytes),
            limit: Self::DEFAULT_LIMIT,
        }
    }

    /// Sets the largest size the storage may grow to.
    pub fn with_limit(mut self, limit: u64) -> Self {
        self.limit = limit;
        self
    }

    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().clone()
    }

    /// Consumes the backend and returns its bytes.
    pub fn into_inner(self) -> Vec<u8> {
        self.bytes.into_inner().unwrap_or_else(|e| e.into_inner())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        // A panic while holding the lock cannot leave the Vec invalid: keep going.
        self.bytes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn check_limit(&self, end: u64) -> io::Result<usize> {
        if end > self.limit {
            return Err(io::Error::new(
                io::ErrorKind::OutOfMemory,
                format!(
                    "in-memory image would grow to {end} bytes, over its limit of {}",
                    self.limit
                ),
            ));
        }
        usize::try_from(end).map_err(|_| io::Error::from(io::ErrorKind::OutOfMemory))
    }
}

impl Backend for MemBackend {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let bytes = self.lock();
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let end = start
            .checked_add(buf.len())
            .filter(|&end| end <= bytes.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(&bytes[start..end]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let end = self.check_limit(end)?;
        let mut bytes = self.lock();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = self.check_limit(len)?;
        self.lock().resize(len, 0);
        Ok(())
    }

    fn sync_all(&self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_backend_reads_what_was_written_and_zero_fills_gaps() {
        let mem = MemBackend::default();
        mem.write_all_at(b"abc", 5).unwrap();
        assert_eq!(mem.len().unwrap(), 8);
        let mut buf = [0xffu8; 8];
        mem.read_exact_at(&mut buf, 0).unwrap();
        assert_eq!(&buf, b"\0\0\0\0\0abc");
    }

    #[test]
    fn file_prefix_reads_stop_at_the_end_of_the_file() {
        let path = std::env::temp_dir().join(format!("cowclone-io-{}", std::process::id()));
        std::fs::write(&path, b"0123456789").unwrap();
        let file = File::open(&path).unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(Backend::read_prefix_at(&file, &mut buf, 4).unwrap(), 6);
        assert_eq!(&buf[..6], b"456789");
        assert_eq!(Backend::read_prefix_at(&file, &mut buf, 20).unwrap(), 0);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn mem_backend_refuses_reads_past_the_end_and_growth_past_the_limit() {
        let mem = MemBackend::new(vec![1, 2, 3]).with_limit(16);
        let mut buf = [0u8; 4];
        assert_eq!(
            mem.read_exact_at(&mut buf, 0).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(mem.read_prefix_at(&mut buf, 1).unwrap(), 2);
        assert!(mem.set_len(17).is_err());
        assert!(mem.write_all_at(&[0; 8], u64::MAX - 2).is_err());
    }
}
