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
use imagefmt::image::ImageHeader;
use imagefmt::open::{open_image, OpenHow};
use imagefmt::ops::map::MapEntry;
use imagefmt::qcow2::check::{CheckReport, Repair};
use imagefmt::qcow2::features::IncompatibleFeatures;
use imagefmt::ImageFormat;

use crate::args::{ChainPolicyArgs, OutputArg, OutputFormat};

/// `cowclone check [-r leaks|all] [--output human|json] [-f FMT] [-U] [--confine DIR] FILE`
#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    /// Repair: `leaks` lowers refcounts that are too high; `all` also fixes refcounts that are
    /// too low and wrong COPIED flags, rebuilding the refcount structure if needed. The image
    /// is locked for writing: refused while another process uses it.
    #[arg(
        short = 'r',
        value_enum,
        value_name = "leaks|all",
        conflicts_with = "force_share"
    )]
    pub repair: Option<RepairMode>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
    /// Format of FILE (default: recognised by content).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Print nothing but errors; only the exit code tells.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Backing, parent and data file policy.
    #[command(flatten)]
    pub chain: ChainPolicyArgs,
    /// The image.
    pub file: PathBuf,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// What `check -r` repairs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RepairMode {
    /// Leaked clusters only.
    Leaks,
    /// Leaks and corruptions.
    All,
}

/// `cowclone map [--output human|json] [-f FMT] [-U] [--confine DIR] FILE`
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
    /// Format of FILE (default: recognised by content, raw otherwise).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Backing, parent and data file policy.
    #[command(flatten)]
    pub chain: ChainPolicyArgs,
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
    // Locked before its header is read: for writing when repairing, else for shared reading.
    let how = if repair == Repair::None {
        OpenHow::reading(args.chain.force_share)
    } else {
        OpenHow::write()
    }
    .with_block_devices(args.chain.allow_block_devices);
    let file =
        open_image(path, how).with_context(|| format!("could not open {}", path.display()))?;
    let header = ImageHeader::read(&file, format, path, true).with_context(context)?;
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
    // qemu-img opens the whole chain (and the external data file) before checking; the handles
    // (and their shared-read locks) are held until the check is done. Both follow the same
    // policy as every other command: --confine, and data files only with --allow-data-file.
    let policy = args.chain.policy();
    let parents = args.chain.vdi_parents();
    let options = args.chain.options(&policy, &parents);
    let _backing = match cluster.backing_file.as_deref() {
        Some(name) => {
            let backing = policy.resolve(path, name).with_context(context)?;
            let backing_format = cluster
                .backing_format()
                .map(str::parse::<ImageFormat>)
                .transpose()?;
            Some(
                imagefmt::chain::open_chain_with(&backing, backing_format, &options).with_context(
                    || format!("could not open backing file {}", backing.display()),
                )?,
            )
        }
        None => None,
    };
    let _data_file = match cluster.data_file() {
        Some(name)
            if args.chain.allow_data_file
                && cluster
                    .header
                    .incompatible_features
                    .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE) =>
        {
            let data = policy.resolve(path, name).with_context(context)?;
            Some(
                open_image(&data, options.open_how())
                    .with_context(|| format!("could not open data file {}", data.display()))?,
            )
        }
        _ => None,
    };

    let first = imagefmt::qcow2::check::check(&file, repair)
        .with_context(|| format!("Check failed: {}", path.display()))?;
    print_messages(&first);
    let mut report = first.clone();
    if first.repaired_anything() {
        if args.output.format == OutputFormat::Human && !args.quiet {
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
        write_report(out, args.output.format, &report)?;
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
        let policy = args.chain.policy();
        let parents = args.chain.vdi_parents();
        let options = args.chain.options(&policy, &parents);
        // The same open file description (and so the same locks) as the one being checked.
        let top = file
            .try_clone()
            .with_context(|| format!("{}", path.display()))?;
        let image = imagefmt::chain::vdi_from_file(top, header.clone(), path, &options)
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
        write_report(out, args.output.format, &report)?;
    }
    Ok(report.exit_code())
}

/// Prints a check result in the chosen format.
fn write_report(out: &mut impl Write, format: OutputFormat, report: &CheckReport) -> Result<()> {
    crate::output::emit(out, format, report, |out, report| {
        Ok(write_human_check(out, report)?)
    })
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
    let policy = args.chain.policy();
    let parents = args.chain.vdi_parents();
    let options = args.chain.options(&policy, &parents);
    // Entries are written as they are found: memory stays constant on any image. The header
    // (or the opening bracket) comes with the first entry, so an image that cannot be opened
    // prints nothing on stdout, as with qemu-img.
    let mut started = false;
    let mut first = true;
    let mut human_error = None;
    let json = args.output.format == OutputFormat::Json;
    let start = |out: &mut dyn Write| -> std::io::Result<()> {
        if json {
            write!(out, "[")
        } else {
            imagefmt::ops::map::write_human_header(out).map_err(|e| match e {
                imagefmt::ops::map::HumanMapError::Io(e) => e,
                other => std::io::Error::other(other.to_string()),
            })
        }
    };
    imagefmt::ops::map::map_each(&args.file, format, &options, |entry| {
        if !std::mem::replace(&mut started, true) {
            start(out).map_err(imagefmt::Error::io("writing the map"))?;
        }
        let written = match args.output.format {
            OutputFormat::Json => write_json_entry(out, &entry, std::mem::take(&mut first)),
            OutputFormat::Human if human_error.is_some() => Ok(()),
            OutputFormat::Human => match imagefmt::ops::map::write_human_row(out, &entry) {
                Err(imagefmt::ops::map::HumanMapError::Io(e)) => Err(e),
                Err(e) => {
                    human_error = Some(e);
                    Ok(())
                }
                Ok(()) => Ok(()),
            },
        };
        written.map_err(imagefmt::Error::io("writing the map"))
    })
    .with_context(|| format!("{}", args.file.display()))?;
    if !started {
        start(out)?;
    }
    if let Some(e) = human_error {
        return Err(e.into());
    }
    if args.output.format == OutputFormat::Json {
        writeln!(out, "]")?;
    }
    Ok(0)
}

/// One entry of the JSON qemu-img map prints (one entry per line, in qemu's key order and
/// spacing), preceded by the separator unless it is the first.
fn write_json_entry(out: &mut impl Write, e: &MapEntry, first: bool) -> std::io::Result<()> {
    if !first {
        writeln!(out, ",")?;
    }
    write!(
        out,
        "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \
         \"data\": {}, \"compressed\": {}",
        e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
    )?;
    if let Some(offset) = e.offset {
        write!(out, ", \"offset\": {offset}")?;
    }
    write!(out, "}}")
}
