//! `qemu-img amend` for qcow2: changing an existing image's compat level, lazy refcounts,
//! refcount width, virtual size and data-file settings in place, with qemu-img 10's option
//! syntax, order of operations and refusals (`block/qcow2.c` `qcow2_amend_options`).
//!
//! ```text
//! parse -o ─► AmendOptions ─► amend()
//!   1. upgrade to v3 (112-byte header, feature-name table; a snapshot table with entries
//!      shorter than v3 needs written anew)
//!   2. refcount width: new table + blocks written past the end, header switched, old freed
//!   3. data_file / data_file_raw, then the backing file (only its own values are accepted)
//!   4. lazy_refcounts      5. size (shrinking drops what lies past the new end)
//!   6. downgrade to v2: zero clusters expanded (active and snapshot L1 tables), v3-only
//!      header fields dropped
//! ```
//!
//! `amend_reporting` reports progress as qemu-img's amend does (`amend_status.rs`).
//!
//! Like qemu, steps that succeeded stay done when a later one is refused. Each step leaves the
//! image consistent: a crash can at worst leak clusters (the refcount rewrite is complete
//! before the header points at it, and the old structures are freed only afterwards).

use std::fs::File;

use thiserror::Error;

use super::amend_status::{AmendStatus, Operation};
use super::check::{check, Repair};
use super::create::{parse_bool, parse_qemu_uint};
use super::extensions::Extension;
use super::features::{
    standard_feature_table, AutoclearFeatures, CompatibleFeatures, IncompatibleFeatures,
};
use super::header::{CompressionType, Header, Version, V2_HEADER_LEN, V3_HEADER_LEN};
use super::header_cluster::HeaderCluster;
use super::image::Qcow2Image;
use super::refcount::{self, REFTABLE_OFFSET_MASK};
use super::tables::{ClusterKind, L1Entry, L2Entry, COPIED};
use super::write::WriteOptions;
use crate::io::Backend;

/// The options `qemu-img amend` accepts for qcow2 (besides LUKS encryption options), in the
/// order qemu applies their checks.
pub const AMEND_OPTIONS: [&str; 8] = [
    "size",
    "compat",
    "backing_file",
    "backing_fmt",
    "data_file",
    "data_file_raw",
    "lazy_refcounts",
    "refcount_bits",
];

/// qcow2 options only `create` accepts: naming one gets qemu-img's hint that it is a creation
/// option.
const CREATE_ONLY_OPTIONS: [&str; 7] = [
    "cluster_size",
    "extended_l2",
    "preallocation",
    "compression_type",
    "encrypt",
    "encrypt.format",
    "encryption",
];

/// What `amend` failed with: a refusal worded as qemu-img words it, or an image error.
#[non_exhaustive]
#[derive(Debug, Error)]
pub enum AmendError {
    /// An option or combination qemu-img refuses; `message` is qemu-img's text (without the
    /// `qemu-img: ` prefix), `hint` the extra line it prints after it, if any.
    #[error("{message}")]
    Refused {
        /// qemu-img's message.
        message: String,
        /// qemu-img's hint line.
        hint: Option<&'static str>,
    },
    /// Reading or writing the image failed, or the image cannot be written.
    #[error(transparent)]
    Image(#[from] crate::Error),
}

fn refused(message: impl Into<String>) -> AmendError {
    AmendError::Refused {
        message: message.into(),
        hint: None,
    }
}

impl From<super::Qcow2Error> for AmendError {
    fn from(e: super::Qcow2Error) -> Self {
        AmendError::Image(e.into())
    }
}

/// What `-o` asks to change; `None` leaves a setting as it is. Values are kept as given where
/// qemu checks them only while amending (`compat`, `refcount_bits`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// `size=`: the new virtual size (0 means unchanged, as in qemu).
    pub size: Option<u64>,
    /// `compat=`: `0.10`/`v2` or `1.1`/`v3`.
    pub compat: Option<String>,
    /// `backing_file=`: accepted only if it names the current backing file.
    pub backing_file: Option<String>,
    /// `backing_fmt=`: accepted only if it names the current backing format.
    pub backing_fmt: Option<String>,
    /// `data_file=`: a new name for the external data file (images that have one).
    pub data_file: Option<String>,
    /// `data_file_raw=`: may only be switched off (or stay on).
    pub data_file_raw: Option<bool>,
    /// `lazy_refcounts=`.
    pub lazy_refcounts: Option<bool>,
    /// `refcount_bits=`: a power of two from 1 to 64.
    pub refcount_bits: Option<u64>,
}

impl AmendOptions {
    /// Parses qemu's `-o` syntax: `key=value` pairs separated by commas (`,,` is a literal
    /// comma in a value; a bare `key` means `key=on`). Later values win. Unknown keys and
    /// values of the wrong type get qemu-img's messages.
    pub fn parse(text: &str) -> Result<Self, AmendError> {
        let mut options = Self::default();
        let pairs = split_options(text);
        for (key, value) in &pairs {
            if !AMEND_OPTIONS.contains(&key.as_str()) {
                let creation_only = pairs.iter().all(|(k, _)| {
                    AMEND_OPTIONS.contains(&k.as_str())
                        || CREATE_ONLY_OPTIONS.contains(&k.as_str())
                        || k.starts_with("encrypt.")
                });
                return Err(AmendError::Refused {
                    message: format!("Invalid parameter '{key}'"),
                    hint: creation_only
                        .then_some("This option is only supported for image creation"),
                });
            }
            options.set(key, value)?;
        }
        Ok(options)
    }

