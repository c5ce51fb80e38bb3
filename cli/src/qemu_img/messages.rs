//! qemu-img's wording for the engine's refusals: the one table that turns an [`imagefmt`]
//! error into the message qemu-img 10.0 prints for the same condition.
//!
//! The engine's errors carry the values (unknown feature bits and their names, the L1 size the
//! disk needs, the option refused); this module only words them. Where qemu reports an errno
//! (snapshot operations), the wording is C's strerror text for it. An error without an entry
//! here keeps cowclone's own words.

use std::io::Write;
use std::path::{Path, PathBuf};

use imagefmt::ops::bitmap::BitmapCommandError;
use imagefmt::ops::convert_salvage::SalvageWarning;
use imagefmt::qcow2::amend::AmendError;
use imagefmt::qcow2::snapshot::{L1Problem, SnapshotError};
use imagefmt::qcow2::Qcow2Error;
use imagefmt::vdi::VdiError;

/// qemu-img's message for the engine error in `e`'s chain, where its wording is known: the
/// error's context lines as they are, an open failure as `Could not open 'FILE'` (qemu-img
/// create names the file alone), then qemu's text for the refusal itself.
pub(super) fn qemu_message(command: &str, e: &anyhow::Error) -> Option<String> {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let engine = engine_error(cause);
        let qcow2 = match engine {
            Some(imagefmt::Error::Qcow2(q)) => Some(q),
            _ => cause.downcast_ref::<Qcow2Error>(),
        };
        if let Some(q) = qcow2 {
            if let Qcow2Error::Snapshot(e) = q {
                if let Some(text) = snapshot_operation_text(command, &parts, e) {
                    return Some(text);
                }
                // A table qemu does not open fails the open: a context line that only names
                // the image becomes qemu's "Could not open" (the opener adds no file of its
                // own to this error).
                if is_table_refusal(e) {
                    if let Some(last) = parts.last_mut().filter(|l| !l.starts_with("Could not")) {
                        *last = could_not_open(command, Path::new(last.as_str()));
                    }
                }
            }
            parts.push(qcow2_text(command, q)?);
            return Some(parts.join(": "));
        }
        let opened = match engine {
            // A source that cannot be read: qemu-img's words for the request that failed.
            Some(imagefmt::Error::InFile {
                role: "source image",
                source,
                ..
            }) if command == "convert" => {
                return match &**source {
                    imagefmt::Error::Qcow2(q) => read_failure_text(q),
                    _ => None,
                };
            }
            // check stopped by the snapshot table: what qemu-img check reports before it fails.
            Some(imagefmt::Error::InFile { role, source, .. }) if *role == "Check failed:" => {
                return match &**source {
                    imagefmt::Error::Qcow2(Qcow2Error::Snapshot(e)) => check_snapshot_text(e),
                    _ => None,
                };
            }
            // convert -c with preallocation: qemu's sentence, without the option's name.
            Some(imagefmt::Error::InvalidParameter { name: "-c", reason })
                if reason.starts_with("Compression and preallocation") =>
            {
                parts.push((*reason).to_string());
                return Some(parts.join(": "));
            }
            // measure: no L1 table of this cluster size maps the size.
            Some(imagefmt::Error::InvalidParameter {
                name: "size",
                reason,
            }) if reason.starts_with("the image size is too large (") => {
                parts.push(capitalized(reason));
                return Some(parts.join(": "));
            }
            // A file refused by the VDI header checks, worded as qemu's VDI driver words it.
            Some(imagefmt::Error::Vdi(e)) => {
                let text = vdi_text(e)?;
                // A context line that only names the image becomes qemu's "Could not open".
                if let Some(last) = parts.last_mut().filter(|l| !l.starts_with("Could not")) {
                    *last = could_not_open(command, Path::new(last.as_str()));
                }
                parts.push(text);
                return Some(parts.join(": "));
            }
            Some(imagefmt::Error::FormatMismatch { path, .. }) => path,
            Some(imagefmt::Error::InFile { role, path, .. }) if *role == "could not open" => path,
            Some(_) => return None,
            None => {
                parts.push(cause.to_string());
                continue;
            }
        };
        let named = could_not_open(command, opened);
        // A context line that only names the file says no more than qemu's prefix.
        if parts.last().is_some_and(|last| Path::new(last) == opened) {
            parts.pop();
        }
        parts.push(named);
    }
    None
}

