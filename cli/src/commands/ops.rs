//! Whole-image commands: convert, commit, rebase, resize (qemu-img syntax).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use imagefmt::backing::BackingPolicy;
use imagefmt::preallocate::Preallocation;
use imagefmt::qcow2::CreateOptions;
use imagefmt::ImageFormat;

use crate::commands::convert;

/// `cowclone convert [-f FMT] -O qcow2|vdi|raw [-c] [-n [--target-is-zero]] [-S SIZE]
/// [-t CACHE] [-T CACHE] [-B BACKING [-F FMT]] [-o ...] [--snapshot ID|NAME]
/// [--bitmaps [--skip-broken-bitmaps]] [--salvage] [-r RATE] [-p] [-q] SRC... DST`
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
    /// data that differs from it is written. With -n it changes nothing (the existing target
    /// keeps its own backing file), as in qemu-img.
    #[arg(short = 'B', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Backing file format (default: recognised by content).
    #[arg(short = 'F', value_name = "FMT", requires = "backing")]
    pub backing_format: Option<String>,
    /// Creation options, as for create (qcow2 options and preallocation=off|metadata|falloc|full;
    /// raw: preallocation=off|falloc|full; for -O vdi: static=on|off).
    #[arg(short = 'o', value_name = "key=value,...")]
    pub options: Vec<String>,
    /// Show progress (a bar on a terminal, qemu-img's "(x.xx/100%)" lines otherwise).
    #[arg(short = 'p')]
    pub progress: bool,
    /// Print nothing (no progress either).
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Skip creating DST: write into the existing image DST (of format -O), which must be at
    /// least as large as the source; every range is written, zeros as zeros.
    #[arg(short = 'n')]
    pub skip_create: bool,
    /// Sparse size: zero runs of at least SIZE bytes stay holes (a multiple of 512 up to 16M;
    /// default 4k); 0 writes everything, fully allocating the output.
    #[arg(short = 'S', value_name = "SIZE")]
    pub sparse_size: Option<String>,
    /// Output cache mode (none, writeback, writethrough, directsync, unsafe): unsafe (the
    /// default) leaves the output in the page cache; every other mode fsyncs it before exit.
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    /// Source cache mode (accepted for qemu-img compatibility; reads always go through the page
    /// cache).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    pub source_cache: Option<String>,
    /// Parallel read requests (1..16, as qemu-img's -m).
    #[arg(short = 'm', value_name = "N", default_value_t = imagefmt::ops::convert::DEFAULT_PARALLEL)]
    pub parallel: usize,
    /// Allow out-of-order writes to the destination (as qemu-img's -W).
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Replace DST if it exists.
    #[arg(long)]
    pub overwrite: bool,
    /// Read the (first) source as of its internal snapshot with this id, else this name
    /// (qcow2; qemu-img's `-l`). Also `id=ID`, `name=NAME` or `id=ID,name=NAME`: the snapshot
    /// matching all given.
    #[arg(long, value_name = "ID|NAME")]
    pub snapshot: Option<String>,
    /// Which images below the source may be opened (backing files, VDI parents, data files).
    #[command(flatten)]
    pub chain: crate::args::ChainPolicyArgs,
    /// Source image(s), then the output image. Several sources are concatenated: the output is
    /// as large as they are together, each source following the one before it.
    #[arg(value_name = "SRC... DST", num_args = 2.., required = true)]
    pub images: Vec<PathBuf>,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
    /// --bitmaps, --skip-broken-bitmaps, --salvage, --target-is-zero, -r.
    #[command(flatten)]
    pub extras: crate::commands::convert::ConvertExtraArgs,
}

