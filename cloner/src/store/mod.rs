//! The embedded SQLite store: one database file per home, opened in WAL mode with a busy
//! timeout so that many `cowclone` processes can share it, and migrated to the current schema
//! ([`schema`]) on open. Writers use `BEGIN IMMEDIATE` ([`write`]) so that a transaction takes
//! the write lock before it reads what it will change.

pub mod schema;

use std::path::Path;
use std::time::Duration;

use rusqlite::{Connection, Transaction, TransactionBehavior};

use crate::error::Result;

/// How long a writer waits for another process's write lock before giving up.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(120);

/// Opens (creating if needed) the database at `path` and brings its schema up to date.
pub fn open(path: &Path) -> Result<Connection> {
    let mut conn = Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // WAL: readers never block the writer; a killed writer's uncommitted frames are ignored.
    let _mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))?;
    // NORMAL in WAL mode is safe against process crashes (power loss may drop the last commits;
    // `gc` reconciles records and files either way).
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    schema::migrate(&mut conn)?;
    Ok(conn)
}

/// Starts a write transaction that holds the database's write lock from its first statement.
pub fn write(conn: &mut Connection) -> Result<Transaction<'_>> {
    Ok(conn.transaction_with_behavior(TransactionBehavior::Immediate)?)
}
