//! cloner: the base registry and cloning, on top of imagefmt.
//!
//! Operators keep a few golden bases and stamp out many clones. [`Registry`] keeps their
//! lineage in an embedded SQLite store under a [`Home`] directory: bases are made read-only and
//! fingerprinted, clones are native overlays (qcow2, or VDI differencing images over VDI bases)
//! registered in the same transaction as their files appear, and every change goes to an audit
//! log. [`plan`] reads provisioning plans from script metadata. [`clone_base`] clones by path
//! without a registry.
//!
//! ```text
//! Home ─► store (SQLite, WAL, migrations) ─► Registry
//!           ├─ registry::bases   register / verify / rm / promote   (guard: chmod a-w + fingerprint)
//!           ├─ registry::clones  clone (qcow2 via Qcow2Builder, VDI via vdi::create_differencing) / rm
//!           │    └─ reflink     clone --method reflink|auto: FICLONE copies (btrfs, XFS)
//!           ├─ registry::gc      orphans, temp files, missing files
//!           ├─ registry::resolver  VDI parents by UUID from the registry
//!           └─ audit             every change, with its outcome
//! ```
//!
//! See `docs/registry.md` for the on-disk layout, the crash-safety order and the API the
//! hypervisor drivers use ([`Registry::clone_record`]).
#![forbid(unsafe_code)]

pub mod audit;
pub mod error;
pub mod fingerprint;
pub mod home;
mod path_clone;
pub mod plan;
pub mod reflink;
pub mod registry;
pub mod remote;
pub mod runtime;
pub mod store;
pub mod vm;

pub use error::RegistryError;
pub use home::Home;
pub use path_clone::{clone_base, Clone, CloneError, CloneRequest};
pub use reflink::CloneMethod;
pub use registry::bases::{RegisterBase, RemovedBase, Verification};
pub use registry::clones::{CloneSpec, Cloned};
pub use registry::gc::{GcItem, GcReport, MissingFile};
pub use registry::resolver::RegistryResolver;
pub use registry::{ChainLink, CloneRecord, FileState, ImageRecord, Kind, Registry};
