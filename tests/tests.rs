//! cowclone's integration tests: one binary, one module per area.
//!
//! Cross-checks run the reference tools (`qemu-img`, from Debian's `qemu-utils`); a missing tool
//! fails the test with a message naming the package, it never skips.

mod util;

mod amend_dd_xcheck;
mod amend_downgrade_xcheck;
mod bench_cli;
mod bitmap_xcheck;
mod check_memory;
mod check_xcheck;
mod cli;
mod cli_shell;
mod compress_xcheck;
mod convert_extras_xcheck;
mod convert_xcheck;
mod data_file_create;
mod data_file_personality;
mod data_file_write_xcheck;
mod foreign_formats;
mod hostile_names;
mod hypervisor_drivers;
mod journeys;
mod json_order;
mod locking;
mod map_xcheck;
mod measure_xcheck;
mod ops_flags_xcheck;
mod ops_xcheck;
mod personality;
mod personality_options;
mod personality_parity;
mod qemu_xcheck;
mod read_xcheck;
mod rebase_resize_xcheck;
mod reflink;
mod registry;
mod registry_safety;
mod regression;
mod remote_hosts;
mod snapshot_meta_xcheck;
mod snapshot_xcheck;
mod vdi_cli;
mod vdi_xcheck;
mod vm_e2e;
mod vm_guest;
mod write_xcheck;
