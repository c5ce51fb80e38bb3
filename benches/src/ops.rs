//! `cowclone bench ops`: whole-image operations (convert, compare, commit, map, check) by the
//! `cowclone` binary and by `qemu-img`, as processes, on one workload, in one run.
//!
//! ```text
//! workload: a real directory tree ─► mkfs.ext4 -d into a sparse raw file (or --image, converted
//!           to raw) ─► qemu-img convert: image.qcow2, image-zlib.qcow2 (-c, zlib);
//!           chain: image.qcow2 ◄─ mid.qcow2 ◄─ top.qcow2 (qemu-io writes in each overlay)
//! per operation: run 0 (untimed): cowclone, qemu-img ─► sizes, judged by qemu-img ─► mismatch = error
//!                run 1..=N:       cowclone, qemu-img, each under GNU time (wall time, peak RSS)
//!                (syncfs before each command; outputs removed after each run)
//! ```
//!
//! Both tools run as processes with the same arguments where their syntax agrees, each with a
//! fresh output file, on inputs that run 0 has brought into the page cache for both alike. The
//! wall time is the command's; the time until its output is on disk (the command, then fsync of
//! what it wrote) is reported beside it, so that leaving more dirty data behind is not free.
//! `commit` works on fresh copies of the chain's two overlays each time (copying is not timed).

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
    pub const ALL: [Operation; 9] = [
        Operation::ConvertQcow2Raw,
        Operation::ConvertZlibRaw,
        Operation::ConvertChainRaw,
        Operation::ConvertRawQcow2,
        Operation::ConvertRawQcow2Compressed,
        Operation::Compare,
        Operation::Commit,
        Operation::Map,
        Operation::Check,
    ];

    /// The name in reports and JSON.
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
        }
    }

    /// A short ASCII name for file names.
    fn slug(self) -> &'static str {
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
        }
    }

    /// The format of the file the operation writes, if it writes one.
    fn output_format(self) -> Option<&'static str> {
        match self {
            Operation::ConvertQcow2Raw | Operation::ConvertZlibRaw | Operation::ConvertChainRaw => {
                Some("raw")
            }
            Operation::ConvertRawQcow2
            | Operation::ConvertRawQcow2Compressed
            | Operation::Commit => Some("qcow2"),
            Operation::Compare | Operation::Map | Operation::Check => None,
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
    /// `commit`, the overlay committed into.
    pub output_bytes: Option<u64>,
    /// The written file's allocated space (`st_blocks × 512`, after fsync), bytes.
    pub output_allocated_bytes: Option<u64>,
}

