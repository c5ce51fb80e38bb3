//! `cowclone info`: an image's (or a whole chain's) facts (qemu-img info).

use std::io::Write;

use anyhow::{Context, Result};
use imagefmt::backing::BackingPolicy;

use crate::args::{InfoArgs, OutputFormat};
use crate::commands::chain_options;
use crate::output;

/// Prints the facts of `args.file` (and with --backing-chain of every image below it).
pub fn info(args: InfoArgs, out: &mut impl Write) -> Result<()> {
    let context = || format!("{}", args.file.display());
    if args.backing_chain {
        let policy = match &args.confine {
            Some(dir) => BackingPolicy::Confine(dir.clone()),
            None => BackingPolicy::FollowLocal,
        };
        let parents = imagefmt::vdi::Explicit(args.parents.clone());
        let mut options = chain_options(&policy, false, &parents);
        options.force_share = args.force_share;
        let chain =
            imagefmt::info::backing_chain_with(&args.file, &options).with_context(context)?;
        match args.output {
            OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&chain)?)?,
            OutputFormat::Human => {
                for (i, image) in chain.iter().enumerate() {
                    if i > 0 {
                        writeln!(out)?;
                    }
                    output::write_info(out, image)?;
                }
            }
        }
    } else {
        let how = imagefmt::open::OpenHow::reading(args.force_share).metadata_only();
        let info = imagefmt::info::image_info_with(&args.file, how).with_context(context)?;
        match args.output {
            OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?,
            OutputFormat::Human => output::write_info(out, &info)?,
        }
    }
    Ok(())
}
