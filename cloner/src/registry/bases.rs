//! Base operations: register a disk as a base, verify it by full hash, remove it, and promote a
//! clone to a base.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use imagefmt::image::ImageHeader;
use imagefmt::ImageFormat;
use serde::Serialize;
use serde_json::json;

use super::guard::{check_unchanged, guard, release};
use super::records::{self, path_text, ImageRecord, Kind};
use super::{validate_name, Registry};
use crate::audit::now_ns;
use crate::error::{RegistryError, Result};
use crate::fingerprint::sha256_file;

/// What `base register` records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegisterBase {
    /// The base's name.
    pub name: String,
    /// The disk image (qcow2, VDI, or raw).
    pub disk: PathBuf,
    /// Its format; `None`: recognised by content (qcow2, VDI), raw otherwise.
    pub format: Option<ImageFormat>,
    /// Accept an image with a backing file (or VDI parent) of its own.
    pub allow_backing: bool,
    /// Free metadata.
    pub meta: BTreeMap<String, String>,
    /// Guest memory in bytes.
    pub memory: Option<u64>,
    /// Guest CPUs.
    pub cpus: Option<u32>,
    /// Also compute a full SHA-256 now.
    pub sha256: bool,
}

impl RegisterBase {
    /// Registers `disk` as `name` with no options.
    pub fn new(name: &str, disk: impl AsRef<Path>) -> RegisterBase {
        RegisterBase {
            name: name.to_owned(),
            disk: disk.as_ref().to_owned(),
            format: None,
            allow_backing: false,
            meta: BTreeMap::new(),
            memory: None,
            cpus: None,
            sha256: false,
        }
    }
}

/// What `base verify` found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Verification {
    /// The base.
    pub name: String,
    /// What changed since the fingerprint was taken (`None`: unchanged).
    pub changes: Option<String>,
    /// SHA-256 of the file now.
    pub sha256: String,
    /// The SHA-256 recorded before, if any (recorded now if there was none and the file is
    /// unchanged).
    pub recorded_sha256: Option<String>,
    /// True if the fingerprint and any recorded hash match.
    pub ok: bool,
}

/// What `base rm` removed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct RemovedBase {
    /// The base's record.
    pub base: ImageRecord,
    /// Clones removed with it (`--with-clones`), deepest first.
    pub clones: Vec<ImageRecord>,
}

impl Registry {
    /// Registers `request.disk` as a base: opened natively, refused if it has its own backing
    /// file (unless allowed), made read-only and fingerprinted.
    pub fn register_base(&mut self, request: &RegisterBase) -> Result<ImageRecord> {
        let arguments = json!({
            "name": request.name, "disk": request.disk, "format": request.format.map(ImageFormat::name),
            "allow-backing": request.allow_backing, "meta": request.meta,
            "memory": request.memory, "cpus": request.cpus, "sha256": request.sha256,
        });
        self.audited("base-register", arguments, |tx, _| {
            validate_name(&request.name)?;
            let path = request.disk.canonicalize().map_err(RegistryError::io(format!(
                "opening {}",
                request.disk.display()
            )))?;
            let header = read_header(&path, request.format)?;
            refuse_partly_readable(&path, &header)?;
            if let Some(backing) = own_backing(&header) {
                if !request.allow_backing {
                    return Err(RegistryError::HasBacking { path, backing });
                }
            }
            if records::find(tx, &request.name)?.is_some() {
                return Err(RegistryError::NameTaken {
                    name: request.name.clone(),
                });
            }
            if let Some(other) = records::by_path(tx, &path)? {
                return Err(RegistryError::PathTaken {
                    path,
                    name: other.name,
                });
            }
            let sha = request.sha256.then(|| sha256_file(&path)).transpose()?;
            let (mode, print) = guard(&path, header.format())?;
            let vdi = match &header {
                ImageHeader::Vdi(h) => Some((
                    h.uuid_create.to_string(),
                    h.uuid_modify.to_string(),
                    (!h.uuid_linkage.is_nil()).then(|| h.uuid_linkage.to_string()),
                )),
                _ => None,
            };
            let inserted = tx.execute(
                "INSERT INTO images (name, kind, path, format, virtual_size, owned, guarded, \
                 fp_size, fp_mtime_ns, fp_crc32, sha256, original_mode, vdi_uuid_create, \
                 vdi_uuid_modify, vdi_uuid_link, memory, cpus, meta, created_ns) \
                 VALUES (?1, 'base', ?2, ?3, ?4, 0, 1, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
                rusqlite::params![
                    request.name,
                    path_text(&path)?,
                    header.format().name(),
                    header.virtual_size() as i64,
                    print.size as i64,
                    print.mtime_ns,
                    i64::from(print.metadata_crc32),
                    sha,
                    mode,
                    vdi.as_ref().map(|v| &v.0),
                    vdi.as_ref().map(|v| &v.1),
                    vdi.as_ref().and_then(|v| v.2.as_ref()),
                    request.memory.map(|m| m as i64),
                    request.cpus,
                    serde_json::to_string(&request.meta).unwrap_or_else(|_| "{}".into()),
                    now_ns(),
                ],
            );
            if let Err(e) = inserted {
                let _ = release(&path, Some(mode));
                return Err(e.into());
            }
            super::protect::record_identity(tx, tx.last_insert_rowid(), &path)?;
            let record = records::get(tx, &request.name)?;
            let detail = format!("registered {} ({})", path.display(), header.format().name());
            Ok((record, detail))
        })
    }

