//! Writing guest clusters compressed, as `qemu-img convert -c` does: each cluster compressed on
//! its own (deflate or zstd, per the header; [`super::compress`]), the results packed back to
//! back in the file, and a cluster that does not shrink written uncompressed.
//!
//! ```text
//! host cluster  N                      N+1                     N+2
//!               | c0 | c1 |  c2 ...... | ... c2 | c3 | c4 |    | ...
//!               descriptor of c2: byte offset inside N, sectors to read; N and N+1 each get
//!               one reference from c2 (FORMATS.md §1.6-1.7), so N is counted 3 times here
//! ```
//!
//! Packing (the facts of qemu's `qcow2_alloc_bytes`): compressed data continues at the byte
//! after the previous one. When it does not fit in the rest of the current host cluster, the
//! next free cluster is taken; if that is the cluster right after the current one the data runs
//! on into it, otherwise it starts there and the rest of the current cluster stays unused. Every
//! host cluster a compressed cluster touches gets one reference from it (its refcount counts the
//! compressed clusters in it); a cluster whose refcount reached the maximum is not added to.
//!
//! Compression runs on all cores, in one of two ways. A caller with threads of its own (convert's
//! reader threads) compresses each cluster where it read it, with a [`Packer`], and hands the
//! result to [`CompressedWriter::write_packed`]. Otherwise [`CompressedWriter::write`] queues the
//! data and compresses a full batch in the background on scoped worker threads while the caller
//! reads the next one. Either way clusters are placed by batches of [`BATCH_BYTES`] of guest
//! data, in the order given, so the output is the same whatever the thread count and the way
//! in. In each batch, new L2 tables and the clusters that stay uncompressed are allocated
//! before the packed data, which therefore runs on across them without gaps. Data reaches the
//! file before the L2 entries that point at it.
//!
//! Memory: one batch queued and one in flight (`write`), or one batch of compressed clusters
//! (`write_packed`), plus one run of packed bytes (at most 1 MiB) gathered for a write.

use std::thread;

use super::image::Qcow2Image;
use super::tables::COMPRESSED;
use super::CompressionType;
use crate::extent::check_range;
use crate::io::Backend;
use crate::{Error, Result};

/// Guest data placed per batch (at least one cluster). [`CompressedWriter::write`] holds up to
/// two batches of data (one queued, one being compressed) and their compressed copies;
/// [`CompressedWriter::write_packed`] one batch of compressed clusters (those that stay
/// uncompressed in full). Each batch boundary may leave the rest of a packing cluster unused
/// (where the batch allocates L2 tables or uncompressed clusters), so smaller batches make
/// larger files: 2 MiB batches made a 400 MiB ext4 image's output 0.27% larger than these.
pub const BATCH_BYTES: u64 = 4 << 20;

/// One guest cluster ready to be placed: its compressed bytes, or, when compression does not
/// make it smaller than a cluster (qemu's rule) or fails, its data as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PackedCluster {
    /// Compressed bytes, fewer than a cluster.
    Compressed(Vec<u8>),
    /// The data, stored uncompressed (a cluster, or the rest of the disk at its end).
    Plain(Vec<u8>),
}

/// What compresses clusters for one image ([`CompressedWriter::packer`]): cheap to copy into
/// any thread.
#[derive(Debug, Clone, Copy)]
pub struct Packer {
    cluster_size: u64,
    compression: CompressionType,
}

impl Packer {
    /// Compresses one cluster of guest data: a whole cluster, or the rest of the disk when the
    /// last cluster is partial (compressed as if padded with zeros to a cluster, which is what
    /// a reader decodes).
    pub fn pack(&self, data: &[u8]) -> PackedCluster {
        let cs = self.cluster_size as usize;
        let compressed = if data.len() < cs {
            let mut cluster = vec![0u8; cs];
            cluster[..data.len()].copy_from_slice(data);
            super::compress::compress(self.compression, &cluster)
        } else {
            super::compress::compress(self.compression, data)
        };
        match compressed.filter(|c| c.len() < cs) {
            Some(bytes) => PackedCluster::Compressed(bytes),
            None => PackedCluster::Plain(data.to_vec()),
        }
    }
}

