//! What cowclone made, and only that, is what `gc` and `rm` delete.
//!
//! Every clone directory is made under a temporary name (`.NAME.RANDOM.cowclone-tmp`, mode
//! 0700), given a marker file ([`MARKER`], naming the home and the clone) and only then renamed
//! into place — without replacing anything. A directory at `PLACE/NAME` therefore either holds
//! the marker of the home that made it, or was not made by that home's cowclone, whatever it
//! holds; a process killed halfway leaves a temporary directory whose name is cowclone's own.
//!
//! Deleting goes by name: inside a directory cowclone made, only the files cowclone writes there
//! ([`OWN_FILES`]: the disk, the marker, the hypervisor drivers' runtime files, temporary files)
//! are deleted, and the directory only if that leaves it empty. Anything else is kept and
//! reported.

use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use imagefmt::new_file::TEMP_SUFFIX;
use serde::{Deserialize, Serialize};

use crate::error::{RegistryError, Result};

/// The marker file in every directory cowclone makes.
pub const MARKER: &str = ".cowclone-made";
/// Largest marker read back (it is a line of JSON).
const MAX_MARKER: u64 = 4096;
/// Mode of the directories cowclone makes: private to their owner.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files cowclone makes (disks, markers): private to their owner.
pub const FILE_MODE: u32 = 0o600;

/// The files cowclone writes in a clone's directory: the disk, the marker, and what the
/// hypervisor drivers keep there (`vm::spec`, `vm::provision`, `vm::accel`, the libvirt domain
/// XML, `vm::cloud_hypervisor`, `vm::firecracker`). Temporary files (`*.cowclone-tmp`) are cowclone's too.
pub const OWN_FILES: &[&str] = &[
    "disk.qcow2",
    "disk.vdi",
    // A reflink clone of a raw base.
    "disk.raw",
    MARKER,
    "qemu.pid",
    "qmp.sock",
    "serial.log",
    "commands.log",
    "result.log",
    "seed.img",
    "domain.xml",
    "kvm-probe.img",
    "kvm-probe.serial",
    "cloud-hypervisor.sock",
    "cloud-hypervisor.pid",
    "cloud-hypervisor.out",
    "cloud-hypervisor.log",
    "firecracker.json",
    "firecracker.sock",
    "firecracker.pid",
    "firecracker.log",
];

/// What the marker says.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Marker {
    /// The home (absolute) whose registry made the directory.
    home: PathBuf,
    /// The clone it was made for.
    name: String,
}

/// True if `name` is a file name cowclone writes in its directories.
pub fn is_own_file(name: &str) -> bool {
    OWN_FILES.contains(&name) || is_temp(name)
}

/// True for the names of cowclone's temporary files and directories.
pub fn is_temp(name: &str) -> bool {
    name.ends_with(TEMP_SUFFIX)
}

/// Makes the directory `place/name` for a clone of the registry in `home` (see the module
/// docs): complete with its marker, or absent. Refused if anything is at that name.
pub(crate) fn make_dir(place: &Path, name: &str, home: &Path) -> Result<PathBuf> {
    let target = place.join(name);
    let temp = place.join(format!(
        ".{name}.{}{TEMP_SUFFIX}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    ));
    std::fs::DirBuilder::new()
        .mode(DIR_MODE)
        .create(&temp)
        .map_err(RegistryError::io(format!("creating {}", temp.display())))?;
    let made = (|| {
        // The mode asked for is reduced by the umask; the directory must be private anyway.
        set_mode(&temp, DIR_MODE)?;
        let marker = serde_json::to_string(&Marker {
            home: home.to_owned(),
            name: name.to_owned(),
        })
        .unwrap_or_default();
        write_private(&temp.join(MARKER), marker.as_bytes())?;
        rustix::fs::renameat_with(
            rustix::fs::CWD,
            &temp,
            rustix::fs::CWD,
            &target,
            rustix::fs::RenameFlags::NOREPLACE,
        )
        .map_err(|e| match e {
            rustix::io::Errno::EXIST | rustix::io::Errno::NOTEMPTY => RegistryError::PathExists {
                path: target.clone(),
            },
            e => RegistryError::io(format!("renaming {} into place", temp.display()))(e.into()),
        })
    })();
    if let Err(e) = made {
        let _ = std::fs::remove_dir_all(&temp);
        return Err(e);
    }
    Ok(target)
}

/// Creates `path` with mode 0600 (exclusive) and writes `bytes` to it.
fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(RegistryError::io(format!("creating {}", path.display())))?;
    file.write_all(bytes)
        .map_err(RegistryError::io(format!("writing {}", path.display())))
}

/// Sets `path`'s permission bits.
pub(crate) fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(
        RegistryError::io(format!("changing the mode of {}", path.display())),
    )
}

