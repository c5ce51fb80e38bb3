//! `gc`: reconcile files and records. Under the write lock (so no clone is half-made), it
//! removes clone directories no record claims (leftovers of a killed `clone`, or of an `rm`
//! killed after its commit) and stale temporary files, and reports records whose file is gone.
//!
//! Only directories that look like cowclone's own are removed: every entry must be a clone
//! image (`disk.qcow2`, `disk.vdi`, a reflink's `disk.raw`) or a temporary file; anything else is
//! reported and kept.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use imagefmt::new_file::TEMP_SUFFIX;
use serde::Serialize;
use serde_json::json;

use super::records;
use super::Registry;
use crate::error::{RegistryError, Result};

/// File names a clone directory holds when cowclone alone wrote it.
const OWN_FILES: &[&str] = &["disk.qcow2", "disk.vdi", "disk.raw"];

/// What [`Registry::gc`] did and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct GcReport {
    /// Clone directories without a record, removed.
    pub removed_orphans: Vec<PathBuf>,
    /// Temporary files of interrupted creates, removed.
    pub removed_temp_files: Vec<PathBuf>,
    /// Directories without a record that hold files cowclone did not write: kept.
    pub kept_unknown: Vec<PathBuf>,
    /// Records whose image file is gone: `(name, path)`; `cowclone rm` drops such a clone.
    pub missing_files: Vec<(String, PathBuf)>,
}

impl Registry {
    /// Reconciles files and records (see the module docs).
    pub fn gc(&mut self) -> Result<GcReport> {
        self.audited("gc", json!({}), |tx, home| {
            let mut places = vec![home.clones_dir()];
            let mut stmt = tx.prepare("SELECT dir FROM places ORDER BY dir")?;
            for dir in stmt.query_map([], |r| r.get::<_, String>(0))? {
                places.push(PathBuf::from(dir?));
            }
            let all = records::list(tx, None)?;
            let claimed: HashSet<&Path> = all.iter().filter_map(|r| r.dir.as_deref()).collect();
            let mut report = GcReport::default();
            for place in &places {
                sweep_place(place, &claimed, &mut report)?;
            }
            for record in &all {
                if !record.path.exists() {
                    report
                        .missing_files
                        .push((record.name.clone(), record.path.clone()));
                }
            }
            let detail = format!(
                "removed {} orphan dir(s), {} temp file(s); kept {} unknown dir(s); {} record(s) without file",
                report.removed_orphans.len(),
                report.removed_temp_files.len(),
                report.kept_unknown.len(),
                report.missing_files.len()
            );
            Ok((report, detail))
        })
    }
}

fn is_temp(name: &str) -> bool {
    name.ends_with(TEMP_SUFFIX)
}

fn entries(dir: &Path) -> Result<Vec<(String, PathBuf, bool)>> {
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RegistryError::io(format!("listing {}", dir.display()))(e)),
    };
    let mut found = Vec::new();
    for entry in listing {
        let entry = entry.map_err(RegistryError::io(format!("listing {}", dir.display())))?;
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        found.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
            is_dir,
        ));
    }
    found.sort();
    Ok(found)
}

fn remove(path: &Path, dir: bool) -> Result<()> {
    let result = if dir {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
    match result {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(RegistryError::io(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

fn sweep_place(place: &Path, claimed: &HashSet<&Path>, report: &mut GcReport) -> Result<()> {
    for (name, path, is_dir) in entries(place)? {
        if !is_dir {
            if is_temp(&name) {
                remove(&path, false)?;
                report.removed_temp_files.push(path);
            }
            continue;
        }
        let inside = entries(&path)?;
        if claimed.contains(path.as_path()) {
            for (name, file, is_dir) in inside {
                if !is_dir && is_temp(&name) {
                    remove(&file, false)?;
                    report.removed_temp_files.push(file);
                }
            }
        } else if inside.iter().all(|(name, _, is_dir)| {
            !is_dir && (OWN_FILES.contains(&name.as_str()) || is_temp(name))
        }) {
            remove(&path, true)?;
            report.removed_orphans.push(path);
        } else {
            report.kept_unknown.push(path);
        }
    }
    Ok(())
}
