//! Guest-visible bytes through a backing chain, whatever the formats in it.
//!
//! Every format implements [`GuestRead`]; an image whose data falls through (an unallocated
//! qcow2 cluster) asks the next image down. [`open_chain`] opens a file and its backing files,
//! following names only under the caller's [`BackingPolicy`], with [`ChainGuard`]'s depth and loop
//! limits, and pinning each backing file's format from its overlay's header — a backing file
//! whose format is not recorded is recognised by magic and never assumed to be raw.
//!
//! A VDI differencing image names no parent path, only a UUID: [`ChainOptions::vdi_parents`]
//! says who proposes parent files (the image's own directory by default, or the user's
//! `--parent` list, or a registry), and each proposal is verified by UUID and followed only as
//! the policy allows.

use std::fs::File;
use std::os::fd::BorrowedFd;
use std::path::{Path, PathBuf};

use crate::backing::{BackingPolicy, ChainGuard};
use crate::detect::ImageFormat;
use crate::extent::{check_range, Extent, ExtentKind, GuestRead, Named};
use crate::image::ImageHeader;
use crate::offsets::GuestOffset;
use crate::open::{open_image, OpenHow};
use crate::qcow2::image::Qcow2Image;
use crate::raw::RawReader;
use crate::vdi::{ParentLink, ParentResolver, SameDirectory, VdiHeader, VdiImage};
use crate::{Error, Result};

/// How a chain is opened: which files below the top may be followed, and how.
#[derive(Clone, Copy)]
pub struct ChainOptions<'a> {
    /// Which backing files, VDI parents and data files may be followed.
    pub policy: &'a BackingPolicy,
    /// Let qcow2 images read guest data from the external data file their header names
    /// (resolved and confined like a backing file). Only for trusted or confined images.
    pub allow_data_files: bool,
    /// Who proposes the parent of a VDI differencing image; `None` searches the image's own
    /// directory ([`SameDirectory`]). Proposals are verified by UUID whoever makes them.
    pub vdi_parents: Option<&'a dyn ParentResolver>,
    /// Read images that other processes may be writing (`-U`/`--force-share`): take no lock
    /// that keeps writers out and check none against them. Off by default: reads are refused
    /// while another process (qemu, or another cowclone) writes an image of the chain.
    pub force_share: bool,
    /// Accept block devices as images of the chain (refused by default: only regular files).
    pub block_devices: bool,
    /// Read the top image as of this internal snapshot (qcow2 only; [`Qcow2Image::view_snapshot`]):
    /// qemu-img's `convert -l`. The images below it are read as they are.
    pub snapshot: Option<&'a crate::qcow2::snapshot_view::SnapshotKey>,
    /// Where a relative data file name from a header is looked up (with `allow_data_files`).
    pub data_file_base: DataFileBase,
    /// The top image's data file, named by the caller instead of by the image's header (qemu's
    /// `data-file.filename` option). Opened whatever `allow_data_files` says (the caller named
    /// it), as a regular file; an image without the data-file feature refuses it, as qemu does.
    pub data_file: Option<&'a Path>,
}

/// Where a relative external data file name from a qcow2 header is looked up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum DataFileBase {
    /// The directory of the image that names it, as for backing file names (cowclone's
    /// default: the image and its data file can move together).
    #[default]
    ImageDirectory,
    /// The working directory: the name is opened as it is, as qemu 10 opens it (the
    /// qemu-img personality).
    WorkingDirectory,
}

impl DataFileBase {
    /// The path of the data file `name` recorded by (or for) the image at `image_path`; a
    /// protocol (`json:`, `nbd:`) or empty name is refused.
    pub fn resolve(
        self,
        image_path: &Path,
        name: &str,
    ) -> std::result::Result<PathBuf, crate::backing::BackingError> {
        match self {
            Self::ImageDirectory => crate::backing::resolve(image_path, name),
            Self::WorkingDirectory => crate::backing::resolve_in_working_directory(name),
        }
    }
}

