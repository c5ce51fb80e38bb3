//! `-o help` / `-o ?` of create and convert: the creation options qemu-img 10 lists for a
//! format, with its wording, from one table.
//!
//! qemu-img lists the format driver's options; given the image's file name it adds those of
//! the `file` protocol driver (an option both have appears once, described by the format), all
//! sorted by name. cowclone accepts fewer of them (see docs/qemu-img-personality.md): the list
//! says what qemu-img takes, so that scripts reading it read the same thing.

use std::path::Path;

use super::getopt::Spec;
use super::{error, Failure, Plan};

/// The value an option takes, as qemu-img prints it.
#[derive(Clone, Copy)]
enum Kind {
    Str,
    Size,
    Num,
    Bool,
}

impl Kind {
    fn text(self) -> &'static str {
        match self {
            Kind::Str => "str",
            Kind::Size => "size",
            Kind::Num => "num",
            Kind::Bool => "bool (on/off)",
        }
    }
}

/// Which driver an option belongs to.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Driver {
    Qcow2,
    Raw,
    Vdi,
    /// The `file` protocol (what a local file name adds).
    File,
    /// qcow2's amend options (`amend -o help`).
    Qcow2Amend,
}

/// One creation option: its drivers, name, value and description.
struct CreateOption {
    drivers: &'static [Driver],
    name: &'static str,
    kind: Kind,
    help: &'static str,
}

use Driver::{File, Qcow2, Qcow2Amend as Amend, Raw, Vdi};

/// qemu-img 10.0's creation options of the formats cowclone writes and of the file protocol,
/// and qcow2's amend options.
#[rustfmt::skip]
const OPTIONS: &[CreateOption] = &[
    CreateOption { drivers: &[Qcow2, Amend], name: "backing_file", kind: Kind::Str, help: "File name of a base image" },
    CreateOption { drivers: &[Qcow2, Amend], name: "backing_fmt", kind: Kind::Str, help: "Image format of the base image" },
    CreateOption { drivers: &[Qcow2], name: "cluster_size", kind: Kind::Size, help: "qcow2 cluster size" },
    CreateOption { drivers: &[Qcow2, Amend], name: "compat", kind: Kind::Str, help: "Compatibility level (v2 [0.10] or v3 [1.1])" },
    CreateOption { drivers: &[Qcow2], name: "compression_type", kind: Kind::Str, help: "Compression method used for image cluster compression" },
    CreateOption { drivers: &[Qcow2, Amend], name: "data_file", kind: Kind::Str, help: "File name of an external data file" },
    CreateOption { drivers: &[Qcow2, Amend], name: "data_file_raw", kind: Kind::Bool, help: "The external data file must stay valid as a raw image" },
    CreateOption { drivers: &[Qcow2], name: "encrypt.cipher-alg", kind: Kind::Str, help: "Name of encryption cipher algorithm" },
    CreateOption { drivers: &[Qcow2], name: "encrypt.cipher-mode", kind: Kind::Str, help: "Name of encryption cipher mode" },
    CreateOption { drivers: &[Qcow2], name: "encrypt.format", kind: Kind::Str, help: "Encrypt the image, format choices: 'aes', 'luks'" },
    CreateOption { drivers: &[Qcow2], name: "encrypt.hash-alg", kind: Kind::Str, help: "Name of encryption hash algorithm" },
    CreateOption { drivers: &[Qcow2, Amend], name: "encrypt.iter-time", kind: Kind::Num, help: "Time to spend in PBKDF in milliseconds" },
    CreateOption { drivers: &[Qcow2], name: "encrypt.ivgen-alg", kind: Kind::Str, help: "Name of IV generator algorithm" },
    CreateOption { drivers: &[Qcow2], name: "encrypt.ivgen-hash-alg", kind: Kind::Str, help: "Name of IV generator hash algorithm" },
    CreateOption { drivers: &[Amend], name: "encrypt.keyslot", kind: Kind::Num, help: "Select a single keyslot to modify explicitly" },
    CreateOption { drivers: &[Amend], name: "encrypt.new-secret", kind: Kind::Str, help: "New secret to set in the matching keyslots. Empty string to erase" },
    CreateOption { drivers: &[Amend], name: "encrypt.old-secret", kind: Kind::Str, help: "Select all keyslots that match this password" },
    CreateOption { drivers: &[Amend], name: "encrypt.state", kind: Kind::Str, help: "Select new state of affected keyslots (active/inactive)" },
    CreateOption { drivers: &[Qcow2], name: "encrypt.key-secret", kind: Kind::Str, help: "ID of secret providing qcow AES key or LUKS passphrase" },
    CreateOption { drivers: &[Qcow2], name: "encryption", kind: Kind::Bool, help: "Encrypt the image with format 'aes'. (Deprecated in favor of encrypt.format=aes)" },
    CreateOption { drivers: &[Qcow2], name: "extended_l2", kind: Kind::Bool, help: "Extended L2 tables" },
    CreateOption { drivers: &[File], name: "extent_size_hint", kind: Kind::Size, help: "Extent size hint for the image file, 0 to disable" },
    CreateOption { drivers: &[Qcow2, Amend], name: "lazy_refcounts", kind: Kind::Bool, help: "Postpone refcount updates" },
    CreateOption { drivers: &[File], name: "nocow", kind: Kind::Bool, help: "Turn off copy-on-write (valid only on btrfs)" },
    CreateOption { drivers: &[Qcow2], name: "preallocation", kind: Kind::Str, help: "Preallocation mode (allowed values: off, metadata, falloc, full)" },
    CreateOption { drivers: &[File], name: "preallocation", kind: Kind::Str, help: "Preallocation mode (allowed values: off, falloc, full)" },
    CreateOption { drivers: &[Qcow2, Amend], name: "refcount_bits", kind: Kind::Num, help: "Width of a reference count entry in bits" },
    CreateOption { drivers: &[Qcow2, Amend, Raw, Vdi, File], name: "size", kind: Kind::Size, help: "Virtual disk size" },
    CreateOption { drivers: &[Vdi], name: "static", kind: Kind::Bool, help: "VDI static (pre-allocated) image" },
];