/// Writes whole guest clusters compressed into a writable [`Qcow2Image`]. Queue clusters with
/// [`Self::write`] or [`Self::write_packed`] and end with [`Self::finish`]; clusters still
/// queued when it is dropped are lost. Each guest cluster is meant to be written once (as
/// convert does): queued clusters reach the image later, after any direct write the caller
/// makes meanwhile.
#[must_use = "call finish() to write the queued clusters"]
#[derive(Debug)]
pub struct CompressedWriter {
    packer: Packer,
    threads: usize,
    /// Clusters per batch.
    per_batch: usize,
    /// Clusters given to [`Self::write`], waiting for the next batch: (guest offset, data).
    queue: Vec<(u64, Vec<u8>)>,
    /// The previous batch of [`Self::write`], being compressed while the next one is read.
    in_flight: Option<thread::JoinHandle<Batch>>,
    /// Clusters given to [`Self::write_packed`], waiting for the batch to fill.
    packed: Batch,
    /// Host byte offset where the next compressed cluster may start, inside a cluster that
    /// already holds compressed data (`None`: start in a fresh cluster).
    next_byte: Option<u64>,
    /// Packed bytes gathered for one write (its buffer kept from batch to batch).
    run: HostRun,
}

/// Clusters ready to be placed: (guest offset, cluster).
type Batch = Vec<(u64, PackedCluster)>;

impl CompressedWriter {
    /// A writer for `image`, compressing on every available core.
    pub fn new<B: Backend + Send + Sync>(image: &Qcow2Image<B>) -> Self {
        let threads = thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_threads(image, threads)
    }

    /// A writer for `image` compressing what [`Self::write`] queues on `threads` threads (at
    /// least one; no more than a batch has clusters).
    pub fn with_threads<B: Backend + Send + Sync>(image: &Qcow2Image<B>, threads: usize) -> Self {
        let cluster_size = image.header().cluster_size();
        let per_batch = (BATCH_BYTES / cluster_size).max(1) as usize;
        Self {
            packer: Packer {
                cluster_size,
                compression: image.header().compression_type,
            },
            threads: threads.clamp(1, per_batch),
            per_batch,
            queue: Vec::new(),
            in_flight: None,
            packed: Vec::new(),
            next_byte: None,
            run: HostRun::default(),
        }
    }

    /// The packer for [`Self::write_packed`]: compresses as this writer would.
    pub fn packer(&self) -> Packer {
        self.packer
    }

    /// Queues guest data at a cluster-aligned `offset`: one whole cluster, or the rest of the
    /// disk when the last cluster is partial. Anything else is written uncompressed at once.
    pub fn write<B: Backend + Send + Sync>(
        &mut self,
        image: &mut Qcow2Image<B>,
        data: &[u8],
        offset: u64,
    ) -> Result<()> {
        check_range(offset, data.len(), image.header().size)?;
        refuse_data_file(image)?;
        let len = data.len() as u64;
        image.mark_bitmaps_dirty(offset, len)?;
        if !self.is_whole_cluster(image, offset, len) {
            return image.write_at(data, offset);
        }
        if !self.packed.is_empty() {
            let batch = std::mem::take(&mut self.packed);
            self.place_batch(image, batch)?;
        }
        self.queue.push((offset, data.to_vec()));
        if self.queue.len() >= self.per_batch {
            self.dispatch(image)?;
        }
        Ok(())
    }

