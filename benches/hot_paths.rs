//! Criterion bench `hot_paths`: the library's per-request paths, on memory (no filesystem), so
//! that a regression in the code shows rather than the disk's mood:
//!
//! | function                  | one iteration                                                  |
//! |---------------------------|----------------------------------------------------------------|
//! | `qcow2_read_4k_allocated` | L1/L2 lookup (L2 cached) + 4 KiB copy, at a pseudo-random allocated offset |
//! | `qcow2_read_4k_backing`   | lookup in an overlay, unallocated → read from its qcow2 base    |
//! | `qcow2_write_4k_in_place` | 4 KiB rewrite inside an allocated cluster                       |
//! | `qcow2_write_64k_new`     | 64 KiB write to an unallocated cluster (refcount + L2 + data)   |
//! | `vdi_read_4k_allocated`   | block map lookup + 4 KiB copy                                  |
//! | `vdi_write_64k_new`       | 64 KiB write into a new 1 MiB block (block appended, map entry) |
//!
//! Header parsing and overlay planning are in `main.rs` (group `header`). Run:
//! `cargo bench -p cowclone-benches --bench hot_paths`.

use std::hint::black_box;
use std::path::Path;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use imagefmt::extent::GuestRead;
use imagefmt::io::MemBackend;
use imagefmt::offsets::GuestOffset;
use imagefmt::qcow2::image::Qcow2Image;
use imagefmt::qcow2::write::WriteOptions;
use imagefmt::qcow2::HeaderCluster;
use imagefmt::vdi::VdiImage;
use imagefmt::{ImageFormat, Qcow2Builder};

const SIZE: u64 = 64 << 20;
const CLUSTER: u64 = 64 << 10;

/// A new empty qcow2 image on memory, open for writing; `backing` (if any) below it.
fn qcow2_on_mem(backing: Option<Box<dyn GuestRead>>) -> Qcow2Image<MemBackend> {
    let mem = MemBackend::default();
    let mut builder = Qcow2Builder::new(Path::new("/mem/image.qcow2")).size(SIZE);
    if backing.is_some() {
        builder = builder
            .backing("base.qcow2")
            .backing_format(ImageFormat::Qcow2)
            .without_opening_backing();
    }
    builder.create_on(&mem).expect("creating on memory");
    let cluster = HeaderCluster::read_from(&mem).expect("reading back the header");
    Qcow2Image::open_rw(mem, cluster, backing, WriteOptions::default()).expect("opening")
}

/// A qcow2 image on memory with every cluster written.
fn full_qcow2() -> Qcow2Image<MemBackend> {
    let mut image = qcow2_on_mem(None);
    let data = vec![0x5Au8; 1 << 20];
    for offset in (0..SIZE).step_by(data.len()) {
        image.write_at(&data, offset).unwrap();
    }
    image
}

/// A new dynamic VDI on memory, open for writing.
fn vdi_on_mem() -> VdiImage<MemBackend> {
    let mem = MemBackend::default();
    let header = imagefmt::vdi::create::write_dynamic(&mem, SIZE).expect("creating VDI on memory");
    VdiImage::open_rw(mem, header, None, false).expect("opening VDI")
}

/// Pseudo-random 4 KiB-aligned offsets inside the disk (a fixed LCG: reproducible).
fn offsets() -> Vec<u64> {
    let mut x = 12345u64;
    (0..4096)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 20) % (SIZE / 4096)) * 4096
        })
        .collect()
}

fn hot_paths(c: &mut Criterion) {
    let mut group = c.benchmark_group("hot_paths");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1))
        .sample_size(30);
    let offsets = offsets();
    let mut buf = vec![0u8; 4096];

    let full = full_qcow2();
    let mut i = 0;
    group.bench_function("qcow2_read_4k_allocated", |b| {
        b.iter(|| {
            i = (i + 1) % offsets.len();
            full.read_at(&mut buf, GuestOffset(offsets[i])).unwrap();
            black_box(&buf);
        })
    });

    let overlay = qcow2_on_mem(Some(Box::new(full_qcow2())));
    group.bench_function("qcow2_read_4k_backing", |b| {
        b.iter(|| {
            i = (i + 1) % offsets.len();
            overlay.read_at(&mut buf, GuestOffset(offsets[i])).unwrap();
            black_box(&buf);
        })
    });

    let mut full = full;
    let data = vec![0xA5u8; 4096];
    group.bench_function("qcow2_write_4k_in_place", |b| {
        b.iter(|| {
            i = (i + 1) % offsets.len();
            full.write_at(&data, offsets[i]).unwrap();
        })
    });

    let chunk = vec![0xC3u8; CLUSTER as usize];
    group.bench_function("qcow2_write_64k_new", |b| {
        b.iter_batched_ref(
            || qcow2_on_mem(None),
            |image| image.write_at(&chunk, 3 * CLUSTER).unwrap(),
            // One fresh image per iteration: batching hundreds of them measures page faults and
            // reallocation of the in-memory files instead of the write path.
            BatchSize::PerIteration,
        )
    });

    let mut vdi = vdi_on_mem();
    let block = vec![0x3Cu8; 1 << 20];
    for offset in (0..SIZE).step_by(block.len()) {
        vdi.write_at(&block, offset).unwrap();
    }
    group.bench_function("vdi_read_4k_allocated", |b| {
        b.iter(|| {
            i = (i + 1) % offsets.len();
            vdi.read_at(&mut buf, GuestOffset(offsets[i])).unwrap();
            black_box(&buf);
        })
    });
    group.bench_function("vdi_write_64k_new", |b| {
        b.iter_batched_ref(
            vdi_on_mem,
            |image| image.write_at(&chunk, 5 << 20).unwrap(),
            BatchSize::PerIteration,
        )
    });
    group.finish();
}

criterion_group!(benches, hot_paths);
criterion_main!(benches);
