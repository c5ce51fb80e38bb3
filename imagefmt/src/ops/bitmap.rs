//! `bitmap`: `qemu-img bitmap`'s actions on a qcow2 image's persistent dirty bitmaps, applied
//! in order, each written to the image before the next (the codec and the on-disk work are
//! [`crate::qcow2::bitmap`]).

use std::path::Path;

use thiserror::Error;

use crate::backing::BackingPolicy;
use crate::chain::ChainOptions;
use crate::detect::ImageFormat;
use crate::image::ImageHeader;
use crate::open::{open_image, OpenHow};
use crate::qcow2::bitmap::{BitmapAction, BitmapError, MergeSource};
use crate::qcow2::write::WriteOptions;
use crate::qcow2::HeaderCluster;
use crate::Error;

/// Where `--merge` reads its source bitmap: another image (`-b FILE [-F FMT]`).
#[derive(Debug, Clone, Copy)]
pub struct SourceImage<'a> {
    /// The source image.
    pub path: &'a Path,
    /// Its format (`-F`); recognised by content without one.
    pub format: Option<ImageFormat>,
}

/// A failed `bitmap` command, as qemu-img reports it.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum BitmapCommandError {
    /// The image (or the merge source) could not be opened.
    #[error(transparent)]
    Open(Error),
    /// An action failed; the actions before it were applied. The cause is the source (qemu-img
    /// prints both on one line, joined by ": ").
    #[error("Operation {action} on bitmap {bitmap} failed")]
    Action {
        /// The action's name (`add`, `remove`, ...).
        action: &'static str,
        /// The bitmap named on the command line.
        bitmap: String,
        /// Why.
        source: Error,
    },
}

/// Applies `actions` to bitmap `name` of the qcow2 image at `path` (`format`: `-f`, which must
/// be qcow2 if given), reading merge sources from `source` if given, else from the image. An
/// image with an external data file is refused: [`bitmap_with`] opens it.
pub fn bitmap(
    path: &Path,
    format: Option<ImageFormat>,
    name: &str,
    actions: &[BitmapAction],
    source: Option<SourceImage<'_>>,
) -> Result<(), BitmapCommandError> {
    let chain = ChainOptions::new(&BackingPolicy::Detach);
    bitmap_with(path, format, name, actions, source, &chain)
}

/// [`bitmap`] with the image's external data file, if it has one, found as `chain` allows
/// (its backing file is never opened) and held open for writing, with qemu's write locks, for
/// as long as the image is, as qemu-img holds it.
pub fn bitmap_with(
    path: &Path,
    format: Option<ImageFormat>,
    name: &str,
    actions: &[BitmapAction],
    source: Option<SourceImage<'_>>,
    chain: &ChainOptions<'_>,
) -> Result<(), BitmapCommandError> {
    let open = BitmapCommandError::Open;
    let file = open_image(path, OpenHow::write()).map_err(open)?;
    let cluster = match ImageHeader::read(&file, format, path, true).map_err(open)? {
        ImageHeader::Qcow2(cluster) => cluster,
        _ => {
            return Err(BitmapCommandError::Action {
                action: actions.first().map_or("add", BitmapAction::name),
                bitmap: name.to_owned(),
                source: BitmapError::NotSupported {
                    image: path.display().to_string(),
                }
                .into(),
            })
        }
    };
    let mut image =
        crate::chain::qcow2_rw_over(file, path, cluster, None, chain, WriteOptions::default())
            .map_err(|e| open(e.in_file("image", path)))?;
    let source_file;
    let source_cluster: HeaderCluster;
    let merge_source = match source {
        Some(src) => {
            source_file = open_image(src.path, OpenHow::read()).map_err(open)?;
            source_cluster =
                match ImageHeader::read(&source_file, src.format, src.path, true).map_err(open)? {
                    ImageHeader::Qcow2(c) => c,
                    _ => {
                        return Err(BitmapCommandError::Action {
                            action: "merge",
                            bitmap: name.to_owned(),
                            source: BitmapError::NotFound {
                                name: actions
                                    .iter()
                                    .find_map(|a| match a {
                                        BitmapAction::Merge { source } => Some(source.clone()),
                                        _ => None,
                                    })
                                    .unwrap_or_default(),
                            }
                            .into(),
                        })
                    }
                };
            Some(MergeSource {
                backend: &source_file,
                cluster: &source_cluster,
            })
        }
        None => None,
    };
    let shown = path.display().to_string();
    image
        .apply_bitmap_actions(name, actions, &shown, merge_source)
        .map_err(|(i, source)| BitmapCommandError::Action {
            action: actions[i].name(),
            bitmap: name.to_owned(),
            source,
        })?;
    image.flush().map_err(|e| open(e.in_file("image", path)))
}