/// Why a snapshot could not be loaded, in qemu-img's words, if that is what `e` is about.
pub(crate) fn snapshot_failure(e: &imagefmt::Error) -> Option<&'static str> {
    use imagefmt::qcow2::snapshot::{L1Problem, SnapshotError};
    use imagefmt::qcow2::Qcow2Error;
    match e {
        imagefmt::Error::InFile { source, .. } => snapshot_failure(source),
        imagefmt::Error::Qcow2(Qcow2Error::Snapshot(SnapshotError::NotFound { .. })) => {
            Some("Can't find snapshot")
        }
        imagefmt::Error::Qcow2(Qcow2Error::Snapshot(SnapshotError::InvalidL1 {
            problem, ..
        })) => Some(match problem {
            L1Problem::TooLarge => "Snapshot L1 table too large",
            L1Problem::Unaligned | L1Problem::PastEndOfFile => "Snapshot L1 table offset invalid",
        }),
        _ => None,
    }
}

/// `--snapshot` as a key: `id=ID`, `name=NAME` or both (comma-separated) match exactly; any
/// other text is an id or, failing that, a name.
pub fn snapshot_key(text: &str) -> Result<imagefmt::qcow2::snapshot_view::SnapshotKey> {
    use imagefmt::qcow2::snapshot_view::SnapshotKey;
    let parts: Vec<Option<(&str, &str)>> =
        text.split(',').map(|part| part.split_once('=')).collect();
    let keyed = parts
        .iter()
        .flatten()
        .filter(|(k, _)| matches!(*k, "id" | "name"))
        .count();
    if keyed == 0 || keyed != parts.len() {
        return Ok(SnapshotKey::IdOrName(text.to_owned()));
    }
    let (mut id, mut name) = (None, None);
    for (key, value) in parts.into_iter().flatten() {
        match key {
            "id" => id = Some(value.to_owned()),
            _ => name = Some(value.to_owned()),
        }
    }
    Ok(SnapshotKey::Exact { id, name })
}

