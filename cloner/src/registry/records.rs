//! The record types ([`ImageRecord`], [`CloneRecord`]) and the queries that load them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use imagefmt::ImageFormat;
use rusqlite::{Connection, OptionalExtension, Row};
use serde::{Serialize, Serializer};

use crate::error::{RegistryError, Result};
use crate::fingerprint::Fingerprint;

/// Whether a record is a base or a clone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A golden image: read-only and fingerprinted.
    Base,
    /// An overlay made by `clone`, writable until it has clones of its own.
    Clone,
}

impl Kind {
    /// `base` or `clone`, as stored.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Base => "base",
            Kind::Clone => "clone",
        }
    }

    fn parse(text: &str) -> Kind {
        if text == "base" {
            Kind::Base
        } else {
            Kind::Clone
        }
    }
}

/// The VDI identities of a VDI image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VdiIds {
    /// The image's creation UUID (what a differencing child links to).
    pub uuid_create: String,
    /// Its modification UUID when recorded.
    pub uuid_modify: String,
    /// A differencing image's parent creation UUID.
    pub uuid_linkage: Option<String>,
}

/// One registered base or clone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageRecord {
    #[serde(skip)]
    pub(crate) id: i64,
    #[serde(skip)]
    pub(crate) parent_id: Option<i64>,
    #[serde(skip)]
    pub(crate) original_mode: Option<u32>,
    /// The file's (device, inode) when registered or cloned (see [`super::protect`]).
    #[serde(skip)]
    pub(crate) identity: Option<(u64, u64)>,
    /// Unique name (across bases and clones).
    pub name: String,
    /// Base or clone.
    pub kind: Kind,
    /// The image file (absolute).
    pub path: PathBuf,
    /// Its format.
    #[serde(serialize_with = "format_name")]
    pub format: ImageFormat,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// The image it reads through to (its backing file), if registered.
    pub parent: Option<String>,
    /// The image's own directory (clones, and bases promoted from clones).
    pub dir: Option<PathBuf>,
    /// True if cowclone made the file (it is deleted with the record).
    pub owned: bool,
    /// True if the file is read-only and fingerprinted (bases; clones that have clones).
    pub guarded: bool,
    /// The fingerprint taken when the image was guarded.
    pub fingerprint: Option<Fingerprint>,
    /// SHA-256 of the whole file, if computed (`--sha256`, `base verify`).
    pub sha256: Option<String>,
    /// VDI identities, for VDI images.
    pub vdi: Option<VdiIds>,
    /// Guest memory in bytes (bases; `--memory`).
    pub memory: Option<u64>,
    /// Guest CPUs (bases; `--cpus`).
    pub cpus: Option<u32>,
    /// Free key=value metadata (bases; `--meta`).
    pub meta: BTreeMap<String, String>,
    /// When it was registered, RFC 3339 UTC.
    pub created: String,
}

/// What a record's file looks like now, from one `stat` (what `ls` shows).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FileState {
    /// The file is there, and (for a guarded image) unchanged by size and mtime.
    Ok,
    /// Nothing at the recorded path.
    Missing,
    /// Something else is there now: another file (device and inode differ from the recorded
    /// ones), or a guarded image whose size or mtime changed since it was fingerprinted.
    Stale,
}

impl FileState {
    /// `ok`, `missing` or `stale`.
    pub fn name(self) -> &'static str {
        match self {
            FileState::Ok => "ok",
            FileState::Missing => "missing",
            FileState::Stale => "stale",
        }
    }
}

impl ImageRecord {
    /// The file's state now and the bytes it occupies on disk (`st_blocks` × 512; `None` when
    /// missing). Cheap: one `stat`, no read.
    pub fn file_status(&self) -> (FileState, Option<u64>) {
        use std::os::unix::fs::MetadataExt;
        let Ok(meta) = std::fs::metadata(&self.path) else {
            return (FileState::Missing, None);
        };
        let replaced = self
            .identity
            .is_some_and(|identity| identity != (meta.dev(), meta.ino()));
        let modified = self.guarded
            && self.fingerprint.as_ref().is_some_and(|fp| {
                fp.size != meta.len()
                    || fp.mtime_ns != meta.mtime() * 1_000_000_000 + meta.mtime_nsec()
            });
        let state = if replaced || modified {
            FileState::Stale
        } else {
            FileState::Ok
        };
        (state, Some(meta.blocks() * 512))
    }
}

