//! `qemu-img check` of an image of any format: which check applies (qcow2's refcount check,
//! VDI's block map check, none for raw), the files qemu-img opens around it (the backing chain
//! and the external data file, held open and locked while checking), the repair followed by a
//! second, read-only pass whose result is reported, and qemu-img's human report.
//!
//! ```text
//! check_image(path) ── open + lock (write if repairing) ── header
//!   ├─ qcow2: open backing chain, data file (policy) ── qcow2::check::check(repair)
//!   │          └─ repaired anything? check again, report that pass with the fixed counts
//!   ├─ VDI:   differencing? open the parent chain (UUIDs verified) ── vdi::check::check
//!   └─ raw:   no check (qemu-img exits 63)
//! ```

use std::fs::File;
use std::io::Write;
use std::path::Path;

use crate::chain::{open_chain_with, ChainOptions};
use crate::detect::ImageFormat;
use crate::image::ImageHeader;
use crate::open::{open_image, OpenHow};
use crate::qcow2::check::{CheckReport, Repair};
use crate::vdi::ParentLink;
use crate::{Error, Result};

/// What `check_image` found.
#[derive(Debug)]
pub enum CheckOutcome {
    /// The image was checked. `report` is what qemu-img reports: after a repair, the second
    /// (read-only) pass carrying the first pass's fixed counts.
    Checked {
        /// The result to report (its `filename` is the path as given).
        report: CheckReport,
        /// The repairing pass, when it repaired anything (its messages come first).
        repair_pass: Option<Box<CheckReport>>,
        /// VDI parents modified after the differencing image was made on them (a warning:
        /// VirtualBox does not refuse them either).
        modified_parents: Vec<ParentLink>,
    },
    /// The format has no check (raw): qemu-img says so and exits 63.
    NotSupported,
    /// The format has a check but no repair (VDI with `-r`): exit 63 too.
    RepairNotSupported,
}

/// Checks the image at `path` as `qemu-img check [-r]` does. `options` is the policy for the
/// backing chain, VDI parents and the data file, all opened before checking as qemu-img opens
/// them; with a repair the image is opened and locked for writing.
pub fn check_image(
    path: &Path,
    format: Option<ImageFormat>,
    repair: Repair,
    options: &ChainOptions<'_>,
) -> Result<CheckOutcome> {
    // Locked before its header is read: for writing when repairing, else for shared reading.
    let how = match repair {
        Repair::None => options.open_how(),
        _ => OpenHow::write().with_block_devices(options.block_devices),
    };
    let file = open_image(path, how).map_err(|e| e.in_file("could not open", path))?;
    let header = ImageHeader::read(&file, format, path, true)?;
    let cluster = match &header {
        ImageHeader::Qcow2(cluster) => cluster,
        ImageHeader::Vdi(_) if repair != Repair::None => {
            return Ok(CheckOutcome::RepairNotSupported)
        }
        ImageHeader::Vdi(vdi) => return check_vdi(path, &file, vdi, options),
        ImageHeader::Raw { .. } => return Ok(CheckOutcome::NotSupported),
    };
    // The handles (and their shared-read locks) are held until the check is done.
    let _backing = match cluster.backing_file.as_deref() {
        Some(name) => {
            let backing = options.policy.resolve(path, name)?;
            let backing_format = cluster
                .backing_format()
                .map(str::parse::<ImageFormat>)
                .transpose()?;
            Some(
                open_chain_with(
                    &backing,
                    backing_format,
                    &ChainOptions {
                        data_file: None,
                        ..*options
                    },
                )
                .map_err(|e| e.in_file("could not open backing file", &backing))?,
            )
        }
        None => None,
    };
    // Opened as a read of the chain opens it (qemu's check fails when it cannot open it).
    let _data_file = crate::chain::open_data_file(
        path,
        cluster,
        options,
        options.data_file,
        options.open_how(),
    )?;
    if repair != Repair::None {
        crate::qcow2::header::clear_unknown_autoclear(&file, &cluster.header)?;
    }
    let failed = |e: Error| e.in_file("Check failed:", path);
    let first = crate::qcow2::check::check(&file, repair).map_err(failed)?;
    let (mut report, repair_pass) = if first.repaired_anything() {
        let mut second = crate::qcow2::check::check(&file, Repair::None).map_err(failed)?;
        second.leaks_fixed = first.leaks_fixed;
        second.corruptions_fixed = first.corruptions_fixed;
        (second, Some(Box::new(first)))
    } else {
        (first, None)
    };
    report.filename = path.to_string_lossy().into_owned();
    Ok(CheckOutcome::Checked {
        report,
        repair_pass,
        modified_parents: Vec::new(),
    })
}