    /// Queues a cluster compressed by the caller ([`Self::packer`]) for guest `offset`, which
    /// must be cluster-aligned; the cluster holds guest data up to the end of the disk at most.
    pub fn write_packed<B: Backend + Send + Sync>(
        &mut self,
        image: &mut Qcow2Image<B>,
        offset: u64,
        cluster: PackedCluster,
    ) -> Result<()> {
        refuse_data_file(image)?;
        let size = image.header().size;
        let len = self.packer.cluster_size.min(size.saturating_sub(offset));
        check_range(offset, len as usize, size)?;
        if !self.is_whole_cluster(image, offset, len) {
            return Err(Error::InvalidParameter {
                name: "offset",
                reason: "a packed cluster must start at a cluster boundary inside the disk",
            });
        }
        if let PackedCluster::Plain(data) = &cluster {
            if data.len() as u64 != len {
                return Err(Error::InvalidParameter {
                    name: "cluster",
                    reason: "an uncompressed packed cluster must hold the whole cluster",
                });
            }
        }
        image.mark_bitmaps_dirty(offset, len)?;
        // Clusters given to write() before this one go first.
        self.drain_queue(image)?;
        self.packed.push((offset, cluster));
        if self.packed.len() >= self.per_batch {
            let batch = std::mem::take(&mut self.packed);
            self.place_batch(image, batch)?;
        }
        Ok(())
    }

    /// Writes every queued cluster. When the file ends in a cluster that is only partly
    /// filled with compressed data, the file ends after that data (rounded up to 512 bytes, as
    /// the descriptors count sectors), as qemu's output does.
    pub fn finish<B: Backend + Send + Sync>(mut self, image: &mut Qcow2Image<B>) -> Result<()> {
        self.drain_queue(image)?;
        let batch = std::mem::take(&mut self.packed);
        self.place_batch(image, batch)?;
        if let Some(next) = self.next_byte {
            let cluster_end = next.next_multiple_of(self.packer.cluster_size);
            if image.file_len == cluster_end {
                let end = next.next_multiple_of(512);
                image
                    .backend
                    .set_len(end)
                    .map_err(crate::Error::writing("qcow2 file length"))?;
                image.file_len = end;
            }
        }
        Ok(())
    }

    /// True if `len` bytes at `offset` are one whole cluster, or the rest of the disk from a
    /// cluster boundary.
    fn is_whole_cluster<B: Backend + Send + Sync>(
        &self,
        image: &Qcow2Image<B>,
        offset: u64,
        len: u64,
    ) -> bool {
        let cs = self.packer.cluster_size;
        let whole = len == cs || offset + len == image.header().size;
        offset % cs == 0 && whole && len != 0
    }

    /// Places everything [`Self::write`] queued: the batch in flight, then the queue.
    fn drain_queue<B: Backend + Send + Sync>(&mut self, image: &mut Qcow2Image<B>) -> Result<()> {
        if self.queue.is_empty() && self.in_flight.is_none() {
            return Ok(());
        }
        self.dispatch(image)?;
        if let Some(last) = self.in_flight.take() {
            let batch = join(last)?;
            self.place_batch(image, batch)?;
        }
        Ok(())
    }

    /// Starts compressing the queued batch (on `threads` threads, in the background), then
    /// places the previous batch while that runs.
    fn dispatch<B: Backend + Send + Sync>(&mut self, image: &mut Qcow2Image<B>) -> Result<()> {
        let queue = std::mem::take(&mut self.queue);
        let mut next = None;
        if !queue.is_empty() {
            let (packer, threads) = (self.packer, self.threads);
            let handle = thread::Builder::new()
                .name("qcow2-compress".into())
                .spawn(move || pack_all(queue, packer, threads))
                .map_err(Error::io("starting a compression thread"))?;
            next = Some(handle);
        }
        if let Some(previous) = std::mem::replace(&mut self.in_flight, next) {
            let batch = join(previous)?;
            self.place_batch(image, batch)?;
        }
        Ok(())
    }