    /// Applies one option with qemu's value syntax.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), AmendError> {
        let expects_bool = || refused(format!("Parameter '{key}' expects 'on' or 'off'"));
        match key {
            "size" => {
                self.size = Some(crate::size::parse_size(value).map_err(|_| {
                    refused(format!(
                        "Parameter '{key}' expects a non-negative number below 2^64\n\
                         Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
                         and exabytes, respectively."
                    ))
                })?)
            }
            "compat" => self.compat = Some(value.to_owned()),
            "backing_file" => self.backing_file = Some(value.to_owned()),
            "backing_fmt" => self.backing_fmt = Some(value.to_owned()),
            "data_file" => self.data_file = Some(value.to_owned()),
            "data_file_raw" => self.data_file_raw = Some(parse_bool(value).ok_or_else(expects_bool)?),
            "lazy_refcounts" => {
                self.lazy_refcounts = Some(parse_bool(value).ok_or_else(expects_bool)?)
            }
            "refcount_bits" => {
                self.refcount_bits = Some(
                    parse_qemu_uint(value)
                        .ok_or_else(|| refused(format!("Parameter '{key}' expects a number")))?,
                )
            }
            _ => return Err(refused(format!("Invalid parameter '{key}'"))),
        }
        Ok(())
    }
}

/// True if `-o` text asks for the option list (`help` or `?` among its items), which qemu-img
/// prints instead of amending.
pub fn wants_help(text: &str) -> bool {
    split_options(text)
        .iter()
        .any(|(key, value)| value == "on" && (key == "help" || key == "?"))
}

/// The option list `-o help` prints, in qemu-img's layout (`Amend options for 'qcow2':`, then
/// one `  key=<type>` line each, sorted), with cowclone's own descriptions.
pub fn help_text() -> String {
    let options = [
        (
            "backing_file",
            "<str>",
            "only the current backing file (use rebase to change it)",
        ),
        ("backing_fmt", "<str>", "only the current backing format"),
        ("compat", "<str>", "0.10 (v2) or 1.1 (v3)"),
        ("data_file", "<str>", "new name of the external data file"),
        (
            "data_file_raw",
            "<bool (on/off)>",
            "off: the data file need no longer stay raw",
        ),
        (
            "lazy_refcounts",
            "<bool (on/off)>",
            "lazy refcount updates (v3)",
        ),
        (
            "refcount_bits",
            "<num>",
            "refcount width: 1, 2, 4, 8, 16, 32 or 64 bits",
        ),
        ("size", "<size>", "virtual disk size"),
    ];
    let mut text = "Amend options for 'qcow2':\n".to_owned();
    for (key, kind, description) in options {
        let left = format!("{key}={kind}");
        text.push_str(&format!("  {left:<22} - {description}\n"));
    }
    text
}

/// Splits qemu's `key=value,key=value` option syntax (`,,` escapes a comma).
fn split_options(text: &str) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    let mut finish = |current: &mut String| {
        if !current.is_empty() {
            let (key, value) = match current.split_once('=') {
                Some((k, v)) => (k.to_owned(), v.to_owned()),
                None => (current.clone(), "on".to_owned()),
            };
            pairs.push((key, value));
        }
        current.clear();
    };
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                current.push(',');
            } else {
                finish(&mut current);
            }
        } else {
            current.push(c);
        }
    }
    finish(&mut current);
    pairs
}

/// Amends the qcow2 image in `file` (opened for writing, locks held) as `options` say.
///
/// The snapshot table is read first, as qemu's open reads it: a table qemu refuses to open
/// fails the amend. A dirty image (lazy refcounts after a crash) is then repaired, as qemu
/// repairs it when opening it for writing. Changes of version, refcount width or size open the
/// image's tables for writing (an external data file is not opened: the size of such an image
/// changes only through [`amend_reporting_with`]); changes of `lazy_refcounts`, `data_file`
/// and `data_file_raw` only rewrite cluster 0.
///
/// Returns the lines the repair of a dirty image printed (qemu prints them on stderr).
pub fn amend(file: File, options: &AmendOptions) -> Result<Vec<String>, AmendError> {
    amend_reporting(file, options, &mut |_, _| {})
}

