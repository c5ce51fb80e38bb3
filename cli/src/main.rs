//! `cowclone`: the command line. Parses arguments, calls imagefmt and cloner, prints human text
//! or JSON. Errors print one line (`cowclone: <error>: <cause>...`) and exit 1, like qemu-img.
#![forbid(unsafe_code)]

mod args;
mod bench_cmd;
mod check_map;
mod host_cmd;
mod measure_cmd;
mod ops;
mod output;
mod registry_cmd;
mod vdi_create;
mod vm_cmd;

use std::io::{self, Write};
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::Parser;
use imagefmt::backing::BackingPolicy;
use imagefmt::qcow2::CreateOptions;
use imagefmt::{ImageFormat, Qcow2Builder};

use args::{Cli, Command, CompareArgs, CreateArgs, InfoArgs, OutputFormat};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let stdout = io::stdout();
    let mut out = stdout.lock();
    // Exit codes follow qemu-img: 1 for an error, except where 1 means a negative answer
    // (compare: 1 = images differ), where errors exit 2.
    let (result, error_code) = match cli.command {
        Command::Create(args) => (create(args, &mut out).map(|()| 0), 1),
        Command::Info(args) => (info(args, &mut out).map(|()| 0), 1),
        Command::Compare(args) => (compare(args, &mut out), 2),
        Command::Check(args) => (check_map::check(args, &mut out), 1),
        Command::Map(args) => (check_map::map(args, &mut out), 1),
        Command::Convert(args) => (ops::convert(args, &mut out).map(|()| 0), 1),
        Command::Commit(args) => (ops::commit(args, &mut out).map(|()| 0), 1),
        Command::Rebase(args) => (ops::rebase(args, &mut out).map(|()| 0), 1),
        Command::Resize(args) => (ops::resize(args, &mut out).map(|()| 0), 1),
        Command::Measure(args) => (measure_cmd::measure_cmd(args, &mut out).map(|()| 0), 1),
        Command::Bench(args) => (bench_cmd::bench(args, &mut out).map(|()| 0), 1),
        Command::Registry(command) => (registry_cmd::run(command, &mut out), 1),
        Command::Vm(command) => (vm_cmd::run(command, &mut out), 1),
        Command::Host(args) => (host_cmd::run(args, &mut out), 1),
    };
    match result.and_then(|code| out.flush().map(|()| code).map_err(Into::into)) {
        Ok(code) => ExitCode::from(code),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            // One line: the error and its causes, no backtrace.
            // A context naming only the file that the next cause names again is dropped.
            let mut parts: Vec<String> = e.chain().map(|cause| cause.to_string()).collect();
            parts.dedup_by(|next, prev| {
                let repeats = next
                    .strip_prefix(prev.as_str())
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', ' ']));
                if repeats {
                    std::mem::swap(next, prev);
                }
                repeats
            });
            eprintln!("cowclone: {}", parts.join(": "));
            ExitCode::from(error_code)
        }
    }
}

fn compare(args: CompareArgs, out: &mut impl Write) -> Result<u8> {
    use imagefmt::ops::compare::Comparison;
    let policy = match &args.confine {
        _ if args.no_backing => BackingPolicy::Detach,
        Some(dir) => BackingPolicy::Confine(dir.clone()),
        None => BackingPolicy::FollowLocal,
    };
    let parents = imagefmt::vdi::Explicit(args.parents.clone());
    let mut options = chain_options(&policy, args.allow_data_file, &parents);
    options.force_share = args.force_share;
    let open = |path: &std::path::Path, format: &Option<String>| -> Result<_> {
        let format = format
            .as_deref()
            .map(str::parse::<ImageFormat>)
            .transpose()?;
        imagefmt::chain::open_chain_with(path, format, &options)
            .with_context(|| format!("{}", path.display()))
    };
    let first = open(&args.file1, &args.format1)?;
    let second = open(&args.file2, &args.format2)?;
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

/// How commands open chains: `policy`, data files if allowed, and VDI parents from `--parent`
/// (nearest first) when given, else from each image's own directory.
pub(crate) fn chain_options<'a>(
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

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.downcast_ref::<io::Error>()
        .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
}