/// The engine error `cause` is or wraps: amend's and bitmap's errors wrap the engine's
/// transparently, so an error chain skips the inner one.
pub(super) fn engine_error<'a>(
    cause: &'a (dyn std::error::Error + 'static),
) -> Option<&'a imagefmt::Error> {
    match cause.downcast_ref::<AmendError>() {
        Some(AmendError::Image(inner)) => return Some(inner),
        Some(_) => return None,
        None => {}
    }
    match cause.downcast_ref::<BitmapCommandError>() {
        Some(BitmapCommandError::Open(inner)) => return Some(inner),
        Some(_) => return None,
        None => {}
    }
    cause.downcast_ref::<imagefmt::Error>()
}

thread_local! {
    /// The names images were given on the command line (`json:{…}`, an `--image-opts` list,
    /// `file:NAME`) by the path they resolved to, for the command line being run.
    static GIVEN_NAMES: std::cell::RefCell<Vec<(PathBuf, String)>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Records that the image at `path` was named `given` on the command line: qemu-img names it
/// so where it cannot open it (`Could not open 'driver=qcow2,file.filename=x': …`).
pub(super) fn remember_given_name(path: &str, given: &str) {
    if path != given {
        GIVEN_NAMES.with(|names| {
            names
                .borrow_mut()
                .push((PathBuf::from(path), given.to_owned()));
        });
    }
}

/// Forgets the names of the previous command line.
pub(super) fn forget_given_names() {
    GIVEN_NAMES.with(|names| names.borrow_mut().clear());
}

/// The name the image at `path` was given on the command line (its path if none other).
pub(super) fn shown_name(path: &Path) -> String {
    GIVEN_NAMES.with(|names| {
        names
            .borrow()
            .iter()
            .find(|(p, _)| p == path)
            .map_or_else(|| path.display().to_string(), |(_, given)| given.clone())
    })
}

/// Prints what qemu-img prints on standard output before the error `e`: create's
/// "Formatting ..." line when the format refused the request.
pub(super) fn print_before_error(e: &anyhow::Error, out: &mut impl Write) {
    let failed = e.downcast_ref::<crate::commands::create::CreateFailed>();
    if let Some(line) = failed.and_then(|failed| failed.formatting.as_deref()) {
        // A failure to print it changes nothing about the error that follows.
        let _ = writeln!(out, "{line}");
    }
}

/// qemu-img's words for failing to open `path`: create names the file alone.
fn could_not_open(command: &str, path: &Path) -> String {
    match command {
        "create" => path.display().to_string(),
        _ => format!("Could not open '{}'", shown_name(path)),
    }
}

/// qemu's text for a qcow2 refusal, where it is known.
fn qcow2_text(command: &str, e: &Qcow2Error) -> Option<String> {
    Some(match e {
        Qcow2Error::UnsupportedIncompatibleFeatures { names, unnamed, .. } => {
            let mut listed = names.clone();
            if *unnamed != 0 {
                listed.push(format!("Unknown incompatible feature: {unnamed:x}"));
            }
            format!("Unsupported qcow2 feature(s): {}", listed.join(", "))
        }
        // qemu counts the L1 entries the size needs in an int before comparing them.
        Qcow2Error::L1TableTooSmall { needed, .. } if *needed > i32::MAX as u64 => {
            "Image is too big".to_owned()
        }
        Qcow2Error::L1TableTooSmall { .. } => "L1 table is too small".to_owned(),
        Qcow2Error::DiskTooLarge { .. } if command == "create" => {
            "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
                .to_owned()
        }
        Qcow2Error::ExtendedL2ClusterTooSmall { .. } => {
            "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
                .to_owned()
        }
        Qcow2Error::RefcountWidthNeedsV3 { .. } => "Different refcount widths than 16 bits \
            require compatibility level 1.1 or above (use version=v3 or greater)"
            .to_owned(),
        Qcow2Error::InvalidOption {
            option,
            value,
            reason,
        } => option_text(option, value, reason)?,
        Qcow2Error::Snapshot(e) => snapshot_text(e)?,
        // qemu fails compressed writes into an image with a data file with ENOTSUP.
        Qcow2Error::CompressedDataFile => "Operation not supported".to_owned(),
        // Growing the refcount table past qemu's limit fails with EFBIG.
        Qcow2Error::RefcountTableTooLarge { .. } if command == "snapshot" => {
            "File too large".to_owned()
        }
        // qemu's refcount update fails with EINVAL when a count would leave its range.
        Qcow2Error::CorruptEntry { what, .. }
            if command == "snapshot" && what.starts_with("refcount") =>
        {
            "Invalid argument".to_owned()
        }
        _ => return None,
    })
}

/// qemu-img convert's error for a source request that fails on `e` (qemu's drivers fail it
/// with EIO): a block status, or a read (of a compressed cluster that does not decompress).
/// An unaligned data cluster is first reported by qemu's qcow2 driver, on a line of its own,
/// printed here.
fn read_failure_text(e: &Qcow2Error) -> Option<String> {
    const EIO: &str = "Input/output error";
    Some(match e {
        Qcow2Error::UnalignedCluster {
            guest_offset,
            host,
            l2_offset,
            l2_index,
            ..
        } => {
            eprintln!("{}", unaligned_cluster_line(*host, *l2_offset, *l2_index));
            format!("error while reading block status at offset {guest_offset}: {EIO}")
        }
        Qcow2Error::CorruptEntry { guest_offset, .. } => {
            format!("error while reading block status at offset {guest_offset}: {EIO}")
        }
        Qcow2Error::BadCompressedCluster { guest_offset, .. } => {
            format!("error while reading at byte {guest_offset}: {EIO}")
        }
        _ => return None,
    })
}

/// What qemu's qcow2 driver prints, once, for a data cluster at an unaligned host offset in a
/// read-only image (it does not mark it corrupt).
fn unaligned_cluster_line(host: u64, l2_offset: u64, l2_index: u64) -> String {
    format!(
        "qcow2: Image is corrupt: Cluster allocation offset {host:#x} unaligned (L2 offset: \
         {l2_offset:#x}, L2 index: {l2_index:#x}); further non-fatal corruption events will be \
         suppressed"
    )
}

/// The line qemu's driver prints itself for a salvaged failure, if it prints one.
pub(super) fn salvage_driver_line(warning: &SalvageWarning) -> Option<String> {
    match warning {
        SalvageWarning::UnalignedCluster {
            host,
            l2_offset,
            l2_index,
        } => Some(unaligned_cluster_line(*host, *l2_offset, *l2_index)),
        _ => None,
    }
}

/// qemu's text for a VDI header its driver refuses to open, for the checks it makes.
fn vdi_text(e: &VdiError) -> Option<String> {
    Some(match e {
        VdiError::DiskTooLarge { disk_size, max } => {
            format!(
                "Unsupported VDI image size (size is {disk_size:#x}, max supported is {max:#x})"
            )
        }
        VdiError::BadSignature { found } => {
            format!("Image not in VDI format (bad signature {found:08x})")
        }
        VdiError::UnsupportedVersion { found } => format!(
            "unsupported VDI image (version {}.{})",
            found >> 16,
            found & 0xffff
        ),
        VdiError::OffsetNotSectorAligned { field, offset } => {
            let what = match *field {
                "block map offset" => "block map offset",
                "data offset" => "data offset",
                _ => return None,
            };
            format!("unsupported VDI image (unaligned {what} {offset:#x})")
        }
        VdiError::BadLegacySectorSize { found } => {
            format!("unsupported VDI image (sector size {found} is not 512)")
        }
        VdiError::UnsupportedBlockSize { found } => {
            format!("unsupported VDI image (block size {found} is not 1048576)")
        }
        VdiError::DiskLargerThanBlocks {
            disk_size,
            blocks,
            block_size,
        } => format!(
            "unsupported VDI image (disk size {disk_size}, image bitmap has room for {})",
            u64::from(*blocks) * u64::from(*block_size)
        ),
        VdiError::TooManyBlocks { blocks, max } => {
            format!("unsupported VDI image (too many blocks {blocks}, max is {max})")
        }
        _ => return None,
    })
}

/// qemu's text for a creation option the format refuses.
fn option_text(option: &str, value: &str, reason: &str) -> Option<String> {
    Some(match option {
        "cluster_size" if reason.starts_with("must be") => {
            "Cluster size must be a power of two between 512 and 2048k".to_owned()
        }
        "refcount_bits" if reason == imagefmt::qcow2::create::REFCOUNT_BITS_RANGE => {
            "Refcount width must be a power of two and may not exceed 64 bits".to_owned()
        }
        "refcount_bits" => "Parameter 'refcount_bits' expects a number".to_owned(),
        // An option key the format does not have (the key is the value refused).
        "-o" => format!("Invalid parameter '{value}'"),
        // qemu-img passes compat on as the driver's "version" parameter.
        "compat" => format!("Parameter 'version' does not accept value '{value}'"),
        _ => return None,
    })
}

/// qemu's text for a snapshot table it refuses to open, or the errno it reports for a snapshot
/// operation the image cannot take, as strerror words it.
fn snapshot_text(e: &SnapshotError) -> Option<String> {
    Some(match e {
        SnapshotError::TooMany => "File too large".to_owned(),
        // qemu refuses internal snapshots of an image with a data file with ENOTSUP.
        SnapshotError::DataFile => "Operation not supported".to_owned(),
        SnapshotError::RefcountTooNarrow { .. } => "Invalid argument".to_owned(),
        // Not an errno: qemu's own sentence for a snapshot apply under dirty bitmaps.
        SnapshotError::ActiveBitmaps => "Device has active dirty bitmaps".to_owned(),
        // qemu's alloc_refcount_block after hooking up the block the cluster lacked.
        SnapshotError::RefcountBlockMissing { .. } => "Resource temporarily unavailable".to_owned(),
        // Opening the image (qcow2_do_open, qcow2_read_snapshots).
        SnapshotError::TooManyEntries { .. } => "Snapshot table too large".to_owned(),
        SnapshotError::TableOffsetInvalid { .. } => "Snapshot table offset invalid".to_owned(),
        SnapshotError::TooMuchExtraData { index, .. } => {
            format!("Too much extra metadata in snapshot table entry {index}\n{EXTRA_DATA_HINT}")
        }
        SnapshotError::TableTooBig { overhanging } => {
            format!(
                "Snapshot table is too big\n{}",
                overhanging_hint(*overhanging)
            )
        }
        _ => return None,
    })
}

/// Whether `e` is one of the snapshot table refusals qemu makes when it opens an image.
fn is_table_refusal(e: &SnapshotError) -> bool {
    matches!(
        e,
        SnapshotError::TooManyEntries { .. }
            | SnapshotError::TableOffsetInvalid { .. }
            | SnapshotError::TooMuchExtraData { .. }
            | SnapshotError::TableTooBig { .. }
    )
}

/// qemu's hint after too much extra data in a snapshot table entry.
const EXTRA_DATA_HINT: &str = "You can force-remove this extra metadata with qemu-img check -r all";

/// qemu's hint after a snapshot table with `count` entries too many.
fn overhanging_hint(count: u32) -> String {
    format!("You can force-remove all {count} overhanging snapshots with qemu-img check -r all")
}

/// What qemu-img check prints when the snapshot table stops it (qemu's
/// `qcow2_check_read_snapshot_table`): its ERROR line and hint, then "Check failed" with the
/// errno (the pointer checks are worded with check's lower-case table name).
fn check_snapshot_text(e: &SnapshotError) -> Option<String> {
    let (report, errno) = match e {
        SnapshotError::TooManyEntries { count } => (
            format!(
                "ERROR snapshot table too large\n{}",
                overhanging_hint(count - imagefmt::qcow2::MAX_SNAPSHOTS)
            ),
            "File too large",
        ),
        SnapshotError::TableOffsetInvalid { .. } => (
            "ERROR snapshot table offset invalid".to_owned(),
            "Invalid argument",
        ),
        SnapshotError::TooMuchExtraData { .. } | SnapshotError::TableTooBig { .. } => (
            format!(
                "ERROR failed to read the snapshot table: {}",
                snapshot_text(e)?
            ),
            "File too large",
        ),
        _ => return None,
    };
    Some(format!("{report}\nqemu-img: Check failed: {errno}"))
}

/// qemu's words where a snapshot operation fails on what the snapshot table holds: a snapshot
/// L1 table that fails `qcow2_validate_table` (`snapshot -d` names it after its context;
/// `snapshot -a` and amend's downgrade report it on a line of its own, then fail with its
/// errno in their own words), and a new table too big to write (EFBIG).
fn snapshot_operation_text(command: &str, parts: &[String], e: &SnapshotError) -> Option<String> {
    let context = parts.last().map(String::as_str).unwrap_or_default();
    if let SnapshotError::TableTooBig { .. } | SnapshotError::TooMuchExtraData { .. } = e {
        return context
            .starts_with("Could not create snapshot")
            .then(|| format!("{context}: File too large"));
    }
    let SnapshotError::InvalidL1 { problem, .. } = e else {
        return None;
    };
    let (text, errno) = match problem {
        L1Problem::TooLarge => ("Snapshot L1 table too large", "File too large"),
        _ => ("Snapshot L1 table offset invalid", "Invalid argument"),
    };
    Some(match command {
        "snapshot" if context.starts_with("Could not apply snapshot") => {
            format!("{text}\nqemu-img: {context}: Failed to load snapshot: {errno}")
        }
        "snapshot" => [context, text].join(": "),
        "amend" => format!("{text}\nqemu-img: Failed to turn zero into data clusters: {errno}"),
        _ => return None,
    })
}

/// `text` with its first letter in upper case (qemu's sentences start with one).
fn capitalized(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// qemu-img's message when an image's external data file does not open, as qemu words a child
/// that does not open: `Could not open 'IMAGE': Could not open 'DATA': strerror`, and its
/// refusals of a header without the data file's name or a data file given for an image without
/// one (`Could not open 'IMAGE': 'data-file' is required for this image`).
pub(super) fn data_file_message(e: &anyhow::Error) -> Option<String> {
    let mut image = None;
    let mut data = None;
    for cause in e.chain() {
        match cause.downcast_ref::<imagefmt::Error>() {
            Some(imagefmt::Error::InFile {
                role: "could not open",
                path,
                ..
            }) => image = Some(path),
            Some(imagefmt::Error::InFile {
                role: "could not open data file",
                path,
                ..
            }) => data = Some(path),
            Some(imagefmt::Error::Io { source, .. }) if data.is_some() => {
                return Some(format!(
                    "Could not open '{}': Could not open '{}': {}",
                    shown_name(image?),
                    data?.display(),
                    super::strerror(source)
                ));
            }
            Some(imagefmt::Error::Qcow2(
                refusal @ (Qcow2Error::DataFileRequired | Qcow2Error::DataFileNotExpected),
            )) => {
                return Some(format!(
                    "Could not open '{}': {refusal}",
                    shown_name(image?)
                ))
            }
            _ => {}
        }
    }
    None
}
