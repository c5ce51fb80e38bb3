//! Creation options for new qcow2 images (qemu-img's `-o` keys) and the writer that lays out a
//! new image, with or without a backing file, onto any [`Backend`].

use super::error::Qcow2Error;
use super::extensions::{Extension, MAX_BACKING_FORMAT_LEN};
use super::features::{
    standard_feature_table, AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures,
};
use super::header::{
    l1_entries_for, CompressionType, Header, Version, V2_HEADER_LEN, V3_HEADER_LEN,
};
use super::header_cluster::HeaderCluster;
use super::layout::InitialLayout;
use super::{MAX_CLUSTER_BITS, MIN_CLUSTER_BITS, MIN_EXTENDED_L2_CLUSTER_BITS};
use crate::io::Backend;

/// Compatibility level, qemu-img's `compat` option.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compat {
    /// `0.10`: version 2 header.
    V0_10,
    /// `1.1` (default): version 3 header.
    #[default]
    V1_1,
}

impl Compat {
    /// The header version this level writes.
    pub fn version(self) -> Version {
        match self {
            Self::V0_10 => Version::V2,
            Self::V1_1 => Version::V3,
        }
    }
}

/// Options for a new qcow2 image: every `-o` key qemu-img 7.2 accepts for a plain image without
/// encryption, preallocation or an external data file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    /// `cluster_size`: a power of two from 512 B to 2 MiB (default 64 KiB).
    pub cluster_size: u64,
    /// `compat`: `0.10` or `1.1` (default).
    pub compat: Compat,
    /// `refcount_bits`: a power of two from 1 to 64 (default 16; v2 allows only 16).
    pub refcount_bits: u32,
    /// `lazy_refcounts`: defer refcount updates (v3 only).
    pub lazy_refcounts: bool,
    /// `extended_l2`: 32 subclusters per cluster (v3, clusters ≥ 16 KiB).
    pub extended_l2: bool,
    /// `compression_type`: `zlib` (default) or `zstd` (v3 only).
    pub compression_type: CompressionType,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            cluster_size: 64 << 10,
            compat: Compat::V1_1,
            refcount_bits: 16,
            lazy_refcounts: false,
            extended_l2: false,
            compression_type: CompressionType::Deflate,
        }
    }
}

/// The `-o` keys [`CreateOptions::set`] accepts.
pub const OPTION_KEYS: &[&str] = &[
    "cluster_size",
    "compat",
    "refcount_bits",
    "lazy_refcounts",
    "extended_l2",
    "compression_type",
];

