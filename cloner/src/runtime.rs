//! Where `ls` learns whether a clone is running: a [`StateProbe`] the hypervisor drivers
//! implement (pid files, sockets in the clone's directory). Until they exist, [`NoRuntime`]
//! reports no state, and `ls` shows `-` (JSON `"state": null`).

use crate::registry::ImageRecord;

/// Reports a record's runtime state (`running`, `stopped`, …), if known.
pub trait StateProbe {
    /// The state of the image `record`, or `None` if unknown.
    fn state(&self, record: &ImageRecord) -> Option<String>;
}

/// The probe used until hypervisor drivers provide one: state unknown.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoRuntime;

impl StateProbe for NoRuntime {
    fn state(&self, _record: &ImageRecord) -> Option<String> {
        None
    }
}
