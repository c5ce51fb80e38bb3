//! [`RegistryError`]: why a registry operation failed, one variant per cause so callers (the CLI,
//! the hypervisor drivers) can branch on it.

use std::io;
use std::path::PathBuf;

/// Why a registry operation failed.
#[non_exhaustive]
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// Neither `--home`, `COWCLONE_HOME` nor an XDG data directory is available.
    #[error("no home directory: pass --home DIR or set COWCLONE_HOME")]
    NoHome,
    /// A file-system step failed.
    #[error("{step}")]
    Io {
        /// What was being done.
        step: String,
        /// Why it failed.
        #[source]
        source: io::Error,
    },
    /// The SQLite store failed.
    #[error("registry database")]
    Db(#[from] rusqlite::Error),
    /// The database was written by a newer cowclone.
    #[error("the registry has schema version {found}; this cowclone knows up to {known}")]
    SchemaTooNew {
        /// Version found in the database.
        found: i64,
        /// Newest version this build knows.
        known: i64,
    },
    /// imagefmt could not read or create an image.
    #[error("{context}")]
    Image {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: imagefmt::Error,
    },
    /// A name that cannot be used as a registry name (and directory name).
    #[error("invalid name {name:?}: use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit")]
    InvalidName {
        /// The name given.
        name: String,
    },
    /// The name is registered already (names are unique across bases and clones).
    #[error("{name:?} is already registered")]
    NameTaken {
        /// The name.
        name: String,
    },
    /// The file is registered already under another name.
    #[error("{path} is already registered as {name:?}")]
    PathTaken {
        /// The file.
        path: PathBuf,
        /// Its registered name.
        name: String,
    },
    /// No base or clone of that name.
    #[error("no base or clone named {name:?}")]
    NotFound {
        /// The name.
        name: String,
    },
    /// The name is registered, but as the other kind.
    #[error("{name:?} is a {kind}, not a {expected}")]
    WrongKind {
        /// The name.
        name: String,
        /// What it is.
        kind: &'static str,
        /// What the operation needs.
        expected: &'static str,
    },
    /// A would-be base reads through a backing file of its own.
    #[error("{path} has a backing file of its own ({backing}); pass --allow-backing to register it anyway")]
    HasBacking {
        /// The image.
        path: PathBuf,
        /// Its backing reference (a path, or a VDI parent UUID).
        backing: String,
    },
    /// A guarded image (a base, or a clone with clones) changed since it was fingerprinted.
    #[error("{name:?} was modified since it was registered ({changes}): its clones may read corrupt data; refusing")]
    Modified {
        /// The image's name.
        name: String,
        /// What changed, e.g. `size 1048576 -> 2097152`.
        changes: String,
    },
    /// The image has clones, which would lose their backing file.
    #[error("{name:?} has clones ({}); remove them first or pass --with-clones", clones.join(", "))]
    HasClones {
        /// The image.
        name: String,
        /// Its direct clones.
        clones: Vec<String>,
    },
    /// The requested clone format cannot sit on this source.
    #[error("cannot make a {format} clone of {name:?}: {reason}")]
    FormatUnsupported {
        /// The source.
        name: String,
        /// The clone format asked for.
        format: &'static str,
        /// Why not.
        reason: &'static str,
    },
    /// A reflink clone cannot be made of this source here.
    #[error("cannot reflink {path}: {reason}")]
    NoReflink {
        /// The source image.
        path: PathBuf,
        /// Why not.
        reason: String,
    },
    /// Something is already at the clone's path (left by an interrupted clone, or a stranger).
    #[error("{path} already exists (left by an interrupted clone? `cowclone gc` removes such leftovers)")]
    PathExists {
        /// The path.
        path: PathBuf,
    },
    /// A registered image's file is gone.
    #[error("the file of {name:?} is missing: {path}")]
    FileMissing {
        /// The image's name.
        name: String,
        /// Where it was.
        path: PathBuf,
    },
    /// A write to a registered base, or to a clone that has clones, refused whatever the file
    /// mode (see `registry::protect`).
    #[error("{operation} would write {path}, which is {what}: its clones would silently read different data; refusing (override: --force-registered-write)")]
    WriteProtected {
        /// The operation (`commit`, `rebase`, `resize`, `check -r`, …).
        operation: String,
        /// The file it would write.
        path: PathBuf,
        /// What the file is, e.g. `registered base "deb12"`.
        what: String,
    },
    /// The clone's VM runs (its pidfile names a live qemu).
    #[error("{name:?} is running (qemu pid {pid}); stop it first (`cowclone stop {name}`)")]
    Running {
        /// The clone.
        name: String,
        /// The hypervisor's process.
        pid: i32,
    },
    /// A would-be base that cowclone cannot read in full (its clones could not be read either).
    #[error("cowclone cannot read {path} in full: {reason}; refusing to register it")]
    NotReadableInFull {
        /// The image.
        path: PathBuf,
        /// Why, e.g. `it is encrypted (LUKS)`.
        reason: String,
    },
    /// A registered image's file exists but cannot be read (as opposed to: was modified).
    #[error("the file of {name:?} cannot be read: {path}")]
    Unreadable {
        /// The image's name.
        name: String,
        /// Its file.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
    /// A libvirt host did not answer (checked before anything is changed).
    #[error("host {host:?} ({uri}) does not answer: {detail}")]
    HostUnreachable {
        /// The registered host.
        host: String,
        /// Its libvirt URI.
        uri: String,
        /// What virsh said.
        detail: String,
    },
    /// A step on a libvirt host failed.
    #[error("on host {host:?}: {step}: {detail}")]
    Remote {
        /// The registered host.
        host: String,
        /// What was being done.
        step: String,
        /// What went wrong (virsh's message, or a mismatch).
        detail: String,
    },
    /// `--count` out of range.
    #[error("invalid count {count}: expected 1 to {max}")]
    InvalidCount {
        /// The count given.
        count: u64,
        /// The largest allowed.
        max: u64,
    },
}

/// Shorthand for results of registry operations.
pub type Result<T, E = RegistryError> = std::result::Result<T, E>;

impl RegistryError {
    /// Wraps an I/O error with the step that failed (for `map_err`).
    pub fn io(step: impl Into<String>) -> impl FnOnce(io::Error) -> RegistryError {
        let step = step.into();
        move |source| RegistryError::Io { step, source }
    }

    /// Wraps an imagefmt error with what was being done (for `map_err`).
    pub fn image(context: impl Into<String>) -> impl FnOnce(imagefmt::Error) -> RegistryError {
        let context = context.into();
        move |source| RegistryError::Image { context, source }
    }
}
