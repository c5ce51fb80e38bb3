//! `cowclone bench ops`: whole-image operations (convert, compare, commit, map, check, info,
//! measure, create, dd, rebase, resize, snapshot, amend, bitmap) by the `cowclone` binary and
//! by `qemu-img`, as processes, on one workload, in one run.
//!
//! ```text
//! workload: a real directory tree ─► mkfs.ext4 -d into a sparse raw file (or --image, converted
//!           to raw) ─► qemu-img convert: image.qcow2, image-zlib.qcow2 (-c, zlib);
//!           chain: image.qcow2 ◄─ mid.qcow2 ◄─ top.qcow2 (qemu-io writes in each overlay);
//!           new-base.qcow2: a copy of image.qcow2 with one region rewritten (rebase's target)
//! per operation: run 0 (untimed): cowclone, qemu-img ─► sizes, judged by qemu-img ─► mismatch = error
//!                run 1..=N:       cowclone, qemu-img, each under GNU time (wall time, peak RSS)
//!                (syncfs before each command; outputs removed after each run)
//! ```
//!
//! Both tools run as processes with the same arguments where their syntax agrees, each with a
//! fresh output file, on inputs that run 0 has brought into the page cache for both alike. The
//! wall time is the command's; the time until its output is on disk (the command, then fsync of
//! what it wrote) is reported beside it, so that leaving more dirty data behind is not free.
//! Operations that change an image in place work on fresh copies made before the clock starts:
//! `commit` on copies of the chain's two overlays, `rebase` on a copy of mid.qcow2, `resize`,
//! `snapshot`, `amend` and `bitmap` on copies of image.qcow2. `resize`, `snapshot` and `amend`
//! run two commands on the same copy (there and back again); each is timed and reported as an
//! operation of its own.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Instant, SystemTime};

use indicatif::ProgressBar;
use serde::Serialize;
use serde_json::Value;

use crate::stats::{median, p90, round1, round_significant};
use crate::tools;
use crate::{fs_facts, BenchError, Result};

/// The raw workload image's file name inside the bench directory.
pub const RAW: &str = "image.raw";
/// The qcow2 conversion of [`RAW`].
pub const QCOW2: &str = "image.qcow2";
/// The zlib-compressed qcow2 conversion of [`RAW`].
pub const ZLIB_QCOW2: &str = "image-zlib.qcow2";
/// The first overlay on [`QCOW2`] (its backing file named by absolute path).
pub const MID: &str = "mid.qcow2";
/// The second overlay, on [`MID`] (named relatively): the top of the 3-deep chain.
pub const TOP: &str = "top.qcow2";
/// A copy of [`QCOW2`] with one region (outside [`MID`]'s writes) rewritten: the base `rebase`
/// moves [`MID`] onto, which shares most of its data with the old one.
pub const NEW_BASE: &str = "new-base.qcow2";
/// The internal snapshot and the bitmap the `snapshot` and `bitmap` operations make.
const TAG: &str = "bench";

/// Smallest workload accepted: room for the overlays' writes and an ext4 filesystem.
pub const MIN_SIZE: u64 = 16 << 20;

/// Where the workload comes from.
#[derive(Debug, Clone)]
pub enum Source {
    /// An ext4 filesystem built from this directory tree (`mkfs.ext4 -d`) in a sparse raw file
    /// of [`Config::size`] bytes.
    Tree(PathBuf),
    /// An existing image (any format qemu-img reads; never modified), converted to raw first.
    Image(PathBuf),
}

impl Source {
    /// The default tree: `/usr/share`, or `/usr/lib` where there is no `/usr/share`.
    pub fn default_tree() -> Source {
        let share = Path::new("/usr/share");
        Source::Tree(if share.is_dir() {
            share.to_owned()
        } else {
            PathBuf::from("/usr/lib")
        })
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Config {
    /// The workload's origin.
    pub source: Source,
    /// The raw image's size with [`Source::Tree`] (at least [`MIN_SIZE`]).
    pub size: u64,
    /// Timed runs per operation and tool (after one untimed, judged run).
    pub runs: u32,
    /// A temporary bench directory is made (and removed) in this directory.
    pub dir_parent: PathBuf,
    /// The `cowclone` binary to measure.
    pub cowclone: PathBuf,
    /// The operations to measure, in [`Operation::ALL`] order (`--only`; all of them by
    /// default). The workload is built in full either way.
    pub operations: Vec<Operation>,
}

/// An operation measured on both tools.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    /// `convert -f qcow2 -O raw image.qcow2 OUT`
    ConvertQcow2Raw,
    /// `convert -f qcow2 -O raw image-zlib.qcow2 OUT`
    ConvertZlibRaw,
    /// `convert -f qcow2 -O raw top.qcow2 OUT` (3-deep chain)
    ConvertChainRaw,
    /// `convert -f raw -O qcow2 image.raw OUT`
    ConvertRawQcow2,
    /// `convert -f raw -O qcow2 -c image.raw OUT`
    ConvertRawQcow2Compressed,
    /// `compare -f qcow2 -F raw image.qcow2 image.raw` (identical images: read in full)
    Compare,
    /// `commit top.qcow2` on fresh copies of mid.qcow2 and top.qcow2
    Commit,
    /// `map --output json top.qcow2`
    Map,
    /// `check --output json image.qcow2`
    Check,
    /// `info -f qcow2 top.qcow2` (human text)
    Info,
    /// `info -f qcow2 --output json --backing-chain top.qcow2` (the 3-deep chain)
    InfoChainJson,
    /// `measure -f qcow2 -O qcow2 --output json image.qcow2`
    Measure,
    /// `create -q -f qcow2 -b image.qcow2 -F qcow2 OUT` (an overlay of the workload)
    Create,
    /// `dd -f qcow2 -O raw bs=1M if=image.qcow2 of=OUT`
    Dd,
    /// `rebase -f qcow2 -b new-base.qcow2 -F qcow2 mid.qcow2` (safe: the data that differs
    /// between the old base and the new one is copied into mid) on a fresh copy of mid.qcow2
    Rebase,
    /// `resize -f qcow2 COPY +1G`, then `resize -f qcow2 --shrink COPY SIZE` back to the
    /// workload's size, on a fresh copy of image.qcow2
    Resize,
    /// `snapshot -f qcow2 -c bench COPY`, then `snapshot -f qcow2 -a bench COPY`, on a fresh
    /// copy of image.qcow2
    Snapshot,
    /// `amend -f qcow2 -o compat=0.10 COPY`, then `amend -f qcow2 -o compat=1.1 COPY`, on a
    /// fresh copy of image.qcow2
    Amend,
    /// `bitmap -f qcow2 --add COPY bench` on a fresh copy of image.qcow2
    Bitmap,
}

/// The two tools measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Cowclone,
    QemuImg,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Cowclone => "cowclone",
            Tool::QemuImg => "qemu-img",
        }
    }
}