impl<'a> ChainOptions<'a> {
    /// Follows what `policy` allows; no data files; VDI parents from the image's directory.
    pub fn new(policy: &'a BackingPolicy) -> Self {
        Self {
            policy,
            allow_data_files: false,
            vdi_parents: None,
            force_share: false,
            block_devices: false,
            snapshot: None,
            data_file_base: DataFileBase::ImageDirectory,
            data_file: None,
        }
    }

    /// How each image of the chain is opened: for reading, with `force_share` and
    /// `block_devices` as set.
    pub fn open_how(&self) -> OpenHow {
        OpenHow::reading(self.force_share).with_block_devices(self.block_devices)
    }

    /// The VDI parent resolver in effect.
    pub(crate) fn vdi_resolver(&self) -> &'a dyn ParentResolver {
        self.vdi_parents.unwrap_or(&SameDirectory)
    }

    /// These options with `resolver` proposing VDI parents.
    pub fn with_vdi_parents(self, resolver: &'a dyn ParentResolver) -> Self {
        Self {
            vdi_parents: Some(resolver),
            ..self
        }
    }
}

/// qemu's `bdrv_block_status_above` as `qemu-img map` and `convert` use it: the status of the
/// chain `top` at `start`, at most `max_len` bytes (clamped to the disk, never empty).
///
/// Each layer from the top answers for the range; an unallocated answer asks the layer below,
/// narrowed to what the upper layers left open. The walk stops at the first layer that
/// provides the range (data or zeros), at the bottom layer ([`Unallocated`](crate::extent::ExtentKind::Unallocated): reads
/// as zeros), or where the range lies past the end of a shorter layer below (zeros, reported as
/// unallocated at the depth where the walk stopped, as qemu does).
pub fn block_status(top: &dyn GuestRead, start: GuestOffset, max_len: u64) -> Result<Extent> {
    let size = top.virtual_size();
    check_range(start.0, 1, size)?;
    let mut bytes = max_len.min(size - start.0).max(1);
    let mut layer = top;
    let mut depth = 0u32;
    loop {
        bytes = bytes
            .min(layer.virtual_size().saturating_sub(start.0))
            .max(1);
        let mut extent = layer.block_status(start, bytes)?;
        bytes = extent.len;
        let below = layer.below().filter(|below| start.0 < below.virtual_size());
        match below {
            Some(below) if !extent.is_allocated() => {
                layer = below;
                depth += 1;
            }
            _ => {
                extent.depth = depth;
                return Ok(extent);
            }
        }
    }
}

/// Reads one extent of the chain `top` (as [`block_status`] returned it, or a piece of one) into
/// `buf` (`buf.len() == extent.len`): zeros without reading anything, uncompressed data straight
/// from its layer's file at its host offset, anything else through [`GuestRead::read_at`].
pub fn read_extent(top: &dyn GuestRead, extent: &Extent, buf: &mut [u8]) -> Result<()> {
    if extent.reads_as_zeros() {
        buf.fill(0);
        return Ok(());
    }
    if let Some((fd, offset)) = verbatim_source(top, extent) {
        let mut done = 0;
        while done < buf.len() {
            match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(Error::reading("guest data")(e.into())),
            }
        }
        // Past the end of the file reads as zeros, as qemu's file driver does.
        buf[done..].fill(0);
        return Ok(());
    }
    top.read_at(buf, extent.start)
}

/// The open file and offset holding `extent`'s bytes verbatim (uncompressed data of a layer
/// backed by a real file), when there is one.
pub(crate) fn verbatim_source<'a>(
    top: &'a dyn GuestRead,
    extent: &Extent,
) -> Option<(BorrowedFd<'a>, u64)> {
    let ExtentKind::Data {
        compressed: false,
        zero: false,
    } = extent.kind
    else {
        return None;
    };
    let host = extent.host?;
    let layer = layer_at(top, extent.depth)?;
    Some((layer.host_fd(host.file)?, host.offset.0))
}

/// The layer `depth` steps below `top` (the one a chain extent of that depth comes from).
pub(crate) fn layer_at(top: &dyn GuestRead, depth: u32) -> Option<&dyn GuestRead> {
    let mut layer = top;
    for _ in 0..depth {
        layer = layer.below()?;
    }
    Some(layer)
}

