//! An open qcow2 image: reading guest data (L1 → L2 → cluster, falling through to the image
//! below for unallocated clusters). Writing lives in [`super::write`] and host-cluster
//! allocation in `super::allocator`, as further `impl` blocks of [`Qcow2Image`].
//!
//! Every offset taken from the file is checked before use (alignment, inside the file); what
//! qemu reports as corruption at run time is an error here, never a panic. Memory is bounded: the
//! L1 table (≤ 32 MiB, and only if the file really holds it) and an L2 cache of at most
//! [`L2_CACHE_BYTES`].

use std::os::fd::BorrowedFd;
use std::sync::{Arc, Mutex, OnceLock};

use byteorder::{BigEndian, ByteOrder};

use super::error::Qcow2Error;
use super::features::IncompatibleFeatures;
use super::header::{Header, Version};
use super::header_cluster::HeaderCluster;
use super::tables::{EntryFormat, L1Entry, L2Entry, Subcluster};
use crate::extent::{
    check_range, read_below, Extent, ExtentKind, GuestRead, HostFile, HostLocation,
};
use crate::io::Backend;
use crate::offsets::{GuestOffset, HostOffset};
use crate::{Error, Result};

/// Most compressed clusters read (their host span fetched with one `pread`) at once.
pub(crate) const COMPRESSED_BATCH: usize = 32;
/// A batch of compressed clusters stops growing once it holds this many compressed bytes, so
/// its span stays below this plus two descriptors and a cluster (≤ 7 MiB with 2 MiB clusters).
pub(crate) const COMPRESSED_BATCH_BYTES: u64 = 1 << 20;

/// Upper bound on cached L2 tables, in bytes.
pub const L2_CACHE_BYTES: u64 = 8 << 20;

/// A qcow2 image opened for reading guest data.
pub struct Qcow2Image<B> {
    pub(super) backend: B,
    pub(super) header: Header,
    pub(super) l1: Vec<u64>,
    pub(super) file_len: u64,
    pub(super) l2_cache: Mutex<Vec<(u64, Arc<[u8]>)>>,
    pub(super) l2_cache_len: usize,
    pub(super) below: Option<Box<dyn GuestRead>>,
    /// Present when the image is open for writing.
    pub(super) writer: Option<super::allocator::WriteState>,
    /// The external data file, when the image has one and the caller allowed opening it.
    pub(super) data_file: Option<Box<dyn Backend + Send + Sync>>,
    /// qemu's `metadata_preallocation`, detected on the first block status query.
    pub(super) metadata_preallocation: OnceLock<bool>,
    /// Persistent bitmaps that record writes (open for writing only; see [`super::bitmap`]).
    pub(super) tracked_bitmaps: Vec<super::bitmap::BitmapEntry>,
    /// Whether the bitmap directory lists any bitmap (tracking or not): read by `open_rw`
    /// and kept up to date by the bitmap operations; false for an image open for reading.
    pub(super) has_bitmaps: bool,
    /// The internal snapshot table, read once at open (see [`super::snapshot_ops`]).
    pub(super) snapshots: super::snapshot::SnapshotTable,
}

impl<B> std::fmt::Debug for Qcow2Image<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("header", &self.header)
            .field("has_backing", &self.below.is_some())
            .finish_non_exhaustive()
    }
}