impl Operation {
    /// Every operation, in report order.
    pub const ALL: [Operation; 19] = [
        Operation::ConvertQcow2Raw,
        Operation::ConvertZlibRaw,
        Operation::ConvertChainRaw,
        Operation::ConvertRawQcow2,
        Operation::ConvertRawQcow2Compressed,
        Operation::Compare,
        Operation::Commit,
        Operation::Map,
        Operation::Check,
        Operation::Info,
        Operation::InfoChainJson,
        Operation::Measure,
        Operation::Create,
        Operation::Dd,
        Operation::Rebase,
        Operation::Resize,
        Operation::Snapshot,
        Operation::Amend,
        Operation::Bitmap,
    ];

    /// The name in error messages; in reports and JSON where the operation is one command.
    pub fn name(self) -> &'static str {
        match self {
            Operation::ConvertQcow2Raw => "convert qcow2→raw",
            Operation::ConvertZlibRaw => "convert zlib-qcow2→raw",
            Operation::ConvertChainRaw => "convert chain→raw",
            Operation::ConvertRawQcow2 => "convert raw→qcow2",
            Operation::ConvertRawQcow2Compressed => "convert raw→qcow2 -c",
            Operation::Compare => "compare",
            Operation::Commit => "commit",
            Operation::Map => "map",
            Operation::Check => "check",
            Operation::Info => "info",
            Operation::InfoChainJson => "info --backing-chain json",
            Operation::Measure => "measure -O qcow2",
            Operation::Create => "create overlay",
            Operation::Dd => "dd qcow2→raw",
            Operation::Rebase => "rebase",
            Operation::Resize => "resize",
            Operation::Snapshot => "snapshot",
            Operation::Amend => "amend",
            Operation::Bitmap => "bitmap --add",
        }
    }

    /// The names in reports and JSON: one per command timed on the same input (resize,
    /// snapshot and amend run two, there and back again).
    pub fn step_names(self) -> Vec<&'static str> {
        match self {
            Operation::Resize => vec!["resize +1G", "resize --shrink"],
            Operation::Snapshot => vec!["snapshot -c", "snapshot -a"],
            Operation::Amend => vec!["amend compat=0.10", "amend compat=1.1"],
            _ => vec![self.name()],
        }
    }

    /// The operations `--only` names, a comma-separated list of [`Operation::slug`]s, in
    /// [`Operation::ALL`] order; an unknown name is an error listing the known ones.
    pub fn parse_list(list: &str) -> Result<Vec<Operation>> {
        let mut chosen = Vec::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let Some(op) = Operation::ALL.into_iter().find(|op| op.slug() == name) else {
                let known: Vec<&str> = Operation::ALL.iter().map(|op| op.slug()).collect();
                return Err(BenchError::Invalid(format!(
                    "unknown operation {name:?} (known: {})",
                    known.join(", ")
                )));
            };
            chosen.push(op);
        }
        if chosen.is_empty() {
            return Err(BenchError::Invalid("--only names no operation".into()));
        }
        Ok(Operation::ALL
            .into_iter()
            .filter(|op| chosen.contains(op))
            .collect())
    }

    /// A short ASCII name, for file names and `--only`.
    pub fn slug(self) -> &'static str {
        match self {
            Operation::ConvertQcow2Raw => "convert-qcow2-raw",
            Operation::ConvertZlibRaw => "convert-zlib-raw",
            Operation::ConvertChainRaw => "convert-chain-raw",
            Operation::ConvertRawQcow2 => "convert-raw-qcow2",
            Operation::ConvertRawQcow2Compressed => "convert-raw-qcow2-c",
            Operation::Compare => "compare",
            Operation::Commit => "commit",
            Operation::Map => "map",
            Operation::Check => "check",
            Operation::Info => "info",
            Operation::InfoChainJson => "info-chain-json",
            Operation::Measure => "measure",
            Operation::Create => "create",
            Operation::Dd => "dd",
            Operation::Rebase => "rebase",
            Operation::Resize => "resize",
            Operation::Snapshot => "snapshot",
            Operation::Amend => "amend",
            Operation::Bitmap => "bitmap",
        }
    }

    /// The format of the file the operation writes, if it writes one.
    fn output_format(self) -> Option<&'static str> {
        match self {
            Operation::ConvertQcow2Raw
            | Operation::ConvertZlibRaw
            | Operation::ConvertChainRaw
            | Operation::Dd => Some("raw"),
            Operation::ConvertRawQcow2
            | Operation::ConvertRawQcow2Compressed
            | Operation::Commit
            | Operation::Create
            | Operation::Rebase
            | Operation::Resize
            | Operation::Snapshot
            | Operation::Amend
            | Operation::Bitmap => Some("qcow2"),
            Operation::Compare
            | Operation::Map
            | Operation::Check
            | Operation::Info
            | Operation::InfoChainJson
            | Operation::Measure => None,
        }
    }

    /// The workload file an operation that changes an image in place works on (a fresh copy
    /// of it each time), if it is one of those.
    fn in_place_on(self) -> Option<&'static str> {
        match self {
            Operation::Rebase => Some(MID),
            Operation::Resize | Operation::Snapshot | Operation::Amend | Operation::Bitmap => {
                Some(QCOW2)
            }
            _ => None,
        }
    }
}

/// One tool's figures for one operation. Part of the documented JSON of `bench ops`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ToolResult {
    /// `cowclone` or `qemu-img`.
    pub tool: &'static str,
    /// The command line of the timed runs (paths inside the bench directory).
    pub command: String,
    /// Median wall time of the command (until it exited), ms.
    pub median_ms: f64,
    /// 90th percentile of the same, ms.
    pub p90_ms: f64,
    /// Every timed run's wall time, ms, in run order.
    pub samples_ms: Vec<f64>,
    /// Median wall time until the result was on disk, ms: the command, then fsync of the files
    /// it wrote. Equal to `median_ms` for commands that write nothing.
    pub durable_median_ms: f64,
    /// The largest peak RSS of any of its runs (judged run included), KiB.
    pub peak_rss_kib: u64,
    /// The written file's length (`st_size`), bytes; null where nothing is written. For
    /// `commit`, the overlay committed into; for operations in place, the image after the
    /// command.
    pub output_bytes: Option<u64>,
    /// The written file's allocated space (`st_blocks × 512`, after fsync), bytes.
    pub output_allocated_bytes: Option<u64>,
}

/// One operation (one timed command of it), both tools. Part of the documented JSON of
/// `bench ops`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OperationResult {
    /// One of [`Operation::step_names`].
    pub operation: &'static str,
    /// Timed runs per tool.
    pub runs: u32,
    /// cowclone's figures.
    pub cowclone: ToolResult,
    /// qemu-img's figures.
    pub qemu_img: ToolResult,
    /// qemu-img's median ÷ cowclone's median: above 1, cowclone is faster.
    pub speedup: f64,
    /// cowclone's allocated output ÷ qemu-img's (null where nothing is written).
    pub size_ratio: Option<f64>,
    /// How the outputs were judged equal (the judging command and its verdict); for an
    /// operation of two commands, the result of both, judged once.
    pub verified: String,
}

