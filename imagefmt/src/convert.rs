//! `convert`: copy an image's guest content into a new qcow2, VDI or raw image, streaming in
//! constant memory, writing nothing for zero runs (sparse output), optionally compressed (qcow2),
//! and with a backing file (`-B`: a qcow2 backing file, or the parent of a VDI differencing
//! image) writing only what differs from it.

use std::path::{Path, PathBuf};

use crate::backing::BackingPolicy;
use crate::chain::{open_chain, read_below, GuestRead};
use crate::detect::ImageFormat;
use crate::io::Backend;
use crate::new_file::{create_with, NewFileMode};
use crate::qcow2::create::{write_new_image, BackingReference};
use crate::qcow2::image::Qcow2Image;
use crate::qcow2::write::WriteOptions;
use crate::qcow2::{CreateOptions, HeaderCluster};
use crate::{Error, Result};

/// Bytes copied per step for raw output (qcow2 output steps by its cluster size).
pub const RAW_CHUNK: u64 = 1 << 20;
/// Granularity of hole detection in raw output.
pub const SPARSE_BLOCK: usize = 4096;

/// What to make.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Output format: qcow2, vdi or raw.
    pub format: ImageFormat,
    /// VDI output: a fixed (preallocated) image instead of a dynamic one (`-o static=on`).
    pub vdi_static: bool,
    /// qcow2 creation options (`-o`).
    pub qcow2: CreateOptions,
    /// Write compressed clusters (`-c`, qcow2 only).
    pub compress: bool,
    /// Backing file of the output (`-B NAME`, `-F FMT`): only data that differs from it is
    /// written. The name is stored verbatim and resolved against the output's directory.
    pub backing: Option<(String, Option<ImageFormat>)>,
    /// Overwrite / durability of the new file.
    pub mode: NewFileMode,
}

/// What a conversion did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvertStats {
    /// Guest bytes examined.
    pub bytes_read: u64,
    /// Guest bytes written to the output (zero runs and data equal to the backing are skipped).
    pub bytes_written: u64,
}

/// Converts `source` into a new image at `dest`. `progress(done, total)` is called after each
/// step. The output appears under `dest` only when complete.
pub fn convert(
    source: &dyn GuestRead,
    dest: &Path,
    options: &ConvertOptions,
    policy: &BackingPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let size = source.virtual_size();
    match options.format {
        ImageFormat::Raw => {
            if options.backing.is_some() || options.compress {
                return Err(Error::UnsupportedFormat {
                    name: "raw output with -B or -c (only qcow2 has backing files and compression)"
                        .into(),
                });
            }
            create_with(dest, options.mode, |file| {
                file.set_len(size)
                    .map_err(Error::writing("raw image length"))?;
                copy(source, size, RAW_CHUNK, progress, |chunk, offset| {
                    let mut wrote = false;
                    // Write runs of non-zero 4 KiB blocks; zero blocks stay holes.
                    let mut block = 0;
                    while block < chunk.len() {
                        let start = block;
                        while block < chunk.len()
                            && !is_zero(&chunk[block..(block + SPARSE_BLOCK).min(chunk.len())])
                        {
                            block += SPARSE_BLOCK;
                        }
                        let end = block.min(chunk.len());
                        if end > start {
                            Backend::write_all_at(&file, &chunk[start..end], offset + start as u64)
                                .map_err(Error::writing("raw image data"))?;
                            wrote = true;
                        }
                        block = end.max(start + SPARSE_BLOCK);
                    }
                    Ok(wrote)
                })
            })
        }
        ImageFormat::Qcow2 => convert_to_qcow2(source, dest, options, policy, progress),
        ImageFormat::Vdi => convert_to_vdi(source, dest, options, policy, progress),
    }
}

/// VDI output: a dynamic (or fixed) base, or with `-B PARENT` a differencing image linked to the
/// VDI parent by UUID that stores only the 1 MiB blocks differing from the parent's chain.
fn convert_to_vdi(
    source: &dyn GuestRead,
    dest: &Path,
    options: &ConvertOptions,
    policy: &BackingPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    use crate::vdi::{create, VdiImage, DEFAULT_BLOCK_SIZE};
    if options.compress {
        return Err(Error::UnsupportedFormat {
            name: "compressed vdi output (only qcow2 compresses)".into(),
        });
    }
    let size = source.virtual_size();
    let parent = match &options.backing {
        None => None,
        Some((_, Some(format))) if *format != ImageFormat::Vdi => {
            return Err(crate::vdi::VdiError::ParentNotVdi {
                path: dest.to_owned(),
                format: format.name(),
            }
            .into())
        }
        Some((name, _)) => {
            if options.vdi_static {
                return Err(Error::UnsupportedFormat {
                    name: "a static (fixed) vdi differencing image".into(),
                });
            }
            let path: PathBuf = crate::backing::resolve(dest, name)?;
            let header = create::read_parent_header(&path)?;
            if header.virtual_size() != size {
                return Err(crate::vdi::VdiError::DiffSizeMismatch {
                    parent: header.virtual_size(),
                    requested: size,
                }
                .into());
            }
            let chain = open_chain(&path, Some(ImageFormat::Vdi), policy)?;
            Some((header, chain))
        }
    };
    create_with(dest, options.mode, |file| {
        let (header, below) = match parent {
            Some((parent_header, chain)) => (
                create::write_differencing(file, &parent_header)?,
                Some(chain),
            ),
            None if options.vdi_static => (create::write_fixed(file, size)?, None),
            None => (create::write_dynamic(file, size)?, None),
        };
        let has_parent = below.is_some();
        let mut image = VdiImage::open_rw(file, header, below, options.mode.durable)?;
        let mut parent_buf = vec![0u8; DEFAULT_BLOCK_SIZE as usize];
        let block = u64::from(DEFAULT_BLOCK_SIZE);
        copy(source, size, block, progress, |chunk, offset| {
            match needed_write(&image, has_parent, chunk, offset, &mut parent_buf)? {
                NeededWrite::Nothing => return Ok(false),
                NeededWrite::Zeroes => image.write_zeroes(offset, chunk.len() as u64)?,
                NeededWrite::Data => image.write_at(chunk, offset)?,
            }
            Ok(true)
        })
    })
}