impl<B: Backend> Qcow2Image<B> {
    /// Opens the image whose cluster 0 is `cluster` on `backend`, reading through to `below` for
    /// unallocated clusters (zeros if `None`). External data files and encryption are refused.
    pub fn open(
        backend: B,
        cluster: HeaderCluster,
        below: Option<Box<dyn GuestRead>>,
    ) -> Result<Self> {
        let header = cluster.header.clone();
        if header
            .incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
        {
            return Err(Qcow2Error::ExternalDataFileRefused {
                name: cluster.data_file().unwrap_or_default().to_owned(),
            }
            .into());
        }
        if header.crypt_method != 0 {
            return Err(Qcow2Error::EncryptionNotSupported {
                method: header.crypt_method,
            }
            .into());
        }
        let file_len = backend.len().map_err(Error::reading("qcow2 file length"))?;
        let snapshots = super::snapshot_ops::read_snapshots(&backend, &header)?;
        let l1_bytes = u64::from(header.l1_size) * 8; // ≤ 32 MiB (validated)
        let mut raw = vec![0u8; 0];
        if l1_bytes > 0 {
            check_inside("L1 table", header.l1_table_offset, l1_bytes, file_len)?;
            raw = vec![0u8; l1_bytes as usize];
            backend
                .read_exact_at(&mut raw, header.l1_table_offset)
                .map_err(Error::reading("qcow2 L1 table"))?;
        }
        let l1 = raw.chunks_exact(8).map(BigEndian::read_u64).collect();
        let l2_cache_len = (L2_CACHE_BYTES / header.cluster_size()).max(1) as usize;
        Ok(Self {
            backend,
            header,
            l1,
            file_len,
            l2_cache: Mutex::new(Vec::new()),
            l2_cache_len,
            below,
            writer: None,
            data_file: None,
            metadata_preallocation: OnceLock::new(),
            tracked_bitmaps: Vec::new(),
            has_bitmaps: false,
            snapshots,
        })
    }

    /// Opens an image that keeps its guest data in an external data file (incompatible bit 2),
    /// reading data clusters from `data_file`. The caller decides whether that file may be
    /// opened at all: its name in the header is untrusted and can name any host file.
    pub(crate) fn open_with_data_file(
        backend: B,
        cluster: HeaderCluster,
        below: Option<Box<dyn GuestRead>>,
        data_file: Box<dyn Backend + Send + Sync>,
    ) -> Result<Self> {
        let mut image = Self::open_without_data_file(backend, cluster, below)?;
        image.data_file = Some(data_file);
        Ok(image)
    }

    /// Opens an image whose guest data lives in an external data file without that file: its
    /// metadata only. Reading a data cluster then fails, and so does writing one
    /// (`Qcow2Image::write_data`): for operations on tables alone (`amend` of the refcount
    /// width).
    pub(crate) fn open_without_data_file(
        backend: B,
        mut cluster: HeaderCluster,
        below: Option<Box<dyn GuestRead>>,
    ) -> Result<Self> {
        let bit = cluster
            .header
            .incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
        cluster.header.incompatible_features -= IncompatibleFeatures::EXTERNAL_DATA_FILE;
        let mut image = Self::open(backend, cluster, below)?;
        image
            .header
            .incompatible_features
            .set(IncompatibleFeatures::EXTERNAL_DATA_FILE, bit);
        Ok(image)
    }

    /// The image's header.
    pub fn header(&self) -> &Header {
        &self.header
    }

    /// The storage under the image (e.g. to take the bytes of an in-memory image).
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The L2 table that L1 entry `l1_index` points at (its host offset) with its entries
    /// decoded, or `None` if the entry is unallocated.
    pub(super) fn l2_entries_of(&self, l1_index: usize) -> Result<Option<(u64, Vec<L2Entry>)>> {
        let Some(table) = L1Entry(self.l1[l1_index]).l2_offset() else {
            return Ok(None);
        };
        let format = self.entry_format();
        let guest_base = l1_index as u64 * self.header.l2_entries() * self.header.cluster_size();
        let bytes = self.l2_table(table, guest_base, self.l1[l1_index])?;
        let entries = (0..format.l2_entries() as usize)
            .map(|i| L2Entry::from_table(&bytes, i, format))
            .collect();
        Ok(Some((table, entries)))
    }

    /// The L2 table at `offset`, from the cache or the file.
    pub(super) fn l2_table(&self, offset: u64, guest_offset: u64, entry: u64) -> Result<Arc<[u8]>> {
        let cluster_size = self.header.cluster_size();
        if offset % cluster_size != 0 {
            return Err(corrupt("unaligned L2 table offset", guest_offset, entry));
        }
        let mut cache = self.l2_cache.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(i) = cache.iter().position(|(o, _)| *o == offset) {
            let hit = cache.remove(i);
            let table = hit.1.clone();
            cache.insert(0, hit);
            return Ok(table);
        }
        check_inside("L2 table", offset, cluster_size, self.file_len)?;
        let mut table = vec![0u8; cluster_size as usize];
        self.backend
            .read_exact_at(&mut table, offset)
            .map_err(Error::reading("qcow2 L2 table"))?;
        let table: Arc<[u8]> = table.into();
        cache.insert(0, (offset, table.clone()));
        cache.truncate(self.l2_cache_len);
        Ok(table)
    }

