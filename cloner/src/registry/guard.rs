//! Guarding an image that others read through: make its file read-only (`chmod a-w`) and take
//! its [`Fingerprint`]; before anything new is stacked on it, check the fingerprint again, so a
//! modified base is refused with what changed instead of silently corrupting clones. (Root
//! ignores file modes; the fingerprint catches its writes.)

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use imagefmt::ImageFormat;

use super::records::ImageRecord;
use crate::error::{RegistryError, Result};
use crate::fingerprint::{fingerprint, Fingerprint};

/// Write permission bits for user, group and others.
const WRITE_BITS: u32 = 0o222;

/// Makes `path` read-only and fingerprints it; returns its previous mode (to restore on
/// release) and the fingerprint.
pub(crate) fn guard(path: &Path, format: ImageFormat) -> Result<(u32, Fingerprint)> {
    let mode = std::fs::metadata(path)
        .map_err(RegistryError::io(format!(
            "reading metadata of {}",
            path.display()
        )))?
        .permissions()
        .mode()
        & 0o7777;
    set_mode(path, mode & !WRITE_BITS)?;
    match fingerprint(path, format) {
        Ok(print) => Ok((mode, print)),
        Err(e) => {
            let _ = set_mode(path, mode);
            Err(e)
        }
    }
}

/// Gives `path` back the mode it had before [`guard`] (a missing file is not an error).
pub(crate) fn release(path: &Path, mode: Option<u32>) -> Result<()> {
    match (mode, path.exists()) {
        (Some(mode), true) => set_mode(path, mode),
        _ => Ok(()),
    }
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
        RegistryError::io(format!("changing the mode of {}", path.display())),
    )
}

/// Refuses a record whose file is gone, or exists but cannot be read (with the operating
/// system's error): a FIFO, socket or character device is refused before it is opened.
pub(crate) fn check_readable(record: &ImageRecord) -> Result<()> {
    use std::os::unix::fs::{FileExt, FileTypeExt};
    let unreadable = |source| RegistryError::Unreadable {
        name: record.name.clone(),
        path: record.path.clone(),
        source,
    };
    let meta = match std::fs::metadata(&record.path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(RegistryError::FileMissing {
                name: record.name.clone(),
                path: record.path.clone(),
            })
        }
        Err(e) => return Err(unreadable(e)),
    };
    let kind = meta.file_type();
    if kind.is_fifo() || kind.is_socket() || kind.is_char_device() {
        return Err(unreadable(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file (a FIFO, socket or character device)",
        )));
    }
    let file = std::fs::File::open(&record.path).map_err(unreadable)?;
    file.read_at(&mut [0u8; 1], 0).map_err(unreadable)?;
    Ok(())
}

/// Refuses a guarded record whose file is gone, unreadable, or differs from its fingerprint.
pub(crate) fn check_unchanged(record: &ImageRecord) -> Result<()> {
    check_readable(record)?;
    let Some(recorded) = &record.fingerprint else {
        return Ok(());
    };
    let now = fingerprint(&record.path, record.format).map_err(|e| match e {
        RegistryError::Io { source, .. } => RegistryError::Unreadable {
            name: record.name.clone(),
            path: record.path.clone(),
            source,
        },
        e => RegistryError::Modified {
            name: record.name.clone(),
            changes: format!("its header no longer reads: {}", super::error_chain(&e)),
        },
    })?;
    match now.changes_since(recorded) {
        None => Ok(()),
        Some(changes) => Err(RegistryError::Modified {
            name: record.name.clone(),
            changes,
        }),
    }
}