/// A file of the workload.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct WorkloadFile {
    /// Its name in the bench directory.
    pub name: &'static str,
    /// How it was made.
    pub made_by: String,
    /// Length, bytes.
    pub bytes: u64,
    /// Allocated space, bytes.
    pub allocated_bytes: u64,
}

/// The workload every operation runs on.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Workload {
    /// `tree DIR` or `image FILE`.
    pub source: String,
    /// The guest size, bytes.
    pub virtual_size: u64,
    /// Bytes of guest data (allocated in image.qcow2 according to `qemu-img map`).
    pub data_bytes: u64,
    /// Seconds it took to build, all files.
    pub build_seconds: f64,
    /// Every file, in the order made.
    pub files: Vec<WorkloadFile>,
}

/// The run's circumstances.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Environment {
    /// Host, kernel, CPUs, versions (`cowclone-version` is the measured binary's), the
    /// filesystem of the bench directory, date.
    #[serde(flatten)]
    pub machine: fs_facts::Machine,
    /// Load averages (1, 5, 15 min) when the measuring started.
    pub load_average_start: String,
    /// Load averages when it ended.
    pub load_average_end: String,
    /// The measured binary.
    pub cowclone_binary: PathBuf,
    /// The directory the bench directory was made in.
    pub dir: PathBuf,
}

/// A whole `bench ops` run: the JSON of `--output json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// The circumstances.
    pub environment: Environment,
    /// The workload.
    pub workload: Workload,
    /// One entry per timed command of every operation measured, in [`Operation::ALL`] order.
    pub operations: Vec<OperationResult>,
}

/// Builds the workload, runs every operation on both tools and judges the outputs. `progress`
/// advances by one per command measured.
pub fn run(config: &Config, progress: &ProgressBar) -> Result<Report> {
    if config.runs == 0 {
        return Err(BenchError::Invalid("--runs must be at least 1".into()));
    }
    for program in ["qemu-img", "qemu-io", tools::GNU_TIME] {
        if let Some(reason) = tools::unavailable(program) {
            return Err(BenchError::Invalid(reason));
        }
    }
    let cowclone_version = tools::version(&config.cowclone.to_string_lossy()).ok_or_else(|| {
        BenchError::Invalid(format!(
            "{} --version does not run",
            config.cowclone.display()
        ))
    })?;
    let date = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
    // Absolute, because mid.qcow2 names its backing file by absolute path.
    let dir_parent = fs::canonicalize(&config.dir_parent).map_err(BenchError::io(format!(
        "resolving {}",
        config.dir_parent.display()
    )))?;
    let temp = tempfile::Builder::new()
        .prefix("cowclone-bench-ops.")
        .tempdir_in(&dir_parent)
        .map_err(BenchError::io(format!(
            "creating a bench directory in {}",
            config.dir_parent.display()
        )))?;
    let dir = temp.path();

    progress.set_message("workload");
    let workload = build_workload(config, dir, progress)?;
    let out_dir = dir.join("out");
    fs::create_dir(&out_dir).map_err(BenchError::io(format!("creating {}", out_dir.display())))?;

    let load_average_start = fs_facts::load_average();
    if config.operations.is_empty() {
        return Err(BenchError::Invalid("no operation to measure".into()));
    }
    let commands: usize = config
        .operations
        .iter()
        .map(|op| op.step_names().len())
        .sum();
    progress.set_length(commands as u64 * (u64::from(config.runs) + 1) * 2);
    progress.set_position(0);
    let bench = Bench {
        dir: dir.to_owned(),
        out_dir,
        cowclone: config.cowclone.clone(),
        virtual_size: workload.virtual_size,
    };
    let mut operations = Vec::new();
    for &op in &config.operations {
        progress.set_message(op.slug());
        operations.extend(bench.measure(op, config.runs, progress)?);
    }
    let environment = Environment {
        machine: fs_facts::Machine {
            cowclone_version,
            date,
            ..fs_facts::Machine::now(dir)
        },
        load_average_start,
        load_average_end: fs_facts::load_average(),
        cowclone_binary: config.cowclone.clone(),
        dir: dir_parent,
    };
    Ok(Report {
        environment,
        workload,
        operations,
    })
}

