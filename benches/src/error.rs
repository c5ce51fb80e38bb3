//! [`BenchError`]: why a benchmark run could not be completed.

use std::path::PathBuf;

/// A benchmark run that could not be completed (a method that merely cannot run on this
/// machine is not an error: it is reported as skipped).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BenchError {
    /// A filesystem step failed.
    #[error("{step}")]
    Io {
        /// What was being done, with the path.
        step: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The image library refused or failed.
    #[error(transparent)]
    Image(#[from] imagefmt::Error),
    /// An external tool ran but failed.
    #[error("{command} failed ({status}): {stderr}")]
    Tool {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// Its stderr, trimmed.
        stderr: String,
    },
    /// An external tool printed something we could not understand.
    #[error("could not read the output of {command}: {output:?}")]
    ToolOutput {
        /// The command line.
        command: String,
        /// What it printed.
        output: String,
    },
    /// The directory given to keep the clones in already holds files.
    #[error("{} is not empty: --keep needs a new or empty directory", path.display())]
    KeepDirNotEmpty {
        /// The directory.
        path: PathBuf,
    },
    /// cowclone's result of an operation is not what qemu-img's is: a fast wrong answer is not
    /// a result, so the run stops.
    #[error("{operation}: cowclone's result differs from qemu-img's: {detail}")]
    Mismatch {
        /// The operation (`bench ops` name).
        operation: &'static str,
        /// What differs, with the judging command.
        detail: String,
    },
    /// A parameter makes the run impossible.
    #[error("{0}")]
    Invalid(String),
    /// Drawing the chart failed.
    #[error("drawing {}: {message}", path.display())]
    Plot {
        /// The SVG file.
        path: PathBuf,
        /// plotters' description of the failure.
        message: String,
    },
}

/// Result with [`BenchError`].
pub type Result<T, E = BenchError> = std::result::Result<T, E>;

impl BenchError {
    /// Maps an I/O error to [`BenchError::Io`] with a description of the step.
    pub fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> Self {
        let step = step.into();
        move |source| Self::Io { step, source }
    }
}
