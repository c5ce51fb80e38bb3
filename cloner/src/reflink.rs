//! Reflink clones: a full, independent copy of a source image that shares all of the source's
//! extents on disk (`FICLONE`), so it costs no data blocks until either file is written.
//!
//! Only filesystems with shared extents (btrfs; XFS made with `-m reflink=1`; a few others) can
//! do this, and only within one filesystem. `clone --method reflink` is refused elsewhere;
//! `--method auto` probes once per call and falls back to an overlay.
//!
//! A reflink clone is a byte-for-byte copy: a raw source gives a raw clone, a qcow2 source a
//! qcow2 clone with the same header, so the same backing file name (the source's parent, if
//! any). The clone therefore reads through the source's *parent*, never through the source: its
//! record's parent is the source's parent, and the source is not guarded for it.
//!
//! Each clone is published like every new image ([`imagefmt::new_file::create_with`]): the
//! extents are cloned into an anonymous file that is then linked under its final name, so
//! nothing half-made ever appears there.

use std::fs::File;
use std::io;
use std::path::Path;

use imagefmt::new_file::{create_with, NewFileMode};
use imagefmt::ImageFormat;
use rustix::io::Errno;

use crate::error::{RegistryError, Result};
use crate::registry::ImageRecord;

/// How `clone` makes each new image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CloneMethod {
    /// A qcow2 (or VDI) overlay whose backing file is the source: the default.
    #[default]
    Overlay,
    /// A full copy sharing the source's extents (`FICLONE`); refused where the filesystem
    /// cannot share extents.
    Reflink,
    /// Reflink where the filesystem can, overlay otherwise.
    Auto,
}

impl CloneMethod {
    /// `overlay`, `reflink` or `auto`.
    pub fn name(self) -> &'static str {
        match self {
            CloneMethod::Overlay => "overlay",
            CloneMethod::Reflink => "reflink",
            CloneMethod::Auto => "auto",
        }
    }
}

impl std::str::FromStr for CloneMethod {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "overlay" => Ok(CloneMethod::Overlay),
            "reflink" => Ok(CloneMethod::Reflink),
            "auto" => Ok(CloneMethod::Auto),
            other => Err(format!(
                "invalid clone method {other:?}: expected overlay, reflink or auto"
            )),
        }
    }
}

/// Errors of `FICLONE` that mean "no shared extents here", not "something broke": the
/// filesystem has no reflinks (`EOPNOTSUPP`, `ENOTTY`, `EINVAL`), or source and target are on
/// different filesystems (`EXDEV`).
fn means_unsupported(errno: Errno) -> bool {
    [Errno::OPNOTSUPP, Errno::NOTTY, Errno::INVAL, Errno::XDEV].contains(&errno)
}

/// Why `source` cannot be reflinked into `dir`, as the refusal the user sees.
fn refusal(source: &Path, dir: &Path, errno: Errno) -> RegistryError {
    let reason = if errno == Errno::XDEV {
        format!(
            "{} and {} are on different filesystems; extents are shared only within one \
             (clone into a directory on the base's filesystem with --dir)",
            source.display(),
            dir.display()
        )
    } else {
        format!(
            "the filesystem of {} cannot share extents (FICLONE: {}); reflinks need e.g. btrfs \
             or XFS made with reflink=1 (use --method overlay, or auto to fall back)",
            dir.display(),
            io::Error::from(errno)
        )
    };
    RegistryError::NoReflink {
        path: source.to_owned(),
        reason,
    }
}

/// Checks that `source` can be reflinked into `dir`, by cloning it into an anonymous file there
/// (which vanishes when closed): `Ok(false)` if the filesystem cannot share extents, an error
/// if something else failed.
pub fn probe(source: &Path, dir: &Path) -> Result<bool> {
    probe_errno(source, dir).map(|errno| errno.is_none())
}

/// [`probe`], with the errno that means "unsupported" (see [`means_unsupported`]).
fn probe_errno(source: &Path, dir: &Path) -> Result<Option<Errno>> {
    use rustix::fs::{Mode, OFlags};
    let from = File::open(source).map_err(RegistryError::io(format!(
        "opening {} to reflink it",
        source.display()
    )))?;
    let flags = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
    let probe = match rustix::fs::open(dir, flags, Mode::from_raw_mode(0o600)) {
        Ok(fd) => fd,
        // No anonymous files here: the first real clone will tell.
        Err(_) => return Ok(None),
    };
    match rustix::fs::ioctl_ficlone(&probe, &from) {
        Ok(()) => Ok(None),
        Err(errno) if means_unsupported(errno) => Ok(Some(errno)),
        Err(errno) => Err(RegistryError::io(format!(
            "reflinking {} into {}",
            source.display(),
            dir.display()
        ))(errno.into())),
    }
}

