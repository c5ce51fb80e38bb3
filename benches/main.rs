//! Criterion benches for cowclone (see BENCHMARKS.md for figures and method).
//!
//! `overlay_create`: making a qcow2 overlay on a 1 GiB base, measured in one run on one
//! filesystem:
//!
//! | function                  | what one iteration does                                          |
//! |---------------------------|------------------------------------------------------------------|
//! | `native_library`          | `Qcow2Builder::new(p).backing("base.qcow2").backing_format(Qcow2).create()` |
//! | `native_library_detect`   | the same without `backing_format` (format read from the magic)   |
//! | `native_library_unopened` | the same with `without_opening_backing().size(1 GiB)` (`-u`)      |
//! | `qemu_img_spawn`          | `qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 p`, waited   |
//! | `bare_write`              | `create_new` + pwrite of the library's exact byte ranges + `set_len` + close |
//! | `native_durable`          | `native_library` with `.durable(true)`                           |
//! | `bare_write_fsync`        | `bare_write` + fsync(file) + fsync(directory)                    |
//!
//! Every iteration gets a fresh file name in a directory of its function's own (with its own
//! base). The files of a sample are truncated to nothing after its clock stops (`iter_custom`)
//! and deleted when the run ends, not between samples: see [`Workdir::timed_batch`] and
//! [`Fixture::workdir`] for why deleting during the run would distort every later create.
//!
//! `header`: the pure-CPU paths: `HeaderCluster::parse` of an overlay's cluster 0,
//! `create_on(MemBackend)` (with and without opening the base), and `InitialLayout::compute`.
//!
//! Run: `cargo bench -p cowclone-benches -- --noplot` (about 1 minute once built;
//! `-- overlay_create` for one group). Leave ~5 minutes between runs: each run's cleanup frees
//! tens of thousands of inodes, which slow down creates in their block groups for that long
//! on this machine's journal-less ext4 (see [`Fixture::workdir`]).

use std::cell::Cell;
use std::fs::{self, File, OpenOptions};
use std::hint::black_box;
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, SamplingMode};
use imagefmt::io::{Backend, MemBackend};
use imagefmt::qcow2::create::{plan, BackingReference};
use imagefmt::qcow2::header::l1_entries_for;
use imagefmt::qcow2::layout::InitialLayout;
use imagefmt::qcow2::{refcount, CreateOptions, HeaderCluster};
use imagefmt::{ImageFormat, Qcow2Builder};

const BASE_NAME: &str = "base.qcow2";
const BASE_SIZE: u64 = 1 << 30;

/// The bench root: one subdirectory per benchmark function, each with its own base image.
struct Fixture {
    root: tempfile::TempDir,
    /// (offset, bytes) of every write the library issues for an overlay, in its order.
    regions: Vec<(u64, Vec<u8>)>,
    /// The overlay's final length.
    file_len: u64,
    /// The overlay's complete contents, as the library writes them onto memory.
    image: Vec<u8>,
}

/// A directory holding `base.qcow2` (1 GiB, made by the library) and the overlays of one
/// benchmark function.
struct Workdir {
    path: PathBuf,
    counter: Cell<u64>,
}

impl Fixture {
    fn new() -> Self {
        // CARGO_TARGET_TMPDIR is target/tmp: on the same filesystem as the workspace.
        let root = Path::new(env!("CARGO_TARGET_TMPDIR"));
        fs::create_dir_all(root).expect("creating the bench root");
        let root = tempfile::Builder::new()
            .prefix("overlay-bench.")
            .tempdir_in(root)
            .expect("creating the bench directory");
        // ext4's Orlov allocator spreads the subdirectories of a "top directory" over random
        // block groups: each benchmark function then allocates inodes away from the groups where
        // other builds and tests keep creating and deleting files (see `timed_batch`).
        match Command::new("chattr").arg("+T").arg(root.path()).status() {
            Ok(status) if status.success() => {}
            other => eprintln!("warning: chattr +T on the bench directory failed: {other:?}"),
        }

        // The overlay, onto memory: the reference bytes for `bare_write`.
        let mem = MemBackend::default();
        Qcow2Builder::new(root.path().join("reference.qcow2"))
            .backing(BASE_NAME)
            .backing_format(ImageFormat::Qcow2)
            .without_opening_backing()
            .size(BASE_SIZE)
            .create_on(&mem)
            .expect("creating the reference overlay in memory");
        let image = mem.into_inner();
        let (regions, file_len) = library_write_regions(&image);

        // The regions reproduce the library's image exactly.
        let replay = MemBackend::default();
        for (offset, bytes) in &regions {
            replay.write_all_at(bytes, *offset).unwrap();
        }
        replay.set_len(file_len).unwrap();
        assert_eq!(
            replay.into_inner(),
            image,
            "bare regions differ from the library's image"
        );

        Self {
            root,
            regions,
            file_len,
            image,
        }
    }

