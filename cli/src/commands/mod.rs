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

/// Parses a size with qemu-img's suffixes (k/K, M, G, T, ...).
pub fn parse_size(text: &str) -> Result<u64> {
    Ok(imagefmt::size::parse_size(text)?)
}

/// A size option as qemu-img's `cvtnum` reads it (suffixes k, M, G, T, P, E; 0 up to
/// `i64::MAX`), refused in its words: "Invalid WHAT specified: 'TEXT'." for what is not a
/// size, "Invalid WHAT specified. Must be between 0 and MAX." for what is out of range.
pub fn qemu_size(what: &str, text: &str) -> Result<u64> {
    qemu_size_between(what, text, 0, i128::from(i64::MAX))
}

/// [`qemu_size`] within `min..=max` (qemu-img bench's buffer and step sizes have their own
/// bounds); a negative number is out of range, as in qemu-img.
pub fn qemu_size_between(what: &str, text: &str, min: i128, max: i128) -> Result<u64> {
    let out_of_range =
        || anyhow::anyhow!("Invalid {what} specified. Must be between {min} and {max}.");
    let value = if text.trim_start().starts_with('-') {
        -1
    } else {
        imagefmt::size::parse_size(text)
            .map(i128::from)
            .map_err(|_| anyhow::anyhow!("Invalid {what} specified: '{text}'."))?
    };
    if (min..=max).contains(&value) {
        Ok(value as u64)
    } else {
        Err(out_of_range())
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