/// Every extent of `top` from `start` to the end of the disk, in order, each as long as
/// [`block_status`] answers (adjacent extents are not merged). Errors end the walk.
pub fn extents(top: &dyn GuestRead, start: GuestOffset) -> Extents<'_> {
    extents_until(top, start, top.virtual_size())
}

/// [`extents`] up to guest offset `end` (the disk's end at most): the last extent is cut there,
/// and no extent is probed past it.
pub fn extents_until(top: &dyn GuestRead, start: GuestOffset, end: u64) -> Extents<'_> {
    Extents {
        top,
        next: start,
        end: end.min(top.virtual_size()),
        failed: false,
    }
}

/// The iterator of [`extents`] and [`extents_until`].
pub struct Extents<'a> {
    top: &'a dyn GuestRead,
    next: GuestOffset,
    end: u64,
    failed: bool,
}

impl Iterator for Extents<'_> {
    type Item = Result<Extent>;
    fn next(&mut self) -> Option<Result<Extent>> {
        if self.failed || self.next.0 >= self.end {
            return None;
        }
        // qemu probes at most 1 GiB at a time.
        let result = block_status(self.top, self.next, (self.end - self.next.0).min(1 << 30));
        match &result {
            Ok(extent) => self.next = extent.end(),
            Err(_) => self.failed = true,
        }
        Some(result)
    }
}

/// Opens `path` (format from content, raw if unrecognised, unless `format` names it) and every
/// backing file below it that `policy` allows.
///
/// Images with an external data file are refused: use [`open_chain_allowing_data_files`].
pub fn open_chain(
    path: &Path,
    format: Option<ImageFormat>,
    policy: &BackingPolicy,
) -> Result<Box<dyn GuestRead>> {
    open_chain_with(path, format, &ChainOptions::new(policy))
}

/// Like [`open_chain`], but qcow2 images in the chain may read their guest data from the
/// external data file their header names, resolved and confined like a backing file under
/// `policy`. Only for callers who trust the images or confine them: the name can point at any
/// host file.
pub fn open_chain_allowing_data_files(
    path: &Path,
    format: Option<ImageFormat>,
    policy: &BackingPolicy,
) -> Result<Box<dyn GuestRead>> {
    let options = ChainOptions {
        allow_data_files: true,
        ..ChainOptions::new(policy)
    };
    open_chain_with(path, format, &options)
}

/// One image of a chain as [`walk`] finds it.
pub(crate) struct Level {
    /// The path it was opened by (as resolved from the name above it).
    pub path: PathBuf,
    /// The open file (read-only).
    pub file: File,
    /// The file's metadata.
    pub meta: std::fs::Metadata,
    /// Its header.
    pub header: ImageHeader,
    /// The image below it that the walk goes on to (backing file or VDI parent), if any.
    pub below: Option<PathBuf>,
}

/// The image a chain goes on to below another.
struct Next {
    /// Its path, resolved from the name (or found by UUID) above it.
    path: PathBuf,
    /// Its format, if the image above records it (else recognised by content).
    format: Option<ImageFormat>,
    /// For a VDI parent: the creation UUID it must carry (the child's linkage UUID), checked
    /// again on the file the walk opens.
    vdi_linkage: Option<uuid::Uuid>,
}

/// Where a chain goes below the image `header` at `path`: its backing file (qcow2, resolved
/// under the policy, with the format its header records) or its VDI parent (proposed by the
/// resolver, verified by UUID); `None` at the bottom or under [`BackingPolicy::Detach`].
fn next_below(
    path: &Path,
    header: &ImageHeader,
    options: &ChainOptions<'_>,
) -> Result<Option<Next>> {
    if *options.policy == BackingPolicy::Detach {
        return Ok(None);
    }
    match header {
        ImageHeader::Vdi(vdi) if vdi.is_differencing() => Ok(Some(Next {
            path: crate::vdi::find_parent(path, vdi, options.policy, options.vdi_resolver())?,
            format: Some(ImageFormat::Vdi),
            vdi_linkage: Some(vdi.uuid_linkage),
        })),
        ImageHeader::Qcow2(cluster) => match cluster.backing_file.as_deref() {
            Some(name) => Ok(Some(Next {
                path: options.policy.resolve(path, name)?,
                format: cluster.backing_format().map(str::parse).transpose()?,
                vdi_linkage: None,
            })),
            None => Ok(None),
        },
        _ => Ok(None),
    }
}