/// True if `dir` holds the marker of a directory made by the registry in `home`.
pub fn made_by(dir: &Path, home: &Path) -> bool {
    use std::io::Read;
    let Ok(file) = std::fs::File::open(dir.join(MARKER)) else {
        return false;
    };
    let mut text = String::new();
    if file.take(MAX_MARKER).read_to_string(&mut text).is_err() {
        return false;
    }
    serde_json::from_str::<Marker>(&text).is_ok_and(|m| m.home == home)
}

/// What deleting a directory's cowclone files left behind.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Leftovers {
    /// Entries that are not cowclone's (kept), by name.
    pub foreign: Vec<String>,
}

/// The entries of `dir` that cowclone did not write, by name (a missing directory has none).
pub fn foreign_entries(dir: &Path) -> Result<Vec<String>> {
    let mut foreign = Vec::new();
    for (name, is_dir) in entries(dir)? {
        if is_dir || !is_own_file(&name) {
            foreign.push(name);
        }
    }
    Ok(foreign)
}

/// Deletes cowclone's files in `dir`, then `dir` itself if nothing else is in it. Anything
/// else is kept and returned. A missing directory is not an error.
pub(crate) fn remove_dir(dir: &Path) -> Result<Leftovers> {
    let mut leftovers = Leftovers::default();
    for (name, is_dir) in entries(dir)? {
        if is_dir || !is_own_file(&name) {
            leftovers.foreign.push(name);
            continue;
        }
        remove_file(&dir.join(&name))?;
    }
    if leftovers.foreign.is_empty() {
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(RegistryError::io(format!("removing {}", dir.display()))(e))
            }
            _ => {}
        }
    }
    Ok(leftovers)
}

/// Deletes one file; a missing file is not an error.
pub(crate) fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(RegistryError::io(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

/// `(name, is_dir)` of each entry of `dir`, sorted (none for a missing directory). Symlinks are
/// not directories here: they are never followed.
pub(crate) fn entries(dir: &Path) -> Result<Vec<(String, bool)>> {
    let listing = match std::fs::read_dir(dir) {
        Ok(listing) => listing,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(RegistryError::io(format!("listing {}", dir.display()))(e)),
    };
    let mut found = Vec::new();
    for entry in listing {
        let entry = entry.map_err(RegistryError::io(format!("listing {}", dir.display())))?;
        let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
        found.push((entry.file_name().to_string_lossy().into_owned(), is_dir));
    }
    found.sort();
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn directories_appear_complete_with_their_marker_and_private() {
        let place = tempfile::tempdir().unwrap();
        let home = Path::new("/some/home");
        let dir = make_dir(place.path(), "vm", home).unwrap();
        assert!(made_by(&dir, home));
        assert!(!made_by(&dir, Path::new("/other/home")));
        let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, DIR_MODE);
        let marker = std::fs::metadata(dir.join(MARKER)).unwrap();
        assert_eq!(marker.permissions().mode() & 0o777, FILE_MODE);
        // Nothing else is left in the place, and an existing name is refused, even an empty
        // directory (which a plain rename would replace).
        assert_eq!(entries(place.path()).unwrap(), [("vm".to_owned(), true)]);
        std::fs::create_dir(place.path().join("taken")).unwrap();
        let e = make_dir(place.path(), "taken", home).unwrap_err();
        assert!(matches!(e, RegistryError::PathExists { .. }), "{e}");
        assert_eq!(
            entries(place.path()).unwrap().len(),
            2,
            "temp dir cleaned up"
        );
    }

    #[test]
    fn removal_deletes_only_cowclone_files() {
        let place = tempfile::tempdir().unwrap();
        let dir = make_dir(place.path(), "vm", Path::new("/h")).unwrap();
        std::fs::write(dir.join("disk.qcow2"), b"d").unwrap();
        std::fs::write(dir.join("serial.log"), b"s").unwrap();
        std::fs::write(dir.join("notes.txt"), b"mine").unwrap();
        let left = remove_dir(&dir).unwrap();
        assert_eq!(left.foreign, ["notes.txt"]);
        assert_eq!(entries(&dir).unwrap(), [("notes.txt".to_owned(), false)]);
        std::fs::remove_file(dir.join("notes.txt")).unwrap();
        remove_dir(&dir).unwrap();
        assert!(!dir.exists());
    }

    #[test]
    fn the_runtime_file_names_are_the_drivers_own() {
        let run = Path::new("/r");
        let name = |p: PathBuf| p.file_name().unwrap().to_string_lossy().into_owned();
        for path in [
            crate::vm::spec::pidfile(run),
            crate::vm::spec::qmp_socket(run),
            crate::vm::spec::serial_log(run),
            crate::vm::spec::command_log(run),
            crate::vm::provision::result_log(run),
        ] {
            assert!(is_own_file(&name(path.clone())), "{}", path.display());
        }
    }
}
