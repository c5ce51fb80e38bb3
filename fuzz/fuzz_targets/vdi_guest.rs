//! Open + guest read + write + discard + check of arbitrary bytes as a VDI image, on memory,
//! alone and as a differencing image over a small patterned parent.
//!
//! Properties: never a panic; memory bounded by the input (the block map must lie inside the
//! file before it is read); reads inside the virtual disk either succeed or return an error;
//! when the image opens for writing, a write that succeeds reads back exactly, and a block
//! freed by discard or zero writes reads as zeros.
#![no_main]

use std::sync::OnceLock;

use imagefmt::extent::GuestRead;
use imagefmt::offsets::GuestOffset;
use imagefmt::raw::RawReader;
use imagefmt::io::MemBackend;
use imagefmt::vdi::{VdiHeader, VdiImage, HEADER_REGION_LEN};
use libfuzzer_sys::{fuzz_target, Corpus};

/// Bytes of the patterned parent: as large as the largest input (4 blocks). A differencing
/// image with a larger virtual size reads zeros past it, as it would over a shorter parent.
const PARENT_LEN: usize = 4 << 20;

/// A parent that reads a position-dependent pattern (what a differencing image falls through
/// to): a raw image on memory, made once, so the target implements no `GuestRead` itself and
/// follows the trait as it grows.
fn patterned() -> Box<dyn GuestRead> {
    static BYTES: OnceLock<MemBackend> = OnceLock::new();
    let backend = BYTES
        .get_or_init(|| MemBackend::new((0..PARENT_LEN).map(|i| (i % 251) as u8 | 1).collect()));
    Box::new(RawReader::new(backend).expect("a memory backend has a length"))
}

fn exercise(data: &[u8], header: &VdiHeader, parent: bool) {
    let below = || parent.then(patterned);
    if let Ok(image) = VdiImage::open(MemBackend::new(data.to_vec()), header.clone(), below()) {
        let size = image.virtual_size();
        let mut buf = vec![0u8; 1 << 16];
        for offset in [0, 4096, size / 2, size.saturating_sub(1 << 16)] {
            let len = size.saturating_sub(offset).min(buf.len() as u64) as usize;
            let _ = image.read_at(&mut buf[..len], GuestOffset(offset));
        }
    }
    let rw = MemBackend::new(data.to_vec()).with_limit(64 << 20);
    let Ok(mut image) = VdiImage::open_rw(rw, header.clone(), below(), false) else {
        return;
    };
    let size = image.virtual_size();
    if size < 8192 {
        return;
    }
    let pattern = [0x5a; 4096];
    if image.write_at(&pattern, 4096).is_ok() {
        let mut back = [0u8; 4096];
        if image.read_at(&mut back, GuestOffset(4096)).is_ok() {
            assert_eq!(back, pattern, "a successful write must read back");
        }
    }
    let whole = size.min(1 << 20);
    if whole == 1 << 20 && image.write_zeroes(0, whole).is_ok() {
        let mut back = vec![1u8; whole as usize];
        if image.read_at(&mut back, GuestOffset(0)).is_ok() {
            assert!(
                back.iter().all(|&b| b == 0),
                "zeroed block must read as zeros"
            );
        }
    }
    let _ = image.discard(0, size.min(2 << 20));
    let _ = imagefmt::vdi::check::check(image.backend());
}

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() < 0x48 || data.len() > (4 << 20) {
        return Corpus::Reject;
    }
    let _ = imagefmt::vdi::check::check(&MemBackend::new(data.to_vec()));
    let Ok(header) = VdiHeader::parse(&data[..data.len().min(HEADER_REGION_LEN)]) else {
        return Corpus::Keep;
    };
    exercise(data, &header, false);
    exercise(data, &header, true);
    Corpus::Keep
});
