//! Backing file references: untrusted names turned into paths only under a caller's policy.
//!
//! A name in an image header is attacker-controlled: it can be a `json:` or `nbd:` protocol
//! string, an absolute path to any host file, or a chain that loops. This module refuses
//! protocol names, resolves relative names as qemu does (against the directory part of the
//! image's own name, without normalising: `sub/ov.qcow2` + `../b.qcow2` → `sub/../b.qcow2`,
//! FORMATS.md §1.4), and decides whether a resolved path may be followed.

use std::collections::HashSet;
use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::{Path, PathBuf};

use thiserror::Error;

/// Longest backing chain followed before giving up (qemu has no fixed limit; 64 is far beyond
/// any real chain and keeps a hostile chain from exhausting descriptors).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// A backing reference refused by policy.
#[non_exhaustive]
#[derive(Debug, Error, PartialEq, Eq)]
pub enum BackingError {
    /// The name has a protocol prefix (`json:`, `nbd:`, any `prefix:` before the first `/`).
    #[error("backing file name {name:?} uses a protocol prefix; only local files are allowed")]
    ProtocolRefused {
        /// The name.
        name: String,
    },
    /// The name is empty.
    #[error("backing file name is empty")]
    EmptyName,
    /// The policy does not follow backing files at all.
    #[error("backing file {name:?} not followed (backing files are disabled)")]
    NotFollowed {
        /// The name.
        name: String,
    },
    /// The resolved path lies outside the directory the caller confined chains to.
    #[error("backing file {path} is outside the allowed directory {dir}")]
    OutsideConfinement {
        /// The resolved path.
        path: PathBuf,
        /// The allowed directory.
        dir: PathBuf,
    },
    /// The chain is longer than [`MAX_CHAIN_DEPTH`].
    #[error("backing chain is deeper than {max} images")]
    TooDeep {
        /// The limit.
        max: usize,
    },
    /// An image appears twice in its own chain.
    #[error("backing chain loops back to {path}")]
    Loop {
        /// The image seen twice.
        path: PathBuf,
    },
}

/// True if `name` starts with a protocol prefix: a `:` before any `/` (qemu's
/// `path_has_protocol`).
pub fn has_protocol_prefix(name: &str) -> bool {
    name.find([':', '/'])
        .is_some_and(|i| name.as_bytes()[i] == b':')
}

/// Resolves a backing name stored in the image at `image_path` (as the caller named it) to the
/// path qemu would open. Protocol names and empty names are refused.
pub fn resolve(image_path: &Path, name: &str) -> Result<PathBuf, BackingError> {
    check_local_name(name)?;
    if name.starts_with('/') {
        return Ok(PathBuf::from(name));
    }
    let image = image_path.as_os_str().as_bytes();
    let dir_len = image.iter().rposition(|&b| b == b'/').map_or(0, |i| i + 1);
    let mut joined = image[..dir_len].to_vec();
    joined.extend_from_slice(name.as_bytes());
    Ok(PathBuf::from(OsString::from_vec(joined)))
}

/// Resolves a name stored in an image as qemu 10 resolves an external data file's name: as
/// given, so that a relative name is looked up in the working directory (qemu's
/// `bdrv_open_child` takes the name as it is). Protocol names and empty names are refused.
pub fn resolve_in_working_directory(name: &str) -> Result<PathBuf, BackingError> {
    check_local_name(name)?;
    Ok(PathBuf::from(name))
}

/// Refuses a stored name that is empty or names a protocol (`json:`, `nbd:`, ...).
fn check_local_name(name: &str) -> Result<(), BackingError> {
    if name.is_empty() {
        return Err(BackingError::EmptyName);
    }
    if has_protocol_prefix(name) {
        return Err(BackingError::ProtocolRefused {
            name: name.to_owned(),
        });
    }
    Ok(())
}

/// Whether, and where, backing files may be followed.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BackingPolicy {
    /// Never open a backing file (the library default).
    #[default]
    Deny,
    /// Follow local files anywhere (the CLI default, like qemu-img).
    FollowLocal,
    /// Follow local files only inside this directory (symlinks resolved before checking).
    Confine(PathBuf),
    /// Open no backing file and read the image alone: what would fall through to a backing
    /// file reads as zeros (the CLI's `--no-backing`).
    Detach,
}

impl BackingPolicy {
    /// Resolves `name` (from the image at `image_path`) and checks it against the policy.
    pub fn resolve(&self, image_path: &Path, name: &str) -> Result<PathBuf, BackingError> {
        self.admit(resolve(image_path, name)?, name)
    }

