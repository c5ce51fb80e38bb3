//! The embedded SQLite store: one database file per home, opened in WAL mode with a busy
//! timeout so that many `cowclone` processes can share it, and migrated to the current schema
//! ([`schema`]) on open. Writers use `BEGIN IMMEDIATE` ([`write`]) so that a transaction takes
//! the write lock before it reads what it will change.

pub mod schema;

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::error::{RegistryError, Result};

/// How long a writer waits for another process's write lock before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(120);

/// Mode of the database and its `-wal` and `-shm` files: private to their owner. (SQLite gives
/// the `-wal` and `-shm` files the database file's mode.)
pub const PRIVATE_FILE: u32 = 0o600;

/// Opens (creating if needed, mode 0600) the database at `path` and brings its schema up to
/// date. A database made by an older cowclone is made private too.
pub fn open(path: &Path) -> Result<Connection> {
    create_private(path)?;
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers never block the writer; a killed writer's uncommitted frames are ignored.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    // NORMAL in WAL mode is safe against process crashes (power loss may drop the last commits;
    // `gc` reconciles records and files either way).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    schema::migrate(&mut conn)?;
    // Older homes: files made before the database was private. Only the mode changes: the
    // -wal and -shm files are SQLite's (never created or opened here: another process may have
    // them mapped).
    for suffix in ["", "-wal", "-shm"] {
        let mut file = path.as_os_str().to_owned();
        file.push(suffix);
        make_private(Path::new(&file))?;
    }
    Ok(conn)
}

/// Creates the database file empty with mode 0600 if it is missing (an empty file is an empty
/// SQLite database), so that it is never readable by others, not even for a moment.
fn create_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(PRIVATE_FILE)
        .open(path)
    {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            Err(RegistryError::io(format!("creating {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// Takes the group and other bits off `path` if it exists and has any.
fn make_private(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(());
    };
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700)).map_err(
            RegistryError::io(format!("making {} private", path.display())),
        )?;
    }
    Ok(())
}

/// Starts a write transaction that holds the database's write lock from its first statement.
pub fn write(conn: &mut Connection) -> Result<Transaction<'_>> {
    Ok(conn.transaction_with_behavior(TransactionBehavior::Immediate)?)
}
