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
//! Compression runs on all cores and beside the caller: clusters are queued (4 MiB of guest data
//! per batch); a full batch is compressed in the background by scoped worker threads while the
//! caller reads the next one, and the previous batch's results are placed meanwhile, in queue
//! order, so the output is the same whatever the thread count. In each batch, new L2 tables and the clusters
//! that stay uncompressed are allocated before the packed data, which therefore runs on across
//! them without gaps. Data reaches the file before the L2 entries that point at it.

use std::thread;

use super::image::Qcow2Image;
use super::tables::COMPRESSED;
use super::CompressionType;
use crate::extent::check_range;
use crate::io::Backend;
use crate::{Error, Result};

/// Guest data queued per batch (at least one cluster): its compressed copies and the packed
/// run come on top, so a batch needs about three times this much memory.
const BATCH_BYTES: u64 = 4 << 20;

/// Writes whole guest clusters compressed into a writable [`Qcow2Image`]. Queue clusters with
/// [`Self::write`] and end with [`Self::finish`]; clusters still queued when it is dropped
/// are lost. Each guest cluster is meant to be written once (as convert does): queued clusters
/// reach the image later, after any direct write the caller makes meanwhile.
#[must_use = "call finish() to write the queued clusters"]
#[derive(Debug)]
pub struct CompressedWriter {
    cluster_size: u64,
    compression: CompressionType,
    threads: usize,
    /// Clusters waiting for the next batch.
    queue: Batch,
    /// The previous batch, being compressed while the next one is read.
    in_flight: Option<thread::JoinHandle<CompressedBatch>>,
    /// Host byte offset where the next compressed cluster may start, inside a cluster that
    /// already holds compressed data (`None`: start in a fresh cluster).
    next_byte: Option<u64>,
}

/// Queued clusters: (guest offset, one cluster of data, zero-padded).
type Batch = Vec<(u64, Vec<u8>)>;
/// A batch and its compressed clusters (`None` where compression failed).
type CompressedBatch = (Batch, Vec<Option<Vec<u8>>>);

impl CompressedWriter {
    /// A writer for `image`, compressing on every available core.
    pub fn new<B: Backend + Send + Sync>(image: &Qcow2Image<B>) -> Self {
        let threads = thread::available_parallelism().map_or(1, |n| n.get());
        Self::with_threads(image, threads)
    }

    /// A writer for `image` compressing on `threads` threads (at least one; no more than a
    /// batch has clusters).
    pub fn with_threads<B: Backend + Send + Sync>(image: &Qcow2Image<B>, threads: usize) -> Self {
        let cluster_size = image.header().cluster_size();
        let per_batch = (BATCH_BYTES / cluster_size).max(1) as usize;
        Self {
            cluster_size,
            compression: image.header().compression_type,
            threads: threads.clamp(1, per_batch),
            queue: Vec::new(),
            in_flight: None,
            next_byte: None,
        }
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
        let len = data.len() as u64;
        let whole = len == self.cluster_size || offset + len == image.header().size;
        if offset % self.cluster_size != 0 || !whole || len == 0 {
            return image.write_at(data, offset);
        }
        let mut cluster = vec![0u8; self.cluster_size as usize];
        cluster[..data.len()].copy_from_slice(data);
        self.queue.push((offset, cluster));
        if self.queue.len() as u64 >= (BATCH_BYTES / self.cluster_size).max(1) {
            self.dispatch(image)?;
        }
        Ok(())
    }

