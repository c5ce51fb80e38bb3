//! Hypervisor drivers: cowclone starts VMs from clones with the hypervisor's own tools
//! (`qemu-system-x86_64`, `virsh`, `VBoxManage`) and never emulates anything itself.
//!
//! ```text
//!   VmSpec (what to run: disk chain nearest-first, memory, cpus, network, boot)
//!     │
//!     ├─ QemuDriver     argv for qemu-system (-blockdev chain, base read-only), daemonized,
//!     │                 pidfile + QMP socket + serial log in the run directory; stop over QMP
//!     ├─ LibvirtDriver  domain XML with the <backingStore> chain; virsh define/start/...
//!     └─ VBoxDriver     the VBoxManage sequence (register base, createvm, storageattach, ...)
//!           │
//!           └─ CommandRunner (SystemRunner runs, RecordingRunner records; Logged<R> appends
//!                             every invocation to a JSON-lines log) ── dry runs print argv
//! ```
//!
//! [`provision`] builds on the qemu driver: a NoCloud seed ([`cidata`]) carries a wrapper
//! script to the guest, which reports the script's output and exit status on a second serial
//! port.

pub mod accel;
pub mod cidata;
pub mod error;
pub mod pidfile;
pub mod provision;
pub mod qemu;
pub mod qmp;
pub mod runner;
pub mod spec;

pub use error::VmError;
pub use runner::{CommandRunner, Completed, Invocation, Logged, RecordingRunner, SystemRunner};
pub use spec::{Accel, DiskLayer, Egress, Endpoint, ExtraDrive, KernelBoot, PortForward, VmSpec};
