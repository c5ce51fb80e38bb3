//! `cowclone bench clone`: every way of cloning a base image, timed in one run on one base.
//!
//! One directory holds the bases and every clone. `base.qcow2` (size as asked, every cluster
//! written with pseudo-random data, so that a full copy copies real data) is the base of
//! `native-qcow2`, `qemu-img`, `copy` and `reflink`; `base.vdi` (a dynamic VDI of the same size
//! and data) is the base of `native-vdi` and `vboxmanage`.
//!
//! ```text
//! bases ─► probe each method (tool present? one untimed warm-up clone) ─► skipped + reason
//!       ─► round r = 0..N: every method once, the starting method rotating with r
//!          (clock: the clone, plus fsync of file and directory with --durable)
//!       ─► after the clock: fsync (so delayed allocation settles), stat: st_size, st_blocks
//! ```
//!
//! Methods are interleaved so that whatever the machine does during the run (other builds,
//! writeback) falls on all of them alike.

use std::collections::HashMap;
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use imagefmt::backing::BackingPolicy;
use imagefmt::new_file::NewFileMode;
use imagefmt::qcow2::write::WriteOptions;
use imagefmt::{ImageFormat, Qcow2Builder};
use indicatif::ProgressBar;
use serde::Serialize;

use crate::data::XorShift;
use crate::stats::{median, median_u64, p90, round1, round_significant};
use crate::{extents, fs_facts, tools, BenchError, Result};

/// The qcow2 base's file name inside the bench directory.
pub const BASE_QCOW2: &str = "base.qcow2";
/// The VDI base's file name inside the bench directory.
pub const BASE_VDI: &str = "base.vdi";

/// A way of making a clone of a base image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Method {
    /// `imagefmt::Qcow2Builder`: a qcow2 overlay written in-process.
    NativeQcow2,
    /// `imagefmt::vdi::create_differencing`: a VDI differencing image written in-process.
    NativeVdi,
    /// `qemu-img create -f qcow2 -b base.qcow2 -F qcow2`, a subprocess.
    QemuImg,
    /// A full byte-for-byte copy of the base file.
    Copy,
    /// A reflink (FICLONE) of the base file: shares its extents, where the filesystem can.
    Reflink,
    /// `VBoxManage createmedium disk --diffparent base.vdi`, a subprocess.
    VBoxManage,
}

impl Method {
    /// Every method, in report order.
    pub const ALL: [Method; 6] = [
        Method::NativeQcow2,
        Method::NativeVdi,
        Method::QemuImg,
        Method::Copy,
        Method::Reflink,
        Method::VBoxManage,
    ];

    /// The name used on the command line and in JSON.
    pub fn name(self) -> &'static str {
        match self {
            Method::NativeQcow2 => "native-qcow2",
            Method::NativeVdi => "native-vdi",
            Method::QemuImg => "qemu-img",
            Method::Copy => "copy",
            Method::Reflink => "reflink",
            Method::VBoxManage => "vboxmanage",
        }
    }

    /// What one clone of this method is, in a sentence.
    pub fn description(self) -> &'static str {
        match self {
            Method::NativeQcow2 => "qcow2 overlay on base.qcow2, written in-process (Qcow2Builder)",
            Method::NativeVdi => {
                "VDI differencing image on base.vdi, written in-process (vdi::create_differencing)"
            }
            Method::QemuImg => "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 (subprocess)",
            Method::Copy => "full copy of base.qcow2 (1 MiB read/write loop, no extent sharing)",
            Method::Reflink => "reflink (FICLONE) of base.qcow2: extents shared, copy-on-write",
            Method::VBoxManage => {
                "VBoxManage createmedium disk --diffparent base.vdi --format VDI (subprocess)"
            }
        }
    }

    fn extension(self) -> &'static str {
        match self {
            Method::NativeVdi | Method::VBoxManage => "vdi",
            _ => "qcow2",
        }
    }

    fn needs_vdi_base(self) -> bool {
        matches!(self, Method::NativeVdi | Method::VBoxManage)
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = BenchError;
    fn from_str(s: &str) -> Result<Self> {
        Method::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<_> = Method::ALL.iter().map(|m| m.name()).collect();
                BenchError::Invalid(format!(
                    "unknown method {s:?}: expected {} or all",
                    names.join(", ")
                ))
            })
    }
}