/// The one chain walker: opens `path` (format from content, raw if unrecognised when `top`,
/// unless `format` names it) and every image below it that `options` allows, top first, handing
/// each to `visit`. Depth and loops are bounded by `guard`; a backing file whose format is not
/// recorded is recognised by content and never assumed raw. Each file is opened through
/// [`open_image`] as `how` says (regular files only; qemu's locks held from before its header
/// is read for as long as the visitor keeps the file).
pub(crate) fn walk(
    path: &Path,
    format: Option<ImageFormat>,
    options: &ChainOptions<'_>,
    how: OpenHow,
    guard: &mut ChainGuard,
    top: bool,
    visit: impl FnMut(Level) -> Result<()>,
) -> Result<()> {
    let first = Next {
        path: path.to_owned(),
        format,
        vdi_linkage: None,
    };
    walk_from(first, options, how, guard, top, visit)
}

/// [`walk`] from `next` on.
fn walk_from(
    next: Next,
    options: &ChainOptions<'_>,
    how: OpenHow,
    guard: &mut ChainGuard,
    top: bool,
    mut visit: impl FnMut(Level) -> Result<()>,
) -> Result<()> {
    let mut next = Some(next);
    let mut top = top;
    while let Some(Next {
        path,
        format,
        vdi_linkage,
    }) = next.take()
    {
        // An image met again is a loop, reported as such before its lock could clash with ours.
        guard.refuse_seen(&path)?;
        let file = open_image(&path, how)?;
        let meta = file
            .metadata()
            .map_err(Error::io(format!("reading metadata of {}", path.display())))?;
        guard.enter(&path, &meta)?;
        let header = ImageHeader::read(&file, format, &path, top)?;
        if let Some(linkage) = vdi_linkage {
            // The file opened (and locked) is the parent that was verified by UUID.
            crate::vdi::check_parent(&path, &header, linkage)?;
        }
        top = false;
        next = next_below(&path, &header, options)?;
        tracing::debug!(path = %path.display(), format = %header.format().name(), below = ?next.as_ref().map(|n| &n.path), "chain layer opened");
        visit(Level {
            below: next.as_ref().map(|n| n.path.clone()),
            path,
            file,
            meta,
            header,
        })?;
    }
    Ok(())
}

/// Opens `path` (format from content, raw if unrecognised, unless `format` names it) and every
/// image below it that `options` allows: qcow2 backing files, VDI parents, data files.
pub fn open_chain_with(
    path: &Path,
    format: Option<ImageFormat>,
    options: &ChainOptions<'_>,
) -> Result<Box<dyn GuestRead>> {
    let mut guard = ChainGuard::default();
    let first = Next {
        path: path.to_owned(),
        format,
        vdi_linkage: None,
    };
    let levels = walk_levels(first, options, &mut guard, true)?;
    // The walk visits at least the top image (or fails), so a chain is always there.
    open_levels(levels, options, options.data_file)?.ok_or_else(|| Error::UnrecognizedFormat {
        path: path.to_owned(),
    })
}

/// Walks the chain from `next` on (opening each image for reading as `options` say).
fn walk_levels(
    next: Next,
    options: &ChainOptions<'_>,
    guard: &mut ChainGuard,
    top: bool,
) -> Result<Vec<Level>> {
    let mut levels = Vec::new();
    walk_from(next, options, options.open_how(), guard, top, |level| {
        levels.push(level);
        Ok(())
    })?;
    Ok(levels)
}