impl CreateOptions {
    /// Applies one qemu-img `-o key=value` option, with qemu-img's value syntax (sizes with
    /// k/M/G suffixes, `on`/`off`, `zlib`/`zstd`, `0.10`/`1.1`/`v2`/`v3`).
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), Qcow2Error> {
        let invalid = |option: &'static str, reason: &'static str| Qcow2Error::InvalidOption {
            option,
            value: value.to_owned(),
            reason,
        };
        match key {
            "cluster_size" => {
                self.cluster_size = crate::size::parse_size(value)
                    .map_err(|_| invalid("cluster_size", "expected a size such as 64k"))?;
            }
            "compat" => {
                self.compat = match value {
                    "0.10" | "v2" => Compat::V0_10,
                    "1.1" | "v3" => Compat::V1_1,
                    _ => return Err(invalid("compat", "expected 0.10 or 1.1")),
                }
            }
            "refcount_bits" => {
                let bits = parse_qemu_uint(value)
                    .ok_or_else(|| invalid("refcount_bits", "expected 1, 2, 4, 8, 16, 32 or 64"))?;
                // A number (-1 too, as qemu reads it) too wide to be a refcount width.
                self.refcount_bits = u32::try_from(bits)
                    .map_err(|_| invalid("refcount_bits", REFCOUNT_BITS_RANGE))?;
            }
            "lazy_refcounts" => {
                self.lazy_refcounts = parse_bool(value).ok_or_else(|| invalid("lazy_refcounts", "expected on or off"))?
            }
            "extended_l2" => {
                self.extended_l2 = parse_bool(value).ok_or_else(|| invalid("extended_l2", "expected on or off"))?
            }
            "compression_type" => {
                self.compression_type = match value {
                    "zlib" => CompressionType::Deflate,
                    "zstd" => CompressionType::Zstd,
                    _ => return Err(invalid("compression_type", "expected zlib or zstd")),
                }
            }
            _ => {
                return Err(Qcow2Error::InvalidOption {
                    option: "-o",
                    value: key.to_owned(),
                    reason: "unknown qcow2 option (known: cluster_size, compat, refcount_bits, lazy_refcounts, extended_l2, compression_type)",
                })
            }
        }
        Ok(())
    }

    /// Checks the combination, with the same rules and order as qemu-img 7.2.
    pub fn validate(&self) -> Result<(), Qcow2Error> {
        let cs = self.cluster_size;
        if !cs.is_power_of_two()
            || !((1 << MIN_CLUSTER_BITS)..=(1 << MAX_CLUSTER_BITS)).contains(&cs)
        {
            return Err(Qcow2Error::InvalidOption {
                option: "cluster_size",
                value: cs.to_string(),
                reason: "must be a power of two between 512 and 2M",
            });
        }
        if !self.refcount_bits.is_power_of_two() || self.refcount_bits > 64 {
            return Err(Qcow2Error::InvalidOption {
                option: "refcount_bits",
                value: self.refcount_bits.to_string(),
                reason: REFCOUNT_BITS_RANGE,
            });
        }
        if self.compat == Compat::V0_10 {
            if self.refcount_bits != 16 {
                return Err(Qcow2Error::RefcountWidthNeedsV3 {
                    bits: self.refcount_bits,
                });
            }
            let needs_v3 = |option: &'static str, value: &str| Qcow2Error::InvalidOption {
                option,
                value: value.to_owned(),
                reason: "needs compat=1.1",
            };
            if self.lazy_refcounts {
                return Err(needs_v3("lazy_refcounts", "on"));
            }
            if self.extended_l2 {
                return Err(needs_v3("extended_l2", "on"));
            }
            if self.compression_type != CompressionType::Deflate {
                return Err(needs_v3("compression_type", self.compression_type.name()));
            }
        }
        if self.extended_l2 && cs < 1 << MIN_EXTENDED_L2_CLUSTER_BITS {
            return Err(Qcow2Error::ExtendedL2ClusterTooSmall { cluster_size: cs });
        }
        Ok(())
    }

    fn cluster_bits(&self) -> u32 {
        self.cluster_size.trailing_zeros()
    }
}

/// qemu's boolean option syntax.
pub(crate) fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "on" | "true" | "yes" | "y" => Some(true),
        "off" | "false" | "no" | "n" => Some(false),
        _ => None,
    }
}

/// The rule a refcount width breaks when it is refused.
pub const REFCOUNT_BITS_RANGE: &str = "must be a power of two up to 64";

/// qemu's unsigned integer option syntax (`strtoull` with base 0): leading whitespace allowed,
/// `0x` hex, a leading `0` means octal, and a leading `-` negates modulo 2^64 (`-1` is
/// 2^64 - 1), as qemu reads numbers in option lists.
pub(crate) fn parse_qemu_uint(value: &str) -> Option<u64> {
    let number = crate::size::parse_c_integer(value)?;
    let magnitude = u64::try_from(number.unsigned_abs()).ok()?;
    Some(if number < 0 {
        magnitude.wrapping_neg()
    } else {
        magnitude
    })
}

/// The block driver names qemu 10.0 (as Debian builds it) accepts as a backing format: its
/// `BlockdevDriver` names, without the ones built only with libblkio.
/// `qemu-img create -u` and `rebase -u` write any of them into the backing-format extension
/// without opening the backing file; cowclone does the same under `-u`, but opens only images
/// whose backing format it reads itself (qcow2, raw, vdi): an image naming another format
/// (`host_device`, `nbd`, …) is refused when its backing file is to be opened.
pub const QEMU_BACKING_FORMATS: &[&str] = &[
    "blkdebug",
    "blklogwrites",
    "blkreplay",
    "blkverify",
    "bochs",
    "cloop",
    "compress",
    "copy-before-write",
    "copy-on-read",
    "dmg",
    "file",
    "snapshot-access",
    "ftp",
    "ftps",
    "gluster",
    "host_cdrom",
    "host_device",
    "http",
    "https",
    "iscsi",
    "luks",
    "nbd",
    "nfs",
    "null-aio",
    "null-co",
    "nvme",
    "parallels",
    "preallocate",
    "qcow",
    "qcow2",
    "qed",
    "quorum",
    "raw",
    "rbd",
    "replication",
    "ssh",
    "throttle",
    "vdi",
    "vhdx",
    "vmdk",
    "vpc",
    "vvfat",
];