/// Parses a comma-separated method list (`all` for every method); duplicates are dropped and
/// the report order is kept.
pub fn parse_methods(list: &str) -> Result<Vec<Method>> {
    let mut wanted = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if item == "all" {
            wanted.extend(Method::ALL);
        } else {
            wanted.push(item.parse()?);
        }
    }
    if wanted.is_empty() {
        return Err(BenchError::Invalid("no method given".into()));
    }
    Ok(Method::ALL
        .into_iter()
        .filter(|m| wanted.contains(m))
        .collect())
}

/// Where the bases and clones go.
#[derive(Debug, Clone)]
pub enum WorkDir {
    /// A new temporary directory inside this one, removed at the end.
    TempIn(PathBuf),
    /// This directory (new or empty), kept with everything in it.
    Keep(PathBuf),
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct Config {
    /// Clones per method.
    pub count: u32,
    /// The bases' virtual size in bytes.
    pub size: u64,
    /// The methods to compare.
    pub methods: Vec<Method>,
    /// fsync each clone and its directory inside the clock, for every method alike.
    pub durable: bool,
    /// Where the bases and clones go.
    pub workdir: WorkDir,
}

/// The figures of one method. The JSON keys are the documented output of
/// `cowclone bench clone --output json` (an array of these).
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MethodResult {
    /// The method's name ([`Method::name`]).
    pub method: &'static str,
    /// What one clone is ([`Method::description`]).
    pub description: &'static str,
    /// How many timed clones the figures come from (0 if skipped).
    pub clones: u32,
    /// Median time per clone, µs.
    pub median_us: Option<f64>,
    /// 90th percentile of the time per clone, µs.
    pub p90_us: Option<f64>,
    /// Median file length per clone (`st_size`), bytes.
    pub apparent_bytes: Option<u64>,
    /// Median space allocated per clone (`st_blocks × 512`, after fsync), bytes.
    pub allocated_bytes: Option<u64>,
    /// Median bytes per clone in extents not shared with another file (`filefrag -v`, see
    /// [`crate::extents`]): what a reflink really adds; null without filefrag.
    pub unshared_bytes: Option<u64>,
    /// `median_us` divided by the `qemu-img` method's median (null if either is missing).
    pub ratio_vs_qemu_img: Option<f64>,
    /// Why the method was not measured here, or null.
    pub skipped: Option<String>,
}

/// The run's circumstances, for the human report and BENCHMARKS.md.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Environment {
    /// Host, kernel, versions, the bench directory's filesystem, date.
    #[serde(flatten)]
    pub machine: crate::fs_facts::Machine,
    /// The bench directory.
    pub dir: PathBuf,
    /// The bases' virtual size.
    pub size: u64,
    /// Clones per method.
    pub count: u32,
    /// Whether clones were fsynced inside the clock.
    pub durable: bool,
    /// `base.qcow2`: length and allocated bytes.
    pub base_qcow2_bytes: (u64, u64),
    /// `base.vdi`, if one was made: length and allocated bytes.
    pub base_vdi_bytes: Option<(u64, u64)>,
}

/// A whole run: circumstances and one result per requested method, in report order (the JSON
/// of `--output json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The circumstances.
    pub environment: Environment,
    /// One entry per method asked for, skipped ones included.
    pub results: Vec<MethodResult>,
}

#[derive(Default)]
struct Samples {
    micros: Vec<f64>,
    apparent: Vec<u64>,
    allocated: Vec<u64>,
    unshared: Vec<u64>,
}