    /// Hashes the base's whole file and checks it against its fingerprint and any recorded
    /// SHA-256; records the hash if none was recorded and the file is unchanged.
    pub fn verify_base(&mut self, name: &str) -> Result<Verification> {
        self.audited("base-verify", json!({ "name": name }), |tx, _| {
            let record = records::get(tx, name)?;
            if !record.guarded {
                return Err(RegistryError::WrongKind {
                    name: name.to_owned(),
                    kind: "writable clone",
                    expected: "base (or guarded clone)",
                });
            }
            let changes = match check_unchanged(&record) {
                Ok(()) => None,
                Err(RegistryError::Modified { changes, .. }) => Some(changes),
                Err(e) => return Err(e),
            };
            let sha256 = sha256_file(&record.path)?;
            let hash_ok = record.sha256.as_deref().is_none_or(|h| h == sha256);
            let ok = changes.is_none() && hash_ok;
            if ok && record.sha256.is_none() {
                tx.execute(
                    "UPDATE images SET sha256 = ?1 WHERE id = ?2",
                    rusqlite::params![sha256, record.id],
                )?;
            }
            let detail = if ok {
                format!("unchanged, sha256 {sha256}")
            } else {
                format!(
                    "MODIFIED: {}{}",
                    changes.as_deref().unwrap_or("fingerprint matches"),
                    if hash_ok { "" } else { ", sha256 differs" }
                )
            };
            Ok((
                Verification {
                    name: name.to_owned(),
                    changes,
                    sha256,
                    recorded_sha256: record.sha256,
                    ok,
                },
                detail,
            ))
        })
    }

    /// Unregisters the base `name` (refused while it has clones, unless `with_clones`, which
    /// removes them too). A base registered in place gets its file mode back; a base promoted
    /// from a clone is deleted with its directory, as are removed clones.
    pub fn remove_base(&mut self, name: &str, with_clones: bool) -> Result<RemovedBase> {
        let arguments = json!({ "name": name, "with-clones": with_clones });
        let removed = self.audited("base-rm", arguments, |tx, _| {
            let base = records::get(tx, name)?;
            if base.kind != Kind::Base {
                return Err(RegistryError::WrongKind {
                    name: name.to_owned(),
                    kind: "clone",
                    expected: "base (use `cowclone rm` for clones)",
                });
            }
            let clones = records::descendants(tx, base.id)?;
            if !clones.is_empty() && !with_clones {
                return Err(RegistryError::HasClones {
                    name: name.to_owned(),
                    clones: records::children(tx, base.id)?,
                });
            }
            for record in clones.iter().chain([&base]) {
                super::clones::refuse_running(record)?;
            }
            for record in clones.iter().chain([&base]) {
                tx.execute("DELETE FROM images WHERE id = ?1", [record.id])?;
            }
            let detail = format!("removed {name} and {} clone(s)", clones.len());
            Ok((RemovedBase { base, clones }, detail))
        })?;
        // Files go after the commit: a crash in between leaves files `gc` removes.
        for record in removed.clones.iter().chain([&removed.base]) {
            if record.owned {
                super::clones::remove_files(record)?;
            } else {
                release(&record.path, record.original_mode)?;
            }
        }
        Ok(removed)
    }

