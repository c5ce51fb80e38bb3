//! qemu-img convert's options that need more than a rename: `-l` (the snapshot to read the
//! source at; measure's `-l` too), `-C` (copy offloading), the refusals qemu-img makes right
//! after reading its options, and `-B` naming a file that is not there.

use std::path::Path;

use super::getopt::Parsed;
use super::{error, options, Failure};

/// qemu's prefix of the keyed form of `-l` (`snapshot.id=ID,snapshot.name=NAME`).
const SNAPSHOT_OPT_BASE: &str = "snapshot.";

/// qemu-img's `-l` as cowclone's `--snapshot` value: the keyed form becomes `id=…,name=…`;
/// anything else is an id or a name, which qemu-img refuses with several sources.
pub(super) fn snapshot_flag(value: &str, sources: usize) -> Result<String, Failure> {
    if !value.starts_with(SNAPSHOT_OPT_BASE) {
        if sources > 1 {
            return Err(error("No support for concatenating multiple snapshot"));
        }
        return Ok(value.to_owned());
    }
    let failed = |detail: String| {
        error(format!(
            "{detail}\nqemu-img: Failed in parsing snapshot param '{value}'"
        ))
    };
    let items = options::split(value).map_err(|_| failed("Invalid parameter ''".to_owned()))?;
    let mut parts = Vec::new();
    for (key, item) in items {
        let field = match key.as_str() {
            "snapshot.id" => "id",
            "snapshot.name" => "name",
            other => return Err(failed(format!("Invalid parameter '{other}'"))),
        };
        let Some(item) = item else {
            return Err(failed(format!("Parameter '{key}' expects a value")));
        };
        if item.contains(',') {
            return Err(error(
                "option values that contain a comma are not supported by cowclone",
            ));
        }
        parts.push(format!("{field}={item}"));
    }
    Ok(parts.join(","))
}

/// The refusals qemu-img makes right after reading convert's options, in its order:
/// `--skip-broken-bitmaps` without `--bitmaps`, `-C` with what it cannot go with, and
/// `--target-is-zero` without `-n`.
pub(super) fn option_refusals(parsed: &Parsed) -> Result<(), Failure> {
    if parsed.has("skip-broken-bitmaps") && !parsed.has("bitmaps") {
        return Err(error("Use of --skip-broken-bitmaps requires --bitmaps"));
    }
    copy_offloading(parsed)?;
    if parsed.has("n") && parsed.has("o") {
        return Err(error("-o has no effect when skipping image creation"));
    }
    if parsed.has("target-is-zero") && !parsed.has("n") {
        return Err(error("--target-is-zero requires use of -n flag"));
    }
    if parsed.has("target-is-zero") && parsed.has("B") {
        // qemu-img 10 refuses this, copies nothing, and exits 0 (its error path keeps the
        // success code): so does the personality; `cowclone convert` exits 1.
        return Err(Failure::Error(
            "Cannot use --target-is-zero when the destination image has a backing file".into(),
            0,
        ));
    }
    Ok(())
}

/// qemu-img's refusals of `-C` (copy offloading) with options it cannot go with. cowclone
/// picks its copy method itself, so an accepted `-C` changes nothing.
fn copy_offloading(parsed: &Parsed) -> Result<(), Failure> {
    if !parsed.has("C") {
        return Ok(());
    }
    if parsed.has("c") {
        return Err(error("Cannot enable copy offloading when -c is used"));
    }
    if parsed.has("S") {
        return Err(error("Cannot enable copy offloading when -S is used"));
    }
    if parsed.has("salvage") {
        return Err(error("Cannot use copy offloading in salvaging mode"));
    }
    Ok(())
}

/// qemu-img creates the output and then fails to open it when its backing file (`-B`, resolved
/// against the output's directory) does not exist: its message, before anything is created.
pub(super) fn missing_backing(dest: &str, backing: &str) -> Result<(), Failure> {
    let Ok(path) = imagefmt::backing::resolve(Path::new(dest), backing) else {
        return Ok(());
    };
    if path.exists() {
        return Ok(());
    }
    Err(error(format!(
        "Could not open '{dest}': Could not open backing file: Could not open '{}': No such file or directory",
        path.display()
    )))
}
