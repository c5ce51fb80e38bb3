//! Reading an image as it was at one of its internal snapshots (qemu's
//! `bdrv_snapshot_load_tmp`, what `qemu-img convert -l` and `-s` use): the open image's active
//! L1 table is swapped, in memory only, for the snapshot's, and every read and block status of
//! that [`Qcow2Image`] then answers through the snapshot's tables. Nothing is written; the
//! image's virtual size and backing file stay the current ones, as in qemu.
//!
//! ```text
//! SnapshotKey ─► snapshot table entry ─► its L1 table (validated) ─► Qcow2Image::l1 (read-only)
//! ```

use super::image::Qcow2Image;
use super::snapshot::{self, Snapshot, SnapshotError};
use crate::io::Backend;
use crate::Result;

/// Which snapshot to read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotKey {
    /// qemu-img's `-l NAME` / `-s NAME`: the snapshot whose id is the text, else the one whose
    /// name is.
    IdOrName(String),
    /// qemu-img's `-l snapshot.id=ID,snapshot.name=NAME`: the snapshot matching every part
    /// given (id and name both, when both are given).
    Exact {
        /// The id to match.
        id: Option<String>,
        /// The name to match.
        name: Option<String>,
    },
}

impl SnapshotKey {
    /// The index in `table` of the snapshot this key names, as qemu finds it.
    pub fn find(&self, table: &[Snapshot]) -> Option<usize> {
        match self {
            SnapshotKey::IdOrName(key) => snapshot::find_by_id_or_name(table, key),
            SnapshotKey::Exact {
                id: None,
                name: None,
            } => None,
            SnapshotKey::Exact { id, name } => table.iter().position(|sn| {
                id.as_ref().is_none_or(|id| sn.id == id.as_bytes())
                    && name.as_ref().is_none_or(|name| sn.name == name.as_bytes())
            }),
        }
    }

    /// The key as a user would name it (for messages).
    pub fn describe(&self) -> String {
        match self {
            SnapshotKey::IdOrName(key) => key.clone(),
            SnapshotKey::Exact { id, name } => {
                let parts: Vec<String> = [("id", id), ("name", name)]
                    .into_iter()
                    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
                    .collect();
                parts.join(",")
            }
        }
    }
}

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// Makes this image, opened for reading, read as it was at the snapshot `key` names: its
    /// L1 table is replaced in memory by the snapshot's (checked as qemu's
    /// `qcow2_validate_table` checks it). Refused for an image open for writing. Returns the
    /// snapshot.
    pub fn view_snapshot(&mut self, key: &SnapshotKey) -> Result<Snapshot> {
        if self.writer.is_some() {
            return Err(crate::Error::InvalidParameter {
                name: "snapshot",
                reason: "an image open for writing cannot be read at a snapshot",
            });
        }
        let table = &self.snapshots.entries;
        let sn =
            key.find(table)
                .map(|i| table[i].clone())
                .ok_or_else(|| SnapshotError::NotFound {
                    name: key.describe(),
                })?;
        self.l1 = self.read_snapshot_l1(&sn)?;
        self.l2_cache
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        Ok(sn)
    }
}
