//! `cowclone compare`: whether two images hold the same guest content (qemu-img compare).

use std::io::Write;

use anyhow::{Context, Result};
use imagefmt::ImageFormat;

use crate::args::CompareArgs;

/// Compares the two images; returns qemu-img's exit code (0 identical, 1 different).
pub fn compare(args: CompareArgs, out: &mut impl Write) -> Result<u8> {
    use imagefmt::ops::compare::Comparison;
    let policy = args.chain.policy();
    let parents = args.chain.vdi_parents();
    let options = args.chain.options(&policy, &parents);
    let open = |path: &std::path::Path, format: &Option<String>, index: usize| -> Result<_> {
        let format = format
            .as_deref()
            .map(str::parse::<ImageFormat>)
            .transpose()?;
        let options = imagefmt::chain::ChainOptions {
            data_file: args.chain.data_files.data_file_of(index),
            ..options
        };
        imagefmt::chain::open_chain_with(path, format, &options)
            .with_context(|| format!("{}", path.display()))
    };
    let first = open(&args.file1, &args.format1, 0)?;
    let second = open(&args.file2, &args.format2, 1)?;
    let outcome = imagefmt::ops::compare::compare(first.as_ref(), second.as_ref(), args.strict)?;
    // qemu-img warns about different sizes once the common part compared equal.
    let common = first.virtual_size().min(second.virtual_size());
    let sizes_differ = first.virtual_size() != second.virtual_size();
    let common_equal = match outcome {
        Comparison::Identical => true,
        Comparison::ContentMismatch { offset } => offset >= common,
        Comparison::SizeMismatch { .. } => false,
    };
    if sizes_differ && common_equal && !args.quiet {
        writeln!(out, "Warning: Image size mismatch!")?;
    }
    let (code, message) = match outcome {
        Comparison::Identical => (0, "Images are identical.".to_owned()),
        Comparison::ContentMismatch { offset } => {
            (1, format!("Content mismatch at offset {offset}!"))
        }
        Comparison::SizeMismatch { .. } => (1, "Strict mode: Image size mismatch!".to_owned()),
    };
    if !args.quiet {
        writeln!(out, "{message}")?;
    }
    Ok(code)
}
