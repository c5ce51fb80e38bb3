//! External data files as qemu-img 10 opens them. Every qemu-img command that reads guest data
//! opens the data file an image's header names, without being asked (`info` alone does not
//! open it), and looks a relative name up in the working directory, as qemu's
//! `bdrv_open_child` takes the name as it is. cowclone's own commands refuse data files unless
//! `--allow-data-file` is given and look relative names up in the image's directory; the
//! personality asks for qemu's behaviour with those commands' options. The data file must still
//! be a regular, local file (no protocol or `json:` name), as every file cowclone opens.

use super::{error, filename::Target, takes, Failure, Plan};

/// Options that make cowclone's `command` open data files as qemu-img does (none if the
/// command opens no chain).
pub(super) fn qemu_defaults(command: &str) -> Vec<String> {
    ["--allow-data-file", "--data-file-from-cwd"]
        .into_iter()
        .filter(|flag| takes(command, flag))
        .map(str::to_owned)
        .collect()
}

/// Commands whose first image opened is the one the data file option names: the readers'
/// first chain, the image the writers write.
const OPENERS: [&str; 7] = [
    "check", "map", "compare", "convert", "measure", "commit", "rebase",
];

/// Commands that read several images, each of which may be given its data file.
const SEVERAL: [&str; 2] = ["compare", "convert"];

/// Adds `--open-data-file` when `image`'s options name its data file (`data-file.filename`);
/// `first`: whether `image` is the command's first image (else its second).
pub(super) fn named(plan: &mut Plan, image: &Target, first: bool) -> Result<(), Failure> {
    named_at(plan, image, usize::from(!first))
}

/// Adds `--open-data-file` (the first image, `index` 0) or `--image-data-file N=PATH` (a later
/// one) when `image`'s options name its data file (`data-file.filename`), as qemu-img opens
/// the data file each image's options name.
pub(super) fn named_at(plan: &mut Plan, image: &Target, index: usize) -> Result<(), Failure> {
    let Some(data_file) = &image.data_file else {
        return Ok(());
    };
    // qemu-img info does not open the data file, so the option changes nothing there.
    if plan.command == "info" {
        return Ok(());
    }
    let openers: &[&str] = if index == 0 { &OPENERS } else { &SEVERAL };
    if !openers.contains(&plan.command) {
        return Err(error(format!(
            "{}: a 'data-file' option for this image is not supported by cowclone",
            plan.command
        )));
    }
    if index == 0 {
        plan.arg("--open-data-file").arg(data_file);
    } else {
        plan.arg("--image-data-file")
            .arg(format!("{}={data_file}", index + 1));
    }
    Ok(())
}
