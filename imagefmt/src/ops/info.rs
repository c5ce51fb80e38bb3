//! `info`: the facts `qemu-img info` reports, with its JSON key names.
//!
//! [`ImageInfo`] serialises to the same keys as `qemu-img info --output=json` (virtual-size,
//! filename, format, actual-size, cluster-size, backing-filename, full-backing-filename,
//! backing-filename-format, dirty-flag, format-specific), so scripts written against qemu-img
//! keep working. [`backing_chain`] follows backing files only under a [`BackingPolicy`].

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use serde::Serialize;

use crate::backing::{BackingPolicy, ChainGuard};
use crate::chain::ChainOptions;
use crate::image::ImageHeader;
use crate::io::Backend;
use crate::qcow2::bitmap::BitmapFlags;
use crate::qcow2::features::{CompatibleFeatures, IncompatibleFeatures};
use crate::{Error, Result};

/// One image's facts, in `qemu-img info --output=json` form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    /// The image's name as given.
    pub filename: String,
    /// `qcow2`, `vdi` or `raw`.
    pub format: String,
    /// Guest-visible size in bytes.
    pub virtual_size: u64,
    /// Bytes allocated on disk (st_blocks × 512).
    pub actual_size: u64,
    /// Cluster (qcow2) or block (VDI) size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    /// Backing name as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    /// Backing name resolved against the image's directory, as qemu would open it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    /// Backing format from the header extension.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    /// qcow2 dirty bit (lazy refcounts in use).
    pub dirty_flag: bool,
    /// Format-specific facts.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    /// qcow2 internal snapshots (absent when there are none, as qemu-img prints it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshots: Option<Vec<SnapshotInfo>>,
    /// The nodes below the format, as qemu-img 10 lists them: the `file` child (the host file
    /// holding the image).
    pub children: Vec<ChildInfo>,
}

/// One entry of `children`: the child's role and its facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChildInfo {
    /// `file`.
    pub name: String,
    /// The child node's facts.
    pub info: FileNodeInfo,
}

/// The facts qemu-img 10 reports for a host-file node (format `file`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct FileNodeInfo {
    /// Always empty: a file node has no children.
    pub children: Vec<ChildInfo>,
    /// The file's length in bytes rounded up to whole 512-byte sectors, as qemu's file driver
    /// reports it (what the node calls its virtual size).
    pub virtual_size: u64,
    /// The file's name as given.
    pub filename: String,
    /// `file`.
    pub format: String,
    /// Bytes allocated on disk (st_blocks × 512).
    pub actual_size: u64,
    /// `{"type": "file", "data": {}}`.
    pub format_specific: FileSpecific,
    /// Always false for a file.
    pub dirty_flag: bool,
}

/// A file node's `format-specific`: type `file` and no data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSpecific {
    /// `file`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Empty.
    pub data: std::collections::BTreeMap<String, String>,
}

impl ChildInfo {
    /// The `file` child of the image at `path` with metadata `meta`.
    pub fn file(path: &Path, meta: &std::fs::Metadata) -> Self {
        Self {
            name: "file".into(),
            info: FileNodeInfo {
                children: Vec::new(),
                virtual_size: meta.len().next_multiple_of(512),
                filename: path.to_string_lossy().into_owned(),
                format: "file".into(),
                actual_size: meta.blocks() * 512,
                format_specific: FileSpecific {
                    kind: "file".into(),
                    data: Default::default(),
                },
                dirty_flag: false,
            },
        }
    }
}

/// One internal snapshot, with `qemu-img info --output=json`'s keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotInfo {
    /// Unique id.
    pub id: String,
    /// Name (qemu's tag).
    pub name: String,
    /// VM state bytes (0 for a disk-only snapshot).
    pub vm_state_size: u64,
    /// When it was taken: seconds since the epoch.
    pub date_sec: u64,
    /// Nanoseconds of that second.
    pub date_nsec: u64,
    /// Guest clock: whole seconds.
    pub vm_clock_sec: u64,
    /// Guest clock: nanoseconds of that second.
    pub vm_clock_nsec: u64,
    /// Record/replay instruction count, when recorded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
}

impl From<&crate::qcow2::snapshot::Snapshot> for SnapshotInfo {
    fn from(sn: &crate::qcow2::snapshot::Snapshot) -> Self {
        Self {
            id: sn.id_str(),
            name: sn.name_str(),
            vm_state_size: sn.vm_state_size,
            date_sec: u64::from(sn.date_sec),
            date_nsec: u64::from(sn.date_nsec),
            vm_clock_sec: sn.vm_clock_nsec / 1_000_000_000,
            vm_clock_nsec: sn.vm_clock_nsec % 1_000_000_000,
            icount: sn.icount,
        }
    }
}