    fn path(&self) -> &Path {
        self.root.path()
    }

    /// A new directory with a fresh 1 GiB base image in it, in a block group where creating a
    /// file costs what it normally does.
    ///
    /// This filesystem is ext4 *without a journal*: there, allocating an inode skips, one by
    /// one, every free inode of the group freed in the last 60–300 s (`recently_deleted()` in
    /// fs/ext4/ialloc.c). In a group where thousands of files were just deleted (by the last
    /// bench run's cleanup, or by builds and tests), each create then costs ~0.6–1 ms instead of
    /// ~30 µs, for qemu-img and the library alike. So each candidate directory is probed with a
    /// few creates and abandoned (not deleted) if they are that slow.
    fn workdir(&self, name: &str) -> Workdir {
        const PROBES: u32 = 64;
        // An empty create costs ~10–20 µs in a clean group here; 0.5–1 ms in a poisoned one.
        const FAST: Duration = Duration::from_micros(40);
        const ATTEMPTS: u32 = 8;
        let run = self.path().file_name().unwrap().to_string_lossy();
        let run = run.trim_start_matches("overlay-bench.").to_owned();
        let mut best: Option<(Duration, PathBuf, u64)> = None;
        for attempt in 0..ATTEMPTS {
            // A unique name: the name's hash decides where ext4 starts looking for a group.
            let path = self.path().join(format!("{name}.{run}.{attempt}"));
            fs::create_dir(&path).expect("creating a bench subdirectory");
            let ino = fs::metadata(&path).map(|m| m.ino()).unwrap_or(0);
            let start = Instant::now();
            for i in 0..PROBES {
                File::create_new(path.join(format!("probe-{i}"))).expect("probe create");
            }
            let per_create = start.elapsed() / PROBES;
            if best
                .as_ref()
                .is_none_or(|(fastest, ..)| per_create < *fastest)
            {
                best = Some((per_create, path, ino));
            }
            if per_create < FAST {
                break;
            }
            eprintln!(
                "workdir {name}: directory inode {ino}: {per_create:?} per probe create \
                 (recently freed inodes in its block group?); trying another"
            );
        }
        let (per_create, path, ino) = best.expect("at least one attempt");
        eprintln!("workdir {name}: directory inode {ino}, {per_create:?} per probe create");
        Qcow2Builder::new(path.join(BASE_NAME))
            .size(BASE_SIZE)
            .create()
            .expect("creating the 1 GiB base image");
        Workdir {
            path,
            counter: Cell::new(0),
        }
    }
}

impl Workdir {
    /// A name never used before in this directory.
    fn fresh_path(&self) -> PathBuf {
        let n = self.counter.get();
        self.counter.set(n + 1);
        self.path.join(format!("ov-{n}.qcow2"))
    }

    /// Runs `make` once per iteration on fresh paths, timing only the loop.
    ///
    /// The files are then truncated to nothing, outside the clock, but not deleted until the
    /// run ends: on ext4 without a journal (this machine), every inode freed in the last
    /// 60–300 s is skipped one by one by `recently_deleted()` when a new inode is allocated, so
    /// unlinking thousands of files between samples made each later create cost ~0.6–1 ms
    /// instead of ~30 µs (measured; see BENCHMARKS.md). Truncating keeps the disk and the page
    /// cache from filling up, and no data is ever written back.
    fn timed_batch(&self, iters: u64, mut make: impl FnMut(&Path)) -> Duration {
        let paths: Vec<PathBuf> = (0..iters).map(|_| self.fresh_path()).collect();
        let start = Instant::now();
        for path in &paths {
            make(path);
        }
        let elapsed = start.elapsed();
        for path in &paths {
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(0))
                .expect("truncating a created overlay");
        }
        elapsed
    }
}

