//! [`VmSpec`]: everything a driver needs to run one VM, independent of where it came from (a
//! registry clone record, a provisioning plan, a test).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use imagefmt::ImageFormat;

use super::VmError;

/// Smallest guest memory a spec accepts.
pub const MIN_MEMORY: u64 = 16 << 20;
/// Default guest memory.
pub const DEFAULT_MEMORY: u64 = 512 << 20;
/// Most vCPUs a spec accepts.
pub const MAX_CPUS: u32 = 256;

/// One image of a disk chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskLayer {
    /// The image file.
    pub path: PathBuf,
    /// Its format, pinned: drivers pass it explicitly and never let a hypervisor probe it.
    pub format: ImageFormat,
}

/// A disk besides the boot chain (e.g. a NoCloud `cidata` seed), attached as-is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExtraDrive {
    /// The image file.
    pub path: PathBuf,
    /// Its format.
    pub format: ImageFormat,
    /// Attach read-only.
    pub read_only: bool,
}

/// Which accelerator qemu uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accel {
    /// KVM if a probe guest proves alive under it quickly, otherwise TCG.
    #[default]
    Auto,
    /// Hardware virtualization; fails if unusable.
    Kvm,
    /// Software emulation: slow, always available.
    Tcg,
}

impl FromStr for Accel {
    type Err = VmError;
    fn from_str(s: &str) -> Result<Self, VmError> {
        match s {
            "auto" => Ok(Accel::Auto),
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            _ => Err(VmError::InvalidOption {
                what: "accelerator",
                value: s.into(),
                reason: "expected auto, kvm or tcg".into(),
            }),
        }
    }
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Auto => "auto",
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// A host TCP port forwarded to a guest port (`--ingress HOST:GUEST`). The host side listens on
/// 127.0.0.1 only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortForward {
    /// Port on the host (127.0.0.1).
    pub host_port: u16,
    /// Port in the guest.
    pub guest_port: u16,
}

impl FromStr for PortForward {
    type Err = VmError;
    fn from_str(s: &str) -> Result<Self, VmError> {
        let invalid = |reason: &str| VmError::InvalidOption {
            what: "ingress",
            value: s.into(),
            reason: reason.into(),
        };
        let (host, guest) = s
            .split_once(':')
            .ok_or_else(|| invalid("expected HOST_PORT:GUEST_PORT"))?;
        Ok(PortForward {
            host_port: parse_port(host).ok_or_else(|| invalid("bad host port"))?,
            guest_port: parse_port(guest).ok_or_else(|| invalid("bad guest port"))?,
        })
    }
}

/// One host endpoint the guest may reach (`allow:HOST:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Host name or address, as the host resolves it.
    pub host: String,
    /// TCP port.
    pub port: u16,
}

/// What the guest may reach on the network.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Egress {
    /// Nothing outside the VM (ingress forwards still work).
    #[default]
    Deny,
    /// Only these TCP endpoints, each behind its own guest-side address (see the qemu driver).
    Allow(Vec<Endpoint>),
}

impl FromStr for Egress {
    type Err = VmError;
    fn from_str(s: &str) -> Result<Self, VmError> {
        let invalid = |reason: String| VmError::InvalidOption {
            what: "egress",
            value: s.into(),
            reason,
        };
        if s == "deny" {
            return Ok(Egress::Deny);
        }
        let list = s
            .strip_prefix("allow:")
            .ok_or_else(|| invalid("expected deny or allow:HOST:PORT,...".into()))?;
        let mut endpoints = Vec::new();
        for item in list.split(',') {
            let (host, port) = item
                .rsplit_once(':')
                .ok_or_else(|| invalid(format!("{item:?} is not HOST:PORT")))?;
            let host_ok = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !host_ok {
                return Err(invalid(format!(
                    "{host:?} is not a host name or IPv4 address"
                )));
            }
            let port = parse_port(port).ok_or_else(|| invalid(format!("bad port in {item:?}")))?;
            endpoints.push(Endpoint {
                host: host.into(),
                port,
            });
        }
        if endpoints.len() > MAX_EGRESS {
            return Err(invalid(format!("at most {MAX_EGRESS} endpoints")));
        }
        Ok(Egress::Allow(endpoints))
    }
}

/// Most `allow:` endpoints (each takes one guest-side address 10.0.2.100 + i).
pub const MAX_EGRESS: usize = 100;

fn parse_port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Direct kernel boot (`--kernel K --initrd I --append A`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelBoot {
    /// The kernel image.
    pub kernel: PathBuf,
    /// The initial ramdisk, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub append: Option<String>,
}

/// One VM to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// The VM's name (the clone's name).
    pub name: String,
    /// The directory for the VM's runtime files (pidfile, QMP socket, serial log, invocation
    /// log): the clone's own directory.
    pub run_dir: PathBuf,
    /// The boot disk chain, nearest first: `disks[0]` is the writable clone, every later layer
    /// is opened read-only, the last is the base.
    pub disks: Vec<DiskLayer>,
    /// Further disks (a `cidata` seed), after the boot disk.
    pub extra_drives: Vec<ExtraDrive>,
    /// Files that receive the output of serial ports 2, 3, ... (port 1 is the serial log).
    pub extra_serial_logs: Vec<PathBuf>,
    /// Guest memory in bytes (a whole number of MiB).
    pub memory: u64,
    /// Virtual CPUs.
    pub cpus: u32,
    /// Accelerator.
    pub accel: Accel,
    /// Host-to-guest TCP forwards.
    pub ingress: Vec<PortForward>,
    /// Guest-to-host network policy.
    pub egress: Egress,
    /// Direct kernel boot instead of the disk's boot loader.
    pub kernel: Option<KernelBoot>,
}

