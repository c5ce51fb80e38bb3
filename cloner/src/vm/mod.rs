//! Running clones as VMs through the hypervisors' own tools: qemu-system, libvirt's `virsh`,
//! VirtualBox's `VBoxManage`, cloud-hypervisor, Firecracker. cowclone never re-implements a
//! hypervisor; it builds their command lines from a clone record and owns the disk chain it
//! hands them.
//!
//! ```text
//! CloneRecord ──► VmSpec (disk chain nearest first, formats pinned, memory, cpus, ports)
//!                   ├─ qemu::QemuDriver    argv with -blockdev nodes; daemon, pidfile, QMP, serial log
//!                   ├─ libvirt::domain_xml  <disk> with the full <backingStore> chain; virsh argv
//!                   ├─ vbox::sequence      VBoxManage steps (parent registered before the diff)
//!                   ├─ cloud_hypervisor     --disk path=…,image_type=…,backing_files=on argv
//!                   └─ firecracker          --config-file JSON (schema-checked types), raw rootfs
//! daemon                 foreground hypervisors started detached; pidfile; stop by API, then signal
//! runner::CommandRunner ─ every invocation logged; a recording runner for tests and --dry-run
//! cidata::write_seed     NoCloud seed volume (vfat labelled CIDATA), built natively
//! provision::provision   plan → clone → seed → boot → wait → output and exit status
//! ```

pub mod accel;
pub mod cidata;
pub mod cloud_hypervisor;
pub mod daemon;
pub mod firecracker;
pub mod libvirt;
pub mod limits;
pub mod provision;
pub mod qemu;
pub mod qmp;
pub mod relay;
pub mod runner;
pub mod spec;
pub mod vbox;

pub use runner::{CommandRunner, Invocation, RecordingRunner, SystemRunner};
pub use spec::{Accel, DiskLayer, Egress, KernelBoot, PortForward, VmSpec};

/// Why a VM operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum VmError {
    /// A hypervisor tool could not be run or failed.
    #[error("{command} failed: {detail}")]
    Tool {
        /// The command line.
        command: String,
        /// Exit status and stderr, or the spawn error.
        detail: String,
    },
    /// A file in the clone's runtime directory could not be used.
    #[error("{step}")]
    Io {
        /// What was being done.
        step: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// QMP (qemu's control socket) answered unexpectedly.
    #[error("QMP: {0}")]
    Qmp(String),
    /// The request cannot be run as asked.
    #[error("{0}")]
    Invalid(String),
    /// The VM is already running (its pidfile names a live qemu).
    #[error("{name} is already running (pid {pid})")]
    AlreadyRunning {
        /// The clone.
        name: String,
        /// The qemu process.
        pid: i32,
    },
    /// The request goes beyond an operator limit (see [`limits`]).
    #[error("{asked} is beyond the operator limit {limit} set in {file}")]
    Limit {
        /// What was asked, e.g. `memory 8192 MiB`.
        asked: String,
        /// The limit, e.g. `max-memory = 4096 MiB`.
        limit: String,
        /// The configuration file that sets it.
        file: String,
    },
    /// The guest did not finish within the time allowed.
    #[error("the guest did not finish within {seconds} s (serial log: {log})")]
    Timeout {
        /// The limit.
        seconds: u64,
        /// Where the guest's console output is.
        log: String,
    },
    /// The registry refused or failed.
    #[error(transparent)]
    Registry(#[from] crate::RegistryError),
    /// An internal snapshot of a clone's image could not be taken.
    #[error("taking snapshot {name:?} of {}", path.display())]
    Snapshot {
        /// The snapshot's name.
        name: String,
        /// The image.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: imagefmt::Error,
    },
}

/// Results of VM operations.
pub type Result<T, E = VmError> = std::result::Result<T, E>;

/// An `Io` error maker for `map_err`.
pub(crate) fn io(step: impl Into<String>) -> impl FnOnce(std::io::Error) -> VmError {
    let step = step.into();
    move |source| VmError::Io { step, source }
}