/// `cowclone commit [-f FMT] [-t CACHE] [-b BASE] [-d] [-p] [-q] FILE`
#[derive(Debug, clap::Args)]
pub struct CommitArgs {
    /// Keep the overlay's contents (default: empty it after committing).
    #[arg(short = 'd')]
    pub keep: bool,
    /// Format of FILE (only qcow2 overlays can be committed).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Commit into BASE, an image further down the backing chain (as the chain names it, or a
    /// path to it, relative to the directory of the image above it): the images in between are
    /// committed too, and -d is implied.
    #[arg(short = 'b', value_name = "BASE")]
    pub base: Option<String>,
    /// Cache mode (accepted as in qemu-img; the base is always fsynced at the end).
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Print nothing.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Which backing files may be opened (only --confine changes what this command opens).
    #[command(flatten)]
    pub chain: crate::args::ChainPolicyArgs,
    /// The overlay to commit into its backing file.
    pub file: PathBuf,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// `cowclone rebase [-f FMT] [-t CACHE] [-T CACHE] [-p] [-q] [-u] [-c] -b NEW [-F FMT] FILE`
#[derive(Debug, clap::Args)]
pub struct RebaseArgs {
    /// Format of FILE (only qcow2 images can be rebased).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Cache mode of FILE (accepted as in qemu-img; the image is always fsynced at the end).
    #[arg(short = 't', value_name = "CACHE")]
    pub cache: Option<String>,
    /// Cache mode of the backing files (accepted; reads go through the page cache).
    #[arg(short = 'T', value_name = "SRC_CACHE")]
    pub source_cache: Option<String>,
    /// Show progress.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Print nothing.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// Unsafe: rewrite the header only, copying no data.
    #[arg(short = 'u')]
    pub unsafe_header_only: bool,
    /// Compress the clusters the rebase writes (qcow2; whole clusters).
    #[arg(short = 'c', long = "compress")]
    pub compress: bool,
    /// New backing file ("" removes it).
    #[arg(short = 'b', value_name = "BACKING")]
    pub backing: String,
    /// New backing format (default: recognised by content).
    #[arg(short = 'F', value_name = "FMT")]
    pub backing_format: Option<String>,
    /// Which backing files may be opened (only --confine changes what this command opens).
    #[command(flatten)]
    pub chain: crate::args::ChainPolicyArgs,
    /// The image to rebase (qcow2).
    pub file: PathBuf,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// `cowclone resize [-f FMT] [-q] [--preallocation MODE] [--shrink] FILE [+|-]SIZE`
#[derive(Debug, clap::Args)]
pub struct ResizeArgs {
    /// Allow shrinking (refused anyway if data lies past the new end, unless
    /// `drop_data_past_end`).
    #[arg(long)]
    pub shrink: bool,
    /// With --shrink, drop the data past the new end as qemu-img does (instead of refusing).
    #[arg(long, requires = "shrink")]
    pub drop_data_past_end: bool,
    /// Format of FILE (default: recognised by content; raw must be named or unrecognisable).
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Preallocation of the added part: off, metadata (qcow2), falloc, full.
    #[arg(long, value_name = "MODE")]
    pub preallocation: Option<String>,
    /// Print nothing.
    #[arg(short = 'q')]
    pub quiet: bool,
    /// The image (qcow2 or raw).
    pub file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true)]
    pub size: String,
    #[command(flatten)]
    pub data_files: crate::args::DataFileArgs,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

fn format(name: &Option<String>) -> Result<Option<ImageFormat>> {
    Ok(name.as_deref().map(str::parse).transpose()?)
}

/// qemu's cache modes (`-t`, `-T`). Returns whether the mode asks for the written image to be
/// flushed to stable storage: every mode but `unsafe`. cowclone does not use O_DIRECT: `none`
/// and `directsync` write through the page cache and fsync at the end, as `writeback` and
/// `writethrough` do.
pub fn cache_flushes(mode: &str) -> Result<bool> {
    match mode {
        "unsafe" => Ok(false),
        "none" | "off" | "writeback" | "writethrough" | "directsync" => Ok(true),
        _ => bail!("Invalid cache option: {mode}"),
    }
}

/// `-S SIZE` as qemu-img reads it: a multiple of 512 bytes up to 16 MiB, or 0.
pub fn parse_sparse_size(text: &str) -> Result<u64> {
    const MAX: u64 = 16 << 20;
    let invalid = || {
        anyhow::anyhow!(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of 512 up to 16777216. Select 0 to disable sparse detection (fully allocates output)."
        )
    };
    let size = imagefmt::size::parse_size(text).map_err(|_| invalid())?;
    if size % 512 != 0 || size > MAX {
        return Err(invalid());
    }
    Ok(size)
}

/// Refuses a `-f` naming anything but qcow2 for commands that only write qcow2 images.
fn qcow2_only(format: &Option<String>, what: &str) -> Result<()> {
    match format.as_deref() {
        None | Some("qcow2") => Ok(()),
        Some(other) => bail!("{what} of {other} images is not supported (qcow2 only)"),
    }
}

/// Runs convert.
pub fn convert(args: ConvertArgs, out: &mut impl Write) -> Result<()> {
    let sparse_size = match &args.sparse_size {
        Some(text) => parse_sparse_size(text)?,
        None => imagefmt::ops::convert::SPARSE_BLOCK as u64,
    };
    let flush = args
        .cache
        .as_deref()
        .map(cache_flushes)
        .transpose()?
        .unwrap_or(false);
    if let Some(mode) = &args.source_cache {
        cache_flushes(mode)?;
    }
    let extras = args
        .extras
        .clone()
        .check(args.skip_create, !args.options.is_empty())?;
    if args.skip_create && args.compress {
        bail!("-c needs a new image (it cannot be used with -n)");
    }
    let Some((dest, sources)) = args.images.split_last() else {
        bail!("convert needs a source and an output image");
    };
    if sources.len() > 1 && args.backing.is_some() {
        bail!("Having a backing file for the target makes no sense when concatenating multiple input images");
    }
    if args.overwrite {
        args.guard
            .check("convert --overwrite", std::slice::from_ref(dest))?;
    }
    let policy = args.chain.policy();
    let source_format = format(&args.source_format)?;
    let parents = imagefmt::vdi::Explicit(args.chain.parents.clone());
    let snapshot = args.snapshot.as_deref().map(snapshot_key).transpose()?;
    let mut parts = Vec::with_capacity(sources.len());
    for (index, path) in sources.iter().enumerate() {
        let mut chain_options = args.chain.options(&policy, &parents);
        // The snapshot is that of the first source (as qemu-img's -l); each source has the
        // data file named for it.
        if index == 0 {
            chain_options.snapshot = snapshot.as_ref();
        }
        chain_options.data_file = args.chain.data_files.data_file_of(index);
        let opened = imagefmt::chain::open_chain_with(path, source_format, &chain_options)
            .map_err(|e| match snapshot_failure(&e) {
                Some(reason) => anyhow::anyhow!("Failed to load snapshot: {reason}"),
                None => anyhow::Error::from(e).context(format!("{}", path.display())),
            })?;
        parts.push(opened);
    }
    extras.check_backing(args.backing.is_some())?;
    let read_how = imagefmt::open::OpenHow::reading(args.chain.force_share);
    let bitmaps = extras.prepare_bitmaps(sources, source_format, read_how)?;
    let source: Box<dyn imagefmt::extent::GuestRead> = if parts.len() == 1 {
        parts.pop().expect("one source")
    } else {
        Box::new(imagefmt::ops::convert_concat::Concat::new(parts)?)
    };
    let output = args.output_format.parse::<ImageFormat>()?;
    let show = args.progress && !args.quiet;
    if args.skip_create {
        let version = imagefmt::ops::convert_bitmaps::existing_qcow2_version(dest);
        convert::check_bitmap_target(bitmaps.as_ref(), output, version)?;
        let mut progress = crate::progress::Progress::new(show, out);
        convert::with_source(&extras, source.as_ref(), None, |source| {
            let mut update = extras.throttled(|done, total| progress.update(done, total));
            // The target's own data file, if it has one (not the one named for the source).
            let target_chain = imagefmt::chain::ChainOptions {
                data_file: None,
                ..args.chain.data_files.options(&policy)
            };
            Ok(imagefmt::ops::convert_into::convert_into(
                source,
                dest,
                output,
                &target_chain,
                sparse_size,
                extras.target_is_zero(),
                &mut update,
            )?)
        })?;
        progress.finish();
        return convert::copy_bitmaps(bitmaps.as_ref(), &sources[0], read_how, dest);
    }
    let mut qcow2 = CreateOptions::default();
    let mut vdi_static = false;
    let mut preallocation = Preallocation::Off;
    let mut data_file: Option<String> = None;
    let mut data_file_raw = false;
    for item in args.options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("invalid option {item:?}: expected key=value"))?;
        match (output, key) {
            (ImageFormat::Qcow2, "data_file") => data_file = Some(value.to_owned()),
            (ImageFormat::Qcow2, "data_file_raw") => {
                data_file_raw = crate::commands::vdi_create::parse_on_off(key, value)?
            }
            (ImageFormat::Qcow2 | ImageFormat::Raw, "preallocation") => {
                preallocation = Preallocation::parse(value, output == ImageFormat::Qcow2)?
            }
            (ImageFormat::Qcow2, _) => qcow2.set(key, value)?,
            (ImageFormat::Vdi, "static") => {
                vdi_static = crate::commands::vdi_create::parse_on_off(key, value)?
            }
            (_, _) => bail!("Invalid parameter '{key}' for the {} format", output.name()),
        }
    }
    convert::check_bitmap_target(bitmaps.as_ref(), output, Some(qcow2.compat.version()))?;
    if data_file_raw && data_file.is_none() {
        bail!("data-file-raw requires data-file");
    }
    if let Some(name) = data_file {
        if args.compress {
            // qemu-img fails the first compressed write (nothing is created here).
            let at = convert::first_data_offset(source.as_ref())?;
            return Err(anyhow::Error::new(imagefmt::Error::from(
                imagefmt::qcow2::Qcow2Error::CompressedDataFile,
            ))
            .context(format!("error while writing at byte {at}")));
        }
        let target = convert::NewDataFileImage {
            path: dest,
            options: qcow2,
            preallocation,
            data_file: name,
            raw: data_file_raw,
            from_cwd: args.chain.data_files.data_file_from_cwd,
            backing: match &args.backing {
                Some(name) => Some((name.clone(), format(&args.backing_format)?)),
                None => None,
            },
            overwrite: args.overwrite,
        };
        let mut progress = crate::progress::Progress::new(show, out);
        convert::with_source(&extras, source.as_ref(), None, |source| {
            let mut update = extras.throttled(|done, total| progress.update(done, total));
            Ok(target.convert(source, &policy, sparse_size, &mut update)?)
        })?;
        progress.finish();
        return convert::copy_bitmaps(bitmaps.as_ref(), &sources[0], read_how, dest);
    }
    let options = imagefmt::ops::convert::ConvertOptions {
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
            durable: flush,
        },
        // Salvaging reads with one reader, so that its warnings come in disk order.
        parallel: if extras.salvage() { 1 } else { args.parallel },
        out_of_order: args.out_of_order,
        preallocation,
        sparse_size,
        map_source: !args.chain.force_share,
    };
    let mut progress = crate::progress::Progress::new(show, out);
    // Errors name the file at fault themselves (source image, destination or backing file).
    let whole_units =
        (args.compress && output == ImageFormat::Qcow2).then_some(options.qcow2.cluster_size);
    convert::with_source(&extras, source.as_ref(), whole_units, |source| {
        let mut update = extras.throttled(|done, total| progress.update(done, total));
        Ok(imagefmt::ops::convert::convert(
            source,
            dest,
            &options,
            &policy,
            &mut update,
        )?)
    })?;
    progress.finish();
    convert::copy_bitmaps(bitmaps.as_ref(), &sources[0], read_how, dest)
}

