//! `convert --bitmaps`: the source's persistent dirty bitmaps copied into a qcow2 target, as
//! `qemu-img convert --bitmaps` copies them: each with its name, granularity, enabled or
//! disabled state and dirty bits, after the guest data.
//!
//! Nothing here writes a bitmap itself: each one is added, filled and disabled with
//! `qemu-img bitmap`'s actions ([`BitmapAction`]: add with the source's granularity, merge
//! from the source image, disable), which are the engine's one bitmap writer.
//!
//! ```text
//! BitmapCopy::prepare(source)   before anything is created: the source can hold bitmaps
//!                               (qcow2 v3), and none is in use unless --skip-broken-bitmaps
//! target_supports_bitmaps       before anything is created: the target is qcow2 v3
//! convert / convert_into        the guest data
//! BitmapCopy::copy_into(target) the bitmaps, in qemu-img's order
//! ```
//!
//! qemu-img visits the source's bitmaps in the reverse of their directory order: its
//! warnings, and the first bitmap it fails on, follow that order. The bitmaps it adds to the
//! target end up in the source's directory order after the target's own, and so they do here.
//! Unlike qemu-img, which creates the target before it finds that the target's format has no
//! bitmaps, cowclone refuses before anything is created.

use std::path::Path;

use thiserror::Error;

use crate::detect::ImageFormat;
use crate::image::ImageHeader;
use crate::open::{open_image, OpenHow};
use crate::qcow2::bitmap::{
    bitmap_len, read_directory, BitmapAction, BitmapEntry, BitmapFlags, MergeSource,
};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::WriteOptions;
use crate::qcow2::{HeaderCluster, Version};
use crate::Error;

/// Why the bitmaps could not be copied; the messages are qemu-img's.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum ConvertBitmapsError {
    /// More than one source image.
    #[error("Copying bitmaps only possible with single source")]
    SeveralSources,
    /// The source's format (or qcow2 version) has no persistent bitmaps.
    #[error("Source lacks bitmap support")]
    SourceUnsupported,
    /// The target's format (or qcow2 version) has no persistent bitmaps.
    #[error("Format driver '{format}' does not support bitmaps")]
    TargetUnsupported {
        /// The target's format name.
        format: &'static str,
    },
    /// A source bitmap is in use (inconsistent), and broken bitmaps are not skipped.
    #[error("Cannot copy inconsistent bitmap '{name}'\nTry --skip-broken-bitmaps, or use 'qemu-img bitmap --remove' to delete it")]
    Inconsistent {
        /// The bitmap's name.
        name: String,
    },
    /// The bitmap could not be added to the target.
    #[error("Failed to create bitmap {name}")]
    Create {
        /// The bitmap's name.
        name: String,
        /// Why.
        source: Error,
    },
    /// The bitmap was added but its bits could not be copied (it was removed again).
    #[error("Failed to populate bitmap {name}")]
    Populate {
        /// The bitmap's name.
        name: String,
        /// Why.
        source: Error,
    },
    /// An image could not be opened or read.
    #[error(transparent)]
    Image(#[from] Error),
}

/// A warning of the copy (without qemu-img's "warning: " prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SkippedBitmap {
    /// The bitmap's name.
    pub name: String,
}

impl std::fmt::Display for SkippedBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Skipping inconsistent bitmap '{}'", self.name)
    }
}

/// The bitmaps of a source image, checked and ready to be copied once the data is.
#[derive(Debug, Clone)]
pub struct BitmapCopy {
    /// The source's bitmap directory, in its order (in-use ones only if they are skipped).
    entries: Vec<BitmapEntry>,
}

impl BitmapCopy {
    /// Reads the bitmap directory of the source image `path` (its top layer; format `format`
    /// or recognised by content; opened as `how` says) and checks that the bitmaps can be
    /// copied: the image can hold bitmaps, and no bitmap is in use, unless `skip_broken`.
    pub fn prepare(
        path: &Path,
        format: Option<ImageFormat>,
        how: OpenHow,
        skip_broken: bool,
    ) -> Result<Self, ConvertBitmapsError> {
        let file = open_image(path, how.metadata_only())?;
        let cluster = match ImageHeader::read(&file, format, path, true)? {
            ImageHeader::Qcow2(cluster) if cluster.header.version == Version::V3 => cluster,
            _ => return Err(ConvertBitmapsError::SourceUnsupported),
        };
        let entries = read_directory(&file, &cluster).map_err(|e| e.in_file("image", path))?;
        if !skip_broken {
            if let Some(broken) = entries.iter().rev().find(|e| in_use(e)) {
                return Err(ConvertBitmapsError::Inconsistent {
                    name: broken.name_lossy(),
                });
            }
        }
        Ok(Self { entries })
    }

