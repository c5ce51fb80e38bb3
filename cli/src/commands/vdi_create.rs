//! `cowclone create -f vdi`: dynamic and fixed VDI bases, and differencing images on a VDI
//! parent (which `qemu-img create` refuses: "Backing file not supported for file format 'vdi'").

use std::io::Write;

use anyhow::{bail, Context, Result};
use imagefmt::new_file::NewFileMode;
use imagefmt::size::parse_size;

use crate::args::CreateArgs;

/// Creates the VDI image `args` describes and prints qemu-img's "Formatting" line.
pub fn create_vdi(args: &CreateArgs, out: &mut impl Write) -> Result<()> {
    let mut size_text = args.size.clone();
    let mut fixed = false;
    let mut parent = None;
    for item in args.options.iter().flat_map(|o| o.split(',')) {
        if item == "help" || item == "?" {
            writeln!(out, "Supported options (qemu-img create -f vdi syntax):")?;
            writeln!(out, "  size, static (on/off), backing_file (a VDI parent)")?;
            return Ok(());
        }
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("invalid option {item:?}: expected key=value"))?;
        match key {
            "size" if size_text.is_some() => bail!("the image size must be specified only once"),
            "size" => size_text = Some(value.to_owned()),
            "static" => fixed = parse_on_off(key, value)?,
            "backing_file" => parent = Some(value.to_owned()),
            "backing_fmt" if value == "vdi" => {}
            _ => bail!("Invalid parameter '{key}' for the vdi format"),
        }
    }
    let parent = args.backing.clone().or(parent);
    if let Some(format) = args.backing_format.as_deref() {
        if format != "vdi" {
            bail!("a VDI differencing image needs a VDI parent, not -F {format}");
        }
    }
    let mode = NewFileMode {
        overwrite: args.overwrite,
        durable: args.durable,
    };
    let size = size_text.as_deref().map(parse_size).transpose()?;
    let file = &args.file;
    let line = match parent {
        Some(parent) => {
            if fixed {
                bail!(
                    "static=on cannot be combined with a parent: differencing images are dynamic"
                );
            }
            if args.unsafe_no_open {
                bail!("-u is not possible for VDI: the parent must be opened to read its UUIDs");
            }
            // As in qemu, a relative parent name is taken relative to the new image.
            let parent_path = imagefmt::backing::resolve(file, &parent)
                .with_context(|| format!("parent {parent}"))?;
            let parent_header = imagefmt::vdi::create::read_parent_header(&parent_path)
                .with_context(|| format!("{}", parent_path.display()))?;
            if let Some(size) = size {
                if size != parent_header.virtual_size() {
                    bail!(
                        "a differencing image has its parent's size ({} bytes), not {size}",
                        parent_header.virtual_size()
                    );
                }
            }
            let header = imagefmt::vdi::create_differencing(&parent_path, file, mode)
                .with_context(|| format!("{}", file.display()))?;
            format!(
                "Formatting '{}', fmt=vdi size={} parent={} parent_uuid={}",
                crate::commands::create::shown_name(args),
                header.virtual_size(),
                crate::qemu_img::options::escape_value(&parent_path.display().to_string()),
                header.uuid_linkage
            )
        }
        None => {
            let Some(size) = size else {
                bail!("Image creation needs a size parameter");
            };
            let create = if fixed {
                imagefmt::vdi::create_fixed
            } else {
                imagefmt::vdi::create_dynamic
            };
            create(file, size, mode).with_context(|| format!("{}", file.display()))?;
            format!(
                "Formatting '{}', fmt=vdi size={size} static={}",
                crate::commands::create::shown_name(args),
                if fixed { "on" } else { "off" }
            )
        }
    };
    if !args.quiet {
        writeln!(out, "{line}")?;
    }
    Ok(())
}

/// qemu's boolean option syntax.
pub(crate) fn parse_on_off(key: &str, value: &str) -> Result<bool> {
    match value {
        "on" | "yes" | "true" | "y" => Ok(true),
        "off" | "no" | "false" | "n" => Ok(false),
        _ => bail!("Parameter '{key}' expects 'on' or 'off'"),
    }
}