/// Runs commit.
pub fn commit(args: CommitArgs, out: &mut impl Write) -> Result<()> {
    qcow2_only(&args.format, "commit")?;
    if args.chain.no_backing {
        bail!("commit writes into the backing file: --no-backing cannot be used with it");
    }
    if let Some(mode) = &args.cache {
        cache_flushes(mode)?;
    }
    // -b implies -d, as in qemu-img.
    let keep = args.keep || args.base.is_some();
    args.guard.check_commit(&args.file, keep)?;
    // qemu-img's lines: the first once the image is open, then what its commit job reports
    // (bytes committed of the bytes to commit, as a float percentage), 100 once more at the
    // end, and the newline whatever the outcome.
    let mut progress = crate::progress::Progress::unstarted(args.progress && !args.quiet, out);
    let mut started = false;
    let policy = args.chain.policy();
    let parents = args.chain.vdi_parents();
    let committed = imagefmt::ops::commit::commit_into(
        &args.file,
        &args.chain.options(&policy, &parents),
        keep,
        args.base.as_deref(),
        &mut |done, total| {
            started = true;
            let percent = if total == 0 {
                0.0
            } else {
                done as f32 / total as f32 * 100.0
            };
            progress.set_percent(percent);
        },
    );
    if let Err(e) = committed {
        if started {
            progress.abandon();
        }
        return Err(match e {
            // Names the image already, as qemu-img words it.
            e @ imagefmt::Error::BaseNotInChain { .. } => anyhow::Error::new(e),
            e => anyhow::Error::new(e).context(format!("{}", args.file.display())),
        });
    }
    progress.set_percent(100.0);
    progress.finish();
    if !args.quiet {
        writeln!(out, "Image committed.")?;
    }
    Ok(())
}

