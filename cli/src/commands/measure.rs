//! `cowclone measure`: qemu-img measure's syntax and output; the numbers come from
//! [`imagefmt::measure`].

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use imagefmt::measure::{measure, measure_image, MeasureOptions, MeasureSource};
use imagefmt::ImageFormat;

use crate::args::{ChainPolicyArgs, OutputFormat};

/// `cowclone measure [--output json] [-O qcow2|raw] [-o OPTIONS]
/// [--size SIZE | [-f FMT] [-l SNAPSHOT] FILE]`
#[derive(Debug, clap::Args)]
pub struct MeasureArgs {
    /// Output format.
    #[arg(long, value_enum, default_value_t = OutputFormat::Human)]
    pub output: OutputFormat,
    /// Format of the image to be created: qcow2 or raw (qemu-img's default: raw).
    #[arg(short = 'O', value_name = "FMT", default_value = "raw")]
    pub out_format: String,
    /// Options of the new image, as for create -o (cluster_size, compat, refcount_bits,
    /// extended_l2, preallocation, backing_file …). Repeatable.
    #[arg(short = 'o', value_name = "key=value,...")]
    pub options: Vec<String>,
    /// Measure a new image of this virtual size (k, M, G, T suffixes) instead of FILE.
    #[arg(long, value_name = "SIZE")]
    pub size: Option<String>,
    /// Format of FILE (default: recognised by content, raw otherwise).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Measure FILE's content as of its internal snapshot with this id, else this name (qcow2;
    /// qemu-img's `-l`). Also `id=ID`, `name=NAME` or `id=ID,name=NAME`: the snapshot
    /// matching all given.
    #[arg(short = 'l', long, value_name = "ID|NAME")]
    pub snapshot: Option<String>,
    /// Backing, parent and data file policy for FILE's chain.
    #[command(flatten)]
    pub chain: ChainPolicyArgs,
    /// The image whose guest content is measured.
    pub file: Option<PathBuf>,
}

/// Runs `measure`.
pub fn measure_cmd(args: MeasureArgs, out: &mut impl Write) -> Result<()> {
    let format: ImageFormat = match args.out_format.parse() {
        Ok(format) => format,
        Err(_) if !imagefmt::qcow2::create::QEMU_BACKING_FORMATS.contains(&&*args.out_format) => {
            bail!("Unknown file format '{}'", args.out_format)
        }
        Err(e) => return Err(e.into()),
    };
    let mut options = MeasureOptions::new(format)?;
    for item in args.options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("invalid option {item:?}: expected key=value"))?;
        options.set(key, value)?;
    }
    let size = args
        .size
        .as_deref()
        .map(|size| crate::commands::qemu_size("image size", size))
        .transpose()?;
    if args.file.is_none() && (args.format.is_some() || args.snapshot.is_some()) {
        bail!("-f and -l require a filename argument.");
    }
    let measured = match (size, &args.file) {
        (Some(_), Some(_)) => bail!("--size N cannot be used together with a filename."),
        (None, None) => bail!("Either --size N or one filename must be specified."),
        (Some(size), None) => measure(&options, MeasureSource::Size(size))?,
        (None, Some(file)) => {
            let source_format = args
                .format
                .as_deref()
                .map(str::parse::<ImageFormat>)
                .transpose()?;
            let policy = args.chain.policy();
            let parents = imagefmt::vdi::Explicit(args.chain.parents.clone());
            let snapshot = args
                .snapshot
                .as_deref()
                .map(crate::commands::ops::snapshot_key)
                .transpose()?;
            let mut chain = args.chain.options(&policy, &parents);
            chain.snapshot = snapshot.as_ref();
            measure_image(file, source_format, &chain, &options).map_err(|e| {
                match crate::commands::ops::snapshot_failure(&e) {
                    Some(reason) => anyhow::anyhow!("Failed to load snapshot: {reason}"),
                    None => anyhow::Error::from(e).context(format!("{}", file.display())),
                }
            })?
        }
    };
    match args.output {
        OutputFormat::Human => measured.write_human(out)?,
        OutputFormat::Json => crate::output::write_qemu_json(out, &measured)?,
    }
    Ok(())
}