    /// How this image's L2 entries decode.
    pub(super) fn entry_format(&self) -> EntryFormat {
        EntryFormat {
            cluster_bits: self.header.cluster_bits,
            extended: self.header.extended_l2(),
            data_file: self
                .header
                .incompatible_features
                .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE),
        }
    }

    /// The L2 table covering guest `at` and its host offset (`None` if its L1 entry is
    /// unallocated or absent).
    fn l2_table_for(&self, at: GuestOffset) -> Result<Option<(u64, Arc<[u8]>)>> {
        let per_table = self.entry_format().l2_entries();
        let l1_index = at.cluster(self.header.cluster_bits).l1_index(per_table);
        let Some(&l1_raw) = usize::try_from(l1_index).ok().and_then(|i| self.l1.get(i)) else {
            return Ok(None);
        };
        let Some(l2_offset) = L1Entry(l1_raw).l2_offset() else {
            return Ok(None);
        };
        self.l2_table(l2_offset, at.0, l1_raw)
            .map(|table| Some((l2_offset, table)))
    }

    /// Looks up the L2 entry for guest `offset` (`None` if its L1 entry is unallocated).
    pub(super) fn l2_entry(&self, offset: u64) -> Result<Option<L2Entry>> {
        let at = GuestOffset(offset);
        let format = self.entry_format();
        let index = at
            .cluster(format.cluster_bits)
            .l2_index(format.l2_entries());
        Ok(self
            .l2_table_for(at)?
            .map(|(_, table)| L2Entry::from_table(&table, index, format)))
    }

    /// The status of the (sub)cluster holding `at`, up to the end of that unit, from `table`
    /// (the L2 table at host offset `l2_offset`).
    fn unit_status(
        &self,
        table: &[u8],
        l2_offset: u64,
        at: GuestOffset,
    ) -> Result<(ExtentKind, Option<HostLocation>, u64)> {
        let format = self.entry_format();
        let cluster_bits = format.cluster_bits;
        let unit_size = 1u64 << format.unit_bits();
        let len = unit_size - (at.0 & (unit_size - 1));
        let l2_index = at.cluster(cluster_bits).l2_index(format.l2_entries());
        let entry = L2Entry::from_table(table, l2_index, format);
        let sub = (at.in_cluster_offset(cluster_bits) >> format.unit_bits()) as u32;
        let kind = entry
            .subcluster(sub, format)
            .map_err(|_| corrupt("invalid subcluster allocation bitmap", at.0, entry.entry))?;
        let file = if format.data_file {
            HostFile::DataFile
        } else {
            HostFile::Image
        };
        let located = |host: HostOffset| -> Result<Option<HostLocation>> {
            if !host.is_aligned(1 << cluster_bits) {
                return Err(Qcow2Error::UnalignedCluster {
                    guest_offset: at.0,
                    entry: entry.entry,
                    host: host.0,
                    l2_offset,
                    l2_index: l2_index as u64,
                }
                .into());
            }
            let offset = host
                .checked_add(at.in_cluster_offset(cluster_bits))
                .ok_or_else(|| corrupt("cluster allocation offset unaligned", at.0, entry.entry))?;
            Ok(Some(HostLocation { file, offset }))
        };
        let zero_in_v2 = matches!(kind, Subcluster::ZeroPlain | Subcluster::ZeroAlloc { .. })
            && self.header.version == Version::V2;
        if zero_in_v2 {
            return Err(corrupt(
                "zero cluster entry in a version 2 image",
                at.0,
                entry.entry,
            ));
        }
        Ok(match kind {
            Subcluster::Normal { host } => (ExtentKind::DATA, located(host)?, len),
            Subcluster::Compressed { .. } if format.data_file => {
                return Err(corrupt(
                    "compressed cluster in an image with an external data file",
                    at.0,
                    entry.entry,
                ))
            }
            Subcluster::Compressed { .. } => (
                ExtentKind::Data {
                    compressed: true,
                    zero: false,
                },
                None,
                len,
            ),
            Subcluster::ZeroPlain => (ExtentKind::Zero, None, len),
            Subcluster::ZeroAlloc { host } => (ExtentKind::Zero, located(host)?, len),
            Subcluster::UnallocatedPlain => (ExtentKind::Unallocated, None, len),
            Subcluster::UnallocatedAlloc { host } => (ExtentKind::Unallocated, located(host)?, len),
        })
    }

    /// qemu's `qcow2_co_block_status`: this image's own status of the range at `start`, at most
    /// `max_len` bytes and never past the current L2 table. Consecutive (sub)clusters with the
    /// same status (and contiguous host offsets) are answered at once.
    fn layer_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
        check_range(start.0, 1, self.header.size)?;
        let format = self.entry_format();
        let table_span = format.l2_entries() << format.cluster_bits;
        let to_table_end = table_span - (start.0 % table_span);
        let limit = max_len
            .min(self.header.size - start.0)
            .min(to_table_end)
            .max(1);
        let end = GuestOffset(start.0 + limit);
        let Some((l2_offset, table)) = self.l2_table_for(start)? else {
            return Ok(Extent {
                start,
                len: limit,
                depth: 0,
                kind: ExtentKind::Unallocated,
                host: None,
            });
        };
        let (kind, host, len) = self.unit_status(&table, l2_offset, start)?;
        let mut extent = Extent {
            start,
            len: len.min(limit),
            depth: 0,
            kind,
            host,
        };
        while extent.end() < end {
            // As in qemu, a corrupt entry fails the query that starts at it; a run before it
            // ends there.
            let Ok((kind, host, len)) = self.unit_status(&table, l2_offset, extent.end()) else {
                break;
            };
            let contiguous = match (extent.host, host) {
                (None, None) => true,
                (Some(a), Some(b)) => a.offset.checked_add(extent.len) == Some(b.offset),
                _ => false,
            };
            if kind != extent.kind || !contiguous {
                break;
            }
            extent.len += len.min(extent.end().distance_to(end));
        }
        Ok(extent)
    }

    /// qemu's `qcow2_detect_metadata_preallocation`: noticeably more clusters are in use
    /// (refcount > 0) than the file has allocated on disk, so data clusters may be holes and
    /// block status asks the file system about them. Memory: one refcount block at a time.
    fn detect_metadata_preallocation(&self) -> bool {
        let Some(stat) = self
            .backend
            .as_fd()
            .and_then(|fd| rustix::fs::fstat(fd).ok())
        else {
            return false;
        };
        let cluster_bits = self.header.cluster_bits;
        let real_clusters = (stat.st_blocks as u64 * 512) >> cluster_bits;
        let threshold = (real_clusters * 10 / 9).max(real_clusters + 2);
        let end_cluster = self.file_len.div_ceil(1 << cluster_bits);
        let order = self.header.refcount_order;
        let per_block = super::refcount::entries_per_block(cluster_bits, order);
        let table_entries = u64::from(self.header.refcount_table_clusters) << (cluster_bits - 3);
        let mut block = vec![0u8; 1 << cluster_bits];
        let (mut count, mut cluster) = (0u64, 0u64);
        while cluster < end_cluster && count < threshold {
            let index = cluster / per_block;
            let mut entry = [0u8; 8];
            let read = index < table_entries
                && self
                    .backend
                    .read_exact_at(&mut entry, self.header.refcount_table_offset + index * 8)
                    .is_ok();
            let offset = u64::from_be_bytes(entry) & super::refcount::REFTABLE_OFFSET_MASK;
            if !read || offset == 0 {
                cluster = (index + 1) * per_block;
                continue;
            }
            if offset & ((1 << cluster_bits) - 1) != 0
                || self.backend.read_exact_at(&mut block, offset).is_err()
            {
                return false;
            }
            let last = ((index + 1) * per_block).min(end_cluster);
            while cluster < last && count < threshold {
                count += u64::from(super::refcount::get(&block, cluster % per_block, order) != 0);
                cluster += 1;
            }
        }
        count >= threshold
    }

    /// `block/io.c`'s recursion into the host file for data of a metadata-preallocated image:
    /// a hole in the host file under a data range reads as zeros (qemu: data + zero).
    fn refine_with_host_holes(&self, mut extent: Extent) -> Extent {
        let (
            ExtentKind::Data {
                compressed: false, ..
            },
            Some(at),
        ) = (extent.kind, extent.host)
        else {
            return extent;
        };
        if !*self
            .metadata_preallocation
            .get_or_init(|| self.detect_metadata_preallocation())
        {
            return extent;
        }
        let (fd, len) = match at.file {
            HostFile::Image => (self.backend.as_fd(), Some(self.file_len)),
            HostFile::DataFile => match self.data_file.as_deref() {
                Some(data) => (data.as_fd(), data.len().ok()),
                None => return extent,
            },
        };
        let Some(len) = len else {
            return extent;
        };
        let status =
            crate::raw::file_status(fd, at.offset.0, extent.len, len.next_multiple_of(512));
        if status.eof && (status.len == 0 || status.zero) {
            extent.kind = ExtentKind::Data {
                compressed: false,
                zero: true,
            };
        } else {
            extent.len = status.len;
            extent.kind = ExtentKind::Data {
                compressed: false,
                zero: status.zero,
            };
        }
        extent
    }

    /// Reads one extent of this image's own status into `buf` (`buf.len() == extent.len`).
    fn read_extent(&self, extent: &Extent, buf: &mut [u8]) -> Result<()> {
        match (extent.kind, extent.host) {
            (ExtentKind::Unallocated, _) => read_below(self.below.as_deref(), buf, extent.start),
            (ExtentKind::Zero, _) => {
                buf.fill(0);
                Ok(())
            }
            (
                ExtentKind::Data {
                    compressed: false, ..
                },
                Some(at),
            ) => match at.file {
                HostFile::DataFile => {
                    let data = self.data_file.as_deref().ok_or_else(|| {
                        corrupt("data file cluster without a data file", extent.start.0, 0)
                    })?;
                    let got = data
                        .read_prefix_at(buf, at.offset.0)
                        .map_err(Error::reading("qcow2 external data file"))?;
                    buf[got..].fill(0);
                    Ok(())
                }
                HostFile::Image => self.read_host(buf, at.offset.0),
            },
            (ExtentKind::Data { .. }, _) => self.read_compressed(extent, buf),
        }
    }

    /// Reads host bytes; bytes past the end of the file read as zeros (as qemu's file driver).
    fn read_host(&self, buf: &mut [u8], host: u64) -> Result<()> {
        let got = self
            .backend
            .read_prefix_at(buf, host)
            .map_err(Error::reading("qcow2 data cluster"))?;
        buf[got..].fill(0);
        Ok(())
    }

    /// Reads a run of compressed clusters into `buf`. qemu packs compressed clusters back to
    /// back, so the host span of up to [`COMPRESSED_BATCH`] clusters is read with one `pread`
    /// when it is compact (no wider than their compressed bytes plus a cluster), then each
    /// cluster is decompressed from it; scattered clusters are read one by one.
    fn read_compressed(&self, extent: &Extent, buf: &mut [u8]) -> Result<()> {
        let cluster_bits = self.header.cluster_bits;
        let cluster_size = 1u64 << cluster_bits;
        let mut done = 0usize;
        while done < buf.len() {
            // The batch: consecutive clusters from the one holding `done`.
            let mut batch = Vec::new();
            let mut at = extent.start.0 + done as u64;
            let mut batch_bytes = 0u64;
            while at < extent.end().0
                && batch.len() < COMPRESSED_BATCH
                && batch_bytes < COMPRESSED_BATCH_BYTES
            {
                let entry = self.l2_entry(at)?.unwrap_or(L2Entry {
                    entry: 0,
                    bitmap: 0,
                });
                let Ok(Subcluster::Compressed { host, len }) =
                    entry.subcluster(0, self.entry_format())
                else {
                    return Err(corrupt(
                        "compressed cluster changed under a read",
                        at,
                        entry.entry,
                    ));
                };
                batch.push((at, host.0, len));
                batch_bytes += len;
                at = (at >> cluster_bits << cluster_bits) + cluster_size;
            }
            let low = batch.iter().map(|b| b.1).min().unwrap_or(0);
            let high = batch.iter().map(|b| b.1 + b.2).max().unwrap_or(0);
            let total: u64 = batch.iter().map(|b| b.2).sum();
            // The span goes into a buffer kept by the thread: reader threads that allocated
            // and freed one per batch left about as much again in their malloc arenas.
            SPAN.with_borrow_mut(|span| -> Result<()> {
                let compact = high - low <= total + cluster_size;
                if compact {
                    span.clear();
                    span.resize((high - low) as usize, 0);
                    self.read_host(span, low)?;
                }
                let mut input = Vec::new();
                for (at, host, len) in batch {
                    let input: &[u8] = if compact {
                        let from = (host - low) as usize;
                        &span[from..from + len as usize]
                    } else {
                        input.resize(len as usize, 0);
                        self.read_host(&mut input, host)?;
                        &input
                    };
                    let start = GuestOffset(at).in_cluster_offset(cluster_bits) as usize;
                    let n = (cluster_size as usize - start).min(buf.len() - done);
                    self.decompress_into(input, (at, host), start, &mut buf[done..done + n])?;
                    done += n;
                }
                Ok(())
            })?;
        }
        Ok(())
    }

    /// Decodes one compressed cluster from its compressed bytes (`at`: the guest offset read in
    /// it and the host offset its bytes were read from, named in errors) and puts its bytes
    /// from `start` on into `out`: straight into `out` when that is the whole cluster.
    fn decompress_into(
        &self,
        input: &[u8],
        at: (u64, u64),
        start: usize,
        out: &mut [u8],
    ) -> Result<()> {
        let cluster_size = self.header.cluster_size() as usize;
        let (guest_offset, host) = at;
        let bad = |_| Error::from(Qcow2Error::BadCompressedCluster { guest_offset, host });
        let compression = self.header.compression_type;
        if start == 0 && out.len() == cluster_size {
            return super::compress::decompress(compression, input, out).map_err(bad);
        }
        let mut cluster = vec![0u8; cluster_size];
        super::compress::decompress(compression, input, &mut cluster).map_err(bad)?;
        out.copy_from_slice(&cluster[start..start + out.len()]);
        Ok(())
    }
}

