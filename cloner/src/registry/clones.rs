//! Making clones (native overlays registered in the same transaction as their files appear) and
//! removing them.
//!
//! ## Crash safety: the order of a clone
//!
//! 1. If the clones go to a directory other than the home's, that directory is recorded in
//!    `places` first (its own transaction), so `gc` knows where to look for leftovers.
//! 2. `BEGIN IMMEDIATE`: the write lock is held from here to the commit, so no other writer
//!    (and no `gc`) runs while files appear.
//! 3. The source and every guarded image below it are checked against their fingerprints; a
//!    clone source is guarded (made read-only, fingerprinted) if it was not yet.
//! 4. Per clone: `mkdir PLACE/NAME`, the image is written to an anonymous file and linked as
//!    `PLACE/NAME/disk.qcow2` (or `disk.vdi`; a reflink's extents are cloned into it, as
//!    `disk.raw` or `disk.qcow2`) — complete or absent, never partial — and its
//!    row is inserted.
//! 5. `COMMIT`: the rows (and the audit record) become visible together.
//!
//! A process killed before step 5 leaves no rows, and at most directories holding complete
//! images (or nothing): `gc`, which takes the same write lock, removes any such directory that
//! no record claims. A process killed after step 5 leaves complete, registered clones. On an
//! ordinary error the process removes what it made before rolling back.
//!
//! Removal deletes the rows (commit), then the files: a crash in between leaves directories
//! without records, which `gc` removes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use imagefmt::new_file::NewFileMode;
use imagefmt::{ImageFormat, Qcow2Builder};
use rusqlite::Transaction;
use serde::Serialize;
use serde_json::json;

use super::guard::{check_unchanged, guard, release};
use super::records::{self, path_text, ImageRecord, Kind};
use super::{validate_name, Registry};
use crate::audit::now_ns;
use crate::error::{RegistryError, Result};
use crate::reflink::{self, CloneMethod};

/// Most clones one call makes.
pub const MAX_COUNT: u64 = 100_000;
/// Environment variable naming a fault-injection point for crash tests: `POINT:INDEX` makes the
/// process kill itself with SIGKILL at `POINT` of clone number `INDEX` (0-based). Points:
/// `before-create`, `after-create` (file linked, row inserted, not committed), `after-commit`.
pub const CRASH_ENV: &str = "COWCLONE_CRASH_AT";

/// What `clone` makes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneSpec {
    /// The registered base or clone to clone.
    pub source: String,
    /// The clone's name; with `count`, the prefix of `NAME-1` … `NAME-N`.
    pub name: String,
    /// Make this many clones.
    pub count: Option<u64>,
    /// Directory to make the clones' directories in (default: the home's `clones/`).
    pub dir: Option<PathBuf>,
    /// Clone format; default qcow2, except VDI for a VDI differencing source.
    pub format: Option<ImageFormat>,
    /// fsync each image and its directory before the commit.
    pub durable: bool,
    /// Overlay (default), reflink copy, or reflink where the filesystem can ([`crate::reflink`]).
    pub method: CloneMethod,
}

impl CloneSpec {
    /// One clone `name` of `source`, with the defaults.
    pub fn new(source: &str, name: &str) -> CloneSpec {
        CloneSpec {
            source: source.to_owned(),
            name: name.to_owned(),
            count: None,
            dir: None,
            format: None,
            durable: false,
            method: CloneMethod::Overlay,
        }
    }

    /// The names this spec makes.
    pub fn names(&self) -> Result<Vec<String>> {
        match self.count {
            None => Ok(vec![self.name.clone()]),
            Some(count) if (1..=MAX_COUNT).contains(&count) => {
                Ok((1..=count).map(|i| format!("{}-{i}", self.name)).collect())
            }
            Some(count) => Err(RegistryError::InvalidCount {
                count,
                max: MAX_COUNT,
            }),
        }
    }
}

/// What [`Registry::clone_images`] made.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Cloned {
    /// The new clones, in name order of creation.
    pub clones: Vec<ImageRecord>,
    /// How they were made: `overlay` or `reflink` (what `auto` came to).
    pub method: CloneMethod,
    /// Time from the start of the call to the commit.
    #[serde(skip)]
    pub elapsed: Duration,
}

