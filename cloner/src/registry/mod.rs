//! [`Registry`]: the base and clone records of one [`Home`], kept in its SQLite store.
//!
//! Bases and clones share one table and one namespace (a clone can be cloned, and promoted to a
//! base). The operations live one per file: [`bases`] (register, verify, remove, promote),
//! [`clones`] (clone, remove), [`gc`] (reconcile files and records), [`resolver`] (VDI parents by
//! UUID from the registry), [`records`] (queries and the record types).
//!
//! ```text
//!   base "deb12" (read-only, fingerprinted) ◄── clone "web-1" (qcow2 overlay, writable)
//!                                          ◄── clone "web-2" ◄── clone "web-2a"
//!                                               (guarded: read-only while it has clones)
//! ```
//!
//! Library use (what the hypervisor drivers do):
//!
//! ```
//! use cloner::{Home, Registry, RegisterBase, CloneSpec};
//! # let dir = tempfile::tempdir()?;
//! # let disk = dir.path().join("deb12.qcow2");
//! # imagefmt::Qcow2Builder::new(&disk).size(1 << 30).create()?;
//! let mut registry = Registry::open(&Home::at(dir.path().join("home")))?;
//! registry.register_base(&RegisterBase { memory: Some(2 << 30), cpus: Some(2), ..RegisterBase::new("deb12", &disk) })?;
//! registry.clone_images(&CloneSpec::new("deb12", "web"))?;
//! let vm = registry.clone_record("web")?;
//! assert_eq!(vm.chain[0].name, "deb12");      // nearest first
//! assert_eq!(vm.memory, Some(2 << 30));        // from the base
//! assert!(vm.image.starts_with(vm.dir.as_ref().unwrap()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod bases;
pub mod clones;
pub mod gc;
mod guard;
pub mod hosts;
pub mod made;
pub mod protect;
pub mod records;
pub mod resolver;

use rusqlite::{Connection, Transaction};
use serde_json::Value;

use crate::audit::{self, AuditEntry};
use crate::error::{RegistryError, Result};
use crate::home::Home;
use crate::store;
pub use records::{ChainLink, CloneRecord, FileState, ImageRecord, Kind, VdiIds};

/// An open registry: one SQLite connection to the home's database.
#[derive(Debug)]
pub struct Registry {
    conn: Connection,
    home: Home,
}

/// Longest registry name (names become directory names).
pub const MAX_NAME_LEN: usize = 64;

/// Checks that `name` can be a registry name and a directory name: 1–64 ASCII letters, digits,
/// `.`, `_` or `-`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidName {
            name: name.to_owned(),
        })
    }
}

impl Registry {
    /// Opens the registry of `home`, creating its directories and database if needed.
    pub fn open(home: &Home) -> Result<Registry> {
        let mut home = home.clone();
        home.ensure()?;
        let mut conn = store::open(&home.database())?;
        protect::backfill_identities(&mut conn)?;
        Ok(Registry { conn, home })
    }

    /// The home directory this registry lives in (absolute).
    pub fn home(&self) -> &Home {
        &self.home
    }

    /// The base or clone called `name`.
    pub fn get(&self, name: &str) -> Result<ImageRecord> {
        records::get(&self.conn, name)
    }

    /// Every record of `kind` (all if `None`), by name.
    pub fn list(&self, kind: Option<Kind>) -> Result<Vec<ImageRecord>> {
        records::list(&self.conn, kind)
    }

    /// What a hypervisor driver needs to run the clone (or base) called `name`: its image, its
    /// backing chain (nearest first), its own directory, and memory/CPUs from the nearest
    /// ancestor that sets them.
    pub fn clone_record(&self, name: &str) -> Result<CloneRecord> {
        let record = records::get(&self.conn, name)?;
        let ancestors = records::ancestors(&self.conn, &record)?;
        Ok(CloneRecord::new(record, ancestors))
    }

    /// The audit log, oldest first.
    pub fn audit_log(&self) -> Result<Vec<AuditEntry>> {
        audit::entries(&self.conn)
    }

    /// Runs `work` in a write transaction and logs it: on success the audit record is written
    /// in the same transaction; on failure the transaction is rolled back and the refusal is
    /// logged on its own.
    fn audited<T>(
        &mut self,
        operation: &str,
        arguments: Value,
        work: impl FnOnce(&Transaction<'_>, &Home) -> Result<(T, String)>,
    ) -> Result<T> {
        let home = &self.home;
        let conn = &mut self.conn;
        let outcome = (|| {
            let tx = store::write(conn)?;
            let (value, detail) = work(&tx, home)?;
            audit::record(&tx, operation, &arguments, Ok(&detail))?;
            tx.commit()?;
            Ok(value)
        })();
        if let Err(e) = &outcome {
            // Best effort: a log failure must not hide the operation's own error.
            let _ = audit::record(&self.conn, operation, &arguments, Err(&error_chain(e)));
        }
        outcome
    }
}

/// An error and its causes on one line.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut line = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        line.push_str(": ");
        line.push_str(&cause.to_string());
        source = cause.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_directory_safe() {
        for good in ["a", "web-1", "deb12.golden", "A_b"] {
            validate_name(good).unwrap();
        }
        let long = "x".repeat(MAX_NAME_LEN + 1);
        for bad in ["", ".hidden", "-x", "a/b", "..", "a b", "é", long.as_str()] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