/// The internal snapshots of the image `header` read from `file` (`None` when it has none).
/// The table is read as an image open reads it, so an image qemu does not open (its table
/// pointer or table invalid) is an error here too.
pub fn snapshot_infos(
    file: &std::fs::File,
    header: &ImageHeader,
) -> Result<Option<Vec<SnapshotInfo>>> {
    let ImageHeader::Qcow2(cluster) = header else {
        return Ok(None);
    };
    let table = crate::qcow2::snapshot_ops::read_snapshots(file, &cluster.header)?;
    if table.entries.is_empty() {
        return Ok(None);
    }
    Ok(Some(table.entries.iter().map(SnapshotInfo::from).collect()))
}

/// `format-specific`: `{"type": ..., "data": {...}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum FormatSpecific {
    /// qcow2 header facts.
    Qcow2(Qcow2Specific),
    /// VDI header facts (cowclone's own addition; qemu-img prints none for VDI).
    Vdi(VdiSpecific),
}

/// qcow2's `format-specific.data`, with qemu-img's keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    /// `0.10` (v2) or `1.1` (v3).
    pub compat: String,
    /// `zlib` or `zstd` (qemu reports `zlib` for v2 too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compression_type: Option<String>,
    /// Compatible bit 0 (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Persistent dirty bitmaps, in directory order (absent when there are none; filled in by
    /// [`ImageInfo::read_bitmaps`], which reads the bitmap directory).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bitmaps: Option<Vec<BitmapInfo>>,
    /// Refcount width.
    pub refcount_bits: u32,
    /// The external data file's name, from the header extension (data-file images only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file: Option<String>,
    /// Autoclear bit 1: the data file is a valid raw image (data-file images only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_file_raw: Option<bool>,
    /// Incompatible bit 1 (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    /// Incompatible bit 4 (v3 only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// One persistent dirty bitmap, as `qemu-img info` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BitmapInfo {
    /// `in-use` and `auto`, in that order, for the flags that are set.
    pub flags: Vec<String>,
    /// The bitmap's name.
    pub name: String,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
}

/// VDI header facts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct VdiSpecific {
    /// `normal`, `fixed`, `undo` or `diff`.
    pub image_type: String,
    /// Creation UUID (the image's identity).
    pub uuid: String,
    /// Last-modification UUID.
    pub modification_uuid: String,
    /// Parent's creation UUID (differencing images only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_uuid: Option<String>,
    /// Parent's modification UUID when this diff was made (differencing images only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_modification_uuid: Option<String>,
}

impl ImageInfo {
    /// Builds the facts for a header read from the file at `path` with metadata `meta`.
    pub fn from_header(path: &Path, header: &ImageHeader, meta: &std::fs::Metadata) -> Self {
        let backing_filename = header.backing_name().map(str::to_owned);
        let full_backing_filename = header
            .backing_name()
            .and_then(|name| crate::backing::resolve(path, name).ok())
            .map(|p| p.to_string_lossy().into_owned());
        let (cluster_size, dirty_flag, format_specific) = match header {
            ImageHeader::Qcow2(c) => {
                let h = &c.header;
                let v3 = h.version == crate::qcow2::Version::V3;
                let incompat = h.incompatible_features;
                let has_data_file = incompat.contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
                let specific = Qcow2Specific {
                    compat: h.version.compat().to_owned(),
                    compression_type: Some(h.compression_type.name().to_owned()),
                    lazy_refcounts: v3.then(|| {
                        h.compatible_features
                            .contains(CompatibleFeatures::LAZY_REFCOUNTS)
                    }),
                    bitmaps: None,
                    refcount_bits: h.refcount_bits(),
                    data_file: has_data_file
                        .then(|| c.data_file().map(str::to_owned))
                        .flatten(),
                    data_file_raw: has_data_file.then(|| {
                        h.autoclear_features
                            .contains(crate::qcow2::features::AutoclearFeatures::RAW_EXTERNAL)
                    }),
                    corrupt: v3.then(|| incompat.contains(IncompatibleFeatures::CORRUPT)),
                    extended_l2: v3.then(|| incompat.contains(IncompatibleFeatures::EXTENDED_L2)),
                };
                (
                    Some(h.cluster_size()),
                    incompat.contains(IncompatibleFeatures::DIRTY),
                    Some(FormatSpecific::Qcow2(specific)),
                )
            }
            ImageHeader::Vdi(h) => {
                let linked = |u: uuid::Uuid| (!u.is_nil()).then(|| u.to_string());
                let specific = VdiSpecific {
                    image_type: format!("{:?}", h.image_type).to_lowercase(),
                    uuid: h.uuid_create.to_string(),
                    modification_uuid: h.uuid_modify.to_string(),
                    parent_uuid: linked(h.uuid_linkage),
                    parent_modification_uuid: linked(h.uuid_parent_modify),
                };
                (
                    Some(u64::from(h.block_size)),
                    false,
                    Some(FormatSpecific::Vdi(specific)),
                )
            }
            ImageHeader::Raw { .. } => (None, false, None),
        };
        Self {
            filename: path.to_string_lossy().into_owned(),
            format: header.format().name().to_owned(),
            virtual_size: header.virtual_size(),
            actual_size: meta.blocks() * 512,
            cluster_size,
            backing_filename,
            full_backing_filename,
            backing_filename_format: header.backing_format().map(str::to_owned),
            dirty_flag,
            format_specific,
            children: vec![ChildInfo::file(path, meta)],
            snapshots: None,
        }
    }
}