impl Registry {
    /// Makes the clones `spec` asks for, all or none (see the module docs for the order).
    pub fn clone_images(&mut self, spec: &CloneSpec) -> Result<Cloned> {
        let started = Instant::now();
        let arguments = json!({
            "source": spec.source, "name": spec.name, "count": spec.count, "dir": spec.dir,
            "format": spec.format.map(ImageFormat::name), "durable": spec.durable,
            "method": spec.method.name(),
        });
        let names = spec.names();
        let place = spec.dir.as_ref().map(|dir| prepare_place(self, dir));
        let clones = self.audited("clone", arguments, |tx, home| {
            let names = names?;
            for name in &names {
                validate_name(name)?;
            }
            let place = match place {
                Some(place) => place?,
                None => home.clones_dir(),
            };
            let source = records::get(tx, &spec.source)?;
            let ancestors = records::ancestors(tx, &source)?;
            check_unchanged_or_missing(&source)?;
            for record in &ancestors {
                if record.guarded {
                    check_unchanged(record)?;
                }
            }
            let method = reflink::resolve(spec.method, &source, spec.format, &place)?;
            let format = match method {
                CloneMethod::Reflink => source.format,
                _ => clone_format(&source, spec.format)?,
            };
            for name in &names {
                if records::find(tx, name)?.is_some() || super::hosts::is_remote_name(tx, name)? {
                    return Err(RegistryError::NameTaken { name: name.clone() });
                }
            }
            // A reflink clone reads through the source's parent, not the source.
            let newly_guarded = if source.guarded || method == CloneMethod::Reflink {
                None
            } else {
                Some(guard_source(tx, &source)?)
            };
            let mut made = Vec::with_capacity(names.len());
            let result = match method {
                CloneMethod::Reflink => make_reflinks(
                    tx,
                    &source,
                    (&place, home.root()),
                    &names,
                    spec.durable,
                    &mut made,
                ),
                _ => make_all(
                    tx,
                    &source,
                    format,
                    (&place, home.root()),
                    &names,
                    spec.durable,
                    &mut made,
                ),
            };
            if let Err(e) = result {
                for dir in &made {
                    let _ = super::made::remove_dir(dir);
                }
                if let Some(mode) = newly_guarded {
                    let _ = release(&source.path, Some(mode));
                }
                return Err(e);
            }
            let mut clones = Vec::with_capacity(names.len());
            for name in &names {
                clones.push(records::get(tx, name)?);
            }
            let detail = format!(
                "{} {} {} clone(s) of {} in {}",
                clones.len(),
                format.name(),
                method.name(),
                source.name,
                place.display()
            );
            Ok(((clones, method), detail))
        })?;
        let (clones, method) = clones;
        crash_point("after-commit", clones.len().saturating_sub(1));
        Ok(Cloned {
            clones,
            method,
            elapsed: started.elapsed(),
        })
    }

    /// Removes the clones `names`, all or none: refused for bases, and for a clone that has
    /// clones not removed with it. A clone whose last clone goes is made writable again.
    pub fn remove_clones(&mut self, names: &[String]) -> Result<Vec<ImageRecord>> {
        let arguments = json!({ "names": names });
        let (removed, released) = self.audited("rm", arguments, |tx, _| {
            let mut removed = Vec::new();
            for name in names {
                let record = records::get(tx, name)?;
                if record.kind != Kind::Clone {
                    return Err(RegistryError::WrongKind {
                        name: name.clone(),
                        kind: "base",
                        expected: "clone (use `cowclone base rm` for bases)",
                    });
                }
                refuse_running(&record)?;
                if !removed.iter().any(|r: &ImageRecord| r.id == record.id) {
                    removed.push(record);
                }
            }
            for record in &removed {
                let kept: Vec<String> = records::children(tx, record.id)?
                    .into_iter()
                    .filter(|c| !names.contains(c))
                    .collect();
                if !kept.is_empty() {
                    return Err(RegistryError::HasClones {
                        name: record.name.clone(),
                        clones: kept,
                    });
                }
            }
            // Children before parents (a parent's row is referenced by its children's).
            let mut depths = Vec::new();
            for record in removed {
                depths.push((records::ancestors(tx, &record)?.len(), record));
            }
            depths.sort_by_key(|d| std::cmp::Reverse(d.0));
            let removed: Vec<ImageRecord> = depths.into_iter().map(|(_, r)| r).collect();
            for record in &removed {
                tx.execute("DELETE FROM images WHERE id = ?1", [record.id])?;
            }
            // Parents that are clones and now have no clones become writable again.
            let mut released = Vec::new();
            for record in &removed {
                let Some(parent_id) = record.parent_id else {
                    continue;
                };
                let Ok(parent) = records::by_id(tx, parent_id) else {
                    continue;
                };
                if parent.kind == Kind::Clone
                    && parent.guarded
                    && records::children(tx, parent.id)?.is_empty()
                {
                    tx.execute(
                        "UPDATE images SET guarded = 0, fp_size = NULL, fp_mtime_ns = NULL, \
                         fp_crc32 = NULL, sha256 = NULL WHERE id = ?1",
                        [parent.id],
                    )?;
                    released.push(parent);
                }
            }
            let detail = format!("removed {} clone(s)", removed.len());
            Ok(((removed, released), detail))
        })?;
        for record in &removed {
            remove_files(record)?;
        }
        for parent in &released {
            release(&parent.path, parent.original_mode)?;
        }
        Ok(removed)
    }
}

