//! The audit log: every change to the registry (register, clone, rm, promote, gc, …) is recorded
//! with its time, operation, arguments (JSON) and outcome. A successful change is logged in the
//! same transaction as the change itself; a refused one in a transaction of its own.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::Connection;
use serde::Serialize;
use serde_json::Value;

use crate::error::Result;

/// One audit record.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct AuditEntry {
    /// Sequence number (increasing).
    pub id: i64,
    /// When, as RFC 3339 UTC with milliseconds.
    pub time: String,
    /// When, in nanoseconds since the Unix epoch.
    pub at_ns: i64,
    /// The operation (`base-register`, `clone`, `rm`, `promote`, `gc`, …).
    pub operation: String,
    /// The operation's arguments.
    pub arguments: Value,
    /// `ok` or `error`.
    pub outcome: String,
    /// What happened (the error message, or a summary).
    pub detail: String,
}

/// Nanoseconds since the Unix epoch, now.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// Appends one record (inside the caller's transaction, if any).
pub fn record(
    conn: &Connection,
    operation: &str,
    arguments: &Value,
    outcome: Result<&str, &str>,
) -> Result<()> {
    let (outcome, detail) = match outcome {
        Ok(detail) => ("ok", detail),
        Err(detail) => ("error", detail),
    };
    conn.execute(
        "INSERT INTO audit (at_ns, operation, arguments, outcome, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![now_ns(), operation, arguments.to_string(), outcome, detail],
    )?;
    Ok(())
}

/// Every record, oldest first.
pub fn entries(conn: &Connection) -> Result<Vec<AuditEntry>> {
    let mut stmt = conn.prepare(
        "SELECT id, at_ns, operation, arguments, outcome, detail FROM audit ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        let at_ns: i64 = r.get(1)?;
        let arguments: String = r.get(3)?;
        Ok(AuditEntry {
            id: r.get(0)?,
            time: rfc3339(at_ns),
            at_ns,
            operation: r.get(2)?,
            arguments: serde_json::from_str(&arguments).unwrap_or(Value::String(arguments)),
            outcome: r.get(4)?,
            detail: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// `at_ns` as RFC 3339 UTC with milliseconds.
pub fn rfc3339(at_ns: i64) -> String {
    let time = UNIX_EPOCH + Duration::from_nanos(at_ns.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}
