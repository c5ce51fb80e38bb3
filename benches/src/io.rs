//! `cowclone bench io`: guest reads or writes through an image's chain, by imagefmt and by
//! `qemu-img bench`, on the same image with the same request size and count.
//!
//! Reads go to the image itself (opened read-only). Writes never touch it: each side writes to
//! its own new qcow2 overlay on the image, in a temporary directory, made the same way
//! (`Qcow2Builder` for ours, `qemu-img create -b IMAGE -F FMT` for qemu-img's).
//!
//! What is and is not alike:
//! - imagefmt is synchronous. Reads with depth D run on D threads sharing the open chain (D
//!   requests in flight); writes need the image exclusively, so they run one at a time (depth
//!   1, reported in `depth_used`). qemu-img keeps D requests in flight with its AIO engine.
//! - qemu-img bench reports only the total time: its latency is the mean (time × depth ÷
//!   requests), not a median; ours times every request.
//! - qemu-img bench has no random offsets (only a fixed step), so with `--pattern rand` its
//!   side runs sequentially and says so in `pattern` and `note`.
//! - Both go through the page cache (qemu-img's default cache mode, writeback).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::Instant;

use imagefmt::backing::BackingPolicy;
use imagefmt::extent::GuestRead;
use imagefmt::image::ImageHeader;
use imagefmt::offsets::GuestOffset;
use imagefmt::qcow2::write::WriteOptions;
use imagefmt::{ImageFormat, Qcow2Builder};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::data::XorShift;
use crate::stats::{median, p90, round1};
use crate::{tools, BenchError, Result};

/// Where successive requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// One block after the other, wrapping at the end of the disk.
    Seq,
    /// Block-aligned offsets drawn uniformly (fixed seed, so runs repeat).
    Rand,
}

impl FromStr for Pattern {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "seq" => Ok(Pattern::Seq),
            "rand" => Ok(Pattern::Rand),
            _ => Err(BenchError::Invalid(format!(
                "unknown pattern {s:?}: expected seq or rand"
            ))),
        }
    }
}

/// Reads or writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Rw {
    /// Guest reads of the image.
    Read,
    /// Guest writes, to a scratch overlay on the image.
    Write,
}

impl FromStr for Rw {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "read" => Ok(Rw::Read),
            "write" => Ok(Rw::Write),
            _ => Err(BenchError::Invalid(format!(
                "unknown direction {s:?}: expected read or write"
            ))),
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Config {
    /// The image (its backing chain is followed, local files only).
    pub image: PathBuf,
    /// Its format, if given (otherwise recognised by content, raw if unrecognised).
    pub format: Option<ImageFormat>,
    /// Offsets.
    pub pattern: Pattern,
    /// Bytes per request; must divide the virtual size.
    pub block_size: u64,
    /// Reads or writes.
    pub rw: Rw,
    /// Requests in flight (see the module docs for what that means on each side).
    pub depth: u32,
    /// Requests per side.
    pub count: u64,
    /// Where the write sides' scratch overlays go (a temporary directory is made inside).
    pub scratch_parent: PathBuf,
}

/// One side's figures. Part of the documented JSON of `cowclone bench io --output json`.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SideResult {
    /// `cowclone` (imagefmt) or `qemu-img` (`qemu-img bench`).
    pub tool: &'static str,
    /// The pattern this side really ran.
    pub pattern: Pattern,
    /// Requests in flight this side really had.
    pub depth_used: u32,
    /// Requests completed.
    pub requests: u64,
    /// Wall time of all requests, seconds.
    pub seconds: Option<f64>,
    /// Throughput, MB/s (10^6 bytes per second).
    pub mb_per_s: Option<f64>,
    /// Median latency per request, µs (null where the tool does not report it).
    pub median_latency_us: Option<f64>,
    /// 90th percentile latency per request, µs (null where the tool does not report it).
    pub p90_latency_us: Option<f64>,
    /// Mean latency per request, µs: seconds × depth ÷ requests.
    pub mean_latency_us: Option<f64>,
    /// The exact command or call, for reproducing.
    pub command: String,
    /// What differs from the request, or null.
    pub note: Option<String>,
    /// Why this side did not run, or null.
    pub skipped: Option<String>,
}

/// A whole `bench io` run.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Report {
    /// Host, kernel, versions, the image's filesystem, date.
    pub environment: crate::fs_facts::Machine,
    /// The image.
    pub image: PathBuf,
    /// Its format.
    pub format: &'static str,
    /// Its virtual size.
    pub virtual_size: u64,
    /// Reads or writes.
    pub rw: Rw,
    /// The pattern asked for.
    pub pattern: Pattern,
    /// Bytes per request.
    pub block_size: u64,
    /// Depth asked for.
    pub depth: u32,
    /// Requests per side.
    pub count: u64,
    /// `cowclone` first, then `qemu-img`.
    pub results: Vec<SideResult>,
}