/// What a new image's header says about its backing file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackingReference {
    /// The name stored in the header, verbatim (relative names are resolved against the
    /// overlay's directory when the image is opened).
    pub name: String,
    /// The format name stored in the backing-format extension (`qcow2`, `raw`, `vdi`).
    pub format: String,
}

/// What a new image's header says about its external data file (qemu-img's `-o data_file=NAME`
/// and `data_file_raw=on`): the guest data lives in that file, at the guest offsets, and the
/// image keeps only the metadata.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataFileReference {
    /// The name stored in the header verbatim (a relative name is resolved against the image's
    /// directory when the image is opened, as a backing name is).
    pub name: String,
    /// `data_file_raw`: the data file is kept a valid raw image of the guest disk (autoclear
    /// bit 1); every cluster is then mapped at creation, as qemu-img does.
    pub raw: bool,
}

impl DataFileReference {
    /// Checks the combination with the image's options, as qemu-img does: external data files
    /// need compat 1.1, and a raw data file excludes a backing file.
    fn validate(&self, options: &CreateOptions, has_backing: bool) -> Result<(), Qcow2Error> {
        let invalid = |reason| Qcow2Error::InvalidOption {
            option: "data_file",
            value: self.name.clone(),
            reason,
        };
        if self.name.is_empty() {
            return Err(invalid("the data file name must not be empty"));
        }
        if options.compat == Compat::V0_10 {
            return Err(invalid(
                "External data files are only supported with compatibility level 1.1 and above (use version=v3 or greater)",
            ));
        }
        if self.raw && has_backing {
            return Err(invalid(
                "Backing file and data-file-raw cannot be used at the same time",
            ));
        }
        Ok(())
    }
}

/// Rounds a requested virtual size up to whole 512-byte sectors, as qemu-img does.
pub(crate) fn round_size(size: u64) -> Option<u64> {
    size.checked_next_multiple_of(512)
}

/// Builds cluster 0 and the layout of a new image, exactly as qemu-img would, without writing.
pub fn plan(
    size: u64,
    options: &CreateOptions,
    backing: Option<&BackingReference>,
) -> Result<(HeaderCluster, InitialLayout), Qcow2Error> {
    plan_with_data_file(size, options, backing, None)
}

/// [`plan`] for an image that may keep its guest data in an external data file.
pub fn plan_with_data_file(
    size: u64,
    options: &CreateOptions,
    backing: Option<&BackingReference>,
    data_file: Option<&DataFileReference>,
) -> Result<(HeaderCluster, InitialLayout), Qcow2Error> {
    options.validate()?;
    if let Some(data_file) = data_file {
        data_file.validate(options, backing.is_some())?;
    }
    let cluster_bits = options.cluster_bits();
    let size = round_size(size).ok_or(Qcow2Error::DiskTooLarge {
        size,
        cluster_size: options.cluster_size,
    })?;
    if size > i64::MAX as u64 {
        return Err(Qcow2Error::DiskTooLarge {
            size,
            cluster_size: options.cluster_size,
        });
    }
    let l1_size = l1_entries_for(size, cluster_bits, options.extended_l2);
    if l1_size * 8 > super::MAX_L1_TABLE_BYTES {
        return Err(Qcow2Error::DiskTooLarge {
            size,
            cluster_size: options.cluster_size,
        });
    }
    let refcount_order = options.refcount_bits.trailing_zeros();
    let layout = InitialLayout::compute(cluster_bits, refcount_order, l1_size)?;

    let version = options.compat.version();
    let mut incompatible = IncompatibleFeatures::empty();
    if options.compression_type != CompressionType::Deflate {
        incompatible |= IncompatibleFeatures::COMPRESSION_TYPE;
    }
    if options.extended_l2 {
        incompatible |= IncompatibleFeatures::EXTENDED_L2;
    }
    let mut compatible = CompatibleFeatures::empty();
    if options.lazy_refcounts {
        compatible |= CompatibleFeatures::LAZY_REFCOUNTS;
    }
    let mut autoclear = AutoclearFeatures::empty();
    if let Some(data_file) = data_file {
        incompatible |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
        if data_file.raw {
            autoclear |= AutoclearFeatures::RAW_EXTERNAL;
        }
    }
    let header_length = match version {
        Version::V2 => V2_HEADER_LEN,
        Version::V3 => V3_HEADER_LEN,
    };
    let header = Header {
        version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size,
        crypt_method: 0,
        l1_size: layout.l1_size,
        l1_table_offset: layout.l1_table_offset,
        refcount_table_offset: layout.refcount_table_offset,
        refcount_table_clusters: layout.refcount_table_clusters,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompatible,
        compatible_features: compatible,
        autoclear_features: autoclear,
        refcount_order,
        header_length,
        compression_type: options.compression_type,
        trailing: vec![0; (header_length as usize).saturating_sub(105)],
    };

    // qemu's order: backing format, data file, then the feature table (v3 with clusters above
    // 4 KiB).
    let mut extensions = Vec::new();
    if let Some(backing) = backing {
        if backing.format.is_empty() || backing.format.len() > MAX_BACKING_FORMAT_LEN {
            return Err(Qcow2Error::InvalidExtension {
                kind: super::extensions::EXT_BACKING_FORMAT,
                reason: "backing format name must be 1 to 15 bytes",
            });
        }
        extensions.push(Extension::BackingFormat(backing.format.clone()));
    }
    if let Some(data_file) = data_file {
        extensions.push(Extension::ExternalDataFile(data_file.name.clone()));
    }
    if version == Version::V3 && options.cluster_size > 4096 {
        extensions.push(Extension::FeatureNameTable(standard_feature_table()));
    }
    let cluster = HeaderCluster {
        header,
        extensions,
        backing_file: backing.map(|b| b.name.clone()),
    };
    Ok((cluster, layout))
}

