//! Whole-image commands: convert, commit, rebase, resize (qemu-img syntax).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use imagefmt::backing::BackingPolicy;
use imagefmt::qcow2::CreateOptions;
use imagefmt::ImageFormat;

/// `cowclone convert [-f FMT] -O qcow2|vdi|raw [-c] [-B BACKING [-F FMT]] [-o ...] [-p] SRC DST`
#[derive(Debug, clap::Args)]
pub struct ConvertArgs {
    /// Source format (default: recognised by content, raw otherwise).
    #[arg(short = 'f', value_name = "FMT")]
    pub source_format: Option<String>,
    /// Output format.
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub output_format: String,
    /// Compress the output's clusters (qcow2).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Backing file of the output (for -O vdi: the VDI parent of a differencing image): only
    /// data that differs from it is written.
    #[arg(short = 'B', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Backing file format (default: recognised by content).
    #[arg(short = 'F', value_name = "FMT", requires = "backing")]
    pub backing_format: Option<String>,
    /// Creation options, as for create (qcow2 options; for -O vdi: static=on|off).
    #[arg(short = 'o', value_name = "key=value,...")]
    pub options: Vec<String>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Parallel read requests (1..16, as qemu-img's -m).
    #[arg(short = 'm', value_name = "N", default_value_t = imagefmt::convert::DEFAULT_PARALLEL)]
    pub parallel: usize,
    /// Allow out-of-order writes to the destination (as qemu-img's -W).
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Replace DST if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Refuse backing files outside DIR.
    #[arg(long, value_name = "DIR")]
    pub confine: Option<PathBuf>,
    /// Open no backing file of the source: what would fall through reads as zeros.
    #[arg(long, conflicts_with = "confine")]
    pub no_backing: bool,
    /// Read the source's guest data from the external data file its header names (refused by
    /// default: the name can point at any host file).
    #[arg(long)]
    pub allow_data_file: bool,
    /// Read the source even if another process is writing it (qemu-img -U).
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// Parent of a VDI differencing image in the chain, nearest first (repeatable); default:
    /// found by UUID among the VDI files in the image's own directory.
    #[arg(long = "parent", value_name = "FILE")]
    pub parents: Vec<PathBuf>,
    /// Source image.
    pub source: PathBuf,
    /// Output image.
    pub dest: PathBuf,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// `cowclone commit [-d] FILE`
#[derive(Debug, clap::Args)]
pub struct CommitArgs {
    /// Keep the overlay's contents (default: empty it after committing).
    #[arg(short = 'd')]
    pub keep: bool,
    /// Refuse backing files outside DIR.
    #[arg(long, value_name = "DIR")]
    pub confine: Option<PathBuf>,
    /// The overlay to commit into its backing file.
    pub file: PathBuf,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// `cowclone rebase [-u] -b NEW [-F FMT] FILE`
#[derive(Debug, clap::Args)]
pub struct RebaseArgs {
    /// Unsafe: rewrite the header only, copying no data.
    #[arg(short = 'u')]
    pub unsafe_header_only: bool,
    /// New backing file ("" removes it).
    #[arg(short = 'b', value_name = "BACKING")]
    pub backing: String,
    /// New backing format (default: recognised by content).
    #[arg(short = 'F', value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Refuse backing files outside DIR.
    #[arg(long, value_name = "DIR")]
    pub confine: Option<PathBuf>,
    /// The image to rebase (qcow2).
    pub file: PathBuf,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// `cowclone resize [--shrink] FILE [+|-]SIZE`
#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    /// Allow shrinking (refused anyway if data lies past the new end).
    #[arg(long)]
    pub shrink: bool,
    /// With --shrink: drop the data past the new end instead of refusing (qemu-img's
    /// behaviour; the qemu-img personality asks for it).
    #[arg(long, requires = "shrink")]
    pub discard_past_end: bool,
    /// The image (qcow2 or raw).
    pub file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    pub size: String,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

fn policy(confine: &Option<PathBuf>) -> BackingPolicy {
    match confine {
        Some(dir) => BackingPolicy::Confine(dir.clone()),
        None => BackingPolicy::FollowLocal,
    }
}

fn format(name: &Option<String>) -> Result<Option<ImageFormat>> {
    Ok(name.as_deref().map(str::parse).transpose()?)
}

/// Runs convert.
pub fn convert(args: ConvertArgs, _out: &mut impl Write) -> Result<()> {
    if args.overwrite {
        args.guard
            .check("convert --overwrite", std::slice::from_ref(&args.dest))?;
    }
    let policy = if args.no_backing {
        BackingPolicy::Detach
    } else {
        policy(&args.confine)
    };
    let source_format = format(&args.source_format)?;
    let parents = imagefmt::vdi::Explicit(args.parents.clone());
    let mut chain_options = crate::commands::chain_options(&policy, args.allow_data_file, &parents);
    chain_options.force_share = args.force_share;
    let source = imagefmt::chain::open_chain_with(&args.source, source_format, &chain_options)
        .with_context(|| format!("{}", args.source.display()))?;
    let output = args.output_format.parse::<ImageFormat>()?;
    let mut qcow2 = CreateOptions::default();
    let mut vdi_static = false;
    for item in args.options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("invalid option {item:?}: expected key=value"))?;
        match (output, key) {
            (ImageFormat::Qcow2, _) => qcow2.set(key, value)?,
            (ImageFormat::Vdi, "static") => {
                vdi_static = crate::commands::vdi_create::parse_on_off(key, value)?
            }
            (_, _) => bail!("Invalid parameter '{key}' for the {} format", output.name()),
        }
    }
    let options = imagefmt::convert::ConvertOptions {
        format: output,
        vdi_static,
        qcow2,
        compress: args.compress,
        backing: match &args.backing {
            Some(name) => Some((name.clone(), format(&args.backing_format)?)),
            None => None,
        },
        mode: imagefmt::new_file::NewFileMode {
            overwrite: args.overwrite,
            durable: false,
        },
        parallel: args.parallel,
        out_of_order: args.out_of_order,
    };
    let bar = args.progress.then(|| {
        let bar = indicatif::ProgressBar::new(source.virtual_size());
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:40} {percent:>3}% {bytes}/{total_bytes} {eta}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar
    });
    let mut report = |done: u64, _total: u64| {
        if let Some(bar) = &bar {
            bar.set_position(done);
        }
    };
    // Errors name the file at fault themselves (source image, destination or backing file).
    imagefmt::convert::convert(source.as_ref(), &args.dest, &options, &policy, &mut report)?;
    if let Some(bar) = bar {
        bar.finish();
    }
    Ok(())
}

/// Runs commit.
pub fn commit(args: CommitArgs, out: &mut impl Write) -> Result<()> {
    args.guard.check_commit(&args.file, args.keep)?;
    imagefmt::commit::commit(&args.file, &policy(&args.confine), args.keep)
        .with_context(|| format!("{}", args.file.display()))?;
    writeln!(out, "Image committed.")?;
    Ok(())
}

/// Runs rebase.
pub fn rebase(args: RebaseArgs, _out: &mut impl Write) -> Result<()> {
    args.guard
        .check("rebase", std::slice::from_ref(&args.file))?;
    let new = if args.backing.is_empty() {
        None
    } else {
        let fmt = match format(&args.backing_format)? {
            Some(f) => f,
            None if args.unsafe_header_only => bail!("-u needs the backing format (-F)"),
            None => {
                let path = imagefmt::backing::resolve(&args.file, &args.backing)?;
                let file = imagefmt::open::open_image(&path, imagefmt::open::OpenHow::read())
                    .with_context(|| format!("{}", path.display()))?;
                imagefmt::image::ImageHeader::read_detected(&file, &path, false)?.format()
            }
        };
        Some((args.backing.clone(), fmt))
    };
    imagefmt::rebase::rebase(
        &args.file,
        &new,
        args.unsafe_header_only,
        &policy(&args.confine),
    )
    .with_context(|| format!("{}", args.file.display()))?;
    Ok(())
}

/// Runs resize. The image is write-locked before its header is read and held to the end.
pub fn resize(args: ResizeArgs, out: &mut impl Write) -> Result<()> {
    args.guard
        .check("resize", std::slice::from_ref(&args.file))?;
    let context = || format!("{}", args.file.display());
    let file = imagefmt::open::open_image(&args.file, imagefmt::open::OpenHow::write())
        .with_context(context)?;
    let header = imagefmt::image::ImageHeader::read_detected(&file, &args.file, true)
        .with_context(context)?;
    let current = header.virtual_size();
    let new = if let Some(delta) = args.size.strip_prefix('+') {
        current
            .checked_add(imagefmt::size::parse_size(delta)?)
            .context("size overflows")?
    } else if let Some(delta) = args.size.strip_prefix('-') {
        current
            .checked_sub(imagefmt::size::parse_size(delta)?)
            .context("the image would shrink below zero")?
    } else {
        imagefmt::size::parse_size(&args.size)?
    };
    match header.format() {
        ImageFormat::Qcow2 => {
            let mut image = imagefmt::chain::qcow2_rw_from_file(
                file,
                &args.file,
                &BackingPolicy::FollowLocal,
                imagefmt::qcow2::write::WriteOptions::default(),
            )
            .with_context(context)?;
            if args.discard_past_end {
                image.resize_discarding(new).with_context(context)?;
            } else {
                image.resize(new, args.shrink).with_context(context)?;
            }
            image.flush()?;
            hold_if_asked(&args.file);
        }
        ImageFormat::Raw => {
            if new < current && !args.shrink {
                bail!("shrinking needs --shrink (data past the new end is lost in a raw image)");
            }
            file.set_len(new).with_context(context)?;
            hold_if_asked(&args.file);
        }
        ImageFormat::Vdi => bail!("resizing VDI images is not supported"),
    }
    writeln!(out, "Image resized.")?;
    Ok(())
}

/// With `COWCLONE_HOLD_LOCKS` set in the environment, says so on stderr and waits for standard
/// input to close before the operation lets go of the image (and of its locks). For tests and
/// demonstrations that another process is refused while cowclone writes an image, without
/// depending on timing.
fn hold_if_asked(path: &std::path::Path) {
    if std::env::var_os("COWCLONE_HOLD_LOCKS").is_some() {
        eprintln!("cowclone: holding {} until stdin closes", path.display());
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
    }
}