std::thread_local! {
    /// Each thread's buffer for the host span of a batch of compressed clusters (at most
    /// [`COMPRESSED_BATCH_BYTES`] and a cluster, with two descriptors' slack).
    static SPAN: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl<B: Backend + Send + Sync> GuestRead for Qcow2Image<B> {
    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        check_range(offset.0, buf.len(), self.header.size)?;
        let mut done = 0usize;
        while done < buf.len() {
            let at = GuestOffset(offset.0 + done as u64);
            let extent = self.layer_status(at, (buf.len() - done) as u64)?;
            let len = extent.len as usize;
            self.read_extent(&extent, &mut buf[done..done + len])?;
            done += len;
        }
        Ok(())
    }

    fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
        Ok(self.refine_with_host_holes(self.layer_status(start, max_len)?))
    }

    fn below(&self) -> Option<&dyn GuestRead> {
        self.below.as_deref()
    }

    fn host_fd(&self, file: HostFile) -> Option<BorrowedFd<'_>> {
        match file {
            HostFile::Image => self.backend.as_fd(),
            HostFile::DataFile => self.data_file.as_deref().and_then(|d| d.as_fd()),
        }
    }
}

pub(super) fn corrupt(what: &'static str, guest_offset: u64, entry: u64) -> Error {
    Qcow2Error::CorruptEntry {
        what,
        guest_offset,
        entry,
    }
    .into()
}

pub(super) fn check_inside(what: &'static str, offset: u64, len: u64, file_len: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(Qcow2Error::BeyondEndOfFile {
            what,
            offset,
            file_len,
        }
        .into()),
    }
}
