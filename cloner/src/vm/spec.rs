//! What a VM is made of, independent of the hypervisor: the disk chain (nearest image first,
//! every format pinned), memory, CPUs, port forwards, egress policy, direct kernel boot.

use std::path::{Path, PathBuf};

use imagefmt::ImageFormat;

use super::{Result, VmError};
use crate::CloneRecord;

/// Default guest memory when neither the record nor the caller sets one: 512 MiB.
pub const DEFAULT_MEMORY: u64 = 512 << 20;

/// One image of the disk chain handed to the hypervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayer {
    /// The image file.
    pub path: PathBuf,
    /// Its format, pinned (never probed by the hypervisor).
    pub format: ImageFormat,
    /// Opened read-only (every layer but the top).
    pub read_only: bool,
}

/// How the hypervisor accelerates the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM only if a probe guest proves alive under it, else TCG.
    #[default]
    Auto,
    /// Hardware virtualisation.
    Kvm,
    /// qemu's software emulation.
    Tcg,
}

impl std::str::FromStr for Accel {
    type Err = VmError;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(VmError::Invalid(format!(
                "unknown accelerator {other:?} (auto, kvm, tcg)"
            ))),
        }
    }
}

/// A host TCP port forwarded to a guest port (user-mode networking).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// Port on the host (bound to 127.0.0.1).
    pub host: u16,
    /// Port in the guest.
    pub guest: u16,
}

impl std::str::FromStr for PortForward {
    type Err = VmError;
    /// `HOST:GUEST`, both 1–65535.
    fn from_str(s: &str) -> Result<Self> {
        let bad = || VmError::Invalid(format!("invalid port forward {s:?}: expected HOST:GUEST"));
        let (host, guest) = s.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p != 0).ok_or_else(bad);
        Ok(PortForward {
            host: port(host)?,
            guest: port(guest)?,
        })
    }
}

/// What the guest may reach on the network.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Egress {
    /// Nothing outside the VM (qemu user networking with `restrict=on`; ingress forwards still
    /// work).
    #[default]
    Deny,
    /// Only these host:port destinations (qemu `guestfwd` rules to them; all else restricted).
    Allow(Vec<(String, u16)>),
}

impl std::str::FromStr for Egress {
    type Err = VmError;
    /// `deny`, or `allow:HOST:PORT,HOST:PORT...`.
    fn from_str(s: &str) -> Result<Self> {
        if s == "deny" {
            return Ok(Egress::Deny);
        }
        let bad = || {
            VmError::Invalid(format!(
                "invalid egress {s:?}: expected deny or allow:HOST:PORT,..."
            ))
        };
        let list = s.strip_prefix("allow:").ok_or_else(bad)?;
        let mut allowed = Vec::new();
        for item in list.split(',') {
            let (host, port) = item.rsplit_once(':').ok_or_else(bad)?;
            let port = port
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(bad)?;
            if host.is_empty() || host.contains([',', ' ']) {
                return Err(bad());
            }
            allowed.push((host.to_owned(), port));
        }
        Ok(Egress::Allow(allowed))
    }
}

/// Direct kernel boot (`-kernel`, `-initrd`, `-append`), for guests without a boot loader.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initial ram disk, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub append: Option<String>,
}

/// Everything a driver needs to run one VM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM's (clone's) name.
    pub name: String,
    /// Where runtime files go: pidfile, QMP socket, serial log, command log.
    pub run_dir: PathBuf,
    /// The disk chain, top (writable) first, base last.
    pub disks: Vec<DiskLayer>,
    /// Guest memory, bytes.
    pub memory: u64,
    /// Guest CPUs.
    pub cpus: u32,
    /// Acceleration.
    pub accel: Accel,
    /// Host-to-guest port forwards.
    pub ingress: Vec<PortForward>,
    /// Guest-to-outside policy.
    pub egress: Egress,
    /// Direct kernel boot, if any.
    pub kernel: Option<KernelBoot>,
    /// More read-only drives after the boot disk (e.g. a cloud-init seed), raw format.
    pub extra_drives: Vec<PathBuf>,
    /// Files receiving serial ports 2, 3, ... (port 1 is the console, `serial.log`); qemu driver
    /// only. Provisioning reports results on port 2, away from console noise.
    pub extra_serial_logs: Vec<PathBuf>,
    /// The program qemu runs per guest connection to an `Egress::Allow` endpoint, as
    /// `PROGRAM relay HOST PORT` (see [`super::relay`]): the `cowclone` binary itself.
    /// Required when egress is allowed.
    pub egress_relay: Option<PathBuf>,
}

impl VmSpec {
    /// The spec of the registered clone `record`: its image on top, then its chain, formats as
    /// recorded; memory and CPUs from the record (nearest setting along the chain) or defaults.
    pub fn from_clone(record: &CloneRecord) -> Result<VmSpec> {
        let run_dir = record.dir.clone().ok_or_else(|| {
            VmError::Invalid(format!(
                "{} has no directory of its own (bases are not started; clone it first)",
                record.name
            ))
        })?;
        let mut disks = vec![DiskLayer {
            path: record.image.clone(),
            format: record.format,
            read_only: false,
        }];
        disks.extend(record.chain.iter().map(|link| DiskLayer {
            path: link.path.clone(),
            format: link.format,
            read_only: true,
        }));
        Ok(VmSpec {
            name: record.name.clone(),
            run_dir,
            disks,
            memory: record.memory.unwrap_or(DEFAULT_MEMORY),
            cpus: record.cpus.unwrap_or(1),
            accel: Accel::Auto,
            ingress: Vec::new(),
            egress: Egress::Deny,
            kernel: None,
            extra_drives: Vec::new(),
            extra_serial_logs: Vec::new(),
            egress_relay: None,
        })
    }

    /// The pidfile qemu writes.
    pub fn pidfile(&self) -> PathBuf {
        pidfile(&self.run_dir)
    }

    /// The QMP control socket.
    pub fn qmp_socket(&self) -> PathBuf {
        qmp_socket(&self.run_dir)
    }

    /// The guest's serial console log.
    pub fn serial_log(&self) -> PathBuf {
        serial_log(&self.run_dir)
    }
}

/// The pidfile in a clone's runtime directory.
pub fn pidfile(run_dir: &Path) -> PathBuf {
    crate::runtime::pidfile(run_dir)
}

/// The QMP socket in a clone's runtime directory.
pub fn qmp_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("qmp.sock")
}

/// The serial console log in a clone's runtime directory.
pub fn serial_log(run_dir: &Path) -> PathBuf {
    run_dir.join("serial.log")
}

/// The log of every hypervisor command run for a clone.
pub fn command_log(run_dir: &Path) -> PathBuf {
    run_dir.join("commands.log")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ports_and_egress() {
        let f: PortForward = "8080:80".parse().unwrap();
        assert_eq!((f.host, f.guest), (8080, 80));
        for bad in ["8080", "0:80", "80:70000", "a:b", ":80"] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
        assert_eq!("deny".parse::<Egress>().unwrap(), Egress::Deny);
        assert_eq!(
            "allow:10.0.2.2:3128,example.org:443"
                .parse::<Egress>()
                .unwrap(),
            Egress::Allow(vec![("10.0.2.2".into(), 3128), ("example.org".into(), 443)])
        );
        for bad in ["allow", "allow:", "allow:host", "allow:host:0", "open"] {
            assert!(bad.parse::<Egress>().is_err(), "{bad}");
        }
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert!("xen".parse::<Accel>().is_err());
    }
}
