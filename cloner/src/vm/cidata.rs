//! The cloud-init NoCloud seed: a small FAT volume labelled `CIDATA` holding `user-data` and
//! `meta-data`, built natively with the `fatfs` crate. cloud-init finds the volume by its label
//! (it accepts `cidata` in either case) and runs a `user-data` that starts with `#!` once, at the
//! end of boot.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::path::Path;

use fatfs::{FileSystem, FormatVolumeOptions, FsOptions};

use super::VmError;

/// The volume label (FAT labels are 11 bytes, space-padded; upper case as mkfs.fat writes it).
pub const LABEL: [u8; 11] = *b"CIDATA     ";
/// Smallest seed image.
const MIN_SIZE: u64 = 1 << 20;

/// Writes a seed with `files` (name → content) to `path`, which must not exist. The image is
/// built under a temporary name beside it and renamed into place when complete.
pub fn write_seed(path: &Path, files: &[(&str, &[u8])]) -> Result<(), VmError> {
    let payload: u64 = files.iter().map(|(_, data)| data.len() as u64).sum();
    // Twice the payload plus room for the FATs and directories, in whole MiB.
    let size = (payload * 2 + (512 << 10))
        .max(MIN_SIZE)
        .next_multiple_of(1 << 20);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.partial"));
    let _ = fs::remove_file(&temp);
    let build = || -> std::io::Result<()> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)?;
        file.set_len(size)?;
        fatfs::format_volume(&mut file, FormatVolumeOptions::new().volume_label(LABEL))?;
        let fs = FileSystem::new(&mut file, FsOptions::new())?;
        for (name, data) in files {
            let mut f = fs.root_dir().create_file(name)?;
            f.truncate()?;
            f.write_all(data)?;
            f.flush()?;
        }
        fs.unmount()?;
        file.sync_all()
    };
    if let Err(source) = build() {
        let _ = fs::remove_file(&temp);
        return Err(VmError::Io {
            step: "building the cidata seed",
            path: path.to_owned(),
            source,
        });
    }
    if path.exists() {
        let _ = fs::remove_file(&temp);
        return Err(VmError::Io {
            step: "creating the cidata seed",
            path: path.to_owned(),
            source: std::io::ErrorKind::AlreadyExists.into(),
        });
    }
    fs::rename(&temp, path).map_err(VmError::io("publishing the cidata seed", path))
}

/// The files in a seed's root directory (for checks and tests).
pub fn read_seed(path: &Path) -> Result<BTreeMap<String, Vec<u8>>, VmError> {
    let read = || -> std::io::Result<BTreeMap<String, Vec<u8>>> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let fs = FileSystem::new(&mut file, FsOptions::new())?;
        let mut files = BTreeMap::new();
        for entry in fs.root_dir().iter() {
            let entry = entry?;
            if entry.is_file() {
                let mut data = Vec::new();
                entry.to_file().read_to_end(&mut data)?;
                files.insert(entry.file_name(), data);
            }
        }
        Ok(files)
    };
    read().map_err(VmError::io("reading the cidata seed", path))
}

/// The seed's volume label, trimmed.
pub fn read_label(path: &Path) -> Result<String, VmError> {
    let read = || -> std::io::Result<String> {
        let mut file = OpenOptions::new().read(true).write(true).open(path)?;
        let fs = FileSystem::new(&mut file, FsOptions::new())?;
        Ok(fs.volume_label().trim_end().to_owned())
    };
    read().map_err(VmError::io("reading the cidata seed", path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_holds_its_files_under_the_cidata_label_and_is_never_overwritten() {
        let dir = tempfile::tempdir().unwrap();
        let seed = dir.path().join("cidata.img");
        let user_data = b"#!/bin/sh\necho hi\n".repeat(1000);
        write_seed(
            &seed,
            &[
                ("user-data", &user_data),
                ("meta-data", b"instance-id: x\n"),
            ],
        )
        .unwrap();
        let files = read_seed(&seed).unwrap();
        assert_eq!(files.len(), 2);
        assert_eq!(files["user-data"], user_data);
        assert_eq!(files["meta-data"], b"instance-id: x\n");
        assert_eq!(read_label(&seed).unwrap(), "CIDATA");
        let before = fs::read(&seed).unwrap();
        assert!(write_seed(&seed, &[("user-data", b"other")]).is_err());
        assert_eq!(fs::read(&seed).unwrap(), before);
        assert_eq!(
            fs::read_dir(dir.path()).unwrap().count(),
            1,
            "no partial file left"
        );
    }
}