/// The guest ranges the overlays (and [`NEW_BASE`], in a region [`MID`] does not write) write,
/// scaled to the image: (qemu-io command, which file). Offsets and lengths are multiples of
/// 64 KiB inside `size`.
fn overlay_writes(size: u64) -> [(String, &'static str); 6] {
    const ALIGN: u64 = 64 << 10;
    let at = |fraction: u64| size / fraction / ALIGN * ALIGN;
    let unit = at(64).max(ALIGN);
    [
        (format!("write -P 0x11 {} {}", at(8), 2 * unit), MID),
        (format!("write -z {} {}", at(2), unit), MID),
        (format!("write -P 0x22 {} {}", at(8) + unit, 2 * unit), TOP),
        (format!("write -P 0x33 {} {}", at(4) * 3, unit), TOP),
        (format!("discard {} {}", at(4), unit), TOP),
        (format!("write -P 0x44 {} {}", at(16), unit), NEW_BASE),
    ]
}

/// Makes every workload file in `dir`.
fn build_workload(config: &Config, dir: &Path, progress: &ProgressBar) -> Result<Workload> {
    let start = Instant::now();
    let raw = dir.join(RAW);
    let mut made_by = Vec::new();
    let source = match &config.source {
        Source::Tree(tree) => {
            if config.size < MIN_SIZE {
                return Err(BenchError::Invalid(format!(
                    "--size must be at least {} MiB",
                    MIN_SIZE >> 20
                )));
            }
            if !tree.is_dir() {
                return Err(BenchError::Invalid(format!(
                    "--tree {} is not a directory",
                    tree.display()
                )));
            }
            progress.set_message(format!("mkfs.ext4 -d {}", tree.display()));
            File::create(&raw)
                .and_then(|f| f.set_len(config.size))
                .map_err(BenchError::io(format!("creating {}", raw.display())))?;
            let args = [
                OsStr::new("-q"),
                OsStr::new("-F"),
                OsStr::new("-d"),
                tree.as_os_str(),
                raw.as_os_str(),
            ];
            tools::run_ok("mkfs.ext4", &args)?;
            made_by.push(format!(
                "sparse file of {} bytes; mkfs.ext4 -q -F -d {}",
                config.size,
                tree.display()
            ));
            format!("tree {}", tree.display())
        }
        Source::Image(image) => {
            let info = qemu_info(image)?;
            let format = info["format"].as_str().unwrap_or("raw").to_owned();
            progress.set_message(format!("qemu-img convert -O raw {}", image.display()));
            let args = [
                OsStr::new("convert"),
                OsStr::new("-f"),
                OsStr::new(&format),
                OsStr::new("-O"),
                OsStr::new("raw"),
                image.as_os_str(),
                raw.as_os_str(),
            ];
            tools::run_ok("qemu-img", &args)?;
            made_by.push(format!(
                "qemu-img convert -f {format} -O raw {}",
                image.display()
            ));
            format!("image {}", image.display())
        }
    };
    let virtual_size = fs::metadata(&raw)
        .map_err(BenchError::io(format!(
            "reading metadata of {}",
            raw.display()
        )))?
        .len();
    if virtual_size < MIN_SIZE {
        return Err(BenchError::Invalid(format!(
            "the image must be at least {} MiB",
            MIN_SIZE >> 20
        )));
    }

    let qcow2 = dir.join(QCOW2);
    let zlib = dir.join(ZLIB_QCOW2);
    for (target, extra) in [
        (&qcow2, &[][..]),
        (&zlib, &["-c", "-o", "compression_type=zlib"][..]),
    ] {
        let mut args: Vec<OsString> = ["convert", "-f", "raw", "-O", "qcow2"]
            .iter()
            .chain(extra)
            .map(OsString::from)
            .collect();
        args.extend([raw.clone().into(), target.clone().into()]);
        progress.set_message(format!("making {}", target.display()));
        tools::run_ok("qemu-img", &args)?;
        made_by.push(tools::command_line("qemu-img", &args[..args.len() - 2]) + " image.raw");
    }

    // The chain: mid names its backing file by absolute path and top names mid relatively, so
    // that copies of the two overlays in another directory still form the same chain.
    progress.set_message("chain");
    for (overlay, backing) in [(MID, qcow2.clone()), (TOP, PathBuf::from(MID))] {
        let path = dir.join(overlay);
        let args = [
            OsStr::new("create"),
            OsStr::new("-q"),
            OsStr::new("-f"),
            OsStr::new("qcow2"),
            OsStr::new("-b"),
            backing.as_os_str(),
            OsStr::new("-F"),
            OsStr::new("qcow2"),
            path.as_os_str(),
        ];
        tools::run_ok("qemu-img", &args)?;
        let writes = write_with_qemu_io(&path, overlay, virtual_size)?;
        made_by.push(format!(
            "qemu-img create -f qcow2 -b {} -F qcow2; {writes}",
            backing.display(),
        ));
    }
    // Rebase's new base: a copy of the base with one region rewritten.
    let new_base = dir.join(NEW_BASE);
    fs::copy(&qcow2, &new_base).map_err(BenchError::io(format!(
        "copying {} to {}",
        qcow2.display(),
        new_base.display()
    )))?;
    let writes = write_with_qemu_io(&new_base, NEW_BASE, virtual_size)?;
    made_by.push(format!("copy of {QCOW2}; {writes}"));
    fs_facts::sync_filesystem(dir)?;
    let build_seconds = round1(start.elapsed().as_secs_f64());

    let mut files = Vec::new();
    for (name, made_by) in [RAW, QCOW2, ZLIB_QCOW2, MID, TOP, NEW_BASE]
        .into_iter()
        .zip(made_by)
    {
        let (bytes, allocated_bytes) = fs_facts::settled_bytes(&dir.join(name))?;
        files.push(WorkloadFile {
            name,
            made_by,
            bytes,
            allocated_bytes,
        });
    }
    Ok(Workload {
        source,
        virtual_size,
        data_bytes: data_bytes(&qcow2)?,
        build_seconds,
        files,
    })
}

/// Runs the [`overlay_writes`] meant for `name` on the qcow2 image `path` with qemu-io;
/// returns the command line for the workload's description.
fn write_with_qemu_io(path: &Path, name: &str, virtual_size: u64) -> Result<String> {
    let mut commands = Vec::new();
    let mut io_args: Vec<OsString> = vec!["-f".into(), "qcow2".into()];
    for (command, target) in overlay_writes(virtual_size) {
        if target == name {
            io_args.extend(["-c".into(), command.clone().into()]);
            commands.push(command);
        }
    }
    io_args.push(path.into());
    tools::run_ok("qemu-io", &io_args)?;
    Ok(format!("qemu-io -c '{}'", commands.join("' -c '")))
}

/// `qemu-img info --output=json` of `path`, parsed.
fn qemu_info(path: &Path) -> Result<Value> {
    let args = [
        OsStr::new("info"),
        OsStr::new("--output=json"),
        path.as_os_str(),
    ];
    parse_json(&tools::run_ok("qemu-img", &args)?.stdout, || {
        tools::command_line("qemu-img", &args)
    })
}

/// The bytes `qemu-img map` reports as data in the qcow2 image.
fn data_bytes(qcow2: &Path) -> Result<u64> {
    let args = [
        OsStr::new("map"),
        OsStr::new("-f"),
        OsStr::new("qcow2"),
        OsStr::new("--output=json"),
        qcow2.as_os_str(),
    ];
    let map = parse_json(&tools::run_ok("qemu-img", &args)?.stdout, || {
        tools::command_line("qemu-img", &args)
    })?;
    Ok(map
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["data"] == true)
        .filter_map(|e| e["length"].as_u64())
        .sum())
}

fn parse_json(bytes: &[u8], command: impl FnOnce() -> String) -> Result<Value> {
    serde_json::from_slice(bytes).map_err(|_| BenchError::ToolOutput {
        command: command(),
        output: String::from_utf8_lossy(bytes).into_owned(),
    })
}

/// One tool's turn in one run of an operation: what to run and what it leaves behind.
struct Invocation {
    program: OsString,
    /// The arguments of each command, run one after the other (one for most operations).
    steps: Vec<Vec<OsString>>,
    /// The file it writes (for commit: the overlay committed into; in place: the copy).
    output: Option<PathBuf>,
    /// Every file it writes (fsynced after each command exits, for the durable time).
    written: Vec<PathBuf>,
    /// Where its stdout goes (the last command's is kept).
    stdout: PathBuf,
    /// A directory made for it (copies of its inputs), removed after the run.
    scratch: Option<PathBuf>,
}

/// The bench directory and the binary measured.
struct Bench {
    dir: PathBuf,
    out_dir: PathBuf,
    cowclone: PathBuf,
    /// The workload's guest size (resize shrinks back to it).
    virtual_size: u64,
}

/// What one tool measured of one command of an operation, over the runs.
#[derive(Debug, Default)]
struct Figures {
    command: String,
    samples: Vec<f64>,
    durable_samples: Vec<f64>,
    peak_rss: u64,
    /// The output's (length, allocated bytes) after the command, in the judged run.
    sizes: Option<(u64, u64)>,
}

impl Figures {
    fn result(&self, tool: Tool) -> ToolResult {
        ToolResult {
            tool: tool.name(),
            command: self.command.clone(),
            median_ms: round1(median(&self.samples).unwrap_or_default()),
            p90_ms: round1(p90(&self.samples).unwrap_or_default()),
            samples_ms: self.samples.iter().map(|&s| round1(s)).collect(),
            durable_median_ms: round1(median(&self.durable_samples).unwrap_or_default()),
            peak_rss_kib: self.peak_rss,
            output_bytes: self.sizes.map(|s| s.0),
            output_allocated_bytes: self.sizes.map(|s| s.1),
        }
    }
}

