//! `cowclone bench clone|io|ops`: argument parsing and output for the benchmark harness, which
//! lives in the `cowclone-benches` crate.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use cowclone_benches::clone_methods::{self, WorkDir};
use cowclone_benches::{io, ops, plot, report};
use imagefmt::ImageFormat;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// `cowclone bench clone|io|ops`
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// What to measure.
    #[command(subcommand)]
    pub what: BenchCommand,
}

/// The benchmarks.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Compare cloning methods on one base, in one run, interleaved: time per clone (median,
    /// p90), bytes per clone (apparent and allocated) and the ratio to `qemu-img create`.
    ///
    /// Methods: native-qcow2, native-vdi, qemu-img, copy, reflink, vboxmanage. A method that
    /// cannot run here (tool missing, filesystem without reflinks) is listed with the reason.
    /// The base (SIZE, every cluster written with pseudo-random data) and the clones go to a
    /// temporary directory in --dir, which should be on the filesystem that holds your images.
    Clone(BenchCloneArgs),
    /// Measure guest reads or writes through an image's chain, beside `qemu-img bench` on the
    /// same image.
    ///
    /// IMAGE is never modified: writes go, on each side, to a new qcow2 overlay on IMAGE in a
    /// temporary directory. See BENCHMARKS.md for what --depth means on each side.
    Io(BenchIoArgs),
    /// Measure whole-image operations beside qemu-img on a real filesystem image: convert
    /// (qcow2, zlib-compressed qcow2 and a 3-deep chain to raw; raw to qcow2, with and without
    /// -c), compare, commit, map, check, info (human; JSON of the chain), measure, create (an
    /// overlay), dd, rebase, resize (+1G and back), snapshot (-c, -a), amend (compat=0.10 and
    /// back) and bitmap --add.
    ///
    /// The workload is built at bench time in a temporary directory in --dir: an ext4
    /// filesystem made from TREE (`mkfs.ext4 -d`) in a sparse SIZE file (or --image, converted
    /// to raw), converted to qcow2 and zlib-compressed qcow2 by qemu-img, two overlays with
    /// qemu-io writes, and a partly rewritten copy of the qcow2 image for rebase. Operations
    /// that change an image work on fresh copies (not timed). Each operation runs once
    /// untimed, its outputs judged by qemu-img (a mismatch is an error), then RUNS times per
    /// tool, interleaved. Needs qemu-img, qemu-io, mkfs.ext4 and GNU time (/usr/bin/time, for
    /// the peak RSS).
    Ops(BenchOpsArgs),
}

