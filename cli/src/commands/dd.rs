//! `dd`: copy part of an image into a new image (qemu-img dd syntax: `bs=`, `count=`, `skip=`,
//! `if=`, `of=`).

use std::io::Write;

use anyhow::{bail, Context, Result};
use imagefmt::ops::dd::{DdOperands, DdPlan};
use imagefmt::qcow2::CreateOptions;
use imagefmt::ImageFormat;

use crate::args::ChainPolicyArgs;

/// `cowclone dd [-U] [-f FMT] [-O OUTPUT_FMT] [bs=BYTES] [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT`
#[derive(Debug, clap::Args)]
pub struct DdArgs {
    /// Format of INPUT (default: recognised by content, raw otherwise).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Format of OUTPUT: raw, qcow2 or vdi.
    #[arg(short = 'O', value_name = "OUTPUT_FMT", default_value = "raw")]
    pub output_format: String,
    /// Replace OUTPUT if it exists (qemu-img always does; cowclone refuses by default).
    #[arg(long)]
    pub overwrite: bool,
    #[command(flatten)]
    pub chain: ChainPolicyArgs,
    /// bs=BLOCK_SIZE[kKMGTP] (default 512), count=BLOCKS, skip=BLOCKS, if=INPUT, of=OUTPUT.
    #[arg(value_name = "OPERAND")]
    pub operands: Vec<String>,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// Formats qemu-img knows but cowclone does not write.
const FOREIGN_OUTPUTS: [&str; 8] = [
    "vmdk",
    "vhdx",
    "vpc",
    "qed",
    "qcow",
    "parallels",
    "luks",
    "bochs",
];

/// Runs dd. A `skip` past the end of the input warns (as qemu-img does) and creates an empty
/// output.
pub fn dd(args: DdArgs, _out: &mut impl Write) -> Result<()> {
    let operands = DdOperands::parse(&args.operands)?;
    let policy = args.chain.policy();
    let parents = imagefmt::vdi::Explicit(args.chain.parents.clone());
    let chain_options = args.chain.options(&policy, &parents);
    let input_format = args
        .format
        .as_deref()
        .map(str::parse::<ImageFormat>)
        .transpose()?;
    let source = imagefmt::chain::open_chain_with(&operands.input, input_format, &chain_options)
        .with_context(|| format!("Could not open '{}'", operands.input.display()))?;
    let output_format = match args.output_format.parse::<ImageFormat>() {
        Ok(format) => format,
        Err(_) if FOREIGN_OUTPUTS.contains(&args.output_format.as_str()) => bail!(
            "cowclone writes qcow2, raw and vdi images, not {}",
            args.output_format
        ),
        Err(_) => bail!("Unknown file format"),
    };
    if args.overwrite {
        args.guard
            .check("dd --overwrite", std::slice::from_ref(&operands.output))?;
    }
    let plan: DdPlan = operands.options.plan(source.virtual_size());
    let options = imagefmt::ops::convert::ConvertOptions {
        format: output_format,
        vdi_static: false,
        qcow2: CreateOptions::default(),
        compress: false,
        backing: None,
        mode: imagefmt::new_file::NewFileMode {
            overwrite: args.overwrite,
            durable: false,
        },
        parallel: imagefmt::ops::convert::DEFAULT_PARALLEL,
        out_of_order: false,
        preallocation: Default::default(),
        sparse_size: imagefmt::ops::convert::SPARSE_BLOCK as u64,
        map_source: !args.chain.force_share,
    };
    if plan.skip_past_end {
        eprintln!(
            "cowclone: {}: cannot skip to specified offset",
            operands.input.display()
        );
    }
    imagefmt::ops::dd::dd(
        source.as_ref(),
        &plan,
        &operands.output,
        &options,
        &policy,
        &mut |_, _| {},
    )
    .with_context(|| {
        format!(
            "{}: error while creating output image",
            operands.output.display()
        )
    })?;
    Ok(())
}