impl Bench {
    /// Run 0 (judged, untimed) and `runs` timed runs of `op`, both tools per run; one result
    /// per command of the operation.
    fn measure(
        &self,
        op: Operation,
        runs: u32,
        progress: &ProgressBar,
    ) -> Result<Vec<OperationResult>> {
        let names = op.step_names();
        // figures[step][tool]
        let mut figures: Vec<[Figures; 2]> = names.iter().map(|_| Default::default()).collect();
        let mut verified = String::new();
        let rss_file = self.out_dir.join("rss.txt");
        for run in 0..=runs {
            let mut outcomes = Vec::new();
            for (i, tool) in [Tool::Cowclone, Tool::QemuImg].into_iter().enumerate() {
                let invocation = self.invocation(op, tool)?;
                for (step, args) in invocation.steps.iter().enumerate() {
                    let figures = &mut figures[step][i];
                    fs_facts::sync_filesystem(&self.dir)?;
                    let stdout = File::create(&invocation.stdout).map_err(BenchError::io(
                        format!("creating {}", invocation.stdout.display()),
                    ))?;
                    let measured =
                        tools::run_measured(&invocation.program, args, stdout, &rss_file)?;
                    let synced = Instant::now();
                    for file in &invocation.written {
                        File::open(file)
                            .and_then(|f| f.sync_all())
                            .map_err(BenchError::io(format!("syncing {}", file.display())))?;
                    }
                    let sync_seconds = synced.elapsed().as_secs_f64();
                    progress.inc(1);
                    figures.peak_rss = figures.peak_rss.max(measured.peak_rss_kib);
                    if run > 0 {
                        figures.samples.push(measured.seconds * 1e3);
                        figures
                            .durable_samples
                            .push((measured.seconds + sync_seconds) * 1e3);
                    } else if let Some(output) = &invocation.output {
                        figures.sizes = Some(fs_facts::settled_bytes(output)?);
                    }
                    figures.command =
                        tools::command_line(&invocation.program.to_string_lossy(), args)
                            .replace(&format!("{}/", self.dir.display()), "");
                }
                outcomes.push(invocation);
            }
            if run == 0 {
                verified = judge(op, &outcomes[0], &outcomes[1], self)?;
                if names.len() > 1 {
                    verified = format!("after {}: {verified}", names.join(", then "));
                }
            }
            for invocation in &outcomes {
                remove_outputs(invocation)?;
            }
        }
        Ok(names
            .into_iter()
            .zip(figures)
            .map(|(name, [ours, theirs])| {
                let cowclone = ours.result(Tool::Cowclone);
                let qemu_img = theirs.result(Tool::QemuImg);
                OperationResult {
                    operation: name,
                    runs,
                    speedup: ratio(qemu_img.median_ms, cowclone.median_ms),
                    size_ratio: match (ours.sizes, theirs.sizes) {
                        (Some(a), Some(b)) => Some(ratio(a.1 as f64, b.1 as f64)),
                        _ => None,
                    },
                    cowclone,
                    qemu_img,
                    verified: verified.clone(),
                }
            })
            .collect())
    }

    /// Copies the workload files `names` into a new directory `scratch` (untimed).
    fn copy_inputs(&self, scratch: &Path, names: &[&str]) -> Result<()> {
        fs::create_dir(scratch)
            .map_err(BenchError::io(format!("creating {}", scratch.display())))?;
        for name in names {
            fs::copy(self.dir.join(name), scratch.join(name)).map_err(BenchError::io(format!(
                "copying {name} to {}",
                scratch.display()
            )))?;
        }
        Ok(())
    }

    /// The commands `tool` runs for `op`, with a fresh output path (and, for operations in
    /// place, fresh copies of their inputs).
    fn invocation(&self, op: Operation, tool: Tool) -> Result<Invocation> {
        let name = format!("{}-{}", op.slug(), tool.name());
        let mut output = op
            .output_format()
            .map(|ext| self.out_dir.join(format!("{name}.{ext}")));
        let mut scratch = None;
        let mut written = Vec::new();
        let mut args: Vec<OsString> = Vec::new();
        let mut second: Option<Vec<OsString>> = None;
        let file = |name: &str| OsString::from(self.dir.join(name));
        let json: &[&str] = match tool {
            Tool::Cowclone => &["--output", "json"],
            Tool::QemuImg => &["--output=json"],
        };
        let push = |args: &mut Vec<OsString>, items: &[&str]| {
            args.extend(items.iter().map(OsString::from));
        };
        if let Some(input) = op.in_place_on() {
            let copies = self.out_dir.join(&name);
            self.copy_inputs(&copies, &[input])?;
            output = Some(copies.join(input));
            scratch = Some(copies);
        }
        let copy = || OsString::from(output.clone().unwrap_or_default());
        match op {
            Operation::ConvertQcow2Raw
            | Operation::ConvertZlibRaw
            | Operation::ConvertChainRaw
            | Operation::ConvertRawQcow2
            | Operation::ConvertRawQcow2Compressed => {
                let (from, to, source) = match op {
                    Operation::ConvertQcow2Raw => ("qcow2", "raw", QCOW2),
                    Operation::ConvertZlibRaw => ("qcow2", "raw", ZLIB_QCOW2),
                    Operation::ConvertChainRaw => ("qcow2", "raw", TOP),
                    _ => ("raw", "qcow2", RAW),
                };
                push(&mut args, &["convert", "-f", from, "-O", to]);
                if op == Operation::ConvertRawQcow2Compressed {
                    push(&mut args, &["-c"]);
                }
                args.push(file(source));
                args.push(copy());
            }
            Operation::Compare => {
                push(&mut args, &["compare", "-f", "qcow2", "-F", "raw"]);
                args.extend([file(QCOW2), file(RAW)]);
            }
            Operation::Commit => {
                let copies = self.out_dir.join(&name);
                self.copy_inputs(&copies, &[MID, TOP])?;
                push(&mut args, &["commit"]);
                if tool == Tool::QemuImg {
                    // qemu-img probes the format otherwise; cowclone reads the magic.
                    push(&mut args, &["-f", "qcow2"]);
                }
                args.push(copies.join(TOP).into());
                output = Some(copies.join(MID));
                written.push(copies.join(TOP));
                scratch = Some(copies);
            }
            Operation::Map => {
                push(&mut args, &["map", "-f", "qcow2"]);
                push(&mut args, json);
                args.push(file(TOP));
            }
            Operation::Check => {
                push(&mut args, &["check", "-f", "qcow2"]);
                push(&mut args, json);
                args.push(file(QCOW2));
            }
            Operation::Info => {
                push(&mut args, &["info", "-f", "qcow2"]);
                args.push(file(TOP));
            }
            Operation::InfoChainJson => {
                push(&mut args, &["info", "-f", "qcow2"]);
                push(&mut args, json);
                push(&mut args, &["--backing-chain"]);
                args.push(file(TOP));
            }
            Operation::Measure => {
                push(&mut args, &["measure", "-f", "qcow2", "-O", "qcow2"]);
                push(&mut args, json);
                args.push(file(QCOW2));
            }
            Operation::Create => {
                push(&mut args, &["create", "-q", "-f", "qcow2", "-b"]);
                args.push(file(QCOW2));
                push(&mut args, &["-F", "qcow2"]);
                args.push(copy());
            }
            Operation::Dd => {
                push(&mut args, &["dd", "-f", "qcow2", "-O", "raw", "bs=1M"]);
                let operand = |key: &str, path: OsString| {
                    let mut operand = OsString::from(key);
                    operand.push(path);
                    operand
                };
                args.push(operand("if=", file(QCOW2)));
                args.push(operand("of=", copy()));
            }
            Operation::Rebase => {
                push(&mut args, &["rebase", "-f", "qcow2", "-b"]);
                args.push(file(NEW_BASE));
                push(&mut args, &["-F", "qcow2"]);
                args.push(copy());
            }
            Operation::Resize => {
                push(&mut args, &["resize", "-f", "qcow2"]);
                args.extend([copy(), "+1G".into()]);
                let mut back: Vec<OsString> = Vec::new();
                push(&mut back, &["resize", "-f", "qcow2", "--shrink"]);
                back.extend([copy(), self.virtual_size.to_string().into()]);
                second = Some(back);
            }
            Operation::Snapshot => {
                push(&mut args, &["snapshot", "-f", "qcow2", "-c", TAG]);
                args.push(copy());
                let mut apply: Vec<OsString> = Vec::new();
                push(&mut apply, &["snapshot", "-f", "qcow2", "-a", TAG]);
                apply.push(copy());
                second = Some(apply);
            }
            Operation::Amend => {
                push(&mut args, &["amend", "-f", "qcow2", "-o", "compat=0.10"]);
                args.push(copy());
                let mut back: Vec<OsString> = Vec::new();
                push(&mut back, &["amend", "-f", "qcow2", "-o", "compat=1.1"]);
                back.push(copy());
                second = Some(back);
            }
            Operation::Bitmap => {
                push(&mut args, &["bitmap", "-f", "qcow2", "--add"]);
                args.extend([copy(), TAG.into()]);
            }
        }
        Ok(Invocation {
            program: match tool {
                Tool::Cowclone => self.cowclone.clone().into(),
                Tool::QemuImg => "qemu-img".into(),
            },
            steps: std::iter::once(args).chain(second).collect(),
            written: written.into_iter().chain(output.clone()).collect(),
            output,
            stdout: self.out_dir.join(format!("{name}.stdout")),
            scratch,
        })
    }
}

