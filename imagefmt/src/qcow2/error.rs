//! Everything that can be wrong with a qcow2 header, one variant per check.

use thiserror::Error;

/// A qcow2 header, extension area or creation request that cowclone refuses.
///
/// Every open-time bound of FORMATS.md §1.10 has its own variant carrying the offending values, so
/// callers (and tests) can tell exactly which check failed.
#[non_exhaustive]
#[derive(Debug, Error, PartialEq, Eq)]
pub enum Qcow2Error {
    /// Fewer bytes than the fixed header needs.
    #[error("qcow2 header is truncated: {len} bytes, need at least {needed}")]
    Truncated {
        /// Bytes available.
        len: usize,
        /// Bytes the header needs.
        needed: usize,
    },
    /// The first four bytes are not `QFI\xfb`.
    #[error("not a qcow2 image (magic {found:#010x})")]
    BadMagic {
        /// The magic found.
        found: u32,
    },
    /// Only versions 2 and 3 exist.
    #[error("qcow2 version {found} is not supported (only 2 and 3)")]
    UnsupportedVersion {
        /// The version found.
        found: u32,
    },
    /// cluster_bits outside 9..=21 (512 B to 2 MiB).
    #[error("qcow2 cluster_bits {found} is outside 9..=21")]
    InvalidClusterBits {
        /// The cluster_bits found.
        found: u32,
    },
    /// A v3 header_length below 104 bytes.
    #[error("qcow2 v3 header_length {found} is below 104")]
    HeaderLengthTooSmall {
        /// The header_length found.
        found: u32,
    },
    /// header_length larger than the first cluster.
    #[error("qcow2 header_length {found} exceeds the cluster size {cluster_size}")]
    HeaderLengthTooLarge {
        /// The header_length found.
        found: u32,
        /// The cluster size.
        cluster_size: u64,
    },
    /// header_length that is not a multiple of 8 (refused only when writing).
    #[error("qcow2 header_length {found} is not a multiple of 8")]
    HeaderLengthUnaligned {
        /// The header_length found.
        found: u32,
    },
    /// backing_file_offset past the first cluster.
    #[error("qcow2 backing file offset {offset:#x} lies outside the first cluster")]
    BackingFileOffsetOutsideCluster0 {
        /// The offset found.
        offset: u64,
    },
    /// Backing file name longer than 1023 bytes or past the first cluster.
    #[error("qcow2 backing file name of {size} bytes is too long (at most {max})")]
    BackingFileNameTooLong {
        /// The size found.
        size: u32,
        /// The largest size allowed at this offset.
        max: u64,
    },
    /// Backing file name that is not UTF-8 or contains a NUL byte.
    #[error("qcow2 backing file name is not a valid file name")]
    BackingFileNameInvalid,
    /// Incompatible feature bits this implementation does not know.
    #[error(
        "qcow2 image uses unsupported incompatible features {bits:#x}{}",
        named(names)
    )]
    UnsupportedIncompatibleFeatures {
        /// The unknown bits.
        bits: u64,
        /// The names the image's feature-name table gives some of them, in table order (as
        /// qemu lists them; see [`super::features::name_incompatible`]).
        names: Vec<String>,
        /// The unknown bits the table does not name.
        unnamed: u64,
    },
    /// A compression type other than deflate (0) or zstd (1).
    #[error("qcow2 compression type {found} is unknown")]
    UnknownCompressionType {
        /// The compression type found.
        found: u8,
    },
    /// The compression-type feature bit disagrees with the compression type field.
    #[error("qcow2 compression type {compression_type} disagrees with the compression feature bit ({bit_set})")]
    CompressionTypeBitMismatch {
        /// The compression type field.
        compression_type: u8,
        /// Whether incompatible bit 3 is set.
        bit_set: bool,
    },
    /// Extended L2 entries need subclusters of at least 512 bytes (cluster_bits ≥ 14).
    #[error(
        "qcow2 extended L2 entries need a cluster size of at least 16 KiB, not {cluster_size}"
    )]
    ExtendedL2ClusterTooSmall {
        /// The cluster size.
        cluster_size: u64,
    },
    /// refcount_order above 6 (64-bit refcounts).
    #[error("qcow2 refcount_order {found} is above 6")]
    InvalidRefcountOrder {
        /// The refcount_order found.
        found: u32,
    },
    /// A v2 image with a refcount width other than 16 bits (only when creating).
    #[error("qcow2 compat 0.10 (version 2) supports only 16-bit refcounts, not {bits}")]
    RefcountWidthNeedsV3 {
        /// The refcount width asked for.
        bits: u32,
    },
    /// An encryption method other than none, AES or LUKS.
    #[error("qcow2 encryption method {found} is unknown")]
    UnknownEncryptionMethod {
        /// The crypt_method found.
        found: u32,
    },
    /// Encrypted images are recognised but not supported.
    #[error("qcow2 image is encrypted (method {method}); encrypted images are not supported")]
    EncryptionNotSupported {
        /// The crypt_method found.
        method: u32,
    },
    /// A refcount table of zero clusters.
    #[error("qcow2 refcount table has zero clusters")]
    RefcountTableEmpty,
    /// A refcount table larger than qemu's 8 MiB limit.
    #[error("qcow2 refcount table of {clusters} clusters exceeds the 8 MiB limit")]
    RefcountTableTooLarge {
        /// The refcount_table_clusters found.
        clusters: u32,
    },
    /// A table or area offset that is not cluster-aligned.
    #[error("qcow2 {table} offset {offset:#x} is not cluster-aligned")]
    UnalignedOffset {
        /// Which table.
        table: &'static str,
        /// The offset found.
        offset: u64,
    },
    /// A table whose end overflows or lies beyond the largest file offset.
    #[error("qcow2 {table} at {offset:#x} of {len} bytes ends past the largest file offset")]
    TableOffsetInvalid {
        /// Which table.
        table: &'static str,
        /// The offset found.
        offset: u64,
        /// The table's length in bytes.
        len: u64,
    },
    /// An L1 table larger than qemu's 32 MiB limit.
    #[error("qcow2 L1 table of {entries} entries exceeds the 32 MiB limit")]
    L1TableTooLarge {
        /// The l1_size found or needed.
        entries: u64,
    },
    /// An L1 table too small to map the whole virtual disk.
    #[error("qcow2 L1 table of {entries} entries is too small for the disk size (needs {needed})")]
    L1TableTooSmall {
        /// The l1_size found.
        entries: u32,
        /// The entries the disk size needs.
        needed: u64,
    },
    /// A virtual size no L1 table can map with this cluster size.
    #[error("disk size {size} is too large for qcow2 with {cluster_size}-byte clusters (try a larger cluster size)")]
    DiskTooLarge {
        /// The size asked for.
        size: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// The corrupt bit is set: the image may only be opened read-only.
    #[error("qcow2 image is marked corrupt; it can only be opened read-only")]
    MarkedCorrupt,
    /// The external data file bit without a data-file name, or the raw-external bit without the data-file bit.
    #[error("qcow2 image has an inconsistent external data file configuration")]
    InconsistentDataFile,
    /// A header extension that runs past the end of the extension area.
    #[error("qcow2 header extension {kind:#010x} at {offset:#x} runs past the end of the extension area ({end:#x})")]
    ExtensionTooLarge {
        /// The extension type.
        kind: u32,
        /// Where it starts.
        offset: u64,
        /// Where the extension area ends.
        end: u64,
    },
    /// A known extension whose length or content is invalid.
    #[error("qcow2 header extension {kind:#010x} is invalid: {reason}")]
    InvalidExtension {
        /// The extension type.
        kind: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// The header, extensions and backing name do not fit in the first cluster (when writing).
    #[error("qcow2 header, extensions and backing name need {needed} bytes, more than the {cluster_size}-byte first cluster")]
    HeaderClusterOverflow {
        /// Bytes needed.
        needed: u64,
        /// The cluster size.
        cluster_size: u64,
    },
    /// A creation option with an invalid value.
    #[error("invalid qcow2 option {option}={value}: {reason}")]
    InvalidOption {
        /// The option name, as qemu-img spells it.
        option: &'static str,
        /// The value given.
        value: String,
        /// What is accepted.
        reason: &'static str,
    },
    /// A table or data cluster referenced past the end of the file.
    #[error("qcow2 {what} at {offset:#x} lies beyond the end of the file ({file_len} bytes)")]
    BeyondEndOfFile {
        /// What was referenced.
        what: &'static str,
        /// Its offset.
        offset: u64,
        /// The file's length.
        file_len: u64,
    },
    /// Metadata that cannot be right (found while reading guest data): the image is corrupt.
    #[error(
        "qcow2 image is corrupt: {what} at guest offset {guest_offset:#x} (entry {entry:#018x})"
    )]
    CorruptEntry {
        /// What is wrong.
        what: &'static str,
        /// The guest offset being read.
        guest_offset: u64,
        /// The offending entry.
        entry: u64,
    },
    /// A data cluster whose host offset is not cluster-aligned, named by the L2 table that maps
    /// it (qemu reports the table's offset and the entry's index).
    #[error(
        "qcow2 image is corrupt: cluster allocation offset unaligned at guest offset {guest_offset:#x} (entry {entry:#018x})"
    )]
    UnalignedCluster {
        /// The guest offset being read.
        guest_offset: u64,
        /// The offending entry.
        entry: u64,
        /// The unaligned host offset it gives.
        host: u64,
        /// The host offset of the L2 table holding it.
        l2_offset: u64,
        /// The entry's index in that table.
        l2_index: u64,
    },
    /// A compressed cluster that does not decompress to exactly one cluster.
    #[error(
        "qcow2 compressed cluster at host offset {host:#x} does not decompress to one cluster"
    )]
    BadCompressedCluster {
        /// Guest offset of the cluster.
        guest_offset: u64,
        /// Host offset of the compressed data.
        host: u64,
    },
    /// The image keeps its data in an external file, and the caller did not allow opening it.
    #[error("qcow2 image keeps its data in the external file {name:?}; not opened (external data files are refused by default)")]
    ExternalDataFileRefused {
        /// The data file name from the header.
        name: String,
    },
    /// A compressed cluster was to be written into an image with an external data file: a data
    /// file holds each cluster at its guest offset, so it cannot hold compressed ones (qemu
    /// refuses such writes with "Operation not supported").
    #[error("Operation not supported: compressed clusters cannot be written into an image with an external data file")]
    CompressedDataFile,
    /// The image keeps its data in an external file whose name its header does not record
    /// (`qemu-img amend -o data_file=` removed it), and the caller named none.
    #[error("'data-file' is required for this image")]
    DataFileRequired,
    /// A data file was named for an image that keeps its data in its own file.
    #[error("'data-file' can only be set for images with an external data file")]
    DataFileNotExpected,
    /// A read outside the virtual disk.
    #[error("qcow2 read of {len} bytes at {offset:#x} is outside the {size}-byte disk")]
    ReadOutOfRange {
        /// Offset asked for.
        offset: u64,
        /// Length asked for.
        len: u64,
        /// Virtual size.
        size: u64,
    },
    /// A persistent dirty bitmap or a bitmap request was refused (qemu's message).
    #[error(transparent)]
    Bitmap(#[from] super::bitmap::BitmapError),
    /// The internal snapshot table, or a snapshot operation, was refused.
    #[error(transparent)]
    Snapshot(#[from] super::snapshot::SnapshotError),
}

/// ` (…: A, B)` after the bits of an unsupported-features error, if the image names any.
fn named(names: &[String]) -> String {
    if names.is_empty() {
        String::new()
    } else {
        format!(" (the image names them: {})", names.join(", "))
    }
}
