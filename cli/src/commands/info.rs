//! `cowclone info`: an image's (or a whole chain's) facts (qemu-img info).

use std::io::Write;

use anyhow::{Context, Result};

use crate::args::InfoArgs;
use crate::output::{self, emit};

/// Prints the facts of `args.file` (and with --backing-chain of every image below it).
pub fn info(args: InfoArgs, out: &mut impl Write) -> Result<()> {
    let context = || format!("{}", args.file.display());
    let format = args
        .format
        .as_deref()
        .map(str::parse::<imagefmt::ImageFormat>)
        .transpose()?;
    if args.backing_chain {
        let policy = args.chain.policy();
        let parents = args.chain.vdi_parents();
        let options = args.chain.options(&policy, &parents);
        let chain = imagefmt::ops::info::backing_chain_as(&args.file, format, &options)
            .with_context(context)?;
        emit(out, args.output.format, &chain, |out, chain| {
            for (i, image) in chain.iter().enumerate() {
                if i > 0 {
                    writeln!(out)?;
                }
                output::write_info(out, image)?;
            }
            Ok(())
        })
    } else {
        let how = imagefmt::open::OpenHow::reading(args.chain.force_share)
            .with_block_devices(args.chain.allow_block_devices)
            .metadata_only();
        let info =
            imagefmt::ops::info::image_info_as(&args.file, format, how).with_context(context)?;
        emit(out, args.output.format, &info, |out, info| {
            Ok(output::write_info(out, info)?)
        })
    }
}