/// What `InitialLayout::write` writes for `image`: cluster 0 up to the end of the backing name,
/// the refcount-table entries, the used prefix of each refcount block; then the length.
fn library_write_regions(image: &[u8]) -> (Vec<(u64, Vec<u8>)>, u64) {
    let backing = BackingReference {
        name: BASE_NAME.to_owned(),
        format: "qcow2".to_owned(),
    };
    let options = CreateOptions::default();
    let (cluster, layout) = plan(BASE_SIZE, &options, Some(&backing)).unwrap();
    let slice = |offset: u64, len: usize| {
        let start = offset as usize;
        (offset, image[start..start + len].to_vec())
    };
    let mut regions = vec![slice(0, cluster.to_bytes().unwrap().len())];
    regions.push(slice(
        layout.refcount_table_offset,
        8 * layout.refcount_blocks.len(),
    ));
    let per_block = refcount::entries_per_block(layout.cluster_bits, layout.refcount_order);
    let bits = 1u64 << layout.refcount_order;
    for (index, &offset) in layout.refcount_blocks.iter().enumerate() {
        let in_use = layout
            .used_clusters
            .saturating_sub(index as u64 * per_block)
            .min(per_block);
        regions.push(slice(offset, (in_use * bits).div_ceil(8) as usize));
    }
    (regions, layout.file_len)
}

fn native(path: &Path, format: Option<ImageFormat>, durable: bool) {
    let mut builder = Qcow2Builder::new(path).backing(BASE_NAME).durable(durable);
    if let Some(format) = format {
        builder = builder.backing_format(format);
    }
    black_box(builder.create().expect("native overlay creation"));
}

fn native_unopened(path: &Path) {
    black_box(
        Qcow2Builder::new(path)
            .backing(BASE_NAME)
            .backing_format(ImageFormat::Qcow2)
            .without_opening_backing()
            .size(BASE_SIZE)
            .create()
            .expect("native overlay creation without opening the base"),
    );
}

fn qemu_img(path: &Path) {
    let status = Command::new("qemu-img")
        .args([
            "create", "-q", "-f", "qcow2", "-b", BASE_NAME, "-F", "qcow2",
        ])
        .arg(path)
        .status()
        .unwrap_or_else(|e| qemu_img_missing(e));
    assert!(status.success(), "qemu-img create failed: {status}");
}

fn qemu_img_missing(e: std::io::Error) -> ! {
    if e.kind() == ErrorKind::NotFound {
        panic!("qemu-img not found: install the Debian package qemu-utils (apt-get install qemu-utils)");
    }
    panic!("running qemu-img: {e}");
}

fn bare(fx: &Fixture, path: &Path, durable: bool) {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .expect("bare create");
    for (offset, bytes) in &fx.regions {
        FileExt::write_all_at(&file, bytes, *offset).expect("bare pwrite");
    }
    file.set_len(fx.file_len).expect("bare set_len");
    if durable {
        file.sync_all().expect("bare fsync");
        drop(file);
        File::open(path.parent().unwrap())
            .and_then(|d| d.sync_all())
            .expect("bare directory fsync");
    }
}

/// Once per run: checks that the three writers make the same image and prints what each
/// allocates on disk (after fsync, so delayed allocation is settled), and the filesystem.
fn report_fixture(fx: &Fixture) {
    let fs_type = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(fx.path())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_else(|_| "?".into());
    eprintln!(
        "bench dir: {} (filesystem type per statfs: {fs_type}; ext2/ext3 is ext4's magic)",
        fx.path().display()
    );
    let version = Command::new("qemu-img")
        .arg("--version")
        .output()
        .unwrap_or_else(|e| qemu_img_missing(e));
    eprintln!(
        "{}",
        String::from_utf8_lossy(&version.stdout)
            .lines()
            .next()
            .unwrap_or("")
    );

    let probe = fx.workdir("probe");
    let ours = probe.fresh_path();
    let theirs = probe.fresh_path();
    let plain = probe.fresh_path();
    native(&ours, Some(ImageFormat::Qcow2), false);
    qemu_img(&theirs);
    bare(fx, &plain, false);
    for (name, path) in [
        ("native_library", &ours),
        ("qemu-img", &theirs),
        ("bare_write", &plain),
    ] {
        File::open(path).and_then(|f| f.sync_all()).unwrap();
        let meta = fs::metadata(path).unwrap();
        let bytes = fs::read(path).unwrap();
        eprintln!(
            "overlay by {name:<14}: length {} B, allocated {} B (st_blocks {} x 512), \
             identical to the library's in-memory image: {}",
            meta.len(),
            meta.blocks() * 512,
            meta.blocks(),
            bytes == fx.image
        );
    }
}