/// Writes a complete new image onto an empty `backend` and returns its virtual size (the request
/// rounded up to whole sectors).
///
/// The result passes `qemu-img check` with no errors or leaks and is byte-identical to what
/// qemu-img 7.2 writes for the same options while one refcount-table cluster suffices.
pub(crate) fn write_new_image<B: Backend + ?Sized>(
    backend: &B,
    size: u64,
    options: &CreateOptions,
    backing: Option<&BackingReference>,
) -> Result<u64, crate::Error> {
    let (cluster, layout) = plan(size, options, backing)?;
    let bytes = cluster.to_bytes()?;
    layout
        .write(backend, &bytes)
        .map_err(crate::Error::writing("new qcow2 image"))?;
    Ok(cluster.header.size)
}

/// [`write_new_image`] for an image that names an external data file (which the caller
/// creates). With `map_all` (qemu-img's preallocation with a data file, which a raw data file
/// always gets) every cluster is mapped to its guest offset (see
/// `Qcow2Image::map_raw_data_file`) before the header names the data file, as qemu-img does.
pub(crate) fn write_new_image_with_data_file<B: Backend + Send + Sync + ?Sized>(
    backend: &B,
    size: u64,
    options: &CreateOptions,
    backing: Option<&BackingReference>,
    data_file: &DataFileReference,
    map_all: bool,
) -> Result<u64, crate::Error> {
    let (cluster, layout) = plan_with_data_file(size, options, backing, Some(data_file))?;
    if !data_file.raw && !map_all {
        let bytes = cluster.to_bytes()?;
        layout
            .write(backend, &bytes)
            .map_err(crate::Error::writing("new qcow2 image"))?;
        return Ok(cluster.header.size);
    }
    let size = write_new_image(backend, size, options, backing)?;
    let plain = HeaderCluster::read_from(backend)?;
    let mut image = super::image::Qcow2Image::open_rw(
        backend,
        plain,
        None,
        super::write::WriteOptions::default(),
    )?;
    image.map_raw_data_file()?;
    image.flush()?;
    drop(image);
    write_first_clusters_in_full(backend, cluster.header.cluster_size())?;
    // Then the header names the data file: the bits and the extension, in qemu's place (after
    // the backing format, which a raw data file excludes anyway).
    let mut cluster = HeaderCluster::read_from(backend)?;
    cluster.header.incompatible_features |= IncompatibleFeatures::EXTERNAL_DATA_FILE;
    if data_file.raw {
        cluster.header.autoclear_features |= AutoclearFeatures::RAW_EXTERNAL;
    }
    let at = cluster
        .extensions
        .iter()
        .take_while(|e| matches!(e, Extension::BackingFormat(_)))
        .count();
    cluster
        .extensions
        .insert(at, Extension::ExternalDataFile(data_file.name.clone()));
    let bytes = cluster.to_bytes()?;
    backend
        .write_all_at(&bytes, 0)
        .map_err(crate::Error::writing("qcow2 header"))?;
    Ok(size)
}

