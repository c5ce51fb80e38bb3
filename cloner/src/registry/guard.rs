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

/// Refuses a guarded record whose file is gone or differs from its fingerprint.
pub(crate) fn check_unchanged(record: &ImageRecord) -> Result<()> {
    if !record.path.exists() {
        return Err(RegistryError::FileMissing {
            name: record.name.clone(),
            path: record.path.clone(),
        });
    }
    let Some(recorded) = &record.fingerprint else {
        return Ok(());
    };
    let now = fingerprint(&record.path, record.format).map_err(|e| RegistryError::Modified {
        name: record.name.clone(),
        changes: format!("its header no longer reads: {}", super::error_chain(&e)),
    })?;
    match now.changes_since(recorded) {
        None => Ok(()),
        Some(changes) => Err(RegistryError::Modified {
            name: record.name.clone(),
            changes,
        }),
    }
}
