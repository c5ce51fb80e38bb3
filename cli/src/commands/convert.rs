//! `convert`'s options beyond copying the guest data, as qemu-img 10 has them: `--bitmaps`
//! (with `--skip-broken-bitmaps`), `--salvage`, `--target-is-zero` and `-r RATE`. The copy
//! itself is [`crate::commands::ops::convert`]; this module checks these options in qemu-img's
//! order and words, and runs what they add (the bitmap copy after the data, salvaging reads,
//! the rate limit).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use imagefmt::ops::convert_bitmaps::{target_supports_bitmaps, BitmapCopy, SkippedBitmap};
use imagefmt::ops::convert_salvage::{Salvage, SalvageWarning};
use imagefmt::ImageFormat;

/// The options of `cowclone convert` beyond the data copy.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ConvertExtraArgs {
    /// Also copy the source's persistent dirty bitmaps (qcow2 v3 source and output): each
    /// with its name, granularity, enabled or disabled state and dirty bits, after the data.
    #[arg(long)]
    pub bitmaps: bool,
    /// With --bitmaps: skip bitmaps that are in use (inconsistent) with a warning, instead of
    /// refusing to convert.
    #[arg(long)]
    pub skip_broken_bitmaps: bool,
    /// Copy what cannot be read from the source (an I/O error, a corrupt L2 entry, a
    /// compressed cluster that does not decompress) as zeros, with a warning per 512-byte
    /// sector, instead of failing. Reads with one thread, so the warnings come in disk order.
    #[arg(long)]
    pub salvage: bool,
    /// With -n: the existing output already reads as zeros, so zero ranges are not written.
    #[arg(long)]
    pub target_is_zero: bool,
    /// Copy at most RATE bytes per second on average (suffixes k, M, G, T; 0: no limit). The
    /// bytes counted are those the progress counts.
    #[arg(
        short = 'r',
        long = "rate",
        visible_alias = "rate-limit",
        value_name = "RATE",
        allow_hyphen_values = true
    )]
    pub rate: Option<String>,
}

/// The extra options, checked.
pub struct Extras {
    args: ConvertExtraArgs,
    /// Bytes per second (`-r`), if limited.
    rate: Option<u64>,
}

impl ConvertExtraArgs {
    /// The refusals qemu-img makes right after reading its options, in its order: `-r` that
    /// is not a rate, `--skip-broken-bitmaps` without `--bitmaps`, and (after `-o` with `-n`,
    /// which the caller checks first) `--target-is-zero` without `-n`.
    pub fn check(self, skip_create: bool, options_given: bool) -> Result<Extras> {
        let rate = self.rate.as_deref().map(parse_rate).transpose()?;
        if self.skip_broken_bitmaps && !self.bitmaps {
            bail!("Use of --skip-broken-bitmaps requires --bitmaps");
        }
        if skip_create && options_given {
            bail!("-o has no effect when skipping image creation");
        }
        if self.target_is_zero && !skip_create {
            bail!("--target-is-zero requires use of -n flag");
        }
        Ok(Extras {
            args: self,
            rate: rate.filter(|&r| r > 0),
        })
    }
}

/// `-r RATE` as qemu-img reads it: a size with suffixes, 0 up to `i64::MAX`.
pub fn parse_rate(text: &str) -> Result<u64> {
    crate::commands::qemu_size("rate limit", text)
}

impl Extras {
    /// True with `--salvage`.
    pub fn salvage(&self) -> bool {
        self.args.salvage
    }

    /// True with `--target-is-zero`.
    pub fn target_is_zero(&self) -> bool {
        self.args.target_is_zero
    }

    /// qemu-img's refusal of `--target-is-zero` with a backing file for the output (`-B`).
    pub fn check_backing(&self, has_backing: bool) -> Result<()> {
        if self.args.target_is_zero && has_backing {
            bail!("Cannot use --target-is-zero when the destination image has a backing file");
        }
        Ok(())
    }

