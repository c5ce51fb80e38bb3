//! Guards that hold even for root. A registered base, and a clone that has clones, are read
//! through by other images: writing one silently changes what its clones read. File modes do
//! not stop root, so every cowclone operation that writes an image (commit into a backing file,
//! rebase, resize, check -r, …) asks the registry first, and the registry recognises the file by
//! its (device, inode) — whatever path names it: a symlink, a hard link, a relative backing name.
//!
//! The identity is recorded when a base is registered or a clone is made (schema version 2;
//! rows from before are filled in by stat on open). A file that was replaced since (a new inode
//! at the recorded path) is matched by its path's identity now, too.
//!
//! An explicit override exists ([`Registry::guard_writes`] with `force`): the write goes ahead,
//! and the audit log records it.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use rusqlite::Connection;
use serde::Serialize;
use serde_json::json;

use super::records::{self, ImageRecord, Kind};
use super::Registry;
use crate::audit;
use crate::error::{RegistryError, Result};
use crate::home::Home;
use crate::store;

/// A file's identity: (device, inode) of what `path` names (symlinks followed).
pub fn file_identity(path: &Path) -> std::io::Result<(u64, u64)> {
    let meta = std::fs::metadata(path)?;
    Ok((meta.dev(), meta.ino()))
}

/// Fills in the identity of rows recorded before schema version 2, by stat of their path
/// (rows whose file is gone stay empty). Does nothing, and takes no write lock, when no row
/// lacks one.
pub(crate) fn backfill_identities(conn: &mut Connection) -> Result<()> {
    let missing: i64 = conn.query_row(
        "SELECT count(*) FROM images WHERE dev IS NULL OR ino IS NULL",
        [],
        |r| r.get(0),
    )?;
    if missing == 0 {
        return Ok(());
    }
    let tx = store::write(conn)?;
    {
        let mut select =
            tx.prepare("SELECT id, path FROM images WHERE dev IS NULL OR ino IS NULL")?;
        let rows: Vec<(i64, String)> = select
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let mut update = tx.prepare("UPDATE images SET dev = ?1, ino = ?2 WHERE id = ?3")?;
        for (id, path) in rows {
            if let Ok((dev, ino)) = file_identity(Path::new(&path)) {
                update.execute(rusqlite::params![dev as i64, ino as i64, id])?;
            }
        }
    }
    tx.commit()?;
    Ok(())
}

/// Records the identity of record `id`'s file at `path` (inside the caller's transaction).
pub(crate) fn record_identity(conn: &Connection, id: i64, path: &Path) -> Result<()> {
    let (dev, ino) = file_identity(path).map_err(RegistryError::io(format!(
        "reading metadata of {}",
        path.display()
    )))?;
    conn.execute(
        "UPDATE images SET dev = ?1, ino = ?2 WHERE id = ?3",
        rusqlite::params![dev as i64, ino as i64, id],
    )?;
    Ok(())
}

/// A registered image that must not be written, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Protection {
    /// Its registered name.
    pub name: String,
    /// Its registered path.
    pub path: PathBuf,
    /// Base or clone.
    pub kind: Kind,
    /// The images that read through it directly, by name.
    pub clones: Vec<String>,
}

impl Protection {
    /// `registered base "deb12"` or `clone "web" that has clones (web-a, web-b)`.
    pub fn what(&self) -> String {
        match self.kind {
            Kind::Base => format!("registered base {:?}", self.name),
            Kind::Clone => format!(
                "clone {:?} that has clones ({})",
                self.name,
                self.clones.join(", ")
            ),
        }
    }
}