    /// Writes every queued cluster. When the file ends in a cluster that is only partly
    /// filled with compressed data, the file ends after that data (rounded up to 512 bytes, as
    /// the descriptors count sectors), as qemu's output does.
    pub fn finish<B: Backend + Send + Sync>(mut self, image: &mut Qcow2Image<B>) -> Result<()> {
        self.dispatch(image)?;
        if let Some(last) = self.in_flight.take() {
            let (batch, compressed) = join(last)?;
            self.place_batch(image, batch, compressed)?;
        }
        if let Some(next) = self.next_byte {
            let cluster_end = next.next_multiple_of(self.cluster_size);
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

    /// Starts compressing the queued batch (on `threads` threads, in the background), then
    /// places the previous batch while that runs.
    fn dispatch<B: Backend + Send + Sync>(&mut self, image: &mut Qcow2Image<B>) -> Result<()> {
        let batch = std::mem::take(&mut self.queue);
        let mut next = None;
        if !batch.is_empty() {
            let (compression, threads) = (self.compression, self.threads);
            let handle = thread::Builder::new()
                .name("qcow2-compress".into())
                .spawn(move || {
                    let compressed = compress_all(&batch, compression, threads);
                    (batch, compressed)
                })
                .map_err(Error::io("starting a compression thread"))?;
            next = Some(handle);
        }
        if let Some(previous) = std::mem::replace(&mut self.in_flight, next) {
            let (batch, compressed) = join(previous)?;
            self.place_batch(image, batch, compressed)?;
        }
        Ok(())
    }

    /// Places and links each cluster of a compressed batch, in queue order.
    fn place_batch<B: Backend + Send + Sync>(
        &mut self,
        image: &mut Qcow2Image<B>,
        queue: Batch,
        compressed: Vec<Option<Vec<u8>>>,
    ) -> Result<()> {
        // L2 tables and the clusters that stay uncompressed first, so that the packed data
        // after them runs on without gaps (qemu interleaves them, leaving the rest of a
        // packing cluster unused each time).
        for (guest, _) in &queue {
            image.l2_for_write(*guest)?;
        }
        let mut packed = Vec::with_capacity(queue.len());
        for ((guest, data), bytes) in queue.iter().zip(compressed) {
            // qemu stores the cluster uncompressed unless the result is smaller than a cluster.
            match bytes.filter(|c| (c.len() as u64) < self.cluster_size) {
                Some(bytes) => packed.push((*guest, bytes)),
                None => {
                    let end = (guest + self.cluster_size).min(image.header().size);
                    image.write_at(&data[..(end - guest) as usize], *guest)?;
                }
            }
        }
        drop(queue);
        // Then the compressed data (contiguous runs in one write each), then its L2 entries.
        let mut run = HostRun::default();
        let mut entries = Vec::with_capacity(packed.len());
        for (guest, bytes) in packed {
            let host = self.place(image, bytes.len() as u64)?;
            run.push(image, host, &bytes)?;
            entries.push((guest, host, bytes.len() as u64));
        }
        run.flush(image)?;
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
        let cs = self.cluster_size;
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
fn join(handle: thread::JoinHandle<CompressedBatch>) -> Result<CompressedBatch> {
    handle.join().map_err(|_| {
        Error::io("compressing clusters")(std::io::Error::other("a compression thread panicked"))
    })
}

/// Compresses each queued cluster on `threads` threads; `None` where compression failed.
fn compress_all(
    queue: &[(u64, Vec<u8>)],
    compression: CompressionType,
    threads: usize,
) -> Vec<Option<Vec<u8>>> {
    super::compress::parallel_map(queue, threads, |(_, data)| {
        super::compress::compress(compression, data)
    })
    .into_iter()
    .map(Option::flatten)
    .collect()
}

/// Compressed bytes collected while they are contiguous in the file, written in one request.
#[derive(Default)]
struct HostRun {
    start: u64,
    bytes: Vec<u8>,
}

impl HostRun {
    /// Largest run kept before it is written.
    const MAX: usize = 4 << 20;

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

    /// Writes `data` compressed through a writer with `threads` threads; the image's bytes.
    fn compressed_image(data: &[u8], options: &[(&str, &str)], threads: usize) -> Vec<u8> {
        let mut opts = CreateOptions::default();
        for (k, v) in options {
            opts.set(k, v).unwrap();
        }
        let backend = MemBackend::default();
        write_new_image(&backend, data.len() as u64, &opts, None).unwrap();
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        let mut image =
            Qcow2Image::open_rw(backend, cluster, None, WriteOptions::default()).unwrap();
        let cs = opts.cluster_size as usize;
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