fn overlay_create(c: &mut Criterion) {
    let fx = Fixture::new();
    report_fixture(&fx);

    let mut group = c.benchmark_group("overlay_create");
    // Every iteration leaves an (emptied) file until the run ends: keep the iteration counts,
    // hence the measurement times, modest (~25k files per microsecond-scale function).
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);

    let wd = fx.workdir("native_library");
    group.bench_function("native_library", |b| {
        b.iter_custom(|iters| wd.timed_batch(iters, |p| native(p, Some(ImageFormat::Qcow2), false)))
    });
    let wd = fx.workdir("native_library_detect");
    group.bench_function("native_library_detect", |b| {
        b.iter_custom(|iters| wd.timed_batch(iters, |p| native(p, None, false)))
    });
    let wd = fx.workdir("native_library_unopened");
    group.bench_function("native_library_unopened", |b| {
        b.iter_custom(|iters| wd.timed_batch(iters, native_unopened))
    });
    let wd = fx.workdir("bare_write");
    group.bench_function("bare_write", |b| {
        b.iter_custom(|iters| wd.timed_batch(iters, |p| bare(&fx, p, false)))
    });

    // A process spawn costs milliseconds: fewer, flat samples.
    group
        .sampling_mode(SamplingMode::Flat)
        .warm_up_time(Duration::from_secs(1))
        .sample_size(20)
        .measurement_time(Duration::from_secs(5));
    let wd = fx.workdir("qemu_img_spawn");
    group.bench_function("qemu_img_spawn", |b| {
        b.iter_custom(|iters| wd.timed_batch(iters, qemu_img))
    });

    // fsync pair: milliseconds too.
    group
        .sample_size(30)
        .measurement_time(Duration::from_secs(4));
    let wd = fx.workdir("native_durable");
    group.bench_function("native_durable", |b| {
        b.iter_custom(|iters| wd.timed_batch(iters, |p| native(p, Some(ImageFormat::Qcow2), true)))
    });
    let wd = fx.workdir("bare_write_fsync");
    group.bench_function("bare_write_fsync", |b| {
        b.iter_custom(|iters| wd.timed_batch(iters, |p| bare(&fx, p, true)))
    });
    group.finish();
}

fn header(c: &mut Criterion) {
    let fx = Fixture::new();
    let cluster0 = fx.image[..64 << 10].to_vec();
    let wd = fx.workdir("header");
    let overlay_path = wd.fresh_path();

    let mut group = c.benchmark_group("header");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(50);

    group.bench_function("parse_overlay_cluster0", |b| {
        b.iter(|| HeaderCluster::parse(black_box(&cluster0)).unwrap())
    });
    // Pure CPU: the base is not opened (size and format given), the image goes to memory.
    group.bench_function("create_on_mem", |b| {
        b.iter(|| {
            let mem = MemBackend::default();
            Qcow2Builder::new(&overlay_path)
                .backing(BASE_NAME)
                .backing_format(ImageFormat::Qcow2)
                .without_opening_backing()
                .size(BASE_SIZE)
                .create_on(&mem)
                .unwrap();
            mem
        })
    });
    // The same, opening and reading the base's header from the filesystem (as `create` does).
    group.bench_function("create_on_mem_open_backing", |b| {
        b.iter(|| {
            let mem = MemBackend::default();
            Qcow2Builder::new(&overlay_path)
                .backing(BASE_NAME)
                .backing_format(ImageFormat::Qcow2)
                .create_on(&mem)
                .unwrap();
            mem
        })
    });
    for (name, size, cluster_bits) in [("1G_64k", 1u64 << 30, 16u32), ("10G_512B", 10 << 30, 9)] {
        let l1 = l1_entries_for(size, cluster_bits, false);
        group.bench_with_input(BenchmarkId::new("layout_compute", name), &l1, |b, &l1| {
            b.iter(|| InitialLayout::compute(black_box(cluster_bits), 4, black_box(l1)).unwrap())
        });
    }
    group.finish();
}

criterion_group!(benches, overlay_create, header);
criterion_main!(benches);
