//! Materialising a new image file: never half-written under its final name, never replacing an
//! existing file unless asked, optionally durable.
//!
//! The image is written to a hidden temporary file in the target's directory and then linked
//! into place with `renameat2(RENAME_NOREPLACE)` (or `rename` when overwriting), so a reader sees
//! either no file or a complete image. A crash leaves at worst a `.NAME.*.cowclone-tmp` file.
//! Durable mode fsyncs the file before it is linked and the directory after.

use std::fs::File;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// Suffix of temporary files, so that cleanup tools can recognise leftovers of a crash.
pub const TEMP_SUFFIX: &str = ".cowclone-tmp";

/// How a new file is put in place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NewFileMode {
    /// Replace an existing file atomically instead of refusing.
    pub overwrite: bool,
    /// fsync the file and its directory before returning.
    pub durable: bool,
}

/// Creates `path` by running `fill` on a temporary file and linking it into place.
///
/// If `fill` fails, the temporary file is removed and nothing appears under `path`.
pub fn create_with<T>(
    path: &Path,
    mode: NewFileMode,
    fill: impl FnOnce(&File) -> Result<T>,
) -> Result<T> {
    if !mode.overwrite && path.symlink_metadata().is_ok() {
        return Err(Error::AlreadyExists {
            path: path.to_owned(),
        });
    }
    let dir = parent_dir(path);
    let name = path
        .file_name()
        .ok_or_else(|| Error::Io {
            step: format!("creating {}", path.display()),
            source: io::Error::new(io::ErrorKind::InvalidInput, "the path names no file"),
        })?
        .to_string_lossy();
    let temp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(TEMP_SUFFIX)
        // Like any new file (and like qemu-img): 0666 minus the umask, not tempfile's 0600.
        .permissions(std::fs::Permissions::from_mode(0o666))
        .tempfile_in(&dir)
        .map_err(Error::io(format!(
            "creating a temporary file in {}",
            dir.display()
        )))?;

    let value = fill(temp.as_file())?;
    if mode.durable {
        temp.as_file()
            .sync_all()
            .map_err(Error::io(format!("syncing {}", path.display())))?;
    }
    let persisted = if mode.overwrite {
        temp.persist(path)
    } else {
        temp.persist_noclobber(path)
    };
    persisted.map_err(|e| {
        if e.error.kind() == io::ErrorKind::AlreadyExists {
            Error::AlreadyExists {
                path: path.to_owned(),
            }
        } else {
            Error::Io {
                step: format!("moving the new image into place at {}", path.display()),
                source: e.error,
            }
        }
    })?;
    if mode.durable {
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(Error::io(format!("syncing directory {}", dir.display())))?;
    }
    Ok(value)
}

/// The directory a path's file lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}
