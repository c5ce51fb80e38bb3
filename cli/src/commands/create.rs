//! `cowclone create`: a blank image or an overlay (qemu-img create).

use std::io::Write;

use anyhow::{bail, Context, Result};
use imagefmt::preallocate::Preallocation;
use imagefmt::qcow2::create::REFCOUNT_BITS_RANGE;
use imagefmt::qcow2::{CreateOptions, Qcow2Error};
use imagefmt::{ImageFormat, Qcow2Builder};

use crate::args::CreateArgs;
use crate::commands::{on_off, parse_size};
use crate::qemu_img::options::escape_value;

/// The context of a create the format refused: shows the file's name, and carries the
/// "Formatting ..." line qemu-img prints before such a refusal. cowclone prints nothing on
/// standard output when a command fails; the qemu-img personality prints the line.
#[derive(Debug)]
pub struct CreateFailed {
    /// The image file, as shown.
    file: String,
    /// qemu-img's line for the request, where qemu-img would have printed it.
    pub formatting: Option<String>,
}

impl std::fmt::Display for CreateFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.file)
    }
}

/// Creates the image `args` describe and prints qemu-img's "Formatting ..." line.
pub fn create(args: CreateArgs, out: &mut impl Write) -> Result<()> {
    if args.overwrite {
        args.guard
            .check("create --overwrite", std::slice::from_ref(&args.file))?;
    }
    match args.format.as_str() {
        "qcow2" => {}
        "vdi" => return crate::commands::vdi_create::create_vdi(&args, out),
        "raw" => return create_raw(&args, out),
        other => bail!("creating {other:?} images is not supported (qcow2, raw and vdi are)"),
    }
    let mut options = CreateOptions::default();
    let mut preallocation = None;
    let mut preallocation_text = None;
    let mut size_text = args.size.clone();
    let mut compat_text = None;
    // -b and -F win over -o backing_file / backing_fmt, as in qemu-img.
    let mut backing = None;
    let mut backing_format = None;
    let mut data_file = args.data_file.clone();
    let mut data_file_raw = args.data_file_raw.then_some(true);
    let mut deferred = None;
    for item in args.options.iter().flat_map(|o| o.split(',')) {
        if item == "help" || item == "?" {
            writeln!(out, "Supported options (qemu-img create -f qcow2 syntax):")?;
            for key in imagefmt::qcow2::create::OPTION_KEYS {
                writeln!(out, "  {key}")?;
            }
            writeln!(
                out,
                "  size, backing_file, backing_fmt, data_file, data_file_raw"
            )?;
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
            "data_file" => data_file = Some(value.to_owned()),
            "data_file_raw" => {
                data_file_raw = Some(crate::commands::vdi_create::parse_on_off(key, value)?)
            }
            "preallocation" => {
                preallocation_text = Some(value.to_owned());
                match Preallocation::parse(value, true) {
                    Ok(mode) => preallocation = Some(mode),
                    // A mode qcow2 does not know: refused after the line, as qemu-img does.
                    Err(imagefmt::Error::Qcow2(e)) => {
                        deferred.get_or_insert(e);
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            _ => {
                if key == "compat" {
                    compat_text = Some(value.to_owned());
                }
                match options.set(key, value) {
                    // A value the format refuses (not one that does not parse): qemu-img
                    // says so after its "Formatting" line.
                    Err(e @ Qcow2Error::InvalidOption { option, reason, .. })
                        if matches!(option, "compat" | "compression_type")
                            || reason == REFCOUNT_BITS_RANGE =>
                    {
                        deferred.get_or_insert(e);
                    }
                    result => result.with_context(|| format!("{}", args.file.display()))?,
                }
            }
        }
    }
    backing = args.backing.clone().or(backing);
    backing_format = args.backing_format.clone().or(backing_format);
    let size = size_text.as_deref().map(parse_size).transpose()?;

    let mut builder = Qcow2Builder::new(&args.file)
        .options(options.clone())
        .overwrite(args.overwrite)
        .durable(args.durable)
        .preallocation(preallocation.unwrap_or_default());
    if let Some(size) = size {
        builder = builder.size(size);
    }
    if let Some(name) = &backing {
        builder = builder.backing(name.clone());
        match (&backing_format, args.unsafe_no_open) {
            // Under -u, any qemu block driver name is written as given (qemu-img does so).
            (Some(format), true) if format.parse::<ImageFormat>().is_err() => {
                builder = builder.backing_format_name(format.clone());
            }
            (Some(format), _) => builder = builder.backing_format(format.parse::<ImageFormat>()?),
            (None, _) => {}
        }
        if args.unsafe_no_open {
            builder = builder.without_opening_backing();
        }
    } else if backing_format.is_some() {
        bail!("a backing format was given without a backing file (-b)");
    }
    let raw_without_data_file = data_file.is_none() && data_file_raw == Some(true);
    if let Some(name) = &data_file {
        builder = builder.data_file(name.clone(), data_file_raw.unwrap_or(false));
        if args.data_file_from_cwd {
            builder = builder.data_file_base(imagefmt::chain::DataFileBase::WorkingDirectory);
        }
    }
    // The line qemu-img prints, in its order; size as requested (or the backing file's). String
    // values have their commas doubled, as qemu prints option values.
    let line = |size: u64, backing: Option<(&str, &str)>| {
        let mut line = format!(
            "Formatting '{}', fmt=qcow2 cluster_size={} extended_l2={}",
            shown_name(&args),
            options.cluster_size,
            on_off(options.extended_l2),
        );
        if let Some(mode) = &preallocation_text {
            line.push_str(&format!(" preallocation={}", escape_value(mode)));
        }
        line.push_str(&format!(
            " compression_type={} size={size}",
            options.compression_type.name()
        ));
        if let Some(compat) = &compat_text {
            line.push_str(&format!(" compat={}", escape_value(compat)));
        }
        if let Some((name, format)) = backing {
            line.push_str(&format!(
                " backing_file={} backing_fmt={}",
                escape_value(name),
                escape_value(format)
            ));
        }
        if let Some(name) = &data_file {
            line.push_str(&format!(" data_file={}", escape_value(name)));
        }
        if let Some(raw) = data_file_raw {
            line.push_str(&format!(" data_file_raw={}", on_off(raw)));
        }
        line.push_str(&format!(
            " lazy_refcounts={} refcount_bits={}",
            on_off(options.lazy_refcounts),
            options.refcount_bits
        ));
        line
    };
    // qemu-img prints its line before the format's create refuses the request: the error
    // carries it, and only the qemu-img personality prints it (cowclone's stdout stays empty).
    let refused = |e: anyhow::Error| -> anyhow::Error {
        let formatting = match (size, args.quiet) {
            (Some(size), false) => Some(line(
                size,
                backing.as_deref().zip(backing_format.as_deref()),
            )),
            _ => None,
        };
        e.context(CreateFailed {
            file: args.file.display().to_string(),
            formatting,
        })
    };
    if raw_without_data_file {
        return Err(refused(anyhow::anyhow!("data-file-raw requires data-file")));
    }
    let created = match deferred.map_or_else(|| builder.create(), |e| Err(e.into())) {
        Ok(created) => created,
        Err(e) => {
            if let imagefmt::Error::Qcow2(_) = &e {
                return Err(refused(e.into()));
            }
            return Err(e).context(CreateFailed {
                file: args.file.display().to_string(),
                formatting: None,
            });
        }
    };
    if !args.quiet {
        let backing = created.backing.as_ref();
        let backing = backing.map(|b| (b.name.as_str(), b.format.as_str()));
        writeln!(
            out,
            "{}",
            line(size.unwrap_or(created.virtual_size), backing)
        )?;
    }
    Ok(())
}

/// `create -f raw FILE SIZE [-o preallocation=off|falloc|full]`: a raw image as qemu's file
/// driver makes one (see [`imagefmt::preallocate::new_raw`]), with qemu-img's line.
fn create_raw(args: &CreateArgs, out: &mut impl Write) -> Result<()> {
    if args.backing.is_some() {
        bail!("raw images have no backing file");
    }
    let mut size_text = args.size.clone();
    let mut preallocation_text = None;
    for item in args.options.iter().flat_map(|o| o.split(',')) {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("invalid option {item:?}: expected key=value"))?;
        match key {
            "size" if size_text.is_some() => bail!("the image size must be specified only once"),
            "size" => size_text = Some(value.to_owned()),
            "preallocation" => preallocation_text = Some(value.to_owned()),
            _ => bail!("Invalid parameter '{key}' for the raw format"),
        }
    }
    let size = parse_size(
        size_text
            .as_deref()
            .context("Image creation needs a size parameter")?,
    )?;
    // qemu-img prints the size asked for and rounds the file up to whole sectors.
    let requested = size;
    let size = size.next_multiple_of(512);
    let mut line = format!(
        "Formatting '{}', fmt=raw size={requested}",
        shown_name(args)
    );
    if let Some(mode) = &preallocation_text {
        line.push_str(&format!(" preallocation={}", escape_value(mode)));
    }
    let preallocation = match preallocation_text
        .as_deref()
        .map(|m| Preallocation::parse(m, false))
    {
        Some(Err(e)) => {
            // The file driver refuses the mode after qemu-img's line.
            return Err(e).context(CreateFailed {
                file: args.file.display().to_string(),
                formatting: (!args.quiet).then(|| line.clone()),
            });
        }
        Some(Ok(mode)) => Some(mode),
        None => None,
    };
    let mode = imagefmt::new_file::NewFileMode {
        overwrite: args.overwrite,
        durable: args.durable,
    };
    imagefmt::new_file::create_with(&args.file, mode, |file| {
        imagefmt::preallocate::new_raw(file, size, preallocation.unwrap_or_default())
    })
    .with_context(|| format!("{}", args.file.display()))?;
    if !args.quiet {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// The image's name in the "Formatting" line: as the qemu-img personality was given it, else
/// the path.
pub(crate) fn shown_name(args: &CreateArgs) -> String {
    args.shown_name
        .clone()
        .unwrap_or_else(|| args.file.display().to_string())
}