/// `cowclone bench clone [--count N] [--size SIZE] [--methods LIST] [--durable] ...`
#[derive(Debug, clap::Args)]
pub struct BenchCloneArgs {
    /// Clones per method.
    #[arg(long, default_value_t = 20)]
    pub count: u32,
    /// Virtual size of the base (k, M, G, T suffixes). The full copy copies all of it.
    #[arg(long, default_value = "1G")]
    pub size: String,
    /// Comma-separated methods, or `all`.
    #[arg(long, default_value = "all")]
    pub methods: String,
    /// fsync every clone and its directory inside the clock (every method alike).
    #[arg(long)]
    pub durable: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
    pub output: ReportFormat,
    /// Put the bench's temporary directory in DIR (default: the system's temporary directory).
    #[arg(long, value_name = "DIR", conflicts_with = "keep")]
    pub dir: Option<PathBuf>,
    /// Use DIR (new or empty) for the bases and clones and keep them (full copies too: this
    /// takes COUNT × SIZE of disk).
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Draw a bar chart of the median time per clone to FILE.svg (and the JSON next to it,
    /// FILE.json, unless --json-out is given).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// `cowclone bench io IMAGE [--pattern seq|rand] [--block-size B] [--rw read|write] [--depth D]`
#[derive(Debug, clap::Args)]
pub struct BenchIoArgs {
    /// The image (qcow2, raw, or whatever imagefmt's chain opens); its backing chain is
    /// followed (local files). Never modified: writes go to scratch overlays.
    pub image: PathBuf,
    /// Format of IMAGE (default: recognised by content, raw otherwise).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Sequential or random (block-aligned) offsets.
    #[arg(long, default_value = "seq", value_parser = ["seq", "rand"])]
    pub pattern: String,
    /// Bytes per request (k, M suffixes); must divide the virtual size.
    #[arg(long, default_value = "64K")]
    pub block_size: String,
    /// Reads of IMAGE, or writes to a scratch overlay on it.
    #[arg(long, default_value = "read", value_parser = ["read", "write"])]
    pub rw: String,
    /// Requests in flight: qemu-img's queue depth; for our reads, that many threads; our
    /// writes are one at a time.
    #[arg(long, default_value_t = 1)]
    pub depth: u32,
    /// Requests per side.
    #[arg(long, default_value_t = 10_000)]
    pub count: u64,
    /// Where the scratch overlays go (default: the system's temporary directory).
    #[arg(long, value_name = "DIR")]
    pub scratch_dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
    pub output: ReportFormat,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Draw a bar chart of the throughput of both sides to FILE.svg (and FILE.json).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// `cowclone bench ops [--image FILE | --tree DIR] [--size SIZE] [--runs N] ...`
#[derive(Debug, clap::Args)]
pub struct BenchOpsArgs {
    /// Build the workload from this image instead of a tree (any format qemu-img reads; never
    /// modified).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["tree", "size"])]
    pub image: Option<PathBuf>,
    /// Directory tree copied into the workload's ext4 filesystem (default: /usr/share, or
    /// /usr/lib).
    #[arg(long, value_name = "DIR")]
    pub tree: Option<PathBuf>,
    /// Size of the workload's filesystem image (k, M, G, T suffixes; at least 16M).
    #[arg(long, default_value = "4G")]
    pub size: String,
    /// Timed runs per operation and tool.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    /// Measure this cowclone binary (another build, say) instead of the running one.
    #[arg(long, value_name = "BIN")]
    pub cowclone: Option<PathBuf>,
    /// Measure only these operations (comma-separated: convert-qcow2-raw, convert-zlib-raw,
    /// convert-chain-raw, convert-raw-qcow2, convert-raw-qcow2-c, compare, commit, map, check,
    /// info, info-chain-json, measure, create, dd, rebase, resize, snapshot, amend, bitmap);
    /// each is judged as in a full run. Default: all.
    #[arg(long, value_name = "NAME[,NAME]")]
    pub only: Option<String>,
    /// Put the bench's temporary directory in DIR (default: the system's temporary directory).
    /// It needs room for the workload and two outputs at a time.
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Human)]
    pub output: ReportFormat,
    /// Also write the results as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    pub json_out: Option<PathBuf>,
    /// Draw a bar chart of both tools' median times per operation to FILE.svg (and the JSON
    /// next to it, FILE.json, unless --json-out is given).
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
}

/// Output formats of the bench reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReportFormat {
    /// A table for people.
    Human,
    /// JSON (clone: an array with one object per method).
    Json,
    /// CSV: one line per method (clone) or per tool (io).
    Csv,
}

/// Runs `cowclone bench`.
pub fn bench(args: BenchArgs, out: &mut impl Write) -> Result<()> {
    match args.what {
        BenchCommand::Clone(args) => bench_clone(args, out),
        BenchCommand::Io(args) => bench_io(args, out),
        BenchCommand::Ops(args) => bench_ops(args, out),
    }
}

/// A progress bar on stderr; indicatif draws nothing when stderr is not a terminal.
fn progress_bar() -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    if let Ok(style) = ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed}") {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

fn bench_clone(args: BenchCloneArgs, out: &mut impl Write) -> Result<()> {
    let size = imagefmt::size::parse_size(&args.size)?;
    let config = clone_methods::Config {
        count: args.count,
        size,
        methods: clone_methods::parse_methods(&args.methods)?,
        durable: args.durable,
        workdir: match (&args.keep, &args.dir) {
            (Some(keep), _) => WorkDir::Keep(keep.clone()),
            (None, Some(dir)) => WorkDir::TempIn(dir.clone()),
            (None, None) => WorkDir::TempIn(std::env::temp_dir()),
        },
    };
    let progress = progress_bar();
    let result = clone_methods::run(&config, &progress);
    progress.finish_and_clear();
    let report = result.context("bench clone")?;
    let results = &report.results;

    write_side_files(
        args.json_out.as_deref(),
        args.plot.as_deref(),
        &report,
        |path| {
            let bars: Vec<(String, f64)> = results
                .iter()
                .filter_map(|r| r.median_us.map(|m| (r.method.to_owned(), m)))
                .collect();
            let title = format!(
                "Time per clone ({} base, {} clones per method)",
                args.size, args.count
            );
            plot::bar_chart(path, &title, "median µs per clone", &bars)
        },
    )?;
    match args.output {
        ReportFormat::Json => crate::output::write_qemu_json(out, &report)?,
        ReportFormat::Csv => report::clone_csv(results, out)?,
        ReportFormat::Human => report::clone_human(&report, out)?,
    }
    Ok(())
}