fn convert_to_qcow2(
    source: &dyn GuestRead,
    dest: &Path,
    options: &ConvertOptions,
    policy: &BackingPolicy,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ConvertStats> {
    let size = source.virtual_size();
    let (reference, backing) = match &options.backing {
        None => (None, None),
        Some((name, format)) => {
            let path: PathBuf = crate::backing::resolve(dest, name)?;
            let chain = open_chain(&path, *format, policy)?;
            let format = match format {
                Some(f) => *f,
                None => crate::image::read_file_header(&path)?.1.format(),
            };
            let reference = BackingReference {
                name: name.clone(),
                format: format.name().to_owned(),
            };
            (Some(reference), Some(chain))
        }
    };
    create_with(dest, options.mode, |file| {
        write_new_image(file, size, &options.qcow2, reference.as_ref())?;
        let cluster = HeaderCluster::read_from(file)?;
        // The output reads through to its backing chain for copy-on-write of partial clusters.
        let below = backing;
        let mut image = Qcow2Image::open_rw(file, cluster, below, WriteOptions::default())?;
        let chunk_size = image.header().cluster_size();
        let mut backing_buf = vec![0u8; chunk_size as usize];
        let has_backing = options.backing.is_some();
        let stats = copy(source, size, chunk_size, progress, |chunk, offset| {
            match needed_write(&image, has_backing, chunk, offset, &mut backing_buf)? {
                NeededWrite::Nothing => return Ok(false),
                NeededWrite::Zeroes => image.write_zeroes(offset, chunk.len() as u64)?,
                NeededWrite::Data if options.compress => image.write_compressed(chunk, offset)?,
                NeededWrite::Data => image.write_at(chunk, offset)?,
            }
            Ok(true)
        })?;
        if options.mode.durable {
            image.flush()?;
        }
        Ok(stats)
    })
}

/// What a chunk of the source needs in a new output image.
enum NeededWrite {
    /// The output already reads so: zeros with nothing below, or what lies below.
    Nothing,
    /// Zeros that must hide different data below.
    Zeroes,
    /// The bytes themselves.
    Data,
}

/// Decides what `chunk` at `offset` needs in the new (still unwritten there) `image`, which
/// reads through to an image below it if `has_below`; `scratch` is at least `chunk.len()` long.
fn needed_write(
    image: &dyn GuestRead,
    has_below: bool,
    chunk: &[u8],
    offset: u64,
    scratch: &mut [u8],
) -> Result<NeededWrite> {
    if has_below {
        let below = &mut scratch[..chunk.len()];
        image.read_at(below, offset)?; // still unallocated: reads the chain below
        if below == chunk {
            return Ok(NeededWrite::Nothing);
        }
    }
    Ok(match (is_zero(chunk), has_below) {
        (true, false) => NeededWrite::Nothing,
        (true, true) => NeededWrite::Zeroes,
        (false, _) => NeededWrite::Data,
    })
}

/// Streams `source` in `chunk_size` steps, handing each chunk to `write` (which says whether
/// it wrote anything).
fn copy(
    source: &dyn GuestRead,
    size: u64,
    chunk_size: u64,
    progress: &mut dyn FnMut(u64, u64),
    mut write: impl FnMut(&[u8], u64) -> Result<bool>,
) -> Result<ConvertStats> {
    let mut buf = vec![0u8; chunk_size as usize];
    let mut stats = ConvertStats::default();
    let mut offset = 0;
    while offset < size {
        let len = (size - offset).min(chunk_size) as usize;
        read_below(Some(source), &mut buf[..len], offset)?;
        if write(&buf[..len], offset)? {
            stats.bytes_written += len as u64;
        }
        offset += len as u64;
        stats.bytes_read = offset;
        progress(offset, size);
    }
    Ok(stats)
}

/// True if every byte is zero.
pub fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}
