//! A cloud-init NoCloud seed, built natively: a small FAT volume labelled `CIDATA` holding
//! `meta-data` and `user-data` (cloud-init finds NoCloud seeds by that label).

use std::io::Write;
use std::path::Path;

use super::{io, Result, VmError};

/// Size of the seed volume: 1 MiB (FAT12) holds any script a plan should carry.
pub const SEED_SIZE: u64 = 1 << 20;

/// Writes a NoCloud seed volume at `path` (replacing nothing: the file must not exist) with the
/// given `meta-data` and `user-data` contents.
pub fn write_seed(path: &Path, meta_data: &str, user_data: &[u8]) -> Result<()> {
    if (meta_data.len() + user_data.len()) as u64 > SEED_SIZE / 2 {
        return Err(VmError::Invalid(format!(
            "the seed's user-data is too large ({} bytes; at most {})",
            user_data.len(),
            SEED_SIZE / 2
        )));
    }
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(io(format!("creating {}", path.display())))?;
    file.set_len(SEED_SIZE)
        .map_err(io(format!("sizing {}", path.display())))?;
    let fat = |e: std::io::Error| io(format!("writing the seed volume {}", path.display()))(e);
    fatfs::format_volume(
        &mut file,
        fatfs::FormatVolumeOptions::new().volume_label(*b"CIDATA     "),
    )
    .map_err(fat)?;
    {
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).map_err(fat)?;
        {
            let root = fs.root_dir();
            for (name, bytes) in [
                ("meta-data", meta_data.as_bytes()),
                ("user-data", user_data),
            ] {
                let mut entry = root.create_file(name).map_err(fat)?;
                entry.truncate().map_err(fat)?;
                entry.write_all(bytes).map_err(fat)?;
                entry.flush().map_err(fat)?;
            }
        }
        fs.unmount().map_err(fat)?;
    }
    file.sync_all().map_err(fat)
}

/// The `meta-data` of a seed: the instance id and host name cloud-init expects.
pub fn meta_data(instance: &str) -> String {
    format!("instance-id: {instance}\nlocal-hostname: {instance}\n")
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    #[test]
    fn the_seed_reads_back_through_an_independent_fat_reader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.img");
        write_seed(&path, &meta_data("vm-1"), b"#!/bin/sh\necho hi\n").unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        let fs = fatfs::FileSystem::new(&mut file, fatfs::FsOptions::new()).unwrap();
        assert_eq!(fs.volume_label().trim_end(), "CIDATA");
        let mut text = String::new();
        fs.root_dir()
            .open_file("user-data")
            .unwrap()
            .read_to_string(&mut text)
            .unwrap();
        assert_eq!(text, "#!/bin/sh\necho hi\n");
        drop(fs);
        assert!(write_seed(&path, "", b"").is_err(), "never replaces a file");
    }
}
