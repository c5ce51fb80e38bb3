//! Which format a file is, from its content: the single entry point for format detection.
//!
//! Only qcow2 (magic at 0) and VDI (signature at 0x40) are recognised by content. Anything
//! else is *unrecognised*, never silently "raw": a raw disk can carry any bytes, including a fake
//! qcow2 header, so raw must be named by the caller (FORMATS.md §1.4).

use std::fmt;
use std::str::FromStr;

use crate::io::Backend;
use crate::Error;

/// The image formats imagefmt understands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ImageFormat {
    /// QEMU copy-on-write v2/v3.
    Qcow2,
    /// VirtualBox disk image.
    Vdi,
    /// Plain bytes.
    Raw,
}

impl ImageFormat {
    /// The name qemu-img uses (`qcow2`, `vdi`, `raw`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Qcow2 => "qcow2",
            Self::Vdi => "vdi",
            Self::Raw => "raw",
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ImageFormat {
    type Err = Error;
    fn from_str(name: &str) -> Result<Self, Error> {
        match name {
            "qcow2" => Ok(Self::Qcow2),
            "vdi" => Ok(Self::Vdi),
            "raw" => Ok(Self::Raw),
            _ => Err(Error::UnsupportedFormat {
                name: name.to_owned(),
            }),
        }
    }
}

/// Bytes [`probe`] needs to see: up to the end of the VDI signature.
pub const PROBE_LEN: usize = 0x44;

/// Recognises qcow2 or VDI from the first bytes of a file; `None` if neither.
pub fn probe(first_bytes: &[u8]) -> Option<ImageFormat> {
    if crate::qcow2::probe(first_bytes) {
        Some(ImageFormat::Qcow2)
    } else if crate::vdi::probe(first_bytes) {
        Some(ImageFormat::Vdi)
    } else {
        None
    }
}

/// Reads the start of `backend` and recognises its format; `None` if neither qcow2 nor VDI.
pub fn detect_format<B: Backend + ?Sized>(backend: &B) -> crate::Result<Option<ImageFormat>> {
    let mut first = [0u8; PROBE_LEN];
    let got = backend
        .read_prefix_at(&mut first, 0)
        .map_err(Error::reading("image magic"))?;
    Ok(probe(&first[..got]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magic_decides_and_anything_else_is_unrecognised() {
        assert_eq!(probe(b"QFI\xfb\0\0\0\x03"), Some(ImageFormat::Qcow2));
        let mut vdi = vec![0u8; 0x44];
        vdi[0x40..0x44].copy_from_slice(&[0x7f, 0x10, 0xda, 0xbe]);
        assert_eq!(probe(&vdi), Some(ImageFormat::Vdi));
        assert_eq!(probe(b"QFI"), None);
        assert_eq!(probe(&[0u8; 512]), None);
        assert_eq!(probe(&[]), None);
        assert!("vmdk".parse::<ImageFormat>().is_err());
        assert_eq!("raw".parse::<ImageFormat>().unwrap(), ImageFormat::Raw);
    }
}
