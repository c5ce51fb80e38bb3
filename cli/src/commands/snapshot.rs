//! `cowclone snapshot`: qemu-img snapshot's syntax, messages and exit codes. The table codec and
//! the operations are imagefmt's ([`imagefmt::qcow2::snapshot`],
//! [`imagefmt::qcow2::snapshot_ops`]).

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use imagefmt::image::ImageHeader;
use imagefmt::open::{open_image, OpenHow};
use imagefmt::qcow2::snapshot::SnapshotError;
use imagefmt::qcow2::Qcow2Error;
use imagefmt::ImageFormat;

use crate::output;

/// `cowclone snapshot [-f FMT] [-q] [-U] [-l | -c NAME | -a NAME | -d NAME] FILE`
#[derive(Debug, clap::Args)]
pub struct SnapshotArgs {
    /// Format of FILE (only qcow2 has internal snapshots); default: recognised by content.
    #[arg(short = 'f', long = "format", value_name = "FMT")]
    pub format: Option<String>,
    /// Quiet operation (as qemu-img, the list is still printed).
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// With -l: read the image even if another process writes it (qemu-img -U).
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// List the snapshots (the default).
    #[arg(short = 'l', long = "list")]
    pub list: bool,
    /// Create snapshot SNAPSHOT of the current state (ids are numbered as qemu numbers them).
    #[arg(short = 'c', long = "create", value_name = "SNAPSHOT")]
    pub create: Option<String>,
    /// Make snapshot SNAPSHOT (matched by id, else by name) the current state.
    #[arg(short = 'a', long = "apply", value_name = "SNAPSHOT")]
    pub apply: Option<String>,
    /// Delete the snapshot named SNAPSHOT (matched by name, as qemu-img matches it).
    #[arg(short = 'd', long = "delete", value_name = "SNAPSHOT")]
    pub delete: Option<String>,
    /// The image.
    pub file: PathBuf,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// One snapshot operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotOp {
    /// `-l`.
    List,
    /// `-c NAME`.
    Create(String),
    /// `-a NAME`.
    Apply(String),
    /// `-d NAME`.
    Delete(String),
}

impl SnapshotArgs {
    /// The one operation asked for (qemu-img refuses more than one).
    pub fn op(&self) -> Result<SnapshotOp> {
        let mut ops = Vec::new();
        if self.list {
            ops.push(SnapshotOp::List);
        }
        ops.extend(self.create.clone().map(SnapshotOp::Create));
        ops.extend(self.apply.clone().map(SnapshotOp::Apply));
        ops.extend(self.delete.clone().map(SnapshotOp::Delete));
        match ops.len() {
            0 => Ok(SnapshotOp::List),
            1 => Ok(ops.remove(0)),
            _ => bail!("Cannot mix '-l', '-a', '-c', '-d'"),
        }
    }
}

/// Runs `snapshot`.
pub fn snapshot(args: SnapshotArgs, out: &mut impl Write) -> Result<()> {
    let op = args.op()?;
    let format: Option<ImageFormat> = args.format.as_deref().map(str::parse).transpose()?;
    let could_not_open = || format!("Could not open '{}'", args.file.display());
    if op == SnapshotOp::List {
        let file = open_image(&args.file, OpenHow::reading(args.force_share))
            .with_context(could_not_open)?;
        let header =
            ImageHeader::read(&file, format, &args.file, true).with_context(could_not_open)?;
        let snapshots = imagefmt::ops::info::snapshot_infos(&file, &header)
            .with_context(could_not_open)?
            .unwrap_or_default();
        if !snapshots.is_empty() {
            output::write_snapshot_list(out, &snapshots)?;
        }
        return Ok(());
    }
    if args.force_share {
        bail!(
            "{}: force-share=on can only be used with read-only images",
            could_not_open()
        );
    }
    args.guard
        .check("snapshot", std::slice::from_ref(&args.file))?;
    let file = open_image(&args.file, OpenHow::write()).with_context(could_not_open)?;
    let header = ImageHeader::read(&file, format, &args.file, true).with_context(could_not_open)?;
    if header.format() != ImageFormat::Qcow2 {
        match &op {
            SnapshotOp::Create(name) => {
                bail!("Could not create snapshot '{name}': Operation not supported")
            }
            SnapshotOp::Apply(name) => {
                bail!("Could not apply snapshot '{name}': Block driver does not support snapshots")
            }
            SnapshotOp::Delete(name) => {
                bail!("Could not delete snapshot '{name}': snapshot not found")
            }
            SnapshotOp::List => unreachable!("listed above"),
        }
    }
    let mut image =
        imagefmt::ops::snapshot::open_file(file, &args.file).with_context(could_not_open)?;
    match op {
        SnapshotOp::Create(name) => {
            image
                .create_snapshot(&name, imagefmt::ops::snapshot::now())
                .with_context(|| format!("Could not create snapshot '{name}'"))?;
        }
        SnapshotOp::Apply(name) => match image.apply_snapshot(&name) {
            Err(e) if not_found(&e) => bail!(
                "Could not apply snapshot '{name}': Failed to load snapshot: No such file or directory"
            ),
            result => {
                result.with_context(|| format!("Could not apply snapshot '{name}'"))?;
            }
        },
        SnapshotOp::Delete(name) => match image.delete_snapshot(&name) {
            Err(e) if not_found(&e) => {
                bail!("Could not delete snapshot '{name}': snapshot not found")
            }
            result => {
                result.with_context(|| format!("Could not delete snapshot '{name}'"))?;
            }
        },
        SnapshotOp::List => unreachable!("listed above"),
    }
    image
        .flush()
        .with_context(|| format!("{}", args.file.display()))?;
    Ok(())
}

fn not_found(e: &imagefmt::Error) -> bool {
    matches!(
        e,
        imagefmt::Error::Qcow2(Qcow2Error::Snapshot(SnapshotError::NotFound { .. }))
    )
}