    /// Copies the bitmaps of the source image at `source` (as [`Self::prepare`] read them)
    /// into the qcow2 image at `target`, after its guest data was written: each is added with
    /// the source's granularity, gets the source's dirty bits and is disabled if the source's
    /// is. In-use bitmaps (left by [`Self::prepare`] only when they are to be skipped) are
    /// skipped, each reported to `warn`. Stops at the
    /// first bitmap that cannot be copied, as qemu-img does: the ones qemu-img would have
    /// copied before it are kept.
    pub fn copy_into(
        &self,
        source: &Path,
        how: OpenHow,
        target: &Path,
        warn: &mut dyn FnMut(&SkippedBitmap),
    ) -> Result<(), ConvertBitmapsError> {
        if self.entries.is_empty() {
            return Ok(());
        }
        let source_file = open_image(source, how.metadata_only())?;
        let source_cluster = HeaderCluster::read_from(&source_file)?;
        let file = open_image(target, OpenHow::write())?;
        let cluster = match ImageHeader::read_as(&file, ImageFormat::Qcow2, target)? {
            ImageHeader::Qcow2(cluster) => cluster,
            _ => unreachable!("read_as(Qcow2) returns a qcow2 header"),
        };
        let mut image = Qcow2Image::open_rw(file, cluster, None, WriteOptions::default())
            .map_err(|e| e.in_file("image", target))?;
        let existing = image.bitmaps().map_err(|e| e.in_file("image", target))?;
        // qemu-img's visit, in reverse directory order, up to the first bitmap it fails on:
        // a name the target has already, or disks of different sizes.
        let sizes_differ =
            bitmap_len(image.header().size) != bitmap_len(source_cluster.header.size);
        let mut first_copied = 0;
        let mut failure = None;
        for (index, entry) in self.entries.iter().enumerate().rev() {
            if in_use(entry) {
                warn(&SkippedBitmap {
                    name: entry.name_lossy(),
                });
                continue;
            }
            let name = entry.name_lossy();
            if existing.iter().any(|e| e.name == entry.name) {
                failure = Some(ConvertBitmapsError::Create {
                    name: name.clone(),
                    source: crate::qcow2::bitmap::BitmapError::Exists { name }.into(),
                });
            } else if sizes_differ {
                failure = Some(ConvertBitmapsError::Populate {
                    name,
                    source: crate::qcow2::bitmap::BitmapError::SizeMismatch {
                        destination: bitmap_len(image.header().size),
                        source_size: bitmap_len(source_cluster.header.size),
                    }
                    .into(),
                });
            }
            if failure.is_some() {
                first_copied = index + 1;
                break;
            }
        }
        let merge_source = MergeSource {
            backend: &source_file,
            cluster: &source_cluster,
        };
        let shown = target.display().to_string();
        for entry in &self.entries[first_copied..] {
            if in_use(entry) {
                continue;
            }
            let name = entry.name_lossy();
            let add = [BitmapAction::Add {
                granularity: Some(entry.granularity()),
            }];
            image
                .apply_bitmap_actions(&name, &add, &shown, None)
                .map_err(|(_, source)| ConvertBitmapsError::Create {
                    name: name.clone(),
                    source,
                })?;
            let mut fill = vec![BitmapAction::Merge {
                source: name.clone(),
            }];
            if !entry.flags.contains(BitmapFlags::AUTO) {
                fill.push(BitmapAction::Disable);
            }
            let filled = image.apply_bitmap_actions(
                &name,
                &fill,
                &shown,
                Some(merge_source_ref(&merge_source)),
            );
            if let Err((_, source)) = filled {
                // qemu-img removes the bitmap it could not fill.
                let _ = image.apply_bitmap_actions(&name, &[BitmapAction::Remove], &shown, None);
                return Err(ConvertBitmapsError::Populate { name, source });
            }
        }
        image.flush().map_err(|e| e.in_file("image", target))?;
        match failure {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

/// A copy of the merge source's references (it is used once per bitmap).
fn merge_source_ref<'a>(source: &MergeSource<'a>) -> MergeSource<'a> {
    MergeSource {
        backend: source.backend,
        cluster: source.cluster,
    }
}

/// True if the bitmap is flagged in use (qemu: inconsistent).
fn in_use(entry: &BitmapEntry) -> bool {
    entry.flags.contains(BitmapFlags::IN_USE)
}

/// Refuses a target that cannot hold persistent bitmaps: anything but qcow2, or qcow2 with
/// compat 0.10 (`version`: the qcow2 version the target has or will have).
pub fn target_supports_bitmaps(
    format: ImageFormat,
    version: Option<Version>,
) -> Result<(), ConvertBitmapsError> {
    match (format, version) {
        (ImageFormat::Qcow2, Some(Version::V3) | None) => Ok(()),
        _ => Err(ConvertBitmapsError::TargetUnsupported {
            format: format.name(),
        }),
    }
}

/// The qcow2 version of the existing image at `path` (`None` if it is not qcow2 or cannot be
/// read: the copy reports why).
pub fn existing_qcow2_version(path: &Path) -> Option<Version> {
    let file = open_image(path, OpenHow::read().metadata_only()).ok()?;
    match ImageHeader::read_as(&file, ImageFormat::Qcow2, path).ok()? {
        ImageHeader::Qcow2(cluster) => Some(cluster.header.version),
        _ => None,
    }
}