/// The columns [`from_row`] reads, in order.
pub(crate) const SELECT: &str = "SELECT i.id, i.name, i.kind, i.path, i.format, i.virtual_size, \
    p.name, i.dir, i.owned, i.guarded, i.fp_size, i.fp_mtime_ns, i.fp_crc32, i.sha256, \
    i.original_mode, i.vdi_uuid_create, i.vdi_uuid_modify, i.vdi_uuid_link, i.memory, i.cpus, \
    i.meta, i.created_ns, i.parent_id, i.dev, i.ino FROM images i LEFT JOIN images p ON p.id = i.parent_id";

fn format_name<S: Serializer>(format: &ImageFormat, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(format.name())
}

pub(crate) fn from_row(r: &Row<'_>) -> rusqlite::Result<ImageRecord> {
    let kind: String = r.get(2)?;
    let path: String = r.get(3)?;
    let format: String = r.get(4)?;
    let dir: Option<String> = r.get(7)?;
    let fingerprint = match (
        r.get::<_, Option<i64>>(10)?,
        r.get::<_, Option<i64>>(11)?,
        r.get::<_, Option<i64>>(12)?,
    ) {
        (Some(size), Some(mtime_ns), Some(crc)) => Some(Fingerprint {
            size: size as u64,
            mtime_ns,
            metadata_crc32: crc as u32,
        }),
        _ => None,
    };
    let vdi = match (
        r.get::<_, Option<String>>(15)?,
        r.get::<_, Option<String>>(16)?,
    ) {
        (Some(uuid_create), Some(uuid_modify)) => Some(VdiIds {
            uuid_create,
            uuid_modify,
            uuid_linkage: r.get(17)?,
        }),
        _ => None,
    };
    let meta: String = r.get(20)?;
    Ok(ImageRecord {
        id: r.get(0)?,
        name: r.get(1)?,
        kind: Kind::parse(&kind),
        path: PathBuf::from(path),
        format: format.parse().unwrap_or(ImageFormat::Raw),
        virtual_size: r.get::<_, i64>(5)? as u64,
        parent: r.get(6)?,
        dir: dir.map(PathBuf::from),
        owned: r.get(8)?,
        guarded: r.get(9)?,
        fingerprint,
        sha256: r.get(13)?,
        original_mode: r.get(14)?,
        vdi,
        memory: r.get::<_, Option<i64>>(18)?.map(|m| m as u64),
        cpus: r.get(19)?,
        meta: serde_json::from_str(&meta).unwrap_or_default(),
        created: crate::audit::rfc3339(r.get(21)?),
        parent_id: r.get(22)?,
        identity: match (r.get::<_, Option<i64>>(23)?, r.get::<_, Option<i64>>(24)?) {
            (Some(dev), Some(ino)) => Some((dev as u64, ino as u64)),
            _ => None,
        },
    })
}

/// The record called `name`, if any.
pub(crate) fn find(conn: &Connection, name: &str) -> Result<Option<ImageRecord>> {
    Ok(conn
        .query_row(&format!("{SELECT} WHERE i.name = ?1"), [name], from_row)
        .optional()?)
}

/// The record called `name`.
pub(crate) fn get(conn: &Connection, name: &str) -> Result<ImageRecord> {
    find(conn, name)?.ok_or_else(|| RegistryError::NotFound {
        name: name.to_owned(),
    })
}

/// The record with row id `id`.
pub(crate) fn by_id(conn: &Connection, id: i64) -> Result<ImageRecord> {
    Ok(conn.query_row(&format!("{SELECT} WHERE i.id = ?1"), [id], from_row)?)
}

/// The record whose file is `path`, if any.
pub(crate) fn by_path(conn: &Connection, path: &Path) -> Result<Option<ImageRecord>> {
    Ok(conn
        .query_row(
            &format!("{SELECT} WHERE i.path = ?1"),
            [path_text(path)?],
            from_row,
        )
        .optional()?)
}

