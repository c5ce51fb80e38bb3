//! imagefmt: qcow2, VDI and raw disk images, natively — header codecs, backing references and
//! in-process creation of images and overlays.
//!
//! It does no process spawning and keeps no registry: those belong to the `cloner` crate. All
//! format code reads and writes through the [`io::Backend`] seam, so everything runs on real
//! files and on memory alike.
//!
//! ```text
//! detect ──► image::ImageHeader ──► qcow2::HeaderCluster / vdi::VdiHeader / raw length
//!                                         ▲
//! builder::Qcow2Builder ─► qcow2::create ─┘─► qcow2::layout ─► new_file (temp + link)
//! backing ──► untrusted names under a policy
//! open::open_image ──► regular files only ──► lock (qemu's OFD image locks) ──► every reader/writer
//!
//! extent (Extent, GuestRead; offsets: typed offsets) ◄── qcow2 / vdi / raw block status
//!    ▲
//! chain (walk, open_chain_with, block_status, extents, read_extent) ◄── ops: map, compare,
//!                                                      convert, commit, rebase, info
//! ```
//!
//! # Public API
//!
//! - Creating images: [`Qcow2Builder`] (qcow2 images and overlays, [`CreatedImage`]),
//!   [`vdi::create_dynamic`], [`vdi::create_fixed`], [`vdi::create_differencing`]; [`new_file`]
//!   (a new file is linked into place only when complete).
//! - Opening: [`open::open_image`] (the one opener of image files, qemu's locks from [`lock`]);
//!   [`chain`] (the one chain walker: an image and everything below it as one
//!   [`extent::GuestRead`], for reading; [`chain::open_qcow2_rw`], [`chain::open_vdi_rw`] for
//!   writing); [`backing`] (the policy for names read from images).
//! - What lies where: [`extent`] ([`extent::Extent`], [`extent::GuestRead`]), [`offsets`]
//!   (typed guest and host offsets), [`chain::block_status`], [`chain::extents`],
//!   [`chain::read_extent`].
//! - Whole-image operations: [`ops`] (info, map, compare, convert, commit, rebase, resize) and
//!   [`measure`].
//! - Formats: [`qcow2`] (header codecs, [`qcow2::image::Qcow2Image`], [`qcow2::check`]), [`vdi`]
//!   (codecs, [`vdi::VdiImage`], parent resolvers, [`vdi::check`]), [`raw`].
//! - Parsers of untrusted bytes, public for the fuzz targets: [`detect`],
//!   [`image::ImageHeader`], [`qcow2::HeaderCluster::parse`], [`qcow2::extensions`],
//!   [`vdi::VdiHeader::parse`], [`vdi::BlockMap::parse`], [`size::parse_size`]; and
//!   [`io::MemBackend`], images on memory.
//! - [`Error`] and [`Result`].
//!
//! Everything else is crate-private: the one L1/L2 decoder (`qcow2::tables`), the allocator,
//! compression, the chain walker's internals, the lock primitives.
//!
//! Every image file is opened through [`open::open_image`], which takes qemu-compatible locks
//! ([`lock`]): writing an image another process (qemu, or another cowclone) uses is refused, and
//! so is reading one that another process writes, unless [`chain::ChainOptions::force_share`].
//!
//! Creating an overlay on a base image, writing guest data through it and checking it, all
//! in-process (what `qemu-img create -b base.qcow2 -F qcow2 clone.qcow2`, `qemu-io -c write`
//! and `qemu-img check` do in subprocesses):
//!
//! ```
//! use imagefmt::backing::BackingPolicy;
//! use imagefmt::chain::{open_chain, open_qcow2_rw};
//! use imagefmt::offsets::GuestOffset;
//! use imagefmt::qcow2::check::{check, Repair};
//! use imagefmt::{ImageFormat, Qcow2Builder};
//! # let dir = tempfile::tempdir()?;
//! # let base = dir.path().join("base.qcow2");
//! # let clone = dir.path().join("clone.qcow2");
//! Qcow2Builder::new(&base).size(1 << 30).create()?;
//!
//! // The backing name is stored as given; relative names resolve against the clone's directory.
//! let created = Qcow2Builder::new(&clone)
//!     .backing("base.qcow2")
//!     .backing_format(ImageFormat::Qcow2) // optional: otherwise read from the base's magic
//!     .create()?;
//! assert_eq!(created.virtual_size, 1 << 30);
//!
//! // Write through the overlay: the base stays untouched, the clone gets its own clusters.
//! let policy = BackingPolicy::FollowLocal;
//! let mut writer = open_qcow2_rw(&clone, &policy, Default::default())?;
//! writer.write_at(b"hello, guest", 4096)?;
//! writer.flush()?;
//! drop(writer);
//!
//! // Read it back through the whole chain, and check the overlay as qemu-img check would.
//! let chain = open_chain(&clone, None, &policy)?;
//! let mut bytes = [0u8; 12];
//! chain.read_at(&mut bytes, GuestOffset(4096))?;
//! assert_eq!(&bytes, b"hello, guest");
//! let file = imagefmt::open::open_image(&clone, imagefmt::open::OpenHow::read())?;
//! let report = check(&file, Repair::None)?;
//! assert_eq!(report.exit_code(), 0, "no corruption, no leak");
//!
//! let info = imagefmt::ops::info::image_info(&clone)?;
//! assert_eq!(info.backing_filename.as_deref(), Some("base.qcow2"));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod backing;
mod builder;
pub mod chain;
pub mod detect;
mod error;
pub mod extent;
pub mod image;
pub mod io;
pub mod lock;
pub mod measure;
pub mod new_file;
pub mod offsets;
pub mod open;
pub mod ops;
pub mod preallocate;
pub mod qcow2;
pub mod raw;
pub mod size;
pub mod vdi;

// The deliberate root API: the types nearly every caller names (builder.rs and error.rs are
// private; detect.rs is public for its probes).
pub use builder::{CreatedImage, Qcow2Builder};
pub use detect::{ForeignFormat, ImageFormat};
pub use error::{Cause, Error, Result};