/// Runs rebase.
pub fn rebase(args: RebaseArgs, out: &mut impl Write) -> Result<()> {
    if args.chain.no_backing {
        bail!("rebase reads the old backing file: --no-backing cannot be used with it");
    }
    if args.compress && args.format.as_deref().is_some_and(|f| f != "qcow2") {
        // qemu-img's words: only qcow2 writes compressed clusters.
        bail!("Compression not supported for this file format");
    }
    qcow2_only(&args.format, "rebase")?;
    for mode in [&args.cache, &args.source_cache].into_iter().flatten() {
        cache_flushes(mode)?;
    }
    args.guard
        .check("rebase", std::slice::from_ref(&args.file))?;
    // qemu-img's lines: the first before the image is opened, one step per range it copies
    // (a line when the value moved by more than 2), 100 once more at the end, and the newline
    // whatever the outcome.
    let mut progress = crate::progress::Progress::new(args.progress && !args.quiet, out);
    progress.set_min_skip(2.0);
    match rebase_image(&args, &mut progress) {
        Ok(()) => {
            progress.set_percent(100.0);
            progress.finish();
            Ok(())
        }
        Err(e) => {
            progress.abandon();
            Err(e)
        }
    }
}

/// Rebases as `args` say, once the command line is checked, advancing `progress` as
/// qemu-img's rebase does.
fn rebase_image(args: &RebaseArgs, progress: &mut crate::progress::Progress<'_>) -> Result<()> {
    // Under -u, any qemu block driver name is written as given (qemu-img does so).
    let named = args
        .backing_format
        .as_deref()
        .filter(|f| f.parse::<ImageFormat>().is_err());
    if let (true, false, Some(name)) = (args.unsafe_header_only, args.backing.is_empty(), named) {
        imagefmt::ops::rebase::rebase_header_only_named(&args.file, &args.backing, name)
            .with_context(|| format!("{}", args.file.display()))?;
        return Ok(());
    }
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
    let options = imagefmt::ops::rebase::RebaseOptions {
        unsafe_header_only: args.unsafe_header_only,
        compress: args.compress,
    };
    let policy = args.chain.policy();
    let parents = args.chain.vdi_parents();
    imagefmt::ops::rebase::rebase_with_progress(
        &args.file,
        &new,
        &options,
        &args.chain.options(&policy, &parents),
        &mut |_, size| {
            // qemu-img adds the same share per step: 100 over the number of whole steps.
            let steps = size / size.clamp(1, imagefmt::ops::rebase::STEP);
            progress.advance_percent(100.0 / steps.max(1) as f32);
        },
    )
    .with_context(|| format!("{}", args.file.display()))?;
    Ok(())
}

/// Runs resize. The image is write-locked before its header is read and held to the end.
pub fn resize(args: ResizeArgs, out: &mut impl Write) -> Result<()> {
    args.guard
        .check("resize", std::slice::from_ref(&args.file))?;
    let format = format(&args.format)?;
    let preallocation = args
        .preallocation
        .as_deref()
        .map(|mode| Preallocation::parse(mode, true))
        .transpose()?
        .unwrap_or_default();
    let options = imagefmt::ops::resize::ResizeOptions {
        format,
        allow_shrink: args.shrink,
        drop_data_past_end: args.drop_data_past_end,
        preallocation,
    };
    let size: imagefmt::ops::resize::NewSize = args.size.parse()?;
    let policy = BackingPolicy::FollowLocal;
    let chain = args.data_files.options(&policy);
    let resized = imagefmt::ops::resize::resize(&args.file, size, &options, &chain)
        .with_context(|| format!("{}", args.file.display()))?;
    hold_if_asked(&args.file);
    drop(resized);
    if !args.quiet {
        writeln!(out, "Image resized.")?;
    }
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
