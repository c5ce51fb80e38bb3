//! [`Qcow2Builder`]: create a blank qcow2 image or an overlay on a backing file, in-process.
//!
//! This is what `qemu-img create -f qcow2 [-b BACKING -F FMT] [-o ...] FILE [SIZE]` does, without
//! a subprocess: the backing file is opened natively to learn its format (by magic, if not given)
//! and its virtual size (if no size is given), then cluster 0, the refcount structures and an
//! empty L1 table are written to a temporary file that is linked into place.

use std::path::{Path, PathBuf};

use crate::backing;
use crate::detect::ImageFormat;
use crate::image::ImageHeader;
use crate::io::Backend;
use crate::new_file::{create_with, NewFileMode};
use crate::preallocate::{new_data_file, Preallocation};
use crate::qcow2::create::{
    write_new_image, write_new_image_with_data_file, BackingReference, DataFileReference,
};
use crate::qcow2::CreateOptions;
use crate::{Error, Result};

/// Builds a new qcow2 image. See the crate docs for an example.
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `create` is called"]
pub struct Qcow2Builder {
    path: PathBuf,
    size: Option<u64>,
    options: CreateOptions,
    backing: Option<BackingSpec>,
    mode: NewFileMode,
    preallocation: Preallocation,
    data_file: Option<DataFileReference>,
    data_file_base: crate::chain::DataFileBase,
}

#[derive(Debug, Clone)]
struct BackingSpec {
    name: String,
    format: Option<ImageFormat>,
    /// A format named as qemu names it, written without opening the backing file.
    format_name: Option<String>,
    open: bool,
}

/// What [`Qcow2Builder::create`] made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreatedImage {
    /// The new image.
    pub path: PathBuf,
    /// Its virtual size (the request rounded up to 512 bytes, or the backing file's size).
    pub virtual_size: u64,
    /// The backing reference written into it, if any.
    pub backing: Option<BackingReference>,
}

