//! Criterion bench `clone_formats` (issue 4 item 8): making a clone of a 1 GiB base three ways,
//! on one filesystem in one run:
//!
//! | function               | one iteration                                                    |
//! |------------------------|------------------------------------------------------------------|
//! | `native_vdi_diff`      | `imagefmt::vdi::create_differencing(base.vdi, new)`: opens the base, reads its header and block map, writes the diff's header and map |
//! | `native_qcow2_overlay` | `Qcow2Builder::new(new).backing("base.qcow2").backing_format(Qcow2).create()` |
//! | `qemu_img_create`      | `qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 new`, waited for |
//!
//! Files are made under `target/tmp` with fresh names and removed when the run ends (see
//! `main.rs` for why not between samples). Run: `cargo bench -p cowclone-benches --bench
//! clone_formats`; figures in BENCHMARKS.md.

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode};
use imagefmt::new_file::NewFileMode;
use imagefmt::{ImageFormat, Qcow2Builder};

const BASE_SIZE: u64 = 1 << 30;

/// A directory with both bases and a counter for fresh clone names.
struct Bases {
    dir: tempfile::TempDir,
    counter: Cell<u64>,
}

impl Bases {
    fn new() -> Self {
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        std::fs::create_dir_all(root).expect("creating target/tmp");
        let dir = tempfile::Builder::new()
            .prefix("clone-formats.")
            .tempdir_in(root)
            .expect("creating the bench directory");
        Qcow2Builder::new(dir.path().join("base.qcow2"))
            .size(BASE_SIZE)
            .create()
            .expect("creating base.qcow2");
        imagefmt::vdi::create_dynamic(
            &dir.path().join("base.vdi"),
            BASE_SIZE,
            NewFileMode::default(),
        )
        .expect("creating base.vdi");
        Self {
            dir,
            counter: Cell::new(0),
        }
    }

    fn fresh(&self, extension: &str) -> PathBuf {
        let n = self.counter.get();
        self.counter.set(n + 1);
        self.dir.path().join(format!("clone-{n}.{extension}"))
    }

    /// Times `iters` clones made by `make` on fresh names.
    fn timed(&self, iters: u64, extension: &str, make: impl Fn(&Self, &Path)) -> Duration {
        let paths: Vec<PathBuf> = (0..iters).map(|_| self.fresh(extension)).collect();
        let start = Instant::now();
        for path in &paths {
            make(self, path);
        }
        start.elapsed()
    }
}

fn native_vdi(bases: &Bases, path: &Path) {
    imagefmt::vdi::create_differencing(
        &bases.dir.path().join("base.vdi"),
        path,
        NewFileMode::default(),
    )
    .expect("creating a VDI diff");
}

fn native_qcow2(_: &Bases, path: &Path) {
    Qcow2Builder::new(path)
        .backing("base.qcow2")
        .backing_format(ImageFormat::Qcow2)
        .create()
        .expect("creating a qcow2 overlay");
}

fn qemu_img(_: &Bases, path: &Path) {
    let status = Command::new("qemu-img")
        .args([
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
        ])
        .arg(path)
        .status()
        .unwrap_or_else(|e| {
            panic!("running qemu-img (Debian package qemu-utils): {e}");
        });
    assert!(status.success(), "qemu-img create failed: {status}");
}

fn clone_formats(c: &mut Criterion) {
    let bases = Bases::new();
    let mut group = c.benchmark_group("clone_formats");
    group
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    group.bench_function("native_vdi_diff", |b| {
        b.iter_custom(|iters| bases.timed(iters, "vdi", native_vdi))
    });
    group.bench_function("native_qcow2_overlay", |b| {
        b.iter_custom(|iters| bases.timed(iters, "qcow2", native_qcow2))
    });
    group
        .sampling_mode(SamplingMode::Flat)
        .sample_size(10)
        .measurement_time(Duration::from_secs(3));
    group.bench_function("qemu_img_create", |b| {
        b.iter_custom(|iters| bases.timed(iters, "qcow2", qemu_img))
    });
    group.finish();
}

criterion_group!(benches, clone_formats);
criterion_main!(benches);