/// Removes what one command wrote.
fn remove_outputs(invocation: &Invocation) -> Result<()> {
    if let Some(dir) = &invocation.scratch {
        fs::remove_dir_all(dir).map_err(BenchError::io(format!("removing {}", dir.display())))?;
    } else if let Some(output) = &invocation.output {
        fs::remove_file(output)
            .map_err(BenchError::io(format!("removing {}", output.display())))?;
    }
    Ok(())
}

/// Judges cowclone's result of `op` against qemu-img's with qemu-img (and the result of an
/// operation in place against the workload file it started from); returns the verdict, or
/// [`BenchError::Mismatch`].
fn judge(op: Operation, ours: &Invocation, theirs: &Invocation, bench: &Bench) -> Result<String> {
    let mismatch = |detail: String| BenchError::Mismatch {
        operation: op.name(),
        detail,
    };
    let stdout = |invocation: &Invocation| -> Result<Vec<u8>> {
        fs::read(&invocation.stdout).map_err(BenchError::io(format!(
            "reading {}",
            invocation.stdout.display()
        )))
    };
    match op {
        Operation::Compare => Ok("both exit 0: images identical".to_owned()),
        Operation::Info => {
            let (a, b) = (stdout(ours)?, stdout(theirs)?);
            let (a, b) = (String::from_utf8_lossy(&a), String::from_utf8_lossy(&b));
            match first_difference(&a, &b) {
                None => Ok(format!(
                    "text identical to qemu-img's ({} lines)",
                    a.lines().count()
                )),
                Some(difference) => Err(mismatch(difference)),
            }
        }
        Operation::Map | Operation::Check | Operation::InfoChainJson | Operation::Measure => {
            let read = |invocation: &Invocation| -> Result<Value> {
                parse_json(&stdout(invocation)?, || {
                    invocation.program.to_string_lossy().into_owned()
                })
            };
            let (a, b) = (read(ours)?, read(theirs)?);
            if op == Operation::Map {
                judge_map(&a, &b).map_err(mismatch)
            } else if a == b {
                Ok("JSON report identical to qemu-img's".to_owned())
            } else {
                Err(mismatch(format!("cowclone reports {a}, qemu-img {b}")))
            }
        }
        _ => {
            let (Some(a), Some(b)) = (&ours.output, &theirs.output) else {
                return Err(BenchError::Invalid(format!("{}: no output", op.name())));
            };
            let format = op.output_format().unwrap_or("raw");
            let mut verdict = Vec::new();
            if format == "qcow2" {
                verdict.push(qemu_img_judges(op, &["check", "-q", "-f", "qcow2"], &[a])?);
            }
            verdict.push(qemu_img_judges(
                op,
                &["compare", "-f", format, "-F", format],
                &[a, b],
            )?);
            if op == Operation::Commit {
                // The tops, emptied by both, must read the same (through their committed mids).
                let tops = [a.with_file_name(TOP), b.with_file_name(TOP)];
                let judged = qemu_img_judges(
                    op,
                    &["compare", "-f", "qcow2", "-F", "qcow2"],
                    &[&tops[0], &tops[1]],
                )?;
                verdict = vec![
                    format!("{MID} (committed into): {}", verdict.join("; ")),
                    format!("{TOP}: {judged}"),
                ];
            }
            if let Some(input) = op.in_place_on() {
                // Rebase keeps what the chain reads; the others leave the guest content alone
                // (resize, amend: there and back again).
                let before = bench.dir.join(input);
                let judged = qemu_img_judges(
                    op,
                    &["compare", "-f", "qcow2", "-F", "qcow2"],
                    &[a, &before],
                )?;
                verdict.push(format!("against the {input} it started from: {judged}"));
            }
            if matches!(op, Operation::Create) || op.in_place_on().is_some() {
                let (ours, theirs) = (qemu_info(a)?, qemu_info(b)?);
                verdict.push(judge_info(op, &ours, &theirs, bench.virtual_size).map_err(mismatch)?);
            }
            Ok(verdict.join("; "))
        }
    }
}

