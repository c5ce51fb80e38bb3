//! Compressing and decompressing one cluster, as qemu stores them (`block/qcow2-threads.c`):
//! raw deflate (no zlib header) with a 4 KiB window, because qemu inflates with window bits −12;
//! or zstd frames.

use super::CompressionType;

/// Deflate level. qemu asks zlib for its default (6); zlib-rs, our backend, follows zlib-ng,
/// whose level 6 uses a faster match search than zlib's and comes out about 0.5% larger on
/// 4-64 KiB clusters. Level 7 searches as zlib's 6 does and is no larger than qemu's output
/// (measured on ext4 images; `tests/compress_xcheck.rs` holds us to it).
const DEFLATE_LEVEL: u32 = 7;

std::thread_local! {
    /// Each thread's deflate state (about 400 KiB), reset between clusters rather than
    /// allocated and initialised for each.
    static DEFLATER: std::cell::RefCell<Option<flate2::Compress>> =
        const { std::cell::RefCell::new(None) };
}

/// Raw deflate of `data`, or `None` if compression fails. The result holds no spare capacity.
pub fn deflate(data: &[u8]) -> Option<Vec<u8>> {
    DEFLATER.with_borrow_mut(|slot| {
        let compressor = slot.get_or_insert_with(|| {
            flate2::Compress::new_with_window_bits(
                flate2::Compression::new(DEFLATE_LEVEL),
                false,
                12,
            )
        });
        compressor.reset();
        let mut out = Vec::with_capacity(data.len() + 64);
        match compressor.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => {
                out.shrink_to_fit();
                Some(out)
            }
            _ => None,
        }
    })
}

std::thread_local! {
    /// Each thread's zstd context, kept between clusters as the deflate state is.
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// One zstd frame of `data`, or `None` if compression fails. The result holds no spare
/// capacity.
pub fn zstd(data: &[u8]) -> Option<Vec<u8>> {
    ZSTD.with_borrow_mut(|slot| {
        let compressor = match slot {
            Some(compressor) => compressor,
            None => slot.insert(zstd::bulk::Compressor::new(0).ok()?),
        };
        let mut out = compressor.compress(data).ok()?;
        out.shrink_to_fit();
        Some(out)
    })
}

/// One cluster compressed with `compression`, or `None` if compression fails.
pub fn compress(compression: CompressionType, data: &[u8]) -> Option<Vec<u8>> {
    match compression {
        CompressionType::Deflate => deflate(data),
        CompressionType::Zstd => zstd(data),
    }
}

/// `f` applied to every item on up to `threads` threads (contiguous slices, one per thread),
/// results in the items' order whatever the thread count; `None` for the items of a slice
/// whose thread panicked. What compressing and decompressing on all cores stand on.
pub fn parallel_map<T: Sync, R: Send>(
    items: &[T],
    threads: usize,
    f: impl Fn(&T) -> R + Sync,
) -> Vec<Option<R>> {
    if threads <= 1 || items.len() <= 1 {
        return items.iter().map(|item| Some(f(item))).collect();
    }
    let per_thread = items.len().div_ceil(threads);
    let f = &f;
    std::thread::scope(|scope| {
        let workers: Vec<_> = items
            .chunks(per_thread)
            .map(|slice| {
                let len = slice.len();
                let worker = scope.spawn(move || slice.iter().map(f).collect::<Vec<_>>());
                (len, worker)
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|(len, worker)| match worker.join() {
                Ok(results) => results.into_iter().map(Some).collect(),
                Err(_) => (0..len).map(|_| None).collect::<Vec<_>>(),
            })
            .collect()
    })
}

/// A compressed cluster that does not decode to exactly one cluster (qemu: `EIO`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BadCompressedData;

/// Decodes `input` (the bytes the descriptor names: whole sectors, so possibly followed by
/// unrelated bytes) into `output`, which must come out exactly full.
///
/// qemu's rules: deflate must fill the cluster, input left over is fine (the descriptor counts
/// sectors, not bytes); zstd frames are decoded until the cluster is full, and the last frame
/// must end there — a stream that would expand past the cluster is an error, never truncated.
pub fn decompress(
    compression: CompressionType,
    input: &[u8],
    output: &mut [u8],
) -> Result<(), BadCompressedData> {
    match compression {
        CompressionType::Deflate => {
            let mut inflater = flate2::Decompress::new(false);
            let status = inflater.decompress(input, output, flate2::FlushDecompress::Finish);
            if status.is_err() || inflater.total_out() != output.len() as u64 {
                return Err(BadCompressedData);
            }
            Ok(())
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{Decoder, InBuffer, Operation, OutBuffer};
            let mut decoder = Decoder::new().map_err(|_| BadCompressedData)?;
            let mut input = InBuffer::around(input);
            let mut output = OutBuffer::around(output);
            // The frame's remaining work as zstd reports it: 0 once a frame is complete.
            let mut remaining = 1;
            while output.pos() < output.capacity() {
                let progress = input.pos() + output.pos();
                remaining = decoder
                    .run(&mut input, &mut output)
                    .map_err(|_| BadCompressedData)?;
                if input.pos() + output.pos() == progress {
                    return Err(BadCompressedData);
                }
            }
            if remaining != 0 {
                return Err(BadCompressedData);
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_codecs_round_trip_one_cluster_with_trailing_bytes() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        for (kind, mut packed) in [
            (CompressionType::Deflate, deflate(&data).unwrap()),
            (CompressionType::Zstd, zstd(&data).unwrap()),
        ] {
            packed.extend_from_slice(&[0xa5; 300]); // the rest of the last sector
            let mut out = vec![0u8; data.len()];
            decompress(kind, &packed, &mut out).unwrap();
            assert!(out == data, "{kind:?}");
        }
    }

    #[test]
    fn a_stream_that_expands_past_the_cluster_is_an_error() {
        // Issue 12: a zstd cluster whose stream expands past one cluster was truncated.
        let data = vec![7u8; 65536 + 4096];
        let mut out = vec![0u8; 65536];
        let packed = zstd(&data).unwrap();
        assert_eq!(
            decompress(CompressionType::Zstd, &packed, &mut out),
            Err(BadCompressedData)
        );
        // Short streams are errors for both codecs.
        let short = vec![7u8; 4096];
        for (kind, packed) in [
            (CompressionType::Deflate, deflate(&short).unwrap()),
            (CompressionType::Zstd, zstd(&short).unwrap()),
        ] {
            assert_eq!(
                decompress(kind, &packed, &mut out),
                Err(BadCompressedData),
                "{kind:?}"
            );
        }
    }
}
