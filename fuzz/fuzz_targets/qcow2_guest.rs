//! Open + guest read + write + check of arbitrary bytes as a qcow2 image, on memory.
//!
//! Properties: never a panic; memory bounded by the input (every table must lie inside the
//! file before it is read); reads inside the virtual disk either succeed or return an error;
//! when the image opens for writing, a write that succeeds reads back exactly.
#![no_main]

use imagefmt::extent::GuestRead;
use imagefmt::offsets::GuestOffset;
use imagefmt::io::MemBackend;
use imagefmt::qcow2::image::Qcow2Image;
use imagefmt::qcow2::write::WriteOptions;
use imagefmt::qcow2::check::Repair;
use imagefmt::qcow2::HeaderCluster;
use libfuzzer_sys::{fuzz_target, Corpus};

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() < 72 {
        return Corpus::Reject;
    }
    // 16 MiB per in-memory file: several live per input and ASan keeps freed memory, so larger
    // limits tripped libFuzzer's 512 MB RSS limit (find c39d3d7, tests/regression.rs).
    const LIMIT: u64 = 16 << 20;
    let backend = MemBackend::new(data.to_vec()).with_limit(LIMIT);
    let Ok(cluster) = HeaderCluster::read_from(&backend) else {
        return Corpus::Keep;
    };
    if let Ok(image) = Qcow2Image::open(MemBackend::new(data.to_vec()), cluster.clone(), None) {
        let size = image.virtual_size();
        let mut buf = vec![0u8; 65536];
        for offset in [0, 4096, size / 2, size.saturating_sub(65536)] {
            let len = size.saturating_sub(offset).min(buf.len() as u64) as usize;
            let _ = image.read_at(&mut buf[..len], GuestOffset(offset));
        }
    }
    // check and repair never panic (like qemu, one repair pass may report a rebuilt refcount
    // structure that is still broken; the CLI re-checks afterwards, as qemu-img does).
    let _ = imagefmt::qcow2::check::check(&MemBackend::new(data.to_vec()), Repair::None);
    let repaired = MemBackend::new(data.to_vec()).with_limit(LIMIT);
    if imagefmt::qcow2::check::check(&repaired, Repair::All).is_ok() {
        let _ = imagefmt::qcow2::check::check(&repaired, Repair::None);
    }
    let rw = MemBackend::new(data.to_vec()).with_limit(LIMIT);
    if let Ok(mut image) = Qcow2Image::open_rw(rw, cluster, None, WriteOptions::default()) {
        let size = image.virtual_size();
        if size >= 8192 {
            let pattern = [0x5a; 4096];
            if image.write_at(&pattern, 4096).is_ok() {
                let mut back = [0u8; 4096];
                if image.read_at(&mut back, GuestOffset(4096)).is_ok() {
                    assert_eq!(back, pattern, "a successful write must read back");
                }
            }
            let _ = image.write_zeroes(0, size.min(1 << 20));
            let _ = image.discard(0, size.min(1 << 20));
        }
    }
    Corpus::Keep
});
