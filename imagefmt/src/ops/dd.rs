//! `dd`: copy a window of an image's guest content into a new image, with qemu-img 10's
//! operands (`bs=`, `count=`, `skip=`, `if=`, `of=`), sizes and messages (`qemu-img.c`
//! `img_dd`).
//!
//! ```text
//! operands ─► DdOperands ─► plan(input size) ─► DdPlan { window of the input, output size }
//!   source chain ─► Window (the input range, shifted to 0, padded to 512 bytes)
//!     └─► ops::convert (extents: holes and zero runs stay holes) ─► qcow2 / raw / VDI
//! ```
//!
//! Sizes as qemu-img computes them: the input is cut to `count × bs` bytes (when that is
//! shorter), the copy starts at `skip × bs`, and the output is as long as what is left (so
//! `skip` also shortens a `count`-cut copy, as in qemu-img), rounded up to whole 512-byte
//! sectors as every qemu image driver creates it. A `skip` past the end gives an empty output
//! and a warning, not an error.

use std::path::{Path, PathBuf};

use thiserror::Error;

use crate::backing::BackingPolicy;
use crate::extent::{Extent, ExtentKind, GuestRead};
use crate::offsets::GuestOffset;
use crate::ops::convert::{convert, ConvertOptions, ConvertStats};
use crate::Result;

/// qemu-img's default block size.
pub const DEFAULT_BLOCK_SIZE: u64 = 512;
/// Largest block size qemu-img accepts (`INT_MAX`).
pub const MAX_BLOCK_SIZE: u64 = i32::MAX as u64;
/// Output sizes are whole sectors.
const SECTOR: u64 = 512;

/// An operand qemu-img refuses, worded as qemu-img words it (without the `qemu-img: `
/// prefix).
#[non_exhaustive]
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum DdError {
    /// An operand that is not `bs=`, `count=`, `skip=`, `if=` or `of=`.
    #[error("unrecognized operand {0}")]
    UnrecognizedOperand(String),
    /// A value that is not a number of the operand's syntax.
    #[error("Invalid {name} specified: '{value}'.")]
    InvalidValue {
        /// `bs`, `count` or `skip`.
        name: &'static str,
        /// The value given.
        value: String,
    },
    /// A number outside the operand's range.
    #[error("Invalid {name} specified. Must be between {min} and {max}.")]
    OutOfRange {
        /// `bs`, `count` or `skip`.
        name: &'static str,
        /// Smallest accepted value.
        min: u64,
        /// Largest accepted value.
        max: u64,
    },
    /// `if=` or `of=` is missing.
    #[error("Must specify both input and output files")]
    MissingFile,
}

/// The operands of a `dd` command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DdOperands {
    /// `if=`: the input image.
    pub input: PathBuf,
    /// `of=`: the output image to create.
    pub output: PathBuf,
    /// `bs`, `count`, `skip`.
    pub options: DdOptions,
}

/// Block size and window of a copy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DdOptions {
    /// `bs=`: bytes per block (1..=[`MAX_BLOCK_SIZE`], default 512).
    pub block_size: u64,
    /// `count=`: blocks to copy (default: to the end of the input).
    pub count: Option<u64>,
    /// `skip=`: blocks of the input to skip (default 0).
    pub skip: Option<u64>,
}

impl Default for DdOptions {
    fn default() -> Self {
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            count: None,
            skip: None,
        }
    }
}

impl DdOperands {
    /// Parses `KEY=VALUE` operands in order, as qemu-img does: the first bad one is reported,
    /// later ones win over earlier ones, and `if=` and `of=` must both be given.
    pub fn parse<S: AsRef<str>>(operands: &[S]) -> Result<Self, DdError> {
        let mut options = DdOptions::default();
        let (mut input, mut output) = (None, None);
        for operand in operands {
            let operand = operand.as_ref();
            let Some((key, value)) = operand.split_once('=') else {
                return Err(DdError::UnrecognizedOperand(operand.to_owned()));
            };
            match key {
                "bs" => options.block_size = parse_block_size(value)?,
                "count" => options.count = Some(parse_blocks("count", value)?),
                "skip" => options.skip = Some(parse_blocks("skip", value)?),
                "if" => input = Some(PathBuf::from(value)),
                "of" => output = Some(PathBuf::from(value)),
                _ => return Err(DdError::UnrecognizedOperand(key.to_owned())),
            }
        }
        match (input, output) {
            (Some(input), Some(output)) => Ok(Self {
                input,
                output,
                options,
            }),
            _ => Err(DdError::MissingFile),
        }
    }
}