impl VmSpec {
    /// A spec with defaults (512 MiB, 1 CPU, auto accel, no network access) for `disks`.
    pub fn new(
        name: impl Into<String>,
        run_dir: impl Into<PathBuf>,
        disks: Vec<DiskLayer>,
    ) -> Self {
        VmSpec {
            name: name.into(),
            run_dir: run_dir.into(),
            disks,
            extra_drives: Vec::new(),
            extra_serial_logs: Vec::new(),
            memory: DEFAULT_MEMORY,
            cpus: 1,
            accel: Accel::Auto,
            ingress: Vec::new(),
            egress: Egress::Deny,
            kernel: None,
        }
    }

    /// Checks the values every driver relies on.
    pub fn validate(&self) -> Result<(), VmError> {
        let invalid = |what: &'static str, value: String, reason: &str| VmError::InvalidOption {
            what,
            value,
            reason: reason.into(),
        };
        if self.disks.is_empty() {
            return Err(VmError::Unsupported("a VM needs at least one disk".into()));
        }
        if self.memory < MIN_MEMORY || self.memory % (1 << 20) != 0 {
            return Err(invalid(
                "memory",
                self.memory.to_string(),
                "must be a whole number of MiB, at least 16 MiB",
            ));
        }
        if !(1..=MAX_CPUS).contains(&self.cpus) {
            return Err(invalid("cpus", self.cpus.to_string(), "must be 1 to 256"));
        }
        let mut host_ports: Vec<u16> = self.ingress.iter().map(|f| f.host_port).collect();
        host_ports.sort_unstable();
        if host_ports.windows(2).any(|w| w[0] == w[1]) {
            return Err(invalid(
                "ingress",
                format!("{host_ports:?}"),
                "a host port is forwarded twice",
            ));
        }
        Ok(())
    }

    /// The memory in MiB, as qemu's `-m` and VBoxManage's `--memory` take it.
    pub fn memory_mib(&self) -> u64 {
        self.memory >> 20
    }

    /// The pidfile qemu writes.
    pub fn pidfile(&self) -> PathBuf {
        self.run_dir.join("qemu.pid")
    }

    /// The QMP socket.
    pub fn qmp_socket(&self) -> PathBuf {
        self.run_dir.join("qmp.sock")
    }

    /// The file receiving serial port 1 (the guest console).
    pub fn serial_log(&self) -> PathBuf {
        self.run_dir.join("serial.log")
    }

    /// The JSON-lines log of every hypervisor invocation for this VM.
    pub fn invocation_log(&self) -> PathBuf {
        self.run_dir.join("invocations.log")
    }
}

/// `path` as UTF-8, or [`VmError::NonUtf8Path`].
pub fn utf8(path: &Path) -> Result<&str, VmError> {
    path.to_str()
        .ok_or_else(|| VmError::NonUtf8Path(path.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_refuse_nonsense() {
        assert_eq!("tcg".parse::<Accel>().unwrap(), Accel::Tcg);
        assert!("hvf".parse::<Accel>().is_err());
        assert_eq!(
            "8080:80".parse::<PortForward>().unwrap(),
            PortForward {
                host_port: 8080,
                guest_port: 80
            }
        );
        for bad in ["8080", "0:80", "8080:x", "70000:80"] {
            assert!(bad.parse::<PortForward>().is_err(), "{bad}");
        }
        assert_eq!("deny".parse::<Egress>().unwrap(), Egress::Deny);
        assert_eq!(
            "allow:10.0.0.1:443,mirror.example:80"
                .parse::<Egress>()
                .unwrap(),
            Egress::Allow(vec![
                Endpoint {
                    host: "10.0.0.1".into(),
                    port: 443
                },
                Endpoint {
                    host: "mirror.example".into(),
                    port: 80
                },
            ])
        );
        for bad in [
            "allow",
            "allow:",
            "allow:h",
            "allow:h:0",
            "allow:a,b:1:2",
            "allow:x-y:1,h;rm:2",
        ] {
            assert!(bad.parse::<Egress>().is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_refuses_what_no_hypervisor_runs() {
        let disk = DiskLayer {
            path: "/c.qcow2".into(),
            format: ImageFormat::Qcow2,
        };
        let mut spec = VmSpec::new("vm", "/run", vec![disk]);
        assert!(spec.validate().is_ok());
        spec.memory = (64 << 20) + 1;
        assert!(spec.validate().is_err());
        spec.memory = 64 << 20;
        spec.cpus = 0;
        assert!(spec.validate().is_err());
        spec.cpus = 2;
        spec.ingress = vec!["22:22".parse().unwrap(), "22:80".parse().unwrap()];
        assert!(spec.validate().is_err());
        spec.ingress.pop();
        assert!(spec.validate().is_ok());
        spec.disks.clear();
        assert!(spec.validate().is_err());
    }
}
