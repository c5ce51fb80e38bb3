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
use imagefmt::qcow2::check::Repair;
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
    /// Cache mode of the image (qemu-img's -T). Accepted for compatibility and means nothing
    /// natively: cowclone reads through the page cache, and a repair syncs its writes (fsync)
    /// whatever the mode says.
    #[arg(
        short = 'T',
        value_name = "CACHE",
        value_parser = ["none", "writeback", "writethrough", "directsync", "unsafe"]
    )]
    pub cache: Option<String>,
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

/// `cowclone map [--output human|json] [-f FMT] [--start-offset OFFSET] [--max-length LEN] [-U]
/// [--confine DIR] FILE`
#[derive(Debug, clap::Args)]
pub struct MapArgs {
    /// Map from this guest offset on (qemu-img's size syntax: 64k, 1M, ...; default 0).
    #[arg(long, value_name = "OFFSET", allow_hyphen_values = true)]
    pub start_offset: Option<String>,
    /// Map at most this many bytes (default: to the end of the image).
    #[arg(long, value_name = "LEN", allow_hyphen_values = true)]
    pub max_length: Option<String>,
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
    use imagefmt::ops::check::{self as check, CheckOutcome};
    let path = &args.file;
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
    let policy = args.chain.policy();
    let parents = args.chain.vdi_parents();
    let options = args.chain.options(&policy, &parents);
    let outcome = check::check_image(path, format, repair, &options)?;
    let (report, repair_pass, modified_parents) = match outcome {
        CheckOutcome::Checked {
            report,
            repair_pass,
            modified_parents,
        } => (report, repair_pass, modified_parents),
        CheckOutcome::RepairNotSupported => {
            eprintln!("cowclone: VDI images cannot be repaired (check them without -r)");
            return Ok(63);
        }
        CheckOutcome::NotSupported => {
            eprintln!("cowclone: This image format does not support checks");
            return Ok(63);
        }
    };
    for link in modified_parents.iter().filter(|_| !args.quiet) {
        eprintln!(
            "cowclone: warning: {} was modified after {} was made on it (modification UUID \
             {{{}}}, the diff recorded {{{}}}): the diff may show a mix of old and new parent \
             data",
            link.parent.display(),
            link.child.display(),
            link.parent_modify,
            link.expected_parent_modify
        );
    }
    // What qemu-img prints on stderr while checking: the repairing pass's findings first.
    for line in repair_pass
        .as_deref()
        .into_iter()
        .chain([&report])
        .flat_map(|r| &r.messages)
    {
        eprintln!("{line}");
    }
    if !args.quiet {
        if let (Some(pass), OutputFormat::Human) = (&repair_pass, args.output.format) {
            check::write_human_repaired(out, pass)?;
        }
        crate::output::emit(out, args.output.format, &report, |out, report| {
            Ok(check::write_human(out, report)?)
        })?;
    }
    let code = report.exit_code();
    if code == 1 {
        out.flush()?;
        eprintln!("cowclone: Check failed");
    }
    Ok(code)
}

/// Runs `map`; returns the exit code (errors are `Err`: exit 1).
pub fn map(args: MapArgs, out: &mut impl Write) -> Result<u8> {
    let format = args
        .format
        .as_deref()
        .map(str::parse::<ImageFormat>)
        .transpose()?;
    let range = imagefmt::ops::map::MapRange {
        start: offset_arg(args.start_offset.as_deref(), "start offset")?.unwrap_or(0),
        max_length: offset_arg(args.max_length.as_deref(), "max length")?,
    };
    let policy = args.chain.policy();
    let parents = args.chain.vdi_parents();
    let options = args.chain.options(&policy, &parents);
    // Entries are written as they are found: memory stays constant on any image. The header
    // (or the opening bracket) comes with the first entry, so an image that cannot be opened
    // prints nothing on stdout, as with qemu-img.
    let mut first = true;
    let mut human_error = None;
    let format_out = args.output.format;
    imagefmt::ops::map::map_range(&args.file, format, &options, range, |entry| {
        let first = std::mem::take(&mut first);
        let written = match format_out {
            OutputFormat::Json => imagefmt::ops::map::write_json_entry(out, &entry, first),
            OutputFormat::Human if human_error.is_some() => Ok(()),
            OutputFormat::Human => {
                let row = match first {
                    true => imagefmt::ops::map::write_human_header(out),
                    false => Ok(()),
                }
                .and_then(|()| imagefmt::ops::map::write_human_row(out, &entry));
                match row {
                    Err(imagefmt::ops::map::HumanMapError::Io(e)) => Err(e),
                    Err(e) => {
                        human_error = Some(e);
                        Ok(())
                    }
                    Ok(()) => Ok(()),
                }
            }
        };
        written.map_err(imagefmt::Error::io("writing the map"))
    })
    .with_context(|| format!("{}", args.file.display()))?;
    if let Some(e) = human_error {
        return Err(e.into());
    }
    if format_out == OutputFormat::Json {
        writeln!(out, "]")?;
    }
    Ok(0)
}

/// `--start-offset` / `--max-length`: a size as qemu-img reads it (suffixes k, M, G, ...),
/// between 0 and `i64::MAX`, refused with qemu-img's message otherwise.
fn offset_arg(text: Option<&str>, what: &str) -> Result<Option<u64>> {
    let Some(text) = text else {
        return Ok(None);
    };
    match imagefmt::size::parse_size(text) {
        Ok(value) if i64::try_from(value).is_ok() => Ok(Some(value)),
        _ => anyhow::bail!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        ),
    }
}