/// Runs the comparison. `progress` gets the number of clones as its length and advances by
/// one per clone (the caller decides whether and where it is drawn).
pub fn run(config: &Config, progress: &ProgressBar) -> Result<Report> {
    if config.count == 0 {
        return Err(BenchError::Invalid("--count must be at least 1".into()));
    }
    let (dir, _temp) = prepare_dir(&config.workdir)?;
    let cloner = Cloner {
        dir: dir.clone(),
        durable: config.durable,
    };

    progress.set_message(format!("writing {BASE_QCOW2}"));
    make_qcow2_base(&cloner.base_qcow2(), config.size)?;
    let base_vdi_bytes = if config.methods.iter().any(|m| m.needs_vdi_base()) {
        progress.set_message(format!("writing {BASE_VDI}"));
        make_vdi_base(&cloner.base_vdi(), config.size)?;
        Some(fs_facts::settled_bytes(&cloner.base_vdi())?)
    } else {
        None
    };

    // Probe: a missing tool or a failing warm-up clone skips the method, with the reason.
    progress.set_message("warming up");
    let mut skipped: HashMap<Method, String> = HashMap::new();
    let mut active = Vec::new();
    for &method in &config.methods {
        let reason = match method {
            Method::QemuImg => tools::unavailable("qemu-img"),
            Method::VBoxManage => tools::unavailable("VBoxManage"),
            _ => None,
        };
        let reason = reason.or_else(|| {
            let path = dir.join(format!("warmup-{}.{}", method.name(), method.extension()));
            let outcome = cloner.clone_once(method, &path);
            cloner.discard(method, &path, config);
            outcome.err().map(|e| cloner.skip_reason(method, &e))
        });
        match reason {
            Some(reason) => {
                skipped.insert(method, reason);
            }
            None => active.push(method),
        }
    }

    progress.set_length(u64::from(config.count) * active.len() as u64);
    progress.set_position(0);
    progress.set_message("cloning");
    let mut samples: HashMap<Method, Samples> = HashMap::new();
    for round in 0..config.count as usize {
        for k in 0..active.len() {
            let method = active[(round + k) % active.len()];
            let path = dir.join(format!("{}-{round}.{}", method.name(), method.extension()));
            let start = Instant::now();
            cloner.clone_once(method, &path)?;
            let micros = start.elapsed().as_secs_f64() * 1e6;
            let (apparent, allocated) = fs_facts::settled_bytes(&path)?;
            let entry = samples.entry(method).or_default();
            entry.micros.push(micros);
            entry.apparent.push(apparent);
            entry.allocated.push(allocated);
            entry.unshared.extend(extents::unshared_bytes(&path));
            cloner.release(method, &path, config)?;
            progress.inc(1);
        }
    }
    if base_vdi_bytes.is_some() && active.contains(&Method::VBoxManage) {
        // Unregister the base from VirtualBox's media registry (the files stay).
        let _ = tools::run_ok(
            "VBoxManage",
            &[
                "closemedium".as_ref(),
                "disk".as_ref(),
                cloner.base_vdi().as_os_str(),
            ],
        );
    }

    let results = summarize(&config.methods, &samples, &skipped);
    let environment = Environment {
        machine: fs_facts::Machine::now(&dir),
        dir: match &config.workdir {
            WorkDir::Keep(_) => dir.clone(),
            WorkDir::TempIn(parent) => parent.clone(),
        },
        size: config.size,
        count: config.count,
        durable: config.durable,
        base_qcow2_bytes: fs_facts::settled_bytes(&cloner.base_qcow2())?,
        base_vdi_bytes,
    };
    Ok(Report {
        environment,
        results,
    })
}

/// Turns the samples into one result per method, ratios against `qemu-img`'s median.
fn summarize(
    methods: &[Method],
    samples: &HashMap<Method, Samples>,
    skipped: &HashMap<Method, String>,
) -> Vec<MethodResult> {
    let qemu_median = samples
        .get(&Method::QemuImg)
        .and_then(|s| median(&s.micros));
    methods
        .iter()
        .map(|&method| {
            let s = samples.get(&method);
            let median_us = s.and_then(|s| median(&s.micros));
            MethodResult {
                method: method.name(),
                description: method.description(),
                clones: s.map_or(0, |s| s.micros.len() as u32),
                median_us: median_us.map(round1),
                p90_us: s.and_then(|s| p90(&s.micros)).map(round1),
                apparent_bytes: s.and_then(|s| median_u64(&s.apparent)),
                allocated_bytes: s.and_then(|s| median_u64(&s.allocated)),
                unshared_bytes: s.and_then(|s| median_u64(&s.unshared)),
                ratio_vs_qemu_img: match (median_us, qemu_median) {
                    // Rounded to 4 significant digits: more would be noise.
                    (Some(m), Some(q)) if q > 0.0 => Some(round_significant(m / q, 4)),
                    _ => None,
                },
                skipped: skipped.get(&method).cloned(),
            }
        })
        .collect()
}

/// Creates the bench directory; the `TempDir`, if any, removes it when dropped.
fn prepare_dir(workdir: &WorkDir) -> Result<(PathBuf, Option<tempfile::TempDir>)> {
    match workdir {
        WorkDir::TempIn(parent) => {
            let temp = tempfile::Builder::new()
                .prefix("cowclone-bench.")
                .tempdir_in(parent)
                .map_err(BenchError::io(format!(
                    "creating a bench directory in {}",
                    parent.display()
                )))?;
            Ok((temp.path().to_owned(), Some(temp)))
        }
        WorkDir::Keep(dir) => {
            fs::create_dir_all(dir)
                .map_err(BenchError::io(format!("creating {}", dir.display())))?;
            let mut entries =
                fs::read_dir(dir).map_err(BenchError::io(format!("listing {}", dir.display())))?;
            if entries.next().is_some() {
                return Err(BenchError::KeepDirNotEmpty { path: dir.clone() });
            }
            let dir = fs::canonicalize(dir)
                .map_err(BenchError::io(format!("resolving {}", dir.display())))?;
            Ok((dir, None))
        }
    }
}

