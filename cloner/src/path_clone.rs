//! Path-based cloning for tool authors: "clone this base file to this path", without a
//! registry ([`clone_base`]). The registry's `clone` builds on the same imagefmt calls.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imagefmt::{ImageFormat, Qcow2Builder};

/// Why a clone failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The base could not be located (e.g. it does not exist).
    #[error("cannot resolve base image {path}")]
    BaseNotFound {
        /// The base as given.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// imagefmt refused or failed to create the overlay.
    #[error("creating the clone overlay failed")]
    Create(#[from] imagefmt::Error),
}

/// What to clone, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneRequest {
    /// The base image (qcow2 or VDI recognised by content; raw only if `base_format` says so).
    pub base: PathBuf,
    /// Where the clone goes; refused if it exists.
    pub clone: PathBuf,
    /// The base's format, if known; otherwise read from its magic.
    pub base_format: Option<ImageFormat>,
    /// fsync the clone and its directory before returning.
    pub durable: bool,
}

/// A finished clone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clone {
    /// The new overlay.
    pub clone: PathBuf,
    /// The backing name written into it: the base's absolute, canonical path, so the clone keeps
    /// working wherever it is moved.
    pub backing_name: String,
    /// The base's format, as written into the backing-format extension.
    pub base_format: ImageFormat,
    /// The clone's virtual size (the base's).
    pub virtual_size: u64,
    /// Time spent creating the clone.
    pub elapsed: Duration,
}

/// Clones `request.base` to `request.clone`: a qcow2 overlay that reads through to the base.
pub fn clone_base(request: &CloneRequest) -> Result<Clone, CloneError> {
    let started = Instant::now();
    let base = canonical(&request.base)?;
    let backing_name = base.to_string_lossy().into_owned();
    let mut builder = Qcow2Builder::new(&request.clone)
        .backing(backing_name.clone())
        .durable(request.durable);
    if let Some(format) = request.base_format {
        builder = builder.backing_format(format);
    }
    let created = builder.create()?;
    let base_format = created
        .backing
        .as_ref()
        .and_then(|b| b.format.parse().ok())
        .unwrap_or(ImageFormat::Raw);
    Ok(Clone {
        clone: created.path,
        backing_name,
        base_format,
        virtual_size: created.virtual_size,
        elapsed: started.elapsed(),
    })
}

fn canonical(path: &Path) -> Result<PathBuf, CloneError> {
    path.canonicalize()
        .map_err(|source| CloneError::BaseNotFound {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clone_of_a_qcow2_base_records_its_absolute_path_and_format() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        Qcow2Builder::new(&base).size(1 << 20).create().unwrap();
        let request = CloneRequest {
            base: dir.path().join("./base.qcow2"),
            clone: dir.path().join("c1.qcow2"),
            base_format: None,
            durable: false,
        };
        let made = clone_base(&request).unwrap();
        assert_eq!(
            made.backing_name,
            base.canonicalize().unwrap().to_string_lossy()
        );
        assert_eq!(made.base_format, ImageFormat::Qcow2);
        assert_eq!(made.virtual_size, 1 << 20);
        let info = imagefmt::ops::info::image_info(&made.clone).unwrap();
        assert_eq!(
            info.backing_filename.as_deref(),
            Some(made.backing_name.as_str())
        );
        // A second clone to the same path is refused and leaves the first intact.
        assert!(matches!(
            clone_base(&request),
            Err(CloneError::Create(imagefmt::Error::AlreadyExists { .. }))
        ));
    }

    #[test]
    fn a_missing_base_is_reported_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let request = CloneRequest {
            base: dir.path().join("nope"),
            clone: dir.path().join("c"),
            base_format: None,
            durable: false,
        };
        assert!(matches!(
            clone_base(&request),
            Err(CloneError::BaseNotFound { .. })
        ));
        assert!(!dir.path().join("c").exists());
    }
}
