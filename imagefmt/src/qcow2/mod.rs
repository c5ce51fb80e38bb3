//! qcow2: header codec and native creation of blank images and overlays.
//!
//! ```text
//! cluster 0   header (72 B v2 / 112 B v3) | extensions ... | end marker | backing name
//! cluster 1   refcount table  ─────► refcount block(s) ─► refcount of every host cluster
//! cluster 2   refcount block 0
//! cluster 3.. L1 table ─► L2 tables ─► data clusters      (guest offset → host offset)
//! ```
//!
//! Public files: [`header`] (fixed fields), [`features`] (feature bits and names),
//! [`extensions`] (TLV area), [`HeaderCluster`] (cluster 0 as a unit), [`refcount`] (refcount
//! entry widths), [`layout`] (where a new image's metadata goes), [`create`] (options and the
//! writer), [`image`] and [`write`](mod@write) ([`image::Qcow2Image`]: reads, block status, writes),
//! [`check`] (`qemu-img check`), [`bitmap`] (persistent dirty bitmaps: directory, tables, data,
//! `qemu-img bitmap`'s actions), [`amend`] (`qemu-img amend`: compat, lazy refcounts, refcount
//! width, size, data-file settings in place), [`snapshot`] (the internal snapshot table),
//! [`snapshot_view`] (reading an image as of one of its snapshots: `convert -l`).
//! Internal: `snapshot_ops` (create, apply, delete, and copy-on-write of clusters snapshots
//! share), `tables` (the one L1/L2 decoder), `allocator`
//! (refcounts and allocation), `compress` and `compressed_writer` (guest clusters written
//! compressed, packed as qemu packs them).

pub(crate) mod allocator;
pub mod amend;
mod amend_status;
pub mod bitmap;
pub mod check;
pub(crate) mod compress;
pub(crate) mod compressed_writer;
pub mod create;
mod data_file;
mod error;
pub mod extensions;
pub mod features;
pub mod header;
mod header_cluster;
pub mod image;
pub mod layout;
pub(crate) mod preallocate;
pub mod refcount;
pub(crate) mod shrink;
pub mod snapshot;
pub(crate) mod snapshot_ops;
pub mod snapshot_view;
pub(crate) mod tables;
pub mod write;

// The format's main types at its root (error.rs and header_cluster.rs are private).
pub use create::{Compat, CreateOptions};
pub use error::Qcow2Error;
pub use header::{CompressionType, Header, Version, MAGIC};
pub use header_cluster::HeaderCluster;

/// Smallest cluster: 512 bytes.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster: 2 MiB.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Extended L2 entries need 32 subclusters of at least 512 bytes: clusters of 16 KiB or more.
pub const MIN_EXTENDED_L2_CLUSTER_BITS: u32 = 14;
/// Largest refcount width: 64 bits (order 6).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// qemu's limit on the refcount table (`QCOW_MAX_REFTABLE_SIZE`).
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// qemu's limit on the L1 table (`QCOW_MAX_L1_SIZE`).
pub const MAX_L1_TABLE_BYTES: u64 = 32 << 20;
/// qemu's limit on internal snapshots (`QCOW_MAX_SNAPSHOTS`).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// qemu's limit on a backing file name (`bdrv_change_backing_file` refuses longer).
pub const MAX_BACKING_FILE_NAME: u64 = 1023;

/// True if `first_bytes` starts with the qcow2 magic.
pub fn probe(first_bytes: &[u8]) -> bool {
    first_bytes.starts_with(&MAGIC.to_be_bytes())
}

#[cfg(test)]
mod write_model_tests;