impl Qcow2Builder {
    /// Starts a new image at `path` with default options (v3, 64 KiB clusters, 16-bit refcounts).
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            size: None,
            options: CreateOptions::default(),
            backing: None,
            mode: NewFileMode::default(),
            preallocation: Preallocation::Off,
            data_file: None,
            data_file_base: crate::chain::DataFileBase::ImageDirectory,
        }
    }

    /// Virtual size in bytes (rounded up to 512). Optional with a backing file.
    pub fn size(mut self, size: u64) -> Self {
        self.size = Some(size);
        self
    }

    /// Creation options (qemu-img's `-o`).
    pub fn options(mut self, options: CreateOptions) -> Self {
        self.options = options;
        self
    }

    /// Makes the image an overlay of `name`, stored verbatim in the header. A relative name is
    /// resolved against the new image's directory, as qemu resolves it when opening.
    pub fn backing(mut self, name: impl Into<String>) -> Self {
        self.backing = Some(BackingSpec {
            name: name.into(),
            format: None,
            format_name: None,
            open: true,
        });
        self
    }

    /// The backing file's format. Without it, the format is read from the backing file's magic
    /// (qcow2 or VDI); an unrecognised file is refused rather than guessed to be raw.
    pub fn backing_format(mut self, format: ImageFormat) -> Self {
        if let Some(b) = &mut self.backing {
            b.format = Some(format);
        }
        self
    }

    /// The backing format as qemu names it, for a backing file that is not opened
    /// ([`Self::without_opening_backing`], qemu-img's `create -u -F NAME`): any qemu block driver
    /// name ([`crate::qcow2::create::QEMU_BACKING_FORMATS`]) is written as given, also one
    /// cowclone does not read, such as `host_device`; opening such an image's backing file is
    /// then refused. Ignored when the backing file is opened.
    pub fn backing_format_name(mut self, name: impl Into<String>) -> Self {
        if let Some(b) = &mut self.backing {
            b.format_name = Some(name.into());
        }
        self
    }

    /// Do not open the backing file (qemu-img's `-u`): the format and size must then be given.
    pub fn without_opening_backing(mut self) -> Self {
        if let Some(b) = &mut self.backing {
            b.open = false;
        }
        self
    }

    /// Replace an existing file (atomically) instead of refusing.
    pub fn overwrite(mut self, overwrite: bool) -> Self {
        self.mode.overwrite = overwrite;
        self
    }

    /// fsync the new file and its directory before returning.
    pub fn durable(mut self, durable: bool) -> Self {
        self.mode.durable = durable;
        self
    }

    /// Preallocation of every cluster (`-o preallocation=`; default off).
    pub fn preallocation(mut self, mode: Preallocation) -> Self {
        self.preallocation = mode;
        self
    }

    /// Keeps the guest data in an external data file (qemu-img's `-o data_file=NAME`, and
    /// `data_file_raw=on` with `raw`): [`Self::create`] creates that file too, as long as the
    /// disk (a relative name is resolved against the image's directory, and it is refused if it
    /// exists unless [`Self::overwrite`]), and stores the name verbatim. Needs compat 1.1; a raw
    /// data file excludes a backing file, and has every cluster mapped at creation, as
    /// qemu-img does. With [`Self::preallocation`] other than `off`, every cluster is mapped
    /// too (the image file gets only the L2 tables) and `falloc` or `full` applies to the data
    /// file, as qemu-img preallocates an image with a data file.
    pub fn data_file(mut self, name: impl Into<String>, raw: bool) -> Self {
        self.data_file = Some(DataFileReference {
            name: name.into(),
            raw,
        });
        self
    }

    /// Where a relative [`Self::data_file`] name is created: beside the image (the default)
    /// or in the working directory, as qemu-img 10 creates it.
    pub fn data_file_base(mut self, base: crate::chain::DataFileBase) -> Self {
        self.data_file_base = base;
        self
    }

    /// Creates the image file (and its data file, if it has one).
    pub fn create(self) -> Result<CreatedImage> {
        if let Some(data_file) = &self.data_file {
            return self.create_with_data_file(data_file.clone());
        }
        let (size, backing) = self.resolve()?;
        let path = self.path.clone();
        let options = self.options.clone();
        let preallocation = self.preallocation;
        create_with(&path, self.mode, |file| {
            let size = write_new_image(file, size, &options, backing.as_ref())?;
            preallocate(file, size, preallocation)?;
            Ok(size)
        })
        .map(|virtual_size| CreatedImage {
            path,
            virtual_size,
            backing,
        })
    }

    /// [`Self::create`] with an external data file: the data file first (sized to the disk,
    /// and reserved or written as `falloc` or `full` preallocation asks, as qemu-img makes
    /// it), then the image; a failure removes the data file again.
    fn create_with_data_file(&self, data_file: DataFileReference) -> Result<CreatedImage> {
        let (size, backing) = self.resolve()?;
        // Every check (options, compat, raw with a backing file) before any file is made.
        let size = crate::qcow2::create::plan_with_data_file(
            size,
            &self.options,
            backing.as_ref(),
            Some(&data_file),
        )?
        .0
        .header
        .size;
        let data_path = self.data_file_base.resolve(&self.path, &data_file.name)?;
        if is_same_file(&data_path, &self.path) {
            return Err(crate::qcow2::Qcow2Error::InvalidOption {
                option: "data_file",
                value: data_file.name.clone(),
                reason: "the data file cannot be the image itself",
            }
            .into());
        }
        // A raw data file has every cluster mapped: qemu-img's metadata preallocation at least.
        let preallocation = match self.preallocation {
            Preallocation::Off if data_file.raw => Preallocation::Metadata,
            mode => mode,
        };
        let cow_granularity = match self.options.extended_l2 {
            true => self.options.cluster_size / u64::from(crate::qcow2::tables::SUBCLUSTERS),
            false => self.options.cluster_size,
        };
        create_with(&data_path, self.mode, |file| {
            new_data_file(file, size, preallocation, cow_granularity)
        })?;
        let made = create_with(&self.path, self.mode, |file| {
            write_new_image_with_data_file(
                file,
                size,
                &self.options,
                backing.as_ref(),
                &data_file,
                preallocation != Preallocation::Off,
            )
        });
        match made {
            Ok(virtual_size) => Ok(CreatedImage {
                path: self.path.clone(),
                virtual_size,
                backing,
            }),
            Err(e) => {
                let _ = std::fs::remove_file(&data_path);
                Err(e)
            }
        }
    }

    /// Writes the image onto an empty `backend` instead of a file (tests, benches, embedding).
    /// A relative backing name is still resolved against the builder's path. With a data file
    /// ([`Self::data_file`]) only the image is written (preallocation then maps every cluster):
    /// the data file is the caller's.
    pub fn create_on<B: Backend + Send + Sync + ?Sized>(self, backend: &B) -> Result<CreatedImage> {
        let (size, backing) = self.resolve()?;
        let virtual_size = match &self.data_file {
            Some(data_file) => write_new_image_with_data_file(
                backend,
                size,
                &self.options,
                backing.as_ref(),
                data_file,
                self.preallocation != Preallocation::Off,
            )?,
            None => {
                let size = write_new_image(backend, size, &self.options, backing.as_ref())?;
                preallocate(backend, size, self.preallocation)?;
                size
            }
        };
        Ok(CreatedImage {
            path: self.path,
            virtual_size,
            backing,
        })
    }

    /// Settles the size and the backing reference, opening the backing file if needed.
    fn resolve(&self) -> Result<(u64, Option<BackingReference>)> {
        self.options.validate()?;
        let Some(spec) = &self.backing else {
            return Ok((self.size.ok_or(Error::SizeRequired)?, None));
        };
        // Preallocated clusters would hide the backing file, unless their subclusters can stay
        // unallocated (extended L2 entries); qemu-img refuses the rest.
        if self.preallocation != Preallocation::Off && !self.options.extended_l2 {
            return Err(crate::qcow2::Qcow2Error::InvalidOption {
                option: "preallocation",
                value: self.preallocation.name().to_owned(),
                reason: "Backing file and preallocation can only be used at the same time if extended_l2 is on",
            }
            .into());
        }
        let backing_path = backing::resolve(&self.path, &spec.name)?;
        if is_same_file(&backing_path, &self.path) {
            return Err(Error::BackingIsTarget {
                path: self.path.clone(),
            });
        }
        let (format, backing_size) = match (spec.open, spec.format, &spec.format_name) {
            (false, Some(format), _) => (format.name().to_owned(), None),
            (false, None, Some(name)) => {
                if !crate::qcow2::create::QEMU_BACKING_FORMATS.contains(&name.as_str()) {
                    return Err(crate::qcow2::Qcow2Error::InvalidOption {
                        option: "backing_fmt",
                        value: name.clone(),
                        reason: "not a qemu block driver name",
                    }
                    .into());
                }
                (name.clone(), None)
            }
            (false, None, None) => return Err(Error::BackingFormatRequired),
            (true, format, _) => {
                let header = read_backing_header(&backing_path, format)?;
                (
                    header.format().name().to_owned(),
                    Some(header.virtual_size()),
                )
            }
        };
        let size = self.size.or(backing_size).ok_or(Error::SizeRequired)?;
        Ok((
            size,
            Some(BackingReference {
                name: spec.name.clone(),
                format,
            }),
        ))
    }
}

