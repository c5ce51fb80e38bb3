//! `cowclone check` and `cowclone map`: qemu-img's `check` and `map`, natively, with qemu-img's
//! output and exit codes.
//!
//! check exits 0 when clean, 2 for corruptions, 3 for leaks only, 1 when the check could not be
//! done (open failure, internal errors) and 63 for formats without a check (raw) or without a
//! repair (VDI with -r). After a
//! repair the image is checked again and that result is reported, as qemu-img does.

use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use imagefmt::backing::BackingPolicy;
use imagefmt::image::ImageHeader;
use imagefmt::map::MapEntry;
use imagefmt::qcow2::check::{CheckReport, Repair};
use imagefmt::qcow2::features::IncompatibleFeatures;
use imagefmt::ImageFormat;

use crate::args::OutputFormat;

/// `cowclone check [-r leaks|all] [--output human|json] [-f FMT] FILE`
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Repair: `leaks` lowers refcounts that are too high; `all` also fixes refcounts that are
    /// too low and wrong COPIED flags, rebuilding the refcount structure if needed.
    #[arg(short = 'r', value_enum, value_name = "leaks|all")]
    pub repair: Option<RepairMode>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Format of FILE (default: recognised by content).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Print nothing but errors; only the exit code tells.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Parent of a VDI differencing image in the chain, nearest first (repeatable); default:
    /// found by UUID among the VDI files in the image's own directory.
    #[arg(long = "parent", value_name = "FILE")]
    pub parents: Vec<PathBuf>,
    /// The image.
    pub file: PathBuf,
    #[command(flatten)]
    pub guard: crate::registry_cmd::WriteGuardArgs,
}

/// What `check -r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairMode {
    /// Leaked clusters only.
    Leaks,
    /// Leaks and corruptions.
    All,
}

/// `cowclone map [--output human|json] [-f FMT] FILE`
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Format of FILE (default: recognised by content, raw otherwise).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Parent of a VDI differencing image in the chain, nearest first (repeatable); default:
    /// found by UUID among the VDI files in the image's own directory.
    #[arg(long = "parent", value_name = "FILE")]
    pub parents: Vec<PathBuf>,
    /// The image.
    pub file: PathBuf,
}

/// Runs `check`; returns the exit code (errors that stop the check are `Err`: exit 1).
pub fn check(args: CheckArgs, out: &mut impl Write) -> Result<u8> {
    let path = &args.file;
    let context = || format!("{}", path.display());
    let format = args
        .format
        .as_deref()
        .map(str::parse::<ImageFormat>)
        .transpose()?;
    let repair = match args.repair {
        None => Repair::None,
        Some(RepairMode::Leaks) => Repair::Leaks,
        Some(RepairMode::All) => Repair::All,
    };
    if repair != Repair::None {
        args.guard.check("check -r", std::slice::from_ref(path))?;
    }
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(repair != Repair::None)
        .open(path)
        .with_context(|| format!("could not open {}", path.display()))?;
    let header = match format {
        Some(format) => ImageHeader::read_as(&file, format, path),
        None => ImageHeader::read_detected(&file, path, true),
    }
    .with_context(context)?;
    let cluster = match &header {
        ImageHeader::Qcow2(cluster) => cluster,
        ImageHeader::Vdi(vdi) => {
            if repair != Repair::None {
                // As qemu-img: VDI has a check but no repair.
                eprintln!("cowclone: VDI images cannot be repaired (check them without -r)");
                return Ok(63);
            }
            return check_vdi(&args, &file, vdi, out);
        }
        ImageHeader::Raw { .. } => {
            eprintln!("cowclone: This image format does not support checks");
            return Ok(63);
        }
    };
    // qemu-img opens the whole chain (and the external data file) before checking.
    if let Some(name) = cluster.backing_file.as_deref() {
        let policy = BackingPolicy::FollowLocal;
        let backing = policy.resolve(path, name).with_context(context)?;
        let backing_format = cluster
            .backing_format()
            .map(str::parse::<ImageFormat>)
            .transpose()?;
        imagefmt::chain::open_chain(&backing, backing_format, &policy)
            .with_context(|| format!("could not open backing file {}", backing.display()))?;
    }
    if cluster
        .header
        .incompatible_features
        .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE)
    {
        let name = cluster.data_file().unwrap_or_default();
        let data = imagefmt::backing::resolve(path, name).with_context(context)?;
        std::fs::File::open(&data)
            .with_context(|| format!("could not open data file {}", data.display()))?;
    }

    let first = imagefmt::qcow2::check::check(&file, repair)
        .with_context(|| format!("Check failed: {}", path.display()))?;
    print_messages(&first);
    let mut report = first.clone();
    if first.repaired_anything() {
        if args.output == OutputFormat::Human && !args.quiet {
            writeln!(
                out,
                "The following inconsistencies were found and repaired:\n\n    {} leaked \
                 clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
                first.leaks_fixed, first.corruptions_fixed
            )?;
        }
        report = imagefmt::qcow2::check::check(&file, Repair::None)
            .with_context(|| format!("Check failed: {}", path.display()))?;
        print_messages(&report);
        report.leaks_fixed = first.leaks_fixed;
        report.corruptions_fixed = first.corruptions_fixed;
    }
    report.filename = path.to_string_lossy().into_owned();

    if !args.quiet {
        write_report(out, args.output, &report)?;
    }
    let code = report.exit_code();
    if code == 1 {
        out.flush()?;
        eprintln!("cowclone: Check failed");
    }
    Ok(code)
}

