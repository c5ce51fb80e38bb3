//! `snapshot` on an image file: the qcow2 image opened for writing under qemu's locks, its
//! backing chain never opened (snapshot operations read no guest data), then one operation of
//! [`crate::qcow2::snapshot_ops`]. What `cowclone snapshot -c` and `provision --snapshot` share.

use std::fs::File;
use std::path::Path;

use crate::backing::BackingPolicy;
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::snapshot::Snapshot;
use crate::qcow2::write::WriteOptions;
use crate::Result;

/// Opens the qcow2 image at `path` for snapshot operations (write locks held; no backing file
/// opened).
pub fn open(path: &Path) -> Result<Qcow2Image<File>> {
    let file = crate::open::open_image(path, crate::open::OpenHow::write())?;
    open_file(file, path)
}

/// [`open`] for a qcow2 image `file` already opened for writing (its locks held) at `path`. An
/// image with an external data file is opened without it (its tables alone): taking or
/// applying a snapshot of it is then refused, as qemu refuses internal snapshots of it.
pub fn open_file(file: File, path: &Path) -> Result<Qcow2Image<File>> {
    let cluster = crate::qcow2::HeaderCluster::read_from(&file)?;
    if cluster
        .header
        .incompatible_features
        .contains(crate::qcow2::features::IncompatibleFeatures::EXTERNAL_DATA_FILE)
    {
        return Qcow2Image::open_rw_tables_only(file, cluster, WriteOptions::default());
    }
    let chain = crate::chain::ChainOptions::new(&BackingPolicy::Detach);
    crate::chain::qcow2_rw_from_file(file, path, &chain, WriteOptions::default())
}

/// Takes internal snapshot `name` of the qcow2 image at `path` now, and makes it durable.
pub fn create(path: &Path, name: &str) -> Result<Snapshot> {
    let mut image = open(path)?;
    let snapshot = image.create_snapshot(name, now())?;
    image.flush()?;
    Ok(snapshot)
}

/// The wall clock as qemu-img records it in a snapshot: seconds since the epoch, and the
/// microseconds as nanoseconds.
pub fn now() -> (u32, u32) {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (since.as_secs() as u32, since.subsec_micros() * 1000)
}
