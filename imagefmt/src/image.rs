//! Any image's header, read natively: the facts every format shares (format, virtual size,
//! backing reference) behind one type, so callers need not match on formats.

use std::path::Path;

use crate::detect::{detect_foreign, detect_format, ImageFormat};
use crate::io::Backend;
use crate::qcow2::HeaderCluster;
use crate::vdi::{VdiHeader, HEADER_REGION_LEN};
use crate::{Error, Result};

/// The decoded header of a qcow2, VDI or raw image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageHeader {
    /// qcow2: cluster 0.
    Qcow2(HeaderCluster),
    /// VDI: pre-header and header.
    Vdi(Box<VdiHeader>),
    /// Raw: only a length.
    Raw {
        /// File length in bytes.
        len: u64,
    },
}

impl ImageHeader {
    /// Reads the header of `backend`, which the caller says is in `format`. A file that does
    /// not parse as that format is refused with [`Error::FormatMismatch`] naming `path`.
    pub fn read_as<B: Backend + ?Sized>(
        backend: &B,
        format: ImageFormat,
        path: &Path,
    ) -> Result<Self> {
        let mismatch = |source: Error| Error::FormatMismatch {
            path: path.to_owned(),
            expected: format.name(),
            source: source.into(),
        };
        match format {
            ImageFormat::Qcow2 => HeaderCluster::read_from(backend)
                .map(Self::Qcow2)
                .map_err(mismatch),
            ImageFormat::Vdi => {
                let mut bytes = [0u8; HEADER_REGION_LEN];
                let got = backend
                    .read_prefix_at(&mut bytes, 0)
                    .map_err(Error::reading("VDI header"))?;
                VdiHeader::parse(&bytes[..got])
                    .map(|h| Self::Vdi(Box::new(h)))
                    .map_err(|e| mismatch(e.into()))
            }
            ImageFormat::Raw => Ok(Self::Raw {
                len: backend.len().map_err(Error::reading("raw image length"))?,
            }),
        }
    }

    /// Reads the header as `format` says, or, without one, recognises the format by content
    /// ([`Self::read_detected`], with `raw_fallback`).
    pub fn read<B: Backend + ?Sized>(
        backend: &B,
        format: Option<ImageFormat>,
        path: &Path,
        raw_fallback: bool,
    ) -> Result<Self> {
        match format {
            Some(format) => Self::read_as(backend, format, path),
            None => Self::read_detected(backend, path, raw_fallback),
        }
    }

    /// Recognises the format by content (qcow2 or VDI) and reads the header. A format cowclone
    /// recognises but does not read (VMDK, VHD, …) is refused with [`Error::ForeignFormat`]. With
    /// `raw_fallback`, an unrecognised file is read as raw (what `info` does); without, it is
    /// refused with [`Error::UnrecognizedFormat`].
    pub fn read_detected<B: Backend + ?Sized>(
        backend: &B,
        path: &Path,
        raw_fallback: bool,
    ) -> Result<Self> {
        if let Some(format) = detect_format(backend)? {
            return Self::read_as(backend, format, path);
        }
        if let Some(format) = detect_foreign(backend)? {
            return Err(Error::ForeignFormat {
                path: path.to_owned(),
                format,
            });
        }
        if raw_fallback {
            Self::read_as(backend, ImageFormat::Raw, path)
        } else {
            Err(Error::UnrecognizedFormat {
                path: path.to_owned(),
            })
        }
    }

    /// The image's format.
    pub fn format(&self) -> ImageFormat {
        match self {
            Self::Qcow2(_) => ImageFormat::Qcow2,
            Self::Vdi(_) => ImageFormat::Vdi,
            Self::Raw { .. } => ImageFormat::Raw,
        }
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        match self {
            Self::Qcow2(c) => c.header.size,
            Self::Vdi(h) => h.virtual_size(),
            // qemu's raw driver reports whole sectors; the tail reads as zeros.
            Self::Raw { len } => len.next_multiple_of(512),
        }
    }

    /// The backing name stored in the image (qcow2 only: a VDI names its parent by UUID).
    pub fn backing_name(&self) -> Option<&str> {
        match self {
            Self::Qcow2(c) => c.backing_file.as_deref(),
            _ => None,
        }
    }

    /// The backing format stored in the image, if any.
    pub fn backing_format(&self) -> Option<&str> {
        match self {
            Self::Qcow2(c) => c.backing_format(),
            _ => None,
        }
    }
}

/// Opens `path` read-only (shared-read locks) and reads its header (format by content, raw if
/// unrecognised).
pub fn read_file_header(path: &Path) -> Result<(std::fs::File, ImageHeader)> {
    read_file_header_with(path, crate::open::OpenHow::read())
}

/// [`read_file_header`], opening the file as `how` says (e.g. with `--force-share`).
pub fn read_file_header_with(
    path: &Path,
    how: crate::open::OpenHow,
) -> Result<(std::fs::File, ImageHeader)> {
    let file = crate::open::open_image(path, how)?;
    let header = ImageHeader::read_detected(&file, path, true)?;
    Ok((file, header))
}