/// Formats qemu-img knows but cannot create images of.
const READ_ONLY_FORMATS: &[&str] = &["bochs", "cloop", "dmg", "snapshot-access", "vvfat"];
/// Formats qemu-img knows whose options it cannot amend.
const NOT_AMENDABLE: &[&str] = &[
    "raw",
    "vdi",
    "bochs",
    "cloop",
    "dmg",
    "vmdk",
    "vhdx",
    "vpc",
    "qed",
    "parallels",
    "qcow",
    "vvfat",
    "file",
];

/// Takes the file protocol's `extent_size_hint` out of `items`, checked as a size. qemu-img
/// sets it on the new file where the file system has extent size hints (XFS); on ext4 and
/// tmpfs nothing is set. cowclone never sets one, so the option is accepted and changes
/// nothing.
pub(super) fn take_file_options(items: &mut Vec<(String, Option<String>)>) -> Result<(), Failure> {
    if let Some(hint) = super::take_option(items, "extent_size_hint") {
        imagefmt::size::parse_size(&hint).map_err(|_| {
            error(
                "Parameter 'extent_size_hint' expects a non-negative number below 2^64\n\
                 Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                 and exabytes, respectively.",
            )
        })?;
    }
    Ok(())
}

/// Whether a list of `-o` items asks for help (an item `help` or `?` without a value).
pub(super) fn asks_for_help(items: &[(String, Option<String>)]) -> bool {
    items
        .iter()
        .any(|(key, value)| value.is_none() && (key == "help" || key == "?"))
}

