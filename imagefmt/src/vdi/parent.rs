//! Finding the parents of differencing VDI images (opening them is the chain walker's job:
//! [`crate::chain::open_vdi`], [`crate::chain::open_vdi_rw`]).
//!
//! A VDI file names no parent path, only the parent's creation UUID (the child's linkage UUID,
//! FORMATS.md §2.3); VirtualBox finds the file through its media registry. Here a
//! [`ParentResolver`] turns (child path, linkage UUID) into a candidate path: [`SameDirectory`]
//! scans the child's directory, [`Explicit`] takes the user's list (`--parent FILE`), and any
//! closure can stand in for a registry lookup. Whatever the resolver proposes is checked: its
//! creation UUID must equal the linkage ([`VdiError::ParentMismatch`] otherwise). A differing
//! modification UUID is not refused (VirtualBox does not check it either) but reported through
//! [`ParentLink::modification_matches`].

use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use super::{VdiError, VdiHeader, HEADER_REGION_LEN};
use crate::backing::{BackingError, BackingPolicy};
use crate::image::ImageHeader;
use crate::io::Backend;
use crate::open::OpenHow;
use crate::{Error, Result};

/// Most `*.vdi` files [`SameDirectory`] looks at in one directory.
pub const MAX_DIRECTORY_CANDIDATES: usize = 4096;

/// Turns a differencing image's linkage UUID into the path of its parent.
pub trait ParentResolver {
    /// The path of the parent of the image at `child_path`, whose linkage UUID is `linkage`;
    /// `None` if there is none to propose. The caller verifies the proposal's UUID.
    fn find(&self, child_path: &Path, linkage: Uuid) -> Result<Option<PathBuf>>;
}

impl<F> ParentResolver for F
where
    F: Fn(&Path, Uuid) -> Result<Option<PathBuf>>,
{
    fn find(&self, child_path: &Path, linkage: Uuid) -> Result<Option<PathBuf>> {
        self(child_path, linkage)
    }
}

/// Finds the parent among the `*.vdi` files in the child's own directory, by creation UUID.
///
/// Reads only the first 512 bytes of at most [`MAX_DIRECTORY_CANDIDATES`] regular files; files
/// that are not VDI images are skipped. Two different files with the linkage UUID (a copied
/// image) are refused as ambiguous rather than guessed between.
#[derive(Debug, Clone, Copy, Default)]
pub struct SameDirectory;

impl ParentResolver for SameDirectory {
    fn find(&self, child_path: &Path, linkage: Uuid) -> Result<Option<PathBuf>> {
        let dir = match child_path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p,
            _ => Path::new("."),
        };
        let entries = std::fs::read_dir(dir).map_err(Error::io(format!(
            "listing {} for a parent image",
            dir.display()
        )))?;
        let mut candidates = Vec::new();
        for entry in entries {
            let entry = entry.map_err(Error::io(format!("listing {}", dir.display())))?;
            let name = entry.file_name();
            let is_vdi = Path::new(&name)
                .extension()
                .is_some_and(|e| e.eq_ignore_ascii_case("vdi"));
            if !is_vdi {
                continue;
            }
            if candidates.len() == MAX_DIRECTORY_CANDIDATES {
                return Err(VdiError::TooManyCandidates {
                    dir: dir.to_owned(),
                    limit: MAX_DIRECTORY_CANDIDATES,
                }
                .into());
            }
            // Named as the child is: "b.vdi" next to "d.vdi", "dir/b.vdi" next to "dir/d.vdi".
            candidates.push(child_path.with_file_name(name));
        }
        candidates.sort();
        let mut found: Option<(PathBuf, (u64, u64))> = None;
        for path in candidates {
            let Some((header, id)) = peek_header(&path) else {
                continue;
            };
            if header.uuid_create != linkage {
                continue;
            }
            match &found {
                None => found = Some((path, id)),
                // The same file under another name (a link) is not ambiguous.
                Some((_, first_id)) if *first_id == id => {}
                Some((first, _)) => {
                    return Err(VdiError::AmbiguousParent {
                        linkage,
                        first: first.clone(),
                        second: path,
                    }
                    .into())
                }
            }
        }
        Ok(found.map(|(path, _)| path))
    }
}