/// Runs both sides. `progress` advances by one per request of our side (qemu-img reports
/// nothing while it runs).
pub fn run(config: &Config, progress: &ProgressBar) -> Result<Report> {
    if config.block_size == 0 || config.count == 0 || config.depth == 0 {
        return Err(BenchError::Invalid(
            "--block-size, --count and --depth must be at least 1".into(),
        ));
    }
    let file = File::open(&config.image).map_err(BenchError::io(format!(
        "opening {}",
        config.image.display()
    )))?;
    let header = match config.format {
        Some(format) => ImageHeader::read_as(&file, format, &config.image)?,
        None => ImageHeader::read_detected(&file, &config.image, true)?,
    };
    drop(file);
    let format = header.format();
    let size = header.virtual_size();
    if size < config.block_size || size % config.block_size != 0 {
        return Err(BenchError::Invalid(format!(
            "--block-size {} must divide the virtual size {size}",
            config.block_size
        )));
    }
    let image = std::fs::canonicalize(&config.image).map_err(BenchError::io(format!(
        "resolving {}",
        config.image.display()
    )))?;
    let scratch = tempfile::Builder::new()
        .prefix("cowclone-bench-io.")
        .tempdir_in(&config.scratch_parent)
        .map_err(BenchError::io(format!(
            "creating a scratch directory in {}",
            config.scratch_parent.display()
        )))?;
    let offsets = offsets(config.pattern, config.count, config.block_size, size);

    progress.set_length(config.count);
    progress.set_message("cowclone");
    let ours = match config.rw {
        Rw::Read => ours_read(&image, format, config, &offsets, progress)?,
        Rw::Write => ours_write(&image, format, scratch.path(), config, &offsets, progress)?,
    };
    progress.set_message("qemu-img bench");
    let theirs = match tools::unavailable("qemu-img") {
        Some(reason) => skipped_side(config, reason),
        // qemu cannot open some chains cowclone reads (VDI differencing images): the side is
        // then listed as skipped with qemu's own message, not silently dropped.
        None => qemu_img_bench(&image, format, scratch.path(), config).unwrap_or_else(|e| {
            skipped_side(config, format!("qemu-img cannot run on this image: {e}"))
        }),
    };
    Ok(Report {
        environment: crate::fs_facts::Machine::now(&image),
        image,
        format: format.name(),
        virtual_size: size,
        rw: config.rw,
        pattern: config.pattern,
        block_size: config.block_size,
        depth: config.depth,
        count: config.count,
        results: vec![ours, theirs],
    })
}

/// The offset of every request: sequential wraps at the end of the disk, as qemu-img bench's
/// does; random is block-aligned and reproducible.
fn offsets(pattern: Pattern, count: u64, block: u64, size: u64) -> Vec<u64> {
    let blocks = size / block;
    let mut rng = XorShift::new(0x5EED);
    (0..count)
        .map(|i| match pattern {
            Pattern::Seq => (i % blocks) * block,
            Pattern::Rand => (rng.next_u64() % blocks) * block,
        })
        .collect()
}

fn ours_read(
    image: &Path,
    format: ImageFormat,
    config: &Config,
    offsets: &[u64],
    progress: &ProgressBar,
) -> Result<SideResult> {
    let chain = imagefmt::chain::open_chain(image, Some(format), &BackingPolicy::FollowLocal)?;
    let chain: &dyn GuestRead = chain.as_ref();
    let depth = config.depth.min(offsets.len() as u32).max(1);
    let latencies = Mutex::new(Vec::with_capacity(offsets.len()));
    let block = config.block_size as usize;
    let start = Instant::now();
    let outcome: Result<()> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..depth as usize)
            .map(|t| {
                let latencies = &latencies;
                scope.spawn(move || -> Result<()> {
                    let mut buf = vec![0u8; block];
                    let mut mine = Vec::new();
                    for &offset in offsets.iter().skip(t).step_by(depth as usize) {
                        let op = Instant::now();
                        chain.read_at(&mut buf, GuestOffset(offset))?;
                        mine.push(op.elapsed().as_secs_f64() * 1e6);
                        progress.inc(1);
                    }
                    latencies
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .extend(mine);
                    Ok(())
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| BenchError::Invalid("a reader thread panicked".into()))??;
        }
        Ok(())
    });
    outcome?;
    let seconds = start.elapsed().as_secs_f64();
    let latencies = latencies.into_inner().unwrap_or_else(|e| e.into_inner());
    let note = (depth > 1).then(|| format!("{depth} threads, each issuing synchronous reads"));
    Ok(measured_side(
        "cowclone",
        config,
        depth,
        seconds,
        Some(&latencies),
        format!(
            "imagefmt::chain::open_chain + GuestRead::read_at, {} B per request",
            config.block_size
        ),
        note,
    ))
}