/// The first line where two texts differ, described; `None` if they are equal.
fn first_difference(ours: &str, theirs: &str) -> Option<String> {
    if ours == theirs {
        return None;
    }
    let (mut a, mut b) = (ours.lines(), theirs.lines());
    for line in 1.. {
        match (a.next(), b.next()) {
            (Some(x), Some(y)) if x == y => continue,
            (None, None) => {
                return Some("the texts differ only in their line ends".to_owned());
            }
            (x, y) => {
                let shown =
                    |l: Option<&str>| l.map_or("(end of text)".to_owned(), |l| format!("{l:?}"));
                return Some(format!(
                    "line {line}: cowclone prints {}, qemu-img {}",
                    shown(x),
                    shown(y)
                ));
            }
        }
    }
    unreachable!("the loop returns")
}

/// `qemu-img info --output=json` of an image without the facts that differ between two
/// equal results: file names, allocated sizes, the protocol node (the file's length) and when
/// snapshots were taken.
fn comparable_info(info: &Value) -> Value {
    let mut info = info.clone();
    if let Some(object) = info.as_object_mut() {
        for key in ["filename", "actual-size", "children"] {
            object.remove(key);
        }
        for snapshot in object
            .get_mut("snapshots")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(snapshot) = snapshot.as_object_mut() {
                snapshot.remove("date-sec");
                snapshot.remove("date-nsec");
            }
        }
    }
    info
}

/// Judges `qemu-img info --output=json` of cowclone's result of `op` against qemu-img's: the
/// same facts (see [`comparable_info`]), and the one `op` is about as intended
/// (`virtual_size`: the workload's, which resize returns to).
fn judge_info(
    op: Operation,
    ours: &Value,
    theirs: &Value,
    virtual_size: u64,
) -> std::result::Result<String, String> {
    let (a, b) = (comparable_info(ours), comparable_info(theirs));
    if a != b {
        return Err(format!(
            "qemu-img info: cowclone's result is {a}, qemu-img's {b}"
        ));
    }
    let data = &a["format-specific"]["data"];
    let names = |list: &Value| -> Vec<String> {
        list.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["name"].as_str().map(str::to_owned))
            .collect()
    };
    let backing = a["backing-filename"].as_str().unwrap_or_default();
    let fact = match op {
        Operation::Create | Operation::Rebase => {
            let wanted = if op == Operation::Create {
                QCOW2
            } else {
                NEW_BASE
            };
            (Path::new(backing).file_name() == Some(OsStr::new(wanted)))
                .then(|| format!("backing file {wanted}"))
        }
        Operation::Resize => (a["virtual-size"] == virtual_size)
            .then(|| format!("virtual size {virtual_size} again")),
        Operation::Snapshot => {
            let listed = names(&a["snapshots"]);
            (listed == [TAG]).then(|| format!("snapshots: {}", listed.join(", ")))
        }
        Operation::Amend => (data["compat"] == "1.1").then(|| "compat 1.1".to_owned()),
        Operation::Bitmap => {
            let listed = names(&data["bitmaps"]);
            (listed == [TAG]).then(|| format!("bitmaps: {}", listed.join(", ")))
        }
        _ => Some("no fact of its own".to_owned()),
    };
    match fact {
        Some(fact) => Ok(format!(
            "qemu-img info: the same as qemu-img's result ({fact})"
        )),
        None => Err(format!(
            "qemu-img info of both results does not show what {} should make: {a}",
            op.name()
        )),
    }
}

/// Runs `qemu-img ARGS FILES`: exit 0 is the verdict "clean"/"identical", anything else a
/// mismatch with qemu-img's words.
fn qemu_img_judges(op: Operation, args: &[&str], files: &[&PathBuf]) -> Result<String> {
    let mut all: Vec<&OsStr> = args.iter().map(OsStr::new).collect();
    all.extend(files.iter().map(|f| f.as_os_str()));
    let command = tools::command_line("qemu-img", &all);
    let output = Command::new("qemu-img")
        .args(&all)
        .output()
        .map_err(BenchError::io(format!("running {command}")))?;
    let words = |bytes: &[u8]| String::from_utf8_lossy(bytes).trim().to_owned();
    let said = format!("{} {}", words(&output.stdout), words(&output.stderr));
    let said = said.trim().trim_end_matches('.').replace('\n', " ");
    if output.status.success() {
        let short = format!("qemu-img {}", args.join(" "));
        Ok(if said.is_empty() {
            format!("{short}: clean")
        } else {
            format!("{short}: {said}")
        })
    } else {
        Err(BenchError::Mismatch {
            operation: op.name(),
            detail: format!("{command} ({}): {said}", output.status),
        })
    }
}

/// Compares two `map --output json` reports entry by entry. Keys qemu-img prints that cowclone
/// prints in no entry at all are a difference of format, not of mapping: named in the verdict.
fn judge_map(ours: &Value, theirs: &Value) -> std::result::Result<String, String> {
    let (Some(a), Some(b)) = (ours.as_array(), theirs.as_array()) else {
        return Err("a map report is not a JSON array".to_owned());
    };
    if a.len() != b.len() {
        return Err(format!(
            "cowclone reports {} ranges, qemu-img {}",
            a.len(),
            b.len()
        ));
    }
    let printed_by_us = |key: &str| a.iter().any(|e| e.get(key).is_some());
    let mut omitted: Vec<String> = Vec::new();
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        let Some(theirs) = y.as_object() else {
            return Err(format!("qemu-img's entry {i} is not an object: {y}"));
        };
        let mut theirs = theirs.clone();
        theirs.retain(|key, _| {
            let keep = printed_by_us(key);
            if !keep && !omitted.contains(key) {
                omitted.push(key.clone());
            }
            keep
        });
        if *x != Value::Object(theirs) {
            return Err(format!("entry {i}: cowclone {x}, qemu-img {y}"));
        }
    }
    Ok(if omitted.is_empty() {
        format!("JSON identical to qemu-img's ({} ranges)", a.len())
    } else {
        format!(
            "the same {} ranges as qemu-img; cowclone omits the key(s) qemu-img prints: {}",
            a.len(),
            omitted.join(", ")
        )
    })
}

