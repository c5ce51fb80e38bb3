//! `resize`: a new virtual size for a qcow2 or raw image, as `qemu-img resize` gives it.
//!
//! The image is opened for writing through [`open_image`] (qemu's write locks, taken before its
//! header is read and held until the returned [`Resized`] is dropped). A qcow2 image is resized
//! by [`Qcow2Image::resize`] (the cluster-level part: growing may relocate the L1 table;
//! shrinking is refused over allocated data); a raw file is truncated or extended (sparsely).
//! VDI images are refused: their block map is sized at creation.

use std::fs::File;
use std::path::Path;
use std::str::FromStr;

use crate::chain::{qcow2_rw_from_file, ChainOptions};
use crate::detect::ImageFormat;
use crate::image::ImageHeader;
use crate::open::{open_image, OpenHow};
use crate::preallocate::{fill_host, Preallocation};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::WriteOptions;
use crate::size::{parse_size, InvalidSize};
use crate::{Error, Result};

/// The size asked for, as `qemu-img resize` reads it: absolute, or relative to the current one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSize {
    /// `SIZE`: exactly this many bytes.
    To(u64),
    /// `+SIZE`: this many bytes more.
    Grow(u64),
    /// `-SIZE`: this many bytes less.
    Shrink(u64),
}

impl FromStr for NewSize {
    type Err = InvalidSize;

    /// Reads `SIZE`, `+SIZE` or `-SIZE` ([`parse_size`] syntax).
    fn from_str(text: &str) -> Result<Self, InvalidSize> {
        if let Some(delta) = text.strip_prefix('+') {
            Ok(Self::Grow(parse_size(delta)?))
        } else if let Some(delta) = text.strip_prefix('-') {
            Ok(Self::Shrink(parse_size(delta)?))
        } else {
            Ok(Self::To(parse_size(text)?))
        }
    }
}

impl NewSize {
    /// The new size of an image now `current` bytes large.
    pub fn apply(self, current: u64) -> Result<u64> {
        let refused = |reason| Error::InvalidParameter {
            name: "size",
            reason,
        };
        match self {
            Self::To(size) => Ok(size),
            Self::Grow(delta) => current
                .checked_add(delta)
                .ok_or_else(|| refused("the new size overflows")),
            Self::Shrink(delta) => current
                .checked_sub(delta)
                .ok_or_else(|| refused("the image would shrink below zero")),
        }
    }
}

/// A resized image, still open and locked until this is dropped.
#[derive(Debug)]
pub struct Resized {
    /// The virtual size before.
    pub old_size: u64,
    /// The virtual size now (a qcow2 size is rounded up to whole 512-byte sectors).
    pub new_size: u64,
    /// The open image: its locks last as long as it does.
    _held: Held,
}

/// What keeps a resized image's locks.
enum Held {
    Qcow2 { _image: Box<Qcow2Image<File>> },
    Raw { _file: File },
}

impl std::fmt::Debug for Held {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Held::Qcow2 { .. } => "Qcow2",
            Held::Raw { .. } => "Raw",
        })
    }
}

/// How [`resize`] may change the image beyond its size.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResizeOptions {
    /// The image's format (`-f`); `None`: recognised by content, raw if unrecognised.
    pub format: Option<ImageFormat>,
    /// Allow a smaller size (`--shrink`). A qcow2 image still refuses it where data lies past
    /// the new end, unless `drop_data_past_end`.
    pub allow_shrink: bool,
    /// Shrinking a qcow2 image first discards the clusters past the new end (what qemu-img does
    /// with `--shrink`).
    pub drop_data_past_end: bool,
    /// How the added range is allocated (`--preallocation`; growing only; `metadata` is qcow2
    /// only).
    pub preallocation: Preallocation,
}

