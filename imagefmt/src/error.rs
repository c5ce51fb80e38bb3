//! The crate-level error: format errors, I/O failures with the step that failed, and refusals.
//!
//! ```text
//! Error
//! ├── Qcow2(Qcow2Error)      a qcow2 header or option cowclone refuses
//! ├── Vdi(VdiError)          a VDI header or block map cowclone refuses
//! ├── Backing(BackingError)  an untrusted backing reference refused by policy
//! ├── Open(OpenError)        not a regular file, or swapped while opening
//! ├── Lock(LockError)        another process uses the image (qemu's locks)
//! ├── Io { step, source }    the operating system failed a step
//! └── refusals               unrecognised format, existing target, mismatched format ...
//! ```
//! Display never repeats the source's text: walk [`std::error::Error::source`] for the cause.

use std::io;
use std::path::PathBuf;

use thiserror::Error;

use crate::backing::BackingError;
use crate::lock::LockError;
use crate::open::OpenError;
use crate::qcow2::Qcow2Error;
use crate::vdi::VdiError;

/// Result alias for imagefmt.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything imagefmt can fail with.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum Error {
    /// A qcow2 header, extension or option was refused.
    #[error(transparent)]
    Qcow2(#[from] Qcow2Error),
    /// A VDI header or block map was refused.
    #[error(transparent)]
    Vdi(#[from] VdiError),
    /// A backing file reference was refused.
    #[error(transparent)]
    Backing(#[from] BackingError),
    /// An image, backing, parent or data file that is not a regular file.
    #[error(transparent)]
    Open(#[from] OpenError),
    /// Another process uses the image in a way this operation cannot share.
    #[error(transparent)]
    Lock(#[from] LockError),
    /// An I/O step failed.
    #[error("{step} failed")]
    Io {
        /// What was being done, e.g. "reading qcow2 header".
        step: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// The file is neither qcow2 nor VDI, and raw was not named explicitly.
    #[error("{path}: unrecognised image format (not qcow2 or VDI); name the format explicitly to use it as raw")]
    UnrecognizedFormat {
        /// The file.
        path: PathBuf,
    },
    /// The file is in a format cowclone recognises by its magic but does not read.
    #[error("{path} is a {format} image; cowclone reads qcow2, VDI and raw")]
    ForeignFormat {
        /// The file.
        path: PathBuf,
        /// The format its magic names.
        format: crate::detect::ForeignFormat,
    },
    /// A format name cowclone does not handle.
    #[error("unsupported image format {name:?} (supported: qcow2, raw, vdi)")]
    UnsupportedFormat {
        /// The name given.
        name: String,
    },
    /// The file does not parse as the format it was said to be.
    #[error("{path}: image is not in {expected} format")]
    FormatMismatch {
        /// The file.
        path: PathBuf,
        /// The format named.
        expected: &'static str,
        /// Why it does not parse as that format.
        #[source]
        source: Cause,
    },
    /// The target exists and overwriting was not asked for.
    #[error("{path} already exists (use overwrite to replace it)")]
    AlreadyExists {
        /// The target.
        path: PathBuf,
    },
    /// A create request without a size and without a backing file to take it from.
    #[error("no size given and no backing file to take it from")]
    SizeRequired,
    /// The backing file is not to be opened, so its format must be named.
    #[error("a backing format is required when the backing file is not opened")]
    BackingFormatRequired,
    /// A guest read or status query outside the virtual disk.
    #[error("guest access of {len} bytes at {offset:#x} is outside the {size}-byte disk")]
    OutOfRange {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// An operation failed on one of its files: says which file and in what role ("source
    /// image", "destination", "backing file"), so a message never blames the wrong file.
    #[error("{role} {path}")]
    InFile {
        /// What the file is to the operation.
        role: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong with it.
        #[source]
        source: Cause,
    },
    /// A parameter of a request is out of its range.
    #[error("invalid parameter {name}: {reason}")]
    InvalidParameter {
        /// The parameter, as the command line names it.
        name: &'static str,
        /// What is wrong.
        reason: &'static str,
    },
    /// The backing file is the image being created (qemu-img refuses this too).
    #[error("{path} cannot be its own backing file")]
    BackingIsTarget {
        /// The image.
        path: PathBuf,
    },
    /// `commit -b BASE`: no image of the chain is BASE (qemu-img's wording).
    #[error("Did not find '{base}' in the backing chain of '{}'", image.display())]
    BaseNotInChain {
        /// The base as given.
        base: String,
        /// The image whose chain was searched.
        image: PathBuf,
    },
}

impl Error {
    /// An adapter for `map_err` that records which read failed.
    pub fn reading(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io {
            step: format!("reading {what}"),
            source,
        }
    }

    /// An adapter for `map_err` that records which write failed.
    pub fn writing(what: &'static str) -> impl FnOnce(io::Error) -> Error {
        move |source| Error::Io {
            step: format!("writing {what}"),
            source,
        }
    }

    /// An adapter for `map_err` with a step described at run time.
    pub fn io(step: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let step = step.into();
        move |source| Error::Io { step, source }
    }

    /// Wraps this error with the file it concerns and that file's role (see
    /// [`Error::InFile`]); an error that already names a file is returned as it is.
    pub(crate) fn in_file(self, role: &'static str, path: &std::path::Path) -> Error {
        match self {
            Error::InFile { .. } => self,
            other => Error::InFile {
                role,
                path: path.to_owned(),
                source: Cause::from(other),
            },
        }
    }

    /// True if the image was refused for what it contains (as opposed to an I/O failure or a
    /// refused request): callers reporting "this file is bad" branch on it.
    pub fn is_invalid_image(&self) -> bool {
        match self {
            Error::InFile { source, .. } => source.is_invalid_image(),
            _ => matches!(
                self,
                Error::Qcow2(_)
                    | Error::Vdi(_)
                    | Error::UnrecognizedFormat { .. }
                    | Error::ForeignFormat { .. }
                    | Error::FormatMismatch { .. }
            ),
        }
    }
}

/// The boxed cause inside [`Error::FormatMismatch`] and [`Error::InFile`].
///
/// It dereferences to the inner [`Error`] and is deliberately not an error itself: their
/// [`std::error::Error::source`] then yields the inner `Error`, not a box around it, so
/// `downcast_ref::<Error>()` over an error chain finds every engine error in it.
pub struct Cause(Box<Error>);

impl Cause {
    /// The inner error.
    pub fn into_inner(self) -> Error {
        *self.0
    }
}

impl From<Error> for Cause {
    fn from(e: Error) -> Self {
        Cause(Box::new(e))
    }
}

impl std::ops::Deref for Cause {
    type Target = Error;

    fn deref(&self) -> &Error {
        &self.0
    }
}

impl std::fmt::Debug for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(&*self.0, f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cause_of_an_error_in_a_file_is_the_engine_error_itself() {
        let e = Error::SizeRequired.in_file("destination", std::path::Path::new("x"));
        let source = std::error::Error::source(&e).expect("a source");
        assert!(matches!(
            source.downcast_ref::<Error>(),
            Some(Error::SizeRequired)
        ));
    }
}