/// Opens the images a walk found bottom-up, each layer over the one below it; `top_data_file`:
/// the data file the caller named for the first of `levels` (see [`ChainOptions::data_file`]).
fn open_levels(
    levels: Vec<Level>,
    options: &ChainOptions<'_>,
    top_data_file: Option<&Path>,
) -> Result<Option<Box<dyn GuestRead>>> {
    let mut below: Option<Box<dyn GuestRead>> = None;
    let top = levels.len().saturating_sub(1);
    for (index, level) in levels.into_iter().rev().enumerate() {
        let path = level.path.clone();
        let mut data_path = None;
        let snapshot = options.snapshot.filter(|_| index == top);
        let given = top_data_file.filter(|_| index == top);
        let layer = open_layer(
            level,
            below.take(),
            options,
            snapshot,
            given,
            &mut data_path,
        )?;
        below = Some(Box::new(Named::new(layer, path).with_data_file(data_path)));
    }
    Ok(below)
}

/// Opens the qcow2 image at `path` for reading and writing (holding qemu's write locks), with
/// its backing chain (read-only, shared-read locks, under `policy`) below it. An image with an
/// external data file is refused: [`open_qcow2_rw_with`] may open its data file.
pub fn open_qcow2_rw(
    path: &Path,
    policy: &BackingPolicy,
    options: crate::qcow2::write::WriteOptions,
) -> Result<crate::qcow2::image::Qcow2Image<File>> {
    open_qcow2_rw_with(path, &ChainOptions::new(policy), options)
}

/// [`open_qcow2_rw`] with the backing chain opened as `chain` says, and the image's external
/// data file, if it has one, found as for a read ([`ChainOptions::allow_data_files`], or the
/// file [`ChainOptions::data_file`] names) and opened for writing, a regular file under qemu's
/// write locks, as qemu locks it: new guest data then goes into it (see
/// `qcow2::data_file`). Where `chain` does not allow it, such an image is refused.
pub fn open_qcow2_rw_with(
    path: &Path,
    chain: &ChainOptions<'_>,
    options: crate::qcow2::write::WriteOptions,
) -> Result<crate::qcow2::image::Qcow2Image<File>> {
    let file = open_image(path, OpenHow::write())?;
    qcow2_rw_from_file(file, path, chain, options)
}

/// [`open_qcow2_rw_with`] on a file the caller already opened for writing with [`open_image`]
/// (so its locks are held from before its header was read).
pub(crate) fn qcow2_rw_from_file(
    file: File,
    path: &Path,
    chain: &ChainOptions<'_>,
    options: crate::qcow2::write::WriteOptions,
) -> Result<crate::qcow2::image::Qcow2Image<File>> {
    let meta = file
        .metadata()
        .map_err(Error::io(format!("reading metadata of {}", path.display())))?;
    let mut guard = ChainGuard::default();
    guard.enter(path, &meta)?;
    let header = ImageHeader::read_as(&file, ImageFormat::Qcow2, path)?;
    // The chain below is read as of now, whatever snapshot a read would view.
    let chain_options = ChainOptions {
        snapshot: None,
        ..*chain
    };
    let below = match next_below(path, &header, &chain_options)? {
        Some(next) => open_levels(
            walk_levels(next, &chain_options, &mut guard, false)?,
            &chain_options,
            None,
        )?,
        None => None,
    };
    let ImageHeader::Qcow2(cluster) = header else {
        unreachable!("read_as(Qcow2) returns a qcow2 header");
    };
    qcow2_rw_over(file, path, cluster, below, chain, options)
}

/// [`open_qcow2_rw_with`] without the backing chain: the image alone, what would fall through
/// to its backing file reading as zeros (its external data file still found under `chain`'s
/// policy).
pub fn open_qcow2_rw_alone(
    path: &Path,
    chain: &ChainOptions<'_>,
    options: crate::qcow2::write::WriteOptions,
) -> Result<crate::qcow2::image::Qcow2Image<File>> {
    let file = open_image(path, OpenHow::write())?;
    let ImageHeader::Qcow2(cluster) = ImageHeader::read_as(&file, ImageFormat::Qcow2, path)? else {
        unreachable!("read_as(Qcow2) returns a qcow2 header");
    };
    qcow2_rw_over(file, path, cluster, None, chain, options)
}