/// Refuses to remove a clone whose VM runs: its disk is in use.
pub(crate) fn refuse_running(record: &ImageRecord) -> Result<()> {
    match record.dir.as_deref().and_then(crate::runtime::running_pid) {
        Some(pid) => Err(RegistryError::Running {
            name: record.name.clone(),
            pid,
        }),
        None => Ok(()),
    }
}

/// Creates `dir`, records it as a place clones are made in, and returns it absolute.
fn prepare_place(registry: &mut Registry, dir: &Path) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)
        .map_err(RegistryError::io(format!("creating {}", dir.display())))?;
    let dir = dir
        .canonicalize()
        .map_err(RegistryError::io(format!("resolving {}", dir.display())))?;
    registry.conn.execute(
        "INSERT OR IGNORE INTO places (dir) VALUES (?1)",
        [path_text(&dir)?],
    )?;
    Ok(dir)
}

fn check_unchanged_or_missing(source: &ImageRecord) -> Result<()> {
    if source.guarded {
        check_unchanged(source)
    } else {
        super::guard::check_readable(source)
    }
}

/// Makes a clone source read-only and records its fingerprint; returns its previous mode.
fn guard_source(tx: &Transaction<'_>, source: &ImageRecord) -> Result<u32> {
    let (mode, print) = guard(&source.path, source.format)?;
    let updated = tx.execute(
        "UPDATE images SET guarded = 1, fp_size = ?1, fp_mtime_ns = ?2, fp_crc32 = ?3, \
         original_mode = ?4 WHERE id = ?5",
        rusqlite::params![
            print.size as i64,
            print.mtime_ns,
            i64::from(print.metadata_crc32),
            mode,
            source.id
        ],
    );
    match updated {
        Ok(_) => Ok(mode),
        Err(e) => {
            let _ = release(&source.path, Some(mode));
            Err(e.into())
        }
    }
}

/// The clone format: as asked if the source allows it; default qcow2, or VDI when the source
/// is a VDI differencing image (which qemu, and so a qcow2 overlay, cannot read through).
fn clone_format(source: &ImageRecord, asked: Option<ImageFormat>) -> Result<ImageFormat> {
    let vdi_diff = source
        .vdi
        .as_ref()
        .is_some_and(|v| v.uuid_linkage.is_some());
    let unsupported = |format: ImageFormat, reason| RegistryError::FormatUnsupported {
        name: source.name.clone(),
        format: format.name(),
        reason,
    };
    match asked {
        None if vdi_diff => Ok(ImageFormat::Vdi),
        None | Some(ImageFormat::Qcow2) if vdi_diff => Err(unsupported(
            ImageFormat::Qcow2,
            "it is a VDI differencing image, which qcow2 readers cannot follow; use --format vdi",
        )),
        None | Some(ImageFormat::Qcow2) => Ok(ImageFormat::Qcow2),
        Some(ImageFormat::Vdi) if source.format == ImageFormat::Vdi => Ok(ImageFormat::Vdi),
        Some(ImageFormat::Vdi) => Err(unsupported(
            ImageFormat::Vdi,
            "VDI differencing images need a VDI parent",
        )),
        Some(ImageFormat::Raw) => Err(unsupported(
            ImageFormat::Raw,
            "clones are overlays: qcow2 or vdi",
        )),
    }
}

