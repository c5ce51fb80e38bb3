//! [`Home`]: where the registry lives. `--home DIR`, else `$COWCLONE_HOME`, else the XDG data
//! directory (`$XDG_DATA_HOME/cowclone`, by default `~/.local/share/cowclone`, via the `dirs`
//! crate). It holds one SQLite database and the default clones directory.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{RegistryError, Result};

/// The environment variable naming the home directory when `--home` is not given.
pub const HOME_ENV: &str = "COWCLONE_HOME";
/// The database file's name inside the home directory.
pub const DATABASE_NAME: &str = "registry.sqlite";
/// The default clones directory's name inside the home directory.
pub const CLONES_DIR_NAME: &str = "clones";

/// Mode of the home and clones directories: private to their owner.
pub const PRIVATE_DIR: u32 = 0o700;

/// A registry home directory (not necessarily existing yet; [`Home::ensure`] creates it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    root: PathBuf,
}

impl Home {
    /// The home at `root`, as given.
    pub fn at(root: impl Into<PathBuf>) -> Home {
        Home { root: root.into() }
    }

    /// `explicit` (from `--home`) if given, else `$COWCLONE_HOME` if set and non-empty, else the
    /// XDG data directory's `cowclone` subdirectory.
    pub fn resolve(explicit: Option<&Path>) -> Result<Home> {
        if let Some(dir) = explicit {
            return Ok(Home::at(dir));
        }
        if let Some(dir) = std::env::var_os(HOME_ENV).filter(|d| !d.is_empty()) {
            return Ok(Home::at(PathBuf::from(dir)));
        }
        dirs::data_dir()
            .map(|d| Home::at(d.join("cowclone")))
            .ok_or(RegistryError::NoHome)
    }

    /// The home directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The SQLite database file.
    pub fn database(&self) -> PathBuf {
        self.root.join(DATABASE_NAME)
    }

    /// Where facts worth remembering between runs are kept (e.g. the KVM verdict of
    /// `--accel auto`); created on first use.
    pub fn cache_dir(&self) -> PathBuf {
        self.root.join("cache")
    }

    /// The default directory clones are made in (each in its own subdirectory).
    pub fn clones_dir(&self) -> PathBuf {
        self.root.join(CLONES_DIR_NAME)
    }

    /// Creates the home and clones directories if missing, private to their owner (0700; a
    /// home made by an older cowclone is made private too), and makes the root absolute so that
    /// recorded paths do not depend on the working directory.
    pub fn ensure(&mut self) -> Result<()> {
        let clones = self.clones_dir();
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(PRIVATE_DIR)
            .create(&clones)
            .map_err(RegistryError::io(format!(
                "creating the home directory {}",
                clones.display()
            )))?;
        for dir in [self.root.clone(), clones] {
            let mode = std::fs::metadata(&dir)
                .map_err(RegistryError::io(format!(
                    "reading metadata of {}",
                    dir.display()
                )))?
                .permissions()
                .mode();
            if mode & 0o077 != 0 {
                std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(PRIVATE_DIR))
                    .map_err(RegistryError::io(format!(
                        "making {} private",
                        dir.display()
                    )))?;
            }
        }
        self.root = self.root.canonicalize().map_err(RegistryError::io(format!(
            "resolving the home directory {}",
            self.root.display()
        )))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_home_wins_and_layout_is_fixed() {
        let home = Home::resolve(Some(Path::new("/x/y"))).unwrap();
        assert_eq!(home.root(), Path::new("/x/y"));
        assert_eq!(home.database(), Path::new("/x/y/registry.sqlite"));
        assert_eq!(home.clones_dir(), Path::new("/x/y/clones"));
    }

    #[test]
    fn ensure_creates_and_absolutises() {
        let dir = tempfile::tempdir().unwrap();
        let mut home = Home::at(dir.path().join("a/../h"));
        home.ensure().unwrap();
        assert!(home.clones_dir().is_dir());
        for dir in [home.root().to_owned(), home.clones_dir()] {
            let mode = std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, PRIVATE_DIR, "{}", dir.display());
        }
        assert_eq!(home.root(), dir.path().canonicalize().unwrap().join("h"));
    }
}