/// [`amend`], reporting progress to `progress` as (done, total) units of the whole amend,
/// when and as qemu-img 10's amend reports them to its status callback (upgrade, refcount
/// width and downgrade report; the other changes do not). qemu-img prints
/// `100 × done / total`, computed in single precision.
pub fn amend_reporting(
    file: File,
    options: &AmendOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<String>, AmendError> {
    amend_reporting_with(file, options, None, progress)
}

/// [`amend_reporting`] told where the image's external data file is found: `data_file` is the
/// image's path and the chain options that admit its data file. A size change of an image with
/// one then opens the data file for writing and resizes it with the disk, as qemu-img amend
/// does; without it (or where the options do not admit it) such a size change is refused.
pub fn amend_reporting_with(
    file: File,
    options: &AmendOptions,
    data_file: Option<(&std::path::Path, &crate::chain::ChainOptions<'_>)>,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Vec<String>, AmendError> {
    let mut cluster = HeaderCluster::read_from(&file)?;
    // qemu opens the image before it looks at the options, and its open reads the snapshot
    // table: a table it cannot read fails every amend, also one that only rewrites the header
    // (which never opens the image's tables here) and one of a dirty image, before the repair
    // (which would mend the table). Opening for a structural change reads it again, after the
    // repair.
    super::snapshot_ops::read_snapshots(&file, &cluster.header)?;
    let mut repair_messages = Vec::new();
    if cluster
        .header
        .incompatible_features
        .contains(IncompatibleFeatures::DIRTY)
    {
        repair_messages = check(&file, Repair::All)?.messages;
        cluster = HeaderCluster::read_from(&file)?;
    }
    let header = &cluster.header;
    let old_version = header.version;
    let mut new_version = old_version;
    let has_data_file = header
        .incompatible_features
        .contains(IncompatibleFeatures::EXTERNAL_DATA_FILE);
    let data_file_is_raw = header
        .autoclear_features
        .contains(AutoclearFeatures::RAW_EXTERNAL);
    let mut refcount_bits = u64::from(header.refcount_bits());
    // The checks qemu makes while reading the options, in its option order.
    if let Some(compat) = &options.compat {
        new_version = match compat.as_str() {
            "0.10" | "v2" => Version::V2,
            "1.1" | "v3" => Version::V3,
            other => return Err(refused(format!("Unknown compatibility level {other}"))),
        };
    }
    if options.data_file.is_some() && !has_data_file {
        return Err(refused(
            "data-file can only be set for images that use an external data file",
        ));
    }
    let data_file_raw = options.data_file_raw.unwrap_or(data_file_is_raw);
    if data_file_raw && !data_file_is_raw {
        return Err(refused("data-file-raw cannot be set on existing images"));
    }
    if let Some(bits) = options.refcount_bits {
        if bits == 0 || bits > 64 || !bits.is_power_of_two() {
            return Err(refused(
                "Refcount width must be a power of two and may not exceed 64 bits",
            ));
        }
        refcount_bits = bits;
    }
    let new_order = refcount_bits.trailing_zeros();
    let new_size = options.size.filter(|&s| s != 0);
    if header.crypt_method != 0 {
        return Err(refused("cowclone does not amend encrypted images"));
    }
    let resizes_data_file = has_data_file && new_size.is_some_and(|s| s != header.size);
    if resizes_data_file && data_file.is_none() {
        return Err(refused(
            "the size of an image with an external data file changes only with its data file (not opened)",
        ));
    }

    // Nothing comes before the refcount width step for a v2 target (no upgrade), so its
    // refusal can be made before the image is opened, as qemu makes it before touching it.
    if new_order != header.refcount_order && new_version == Version::V2 && refcount_bits != 16 {
        return Err(refused(
            "Refcount widths other than 16 bits require compatibility level 1.1 or above (use compat=1.1 or greater)",
        ));
    }
    // A downgrade alone of an image with an external data file is refused in step 6 without
    // opening the image's tables (they cannot be opened without the data file): the steps
    // before it, which only rewrite cluster 0, stay done, as in qemu.
    let refused_downgrade = has_data_file
        && new_version == Version::V2
        && old_version == Version::V3
        && new_order == header.refcount_order
        && new_size.is_none_or(|s| s == header.size);
    let structural = (new_version != old_version && !refused_downgrade)
        || new_order != header.refcount_order
        || new_size.is_some_and(|s| s != header.size);
    let operations =
        u64::from(new_version != old_version) + u64::from(new_order != header.refcount_order);
    let mut status = AmendStatus::new(progress, operations);
    let mut target = if structural {
        let durable = WriteOptions { durable: true };
        Target::Image(Box::new(match data_file {
            // A size change resizes the data file with the disk (refused where `chain` does
            // not admit it).
            Some((path, chain)) if resizes_data_file => {
                crate::chain::qcow2_rw_over(file, path, cluster, None, chain, durable)?
            }
            // Otherwise the tables change, never guest data: the data file is not needed.
            _ => Qcow2Image::open_rw_tables_only(file, cluster, durable)?,
        }))
    } else {
        Target::Header { file, cluster }
    };

    // 1. Upgrade first: some features need v3. v3 snapshot table entries need the 64-bit VM
    //    state size and the disk size: a table with shorter entries is written anew first
    //    (every entry with the known extra data), as qemu's upgrade does.
    if new_version == Version::V3 && old_version == Version::V2 {
        status.begin(Operation::Upgrading);
        status.report(0, 2);
        let image = target.image()?;
        image.allocate_first_fit();
        let table = image.snapshots()?;
        if table
            .iter()
            .any(|sn| sn.extra_data_size < super::snapshot::V3_MIN_EXTRA_DATA)
        {
            image.write_snapshot_table(&table)?;
        }
        status.report(1, 2);
        target.edit_header(|c| set_version(c, Version::V3))?;
        status.report(2, 2);
    }
    // 2. Refcount width (a v2 target refused it before the image was opened).
    if new_order != target.header().refcount_order {
        status.begin(Operation::ChangingRefcountOrder);
        target
            .image()?
            .change_refcount_order_reporting(new_order, &mut status)?;
    }
    // 3. Data file settings, then the backing file, which may not change.
    target.edit_header(|c| {
        if data_file_raw {
            c.header.autoclear_features |= AutoclearFeatures::RAW_EXTERNAL;
        } else {
            c.header.autoclear_features -= AutoclearFeatures::RAW_EXTERNAL;
        }
        if let Some(name) = &options.data_file {
            c.extensions
                .retain(|e| !matches!(e, Extension::ExternalDataFile(_)));
            if !name.is_empty() {
                let at = c
                    .extensions
                    .iter()
                    .position(|e| !matches!(e, Extension::BackingFormat(_)))
                    .unwrap_or(c.extensions.len());
                c.extensions
                    .insert(at, Extension::ExternalDataFile(name.clone()));
            }
        }
    })?;
    if options.backing_file.is_some() || options.backing_fmt.is_some() {
        let cluster = target.cluster()?;
        if options.backing_file.as_deref() != cluster.backing_file.as_deref()
            || options.backing_fmt.as_deref() != cluster.backing_format()
        {
            return Err(AmendError::Refused {
                message: "Cannot amend the backing file".to_owned(),
                hint: Some("You can use 'qemu-img rebase' instead."),
            });
        }
    }
    // 4. Lazy refcounts (the image is clean: a dirty one was repaired above).
    let lazy_now = target
        .header()
        .compatible_features
        .contains(CompatibleFeatures::LAZY_REFCOUNTS);
    if let Some(lazy) = options.lazy_refcounts.filter(|&l| l != lazy_now) {
        if lazy && new_version == Version::V2 {
            return Err(refused(
                "Lazy refcounts only supported with compatibility level 1.1 and above (use compat=1.1 or greater)",
            ));
        }
        target.edit_header(|c| {
            c.header
                .compatible_features
                .set(CompatibleFeatures::LAZY_REFCOUNTS, lazy)
        })?;
    }
    // 5. Size, exactly as asked. Shrinking drops what lies past the new end, as qemu-img amend
    //    does (`shrink.rs`, qemu-img resize --shrink's behaviour): whole clusters there are unmapped.
    if let Some(size) = new_size {
        let current = target.header().size;
        if size < current {
            target.image()?.drop_past(size)?;
        }
        if size != current {
            target.image()?.resize(size, true)?;
        }
    }
    // 6. Downgrade last, once what v2 cannot express is gone.
    if new_version == Version::V2 && old_version == Version::V3 {
        if refused_downgrade {
            // qemu_downgrade's first two refusals, in its order.
            return Err(refused(if target.header().refcount_order != 4 {
                "compat=0.10 requires refcount_bits=16"
            } else {
                "Cannot downgrade an image with a data file"
            }));
        }
        status.begin(Operation::Downgrading);
        target.image()?.downgrade_reporting(&mut status)?;
    }
    if let Target::Image(image) = &mut target {
        image.flush()?;
    } else if let Target::Header { file, .. } = &target {
        file.sync_all()
            .map_err(crate::Error::io("syncing qcow2 image"))?;
    }
    Ok(repair_messages)
}

/// What amend works on: the whole image when tables change, or cluster 0 alone.
enum Target {
    Image(Box<Qcow2Image<File>>),
    Header { file: File, cluster: HeaderCluster },
}

impl Target {
    fn header(&self) -> &Header {
        match self {
            Target::Image(image) => image.header(),
            Target::Header { cluster, .. } => &cluster.header,
        }
    }

    fn image(&mut self) -> Result<&mut Qcow2Image<File>, AmendError> {
        match self {
            Target::Image(image) => Ok(image),
            Target::Header { .. } => unreachable!("structural changes open the image for writing"),
        }
    }

    fn cluster(&self) -> Result<HeaderCluster, AmendError> {
        match self {
            Target::Image(image) => Ok(HeaderCluster::read_from(image.backend())?),
            Target::Header { cluster, .. } => Ok(cluster.clone()),
        }
    }

    fn edit_header(&mut self, edit: impl FnOnce(&mut HeaderCluster)) -> Result<(), AmendError> {
        match self {
            Target::Image(image) => image.edit_header_cluster(edit),
            Target::Header { file, cluster } => {
                let header = cluster.header.clone();
                *cluster = rewrite_cluster0(file, &header, edit)?;
                Ok(())
            }
        }
    }
}

/// Rewrites cluster 0 of the image on `backend`: its current extensions and backing name,
/// `header` as the fixed header (the caller's state is authoritative), `edit` applied. The
/// write covers the old encoding's length too, so no stale bytes stay behind. Returns what
/// was written.
fn rewrite_cluster0<B: Backend + ?Sized>(
    backend: &B,
    header: &Header,
    edit: impl FnOnce(&mut HeaderCluster),
) -> Result<HeaderCluster, AmendError> {
    let mut cluster = HeaderCluster::read_from(backend)?;
    let old_len = cluster.to_bytes()?.len();
    cluster.header = header.clone();
    edit(&mut cluster);
    let mut bytes = cluster.to_bytes()?;
    let written = HeaderCluster::parse(&bytes)?;
    bytes.resize(bytes.len().max(old_len), 0);
    backend
        .write_all_at(&bytes, 0)
        .map_err(crate::Error::writing("qcow2 header"))?;
    Ok(written)
}

/// Turns cluster 0 into a `version` header as qemu writes one: v3 with a 112-byte header and
/// the feature-name table (clusters above 4 KiB), v2 with the 72-byte header, no v3 fields and
/// no feature-name table.
fn set_version(cluster: &mut HeaderCluster, version: Version) {
    let header = &mut cluster.header;
    header.version = version;
    header.compression_type = CompressionType::Deflate;
    cluster
        .extensions
        .retain(|e| !matches!(e, Extension::FeatureNameTable(_)));
    match version {
        Version::V3 => {
            header.header_length = V3_HEADER_LEN;
            header.trailing = vec![0; V3_HEADER_LEN as usize - 105];
            if header.cluster_size() > 4096 {
                // qemu's order: backing format, data file, crypto header, feature table, rest.
                let at = cluster
                    .extensions
                    .iter()
                    .position(|e| {
                        !matches!(
                            e,
                            Extension::BackingFormat(_)
                                | Extension::ExternalDataFile(_)
                                | Extension::CryptoHeader { .. }
                        )
                    })
                    .unwrap_or(cluster.extensions.len());
                cluster
                    .extensions
                    .insert(at, Extension::FeatureNameTable(standard_feature_table()));
            }
        }
        Version::V2 => {
            header.header_length = V2_HEADER_LEN;
            header.trailing = Vec::new();
            header.incompatible_features = IncompatibleFeatures::empty();
            header.compatible_features = CompatibleFeatures::empty();
            header.autoclear_features = AutoclearFeatures::empty();
            header.refcount_order = 4;
        }
    }
}

impl<B: Backend + Send + Sync> Qcow2Image<B> {
    /// Rewrites cluster 0 from this image's header with `edit` applied (header fields,
    /// extensions, backing name), as qemu's `qcow2_update_header` does.
    pub fn edit_header_cluster(
        &mut self,
        edit: impl FnOnce(&mut HeaderCluster),
    ) -> Result<(), AmendError> {
        let written = rewrite_cluster0(&self.backend, &self.header, edit)?;
        self.header = written.header;
        Ok(())
    }

    /// Rewrites the refcount table and blocks with entries of `1 << new_order` bits (qemu's
    /// `qcow2_change_refcount_order`).
    ///
    /// The new table and blocks go into free space past every cluster in use (and past the end
    /// of the file) and count themselves; only when they are complete does the header switch
    /// to them, and only then are the old table and blocks freed, counted in the new ones. A
    /// crash before the switch leaves unreferenced space after the image's end; after it, at
    /// worst leaked clusters. Memory: the new table (≤ 8 MiB) and one block at a time.
    pub fn change_refcount_order(&mut self, new_order: u32) -> Result<(), AmendError> {
        let mut ignore = |_, _| {};
        self.change_refcount_order_reporting(new_order, &mut AmendStatus::new(&mut ignore, 1))
    }

    /// [`Self::change_refcount_order`], reporting the walks over the refcount table that
    /// qemu makes for the same change (`amend_status.rs`).
    fn change_refcount_order_reporting(
        &mut self,
        new_order: u32,
        status: &mut AmendStatus<'_>,
    ) -> Result<(), AmendError> {
        let old_order = self.header.refcount_order;
        if new_order == old_order {
            return Ok(());
        }
        let cluster_size = self.header.cluster_size();
        let old_per_block = refcount::entries_per_block(self.header.cluster_bits, old_order);
        let new_per_block = refcount::entries_per_block(self.header.cluster_bits, new_order);
        let new_max = refcount::max_refcount(new_order);
        let old_table: Vec<u64> = self.state().reftable.clone();

        // Pass 1: which new blocks will count something, and whether every count fits.
        let mut used_blocks = std::collections::BTreeSet::new();
        let mut end = self.file_len.div_ceil(cluster_size);
        for (index, &entry) in old_table.iter().enumerate() {
            if entry & REFTABLE_OFFSET_MASK == 0 {
                continue;
            }
            let first = index as u64 * old_per_block;
            for cluster in first..first + old_per_block {
                let count = self.refcount(cluster)?;
                if count == 0 {
                    continue;
                }
                if count > new_max {
                    // qemu gives up in its first walk, at this table entry.
                    let entries = old_table.len() as u64;
                    status.refcount_walk(0, 3, entries, Some(index as u64));
                    return Err(refused(format!(
                        "Cannot decrease refcount entry width to {} bits: Cluster at offset {} has a refcount of {count}",
                        1u32 << new_order,
                        c_hex(cluster * cluster_size),
                    )));
                }
                used_blocks.insert(cluster / new_per_block);
                end = end.max(cluster + 1);
            }
        }

        // qemu's allocation walks over the old table, for the progress it reports.
        let entries = old_table.len() as u64;
        let walks = self.qemu_refcount_walks(new_order, &used_blocks)?;
        for walk in 0..walks {
            status.refcount_walk(walk, (walk + 2).max(3), entries, None);
        }

        // The new area [end, end + table + blocks): its own clusters need blocks too.
        let start = end;
        let (mut table_clusters, mut block_count) = (1u64, 0u64);
        let blocks = loop {
            let area_end = start + table_clusters + block_count;
            let mut blocks = used_blocks.clone();
            blocks.extend(start / new_per_block..=(area_end - 1) / new_per_block);
            let last = *blocks.last().expect("the area itself needs a block");
            let needed_table = ((last + 1) * 8).div_ceil(cluster_size).max(1);
            if blocks.len() as u64 == block_count && needed_table == table_clusters {
                break blocks;
            }
            block_count = blocks.len() as u64;
            table_clusters = needed_table.max(table_clusters);
        };
        if table_clusters * cluster_size > super::MAX_REFCOUNT_TABLE_BYTES {
            return Err(refused(
                "This operation would make the refcount table grow beyond the maximum size supported by QEMU, aborting",
            ));
        }
        let area_end = start + table_clusters + block_count;

        // Pass 2: write the new blocks (old counts below the area, 1 for the area itself).
        let mut table = vec![0u64; (table_clusters * cluster_size / 8) as usize];
        let first_block = start + table_clusters;
        let mut bytes = vec![0u8; cluster_size as usize];
        for (k, &index) in blocks.iter().enumerate() {
            bytes.fill(0);
            let first = index * new_per_block;
            for cluster in first..first + new_per_block {
                let count = if (start..area_end).contains(&cluster) {
                    1
                } else if cluster < start
                    && old_table
                        .get((cluster / old_per_block) as usize)
                        .is_some_and(|e| e & REFTABLE_OFFSET_MASK != 0)
                {
                    self.refcount(cluster)?
                } else {
                    0
                };
                if count != 0 {
                    refcount::set(&mut bytes, cluster - first, new_order, count);
                }
            }
            let offset = (first_block + k as u64) * cluster_size;
            self.write_host(&bytes, offset)?;
            table[index as usize] = offset;
        }
        let encoded: Vec<u8> = table.iter().flat_map(|e| e.to_be_bytes()).collect();
        self.write_host(&encoded, start * cluster_size)?;
        self.barrier()?;
        status.refcount_walk(walks, walks + 1, entries, None);

        // Switch.
        let old_table_offset = self.header.refcount_table_offset;
        let old_table_clusters = u64::from(self.header.refcount_table_clusters);
        self.header.refcount_order = new_order;
        self.header.refcount_table_offset = start * cluster_size;
        self.header.refcount_table_clusters = table_clusters as u32;
        self.write_fixed_header()?;
        self.barrier()?;

        // The old structures are now leaks in the new counts: free them.
        let state = self.state();
        state.reftable = table;
        state.refblocks.clear();
        state.next_free = state.next_free.max(area_end);
        let old_first = old_table_offset / cluster_size;
        let old_clusters: Vec<u64> = (old_first..old_first + old_table_clusters)
            .chain(
                old_table
                    .iter()
                    .map(|e| e & REFTABLE_OFFSET_MASK)
                    .filter(|&o| o != 0)
                    .map(|o| o / cluster_size),
            )
            .collect();
        for &cluster in &old_clusters {
            state.metadata.remove(&cluster);
        }
        state.metadata.extend(start..area_end);
        for cluster in old_clusters {
            self.free_cluster(cluster * cluster_size)?;
        }
        Ok(())
    }

    /// Makes a v3 image v2 (qemu's `qcow2_downgrade`): refused for refcount widths other than
    /// 16, external data files, snapshots v2 cannot describe (VM state over 4 GiB − 1 bytes, or
    /// another disk size than the image's), incompatible features v2 lacks and
    /// zstd-compressed clusters;
    /// zero clusters are expanded in the active L1 table and in every snapshot's (unallocated
    /// without a backing file, zero-filled data clusters with one), then the header is
    /// rewritten as v2.
    pub fn downgrade(&mut self) -> Result<(), AmendError> {
        let mut ignore = |_, _| {};
        self.downgrade_reporting(&mut AmendStatus::new(&mut ignore, 1))
    }

    /// [`Self::downgrade`], reporting one unit per L1 entry visited (qemu's
    /// `qcow2_expand_zero_clusters`: the active table's entries, then each snapshot's).
    fn downgrade_reporting(&mut self, status: &mut AmendStatus<'_>) -> Result<(), AmendError> {
        if self.header.refcount_order != 4 {
            return Err(refused("compat=0.10 requires refcount_bits=16"));
        }
        // An image with a data file never gets here: `amend` refuses its downgrade in qemu's
        // words in its step 6.
        // v2 readers know only the 32-bit VM state size and take every snapshot to have the
        // image's size: a snapshot they would misread blocks the downgrade (checked before the
        // incompatible features, as qemu does). VM state that fits 32 bits is fine: the
        // entries keep their extra data, their 32-bit field already holds the size.
        let size = self.header.size;
        let snapshots = self.snapshots()?;
        if snapshots
            .iter()
            .any(|sn| sn.vm_state_size > u64::from(u32::MAX) || sn.disk_size_or(size) != size)
        {
            return Err(refused(
                super::snapshot::SnapshotError::PreventDowngrade.to_string(),
            ));
        }
        let features = self.header.incompatible_features;
        let blocking = features - IncompatibleFeatures::COMPRESSION_TYPE;
        if !blocking.is_empty() {
            return Err(refused(format!(
                "Cannot downgrade an image with incompatible features 0x{:x} set",
                blocking.bits()
            )));
        }
        let has_backing = HeaderCluster::read_from(&self.backend)?
            .backing_file
            .is_some();
        self.check_snapshot_l1_tables()?; // qemu validates them before expanding zero clusters
                                          // New data clusters go where qemu's allocator puts them: first fit from the start.
        self.allocate_first_fit();
        let mut walk = ZeroExpansion {
            has_backing,
            compressed: false,
            visited: 0,
            total: self.l1.len() as u64
                + snapshots
                    .iter()
                    .map(|sn| u64::from(sn.l1_size))
                    .sum::<u64>(),
        };
        let active = self.l1.clone();
        self.expand_zero_clusters_in(&active, true, &mut walk, status)?;
        for sn in &snapshots {
            let l1 = self.read_snapshot_l1(sn)?;
            self.expand_zero_clusters_in(&l1, false, &mut walk, status)?;
        }
        if features.contains(IncompatibleFeatures::COMPRESSION_TYPE) && walk.compressed {
            return Err(refused(
                "Cannot downgrade an image with zstd compression type and existing compressed clusters",
            ));
        }
        self.barrier()?;
        self.edit_header_cluster(|c| set_version(c, Version::V2))
    }

    /// Rewrites every zero cluster that the L1 table `l1` reaches as v2 can express it (qemu's
    /// `expand_zero_clusters_in_l1`): without a backing file a plain zero cluster becomes
    /// unallocated; otherwise it gets a new zero-filled data cluster, and a preallocated one is
    /// zero-filled in place.
    ///
    /// An L2 table that several L1 tables share (refcount above 1) is rewritten in place, once:
    /// its new data clusters get the table's refcount (every L1 table that reaches the table
    /// reaches them) and no COPIED flag, and the L1 tables walked later find them already
    /// expanded. An entry of a table no other L1 table shares gets the COPIED flag, as qemu
    /// gives it; in the `active` table only if its cluster's refcount is 1 too (a preallocated
    /// zero cluster may be shared with a snapshot: qemu flags it anyway, which `qemu-img
    /// check` then reports; in a snapshot's table nothing reads the flag). Per table, the
    /// zeros are written and the new clusters counted before the entries change, with an
    /// ordering point between, so a crash leaves at worst leaks.
    fn expand_zero_clusters_in(
        &mut self,
        l1: &[u64],
        active: bool,
        walk: &mut ZeroExpansion,
        status: &mut AmendStatus<'_>,
    ) -> Result<(), AmendError> {
        let cluster_size = self.header.cluster_size();
        let cluster_bits = self.header.cluster_bits;
        let format = self.entry_format();
        let zeros = vec![0u8; cluster_size as usize];
        for (l1_index, &l1_entry) in l1.iter().enumerate() {
            let guest_base = l1_index as u64 * self.header.l2_entries() * cluster_size;
            if let Some(table) = L1Entry(l1_entry).l2_offset() {
                // The refcount of a table whose offset is unaligned is never read: l2_table
                // refuses it first.
                let bytes = self.l2_table(table, guest_base, l1_entry)?.to_vec();
                let l2_refcount = self.refcount(table >> cluster_bits)?;
                // (index, new entry) for this table, written after the data they point at.
                let mut updates = Vec::new();
                for index in 0..format.l2_entries() as usize {
                    let entry = L2Entry::from_table(&bytes, index, format);
                    let host = match entry.kind(cluster_bits) {
                        ClusterKind::Compressed { .. } => {
                            walk.compressed = true;
                            continue;
                        }
                        ClusterKind::ZeroPlain if !walk.has_backing => {
                            updates.push((index, 0));
                            continue;
                        }
                        // Zeros are written, not left a hole: qemu writes them too, and its
                        // map then shows data rather than data + zero.
                        ClusterKind::ZeroPlain => {
                            let host = self.alloc_cluster()?;
                            if l2_refcount > 1 {
                                self.set_refcount(host >> cluster_bits, l2_refcount)?;
                            }
                            host
                        }
                        ClusterKind::ZeroAllocated { host } => {
                            if self.is_metadata(host) {
                                return Err(crate::Error::from(super::Qcow2Error::CorruptEntry {
                                    what: "preallocated zero cluster overlaps metadata",
                                    guest_offset: guest_base + index as u64 * cluster_size,
                                    entry: entry.entry,
                                })
                                .into());
                            }
                            host
                        }
                        ClusterKind::Normal { .. } | ClusterKind::Unallocated => continue,
                    };
                    self.write_host(&zeros, host)?;
                    let copied =
                        l2_refcount == 1 && (!active || self.refcount(host >> cluster_bits)? == 1);
                    let copied = if copied { COPIED } else { 0 };
                    updates.push((index, host | copied));
                }
                if !updates.is_empty() {
                    self.barrier()?;
                    // The whole table in one write (v2-bound images have 8-byte entries), as
                    // qemu writes its L2 slices; the cached copy is dropped.
                    let mut bytes = bytes;
                    for (index, entry) in updates {
                        bytes[index * 8..index * 8 + 8].copy_from_slice(&entry.to_be_bytes());
                    }
                    self.write_host(&bytes, table)?;
                    self.l2_cache
                        .get_mut()
                        .unwrap_or_else(|e| e.into_inner())
                        .retain(|(offset, _)| *offset != table);
                }
            }
            walk.visited += 1;
            status.report(walk.visited, walk.total);
        }
        Ok(())
    }
}

/// The state of a zero-cluster expansion across the L1 tables of an image.
struct ZeroExpansion {
    /// Whether the image has a backing file (plain zero clusters then need data clusters).
    has_backing: bool,
    /// Whether any compressed cluster was seen.
    compressed: bool,
    /// L1 entries visited so far, of `total` in the active table and every snapshot's.
    visited: u64,
    total: u64,
}

/// `printf("%#" PRIx64)`: `0` for zero, `0x…` otherwise.
fn c_hex(value: u64) -> String {
    if value == 0 {
        "0".to_owned()
    } else {
        format!("{value:#x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_as_qemu_reads_them() {
        let o =
            AmendOptions::parse("compat=0.10,lazy_refcounts=on,refcount_bits=0x8,size=1G").unwrap();
        assert_eq!(o.compat.as_deref(), Some("0.10"));
        assert_eq!(o.lazy_refcounts, Some(true));
        assert_eq!(o.refcount_bits, Some(8));
        assert_eq!(o.size, Some(1 << 30));
        let o = AmendOptions::parse("data_file=a,,b,lazy_refcounts").unwrap();
        assert_eq!(o.data_file.as_deref(), Some("a,b"));
        assert_eq!(o.lazy_refcounts, Some(true));
        let AmendError::Refused { message, hint } =
            AmendOptions::parse("cluster_size=4k").unwrap_err()
        else {
            panic!()
        };
        assert_eq!(message, "Invalid parameter 'cluster_size'");
        assert_eq!(
            hint,
            Some("This option is only supported for image creation")
        );
        let AmendError::Refused { message, hint } = AmendOptions::parse("foo=1").unwrap_err()
        else {
            panic!()
        };
        assert_eq!((message.as_str(), hint), ("Invalid parameter 'foo'", None));
        assert_eq!(
            AmendOptions::parse("lazy_refcounts=maybe")
                .unwrap_err()
                .to_string(),
            "Parameter 'lazy_refcounts' expects 'on' or 'off'"
        );
        assert_eq!(
            AmendOptions::parse("refcount_bits=x")
                .unwrap_err()
                .to_string(),
            "Parameter 'refcount_bits' expects a number"
        );
    }

    use crate::extent::GuestRead;
    use crate::io::MemBackend;
    use crate::offsets::GuestOffset;
    use crate::qcow2::create::{write_new_image, CreateOptions};

    /// A 4 MiB image on memory with data in several refcount blocks' worth of clusters (512-byte
    /// clusters, so 1-bit refcounts fit 4096 clusters per block) and zero clusters.
    fn image(cluster_size: u64) -> Qcow2Image<MemBackend> {
        let options = CreateOptions {
            cluster_size,
            ..Default::default()
        };
        let mem = MemBackend::default();
        write_new_image(&mem, 4 << 20, &options, None).unwrap();
        let cluster = HeaderCluster::read_from(&mem).unwrap();
        let mut image = Qcow2Image::open_rw(mem, cluster, None, WriteOptions::default()).unwrap();
        for (i, offset) in [0u64, 70_000, 1 << 20, 3 << 20].into_iter().enumerate() {
            image.write_at(&vec![i as u8 + 1; 300_000], offset).unwrap();
        }
        image.write_zeroes(1 << 20, 100_000).unwrap();
        image
    }

    fn contents(image: &Qcow2Image<MemBackend>) -> Vec<u8> {
        let mut bytes = vec![0u8; image.virtual_size() as usize];
        image.read_at(&mut bytes, GuestOffset(0)).unwrap();
        bytes
    }

    fn assert_clean(image: &Qcow2Image<MemBackend>, context: &str) {
        let report = check(image.backend(), Repair::None).unwrap();
        assert_eq!(report.exit_code(), 0, "{context}: {report:?}");
    }

    #[test]
    fn every_refcount_width_round_trips_clean_with_the_same_content() {
        for cluster_size in [512, 65536] {
            let mut image = image(cluster_size);
            let before = contents(&image);
            for order in [0, 1, 3, 6, 5, 2, 4] {
                image.change_refcount_order(order).unwrap();
                assert_eq!(image.header().refcount_order, order);
                let context = format!("{cluster_size}-byte clusters, order {order}");
                assert_clean(&image, &context);
                assert!(contents(&image) == before, "{context}: content changed");
                // Still writable with the new width.
                image.write_at(&[0xee; 1000], 2 << 20).unwrap();
                image.write_at(&vec![0; 1000], 2 << 20).unwrap();
                assert_clean(&image, &format!("{context}, written"));
            }
        }
    }

    #[test]
    fn downgrade_turns_zero_clusters_into_what_v2_can_express() {
        let mut image = image(65536);
        let before = contents(&image);
        image.downgrade().unwrap();
        assert_eq!(image.header().version, Version::V2);
        assert_clean(&image, "downgraded");
        assert!(contents(&image) == before);
        let bytes = image.backend().to_vec();
        let cluster = HeaderCluster::parse(&bytes[..65536]).unwrap();
        assert!(!cluster
            .extensions
            .iter()
            .any(|e| matches!(e, Extension::FeatureNameTable(_))));
        // No zero flag is left in any L2 entry (v2 has none).
        let reopened = Qcow2Image::open(MemBackend::new(bytes), cluster, None).unwrap();
        for offset in (0..4u64 << 20).step_by(65536) {
            if let Some(entry) = reopened.l2_entry(offset).unwrap() {
                assert_eq!(
                    entry.entry & super::super::tables::ZERO,
                    0,
                    "at {offset:#x}"
                );
            }
        }
    }

    #[test]
    fn narrowing_refuses_counts_that_do_not_fit() {
        let mut image = image(65536);
        let host = image.l2_entry(0).unwrap().unwrap().entry & super::super::tables::L2_OFFSET_MASK;
        image.set_refcount(host >> 16, 2).unwrap();
        let AmendError::Refused { message, .. } = image.change_refcount_order(0).unwrap_err()
        else {
            panic!("not a refusal")
        };
        assert_eq!(
            message,
            format!("Cannot decrease refcount entry width to 1 bits: Cluster at offset {host:#x} has a refcount of 2")
        );
        assert_eq!(image.header().refcount_order, 4, "nothing switched");
    }

    /// Memory that stops taking writes after a number of them: a process killed mid-way
    /// (everything written before stays, in order).
    struct Crashing {
        inner: MemBackend,
        writes_left: std::sync::atomic::AtomicU64,
    }

    impl Crashing {
        fn write(&self) -> std::io::Result<()> {
            use std::sync::atomic::Ordering::SeqCst;
            match self
                .writes_left
                .fetch_update(SeqCst, SeqCst, |n| n.checked_sub(1))
            {
                Ok(_) => Ok(()),
                Err(_) => Err(std::io::Error::other("crashed")),
            }
        }
    }

    impl Backend for Crashing {
        fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            self.inner.read_exact_at(buf, offset)
        }
        fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            self.write()?;
            self.inner.write_all_at(buf, offset)
        }
        fn len(&self) -> std::io::Result<u64> {
            self.inner.len()
        }
        fn set_len(&self, len: u64) -> std::io::Result<()> {
            self.write()?;
            self.inner.set_len(len)
        }
        fn sync_all(&self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_crash_at_any_write_leaves_at_most_leaks_and_the_same_content() {
        type Step = fn(&mut Qcow2Image<Crashing>) -> Result<(), AmendError>;
        let steps: [(&str, Step); 3] = [
            ("refcount_bits=1", |i| i.change_refcount_order(0)),
            ("refcount_bits=64", |i| i.change_refcount_order(6)),
            ("compat=0.10", |i| i.downgrade()),
        ];
        let original = image(512);
        let before = contents(&original);
        let bytes = original.backend().to_vec();
        for (name, step) in steps {
            let mut crash_after = 0;
            loop {
                let backend = Crashing {
                    inner: MemBackend::new(bytes.clone()),
                    writes_left: crash_after.into(),
                };
                let cluster = HeaderCluster::read_from(&backend).unwrap();
                let mut image =
                    Qcow2Image::open_rw(backend, cluster, None, WriteOptions::default()).unwrap();
                let done = step(&mut image).is_ok();
                let after = image.backend().inner.to_vec();
                let mem = MemBackend::new(after.clone());
                let report = check(&mem, Repair::None).unwrap();
                let context = format!("{name}, crash after {crash_after} writes");
                assert!(
                    report.corruptions == 0 && report.check_errors == 0,
                    "{context}: {report:?}"
                );
                let cluster = HeaderCluster::read_from(&mem).unwrap();
                let reopened = Qcow2Image::open(MemBackend::new(after), cluster, None).unwrap();
                let mut now = vec![0u8; before.len()];
                reopened.read_at(&mut now, GuestOffset(0)).unwrap();
                assert!(now == before, "{context}: content changed");
                if done {
                    assert!(crash_after > 3, "{name}: the step wrote something");
                    break;
                }
                crash_after += 1;
            }
        }
    }

    #[test]
    fn c_hex_prints_like_printf() {
        assert_eq!(c_hex(0), "0");
        assert_eq!(c_hex(0x50000), "0x50000");
    }
}