/// Preallocates every cluster of a new image on `backend` (nothing for `Off`).
fn preallocate<B: Backend + Send + Sync + ?Sized>(
    backend: &B,
    size: u64,
    mode: Preallocation,
) -> Result<()> {
    if mode == Preallocation::Off {
        return Ok(());
    }
    let cluster = crate::qcow2::HeaderCluster::read_from(backend)?;
    let mut image = crate::qcow2::image::Qcow2Image::open_rw(
        backend,
        cluster,
        None,
        crate::qcow2::write::WriteOptions::default(),
    )?;
    image.preallocate(0, size, mode)
}

/// True if both paths name the same existing file, or are spelled the same. `target` is
/// looked at first: it usually does not exist yet, which settles it with one `stat`.
fn is_same_file(backing: &Path, target: &Path) -> bool {
    backing == target || crate::open::same_file(target, backing)
}

fn read_backing_header(path: &Path, format: Option<ImageFormat>) -> Result<ImageHeader> {
    // Headers only, no lock: what qemu-img create does with a backing file (forced sharing, no
    // I/O), so that clones can be made of an image in use.
    let file = crate::open::open_image(path, crate::open::OpenHow::force_share().metadata_only())?;
    ImageHeader::read(&file, format, path, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overlay_takes_format_and_size_from_the_backing_file() {
        let dir = tempfile::tempdir().unwrap();
        Qcow2Builder::new(dir.path().join("base"))
            .size(3 << 20)
            .create()
            .unwrap();
        let created = Qcow2Builder::new(dir.path().join("ov"))
            .backing("base")
            .create()
            .unwrap();
        assert_eq!(created.virtual_size, 3 << 20);
        assert_eq!(created.backing.unwrap().format, "qcow2");
    }

    #[test]
    fn an_unrecognised_backing_file_is_refused_unless_named_raw() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("disk.img"), vec![7u8; 1000]).unwrap();
        let refused = Qcow2Builder::new(dir.path().join("ov"))
            .backing("disk.img")
            .create();
        assert!(matches!(refused, Err(Error::UnrecognizedFormat { .. })));
        assert!(!dir.path().join("ov").exists());
        let created = Qcow2Builder::new(dir.path().join("ov"))
            .backing("disk.img")
            .backing_format(ImageFormat::Raw)
            .create()
            .unwrap();
        assert_eq!(
            created.virtual_size, 1024,
            "raw size rounds up to a sector, as in qemu-img"
        );
    }

    #[test]
    fn a_raw_file_with_a_fake_qcow2_header_named_qcow2_must_really_parse() {
        let dir = tempfile::tempdir().unwrap();
        let mut fake = b"QFI\xfb".to_vec();
        fake.resize(4096, 0);
        std::fs::write(dir.path().join("fake"), &fake).unwrap();
        let err = Qcow2Builder::new(dir.path().join("ov"))
            .backing("fake")
            .create()
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::FormatMismatch {
                    expected: "qcow2",
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn existing_files_are_kept_unless_overwrite_and_failures_leave_no_temp_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.qcow2");
        std::fs::write(&path, b"precious").unwrap();
        let err = Qcow2Builder::new(&path).size(1 << 20).create().unwrap_err();
        assert!(matches!(err, Error::AlreadyExists { .. }));
        assert_eq!(std::fs::read(&path).unwrap(), b"precious");
        Qcow2Builder::new(&path)
            .size(1 << 20)
            .overwrite(true)
            .durable(true)
            .create()
            .unwrap();
        assert!(crate::qcow2::probe(&std::fs::read(&path).unwrap()));

        let err = Qcow2Builder::new(dir.path().join("y"))
            .backing("missing")
            .create();
        assert!(matches!(err, Err(Error::Io { .. })));
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("x.qcow2")]);
    }

    #[test]
    fn an_image_cannot_back_itself() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("self.qcow2");
        Qcow2Builder::new(&path).size(1 << 20).create().unwrap();
        let err = Qcow2Builder::new(&path)
            .backing("self.qcow2")
            .overwrite(true)
            .create();
        assert!(matches!(err, Err(Error::BackingIsTarget { .. })), "{err:?}");
        let err = Qcow2Builder::new(dir.path().join("new"))
            .size(1 << 20)
            .backing("new")
            .backing_format(ImageFormat::Qcow2)
            .without_opening_backing()
            .create();
        assert!(matches!(err, Err(Error::BackingIsTarget { .. })), "{err:?}");
    }

    #[test]
    fn protocol_backing_names_and_unopened_backing_without_format_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = Qcow2Builder::new(dir.path().join("o"))
            .backing("json:{\"file.filename\":\"/etc/passwd\"}")
            .create()
            .unwrap_err();
        assert!(matches!(
            err,
            Error::Backing(crate::backing::BackingError::ProtocolRefused { .. })
        ));
        let err = Qcow2Builder::new(dir.path().join("o"))
            .size(1 << 20)
            .backing("anything")
            .without_opening_backing()
            .create()
            .unwrap_err();
        assert!(matches!(err, Error::BackingFormatRequired));
        let made = Qcow2Builder::new(dir.path().join("o"))
            .size(1 << 20)
            .backing("not-there-yet.vdi")
            .backing_format(ImageFormat::Vdi)
            .without_opening_backing()
            .create()
            .unwrap();
        assert_eq!(made.backing.unwrap().format, "vdi");
    }
}