fn ours_write(
    image: &Path,
    format: ImageFormat,
    scratch: &Path,
    config: &Config,
    offsets: &[u64],
    progress: &ProgressBar,
) -> Result<SideResult> {
    let overlay = scratch.join("cowclone-overlay.qcow2");
    Qcow2Builder::new(&overlay)
        .backing(image.to_string_lossy())
        .backing_format(format)
        .create()?;
    let mut writer = imagefmt::chain::open_qcow2_rw(
        &overlay,
        &BackingPolicy::FollowLocal,
        WriteOptions::default(),
    )?;
    let buf = vec![0xA5u8; config.block_size as usize];
    let mut latencies = Vec::with_capacity(offsets.len());
    let start = Instant::now();
    for &offset in offsets {
        let op = Instant::now();
        writer.write_at(&buf, offset)?;
        latencies.push(op.elapsed().as_secs_f64() * 1e6);
        progress.inc(1);
    }
    writer.flush()?;
    let seconds = start.elapsed().as_secs_f64();
    let note = (config.depth > 1).then(|| {
        "writes need the image exclusively: one request at a time (depth 1); \
         the total includes the final flush"
            .to_owned()
    });
    Ok(measured_side(
        "cowclone",
        config,
        1,
        seconds,
        Some(&latencies),
        format!(
            "Qcow2Image::write_at on a new overlay of the image, {} B per request, then flush",
            config.block_size
        ),
        note,
    ))
}

fn qemu_img_bench(
    image: &Path,
    format: ImageFormat,
    scratch: &Path,
    config: &Config,
) -> Result<SideResult> {
    let mut args: Vec<String> = vec![
        "bench".into(),
        "-c".into(),
        config.count.to_string(),
        "-d".into(),
        config.depth.to_string(),
        "-s".into(),
        config.block_size.to_string(),
    ];
    let target = match config.rw {
        Rw::Read => {
            args.extend(["-f".into(), format.name().into()]);
            image.to_owned()
        }
        Rw::Write => {
            let overlay = scratch.join("qemu-img-overlay.qcow2");
            let backing = image.to_string_lossy().into_owned();
            tools::run_ok(
                "qemu-img",
                &[
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-b",
                    backing.as_str(),
                    "-F",
                    format.name(),
                    &overlay.to_string_lossy(),
                ],
            )?;
            args.extend([
                "-w".into(),
                "--pattern=165".into(),
                "-f".into(),
                "qcow2".into(),
            ]);
            overlay
        }
    };
    args.push(target.to_string_lossy().into_owned());
    let command = tools::command_line("qemu-img", &args);
    let output = tools::run_ok("qemu-img", &args)?;
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let seconds = parse_run_seconds(&stdout).ok_or_else(|| BenchError::ToolOutput {
        command: command.clone(),
        output: stdout.clone(),
    })?;
    let note = (config.pattern == Pattern::Rand).then(|| {
        "qemu-img bench has no random offsets (only a fixed step): ran sequentially".to_owned()
    });
    let mut side = measured_side(
        "qemu-img",
        config,
        config.depth,
        seconds,
        None,
        command,
        note,
    );
    side.pattern = Pattern::Seq;
    Ok(side)
}

/// The seconds in qemu-img bench's last line, `Run completed in 1.234 seconds.`
fn parse_run_seconds(stdout: &str) -> Option<f64> {
    let rest = stdout.split("Run completed in ").nth(1)?;
    rest.split_whitespace().next()?.parse().ok()
}

fn measured_side(
    tool: &'static str,
    config: &Config,
    depth_used: u32,
    seconds: f64,
    latencies_us: Option<&[f64]>,
    command: String,
    note: Option<String>,
) -> SideResult {
    let bytes = config.count as f64 * config.block_size as f64;
    SideResult {
        tool,
        pattern: config.pattern,
        depth_used,
        requests: config.count,
        seconds: Some(seconds),
        mb_per_s: (seconds > 0.0).then(|| round1(bytes / seconds / 1e6)),
        median_latency_us: latencies_us.and_then(median).map(round1),
        p90_latency_us: latencies_us.and_then(p90).map(round1),
        mean_latency_us: Some(round1(
            seconds * 1e6 * f64::from(depth_used) / config.count as f64,
        )),
        command,
        note,
        skipped: None,
    }
}

fn skipped_side(config: &Config, reason: String) -> SideResult {
    SideResult {
        tool: "qemu-img",
        pattern: config.pattern,
        depth_used: 0,
        requests: 0,
        seconds: None,
        mb_per_s: None,
        median_latency_us: None,
        p90_latency_us: None,
        mean_latency_us: None,
        command: String::new(),
        note: None,
        skipped: Some(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_wrap_sequentially_and_random_ones_stay_aligned_inside() {
        assert_eq!(offsets(Pattern::Seq, 5, 10, 30), vec![0, 10, 20, 0, 10]);
        let random = offsets(Pattern::Rand, 1000, 512, 512 * 64);
        assert!(random.iter().all(|o| o % 512 == 0 && *o < 512 * 64));
        assert!(random.iter().any(|&o| o != random[0]));
        assert_eq!(random, offsets(Pattern::Rand, 1000, 512, 512 * 64));
    }

    #[test]
    fn qemu_img_bench_output_is_understood() {
        let out = "Sending 100 read requests, 4096 bytes each, 1 in parallel (starting at offset \
                   0, step size 4096)\nRun completed in 0.012 seconds.\n";
        assert_eq!(parse_run_seconds(out), Some(0.012));
        assert_eq!(parse_run_seconds("nothing"), None);
    }
}