/// Writes `size` bytes of pseudo-random guest data in 1 MiB pieces through `write`.
fn fill_guest(size: u64, mut write: impl FnMut(&[u8], u64) -> imagefmt::Result<()>) -> Result<()> {
    const PIECE: u64 = 1 << 20;
    let mut rng = XorShift::new(0xC0C1_0E5E);
    let mut buf = vec![0u8; PIECE as usize];
    let mut offset = 0;
    while offset < size {
        let len = PIECE.min(size - offset) as usize;
        rng.fill(&mut buf[..len]);
        write(&buf[..len], offset)?;
        offset += len as u64;
    }
    Ok(())
}

/// `base.qcow2`: a new qcow2 image of `size` bytes, every cluster written.
fn make_qcow2_base(path: &Path, size: u64) -> Result<()> {
    let created = Qcow2Builder::new(path).size(size).create()?;
    let mut image =
        imagefmt::chain::open_qcow2_rw(path, &BackingPolicy::Deny, WriteOptions::default())?;
    fill_guest(created.virtual_size, |buf, offset| {
        image.write_at(buf, offset)
    })?;
    image.flush()?;
    Ok(())
}

/// `base.vdi`: a new dynamic VDI of `size` bytes, every block written.
fn make_vdi_base(path: &Path, size: u64) -> Result<()> {
    let header = imagefmt::vdi::create_dynamic(path, size, NewFileMode::default())?;
    let policy = imagefmt::backing::BackingPolicy::FollowLocal;
    let options = imagefmt::chain::ChainOptions::new(&policy);
    let mut image = imagefmt::chain::open_vdi_rw(path, &options, false)?;
    fill_guest(header.virtual_size(), |buf, offset| {
        image.write_at(buf, offset)
    })?;
    image.flush()?;
    Ok(())
}

/// Makes clones in one directory.
struct Cloner {
    dir: PathBuf,
    durable: bool,
}

impl Cloner {
    fn base_qcow2(&self) -> PathBuf {
        self.dir.join(BASE_QCOW2)
    }

    fn base_vdi(&self) -> PathBuf {
        self.dir.join(BASE_VDI)
    }

    /// Makes one clone at `path` (a new name) by `method`; with `durable`, the file and the
    /// directory are on disk when this returns.
    fn clone_once(&self, method: Method, path: &Path) -> Result<()> {
        match method {
            Method::NativeQcow2 => {
                Qcow2Builder::new(path)
                    .backing(BASE_QCOW2)
                    .backing_format(ImageFormat::Qcow2)
                    .durable(self.durable)
                    .create()?;
                return Ok(());
            }
            Method::NativeVdi => {
                let mode = NewFileMode {
                    overwrite: false,
                    durable: self.durable,
                };
                imagefmt::vdi::create_differencing(&self.base_vdi(), path, mode)?;
                return Ok(());
            }
            Method::QemuImg => {
                tools::run_ok(
                    "qemu-img",
                    &[
                        "create".as_ref(),
                        "-q".as_ref(),
                        "-f".as_ref(),
                        "qcow2".as_ref(),
                        "-b".as_ref(),
                        BASE_QCOW2.as_ref(),
                        "-F".as_ref(),
                        "qcow2".as_ref(),
                        path.as_os_str(),
                    ],
                )?;
            }
            Method::Copy => copy_file(&self.base_qcow2(), path)?,
            // What `clone --method reflink` does (fsync, if durable, below as for the others).
            Method::Reflink => cloner::reflink::reflink_new(&self.base_qcow2(), path, false)
                .map_err(|e| BenchError::Invalid(cloner::registry::error_chain(&e)))?,
            Method::VBoxManage => {
                tools::run_ok(
                    "VBoxManage",
                    &[
                        "createmedium".as_ref(),
                        "disk".as_ref(),
                        "--filename".as_ref(),
                        path.as_os_str(),
                        "--diffparent".as_ref(),
                        self.base_vdi().as_os_str(),
                        "--format".as_ref(),
                        "VDI".as_ref(),
                    ],
                )?;
            }
        }
        if self.durable {
            sync_file_and_dir(path)?;
        }
        Ok(())
    }