/// The qcow2 image `file` at `path` (its header `cluster`) opened for writing over `below`,
/// with its external data file, if it has one, opened for writing where `chain` allows it (the
/// one place a writer opens a data file); refused where it does not.
pub(crate) fn qcow2_rw_over(
    file: File,
    path: &Path,
    cluster: crate::qcow2::HeaderCluster,
    below: Option<Box<dyn GuestRead>>,
    chain: &ChainOptions<'_>,
    options: crate::qcow2::write::WriteOptions,
) -> Result<crate::qcow2::image::Qcow2Image<File>> {
    match open_data_file(path, &cluster, chain, chain.data_file, OpenHow::write())? {
        Some((_, data)) => {
            Qcow2Image::open_rw_with_data_file(file, cluster, below, Box::new(data), options)
        }
        None => Qcow2Image::open_rw(file, cluster, below, options),
    }
}

/// Opens the VDI image at `path` for reading with the chain of parents below it, found as
/// `options` say (resolver, policy; each verified by UUID). A differencing image whose parent is
/// not found is refused, as is one with a null linkage UUID: the bottom of a chain is never a
/// differencing image. The links found are in [`VdiImage::parent_links`].
pub fn open_vdi(path: &Path, options: &ChainOptions<'_>) -> Result<VdiImage<File>> {
    let file = open_image(path, options.open_how())?;
    let header = read_vdi_header(&file, path)?;
    vdi_over_parents(file, header, path, options, None)
}

/// Opens the VDI image at `path` for reading and writing (holding qemu's write locks), its
/// parent chain (read-only, opened as `options` say) below it. With `durable`, dependent
/// metadata updates are separated by fsync.
pub fn open_vdi_rw(
    path: &Path,
    options: &ChainOptions<'_>,
    durable: bool,
) -> Result<VdiImage<File>> {
    let file = open_image(path, OpenHow::write())?;
    let header = read_vdi_header(&file, path)?;
    vdi_over_parents(file, header, path, options, Some(durable))
}

/// [`open_vdi`] on a file the caller already opened with [`open_image`] and whose header it read
/// as `header` (so the image's locks are the caller's).
pub fn vdi_from_file(
    file: File,
    header: VdiHeader,
    path: &Path,
    options: &ChainOptions<'_>,
) -> Result<VdiImage<File>> {
    vdi_over_parents(file, header, path, options, None)
}

/// The VDI header of the image `file` at `path`.
fn read_vdi_header(file: &File, path: &Path) -> Result<VdiHeader> {
    match ImageHeader::read_as(file, ImageFormat::Vdi, path)? {
        ImageHeader::Vdi(header) => Ok(*header),
        _ => unreachable!("read_as(Vdi) returns a VDI header"),
    }
}

/// The VDI image `file` (header `header`, at `path`) over its parents as [`walk`] finds them,
/// with its [`ParentLink`]s; open for writing when `durable` is given.
fn vdi_over_parents(
    file: File,
    header: VdiHeader,
    path: &Path,
    options: &ChainOptions<'_>,
    durable: Option<bool>,
) -> Result<VdiImage<File>> {
    let meta = file
        .metadata()
        .map_err(Error::io(format!("reading metadata of {}", path.display())))?;
    let mut guard = ChainGuard::default();
    guard.enter(path, &meta)?;
    let header = ImageHeader::Vdi(Box::new(header));
    let levels = match next_below(path, &header, options)? {
        Some(next) => walk_levels(next, options, &mut guard, false)?,
        None => Vec::new(),
    };
    let ImageHeader::Vdi(header) = header else {
        unreachable!("built as a VDI header above");
    };
    let links = vdi_links(path, &header, &levels);
    let below = open_levels(levels, options, None)?;
    let mut image = match durable {
        Some(durable) => VdiImage::open_rw(file, *header, below, durable)?,
        None => VdiImage::open(file, *header, below)?,
    };
    image.links = links;
    Ok(image)
}

/// The links from the VDI image `top` (header `header`) down the VDI parents in `levels`.
fn vdi_links(top: &Path, header: &VdiHeader, levels: &[Level]) -> Vec<ParentLink> {
    let mut links = Vec::new();
    let mut child = (top, header);
    for level in levels {
        let ImageHeader::Vdi(parent) = &level.header else {
            break;
        };
        if !child.1.is_differencing() {
            break;
        }
        links.push(ParentLink::between(child.0, child.1, &level.path, parent));
        child = (&level.path, parent);
    }
    links
}

