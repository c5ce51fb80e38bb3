//! [`RegistryResolver`]: finds the parent of a VDI differencing image by UUID among the
//! registered images — the registry VirtualBox keeps in its media registry, here from ours.
//! Clone directories each hold one image, so the same-directory search cannot find parents.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use imagefmt::vdi::ParentResolver;
use uuid::Uuid;

use super::Registry;
use crate::error::Result;

/// Registered VDI images by creation UUID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RegistryResolver {
    by_uuid: HashMap<Uuid, PathBuf>,
}

impl ParentResolver for RegistryResolver {
    fn find(&self, _child_path: &Path, linkage: Uuid) -> imagefmt::Result<Option<PathBuf>> {
        Ok(self.by_uuid.get(&linkage).cloned())
    }
}

impl Registry {
    /// A [`ParentResolver`] over the registered VDI images (a snapshot of the registry now).
    pub fn vdi_resolver(&self) -> Result<RegistryResolver> {
        let mut by_uuid = HashMap::new();
        for record in self.list(None)? {
            if let Some(uuid) = record.vdi.as_ref().and_then(|v| v.uuid_create.parse().ok()) {
                by_uuid.insert(uuid, record.path);
            }
        }
        Ok(RegistryResolver { by_uuid })
    }
}