    /// Turns the clone `clone` into the base `base_name`: read-only, fingerprinted, registered
    /// as a base (its file and directory stay where they are).
    pub fn promote(&mut self, clone: &str, base_name: &str) -> Result<ImageRecord> {
        let arguments = json!({ "clone": clone, "base": base_name });
        self.audited("promote", arguments, |tx, _| {
            validate_name(base_name)?;
            let record = records::get(tx, clone)?;
            if record.kind != Kind::Clone {
                return Err(RegistryError::WrongKind {
                    name: clone.to_owned(),
                    kind: "base",
                    expected: "clone",
                });
            }
            if base_name != clone && records::find(tx, base_name)?.is_some() {
                return Err(RegistryError::NameTaken {
                    name: base_name.to_owned(),
                });
            }
            let (mode, print) = match (record.guarded, record.fingerprint) {
                (true, Some(print)) => {
                    check_unchanged(&record)?;
                    (record.original_mode.unwrap_or(0o644), print)
                }
                _ => guard(&record.path, record.format)?,
            };
            tx.execute(
                "UPDATE images SET kind = 'base', name = ?1, guarded = 1, fp_size = ?2, \
                 fp_mtime_ns = ?3, fp_crc32 = ?4, original_mode = ?5 WHERE id = ?6",
                rusqlite::params![
                    base_name,
                    print.size as i64,
                    print.mtime_ns,
                    i64::from(print.metadata_crc32),
                    mode,
                    record.id
                ],
            )?;
            let promoted = records::get(tx, base_name)?;
            Ok((promoted, format!("{clone} is now base {base_name}")))
        })
    }
}

/// Reads the header of the would-be base at `path`.
fn read_header(path: &Path, format: Option<ImageFormat>) -> Result<ImageHeader> {
    let file = std::fs::File::open(path)
        .map_err(RegistryError::io(format!("opening {}", path.display())))?;
    let context = format!("reading the header of {}", path.display());
    ImageHeader::read(&file, format, path, true).map_err(RegistryError::image(context))
}

/// Refuses a would-be base that cowclone cannot read in full: encrypted, marked corrupt or
/// dirty (its refcounts need a repair first), or with its metadata tables past the end of the
/// file. (Unknown incompatible feature bits are refused when the header is read.)
fn refuse_partly_readable(path: &Path, header: &ImageHeader) -> Result<()> {
    use imagefmt::qcow2::features::IncompatibleFeatures;
    let len = std::fs::metadata(path)
        .map_err(RegistryError::io(format!(
            "reading metadata of {}",
            path.display()
        )))?
        .len();
    let past_eof = |what: &str, offset: u64, bytes: u64| {
        let end = offset.checked_add(bytes);
        (end.is_none_or(|end| end > len)).then(|| {
            format!(
                "its {what} (offset {offset}, {bytes} bytes) lies past the end of the file ({len} bytes)"
            )
        })
    };
    let reason = match header {
        ImageHeader::Qcow2(cluster) => {
            let h = &cluster.header;
            let flags = h.incompatible_features;
            if h.crypt_method != 0 {
                let method = if h.crypt_method == 1 { "AES" } else { "LUKS" };
                Some(format!("it is encrypted ({method})"))
            } else if flags.contains(IncompatibleFeatures::CORRUPT) {
                Some("it is marked corrupt (qemu-img check -r all repairs it)".to_owned())
            } else if flags.contains(IncompatibleFeatures::DIRTY) {
                Some(
                    "it is marked dirty: its refcounts need a repair (qemu-img check -r all)"
                        .to_owned(),
                )
            } else {
                past_eof("L1 table", h.l1_table_offset, u64::from(h.l1_size) * 8).or_else(|| {
                    past_eof(
                        "refcount table",
                        h.refcount_table_offset,
                        u64::from(h.refcount_table_clusters) * h.cluster_size(),
                    )
                })
            }
        }
        ImageHeader::Vdi(h) => past_eof(
            "block map",
            u64::from(h.offset_blocks),
            h.block_map_len_bytes(),
        ),
        ImageHeader::Raw { .. } => None,
    };
    match reason {
        Some(reason) => Err(RegistryError::NotReadableInFull {
            path: path.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// The image's own backing reference, if it has one.
fn own_backing(header: &ImageHeader) -> Option<String> {
    match header {
        ImageHeader::Qcow2(_) => header.backing_name().map(str::to_owned),
        ImageHeader::Vdi(h) if h.is_differencing() => {
            Some(format!("VDI parent {{{}}}", h.uuid_linkage))
        }
        _ => None,
    }
}