    /// Places and links each cluster of a batch, in its order.
    fn place_batch<B: Backend + Send + Sync>(
        &mut self,
        image: &mut Qcow2Image<B>,
        batch: Batch,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // L2 tables and the clusters that stay uncompressed first, so that the packed data
        // after them runs on without gaps (qemu interleaves them, leaving the rest of a
        // packing cluster unused each time).
        for (guest, _) in &batch {
            image.l2_for_write(*guest)?;
        }
        for (guest, cluster) in &batch {
            if let PackedCluster::Plain(data) = cluster {
                image.write_at(data, *guest)?;
            }
        }
        // Then the compressed data (contiguous runs in one write each), then its L2 entries.
        let mut entries = Vec::with_capacity(batch.len());
        for (guest, cluster) in &batch {
            if let PackedCluster::Compressed(bytes) = cluster {
                let host = self.place(image, bytes.len() as u64)?;
                self.run.push(image, host, bytes)?;
                entries.push((*guest, host, bytes.len() as u64));
            }
        }
        drop(batch);
        self.run.flush(image)?;
        image.barrier()?;
        let offset_bits = 62 - (image.header().cluster_bits - 8);
        for (guest, host, len) in entries {
            let sectors = (host + len - 1) / 512 - host / 512;
            let descriptor = COMPRESSED | host | (sectors << offset_bits);
            let (table, index, old) = image.l2_for_write(guest)?;
            image.set_l2_entry(table, index, descriptor, 0)?;
            image.release(old)?;
        }
        Ok(())
    }

    /// Finds room for `len` compressed bytes and counts the references to the host clusters
    /// they touch; returns the host byte offset.
    fn place<B: Backend + Send + Sync>(
        &mut self,
        image: &mut Qcow2Image<B>,
        len: u64,
    ) -> Result<u64> {
        let cs = self.packer.cluster_size;
        let max = super::refcount::max_refcount(image.header().refcount_order);
        // Continue in the current cluster when it may take one more reference.
        let mut start = None;
        if let Some(next) = self.next_byte {
            let cluster = next / cs;
            let count = image.refcount(cluster)?;
            if count < max {
                let room = cs - next % cs;
                if len <= room {
                    image.set_refcount(cluster, count + 1)?;
                    start = Some(next);
                } else {
                    let fresh = image.alloc_cluster()?;
                    if fresh == (cluster + 1) * cs {
                        image.set_refcount(cluster, count + 1)?;
                        start = Some(next);
                    } else {
                        start = Some(fresh);
                    }
                }
            }
        }
        let start = match start {
            Some(start) => start,
            None => image.alloc_cluster()?,
        };
        let end = start + len;
        self.next_byte = (end % cs != 0).then_some(end);
        Ok(start)
    }
}

/// Waits for a batch being compressed.
fn join(handle: thread::JoinHandle<Batch>) -> Result<Batch> {
    handle.join().map_err(|_| {
        Error::io("compressing clusters")(std::io::Error::other("a compression thread panicked"))
    })
}

/// Packs each queued cluster on `threads` threads; a cluster whose thread panicked stays
/// uncompressed.
fn pack_all(queue: Vec<(u64, Vec<u8>)>, packer: Packer, threads: usize) -> Batch {
    let packed = super::compress::parallel_map(&queue, threads, |(_, data)| packer.pack(data));
    queue
        .into_iter()
        .zip(packed)
        .map(|((guest, data), packed)| (guest, packed.unwrap_or(PackedCluster::Plain(data))))
        .collect()
}

/// Compressed bytes collected while they are contiguous in the file, written in one request.
#[derive(Debug, Default)]
struct HostRun {
    start: u64,
    bytes: Vec<u8>,
}

impl HostRun {
    /// Largest run kept before it is written.
    const MAX: usize = 1 << 20;

    fn push<B: Backend + Send + Sync>(
        &mut self,
        image: &mut Qcow2Image<B>,
        host: u64,
        data: &[u8],
    ) -> Result<()> {
        if self.start + self.bytes.len() as u64 != host || self.bytes.len() >= Self::MAX {
            self.flush(image)?;
            self.start = host;
        }
        self.bytes.extend_from_slice(data);
        Ok(())
    }

    fn flush<B: Backend + Send + Sync>(&mut self, image: &mut Qcow2Image<B>) -> Result<()> {
        if !self.bytes.is_empty() {
            image.write_host(&self.bytes, self.start)?;
            self.bytes.clear();
        }
        Ok(())
    }
}