/// Every record of `kind` (all if `None`), by name.
pub(crate) fn list(conn: &Connection, kind: Option<Kind>) -> Result<Vec<ImageRecord>> {
    let mut stmt = conn.prepare(&format!(
        "{SELECT} WHERE ?1 IS NULL OR i.kind = ?1 ORDER BY i.name"
    ))?;
    let rows = stmt.query_map([kind.map(Kind::name)], from_row)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The names of the records that read through to record `id`, by name.
pub(crate) fn children(conn: &Connection, id: i64) -> Result<Vec<String>> {
    let mut stmt = conn.prepare("SELECT name FROM images WHERE parent_id = ?1 ORDER BY name")?;
    let rows = stmt.query_map([id], |r| r.get(0))?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

/// The chain below `record`, nearest first.
pub(crate) fn ancestors(conn: &Connection, record: &ImageRecord) -> Result<Vec<ImageRecord>> {
    let mut chain = Vec::new();
    let mut next = record.parent_id;
    while let Some(id) = next {
        // The schema cannot make a loop (a parent exists before its child), but bound it anyway.
        if chain.len() > imagefmt::backing::MAX_CHAIN_DEPTH {
            break;
        }
        let parent = by_id(conn, id)?;
        next = parent.parent_id;
        chain.push(parent);
    }
    Ok(chain)
}

/// Every record reading through `id`, directly or not, deepest first (safe deletion order).
pub(crate) fn descendants(conn: &Connection, id: i64) -> Result<Vec<ImageRecord>> {
    let mut found: Vec<(usize, ImageRecord)> = Vec::new();
    let mut frontier = vec![(id, 0usize)];
    while let Some((parent, depth)) = frontier.pop() {
        let mut stmt = conn.prepare(&format!("{SELECT} WHERE i.parent_id = ?1"))?;
        let rows: Vec<ImageRecord> = stmt
            .query_map([parent], from_row)?
            .collect::<rusqlite::Result<_>>()?;
        for child in rows {
            frontier.push((child.id, depth + 1));
            found.push((depth + 1, child));
        }
    }
    found.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.name.cmp(&b.1.name)));
    Ok(found.into_iter().map(|(_, r)| r).collect())
}

/// `path` as stored: UTF-8 text (other paths are refused).
pub(crate) fn path_text(path: &Path) -> Result<&str> {
    path.to_str().ok_or_else(|| RegistryError::Io {
        step: format!("recording {}", path.display()),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "paths that are not UTF-8 cannot be registered",
        ),
    })
}

/// One image of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ChainLink {
    /// Registered name.
    pub name: String,
    /// Image file.
    pub path: PathBuf,
    /// Its format.
    #[serde(serialize_with = "format_name")]
    pub format: ImageFormat,
}

/// What a hypervisor driver needs to run a clone: [`crate::Registry::clone_record`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CloneRecord {
    /// The clone's name.
    pub name: String,
    /// Base or clone.
    pub kind: Kind,
    /// The image to attach (the top of the chain).
    pub image: PathBuf,
    /// Its format (`qcow2` or `vdi` for clones).
    #[serde(serialize_with = "format_name")]
    pub format: ImageFormat,
    /// The images below it, nearest first (the clone's base last).
    pub chain: Vec<ChainLink>,
    /// The clone's own directory, for runtime files (sockets, logs, pid files).
    pub dir: Option<PathBuf>,
    /// Guest memory in bytes: the nearest setting along the chain.
    pub memory: Option<u64>,
    /// Guest CPUs: the nearest setting along the chain.
    pub cpus: Option<u32>,
    /// Metadata along the chain, nearer images winning.
    pub meta: BTreeMap<String, String>,
}

impl CloneRecord {
    pub(crate) fn new(record: ImageRecord, ancestors: Vec<ImageRecord>) -> CloneRecord {
        let all = || std::iter::once(&record).chain(ancestors.iter());
        let memory = all().find_map(|r| r.memory);
        let cpus = all().find_map(|r| r.cpus);
        let mut meta = BTreeMap::new();
        for r in all().collect::<Vec<_>>().into_iter().rev() {
            meta.extend(r.meta.clone());
        }
        CloneRecord {
            name: record.name.clone(),
            kind: record.kind,
            image: record.path.clone(),
            format: record.format,
            chain: ancestors
                .iter()
                .map(|a| ChainLink {
                    name: a.name.clone(),
                    path: a.path.clone(),
                    format: a.format,
                })
                .collect(),
            dir: record.dir.clone(),
            memory,
            cpus,
            meta,
        }
    }
}