fn create(args: CreateArgs, out: &mut impl Write) -> Result<()> {
    if args.overwrite {
        args.guard
            .check("create --overwrite", std::slice::from_ref(&args.file))?;
    }
    match args.format.as_str() {
        "qcow2" => {}
        "vdi" => return vdi_create::create_vdi(&args, out),
        other => bail!("creating {other:?} images is not supported (qcow2 and vdi are)"),
    }
    let mut options = CreateOptions::default();
    let mut size_text = args.size.clone();
    let mut compat_text = None;
    // -b and -F win over -o backing_file / backing_fmt, as in qemu-img.
    let mut backing = None;
    let mut backing_format = None;
    for item in args.options.iter().flat_map(|o| o.split(',')) {
        if item == "help" || item == "?" {
            writeln!(out, "Supported options (qemu-img create -f qcow2 syntax):")?;
            for key in imagefmt::qcow2::create::OPTION_KEYS {
                writeln!(out, "  {key}")?;
            }
            writeln!(out, "  size, backing_file, backing_fmt")?;
            return Ok(());
        }
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("invalid option {item:?}: expected key=value"))?;
        match key {
            "size" if size_text.is_some() => bail!("the image size must be specified only once"),
            "size" => size_text = Some(value.to_owned()),
            "backing_file" => backing = Some(value.to_owned()),
            "backing_fmt" => backing_format = Some(value.to_owned()),
            "compat" => {
                options.set(key, value)?;
                compat_text = Some(value.to_owned());
            }
            _ => options.set(key, value)?,
        }
    }
    backing = args.backing.clone().or(backing);
    backing_format = args.backing_format.clone().or(backing_format);
    let size = size_text.as_deref().map(parse_size).transpose()?;

    let mut builder = Qcow2Builder::new(&args.file)
        .options(options.clone())
        .overwrite(args.overwrite)
        .durable(args.durable);
    if let Some(size) = size {
        builder = builder.size(size);
    }
    if let Some(name) = &backing {
        builder = builder.backing(name.clone());
        if let Some(format) = &backing_format {
            builder = builder.backing_format(format.parse::<ImageFormat>()?);
        }
        if args.unsafe_no_open {
            builder = builder.without_opening_backing();
        }
    } else if backing_format.is_some() {
        bail!("a backing format was given without a backing file (-b)");
    }
    let created = builder
        .create()
        .with_context(|| format!("{}", args.file.display()))?;
    if !args.quiet {
        // The line qemu-img prints, in its order; size as requested (or the backing file's).
        let shown_size = size.unwrap_or(created.virtual_size);
        let mut line = format!(
            "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={} compression_type={} size={shown_size}",
            args.file.display(),
            options.cluster_size,
            on_off(options.extended_l2),
            options.compression_type.name(),
        );
        if let Some(compat) = &compat_text {
            line.push_str(&format!(" compat={compat}"));
        }
        if let Some(b) = &created.backing {
            line.push_str(&format!(
                " backing_file={} backing_fmt={}",
                b.name, b.format
            ));
        }
        line.push_str(&format!(
            " lazy_refcounts={} refcount_bits={}",
            on_off(options.lazy_refcounts),
            options.refcount_bits
        ));
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn info(args: InfoArgs, out: &mut impl Write) -> Result<()> {
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
            imagefmt::ops::info::backing_chain_with(&args.file, &options).with_context(context)?;
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
        let info = imagefmt::ops::info::image_info_with(&args.file, how).with_context(context)?;
        match args.output {
            OutputFormat::Json => writeln!(out, "{}", serde_json::to_string_pretty(&info)?)?,
            OutputFormat::Human => output::write_info(out, &info)?,
        }
    }
    Ok(())
}

fn parse_size(text: &str) -> Result<u64> {
    Ok(imagefmt::size::parse_size(text)?)
}

fn on_off(value: bool) -> &'static str {
    if value {
        "on"
    } else {
        "off"
    }
}
