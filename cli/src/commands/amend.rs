//! `amend`: change a qcow2 image's compat level, lazy refcounts, refcount width, size or
//! data-file settings in place (qemu-img amend syntax and messages).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use imagefmt::qcow2::amend::{amend_reporting_with, AmendError, AmendOptions};
use imagefmt::ImageFormat;

/// `cowclone amend [-f FMT] [-p] [-q] [--force] -o OPTIONS FILE`
#[derive(Debug, clap::Args)]
pub struct AmendArgs {
    /// Format of FILE (only qcow2 can be amended; default: recognised by content).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// What to change (`-o help` lists the options): compat=0.10|1.1, lazy_refcounts=on|off, refcount_bits=1..64, size=SIZE,
    /// data_file=NAME, data_file_raw=off, backing_file/backing_fmt (only their current values)
    /// (repeatable; comma-separated).
    #[arg(short = 'o', value_name = "key=value,...")]
    pub options: Vec<String>,
    /// Show progress (a bar on a terminal, qemu-img's "(x.xx/100%)" lines otherwise).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Quiet: no progress output.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Accepted for qemu-img compatibility (it forces risky LUKS key-slot changes; cowclone
    /// amends no encryption options).
    #[arg(long)]
    pub force: bool,
    /// Cache mode, accepted for qemu-img compatibility (cowclone writes through the page
    /// cache and syncs when done, as qemu-img's default `writeback`).
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    /// The image to amend.
    pub file: PathBuf,
    /// How the image's external data file is found (opened for writing only by a size change).
    #[command(flatten)]
    pub data_files: crate::args::DataFileArgs,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// Runs amend. The image is write-locked before its header is read and held to the end.
pub fn amend(args: AmendArgs, out: &mut impl Write) -> Result<()> {
    if args.options.is_empty() {
        bail!("Must specify options (-o)\nTry 'cowclone amend --help' for more info");
    }
    // From here on qemu-img ends its progress display with a newline on every path, also when
    // the image or the options are refused (or `-o help` answered) before any line was shown.
    let show_progress = args.progress && !args.quiet;
    let mut shown = false;
    let result = amend_image(args, out, &mut shown);
    if show_progress && !shown {
        writeln!(out)?;
    }
    result
}

/// [`amend`] after the options were found; `shown` is set once the progress display starts
/// (it then ends itself).
fn amend_image(args: AmendArgs, out: &mut impl Write, shown: &mut bool) -> Result<()> {
    args.guard
        .check("amend", std::slice::from_ref(&args.file))?;
    let context = || format!("Could not open '{}'", args.file.display());
    let file = imagefmt::open::open_image(&args.file, imagefmt::open::OpenHow::write())
        .with_context(context)?;
    let format = match &args.format {
        Some(name) => name.parse::<ImageFormat>()?,
        None => imagefmt::image::ImageHeader::read_detected(&file, &args.file, true)
            .with_context(context)?
            .format(),
    };
    if format != ImageFormat::Qcow2 {
        bail!(
            "Format driver '{}' does not support option amendment",
            format.name()
        );
    }
    let text = args.options.join(",");
    if imagefmt::qcow2::amend::wants_help(&text) {
        write!(out, "{}", imagefmt::qcow2::amend::help_text())?;
        return Ok(());
    }
    let as_anyhow = |e: AmendError| match e {
        AmendError::Refused {
            message,
            hint: Some(hint),
        } => anyhow!("{message}\n{hint}"),
        AmendError::Refused { message, .. } => anyhow!("{message}"),
        other => anyhow::Error::new(other).context(format!("{}", args.file.display())),
    };
    let options = AmendOptions::parse(&text).map_err(as_anyhow)?;
    // qemu-img's sequence: 0% once the image is open, then what amend reports (as
    // `100.f * done / total`), then 100% whether amend succeeded or not, then the newline.
    let mut progress = crate::progress::Progress::new(args.progress && !args.quiet, out);
    *shown = true;
    let policy = imagefmt::backing::BackingPolicy::FollowLocal;
    let chain = args.data_files.options(&policy);
    let data_file = Some((args.file.as_path(), &chain));
    let result = amend_reporting_with(file, &options, data_file, &mut |done, total| {
        progress.set_percent(100f32 * done as f32 / total as f32)
    });
    progress.set_percent(100.0);
    progress.finish();
    for line in result.map_err(as_anyhow)? {
        eprintln!("{line}");
    }
    Ok(())
}