    /// After a clone was measured: unregisters VirtualBox clones and, unless the clones are
    /// kept, truncates full copies (so N copies do not fill the disk). Files are deleted only
    /// with the directory at the end: deleting during the run slows later creates on ext4.
    fn release(&self, method: Method, path: &Path, config: &Config) -> Result<()> {
        if method == Method::VBoxManage {
            let _ = tools::run_ok(
                "VBoxManage",
                &["closemedium".as_ref(), "disk".as_ref(), path.as_os_str()],
            );
        }
        if method == Method::Copy && matches!(config.workdir, WorkDir::TempIn(_)) {
            OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(0))
                .map_err(BenchError::io(format!("truncating {}", path.display())))?;
        }
        Ok(())
    }

    /// Removes a warm-up clone (and its VirtualBox registration), whatever state it is in.
    fn discard(&self, method: Method, path: &Path, config: &Config) {
        if path.exists() {
            let _ = self.release(method, path, config);
            let _ = fs::remove_file(path);
        }
    }

    /// The reason given for skipping `method` after its warm-up clone failed with `error`.
    fn skip_reason(&self, method: Method, error: &BenchError) -> String {
        let mut reason = error.to_string();
        let mut source = std::error::Error::source(error);
        while let Some(cause) = source {
            reason.push_str(&format!(": {cause}"));
            source = cause.source();
        }
        if method == Method::Reflink {
            format!(
                "the filesystem here ({}) does not support reflinks: {reason}",
                fs_facts::filesystem_name(&self.dir)
            )
        } else {
            reason
        }
    }
}

/// Copies `from` to the new file `to` byte for byte. Not `std::fs::copy`: that uses
/// `copy_file_range`, which shares extents on btrfs and XFS and would turn "copy" into a
/// reflink there.
fn copy_file(from: &Path, to: &Path) -> Result<()> {
    let mut source =
        File::open(from).map_err(BenchError::io(format!("opening {}", from.display())))?;
    let mut target = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(to)
        .map_err(BenchError::io(format!("creating {}", to.display())))?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = source
            .read(&mut buf)
            .map_err(BenchError::io(format!("reading {}", from.display())))?;
        if n == 0 {
            return Ok(());
        }
        target
            .write_all(&buf[..n])
            .map_err(BenchError::io(format!("writing {}", to.display())))?;
    }
}

/// fsync of `path` and of its directory.
fn sync_file_and_dir(path: &Path) -> Result<()> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(BenchError::io(format!("syncing {}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(BenchError::io(format!("syncing {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_lists_parse_in_report_order_and_reject_unknown_names() {
        assert_eq!(
            parse_methods("copy, native-qcow2,copy").unwrap(),
            vec![Method::NativeQcow2, Method::Copy]
        );
        assert_eq!(parse_methods("all").unwrap(), Method::ALL.to_vec());
        assert!(matches!(
            parse_methods("native-qcow2,vmware"),
            Err(BenchError::Invalid(_))
        ));
        assert!(parse_methods(" , ").is_err());
    }

    #[test]
    fn ratios_are_against_qemu_img_and_skipped_methods_have_no_figures() {
        let mut samples = HashMap::new();
        samples.insert(
            Method::QemuImg,
            Samples {
                micros: vec![100.0, 300.0, 200.0],
                apparent: vec![10; 3],
                allocated: vec![20; 3],
                unshared: vec![20; 3],
            },
        );
        samples.insert(
            Method::NativeQcow2,
            Samples {
                micros: vec![1.0, 2.0, 3.0],
                apparent: vec![5; 3],
                allocated: vec![4096; 3],
                unshared: vec![],
            },
        );
        let skipped = HashMap::from([(Method::Reflink, "no reflinks".to_owned())]);
        let methods = [Method::NativeQcow2, Method::QemuImg, Method::Reflink];
        let results = summarize(&methods, &samples, &skipped);
        assert_eq!(results[0].ratio_vs_qemu_img, Some(0.01));
        assert_eq!(results[0].allocated_bytes, Some(4096));
        assert_eq!(results[0].unshared_bytes, None);
        assert_eq!(results[1].unshared_bytes, Some(20));
        assert_eq!(results[1].ratio_vs_qemu_img, Some(1.0));
        assert_eq!(results[1].median_us, Some(200.0));
        assert_eq!(results[2].skipped.as_deref(), Some("no reflinks"));
        assert_eq!(results[2].median_us, None);
        assert_eq!(results[2].ratio_vs_qemu_img, None);
        assert_eq!(results[2].clones, 0);
    }
}