    /// With `--bitmaps`: checks that the bitmaps of the (single) source can be copied, before
    /// anything is created; `None` without `--bitmaps`.
    pub fn prepare_bitmaps(
        &self,
        sources: &[PathBuf],
        format: Option<ImageFormat>,
        how: imagefmt::open::OpenHow,
    ) -> Result<Option<BitmapCopy>> {
        if !self.args.bitmaps {
            return Ok(None);
        }
        let [source] = sources else {
            return Err(imagefmt::ops::convert_bitmaps::ConvertBitmapsError::SeveralSources.into());
        };
        Ok(Some(BitmapCopy::prepare(
            source,
            format,
            how,
            self.args.skip_broken_bitmaps,
        )?))
    }

    /// The copy's progress callback wrapped with the rate limit (`-r`): after each step it
    /// sleeps until the bytes done so far have taken at least their share of time.
    pub fn throttled<'a>(
        &self,
        mut progress: impl FnMut(u64, u64) + 'a,
    ) -> impl FnMut(u64, u64) + 'a {
        let mut throttle = self.rate.map(Throttle::new);
        move |done, total| {
            if let Some(throttle) = &mut throttle {
                throttle.pace(done);
            }
            progress(done, total);
        }
    }
}

/// Refuses, before anything is created, an output that cannot hold the bitmaps: `format`,
/// and for qcow2 its version (a new image's, from `-o compat`, or the existing one's with -n).
pub fn check_bitmap_target(
    copy: Option<&BitmapCopy>,
    format: ImageFormat,
    version: Option<imagefmt::qcow2::Version>,
) -> Result<()> {
    if copy.is_some() {
        target_supports_bitmaps(format, version)?;
    }
    Ok(())
}

/// Copies the bitmaps into the finished output `dest` (qemu-img's warning for each bitmap
/// skipped as broken).
pub fn copy_bitmaps(
    copy: Option<&BitmapCopy>,
    source: &Path,
    how: imagefmt::open::OpenHow,
    dest: &Path,
) -> Result<()> {
    let Some(copy) = copy else {
        return Ok(());
    };
    let prefix = crate::qemu_img::message_prefix();
    copy.copy_into(source, how, dest, &mut |skipped: &SkippedBitmap| {
        eprintln!("{prefix}: warning: {skipped}");
    })?;
    Ok(())
}

/// Runs `copy` over `source`, salvaging its read errors if asked (`--salvage`: qemu-img's
/// first walk over the source first, then warnings on standard error as qemu-img prints
/// them), else over `source` as it is. `whole_units`: the cluster size of compressed output,
/// which takes whole clusters (a failed status then stands for the rest of its cluster).
pub fn with_source<T>(
    extras: &Extras,
    source: &dyn imagefmt::extent::GuestRead,
    whole_units: Option<u64>,
    copy: impl FnOnce(&dyn imagefmt::extent::GuestRead) -> Result<T>,
) -> Result<T> {
    if !extras.args.salvage {
        return copy(source);
    }
    let prefix = crate::qemu_img::message_prefix();
    let warn = move |warning: &SalvageWarning| match crate::qemu_img::driver_line(warning) {
        // Under the personality, what qemu's qcow2 driver prints itself.
        Some(line) => eprintln!("{line}"),
        None => eprintln!("{prefix}: warning: {warning}"),
    };
    let mut salvage = Salvage::new(source, &warn);
    if let Some(unit) = whole_units {
        salvage = salvage.whole_units(unit);
    }
    salvage.count_pass()?;
    copy(&salvage)
}

/// Paces a copy to a rate: after `done` bytes, at least `done / rate` seconds have passed.
struct Throttle {
    rate: u64,
    started: Instant,
}

impl Throttle {
    fn new(rate: u64) -> Self {
        Self {
            rate,
            started: Instant::now(),
        }
    }

    /// How long to wait after `done` bytes, `elapsed` after the start (nothing if they are
    /// not ahead of the rate).
    fn wait(&self, done: u64, elapsed: Duration) -> Option<Duration> {
        Duration::from_secs_f64(done as f64 / self.rate as f64)
            .checked_sub(elapsed)
            .filter(|wait| !wait.is_zero())
    }

    fn pace(&mut self, done: u64) {
        if let Some(wait) = self.wait(done, self.started.elapsed()) {
            std::thread::sleep(wait);
        }
    }
}

/// The guest offset of the first byte of `source` that does not read as zeros (its size if
/// none): where a convert writes first.
pub fn first_data_offset(source: &dyn imagefmt::extent::GuestRead) -> imagefmt::Result<u64> {
    for extent in imagefmt::chain::extents(source, imagefmt::offsets::GuestOffset(0)) {
        let extent = extent?;
        if !extent.reads_as_zeros() {
            return Ok(extent.start.0);
        }
    }
    Ok(source.virtual_size())
}