/// The check of a VDI image: qemu's block map checks, and for a differencing image its linkage
/// (the parent chain must be found and match by UUID, else an error, as when qemu-img cannot
/// open a backing file).
fn check_vdi(
    path: &Path,
    file: &File,
    header: &crate::vdi::VdiHeader,
    options: &ChainOptions<'_>,
) -> Result<CheckOutcome> {
    let mut modified_parents = Vec::new();
    if header.is_differencing() {
        // The same open file description (and so the same locks) as the one being checked.
        let top = file
            .try_clone()
            .map_err(Error::io(format!("opening {}", path.display())))?;
        let image = crate::chain::vdi_from_file(top, header.clone(), path, options)
            .map_err(|e| e.in_file("could not open the parent chain of", path))?;
        modified_parents = image
            .parent_links()
            .iter()
            .filter(|link| !link.modification_matches())
            .cloned()
            .collect();
    }
    let mut report =
        crate::vdi::check::check(file).map_err(|e| e.in_file("Check failed:", path))?;
    report.filename = path.to_string_lossy().into_owned();
    Ok(CheckOutcome::Checked {
        report,
        repair_pass: None,
        modified_parents,
    })
}

/// Writes `report` as qemu-img's `dump_human_image_check` does.
pub fn write_human(out: &mut dyn Write, c: &CheckReport) -> std::io::Result<()> {
    if c.corruptions == 0 && c.leaks == 0 && c.check_errors == 0 {
        writeln!(out, "No errors were found on the image.")?;
    } else {
        if c.corruptions > 0 {
            writeln!(
                out,
                "\n{} errors were found on the image.\nData may be corrupted, or further writes \
                 to the image may corrupt it.",
                c.corruptions
            )?;
        }
        if c.leaks > 0 {
            writeln!(
                out,
                "\n{} leaked clusters were found on the image.\nThis means waste of disk space, \
                 but no harm to data.",
                c.leaks
            )?;
        }
        if c.check_errors > 0 {
            writeln!(
                out,
                "\n{} internal errors have occurred during the check.",
                c.check_errors
            )?;
        }
    }
    if c.total_clusters != 0 && c.allocated_clusters != 0 {
        let allocated = c.allocated_clusters as f64;
        writeln!(
            out,
            "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
            c.allocated_clusters,
            c.total_clusters,
            allocated * 100.0 / c.total_clusters as f64,
            c.fragmented_clusters as f64 * 100.0 / allocated,
            c.compressed_clusters as f64 * 100.0 / allocated,
        )?;
    }
    if c.image_end_offset != 0 {
        writeln!(out, "Image end offset: {}", c.image_end_offset)?;
    }
    Ok(())
}

/// What qemu-img prints before the second pass of a repair.
pub fn write_human_repaired(out: &mut dyn Write, repair_pass: &CheckReport) -> std::io::Result<()> {
    writeln!(
        out,
        "The following inconsistencies were found and repaired:\n\n    {} leaked \
         clusters\n    {} corruptions\n\nDouble checking the fixed image now...",
        repair_pass.leaks_fixed, repair_pass.corruptions_fixed
    )
}