/// The method `asked` comes to for `source` cloned into `place`: `Overlay` or `Reflink`, never
/// `Auto`. Refuses a reflink of what a copy cannot stand for (a VDI, whose copy would share its
/// UUIDs; a qcow2 whose backing name is relative to its own directory), a clone format other
/// than the source's, and a filesystem without shared extents.
pub(crate) fn resolve(
    asked: CloneMethod,
    source: &ImageRecord,
    format: Option<ImageFormat>,
    place: &Path,
) -> Result<CloneMethod> {
    if asked == CloneMethod::Overlay {
        return Ok(CloneMethod::Overlay);
    }
    let auto = asked == CloneMethod::Auto;
    let refuse = |reason: String| {
        Err(RegistryError::NoReflink {
            path: source.path.clone(),
            reason,
        })
    };
    if format.is_some_and(|f| f != source.format) {
        if auto {
            return Ok(CloneMethod::Overlay);
        }
        return refuse(format!(
            "a reflink clone is a copy, so it has the source's format ({})",
            source.format.name()
        ));
    }
    if source.format == ImageFormat::Vdi {
        if auto {
            return Ok(CloneMethod::Overlay);
        }
        return refuse(
            "a copy of a VDI would carry the same UUIDs as its source; reflink raw or qcow2 \
             images"
                .into(),
        );
    }
    if source.format == ImageFormat::Qcow2 {
        let info = imagefmt::ops::info::image_info(&source.path).map_err(RegistryError::image(
            format!("reading {}", source.path.display()),
        ))?;
        if let Some(backing) = info.backing_filename {
            if !Path::new(&backing).is_absolute() {
                if auto {
                    return Ok(CloneMethod::Overlay);
                }
                return refuse(format!(
                    "its backing file name {backing:?} is relative to its own directory, so a \
                     copy elsewhere would lose its backing file"
                ));
            }
        }
    }
    match probe_errno(&source.path, place)? {
        None => Ok(CloneMethod::Reflink),
        Some(_) if auto => Ok(CloneMethod::Overlay),
        Some(errno) => Err(refusal(&source.path, place, errno)),
    }
}

/// Creates `target` as a reflink of `source`: complete under its name or absent.
pub fn reflink_new(source: &Path, target: &Path, durable: bool) -> Result<()> {
    let from = File::open(source).map_err(RegistryError::io(format!(
        "opening {} to reflink it",
        source.display()
    )))?;
    let mut failed = None;
    let mode = NewFileMode {
        overwrite: false,
        durable,
    };
    let made = create_with(target, mode, |file| {
        rustix::fs::ioctl_ficlone(file, &from).map_err(|errno| {
            failed = Some(errno);
            imagefmt::Error::io(format!("FICLONE of {}", source.display()))(errno.into())
        })
    });
    match (made, failed) {
        (Ok(()), _) => Ok(()),
        (Err(_), Some(errno)) if means_unsupported(errno) => Err(refusal(
            source,
            target.parent().unwrap_or(Path::new(".")),
            errno,
        )),
        (Err(e), _) => Err(RegistryError::image(format!(
            "reflinking {} to {}",
            source.display(),
            target.display()
        ))(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn methods_parse_and_name_themselves() {
        for method in [
            CloneMethod::Overlay,
            CloneMethod::Reflink,
            CloneMethod::Auto,
        ] {
            assert_eq!(method.name().parse::<CloneMethod>().unwrap(), method);
        }
        assert!("copy".parse::<CloneMethod>().is_err());
        assert_eq!(CloneMethod::default(), CloneMethod::Overlay);
    }

    /// Whatever filesystem the temporary directory is on, a reflink either succeeds and gives
    /// the same bytes, or is refused with the reason and leaves nothing under the name.
    #[test]
    fn a_reflink_is_identical_or_refused_without_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("src.raw");
        let bytes: Vec<u8> = (0..1 << 16).map(|i| (i % 251) as u8).collect();
        std::fs::write(&source, &bytes).unwrap();
        let target = dir.path().join("copy.raw");
        let supported = probe(&source, dir.path()).unwrap();
        match reflink_new(&source, &target, false) {
            Ok(()) => {
                assert!(supported);
                assert_eq!(std::fs::read(&target).unwrap(), bytes);
            }
            Err(e) => {
                assert!(!supported, "{e}");
                assert!(e.to_string().contains("cannot share extents"), "{e}");
                assert!(!target.exists());
            }
        }
    }
}