/// A new qcow2 target of `convert -o data_file=NAME[,data_file_raw=on]`: created as `create`
/// makes such an image (the data file too, as long as the disk), then written as `convert -n`
/// writes an existing image, its data clusters going into the data file at their guest
/// offsets. On failure both files are removed again.
pub struct NewDataFileImage<'a> {
    /// The image to create.
    pub path: &'a std::path::Path,
    /// Its creation options (`-o`).
    pub options: imagefmt::qcow2::CreateOptions,
    /// `preallocation=`.
    pub preallocation: imagefmt::preallocate::Preallocation,
    /// The data file's name, stored verbatim in the header.
    pub data_file: String,
    /// `data_file_raw=on`.
    pub raw: bool,
    /// A relative name is created and opened in the working directory (qemu 10's way).
    pub from_cwd: bool,
    /// `-B`: the backing file's name and format.
    pub backing: Option<(String, Option<imagefmt::ImageFormat>)>,
    /// Replace existing files.
    pub overwrite: bool,
}

impl NewDataFileImage<'_> {
    /// Creates the image and writes `source` into it (`sparse_size`: `-S`), its backing chain
    /// opened under `policy`.
    pub fn convert(
        &self,
        source: &dyn imagefmt::extent::GuestRead,
        policy: &imagefmt::backing::BackingPolicy,
        sparse_size: u64,
        progress: &mut dyn FnMut(u64, u64),
    ) -> imagefmt::Result<imagefmt::ops::convert::ConvertStats> {
        let base = match self.from_cwd {
            true => imagefmt::chain::DataFileBase::WorkingDirectory,
            false => imagefmt::chain::DataFileBase::ImageDirectory,
        };
        let mut builder = imagefmt::Qcow2Builder::new(self.path)
            .size(source.virtual_size())
            .options(self.options.clone())
            .preallocation(self.preallocation)
            .overwrite(self.overwrite)
            .data_file(self.data_file.clone(), self.raw)
            .data_file_base(base);
        if let Some((name, format)) = &self.backing {
            builder = builder.backing(name.clone());
            if let Some(format) = format {
                builder = builder.backing_format(*format);
            }
        }
        builder.create()?;
        let data_path = base.resolve(self.path, &self.data_file)?;
        let chain = imagefmt::chain::ChainOptions {
            data_file: Some(&data_path),
            ..imagefmt::chain::ChainOptions::new(policy)
        };
        // The new image reads as zeros where it has no backing file: zeros need no writes.
        let target_is_zero = self.backing.is_none();
        let written = imagefmt::ops::convert_into::convert_into(
            source,
            self.path,
            imagefmt::ImageFormat::Qcow2,
            &chain,
            sparse_size,
            target_is_zero,
            progress,
        );
        if written.is_err() {
            let _ = std::fs::remove_file(self.path);
            let _ = std::fs::remove_file(&data_path);
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_read_as_qemu_img_reads_them() {
        assert_eq!(parse_rate("1.5k").unwrap(), 1536);
        assert_eq!(parse_rate("0").unwrap(), 0);
        assert_eq!(
            parse_rate("foo").unwrap_err().to_string(),
            "Invalid rate limit specified: 'foo'."
        );
        assert_eq!(
            parse_rate("-5").unwrap_err().to_string(),
            "Invalid rate limit specified. Must be between 0 and 9223372036854775807."
        );
    }

    #[test]
    fn a_throttle_waits_for_the_bytes_share_of_time() {
        let throttle = Throttle::new(1 << 20);
        let ms = Duration::from_millis;
        // 2 MiB at 1 MiB/s are due after 2 s: 0.5 s in, 1.5 s are left to wait.
        assert_eq!(throttle.wait(2 << 20, ms(500)), Some(ms(1500)));
        // Behind the rate (or exactly on it): no wait.
        assert_eq!(throttle.wait(1 << 20, ms(2000)), None);
        assert_eq!(throttle.wait(1 << 20, ms(1000)), None);
        assert_eq!(throttle.wait(0, ms(0)), None);
    }
}