/// `bs=`: a size with qemu-img's suffixes (`4k`, `1M`, `1.5k`, `0x1000`), 1..=INT_MAX.
fn parse_block_size(value: &str) -> Result<u64, DdError> {
    let out_of_range = DdError::OutOfRange {
        name: "bs",
        min: 1,
        max: MAX_BLOCK_SIZE,
    };
    let text = value.trim_start();
    if text.starts_with('-') {
        return Err(out_of_range);
    }
    let text = text.strip_prefix('+').unwrap_or(text);
    // qemu accepts a fraction without a suffix only if it is zero ("1.0").
    let whole_fraction = text
        .split_once('.')
        .filter(|(w, f)| !w.is_empty() && !f.is_empty() && f.bytes().all(|b| b == b'0'));
    let parsed = match whole_fraction {
        Some((whole, _)) => crate::size::parse_size(whole),
        None => crate::size::parse_size(text),
    };
    match parsed {
        Ok(n) if (1..=MAX_BLOCK_SIZE).contains(&n) => Ok(n),
        Ok(_) => Err(out_of_range),
        // Well-formed but too large for 64 bits.
        Err(_) if text.bytes().all(|b| b.is_ascii_digit()) && !text.is_empty() => Err(out_of_range),
        Err(_) => Err(DdError::InvalidValue {
            name: "bs",
            value: value.to_owned(),
        }),
    }
}

/// `count=` and `skip=`: an integer as C's `strtoll` with base 0 reads it (`0x` hex, a leading
/// `0` octal, no suffixes), 0..=INT64_MAX.
fn parse_blocks(name: &'static str, value: &str) -> Result<u64, DdError> {
    let out_of_range = DdError::OutOfRange {
        name,
        min: 0,
        max: i64::MAX as u64,
    };
    let invalid = || DdError::InvalidValue {
        name,
        value: value.to_owned(),
    };
    match crate::size::parse_c_integer(value) {
        None => Err(invalid()),
        Some(n) if (0..=i128::from(i64::MAX)).contains(&n) => Ok(n as u64),
        Some(_) => Err(out_of_range),
    }
}

/// What a copy reads and writes, from the input's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DdPlan {
    /// First input byte copied.
    pub start: u64,
    /// Bytes copied (from `start`).
    pub len: u64,
    /// Virtual size of the output: `len` rounded up to whole sectors.
    pub output_size: u64,
    /// `skip` lies past the end of the (cut) input: the output is empty and qemu-img warns
    /// "cannot skip to specified offset".
    pub skip_past_end: bool,
}

impl DdOptions {
    /// Plans the copy of an input of `input_size` bytes, with qemu-img's arithmetic.
    pub fn plan(&self, input_size: u64) -> DdPlan {
        let bs = self.block_size;
        let mut size = input_size;
        if let Some(count) = self.count {
            if let Some(bytes) = count.checked_mul(bs).filter(|&b| b <= i64::MAX as u64) {
                size = size.min(bytes);
            }
        }
        let skip_bytes = self
            .skip
            .unwrap_or(0)
            .checked_mul(bs)
            .filter(|&b| b <= i64::MAX as u64);
        match skip_bytes {
            Some(start) if start <= size => DdPlan {
                start,
                len: size - start,
                output_size: (size - start).div_ceil(SECTOR) * SECTOR,
                skip_past_end: false,
            },
            _ => DdPlan {
                start: size,
                len: 0,
                output_size: 0,
                skip_past_end: true,
            },
        }
    }
}

/// Copies the window `plan` of `source` into a new image at `dest` in `options.format`
/// (through [`convert`]: the output is created under a temporary name and linked into place
/// when complete; zero and unallocated ranges are not read and stay holes).
pub fn dd(
    source: &dyn GuestRead,
    plan: &DdPlan,
    dest: &Path,
    options: &ConvertOptions,
    policy: &BackingPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let window = Window {
        inner: source,
        start: plan.start,
        len: plan.len,
        size: plan.output_size,
    };
    convert(&window, dest, options, policy, progress)
}

/// The guest range `[start, start + len)` of `inner` seen as a disk of `size ≥ len` bytes
/// starting at 0 (the tail past `len` reads as zeros). It answers block status for the whole
/// chain below it, so it has no layer below of its own; data is read through `inner`.
struct Window<'a> {
    inner: &'a dyn GuestRead,
    start: u64,
    len: u64,
    size: u64,
}