/// Opens one image found by [`walk`] over the already opened image below it (with `snapshot`:
/// a qcow2 image read as of that internal snapshot; with `given`: the data file the caller
/// named for it).
fn open_layer(
    level: Level,
    below: Option<Box<dyn GuestRead>>,
    options: &ChainOptions<'_>,
    snapshot: Option<&crate::qcow2::snapshot_view::SnapshotKey>,
    given: Option<&Path>,
    data_path: &mut Option<PathBuf>,
) -> Result<Box<dyn GuestRead>> {
    let Level {
        path, file, header, ..
    } = level;
    if let Some(key) = snapshot {
        let ImageHeader::Qcow2(cluster) = header else {
            return Err(Error::UnsupportedFormat {
                name: format!(
                    "internal snapshots of {} images (only qcow2 has them)",
                    header.format().name()
                ),
            });
        };
        let mut image = Qcow2Image::open(file, cluster, below)?;
        image.view_snapshot(key)?;
        return Ok(Box::new(image));
    }
    if given.is_some() && !matches!(header, ImageHeader::Qcow2(_)) {
        return Err(Error::InFile {
            role: "could not open",
            path,
            source: Error::from(crate::qcow2::Qcow2Error::DataFileNotExpected).into(),
        });
    }
    match header {
        ImageHeader::Raw { .. } => Ok(Box::new(RawReader::new(file)?)),
        ImageHeader::Vdi(header) => Ok(Box::new(crate::vdi::VdiImage::open(file, *header, below)?)),
        ImageHeader::Qcow2(cluster) => {
            match open_data_file(&path, &cluster, options, given, options.open_how())? {
                Some((resolved, data)) => {
                    *data_path = Some(resolved);
                    Ok(Box::new(Qcow2Image::open_with_data_file(
                        file,
                        cluster,
                        below,
                        Box::new(data),
                    )?))
                }
                None => Ok(Box::new(Qcow2Image::open(file, cluster, below)?)),
            }
        }
    }
}

/// Opens the external data file of the qcow2 image at `path` (cluster 0: `cluster`) as
/// `options` allow, with its resolved path: the file the caller named (`given`, qemu's
/// `data-file.filename`), else the name the header records, resolved as
/// [`ChainOptions::data_file_base`] says and admitted by the policy, and opened as `how` says
/// (locks included). `None` when the image has no data file, or when data files are not allowed
/// (the image then refuses to open).
///
/// qemu's refusals: a data file given for an image without one, and an image whose header
/// names none when none is given. A failure to open the file names the image and the data file
/// (`Could not open 'IMAGE': Could not open 'DATA': ...` in qemu's words).
pub(crate) fn open_data_file(
    path: &Path,
    cluster: &crate::qcow2::HeaderCluster,
    options: &ChainOptions<'_>,
    given: Option<&Path>,
    how: OpenHow,
) -> Result<Option<(PathBuf, File)>> {
    let has_data_file = cluster
        .header
        .incompatible_features
        .contains(crate::qcow2::features::IncompatibleFeatures::EXTERNAL_DATA_FILE);
    let refused = |e: crate::qcow2::Qcow2Error| Error::InFile {
        role: "could not open",
        path: path.to_owned(),
        source: Error::from(e).into(),
    };
    let resolved = match (given, cluster.data_file()) {
        _ if !has_data_file && given.is_some() => {
            return Err(refused(crate::qcow2::Qcow2Error::DataFileNotExpected))
        }
        _ if !has_data_file => return Ok(None),
        (Some(given), _) => given.to_owned(),
        _ if !options.allow_data_files => return Ok(None),
        (None, None) => return Err(refused(crate::qcow2::Qcow2Error::DataFileRequired)),
        (None, Some(name)) => options
            .policy
            .admit(options.data_file_base.resolve(path, name)?, name)?,
    };
    let data = open_image(&resolved, how).map_err(|e| Error::InFile {
        role: "could not open",
        path: path.to_owned(),
        source: Error::InFile {
            role: "could not open data file",
            path: resolved.clone(),
            source: e.into(),
        }
        .into(),
    })?;
    Ok(Some((resolved, data)))
}