fn bench_io(args: BenchIoArgs, out: &mut impl Write) -> Result<()> {
    let config = io::Config {
        image: args.image.clone(),
        format: args
            .format
            .as_deref()
            .map(str::parse::<ImageFormat>)
            .transpose()?,
        pattern: args.pattern.parse()?,
        block_size: imagefmt::size::parse_size(&args.block_size)?,
        rw: args.rw.parse()?,
        depth: args.depth,
        count: args.count,
        scratch_parent: args.scratch_dir.clone().unwrap_or_else(std::env::temp_dir),
    };
    let progress = progress_bar();
    let result = io::run(&config, &progress);
    progress.finish_and_clear();
    let report = result.with_context(|| format!("bench io {}", args.image.display()))?;

    write_side_files(
        args.json_out.as_deref(),
        args.plot.as_deref(),
        &report,
        |path| {
            let bars: Vec<(String, f64)> = report
                .results
                .iter()
                .filter_map(|s| s.mb_per_s.map(|v| (s.tool.to_owned(), v)))
                .collect();
            let title = format!(
                "{:?} {:?}, {} B requests, depth {}",
                report.rw, report.pattern, report.block_size, report.depth
            );
            plot::bar_chart(path, &title, "MB/s", &bars)
        },
    )?;
    match args.output {
        ReportFormat::Json => crate::output::write_qemu_json(out, &report)?,
        ReportFormat::Csv => {
            writeln!(
                out,
                "tool,pattern,depth_used,requests,mb_per_s,median_latency_us,p90_latency_us,mean_latency_us"
            )?;
            let opt = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
            for s in &report.results {
                writeln!(
                    out,
                    "{},{},{},{},{},{},{},{}",
                    s.tool,
                    if s.pattern == io::Pattern::Seq {
                        "seq"
                    } else {
                        "rand"
                    },
                    s.depth_used,
                    s.requests,
                    opt(s.mb_per_s),
                    opt(s.median_latency_us),
                    opt(s.p90_latency_us),
                    opt(s.mean_latency_us),
                )?;
            }
        }
        ReportFormat::Human => report::io_human(&report, out)?,
    }
    Ok(())
}

fn bench_ops(args: BenchOpsArgs, out: &mut impl Write) -> Result<()> {
    let source = match (&args.image, &args.tree) {
        (Some(image), _) => ops::Source::Image(image.clone()),
        (None, Some(tree)) => ops::Source::Tree(tree.clone()),
        (None, None) => ops::Source::default_tree(),
    };
    let config = ops::Config {
        source,
        size: imagefmt::size::parse_size(&args.size)?,
        runs: args.runs,
        dir_parent: args.dir.clone().unwrap_or_else(std::env::temp_dir),
        cowclone: match args.cowclone.clone() {
            Some(bin) => bin,
            None => std::env::current_exe().context("finding the cowclone binary to measure")?,
        },
        operations: match &args.only {
            Some(list) => ops::Operation::parse_list(list)?,
            None => ops::Operation::ALL.to_vec(),
        },
    };
    let progress = progress_bar();
    let result = ops::run(&config, &progress);
    progress.finish_and_clear();
    let report = result.context("bench ops")?;

    write_side_files(
        args.json_out.as_deref(),
        args.plot.as_deref(),
        &report,
        |path| {
            let groups: Vec<String> = report
                .operations
                .iter()
                .map(|o| o.operation.to_owned())
                .collect();
            let times = |side: fn(&ops::OperationResult) -> f64| {
                report.operations.iter().map(side).collect::<Vec<f64>>()
            };
            let series = [
                ("cowclone", times(|o| o.cowclone.median_ms)),
                ("qemu-img", times(|o| o.qemu_img.median_ms)),
            ];
            let title = format!(
                "Whole-image operations beside qemu-img: median of {} runs, {} MiB image",
                args.runs,
                report.workload.virtual_size >> 20
            );
            plot::grouped_bar_chart(
                path,
                &title,
                "median wall time",
                &groups,
                &series,
                &report::milliseconds,
            )
        },
    )?;
    match args.output {
        ReportFormat::Json => crate::output::write_qemu_json(out, &report)?,
        ReportFormat::Csv => report::ops_csv(&report, out)?,
        ReportFormat::Human => report::ops_human(&report, out)?,
    }
    Ok(())
}

/// Writes the JSON file (`--json-out`, or next to `--plot`) and the chart (`draw` gets its
/// path).
fn write_side_files(
    json_out: Option<&Path>,
    plot_path: Option<&Path>,
    value: &impl serde::Serialize,
    draw: impl FnOnce(&Path) -> cowclone_benches::Result<()>,
) -> Result<()> {
    let json_path = json_out
        .map(Path::to_owned)
        .or_else(|| plot_path.map(|p| p.with_extension("json")));
    if let Some(path) = &json_path {
        report::write_json_file(path, value)?;
    }
    if let Some(path) = plot_path {
        draw(path)?;
    }
    Ok(())
}