/// Creates each clone's directory (in `place`, marked as made by the registry in `home`) and
/// image and inserts its row; `made` collects the directories created (for cleanup on error).
fn make_all(
    tx: &Transaction<'_>,
    source: &ImageRecord,
    format: ImageFormat,
    (place, home): (&Path, &Path),
    names: &[String],
    durable: bool,
    made: &mut Vec<PathBuf>,
) -> Result<()> {
    let backing = path_text(&source.path)?.to_owned();
    let mode = NewFileMode {
        overwrite: false,
        durable,
    };
    let mut insert = tx.prepare_cached(
        "INSERT INTO images (name, kind, path, format, virtual_size, parent_id, dir, owned, \
         guarded, vdi_uuid_create, vdi_uuid_modify, vdi_uuid_link, created_ns) \
         VALUES (?1, 'clone', ?2, ?3, ?4, ?5, ?6, 1, 0, ?7, ?8, ?9, ?10)",
    )?;
    for (index, name) in names.iter().enumerate() {
        crash_point("before-create", index);
        let dir = super::made::make_dir(place, name, home)?;
        made.push(dir.clone());
        let path = dir.join(format!("disk.{}", format.name()));
        let context = || format!("creating clone {name} at {}", path.display());
        let (virtual_size, vdi) = match format {
            ImageFormat::Vdi => {
                let header = imagefmt::vdi::create_differencing(&source.path, &path, mode)
                    .map_err(RegistryError::image(context()))?;
                let ids = (
                    header.uuid_create.to_string(),
                    header.uuid_modify.to_string(),
                    header.uuid_linkage.to_string(),
                );
                (header.virtual_size(), Some(ids))
            }
            _ => {
                // The source's header was read at registration and its fingerprint checked
                // above (under the write lock), so its format and size are known: no need to
                // open it again per clone.
                let created = Qcow2Builder::new(&path)
                    .backing(backing.clone())
                    .backing_format(source.format)
                    .without_opening_backing()
                    .size(source.virtual_size)
                    .durable(durable)
                    .create()
                    .map_err(RegistryError::image(context()))?;
                (created.virtual_size, None)
            }
        };
        // Private: the guest's data is nobody else's business.
        super::made::set_mode(&path, super::made::FILE_MODE)?;
        insert.execute(rusqlite::params![
            name,
            path_text(&path)?,
            format.name(),
            virtual_size as i64,
            source.id,
            path_text(&dir)?,
            vdi.as_ref().map(|v| &v.0),
            vdi.as_ref().map(|v| &v.1),
            vdi.as_ref().map(|v| &v.2),
            now_ns(),
        ])?;
        super::protect::record_identity(tx, tx.last_insert_rowid(), &path)?;
        crash_point("after-create", index);
    }
    Ok(())
}

/// Like [`make_all`] for reflink copies of `source`: each clone is a copy of the source file
/// sharing its extents, in the source's format, whose parent is the source's parent (the
/// image the copy's own header reads through, if any).
fn make_reflinks(
    tx: &Transaction<'_>,
    source: &ImageRecord,
    (place, home): (&Path, &Path),
    names: &[String],
    durable: bool,
    made: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut insert = tx.prepare_cached(
        "INSERT INTO images (name, kind, path, format, virtual_size, parent_id, dir, owned, \
         guarded, created_ns) VALUES (?1, 'clone', ?2, ?3, ?4, ?5, ?6, 1, 0, ?7)",
    )?;
    for (index, name) in names.iter().enumerate() {
        crash_point("before-create", index);
        let dir = super::made::make_dir(place, name, home)?;
        made.push(dir.clone());
        let path = dir.join(format!("disk.{}", source.format.name()));
        reflink::reflink_new(&source.path, &path, durable)?;
        // Private: the guest's data is nobody else's business.
        super::made::set_mode(&path, super::made::FILE_MODE)?;
        insert.execute(rusqlite::params![
            name,
            path_text(&path)?,
            source.format.name(),
            source.virtual_size as i64,
            source.parent_id,
            path_text(&dir)?,
            now_ns(),
        ])?;
        super::protect::record_identity(tx, tx.last_insert_rowid(), &path)?;
        crash_point("after-create", index);
    }
    Ok(())
}

/// Deletes a removed record's files: in its directory, only what cowclone wrote there, then the
/// directory if that empties it (anything else stays; `gc` reports it); a file outside a
/// directory of its own is deleted alone. Missing files are not an error: `gc` or another
/// process may have removed them.
pub(crate) fn remove_files(record: &ImageRecord) -> Result<()> {
    match &record.dir {
        Some(dir) => super::made::remove_dir(dir).map(drop),
        None => super::made::remove_file(&record.path),
    }
}

/// Kills this process with SIGKILL if [`CRASH_ENV`] names `point` and `index` (crash tests).
fn crash_point(point: &str, index: usize) {
    static TARGET: std::sync::OnceLock<Option<(String, usize)>> = std::sync::OnceLock::new();
    let target = TARGET.get_or_init(|| {
        let value = std::env::var(CRASH_ENV).ok()?;
        let (p, i) = value.split_once(':')?;
        Some((p.to_owned(), i.parse().ok()?))
    });
    if let Some((p, i)) = target {
        if p == point && *i == index {
            let _ = rustix::process::kill_process(
                rustix::process::getpid(),
                rustix::process::Signal::KILL,
            );
        }
    }
}
