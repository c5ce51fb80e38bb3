//! The schema, versioned with `PRAGMA user_version`: [`MIGRATIONS`]`[i]` takes a database from
//! version `i` to `i + 1`. Migrations run in one `BEGIN IMMEDIATE` transaction, so concurrent
//! first opens apply each exactly once. A database newer than this build is refused.

use rusqlite::Connection;

use crate::error::{RegistryError, Result};

/// Ordered migrations; append, never edit.
pub const MIGRATIONS: &[&str] = &[
    // 1: images (bases and clones share one namespace), places clones are made in, audit log.
    r#"
    CREATE TABLE images (
        id              INTEGER PRIMARY KEY,
        name            TEXT NOT NULL UNIQUE,
        kind            TEXT NOT NULL CHECK (kind IN ('base', 'clone')),
        path            TEXT NOT NULL UNIQUE,
        format          TEXT NOT NULL,
        virtual_size    INTEGER NOT NULL,
        parent_id       INTEGER REFERENCES images(id),
        dir             TEXT UNIQUE,
        owned           INTEGER NOT NULL,
        guarded         INTEGER NOT NULL DEFAULT 0,
        fp_size         INTEGER,
        fp_mtime_ns     INTEGER,
        fp_crc32        INTEGER,
        sha256          TEXT,
        original_mode   INTEGER,
        vdi_uuid_create TEXT,
        vdi_uuid_modify TEXT,
        vdi_uuid_link   TEXT,
        memory          INTEGER,
        cpus            INTEGER,
        meta            TEXT NOT NULL DEFAULT '{}',
        created_ns      INTEGER NOT NULL
    );
    CREATE INDEX images_parent ON images(parent_id);
    CREATE INDEX images_vdi ON images(vdi_uuid_create);
    CREATE TABLE places (
        dir TEXT PRIMARY KEY
    );
    CREATE TABLE audit (
        id         INTEGER PRIMARY KEY,
        at_ns      INTEGER NOT NULL,
        operation  TEXT NOT NULL,
        arguments  TEXT NOT NULL,
        outcome    TEXT NOT NULL CHECK (outcome IN ('ok', 'error')),
        detail     TEXT NOT NULL
    );
    "#,
    // 2: the file identity (device, inode) of each image, so that a write through any path to a
    // registered base is recognised. Old rows are filled in by stat on open
    // (`registry::protect::backfill_identities`).
    r#"
    ALTER TABLE images ADD COLUMN dev INTEGER;
    ALTER TABLE images ADD COLUMN ino INTEGER;
    CREATE INDEX images_identity ON images(dev, ino);
    "#,
    // 3: libvirt hosts (`cowclone host add`), the replicas of bases uploaded to them, and the
    // clones living there. A replica or clone row is `pending` while its owner (a process token,
    // `remote::owner_token`) uploads it, `ready` once verified; a pending row whose owner died
    // is taken over (replica) or removed by `gc` (clone).
    r#"
    CREATE TABLE hosts (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        uri         TEXT NOT NULL,
        pool        TEXT NOT NULL,
        pool_dir    TEXT NOT NULL,
        created_ns  INTEGER NOT NULL
    );
    CREATE TABLE replicas (
        id          INTEGER PRIMARY KEY,
        base_id     INTEGER NOT NULL REFERENCES images(id),
        host_id     INTEGER NOT NULL REFERENCES hosts(id),
        volume      TEXT NOT NULL,
        path        TEXT,
        sha256      TEXT,
        size        INTEGER,
        state       TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
        owner       TEXT,
        created_ns  INTEGER NOT NULL,
        UNIQUE (base_id, host_id),
        UNIQUE (host_id, volume)
    );
    CREATE TABLE remote_clones (
        id          INTEGER PRIMARY KEY,
        name        TEXT NOT NULL UNIQUE,
        host_id     INTEGER NOT NULL REFERENCES hosts(id),
        replica_id  INTEGER NOT NULL REFERENCES replicas(id),
        volume      TEXT NOT NULL,
        path        TEXT,
        virtual_size INTEGER NOT NULL,
        state       TEXT NOT NULL CHECK (state IN ('pending', 'ready')),
        owner       TEXT,
        created_ns  INTEGER NOT NULL,
        UNIQUE (host_id, volume)
    );
    "#,
];

/// The schema version this build writes.
pub fn current_version() -> i64 {
    MIGRATIONS.len() as i64
}

/// Applies the migrations the database lacks.
pub fn migrate(conn: &mut Connection) -> Result<()> {
    let version: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version == current_version() {
        return Ok(());
    }
    let tx = super::write(conn)?;
    // Read again under the write lock: another process may have migrated meanwhile.
    let version: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    if version > current_version() {
        return Err(RegistryError::SchemaTooNew {
            found: version,
            known: current_version(),
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(version.max(0) as usize) {
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
    }
    tx.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrates_once_and_refuses_newer_databases() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let conn = crate::store::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, current_version());
        drop(conn);
        // Reopening does not re-run migration 1 (which would fail: tables exist).
        let conn = crate::store::open(&path).unwrap();
        conn.pragma_update(None, "user_version", current_version() + 1)
            .unwrap();
        drop(conn);
        assert!(matches!(
            crate::store::open(&path),
            Err(RegistryError::SchemaTooNew { .. })
        ));
    }
}