/// Refuses compressed writes into an image with an external data file, as qemu does.
fn refuse_data_file<B: Backend + Send + Sync>(image: &Qcow2Image<B>) -> Result<()> {
    if image.has_data_file() {
        return Err(super::Qcow2Error::CompressedDataFile.into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::extent::GuestRead;
    use crate::io::MemBackend;
    use crate::offsets::GuestOffset;
    use crate::qcow2::check::{check, Repair};
    use crate::qcow2::create::{write_new_image, CreateOptions};
    use crate::qcow2::header_cluster::HeaderCluster;
    use crate::qcow2::write::WriteOptions;

    /// Guest data mixing text-like (compressible), random (incompressible) and zero clusters.
    fn guest(size: usize, cluster: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut data = vec![0u8; size];
        for (i, chunk) in data.chunks_mut(cluster).enumerate() {
            match i % 5 {
                0 | 3 => {
                    for (j, b) in chunk.iter_mut().enumerate() {
                        *b = b"qcow2 packs compressed clusters "[(j + i) % 32];
                    }
                }
                1 => chunk.iter_mut().for_each(|b| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    *b = x as u8;
                }),
                2 => {}
                _ => chunk[..cluster / 3].fill(i as u8),
            }
        }
        data
    }

    /// A new in-memory image of `len` bytes made with `options`, open for writing, and its
    /// cluster size.
    fn new_image(len: u64, options: &[(&str, &str)]) -> (Qcow2Image<MemBackend>, usize) {
        let mut opts = CreateOptions::default();
        for (k, v) in options {
            opts.set(k, v).unwrap();
        }
        let backend = MemBackend::default();
        write_new_image(&backend, len, &opts, None).unwrap();
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        let image = Qcow2Image::open_rw(backend, cluster, None, WriteOptions::default()).unwrap();
        (image, opts.cluster_size as usize)
    }

    /// Writes `data` compressed through a writer with `threads` threads; the image's bytes.
    fn compressed_image(data: &[u8], options: &[(&str, &str)], threads: usize) -> Vec<u8> {
        let (mut image, cs) = new_image(data.len() as u64, options);
        let mut writer = CompressedWriter::with_threads(&image, threads);
        for (i, chunk) in data.chunks(cs).enumerate() {
            if chunk.iter().any(|&b| b != 0) {
                writer.write(&mut image, chunk, (i * cs) as u64).unwrap();
            }
        }
        writer.finish(&mut image).unwrap();
        image.backend().to_vec()
    }

    #[test]
    fn compressed_clusters_read_back_check_clean_and_pack_for_every_layout() {
        let layouts: &[&[(&str, &str)]] = &[
            &[],
            &[("compression_type", "zstd")],
            &[("cluster_size", "4k")],
            &[("cluster_size", "512"), ("refcount_bits", "64")],
            &[("cluster_size", "1k"), ("refcount_bits", "1")],
            &[("cluster_size", "64k"), ("refcount_bits", "2")],
            &[("extended_l2", "on"), ("cluster_size", "32k")],
            &[("compat", "0.10"), ("cluster_size", "8k")],
        ];
        for options in layouts {
            let mut opts = CreateOptions::default();
            for (k, v) in *options {
                opts.set(k, v).unwrap();
            }
            let cs = opts.cluster_size as usize;
            // A partial last cluster too.
            let data = guest(cs * 41 + cs / 2, cs);
            let bytes = compressed_image(&data, options, 3);
            let report = check(&MemBackend::new(bytes.clone()), Repair::None).unwrap();
            assert_eq!(report.exit_code(), 0, "{options:?}: {:?}", report.messages);
            assert!(
                report.compressed_clusters > 0,
                "{options:?}: nothing compressed"
            );
            let cluster = HeaderCluster::parse(&bytes[..bytes.len().min(cs)]).unwrap();
            let image = Qcow2Image::open(MemBackend::new(bytes.clone()), cluster, None).unwrap();
            let mut back = vec![0u8; data.len()];
            image.read_at(&mut back, GuestOffset(0)).unwrap();
            assert!(back == data, "{options:?}: content differs");
            // Packed: far less than a host cluster per compressed cluster (the compressible
            // clusters shrink to a few dozen bytes each), unless a 1-bit refcount forbids
            // sharing a host cluster.
            let stored = report.image_end_offset / opts.cluster_size;
            assert!(
                opts.refcount_bits == 1 || stored < report.allocated_clusters,
                "{options:?}: {stored} host clusters for {} guest clusters",
                report.allocated_clusters
            );
        }
    }

    /// Like [`compressed_image`], the clusters packed by the caller (as convert's readers do)
    /// and handed over with `write_packed`.
    fn packed_image(data: &[u8], options: &[(&str, &str)]) -> Vec<u8> {
        let (mut image, cs) = new_image(data.len() as u64, options);
        let mut writer = CompressedWriter::with_threads(&image, 1);
        let packer = writer.packer();
        // Packed on other threads, a few clusters each, then handed over in guest order.
        let chunks: Vec<(usize, &[u8])> = data.chunks(cs).enumerate().collect();
        let packed: Vec<Vec<(u64, PackedCluster)>> = std::thread::scope(|scope| {
            let workers: Vec<_> = chunks
                .chunks(7)
                .map(|part| {
                    scope.spawn(move || {
                        part.iter()
                            .filter(|(_, chunk)| chunk.iter().any(|&b| b != 0))
                            .map(|(i, chunk)| ((i * cs) as u64, packer.pack(chunk)))
                            .collect()
                    })
                })
                .collect();
            workers.into_iter().map(|w| w.join().unwrap()).collect()
        });
        for (offset, cluster) in packed.into_iter().flatten() {
            writer.write_packed(&mut image, offset, cluster).unwrap();
        }
        writer.finish(&mut image).unwrap();
        image.backend().to_vec()
    }

    #[test]
    fn clusters_packed_by_the_caller_give_the_same_image_as_write() {
        // Several batches (4 KiB clusters: 1,024 per batch), a partial last cluster (the disk
        // ends on a sector, where write() compresses it too), every kind of cluster; zstd too.
        for options in [
            &[("cluster_size", "4k")][..],
            &[("cluster_size", "4k"), ("compression_type", "zstd")][..],
            &[("cluster_size", "64k")][..],
        ] {
            let mut opts = CreateOptions::default();
            for (k, v) in options {
                opts.set(k, v).unwrap();
            }
            let cs = opts.cluster_size as usize;
            let data = guest(cs * 2600 + 1536, cs);
            let written = compressed_image(&data, options, 2);
            let packed = packed_image(&data, options);
            assert!(packed == written, "{options:?}: the images differ");
            let report = check(&MemBackend::new(packed), Repair::None).unwrap();
            assert_eq!(report.exit_code(), 0, "{options:?}: {:?}", report.messages);
        }
    }

    #[test]
    fn a_packed_cluster_off_a_cluster_boundary_is_refused() {
        let data = guest(8 * 4096, 4096);
        let mut opts = CreateOptions::default();
        opts.set("cluster_size", "4k").unwrap();
        let backend = MemBackend::default();
        write_new_image(&backend, data.len() as u64, &opts, None).unwrap();
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        let mut image =
            Qcow2Image::open_rw(backend, cluster, None, WriteOptions::default()).unwrap();
        let mut writer = CompressedWriter::new(&image);
        let packed = writer.packer().pack(&data[..4096]);
        assert!(writer
            .write_packed(&mut image, 512, packed.clone())
            .is_err());
        assert!(writer.write_packed(&mut image, 8 * 4096, packed).is_err());
        let short = PackedCluster::Plain(vec![1; 100]);
        assert!(writer.write_packed(&mut image, 4096, short).is_err());
        writer.finish(&mut image).unwrap();
    }

    #[test]
    fn the_output_does_not_depend_on_the_thread_count() {
        let data = guest(64 * 4096 * 3 + 100, 4096);
        let one = compressed_image(&data, &[("cluster_size", "4k")], 1);
        for threads in [2, 5, 16] {
            assert!(
                compressed_image(&data, &[("cluster_size", "4k")], threads) == one,
                "{threads} threads"
            );
        }
    }
}