/// The header and file identity of `path`, if it is a regular file holding a valid VDI header.
fn peek_header(path: &Path) -> Option<(VdiHeader, (u64, u64))> {
    let meta = std::fs::metadata(path).ok()?;
    if !meta.is_file() {
        return None;
    }
    // Non-blocking, so that a FIFO swapped in after the check cannot hang the search.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
        .open(path)
        .ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() {
        return None;
    }
    let mut bytes = [0u8; HEADER_REGION_LEN];
    let got = file.read_prefix_at(&mut bytes, 0).ok()?;
    let header = VdiHeader::parse(&bytes[..got]).ok()?;
    Some((header, (meta.dev(), meta.ino())))
}

/// Parents named by the user (`--parent FILE`), nearest first: the first entry is the parent of
/// the image opened, the next the parent's parent, and so on.
///
/// The entry proposed for an image is the one after that image's own entry in the list (the
/// first for an image not in it). Each proposal is verified by UUID like any other.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Explicit(pub Vec<PathBuf>);

impl ParentResolver for Explicit {
    fn find(&self, child_path: &Path, _linkage: Uuid) -> Result<Option<PathBuf>> {
        let next = match self.0.iter().position(|p| p == child_path) {
            Some(i) => i + 1,
            None => 0,
        };
        Ok(self.0.get(next).cloned())
    }
}

/// Another resolver's proposals, followed only as far as a [`BackingPolicy`] allows: nothing
/// under `Deny`/`Detach` (an error naming the UUID), anything under `FollowLocal`, and only
/// paths inside the directory under `Confine` (symlinks resolved before checking).
#[derive(Clone, Copy)]
pub(crate) struct UnderPolicy<'a> {
    /// The policy.
    pub(crate) policy: &'a BackingPolicy,
    /// The resolver proposing paths.
    pub(crate) resolver: &'a dyn ParentResolver,
}

impl ParentResolver for UnderPolicy<'_> {
    fn find(&self, child_path: &Path, linkage: Uuid) -> Result<Option<PathBuf>> {
        let not_followed = || {
            Error::from(BackingError::NotFollowed {
                name: format!("VDI parent {{{linkage}}}"),
            })
        };
        match self.policy {
            BackingPolicy::Deny | BackingPolicy::Detach => Err(not_followed()),
            BackingPolicy::FollowLocal => self.resolver.find(child_path, linkage),
            BackingPolicy::Confine(dir) => {
                let Some(path) = self.resolver.find(child_path, linkage)? else {
                    return Ok(None);
                };
                let outside = || {
                    Error::from(BackingError::OutsideConfinement {
                        path: path.clone(),
                        dir: dir.clone(),
                    })
                };
                let real_dir = dir.canonicalize().map_err(|_| outside())?;
                let real_path = path.canonicalize().map_err(|_| outside())?;
                if real_path.starts_with(&real_dir) {
                    Ok(Some(path))
                } else {
                    Err(outside())
                }
            }
        }
    }
}

/// One link of a chain: a differencing image and the parent found for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLink {
    /// The differencing image.
    pub child: PathBuf,
    /// Its parent.
    pub parent: PathBuf,
    /// The child's linkage UUID (= the parent's creation UUID; verified).
    pub linkage: Uuid,
    /// The parent's modification UUID the child recorded when it was created.
    pub expected_parent_modify: Uuid,
    /// The parent's modification UUID now.
    pub parent_modify: Uuid,
}

impl ParentLink {
    /// The link from the differencing image `child` (header `child_header`) to `parent`, whose
    /// header `parent_header` was checked to carry the child's linkage UUID.
    pub(crate) fn between(
        child: &Path,
        child_header: &VdiHeader,
        parent: &Path,
        parent_header: &VdiHeader,
    ) -> Self {
        Self {
            child: child.to_owned(),
            parent: parent.to_owned(),
            linkage: child_header.uuid_linkage,
            expected_parent_modify: child_header.uuid_parent_modify,
            parent_modify: parent_header.uuid_modify,
        }
    }

    /// False if the parent was modified since the child was made (its modification UUID
    /// changed): the child may then show a mix of old and new parent data. VirtualBox does not
    /// refuse such chains either; callers may warn.
    pub fn modification_matches(&self) -> bool {
        self.expected_parent_modify == self.parent_modify
    }
}