/// Rewrites the image's first three clusters (header, refcount table, first refcount block)
/// in full, zeros included, as qemu-img's create writes them, so that the image file is as
/// allocated as qemu-img's. It matters where every cluster is mapped into a data file: qemu
/// takes an image whose refcounted clusters exceed its allocated size by more than a ninth (and
/// two clusters) for a metadata-preallocated one and then reports the data file's holes as
/// zeros (`qcow2_detect_metadata_preallocation`); with the image as allocated as qemu-img's,
/// `qemu-img map` reports our images as it reports its own.
fn write_first_clusters_in_full<B: Backend + ?Sized>(
    backend: &B,
    cluster_size: u64,
) -> Result<(), crate::Error> {
    let len = backend
        .len()
        .map_err(crate::Error::reading("qcow2 file length"))?
        .min(3 * cluster_size); // ≤ 6 MiB: the cluster size is at most 2 MiB (validated)
    let mut bytes = vec![0u8; len as usize];
    backend
        .read_exact_at(&mut bytes, 0)
        .map_err(crate::Error::reading("qcow2 first clusters"))?;
    backend
        .write_all_at(&bytes, 0)
        .map_err(crate::Error::writing("qcow2 first clusters"))
}

#[cfg(test)]
mod tests {

    #[test]
    fn qemu_numbers_take_one_sign_and_negatives_wrap() {
        assert_eq!(parse_qemu_uint("-1"), Some(u64::MAX));
        assert_eq!(parse_qemu_uint(" -0x2"), Some(u64::MAX - 1));
        assert_eq!(parse_qemu_uint("+16"), Some(16));
        assert_eq!(parse_qemu_uint("--1"), None);
        assert_eq!(parse_qemu_uint("- 1"), None);
        assert_eq!(parse_qemu_uint("abc"), None);
    }

    use super::*;

    fn options(pairs: &[(&str, &str)]) -> Result<CreateOptions, Qcow2Error> {
        let mut options = CreateOptions::default();
        for (key, value) in pairs {
            options.set(key, value)?;
        }
        options.validate()?;
        Ok(options)
    }

    #[test]
    fn qemu_img_option_syntax_is_accepted() {
        let o = options(&[
            ("cluster_size", "16k"),
            ("compat", "1.1"),
            ("refcount_bits", "8"),
            ("lazy_refcounts", "on"),
            ("extended_l2", "on"),
            ("compression_type", "zstd"),
        ])
        .unwrap();
        assert_eq!(o.cluster_size, 16384);
        assert_eq!(o.refcount_bits, 8);
        assert!(o.lazy_refcounts && o.extended_l2);
        assert_eq!(o.compression_type, CompressionType::Zstd);
        assert_eq!(
            options(&[("compat", "0.10")]).unwrap().compat,
            Compat::V0_10
        );
    }

    #[test]
    fn combinations_qemu_img_refuses_are_refused() {
        let refused: &[&[(&str, &str)]] = &[
            &[("cluster_size", "3000")],
            &[("cluster_size", "256")],
            &[("cluster_size", "4M")],
            &[("refcount_bits", "3")],
            &[("refcount_bits", "128")],
            &[("compat", "0.10"), ("refcount_bits", "8")],
            &[("compat", "0.10"), ("lazy_refcounts", "on")],
            &[("compat", "0.10"), ("extended_l2", "on")],
            &[("compat", "0.10"), ("compression_type", "zstd")],
            &[("cluster_size", "8k"), ("extended_l2", "on")],
            &[("compat", "2.0")],
            &[("lazy_refcounts", "maybe")],
            &[("refcount_bits", "016")], // octal 14, as qemu reads it
            &[("compression_type", "lz4")],
            &[("preallocation", "full")],
        ];
        for pairs in refused {
            assert!(options(pairs).is_err(), "{pairs:?} accepted");
        }
    }

    #[test]
    fn sizes_round_up_to_sectors_and_too_large_disks_are_refused() {
        let (cluster, _) = plan(1000, &CreateOptions::default(), None).unwrap();
        assert_eq!(cluster.header.size, 1024);
        let tiny = options(&[("cluster_size", "512")]).unwrap();
        assert!(matches!(
            plan(64 << 40, &tiny, None),
            Err(Qcow2Error::DiskTooLarge {
                cluster_size: 512,
                ..
            })
        ));
        assert!(plan(u64::MAX, &CreateOptions::default(), None).is_err());
    }