/// What qemu-img prints for `-o help` with output format `format` and, if given, the output
/// file name `file` (which adds the file protocol's options): the text, or qemu-img's error.
pub(super) fn help_text(format: &str, file: Option<&str>) -> Result<String, String> {
    let driver = match format {
        "qcow2" => Qcow2,
        "raw" => Raw,
        "vdi" => Vdi,
        other if READ_ONLY_FORMATS.contains(&other) => {
            return Err(format!(
                "Format driver '{other}' does not support image creation"
            ))
        }
        other => return Err(format!("Unknown file format '{other}'")),
    };
    let mut text = match file {
        Some(_) => "Supported options:\n".to_owned(),
        None => format!("Supported {format} options:\n"),
    };
    let drivers: &[Driver] = match file {
        Some(_) => &[driver, File],
        None => &[driver],
    };
    text.push_str(&option_lines(drivers));
    if file.is_none() {
        text.push_str(
            "\nThe protocol level may support further options.\n\
             Specify the target filename to include those options.\n",
        );
    }
    Ok(text)
}

/// What qemu-img prints for `amend -o help` of an image of format `format`.
fn amend_help_text(format: &str) -> Result<String, String> {
    match format {
        "qcow2" => Ok(format!(
            "Amend options for 'qcow2':\n{}",
            option_lines(&[Amend])
        )),
        other if NOT_AMENDABLE.contains(&other) || READ_ONLY_FORMATS.contains(&other) => Err(
            format!("Format driver '{other}' does not support option amendment"),
        ),
        other => Err(format!("Unknown file format '{other}'")),
    }
}

/// The option lines of `drivers`, sorted by name, as qemu's `qemu_opts_print_help` prints
/// them; an option of several drivers appears once, described by the first.
fn option_lines(drivers: &[Driver]) -> String {
    let mut lines: Vec<(&str, String)> = Vec::new();
    for driver in drivers {
        for option in OPTIONS.iter().filter(|o| o.drivers.contains(driver)) {
            if lines.iter().any(|(name, _)| *name == option.name) {
                continue;
            }
            let key = format!("{}=<{}>", option.name, option.kind.text());
            lines.push((option.name, format!("  {key:<22} - {}\n", option.help)));
        }
    }
    lines.sort_by(|a, b| a.0.cmp(b.0));
    lines.into_iter().map(|(_, line)| line).collect()
}

/// qemu-img amend's options.
pub(super) const AMEND: Spec = Spec {
    short: "ho:f:t:pqU",
    long: &[
        ("help", false, "h"),
        ("quiet", false, "q"),
        ("progress", false, "p"),
        ("object", true, "object"),
        ("format", true, "f"),
        ("cache", true, "t"),
        ("options", true, "o"),
        ("image-opts", false, "image-opts"),
        ("force", false, "force"),
        ("force-share", false, "U"),
    ],
};

/// `amend` with `-o help` (or `?`): qemu-img's amend option list, or its refusal; the `-o`
/// lists checked as qemu-img checks them. `None`: not a help request (amend runs as usual).
pub(super) fn amend_help(args: &[String]) -> Result<Option<Plan>, Failure> {
    let Ok(parsed) = super::getopt::parse(&AMEND, args) else {
        return Ok(None);
    };
    if parsed.has("h") {
        return Ok(None);
    }
    let items = super::option_items(&parsed)?;
    if !asks_for_help(&items) {
        return Ok(None);
    }
    let format = match (parsed.last("f"), parsed.operands.as_slice()) {
        (Some(format), _) => format.to_owned(),
        (None, [file]) => {
            let path = Path::new(file);
            let header = imagefmt::image::read_file_header_with(
                path,
                imagefmt::open::OpenHow::reading(true),
            )
            .map_err(|e| error(format!("Could not open '{file}': {e}")))?;
            header.1.format().name().to_owned()
        }
        (None, _) => return Err(error("Expecting one image file name")),
    };
    // With -p, qemu-img ends its progress display (which showed nothing) after the list.
    let progress = parsed.has("p") && !parsed.has("q");
    amend_help_text(&format)
        .map(|mut text| {
            if progress {
                text.push('\n');
            }
            Some(Plan::print("amend", text))
        })
        .map_err(error)
}