/// `check` of a VDI image: qemu's block map checks, and for a differencing image its linkage (the
/// parent chain must be found and match by UUID, else exit 1 as when qemu-img cannot open a
/// backing file; a parent modified since the diff was made is a warning, as VirtualBox does not
/// refuse it either).
fn check_vdi(
    args: &CheckArgs,
    file: &std::fs::File,
    header: &imagefmt::vdi::VdiHeader,
    out: &mut impl Write,
) -> Result<u8> {
    let path = &args.file;
    if header.is_differencing() {
        let parents = imagefmt::vdi::Explicit(args.parents.clone());
        let options = crate::chain_options(&BackingPolicy::FollowLocal, false, &parents);
        let image = imagefmt::vdi::open_vdi(
            path,
            options.vdi_resolver(),
            &mut imagefmt::backing::ChainGuard::default(),
        )
        .with_context(|| format!("could not open the parent chain of {}", path.display()))?;
        for link in image.parent_links() {
            if !args.quiet && !link.modification_matches() {
                eprintln!(
                    "cowclone: warning: {} was modified after {} was made on it (modification \
                     UUID {{{}}}, the diff recorded {{{}}}): the diff may show a mix of old and \
                     new parent data",
                    link.parent.display(),
                    link.child.display(),
                    link.parent_modify,
                    link.expected_parent_modify
                );
            }
        }
    }
    let mut report = imagefmt::vdi::check::check(file)
        .with_context(|| format!("Check failed: {}", path.display()))?;
    print_messages(&report);
    report.filename = path.to_string_lossy().into_owned();
    if !args.quiet {
        write_report(out, args.output, &report)?;
    }
    Ok(report.exit_code())
}

/// Prints a check result in the chosen format.
fn write_report(out: &mut impl Write, format: OutputFormat, report: &CheckReport) -> Result<()> {
    match format {
        OutputFormat::Human => write_human_check(out, report)?,
        OutputFormat::Json => {
            let mut json = Vec::new();
            let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
            let mut serializer = serde_json::Serializer::with_formatter(&mut json, formatter);
            serde::Serialize::serialize(report, &mut serializer)?;
            out.write_all(&json)?;
            writeln!(out)?;
        }
    }
    Ok(())
}

/// What qemu-img prints on stderr while checking.
fn print_messages(report: &CheckReport) {
    for line in &report.messages {
        eprintln!("{line}");
    }
}

/// qemu-img's `dump_human_image_check`.
fn write_human_check(out: &mut impl Write, c: &CheckReport) -> std::io::Result<()> {
    if c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0 {
        writeln!(out, "No errors were found on the image.")?;
    } else {
        if c.corruptions > 0 {
            writeln!(
                out,
                "\n{} errors were found on the image.\nData may be corrupted, or further writes \
                 to the image may corrupt it.",
                c.corruptions
            )?;
        }
        if c.leaks > 0 {
            writeln!(
                out,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, \
                 but no harm to data.",
                c.leaks
            )?;
        }
        if c.check_errors > 0 {
            writeln!(
                out,
                "\n{} internal errors have occurred during the check.",
                c.check_errors
            )?;
        }
    }
    if c.total_clusters != 0 && c.allocated_clusters != 0 {
        let allocated = c.allocated_clusters as f64;
        writeln!(
            out,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            c.allocated_clusters,
            c.total_clusters,
            allocated * 100.0 / c.total_clusters as f64,
            c.fragmented_clusters as f64 * 100.0 / allocated,
            c.compressed_clusters as f64 * 100.0 / allocated,
        )?;
    }
    if c.image_end_offset != 0 {
        writeln!(out, "Image end offset: {}", c.image_end_offset)?;
    }
    Ok(())
}

/// Runs `map`; returns the exit code (errors are `Err`: exit 1).
pub fn map(args: MapArgs, out: &mut impl Write) -> Result<u8> {
    let format = args
        .format
        .as_deref()
        .map(str::parse::<ImageFormat>)
        .transpose()?;
    let parents = imagefmt::vdi::Explicit(args.parents.clone());
    let options = crate::chain_options(&BackingPolicy::FollowLocal, false, &parents);
    let entries = imagefmt::map::map_with(&args.file, format, &options)
        .with_context(|| format!("{}", args.file.display()))?;
    match args.output {
        OutputFormat::Json => write_json_map(out, &entries)?,
        OutputFormat::Human => imagefmt::map::write_human(out, &entries)?,
    }
    Ok(0)
}

/// The JSON qemu-img map prints: one entry per line, in qemu's key order and spacing.
fn write_json_map(out: &mut impl Write, entries: &[MapEntry]) -> std::io::Result<()> {
    write!(out, "[")?;
    for (i, e) in entries.iter().enumerate() {
        write!(
            out,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
             \"data\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data
        )?;
        if let Some(offset) = e.offset {
            write!(out, ", \"offset\": {offset}")?;
        }
        write!(out, "}}")?;
        if i + 1 < entries.len() {
            writeln!(out, ",")?;
        }
    }
    writeln!(out, "]")
}