impl ImageInfo {
    /// Fills in the qcow2 `bitmaps` list from the bitmap directory of the image on `backend`
    /// whose header is `header` (nothing for other formats or without bitmaps).
    pub fn read_bitmaps<B: Backend + ?Sized>(
        &mut self,
        backend: &B,
        header: &ImageHeader,
    ) -> Result<()> {
        let (ImageHeader::Qcow2(cluster), Some(FormatSpecific::Qcow2(specific))) =
            (header, self.format_specific.as_mut())
        else {
            return Ok(());
        };
        let entries = crate::qcow2::bitmap::read_directory(backend, cluster)?;
        if entries.is_empty() {
            return Ok(());
        }
        specific.bitmaps = Some(
            entries
                .iter()
                .map(|e| {
                    let named = [(BitmapFlags::IN_USE, "in-use"), (BitmapFlags::AUTO, "auto")];
                    BitmapInfo {
                        flags: named
                            .iter()
                            .filter(|(flag, _)| e.flags.contains(*flag))
                            .map(|(_, name)| (*name).to_owned())
                            .collect(),
                        name: e.name_lossy(),
                        granularity: e.granularity(),
                    }
                })
                .collect(),
        );
        Ok(())
    }
}

/// Reads the facts of the image at `path` (format recognised by content; raw otherwise).
/// Does not open any backing file.
pub fn image_info(path: &Path) -> Result<ImageInfo> {
    image_info_with(path, crate::open::OpenHow::read().metadata_only())
}

/// [`image_info`], opening the image as `how` says (`--force-share` reads an image in use).
pub fn image_info_with(path: &Path, how: crate::open::OpenHow) -> Result<ImageInfo> {
    image_info_as(path, None, how)
}

/// [`image_info_with`] reading the image as `format` (`info -f FMT`; an image that is not in
/// that format is refused, and `raw` shows any file as raw); by content if `None`.
pub fn image_info_as(
    path: &Path,
    format: Option<crate::ImageFormat>,
    how: crate::open::OpenHow,
) -> Result<ImageInfo> {
    let file = crate::open::open_image(path, how)?;
    let header = ImageHeader::read(&file, format, path, true)?;
    let meta = file
        .metadata()
        .map_err(Error::io(format!("reading metadata of {}", path.display())))?;
    let mut info = ImageInfo::from_header(path, &header, &meta);
    info.read_bitmaps(&file, &header)?;
    info.snapshots =
        snapshot_infos(&file, &header).map_err(|e| e.in_file("could not open", path))?;
    Ok(info)
}

/// The facts of `path` and of every image below it, top first, following backing names only as
/// `policy` allows, with a depth limit and loop detection (VDI parents from the image's own
/// directory; see [`backing_chain_with`]).
///
/// A backing file's format comes from the overlay's backing-format extension; without one it is
/// recognised by content, and an unrecognised backing file is refused, never assumed raw.
pub fn backing_chain(path: &Path, policy: &BackingPolicy) -> Result<Vec<ImageInfo>> {
    backing_chain_with(path, &ChainOptions::new(policy))
}

/// [`backing_chain`] with VDI parents proposed by `options.vdi_parents` and verified by UUID: a
/// VDI differencing image's parent is the next entry (its `backing-filename` is set to the
/// parent found, since the file itself names none).
pub fn backing_chain_with(path: &Path, options: &ChainOptions<'_>) -> Result<Vec<ImageInfo>> {
    backing_chain_as(path, None, options)
}

/// [`backing_chain_with`] reading the top image as `format` (`info -f FMT --backing-chain`).
pub fn backing_chain_as(
    path: &Path,
    format: Option<crate::ImageFormat>,
    options: &ChainOptions<'_>,
) -> Result<Vec<ImageInfo>> {
    let mut chain = Vec::new();
    let mut guard = ChainGuard::default();
    // Each image is released before the next is opened (the walker hands it over and the
    // visitor drops it), holding what qemu-img info holds: no consistent-read lock.
    let how = options.open_how().metadata_only();
    crate::chain::walk(path, format, options, how, &mut guard, true, |level| {
        let mut info = ImageInfo::from_header(&level.path, &level.header, &level.meta);
        info.read_bitmaps(&level.file, &level.header)?;
        info.snapshots = snapshot_infos(&level.file, &level.header)
            .map_err(|e| e.in_file("could not open", &level.path))?;
        if let (ImageHeader::Vdi(_), Some(parent)) = (&level.header, &level.below) {
            // A VDI names its parent by UUID only: report the file found.
            let name = parent.to_string_lossy().into_owned();
            info.backing_filename = Some(name.clone());
            info.full_backing_filename = Some(name);
            info.backing_filename_format = Some("vdi".into());
        }
        chain.push(info);
        Ok(())
    })?;
    Ok(chain)
}