/// The path of the parent of the differencing image `header` at `path`, as `resolver` proposes
/// it and `policy` allows, after checking that its creation UUID equals the link: where the chain
/// walker ([`crate::chain`]) goes below a differencing image.
pub(crate) fn find_parent(
    path: &Path,
    header: &VdiHeader,
    policy: &BackingPolicy,
    resolver: &dyn ParentResolver,
) -> Result<PathBuf> {
    let linkage = header.uuid_linkage;
    if linkage.is_nil() {
        return Err(VdiError::DiffWithoutParent {
            path: path.to_owned(),
        }
        .into());
    }
    let parent = UnderPolicy { policy, resolver }
        .find(path, linkage)?
        .ok_or_else(|| VdiError::ParentNotFound {
            linkage,
            child: path.to_owned(),
        })?;
    // Only the header, to check the UUID; whoever opens the parent takes its locks then (and
    // checks the UUID again on the file it opened: `check_parent`).
    let (_, parent_header) = crate::image::read_file_header_with(&parent, OpenHow::force_share())?;
    check_parent(&parent, &parent_header, linkage)?;
    Ok(parent)
}

/// Refuses `header` (the image at `parent`) as the parent of a differencing image whose linkage
/// UUID is `linkage` unless it is a VDI image whose creation UUID is `linkage`.
pub(crate) fn check_parent(parent: &Path, header: &ImageHeader, linkage: Uuid) -> Result<()> {
    match header {
        ImageHeader::Vdi(h) if h.uuid_create == linkage => Ok(()),
        ImageHeader::Vdi(h) => Err(VdiError::ParentMismatch {
            expected: linkage,
            found: h.uuid_create,
            parent: parent.to_owned(),
        }
        .into()),
        other => Err(VdiError::ParentNotVdi {
            path: parent.to_owned(),
            format: other.format().name(),
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_proposes_the_entry_after_the_child() {
        let list = Explicit(vec![PathBuf::from("p1.vdi"), PathBuf::from("p2.vdi")]);
        let id = Uuid::new_v4();
        let find = |child: &str| list.find(Path::new(child), id).unwrap();
        assert_eq!(find("top.vdi"), Some(PathBuf::from("p1.vdi")));
        assert_eq!(find("p1.vdi"), Some(PathBuf::from("p2.vdi")));
        assert_eq!(find("p2.vdi"), None);
        assert_eq!(Explicit::default().find(Path::new("x"), id).unwrap(), None);
    }

    #[test]
    fn closures_resolve_and_policies_restrict() {
        let registry = |_: &Path, linkage: Uuid| -> Result<Option<PathBuf>> {
            Ok(Some(PathBuf::from(format!("/nonexistent/{linkage}.vdi"))))
        };
        let id = Uuid::new_v4();
        let found = registry.find(Path::new("c.vdi"), id).unwrap().unwrap();
        assert!(found.to_string_lossy().contains(&id.to_string()));
        for policy in [BackingPolicy::Deny, BackingPolicy::Detach] {
            let r = UnderPolicy {
                policy: &policy,
                resolver: &registry,
            };
            let e = r.find(Path::new("c.vdi"), id).unwrap_err();
            assert!(e.to_string().contains(&id.to_string()), "{e}");
        }
        let follow = BackingPolicy::FollowLocal;
        let r = UnderPolicy {
            policy: &follow,
            resolver: &registry,
        };
        assert_eq!(r.find(Path::new("c.vdi"), id).unwrap(), Some(found));
        let dir = tempfile::tempdir().unwrap();
        let confine = BackingPolicy::Confine(dir.path().to_owned());
        let r = UnderPolicy {
            policy: &confine,
            resolver: &registry,
        };
        assert!(matches!(
            r.find(Path::new("c.vdi"), id),
            Err(Error::Backing(BackingError::OutsideConfinement { .. }))
        ));
    }

    #[test]
    fn link_reports_a_changed_parent() {
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        let mut link = ParentLink {
            child: PathBuf::from("c"),
            parent: PathBuf::from("p"),
            linkage: Uuid::new_v4(),
            expected_parent_modify: a,
            parent_modify: a,
        };
        assert!(link.modification_matches());
        link.parent_modify = b;
        assert!(!link.modification_matches());
    }
}
