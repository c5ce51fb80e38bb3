//! Compressing one cluster for a compressed-cluster write, as qemu stores them: raw deflate
//! (no zlib header) with a 4 KiB window, because qemu inflates with window bits −12; or a zstd
//! frame.

/// Raw deflate of `data`, or `None` if compression fails.
pub fn deflate(data: &[u8]) -> Option<Vec<u8>> {
    let mut compressor =
        flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12);
    let mut out = Vec::with_capacity(data.len() + 64);
    match compressor.compress_vec(data, &mut out, flate2::FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) => Some(out),
        _ => None,
    }
}

/// One zstd frame of `data`, or `None` if compression fails.
pub fn zstd(data: &[u8]) -> Option<Vec<u8>> {
    zstd::bulk::compress(data, 0).ok()
}
