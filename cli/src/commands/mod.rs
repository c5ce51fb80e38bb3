//! Every command as a library function: typed arguments in, output written to an
//! `impl Write`, an error or qemu-img's exit code out. The binary only parses and dispatches.

pub mod amend;
pub mod bench;
pub mod bitmap;
pub mod check_map;
pub mod compare;
pub mod convert;
pub mod create;
pub mod dd;
pub mod host;
pub mod info;
pub mod measure;
pub mod ops;
pub mod registry;
pub mod shell;
pub mod snapshot;
pub mod vdi_create;
pub mod vm;

use anyhow::Result;
use imagefmt::backing::BackingPolicy;

/// How commands open chains: `policy`, data files if allowed, and VDI parents from `--parent`
/// (nearest first) when given, else from each image's own directory.
pub fn chain_options<'a>(
    policy: &'a BackingPolicy,
    allow_data_files: bool,
    parents: &'a imagefmt::vdi::Explicit,
) -> imagefmt::chain::ChainOptions<'a> {
    imagefmt::chain::ChainOptions {
        allow_data_files,
        vdi_parents: (!parents.0.is_empty()).then_some(parents as _),
        ..imagefmt::chain::ChainOptions::new(policy)
    }
}

/// Parses a size with qemu-img's suffixes (k/K, M, G, T, ...).
pub fn parse_size(text: &str) -> Result<u64> {
    Ok(imagefmt::size::parse_size(text)?)
}

/// A size option as qemu-img's `cvtnum` reads it (suffixes k, M, G, T, P, E; 0 up to
/// `i64::MAX`), refused in its words: "Invalid WHAT specified: 'TEXT'." for what is not a
/// size, "Invalid WHAT specified. Must be between 0 and MAX." for what is out of range.
pub fn qemu_size(what: &str, text: &str) -> Result<u64> {
    let out_of_range = || {
        anyhow::anyhow!(
            "Invalid {what} specified. Must be between 0 and {}.",
            i64::MAX
        )
    };
    if text.trim_start().starts_with('-') {
        return Err(out_of_range());
    }
    match imagefmt::size::parse_size(text) {
        Ok(size) if i64::try_from(size).is_ok() => Ok(size),
        Ok(_) => Err(out_of_range()),
        Err(_) => anyhow::bail!("Invalid {what} specified: '{text}'."),
    }
}

/// qemu's spelling of a boolean option value.
pub fn on_off(value: bool) -> &'static str {
    if value {
        "on"
    } else {
        "off"
    }
}