/// One operation, both tools. Part of the documented JSON of `bench ops`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct OperationResult {
    /// [`Operation::name`].
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
    /// How the outputs were judged equal (the judging command and its verdict).
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
    /// One entry per operation, in [`Operation::ALL`] order.
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
    progress.set_length(Operation::ALL.len() as u64 * (u64::from(config.runs) + 1) * 2);
    progress.set_position(0);
    let bench = Bench {
        dir: dir.to_owned(),
        out_dir,
        cowclone: config.cowclone.clone(),
    };
    let mut operations = Vec::new();
    for op in Operation::ALL {
        progress.set_message(op.slug());
        operations.push(bench.measure(op, config.runs, progress)?);
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

/// The guest ranges the overlays write, scaled to the image: (qemu-io command, which overlay).
/// Offsets and lengths are multiples of 64 KiB inside `size`.
fn overlay_writes(size: u64) -> [(String, &'static str); 5] {
    const ALIGN: u64 = 64 << 10;
    let at = |fraction: u64| size / fraction / ALIGN * ALIGN;
    let unit = at(64).max(ALIGN);
    [
        (format!("write -P 0x11 {} {}", at(8), 2 * unit), MID),
        (format!("write -z {} {}", at(2), unit), MID),
        (format!("write -P 0x22 {} {}", at(8) + unit, 2 * unit), TOP),
        (format!("write -P 0x33 {} {}", at(4) * 3, unit), TOP),
        (format!("discard {} {}", at(4), unit), TOP),
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
        let mut commands = Vec::new();
        let mut io_args: Vec<OsString> = vec!["-f".into(), "qcow2".into()];
        for (command, target) in overlay_writes(virtual_size) {
            if target == overlay {
                io_args.extend(["-c".into(), command.clone().into()]);
                commands.push(command);
            }
        }
        io_args.push(path.into());
        tools::run_ok("qemu-io", &io_args)?;
        made_by.push(format!(
            "qemu-img create -f qcow2 -b {} -F qcow2; qemu-io -c '{}'",
            backing.display(),
            commands.join("' -c '")
        ));
    }
    fs_facts::sync_filesystem(dir)?;
    let build_seconds = round1(start.elapsed().as_secs_f64());

    let mut files = Vec::new();
    for (name, made_by) in [RAW, QCOW2, ZLIB_QCOW2, MID, TOP].into_iter().zip(made_by) {
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

/// One command of one run: what to run and what it leaves behind.
struct Invocation {
    program: OsString,
    args: Vec<OsString>,
    /// The file it writes (for commit: the overlay committed into).
    output: Option<PathBuf>,
    /// Every file it writes (fsynced after it exits, for the durable time).
    written: Vec<PathBuf>,
    /// Where its stdout goes.
    stdout: PathBuf,
    /// A directory made for it (commit's copies), removed after the run.
    scratch: Option<PathBuf>,
}

/// The bench directory and the binary measured.
struct Bench {
    dir: PathBuf,
    out_dir: PathBuf,
    cowclone: PathBuf,
}

impl Bench {
    /// Run 0 (judged, untimed) and `runs` timed runs of `op`, both tools per run.
    fn measure(&self, op: Operation, runs: u32, progress: &ProgressBar) -> Result<OperationResult> {
        let mut samples: [Vec<f64>; 2] = Default::default();
        let mut durable_samples: [Vec<f64>; 2] = Default::default();
        let mut peak_rss = [0u64; 2];
        let mut sizes: [Option<(u64, u64)>; 2] = [None, None];
        let mut commands = [String::new(), String::new()];
        let mut verified = String::new();
        for run in 0..=runs {
            let mut outcomes = Vec::new();
            for (i, tool) in [Tool::Cowclone, Tool::QemuImg].into_iter().enumerate() {
                let invocation = self.invocation(op, tool)?;
                fs_facts::sync_filesystem(&self.dir)?;
                let stdout = File::create(&invocation.stdout).map_err(BenchError::io(format!(
                    "creating {}",
                    invocation.stdout.display()
                )))?;
                let rss_file = self.out_dir.join("rss.txt");
                let measured =
                    tools::run_measured(&invocation.program, &invocation.args, stdout, &rss_file)?;
                let synced = Instant::now();
                for file in &invocation.written {
                    File::open(file)
                        .and_then(|f| f.sync_all())
                        .map_err(BenchError::io(format!("syncing {}", file.display())))?;
                }
                let sync_seconds = synced.elapsed().as_secs_f64();
                progress.inc(1);
                peak_rss[i] = peak_rss[i].max(measured.peak_rss_kib);
                if run > 0 {
                    samples[i].push(measured.seconds * 1e3);
                    durable_samples[i].push((measured.seconds + sync_seconds) * 1e3);
                }
                commands[i] =
                    tools::command_line(&invocation.program.to_string_lossy(), &invocation.args)
                        .replace(&format!("{}/", self.dir.display()), "");
                outcomes.push(invocation);
            }
            if run == 0 {
                for (i, invocation) in outcomes.iter().enumerate() {
                    if let Some(output) = &invocation.output {
                        sizes[i] = Some(fs_facts::settled_bytes(output)?);
                    }
                }
                verified = judge(op, &outcomes[0], &outcomes[1])?;
            }
            for invocation in &outcomes {
                remove_outputs(invocation)?;
            }
        }
        let result = |i: usize, tool: Tool| ToolResult {
            tool: tool.name(),
            command: commands[i].clone(),
            median_ms: round1(median(&samples[i]).unwrap_or_default()),
            p90_ms: round1(p90(&samples[i]).unwrap_or_default()),
            samples_ms: samples[i].iter().map(|&s| round1(s)).collect(),
            durable_median_ms: round1(median(&durable_samples[i]).unwrap_or_default()),
            peak_rss_kib: peak_rss[i],
            output_bytes: sizes[i].map(|s| s.0),
            output_allocated_bytes: sizes[i].map(|s| s.1),
        };
        let cowclone = result(0, Tool::Cowclone);
        let qemu_img = result(1, Tool::QemuImg);
        Ok(OperationResult {
            operation: op.name(),
            runs,
            speedup: ratio(qemu_img.median_ms, cowclone.median_ms),
            size_ratio: match (sizes[0], sizes[1]) {
                (Some(ours), Some(theirs)) => Some(ratio(ours.1 as f64, theirs.1 as f64)),
                _ => None,
            },
            cowclone,
            qemu_img,
            verified,
        })
    }

    /// The command `tool` runs for `op`, with a fresh output path (and, for commit, fresh
    /// copies of the overlays).
    fn invocation(&self, op: Operation, tool: Tool) -> Result<Invocation> {
        let name = format!("{}-{}", op.slug(), tool.name());
        let mut output = op
            .output_format()
            .map(|ext| self.out_dir.join(format!("{name}.{ext}")));
        let mut scratch = None;
        let mut written = Vec::new();
        let mut args: Vec<OsString> = Vec::new();
        let file = |name: &str| OsString::from(self.dir.join(name));
        let json: &[&str] = match tool {
            Tool::Cowclone => &["--output", "json"],
            Tool::QemuImg => &["--output=json"],
        };
        let push = |args: &mut Vec<OsString>, items: &[&str]| {
            args.extend(items.iter().map(OsString::from));
        };
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
                args.push(output.clone().unwrap_or_default().into());
            }
            Operation::Compare => {
                push(&mut args, &["compare", "-f", "qcow2", "-F", "raw"]);
                args.extend([file(QCOW2), file(RAW)]);
            }
            Operation::Commit => {
                let copies = self.out_dir.join(&name);
                fs::create_dir(&copies)
                    .map_err(BenchError::io(format!("creating {}", copies.display())))?;
                for overlay in [MID, TOP] {
                    fs::copy(self.dir.join(overlay), copies.join(overlay)).map_err(
                        BenchError::io(format!("copying {overlay} to {}", copies.display())),
                    )?;
                }
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
        }
        Ok(Invocation {
            program: match tool {
                Tool::Cowclone => self.cowclone.clone().into(),
                Tool::QemuImg => "qemu-img".into(),
            },
            args,
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

/// Judges cowclone's result of `op` against qemu-img's with qemu-img; returns the verdict, or
/// [`BenchError::Mismatch`].
fn judge(op: Operation, ours: &Invocation, theirs: &Invocation) -> Result<String> {
    let mismatch = |detail: String| BenchError::Mismatch {
        operation: op.name(),
        detail,
    };
    match op {
        Operation::Compare => Ok("both exit 0: images identical".to_owned()),
        Operation::Map | Operation::Check => {
            let read = |invocation: &Invocation| -> Result<Value> {
                let bytes = fs::read(&invocation.stdout).map_err(BenchError::io(format!(
                    "reading {}",
                    invocation.stdout.display()
                )))?;
                parse_json(&bytes, || invocation.program.to_string_lossy().into_owned())
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
            Ok(verdict.join("; "))
        }
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
                let numbers: Vec<u64> = command
                    .split_whitespace()
                    .rev()
                    .take(2)
                    .map(|n| n.parse().unwrap())
                    .collect();
                let (len, offset) = (numbers[0], numbers[1]);
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

    #[test]
    fn ratios_keep_four_significant_digits() {
        assert_eq!(ratio(5.0, 2.0), 2.5);
        assert_eq!(ratio(1.0, 3.0), 0.3333);
        assert_eq!(ratio(1.0, 0.0), 0.0);
    }
}