impl Registry {
    /// Opens the registry of `home` if it has one, creating nothing: `None` when its database
    /// does not exist (then nothing is registered there to protect).
    pub fn open_existing(home: &Home) -> Result<Option<Registry>> {
        let database = home.database();
        match std::fs::symlink_metadata(&database) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(RegistryError::io(format!(
                    "reading metadata of {}",
                    database.display()
                ))(e))
            }
        }
        let root = home
            .root()
            .canonicalize()
            .map_err(RegistryError::io(format!(
                "resolving the home directory {}",
                home.root().display()
            )))?;
        let home = Home::at(root);
        let mut conn = store::open(&home.database())?;
        backfill_identities(&mut conn)?;
        Ok(Some(Registry { conn, home }))
    }

    /// The registered image that the file at `path` is (by device and inode), if it must not
    /// be written: a base, or a clone that has clones. `None` for a file that does not exist.
    pub fn protection(&self, path: &Path) -> Result<Option<Protection>> {
        let Ok(identity) = file_identity(path) else {
            return Ok(None);
        };
        let (dev, ino) = (identity.0 as i64, identity.1 as i64);
        let mut stmt = self.conn.prepare(&format!(
            "{} WHERE (i.dev = ?1 AND i.ino = ?2) OR i.kind = 'base' OR i.guarded = 1 \
             OR EXISTS (SELECT 1 FROM images c WHERE c.parent_id = i.id)",
            records::SELECT
        ))?;
        let candidates: Vec<ImageRecord> = stmt
            .query_map(rusqlite::params![dev, ino], records::from_row)?
            .collect::<rusqlite::Result<_>>()?;
        for record in candidates {
            let same = record.identity == Some(identity)
                || file_identity(&record.path).is_ok_and(|now| now == identity);
            if !same {
                continue;
            }
            let clones = records::children(&self.conn, record.id)?;
            if record.kind == Kind::Base || record.guarded || !clones.is_empty() {
                return Ok(Some(Protection {
                    name: record.name,
                    path: record.path,
                    kind: record.kind,
                    clones,
                }));
            }
        }
        Ok(None)
    }

    /// Refuses `operation` (e.g. `commit`) if it would write a protected image among `paths`
    /// (see [`Registry::protection`]); the refusal goes to the audit log. With `force`, the
    /// write is allowed and recorded in the audit log as forced; the protections overridden are
    /// returned so that the caller can warn loudly.
    pub fn guard_writes(
        &mut self,
        operation: &str,
        paths: &[PathBuf],
        force: bool,
    ) -> Result<Vec<Protection>> {
        let mut found = Vec::new();
        for path in paths {
            if let Some(protection) = self.protection(path)? {
                found.push((path.clone(), protection));
            }
        }
        if found.is_empty() {
            return Ok(Vec::new());
        }
        let arguments = json!({
            "operation": operation,
            "paths": paths,
            "force-registered-write": force,
        });
        let described: Vec<String> = found
            .iter()
            .map(|(path, p)| format!("{} ({})", path.display(), p.what()))
            .collect();
        if force {
            let detail = format!(
                "FORCED: {operation} writes {} despite the guard",
                described.join(", ")
            );
            audit::record(&self.conn, "forced-write", &arguments, Ok(&detail))?;
            return Ok(found.into_iter().map(|(_, p)| p).collect());
        }
        let (path, protection) = found.swap_remove(0);
        let error = RegistryError::WriteProtected {
            operation: operation.to_owned(),
            path,
            what: protection.what(),
        };
        let _ = audit::record(
            &self.conn,
            "write-refused",
            &arguments,
            Err(&error.to_string()),
        );
        Err(error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CloneSpec, RegisterBase};

    fn base(dir: &Path) -> PathBuf {
        let disk = dir.join("b.qcow2");
        imagefmt::Qcow2Builder::new(&disk)
            .size(1 << 20)
            .create()
            .unwrap();
        disk
    }

    #[test]
    fn bases_and_clones_with_clones_are_found_by_inode_under_any_name() {
        let dir = tempfile::tempdir().unwrap();
        let disk = base(dir.path());
        let mut registry = Registry::open(&Home::at(dir.path().join("h"))).unwrap();
        registry
            .register_base(&RegisterBase::new("b", &disk))
            .unwrap();
        registry.clone_images(&CloneSpec::new("b", "c")).unwrap();
        let clone = registry.get("c").unwrap().path;
        // A hard link is another name for the base's inode.
        let link = dir.path().join("other-name");
        std::fs::hard_link(&disk, &link).unwrap();
        let found = registry.protection(&link).unwrap().unwrap();
        assert_eq!((found.name.as_str(), found.kind), ("b", Kind::Base));
        assert_eq!(found.clones, ["c"]);
        // A writable clone is not protected, until it has clones.
        assert_eq!(registry.protection(&clone).unwrap(), None);
        registry.clone_images(&CloneSpec::new("c", "d")).unwrap();
        let found = registry.protection(&clone).unwrap().unwrap();
        assert!(found.what().contains("has clones (d)"), "{}", found.what());
        // Refused, and logged; forced, and logged.
        let e = registry
            .guard_writes("resize", std::slice::from_ref(&link), false)
            .unwrap_err();
        assert!(matches!(e, RegistryError::WriteProtected { .. }), "{e}");
        let forced = registry
            .guard_writes("resize", std::slice::from_ref(&link), true)
            .unwrap();
        assert_eq!(forced.len(), 1);
        let log = registry.audit_log().unwrap();
        let ops: Vec<(&str, &str)> = log
            .iter()
            .rev()
            .take(2)
            .map(|e| (e.operation.as_str(), e.outcome.as_str()))
            .collect();
        assert_eq!(ops, [("forced-write", "ok"), ("write-refused", "error")]);
        // Unrelated files and missing files are not protected.
        assert_eq!(registry.protection(&dir.path().join("nope")).unwrap(), None);
        let other = dir.path().join("other.qcow2");
        std::fs::write(&other, b"x").unwrap();
        assert_eq!(registry.protection(&other).unwrap(), None);
    }

    #[test]
    fn rows_from_schema_1_get_their_identity_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let disk = base(dir.path());
        let home = Home::at(dir.path().join("h"));
        std::fs::create_dir_all(home.root()).unwrap();
        {
            // A database as version 1 wrote it, with one base.
            let conn = Connection::open(home.database()).unwrap();
            conn.execute_batch(store::schema::MIGRATIONS[0]).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO images (name, kind, path, format, virtual_size, owned, guarded, \
                 created_ns) VALUES ('old', 'base', ?1, 'qcow2', 1048576, 0, 1, 0)",
                [disk.to_str().unwrap()],
            )
            .unwrap();
        }
        assert!(Registry::open_existing(&Home::at(dir.path().join("none")))
            .unwrap()
            .is_none());
        let registry = Registry::open_existing(&home).unwrap().unwrap();
        let record = registry.get("old").unwrap();
        assert_eq!(record.identity, Some(file_identity(&disk).unwrap()));
        assert_eq!(registry.protection(&disk).unwrap().unwrap().name, "old");
    }
}