    /// Checks `path`, resolved from the stored `name`, against the policy.
    pub fn admit(&self, path: PathBuf, name: &str) -> Result<PathBuf, BackingError> {
        match self {
            Self::Deny | Self::Detach => Err(BackingError::NotFollowed {
                name: name.to_owned(),
            }),
            Self::FollowLocal => Ok(path),
            Self::Confine(dir) => {
                let outside = || BackingError::OutsideConfinement {
                    path: path.clone(),
                    dir: dir.clone(),
                };
                let real_dir = dir.canonicalize().map_err(|_| outside())?;
                let real_path = path.canonicalize().map_err(|_| outside())?;
                if real_path.starts_with(&real_dir) {
                    Ok(path)
                } else {
                    Err(outside())
                }
            }
        }
    }
}

/// Tracks a chain being followed: depth limit and loop detection by file identity.
#[derive(Debug, Default)]
pub struct ChainGuard {
    seen: HashSet<(u64, u64)>,
}

impl ChainGuard {
    /// Records one more image of the chain; refuses a loop or a chain past [`MAX_CHAIN_DEPTH`].
    pub fn enter(&mut self, path: &Path, metadata: &std::fs::Metadata) -> Result<(), BackingError> {
        use std::os::unix::fs::MetadataExt;
        if self.seen.len() >= MAX_CHAIN_DEPTH {
            return Err(BackingError::TooDeep {
                max: MAX_CHAIN_DEPTH,
            });
        }
        if !self.seen.insert((metadata.dev(), metadata.ino())) {
            return Err(BackingError::Loop {
                path: path.to_owned(),
            });
        }
        Ok(())
    }

    /// Refuses `path` if it is an image already in the chain, before it is opened: opening it
    /// again would meet this very chain's own locks (an image held for writing conflicts with a
    /// second, read-only open of it), which would be reported as another process's lock.
    pub(crate) fn refuse_seen(&self, path: &Path) -> Result<(), BackingError> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::metadata(path) {
            Ok(meta) if self.seen.contains(&(meta.dev(), meta.ino())) => Err(BackingError::Loop {
                path: path.to_owned(),
            }),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_join_the_image_directory_without_normalising() {
        let r = |img: &str, name: &str| resolve(Path::new(img), name).unwrap();
        assert_eq!(
            r("sub/o2.qcow2", "../base.qcow2"),
            Path::new("sub/../base.qcow2")
        );
        assert_eq!(r("o.qcow2", "base.qcow2"), Path::new("base.qcow2"));
        assert_eq!(r("/a/b/o.qcow2", "c/base"), Path::new("/a/b/c/base"));
        assert_eq!(r("/a/b/o.qcow2", "/abs/base"), Path::new("/abs/base"));
        assert_eq!(r("./x:y/o.qcow2", "b"), Path::new("./x:y/b"));
    }

    #[test]
    fn protocol_names_are_refused() {
        for name in [
            "json:{\"file.filename\":\"/etc/shadow\"}",
            "nbd:localhost:10809",
            "file:/etc/passwd",
            "a:b",
        ] {
            assert!(
                matches!(
                    resolve(Path::new("o.qcow2"), name),
                    Err(BackingError::ProtocolRefused { .. })
                ),
                "{name} accepted"
            );
        }
        assert!(!has_protocol_prefix("./a:b"));
        assert!(!has_protocol_prefix("/x/a:b"));
        assert_eq!(resolve(Path::new("o"), ""), Err(BackingError::EmptyName));
    }

    #[test]
    fn deny_policy_follows_nothing_and_confinement_checks_the_real_path() {
        let dir = std::env::temp_dir().join(format!("cowclone-backing-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("inside")).unwrap();
        std::fs::write(dir.join("inside/base"), b"x").unwrap();
        std::fs::write(dir.join("outside"), b"x").unwrap();
        let image = dir.join("inside/ov");
        assert!(matches!(
            BackingPolicy::Deny.resolve(&image, "base"),
            Err(BackingError::NotFollowed { .. })
        ));
        let confine = BackingPolicy::Confine(dir.join("inside"));
        assert_eq!(
            confine.resolve(&image, "base").unwrap(),
            dir.join("inside/base")
        );
        assert!(matches!(
            confine.resolve(&image, "../outside"),
            Err(BackingError::OutsideConfinement { .. })
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