/// `a ÷ b` to 4 significant digits (0 if `b` is 0).
fn ratio(a: f64, b: f64) -> f64 {
    if b <= 0.0 {
        return 0.0;
    }
    round_significant(a / b, 4)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn overlay_writes_stay_inside_the_image_and_aligned() {
        for size in [MIN_SIZE, 100 << 20, 4 << 30, (4 << 30) + 12345] {
            for (command, _) in overlay_writes(size) {
                let (offset, len) = range(&command);
                assert!(len > 0 && offset % (64 << 10) == 0 && len % (64 << 10) == 0);
                assert!(offset + len <= size, "{command} in {size}");
            }
        }
        assert_eq!(
            overlay_writes(4 << 30)[0].0,
            "write -P 0x11 536870912 134217728"
        );
    }

    #[test]
    fn maps_are_judged_by_ranges_and_keys_only_qemu_prints_are_named() {
        let ours = json!([{"start": 0, "length": 65536, "depth": 0, "data": true}]);
        let theirs = json!([{"start": 0, "length": 65536, "depth": 0, "data": true,
                             "compressed": false}]);
        let verdict = judge_map(&ours, &theirs).unwrap();
        assert!(
            verdict.contains("omits") && verdict.contains("compressed"),
            "{verdict}"
        );
        assert!(judge_map(&ours, &ours).unwrap().contains("identical"));
        let wrong = json!([{"start": 0, "length": 65536, "depth": 1, "data": true}]);
        assert!(judge_map(&wrong, &theirs).unwrap_err().contains("entry 0"));
        assert!(judge_map(&json!([]), &theirs).is_err());
    }

    /// The (offset, length) of a qemu-io write or discard command.
    fn range(command: &str) -> (u64, u64) {
        let numbers: Vec<u64> = command
            .split_whitespace()
            .rev()
            .take(2)
            .map(|n| n.parse().unwrap())
            .collect();
        (numbers[1], numbers[0])
    }

    #[test]
    fn the_new_base_differs_where_mid_does_not_write() {
        for size in [MIN_SIZE, 512 << 20, 4 << 30] {
            let writes = overlay_writes(size);
            let (start, len) = writes
                .iter()
                .find(|(_, target)| *target == NEW_BASE)
                .map(|(command, _)| range(command))
                .unwrap();
            for (command, _) in writes.iter().filter(|(_, target)| *target == MID) {
                let (offset, length) = range(command);
                assert!(
                    offset + length <= start || start + len <= offset,
                    "{command} overlaps the new base's write at {start}+{len} ({size})"
                );
            }
        }
    }

    #[test]
    fn only_takes_slugs_in_report_order_and_refuses_unknown_names() {
        assert_eq!(
            Operation::parse_list("convert-raw-qcow2-c, convert-zlib-raw").unwrap(),
            vec![
                Operation::ConvertZlibRaw,
                Operation::ConvertRawQcow2Compressed
            ]
        );
        assert_eq!(
            Operation::parse_list("snapshot,snapshot").unwrap(),
            vec![Operation::Snapshot]
        );
        let Err(BenchError::Invalid(message)) = Operation::parse_list("convert raw→qcow2") else {
            panic!("a display name is not a slug");
        };
        assert!(message.contains("convert-raw-qcow2-c"), "{message}");
        assert!(Operation::parse_list(" , ").is_err());
    }

    #[test]
    fn every_operation_has_a_unique_slug_and_named_steps() {
        let slugs: std::collections::HashSet<&str> =
            Operation::ALL.iter().map(|op| op.slug()).collect();
        assert_eq!(slugs.len(), Operation::ALL.len());
        let steps: Vec<&str> = Operation::ALL
            .iter()
            .flat_map(|op| op.step_names())
            .collect();
        let unique: std::collections::HashSet<&&str> = steps.iter().collect();
        assert_eq!(unique.len(), steps.len(), "{steps:?}");
        assert_eq!(steps.len(), 22);
        for op in Operation::ALL {
            let two = matches!(
                op,
                Operation::Resize | Operation::Snapshot | Operation::Amend
            );
            assert_eq!(op.step_names().len(), if two { 2 } else { 1 }, "{op:?}");
            // Whatever changes an image in place writes the copy it works on, a qcow2 image.
            if op.in_place_on().is_some() {
                assert_eq!(op.output_format(), Some("qcow2"), "{op:?}");
            }
        }
    }

    #[test]
    fn texts_are_compared_line_by_line() {
        assert_eq!(first_difference("a\nb\n", "a\nb\n"), None);
        let difference = first_difference("a\nb\nc\n", "a\nB\nc\n").unwrap();
        assert!(
            difference.starts_with("line 2:")
                && difference.contains("\"b\"")
                && difference.contains("\"B\""),
            "{difference}"
        );
        let shorter = first_difference("a\n", "a\nb\n").unwrap();
        assert!(
            shorter.contains("line 2") && shorter.contains("end of text"),
            "{shorter}"
        );
        assert!(first_difference("a\n", "a\r\n").is_some());
    }

    /// `qemu-img info --output=json` of a qcow2 image with a snapshot and a bitmap, as qemu-img
    /// 10.0 prints it (abridged).
    fn info(filename: &str, actual_size: u64, date: u64) -> Value {
        json!({
            "children": [{"name": "file", "info": {"filename": filename, "format": "file",
                          "virtual-size": actual_size + 4096}}],
            "snapshots": [{"icount": 0, "vm-clock-nsec": 0, "name": "bench", "date-sec": date,
                           "date-nsec": 5, "vm-clock-sec": 0, "id": "1", "vm-state-size": 0}],
            "virtual-size": 536870912,
            "filename": filename,
            "cluster-size": 65536,
            "format": "qcow2",
            "actual-size": actual_size,
            "backing-filename": "/bench/new-base.qcow2",
            "format-specific": {"type": "qcow2", "data": {"compat": "1.1",
                "bitmaps": [{"flags": ["auto"], "name": "bench", "granularity": 65536}],
                "lazy-refcounts": false, "refcount-bits": 16, "corrupt": false}},
            "dirty-flag": false
        })
    }

    #[test]
    fn infos_are_judged_without_file_names_sizes_and_dates_and_by_the_fact_wanted() {
        let ours = info("out/a/image.qcow2", 1000, 1);
        let theirs = info("out/b/image.qcow2", 2000, 2);
        for (op, fact) in [
            (Operation::Snapshot, "snapshots: bench"),
            (Operation::Bitmap, "bitmaps: bench"),
            (Operation::Amend, "compat 1.1"),
            (Operation::Resize, "virtual size 536870912 again"),
            (Operation::Rebase, "backing file new-base.qcow2"),
        ] {
            let verdict = judge_info(op, &ours, &theirs, 536870912).unwrap();
            assert!(verdict.contains(fact), "{op:?}: {verdict}");
        }
        // What the operation should have made is missing from both: still an error.
        assert!(judge_info(Operation::Create, &ours, &theirs, 536870912).is_err());
        assert!(judge_info(Operation::Resize, &ours, &theirs, 1 << 30).is_err());
        // Any other difference is one.
        for (pointer, value) in [
            ("/virtual-size", json!(1 << 30)),
            ("/format-specific/data/compat", json!("0.10")),
            ("/snapshots/0/name", json!("other")),
            ("/format-specific/data/bitmaps/0/flags", json!([])),
            ("/backing-filename", json!("/bench/image.qcow2")),
        ] {
            let mut wrong = ours.clone();
            *wrong.pointer_mut(pointer).unwrap() = value;
            let err = judge_info(Operation::Snapshot, &wrong, &theirs, 536870912).unwrap_err();
            assert!(err.contains("cowclone's result is"), "{pointer}: {err}");
        }
    }

    #[test]
    fn ratios_keep_four_significant_digits() {
        assert_eq!(ratio(5.0, 2.0), 2.5);
        assert_eq!(ratio(1.0, 3.0), 0.3333);
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }
}