/// Resizes the qcow2 or raw image at `path` to `size`, as `options` allow. A qcow2 image's
/// backing chain is opened (read-only) as `chain` says, as for any write; its external data
/// file, where `chain` allows it, is opened for writing and resized with the disk, as qemu-img
/// resizes it.
pub fn resize(
    path: &Path,
    size: NewSize,
    options: &ResizeOptions,
    chain: &ChainOptions<'_>,
) -> Result<Resized> {
    let file = open_image(path, OpenHow::write())?;
    let header = ImageHeader::read(&file, options.format, path, true)?;
    let old_size = header.virtual_size();
    let new_size = size.apply(old_size)?;
    let preallocation = options.preallocation;
    if new_size < old_size && preallocation != Preallocation::Off {
        return Err(Error::InvalidParameter {
            name: "preallocation",
            reason: "Preallocation can only be used for growing images",
        });
    }
    match header.format() {
        ImageFormat::Qcow2 => {
            let mut image = qcow2_rw_from_file(file, path, chain, WriteOptions::default())?;
            if new_size < old_size && options.drop_data_past_end {
                // qemu-img's shrink: clusters past the end dropped, the file cut after its
                // last cluster in use (also to a size inside a cluster).
                image.shrink_dropping(new_size)?;
            } else if new_size > old_size {
                image.grow_preallocated(new_size, preallocation)?;
            } else {
                image.resize(new_size, options.allow_shrink)?;
            }
            image.flush()?;
            Ok(Resized {
                old_size,
                new_size: image.header().size,
                _held: Held::Qcow2 {
                    _image: Box::new(image),
                },
            })
        }
        ImageFormat::Raw => {
            if new_size < old_size && !options.allow_shrink {
                return Err(Error::InvalidParameter {
                    name: "size",
                    reason: "shrinking needs --shrink (data past the new end is lost in a raw \
                             image)",
                });
            }
            if preallocation == Preallocation::Metadata {
                return Err(Error::InvalidParameter {
                    name: "preallocation",
                    reason: "Unsupported preallocation mode: metadata",
                });
            }
            file.set_len(new_size)
                .map_err(Error::writing("raw image length"))?;
            if new_size > old_size {
                fill_host(&file, old_size, new_size - old_size, preallocation)?;
            }
            Ok(Resized {
                old_size,
                new_size,
                _held: Held::Raw { _file: file },
            })
        }
        ImageFormat::Vdi => Err(Error::InvalidParameter {
            name: "FILE",
            reason: "resizing VDI images is not supported",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backing::BackingPolicy;

    #[test]
    fn sizes_read_as_qemu_img_resize_reads_them() {
        assert_eq!("1G".parse(), Ok(NewSize::To(1 << 30)));
        assert_eq!("+64M".parse(), Ok(NewSize::Grow(64 << 20)));
        assert_eq!("-512k".parse(), Ok(NewSize::Shrink(512 << 10)));
        assert!("+x".parse::<NewSize>().is_err());
        assert_eq!(NewSize::Grow(5).apply(10).unwrap(), 15);
        assert_eq!(NewSize::Shrink(4).apply(10).unwrap(), 6);
        assert_eq!(NewSize::To(3).apply(10).unwrap(), 3);
        assert!(NewSize::Grow(1).apply(u64::MAX).is_err());
        assert!(NewSize::Shrink(11).apply(10).is_err());
    }

    /// `qemu-img info --output=json`'s virtual size of `path`.
    fn qemu_virtual_size(path: &Path) -> u64 {
        let output = std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(path)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "qemu-img is required for this cross-check (Debian package `qemu-utils`): {e}"
                )
            });
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        let info: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
        info["virtual-size"].as_u64().unwrap()
    }

    #[test]
    fn raw_and_qcow2_images_take_the_size_qemu_img_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let policy = BackingPolicy::FollowLocal;
        let follow = ChainOptions::new(&policy);

        let raw = dir.path().join("disk.raw");
        std::fs::write(&raw, vec![7u8; 4096]).unwrap();
        let resized = resize(
            &raw,
            "+1M".parse().unwrap(),
            &ResizeOptions::default(),
            &follow,
        )
        .unwrap();
        assert_eq!(
            (resized.old_size, resized.new_size),
            (4096, 4096 + (1 << 20))
        );
        drop(resized);
        assert_eq!(qemu_virtual_size(&raw), 4096 + (1 << 20));
        let refused =
            resize(&raw, NewSize::To(512), &ResizeOptions::default(), &follow).unwrap_err();
        assert!(refused.to_string().contains("--shrink"), "{refused}");
        let shrink = ResizeOptions {
            allow_shrink: true,
            ..ResizeOptions::default()
        };
        drop(resize(&raw, NewSize::To(512), &shrink, &follow).unwrap());
        assert_eq!(qemu_virtual_size(&raw), 512);

        let qcow2 = dir.path().join("disk.qcow2");
        crate::Qcow2Builder::new(&qcow2)
            .size(1 << 20)
            .create()
            .unwrap();
        let resized = resize(
            &qcow2,
            "+1000".parse().unwrap(),
            &ResizeOptions::default(),
            &follow,
        )
        .unwrap();
        // Rounded up to whole sectors, as qemu-img resize does.
        assert_eq!(resized.new_size, (1 << 20) + 1024);
        drop(resized);
        assert_eq!(qemu_virtual_size(&qcow2), (1 << 20) + 1024);
        assert!(resize(
            &qcow2,
            NewSize::Shrink(1024),
            &ResizeOptions::default(),
            &follow
        )
        .is_err());

        let vdi = dir.path().join("disk.vdi");
        crate::vdi::create_dynamic(&vdi, 1 << 20, Default::default()).unwrap();
        let refused = resize(
            &vdi,
            NewSize::Grow(1 << 20),
            &ResizeOptions::default(),
            &follow,
        )
        .unwrap_err();
        assert!(refused.to_string().contains("VDI"), "{refused}");
    }
}