    #[test]
    fn feature_table_only_for_v3_with_clusters_above_4k() {
        let has_table = |pairs: &[(&str, &str)]| {
            let (cluster, _) = plan(1 << 20, &options(pairs).unwrap(), None).unwrap();
            cluster
                .extensions
                .iter()
                .any(|e| matches!(e, Extension::FeatureNameTable(_)))
        };
        assert!(has_table(&[]));
        assert!(has_table(&[("cluster_size", "8k")]));
        assert!(!has_table(&[("cluster_size", "4k")]));
        assert!(!has_table(&[("compat", "0.10")]));
    }

    #[test]
    fn a_data_file_sets_its_bits_and_extension_in_qemus_order() {
        let data = DataFileReference {
            name: "d.raw".into(),
            raw: false,
        };
        let backing = BackingReference {
            name: "b.qcow2".into(),
            format: "qcow2".into(),
        };
        let (cluster, _) = plan_with_data_file(
            1 << 20,
            &CreateOptions::default(),
            Some(&backing),
            Some(&data),
        )
        .unwrap();
        assert!(cluster
            .header
            .incompatible_features
            .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE));
        assert!(cluster.header.autoclear_features.is_empty());
        assert!(matches!(
            cluster.extensions.as_slice(),
            [
                Extension::BackingFormat(_),
                Extension::ExternalDataFile(name),
                Extension::FeatureNameTable(_)
            ] if name == "d.raw"
        ));
        let raw = DataFileReference { raw: true, ..data };
        let (cluster, _) =
            plan_with_data_file(1 << 20, &CreateOptions::default(), None, Some(&raw)).unwrap();
        assert!(cluster
            .header
            .autoclear_features
            .contains(AutoclearFeatures::RAW_EXTERNAL));
        // qemu-img's refusals: a raw data file with a backing file, any data file in v2.
        assert!(plan_with_data_file(
            1 << 20,
            &CreateOptions::default(),
            Some(&backing),
            Some(&raw)
        )
        .is_err());
        let v2 = options(&[("compat", "0.10")]).unwrap();
        assert!(plan_with_data_file(1 << 20, &v2, None, Some(&raw)).is_err());
    }

    #[test]
    fn a_raw_data_file_has_every_cluster_mapped_at_its_guest_offset() {
        let backend = crate::io::MemBackend::default();
        let raw = DataFileReference {
            name: "d.raw".into(),
            raw: true,
        };
        let size = 3 << 20;
        write_new_image_with_data_file(
            &backend,
            size,
            &CreateOptions::default(),
            None,
            &raw,
            false,
        )
        .unwrap();
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        assert_eq!(cluster.data_file(), Some("d.raw"));
        // L1[0] -> the L2 table in cluster 4 (after header, refcounts, L1), as qemu places it.
        let mut entry = [0u8; 8];
        crate::io::Backend::read_exact_at(&backend, &mut entry, 0x30000).unwrap();
        assert_eq!(u64::from_be_bytes(entry), 0x8000_0000_0004_0000);
        for i in 0..48u64 {
            crate::io::Backend::read_exact_at(&backend, &mut entry, 0x40000 + 8 * i).unwrap();
            assert_eq!(
                u64::from_be_bytes(entry),
                (i << 16) | super::super::tables::COPIED
            );
        }
    }

    #[test]
    fn a_new_image_reads_back_with_the_requested_facts() {
        let backend = crate::io::MemBackend::default();
        let backing = BackingReference {
            name: "b.raw".into(),
            format: "raw".into(),
        };
        let o = options(&[("refcount_bits", "1"), ("lazy_refcounts", "on")]).unwrap();
        assert_eq!(
            write_new_image(&backend, 5 << 20, &o, Some(&backing)).unwrap(),
            5 << 20
        );
        let cluster = HeaderCluster::read_from(&backend).unwrap();
        assert_eq!(cluster.header.refcount_bits(), 1);
        assert!(cluster
            .header
            .compatible_features
            .contains(CompatibleFeatures::LAZY_REFCOUNTS));
        assert_eq!(cluster.backing_format(), Some("raw"));
        assert_eq!(cluster.backing_file.as_deref(), Some("b.raw"));
        // Refcount block 0 at cluster 2 counts clusters 0..=3, one bit each.
        let mut block = [0u8; 1];
        crate::io::Backend::read_exact_at(&backend, &mut block, 0x20000).unwrap();
        assert_eq!(block[0], 0b1111);
    }
}
