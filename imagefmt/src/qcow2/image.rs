//! An open qcow2 image: reading guest data (L1 → L2 → cluster, falling through to the image
//! below for unallocated clusters). Writing lives in [`super::write`] and host-cluster
//! allocation in [`super::allocator`], as further `impl` blocks of [`Qcow2Image`].
//!
//! Every offset taken from the file is checked before use (alignment, inside the file); what
//! qemu reports as corruption at run time is an error here, never a panic. Memory is bounded: the
//! L1 table (≤ 32 MiB, and only if the file really holds it) and an L2 cache of at most
//! [`L2_CACHE_BYTES`].

use std::sync::{Arc, Mutex};

use byteorder::{BigEndian, ByteOrder};

use super::error::Qcow2Error;
use super::features::IncompatibleFeatures;
use super::header::{Header, Version};
use super::header_cluster::HeaderCluster;
use super::tables::{ClusterKind, L1Entry, L2Entry, SUBCLUSTERS};
use crate::chain::{check_range, read_below, GuestRead};
use crate::io::Backend;
use crate::{Error, Result};

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
        })
    }

    /// Opens an image that keeps its guest data in an external data file (incompatible bit 2),
    /// reading data clusters from `data_file`. The caller decides whether that file may be
    /// opened at all: its name in the header is untrusted and can name any host file.
    pub fn open_with_data_file(
        backend: B,
        mut cluster: HeaderCluster,
        below: Option<Box<dyn GuestRead>>,
        data_file: Box<dyn Backend + Send + Sync>,
    ) -> Result<Self> {
        cluster.header.incompatible_features -= IncompatibleFeatures::EXTERNAL_DATA_FILE;
        let mut image = Self::open(backend, cluster, below)?;
        image.header.incompatible_features |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
        image.data_file = Some(data_file);
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

    /// Looks up the L2 entry for guest `offset` (`None` if its L1 entry is unallocated).
    pub(super) fn l2_entry(&self, offset: u64) -> Result<Option<L2Entry>> {
        let cluster_index = offset >> self.header.cluster_bits;
        let per_table = self.header.l2_entries();
        let l1_index = (cluster_index / per_table) as usize;
        let Some(&l1_raw) = self.l1.get(l1_index) else {
            return Ok(None);
        };
        let Some(l2_offset) = L1Entry(l1_raw).l2_offset() else {
            return Ok(None);
        };
        let table = self.l2_table(l2_offset, offset, l1_raw)?;
        let index = (cluster_index % per_table) as usize;
        Ok(Some(if self.header.extended_l2() {
            L2Entry {
                entry: BigEndian::read_u64(&table[index * 16..]),
                bitmap: BigEndian::read_u64(&table[index * 16 + 8..]),
            }
        } else {
            L2Entry {
                entry: BigEndian::read_u64(&table[index * 8..]),
                bitmap: 0,
            }
        }))
    }

    /// Reads one piece lying inside a single (sub)cluster of kind `kind`.
    fn read_piece(&self, kind: ClusterKind, buf: &mut [u8], offset: u64, entry: u64) -> Result<()> {
        let cluster_size = self.header.cluster_size();
        let in_cluster = offset & (cluster_size - 1);
        match kind {
            ClusterKind::Unallocated => read_below(self.below.as_deref(), buf, offset),
            ClusterKind::ZeroPlain | ClusterKind::ZeroAllocated { .. } => {
                if self.header.version == Version::V2 {
                    return Err(corrupt("zero flag in a version 2 image", offset, entry));
                }
                buf.fill(0);
                Ok(())
            }
            ClusterKind::Normal { host } => {
                if host % cluster_size != 0 {
                    return Err(corrupt("unaligned data cluster offset", offset, entry));
                }
                match &self.data_file {
                    Some(data) => {
                        let got = data
                            .read_prefix_at(buf, host + in_cluster)
                            .map_err(Error::reading("qcow2 external data file"))?;
                        buf[got..].fill(0);
                        Ok(())
                    }
                    None => self.read_host(buf, host + in_cluster),
                }
            }
            ClusterKind::Compressed { .. } if self.data_file.is_some() => Err(corrupt(
                "compressed cluster in an image with an external data file",
                offset,
                entry,
            )),
            ClusterKind::Compressed { host, len } => {
                let cluster = self.decompress(host, len)?;
                let start = in_cluster as usize;
                buf.copy_from_slice(&cluster[start..start + buf.len()]);
                Ok(())
            }
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

    /// Decodes one compressed cluster.
    fn decompress(&self, host: u64, len: u64) -> Result<Vec<u8>> {
        let cluster_size = self.header.cluster_size() as usize;
        let bad = || Error::from(Qcow2Error::BadCompressedCluster { host });
        // len ≤ 2^(cluster_bits - 8 + 1) sectors (the descriptor's width): at most 2 clusters.
        let mut input = vec![0u8; len as usize];
        self.read_host(&mut input, host)?;
        let mut output = vec![0u8; cluster_size];
        super::compress::decompress(self.header.compression_type, &input, &mut output)
            .map_err(|_| bad())?;
        Ok(output)
    }
}

impl<B: Backend + Send + Sync> GuestRead for Qcow2Image<B> {
    fn virtual_size(&self) -> u64 {
        self.header.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        check_range(offset, buf.len(), self.header.size)?;
        let cluster_bits = self.header.cluster_bits;
        let cluster_size = self.header.cluster_size();
        let extended = self.header.extended_l2();
        let sub_size = if extended {
            cluster_size / u64::from(SUBCLUSTERS)
        } else {
            cluster_size
        };
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            // One piece never crosses a (sub)cluster boundary.
            let room = sub_size - (pos & (sub_size - 1));
            let len = room.min((buf.len() - done) as u64) as usize;
            let piece = &mut buf[done..done + len];
            match self.l2_entry(pos)? {
                None => read_below(self.below.as_deref(), piece, pos)?,
                Some(entry) => {
                    let kind = if extended {
                        let index = ((pos & (cluster_size - 1)) / sub_size) as u32;
                        entry
                            .subcluster_kind(index, cluster_bits)
                            .map_err(|_| corrupt("invalid subcluster bitmap", pos, entry.bitmap))?
                    } else {
                        entry.kind(cluster_bits)
                    };
                    self.read_piece(kind, piece, pos, entry.entry)?;
                }
            }
            done += len;
        }
        Ok(())
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