impl GuestRead for Window<'_> {
    fn virtual_size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: GuestOffset) -> Result<()> {
        crate::extent::check_range(offset.0, buf.len(), self.size)?;
        let inside = self.len.saturating_sub(offset.0).min(buf.len() as u64) as usize;
        if inside > 0 {
            self.inner
                .read_at(&mut buf[..inside], GuestOffset(self.start + offset.0))?;
        }
        buf[inside..].fill(0);
        Ok(())
    }

    fn block_status(&self, start: GuestOffset, max_len: u64) -> Result<Extent> {
        let max_len = max_len.min(self.size - start.0);
        if start.0 >= self.len {
            return Ok(Extent {
                start,
                len: max_len,
                depth: 0,
                kind: ExtentKind::Zero,
                host: None,
            });
        }
        let status = crate::chain::block_status(
            self.inner,
            GuestOffset(self.start + start.0),
            max_len.min(self.len - start.0),
        )?;
        Ok(Extent {
            start,
            len: status.len,
            depth: 0,
            // Unallocated at the bottom of the chain reads as zeros.
            kind: match status.kind {
                ExtentKind::Unallocated => ExtentKind::Zero,
                kind => kind,
            },
            // Reads go through `inner`, which knows the layers and their files.
            host: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(operands: &[&str]) -> Result<DdOperands, DdError> {
        DdOperands::parse(operands)
    }

    #[test]
    fn operands_parse_and_refuse_as_qemu_img_10() {
        let ok = parse(&["if=a", "of=b", "bs=4k", "count=0x10", "skip=010"]).unwrap();
        assert_eq!(ok.options.block_size, 4096);
        assert_eq!(ok.options.count, Some(16));
        assert_eq!(ok.options.skip, Some(8));
        assert_eq!(
            parse(&["if=a", "of=b", "bs=1.5k"])
                .unwrap()
                .options
                .block_size,
            1536
        );
        assert_eq!(
            parse(&["if=a", "of=b", "bs=1.0"])
                .unwrap()
                .options
                .block_size,
            1
        );
        assert_eq!(
            parse(&["if=a", "of=b", "bs=+4k"])
                .unwrap()
                .options
                .block_size,
            4096
        );
        let message = |ops: &[&str]| parse(ops).unwrap_err().to_string();
        assert_eq!(
            message(&["if=a", "of=b", "count=1k"]),
            "Invalid count specified: '1k'."
        );
        assert_eq!(
            message(&["if=a", "of=b", "count=08"]),
            "Invalid count specified: '08'."
        );
        assert_eq!(
            message(&["if=a", "of=b", "count=-1"]),
            "Invalid count specified. Must be between 0 and 9223372036854775807."
        );
        assert_eq!(
            message(&["if=a", "of=b", "skip=9223372036854775808"]),
            "Invalid skip specified. Must be between 0 and 9223372036854775807."
        );
        for bs in ["0", "-1", "2G", "1e", "3G"] {
            assert_eq!(
                message(&["if=a", "of=b", &format!("bs={bs}")]),
                "Invalid bs specified. Must be between 1 and 2147483647.",
                "bs={bs}"
            );
        }
        for bs in ["", "1.5", "4kB", "0x1k", "1e0"] {
            assert_eq!(
                message(&["if=a", "of=b", &format!("bs={bs}")]),
                format!("Invalid bs specified: '{bs}'."),
                "bs={bs}"
            );
        }
        assert_eq!(
            message(&["if=a", "of=b", "foo=1"]),
            "unrecognized operand foo"
        );
        assert_eq!(message(&["if=a", "junk"]), "unrecognized operand junk");
        assert_eq!(
            message(&["if=a"]),
            "Must specify both input and output files"
        );
    }

    #[test]
    fn plans_follow_qemu_img_arithmetic() {
        let mib = 1 << 20;
        let plan = |bs, count, skip| {
            DdOptions {
                block_size: bs,
                count,
                skip,
            }
            .plan(mib)
        };
        // count cuts the input, then skip is taken off what count left (qemu-img's sizes).
        assert_eq!(plan(4096, Some(3), Some(2)).len, 4096);
        assert_eq!(plan(4096, None, Some(2)).len, mib - 8192);
        assert_eq!(plan(4096, Some(300), None).len, mib);
        let past = plan(4096, None, Some(300));
        assert!(past.skip_past_end && past.output_size == 0);
        let exact = plan(4096, None, Some(256));
        assert!(!exact.skip_past_end && exact.output_size == 0);
        let odd = plan(1000, Some(3), Some(1));
        assert_eq!((odd.start, odd.len, odd.output_size), (1000, 2000, 2048));
        assert!(plan(1 << 20, None, Some(i64::MAX as u64)).skip_past_end);
    }
}
