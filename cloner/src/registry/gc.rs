//! `gc`: reconcile files and records. Under the write lock (so no clone is half-made), it
//! removes what cowclone made and no record claims any more — leftovers of a killed `clone`, or
//! of an `rm` killed after its commit — and reports records whose file is gone.
//!
//! Only what cowclone made is removed ([`super::made`]): in each place clones are made in (the
//! home's `clones/` and every `clone --dir`), an unclaimed directory goes only if it holds this
//! home's marker and nothing but cowclone's own files; a temporary directory or file goes by its
//! cowclone-only name. Everything else is kept and reported with the reason. `--dry-run`
//! reports the same without removing anything.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::json;

use super::made::{self, foreign_entries, is_temp, made_by};
use super::records;
use super::Registry;
use crate::error::Result;

/// One path `gc` removed (or would remove), or kept, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcItem {
    /// The path.
    pub path: PathBuf,
    /// Why it goes or stays.
    pub reason: String,
}

/// A record whose image file is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct MissingFile {
    /// The record's name (`cowclone rm NAME` drops a clone's record).
    pub name: String,
    /// Where its file was.
    pub path: PathBuf,
}

/// What [`Registry::gc`] did (or, in a dry run, would do) and found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct GcReport {
    /// True if nothing was removed: `removed` lists what would go.
    pub dry_run: bool,
    /// Paths removed (would be removed, in a dry run).
    pub removed: Vec<GcItem>,
    /// Paths seen and kept: not made by cowclone, or holding files it did not make.
    pub kept: Vec<GcItem>,
    /// Records whose image file is gone.
    pub missing_files: Vec<MissingFile>,
}

impl Registry {
    /// Reconciles files and records (see the module docs); with `dry_run`, removes nothing.
    pub fn gc(&mut self, dry_run: bool) -> Result<GcReport> {
        self.audited("gc", json!({ "dry-run": dry_run }), |tx, home| {
            let mut places = vec![home.clones_dir()];
            let mut stmt = tx.prepare("SELECT dir FROM places ORDER BY dir")?;
            for dir in stmt.query_map([], |r| r.get::<_, String>(0))? {
                places.push(PathBuf::from(dir?));
            }
            let all = records::list(tx, None)?;
            let claimed: HashSet<&Path> = all.iter().filter_map(|r| r.dir.as_deref()).collect();
            let mut sweep = Sweep {
                home: home.root(),
                claimed: &claimed,
                dry_run,
                report: GcReport {
                    dry_run,
                    ..GcReport::default()
                },
            };
            for place in &places {
                sweep.place(place)?;
            }
            let mut report = sweep.report;
            for record in &all {
                if !record.path.exists() {
                    report.missing_files.push(MissingFile {
                        name: record.name.clone(),
                        path: record.path.clone(),
                    });
                }
            }
            let detail = format!(
                "{} {} path(s); kept {}; {} record(s) without file",
                if dry_run { "would remove" } else { "removed" },
                report.removed.len(),
                report.kept.len(),
                report.missing_files.len()
            );
            Ok((report, detail))
        })
    }
}

/// One gc pass over the places.
struct Sweep<'a> {
    home: &'a Path,
    claimed: &'a HashSet<&'a Path>,
    dry_run: bool,
    report: GcReport,
}

impl Sweep<'_> {
    fn remove(&mut self, path: PathBuf, dir: bool, reason: &str) -> Result<()> {
        if !self.dry_run {
            if dir {
                let left = made::remove_dir(&path)?;
                if !left.foreign.is_empty() {
                    // Something appeared since it was looked at: it stays.
                    return self.keep(path, format!("holds {}", left.foreign.join(", ")));
                }
            } else {
                made::remove_file(&path)?;
            }
        }
        self.report.removed.push(GcItem {
            path,
            reason: reason.to_owned(),
        });
        Ok(())
    }

    fn keep(&mut self, path: PathBuf, reason: String) -> Result<()> {
        self.report.kept.push(GcItem { path, reason });
        Ok(())
    }

    fn place(&mut self, place: &Path) -> Result<()> {
        for (name, is_dir) in made::entries(place)? {
            let path = place.join(&name);
            if !is_dir {
                if is_temp(&name) {
                    self.remove(path, false, "temporary file of an interrupted create")?;
                } else {
                    self.keep(path, "not a directory cowclone made".into())?;
                }
                continue;
            }
            if self.claimed.contains(path.as_path()) {
                // A registered image's directory: only stale temporary files go.
                for (inner, inner_dir) in made::entries(&path)? {
                    if !inner_dir && is_temp(&inner) {
                        self.remove(
                            path.join(inner),
                            false,
                            "temporary file of an interrupted create",
                        )?;
                    }
                }
                continue;
            }
            let foreign = foreign_entries(&path)?;
            let ours = made_by(&path, self.home);
            let temp_dir = is_temp(&name);
            if !foreign.is_empty() {
                let reason = format!(
                    "no record claims it, but it holds files cowclone did not make: {}",
                    foreign.join(", ")
                );
                self.keep(path, reason)?;
            } else if ours {
                self.remove(
                    path,
                    true,
                    "made by this registry (marker), claimed by no record: left by an interrupted clone or rm",
                )?;
            } else if temp_dir {
                // cowclone's temporary name, and at most cowclone's files in it: a clone killed
                // before its directory was complete.
                self.remove(path, true, "temporary directory of an interrupted clone")?;
            } else {
                self.keep(
                    path,
                    "no record claims it, and it has no marker of this registry: cowclone did not make it".into(),
                )?;
            }
        }
        Ok(())
    }
}
