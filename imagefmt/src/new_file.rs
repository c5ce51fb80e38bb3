//! Materialising a new image file: never half-written under its final name, never replacing an
//! existing file unless asked, optionally durable.
//!
//! The image is written to an anonymous file (`O_TMPFILE`) in the target's directory and linked
//! into place with `linkat`, which fails if the name exists — so a reader sees either no file or
//! a complete image, and a crash leaves nothing behind. Where `O_TMPFILE` or `/proc` is not
//! available, and when overwriting, a hidden temporary file `.NAME.*.cowclone-tmp` is written and
//! renamed into place instead (`renameat2(RENAME_NOREPLACE)`, or `rename` to overwrite); a crash
//! then leaves at worst that file. Durable mode fsyncs the file before it is linked and the
//! directory after.
//!
//! A file being replaced is an image someone may be using: it is opened and write-locked
//! ([`crate::open::open_image`]) before anything is written and held until the new file is in
//! its place, so a VM or another process using it makes the overwrite fail instead of losing
//! its image under it.

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
    let dir = parent_dir(path);
    if !mode.overwrite {
        // linkat refuses an existing name, so no separate existence check is needed.
        if let Some(file) = anonymous_file(&dir) {
            let value = fill(&file)?;
            if mode.durable {
                file.sync_all()
                    .map_err(Error::io(format!("syncing {}", path.display())))?;
            }
            link_into_place(&file, path)?;
            if mode.durable {
                sync_dir(&dir)?;
            }
            return Ok(value);
        }
    }
    if !mode.overwrite && path.symlink_metadata().is_ok() {
        return Err(Error::AlreadyExists {
            path: path.to_owned(),
        });
    }
    // Held (with its write locks) until the replacement is in place.
    let _replaced = if mode.overwrite && path.exists() {
        Some(crate::open::open_image(
            path,
            crate::open::OpenHow::write(),
        )?)
    } else {
        None
    };
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
        sync_dir(&dir)?;
    }
    Ok(value)
}

fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(Error::io(format!("syncing directory {}", dir.display())))
}

/// An unnamed file in `dir` (`O_TMPFILE`), or `None` where the filesystem or `/proc` (needed to
/// link it) does not allow that.
fn anonymous_file(dir: &Path) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    static HAVE_PROC_FD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*HAVE_PROC_FD.get_or_init(|| Path::new("/proc/self/fd").is_dir()) {
        return None;
    }
    let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
    rustix::fs::open(dir, flags, Mode::from_raw_mode(0o666))
        .ok()
        .map(File::from)
}

/// Gives an anonymous file its name; fails with `AlreadyExists` if the name is taken.
fn link_into_place(file: &File, path: &Path) -> Result<()> {
    use std::os::fd::AsRawFd;
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(|errno| {
        let source = io::Error::from(errno);
        if source.kind() == io::ErrorKind::AlreadyExists {
            Error::AlreadyExists {
                path: path.to_owned(),
            }
        } else {
            Error::Io {
                step: format!("linking the new image into place at {}", path.display()),
                source,
            }
        }
    })
}

/// The directory a path's file lives in (`.` for a bare file name).
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}
