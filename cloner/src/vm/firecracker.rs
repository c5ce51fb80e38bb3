//! The Firecracker driver: a microVM booted from a raw rootfs through Firecracker's
//! `--config-file` (the whole VM configuration as JSON), with `--api-sock` for stopping it.
//!
//! Firecracker reads raw block devices only, so the clone must be one raw image: a reflink clone
//! of a raw base (`clone --method reflink`), or a clone flattened with `convert -O raw`. It boots
//! a kernel directly (no firmware) and its network devices are TAP devices, so port forwards are
//! refused and a VM gets no network interface.
//!
//! The configuration is built from typed mirrors of the objects of Firecracker's API schema
//! (`src/firecracker/swagger/firecracker.yaml` in Firecracker's repository; the config file
//! uses the same objects under kebab-case keys, `src/vmm/src/resources.rs`): the fields cowclone
//! sets, with the schema's required fields required and unknown fields rejected, so a config
//! that does not parse back into these types is not the schema's. Firecracker cannot run on the
//! build machine (no package; nested KVM guests hang there): the config is checked against the
//! schema only (docs/drivers/firecracker.md).

use std::path::{Path, PathBuf};
use std::time::Duration;

use imagefmt::ImageFormat;
use serde::{Deserialize, Serialize};

use super::daemon;
use super::qemu::{Stopped, VmState};
use super::runner::{CommandRunner, Invocation};
use super::spec::{Accel, Egress, VmSpec};
use super::{io, Result, VmError};

/// The Firecracker binary.
pub const PROGRAM: &str = "firecracker";

/// Most vCPUs the schema allows (`MachineConfiguration.vcpu_count`, maximum 32).
pub const MAX_VCPUS: u32 = 32;

/// Longest Unix socket path (`sun_path` is 108 bytes with its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// The config file: the schema's `FullVmConfiguration` keys cowclone uses. `boot-source` and
/// `drives` are required by Firecracker's config-file parser; `machine-config` is optional
/// there, but always given here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel to boot.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// The block devices, the root device first.
    pub drives: Vec<Drive>,
    /// vCPUs and memory.
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfiguration,
    /// TAP network devices (none: cowclone forwards no ports with Firecracker).
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
}

/// The schema's `BootSource`: `kernel_image_path` required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the kernel image.
    pub kernel_image_path: String,
    /// Host path of the initrd, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// The schema's `Drive` (virtio-block): `drive_id` and `is_root_device` required;
/// `path_on_host` and `is_read_only` required for virtio-block (the schema's description).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Unique id of the drive.
    pub drive_id: String,
    /// Whether this is the root device (`/dev/vda`, `root=` added to the boot arguments).
    pub is_root_device: bool,
    /// Host path of the raw image.
    pub path_on_host: String,
    /// Opened read-only.
    pub is_read_only: bool,
}

/// The schema's `MachineConfiguration`: `vcpu_count` (1–32) and `mem_size_mib` required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// vCPUs: 1 or an even number, at most 32.
    pub vcpu_count: u32,
    /// Guest memory, MiB.
    pub mem_size_mib: u64,
}

/// The schema's `NetworkInterface`: `iface_id` and `host_dev_name` (a TAP device) required.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Unique id of the interface.
    pub iface_id: String,
    /// The host TAP device.
    pub host_dev_name: String,
    /// The guest's MAC address, if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
}

impl VmConfig {
    /// Checks the value constraints of the schema the types cannot express: `vcpu_count` 1 to 32
    /// and "either 1 or an even number", memory at least 1 MiB, a kernel path, unique drive
    /// ids, at most one root device.
    pub fn validate(&self) -> Result<()> {
        let vcpus = self.machine_config.vcpu_count;
        if !(1..=MAX_VCPUS).contains(&vcpus) || (vcpus > 1 && vcpus % 2 == 1) {
            return Err(VmError::Invalid(format!(
                "Firecracker takes 1 or an even number of vCPUs up to {MAX_VCPUS}, not {vcpus}"
            )));
        }
        if self.machine_config.mem_size_mib == 0 {
            return Err(VmError::Invalid("Firecracker needs some memory".into()));
        }
        if self.boot_source.kernel_image_path.is_empty() {
            return Err(VmError::Invalid("no kernel image path".into()));
        }
        let mut ids: Vec<&str> = self.drives.iter().map(|d| d.drive_id.as_str()).collect();
        ids.sort_unstable();
        ids.dedup();
        if ids.len() != self.drives.len() {
            return Err(VmError::Invalid("drive ids must be unique".into()));
        }
        if self.drives.iter().filter(|d| d.is_root_device).count() > 1 {
            return Err(VmError::Invalid("more than one root device".into()));
        }
        Ok(())
    }
}

/// The config file in a clone's runtime directory.
pub fn config_file(run_dir: &Path) -> PathBuf {
    run_dir.join("firecracker.json")
}

/// The API socket in a clone's runtime directory.
pub fn api_socket(run_dir: &Path) -> PathBuf {
    run_dir.join("firecracker.sock")
}

/// The pidfile cowclone writes for the Firecracker process.
pub fn pidfile(run_dir: &Path) -> PathBuf {
    run_dir.join("firecracker.pid")
}

fn text(path: &Path) -> Result<String> {
    path.to_str()
        .map(str::to_owned)
        .ok_or_else(|| VmError::Invalid(format!("{} is not UTF-8", path.display())))
}

/// The configuration that boots `spec`: its single raw image as the writable root device, the
/// extra drives read-only after it, the kernel, vCPUs and memory. Refuses what Firecracker
/// cannot do.
pub fn config(spec: &VmSpec) -> Result<VmConfig> {
    let [root] = spec.disks.as_slice() else {
        let top = spec
            .disks
            .first()
            .ok_or_else(|| VmError::Invalid("no disk to boot from".into()))?;
        return Err(VmError::Invalid(format!(
            "{} is a {} overlay: Firecracker boots one raw image; clone with --method reflink \
             from a raw base, or flatten it with `cowclone convert -O raw`",
            top.path.display(),
            top.format.name()
        )));
    };
    if root.format != ImageFormat::Raw {
        return Err(VmError::Invalid(format!(
            "{} is {}: Firecracker boots a raw image; clone with --method reflink from a raw \
             base, or flatten it with `cowclone convert -O raw`",
            root.path.display(),
            root.format.name()
        )));
    }
    if spec.accel == Accel::Tcg {
        return Err(VmError::Invalid(
            "Firecracker runs guests only under KVM: --accel tcg needs --driver qemu".into(),
        ));
    }
    if !spec.ingress.is_empty() || matches!(spec.egress, Egress::Allow(_)) {
        return Err(VmError::Invalid(
            "Firecracker's network interfaces are TAP devices: it has no port forwarding \
             (--ingress) or destination filter (--egress allow); use --driver qemu"
                .into(),
        ));
    }
    if !spec.extra_serial_logs.is_empty() {
        return Err(VmError::Invalid(
            "Firecracker has one serial console: extra serial logs need --driver qemu".into(),
        ));
    }
    let kernel = spec.kernel.as_ref().ok_or_else(|| {
        VmError::Invalid("Firecracker boots a kernel directly: pass --kernel FILE".into())
    })?;
    let mut drives = vec![Drive {
        drive_id: "rootfs".into(),
        is_root_device: true,
        path_on_host: text(&root.path)?,
        is_read_only: false,
    }];
    for (k, drive) in spec.extra_drives.iter().enumerate() {
        drives.push(Drive {
            drive_id: format!("extra{k}"),
            is_root_device: false,
            path_on_host: text(drive)?,
            is_read_only: true,
        });
    }
    let config = VmConfig {
        boot_source: BootSource {
            kernel_image_path: text(&kernel.kernel)?,
            initrd_path: kernel.initrd.as_deref().map(text).transpose()?,
            boot_args: kernel.append.clone(),
        },
        drives,
        machine_config: MachineConfiguration {
            vcpu_count: spec.cpus,
            mem_size_mib: spec.memory.div_ceil(1 << 20),
        },
        network_interfaces: Vec::new(),
    };
    config.validate()?;
    Ok(config)
}

/// The config as the JSON file Firecracker reads.
pub fn config_json(config: &VmConfig) -> Result<String> {
    serde_json::to_string_pretty(config)
        .map(|mut json| {
            json.push('\n');
            json
        })
        .map_err(|e| VmError::Invalid(format!("encoding the Firecracker config: {e}")))
}

/// `firecracker --api-sock SOCKET --config-file FILE` for the clone in `run_dir`.
pub fn command_line(run_dir: &Path) -> Result<Invocation> {
    let socket = api_socket(run_dir);
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        return Err(VmError::Invalid(format!(
            "the API socket path {} is longer than the {MAX_SOCKET_PATH} bytes a Unix socket \
             allows; use a registry home with a shorter path",
            socket.display()
        )));
    }
    Ok(Invocation::new(
        PROGRAM,
        vec![
            "--api-sock".into(),
            text(&socket)?,
            "--config-file".into(),
            text(&config_file(run_dir))?,
        ],
    ))
}

/// Starts `spec` detached: refuses a clone that is already running, writes the config file,
/// removes a stale socket (Firecracker refuses to start over one), and runs Firecracker with its
/// serial console (its stdout) in `serial.log` and its own log (stderr) in `firecracker.log`.
pub fn start(spec: &VmSpec) -> Result<i32> {
    let marker = text(&api_socket(&spec.run_dir))?;
    if let VmState::Running(pid) = daemon::state(&pidfile(&spec.run_dir), &marker) {
        return Err(VmError::AlreadyRunning {
            name: spec.name.clone(),
            pid,
        });
    }
    let json = config_json(&config(spec)?)?;
    let invocation = command_line(&spec.run_dir)?;
    let file = config_file(&spec.run_dir);
    std::fs::write(&file, json).map_err(io(format!("writing {}", file.display())))?;
    for stale in [api_socket(&spec.run_dir), pidfile(&spec.run_dir)] {
        let _ = std::fs::remove_file(stale);
    }
    daemon::spawn(
        &invocation,
        &spec.serial_log(),
        &spec.run_dir.join("firecracker.log"),
        &pidfile(&spec.run_dir),
        &super::spec::command_log(&spec.run_dir),
    )
}

/// The API request that asks the guest to shut down: `PUT /actions` with
/// `{"action_type": "SendCtrlAltDel"}` (the schema's `InstanceActionInfo`), sent with curl over
/// the API socket.
pub fn ctrl_alt_del(run_dir: &Path) -> Invocation {
    Invocation::new(
        "curl",
        vec![
            "--silent".into(),
            "--fail".into(),
            "--unix-socket".into(),
            api_socket(run_dir).to_string_lossy().into_owned(),
            "-X".into(),
            "PUT".into(),
            "http://localhost/actions".into(),
            "-H".into(),
            "Content-Type: application/json".into(),
            "-d".into(),
            r#"{"action_type":"SendCtrlAltDel"}"#.into(),
        ],
    )
}

/// Stops the clone's Firecracker: Ctrl+Alt+Del through the API, waiting up to `timeout`; then
/// SIGKILL (Firecracker has no other shutdown request).
pub fn stop(run_dir: &Path, runner: &dyn CommandRunner, timeout: Duration) -> Result<Stopped> {
    daemon::stop(
        &pidfile(run_dir),
        &api_socket(run_dir).to_string_lossy(),
        &ctrl_alt_del(run_dir),
        None,
        runner,
        &super::spec::command_log(run_dir),
        timeout,
    )
}

#[cfg(test)]
mod tests {
    use serde_json::{json, Value};

    use super::*;
    use crate::vm::spec::{DiskLayer, KernelBoot, PortForward};

    fn spec() -> VmSpec {
        VmSpec {
            name: "fc-1".into(),
            run_dir: "/h/clones/fc-1".into(),
            disks: vec![DiskLayer {
                path: "/h/clones/fc-1/disk.raw".into(),
                format: ImageFormat::Raw,
                read_only: false,
            }],
            memory: 256 << 20,
            cpus: 2,
            accel: Accel::Auto,
            ingress: vec![],
            egress: Egress::Deny,
            kernel: Some(KernelBoot {
                kernel: "/boot/vmlinux".into(),
                initrd: None,
                append: Some("console=ttyS0 reboot=k panic=1".into()),
            }),
            extra_drives: vec!["/h/clones/fc-1/seed.img".into()],
            extra_serial_logs: vec![],
            egress_relay: None,
        }
    }

    fn built() -> Value {
        serde_json::from_str(&config_json(&config(&spec()).unwrap()).unwrap()).unwrap()
    }

    /// The config file, key by key, as the schema names them.
    #[test]
    fn the_config_uses_the_schemas_names() {
        assert_eq!(
            built(),
            json!({
                "boot-source": {
                    "kernel_image_path": "/boot/vmlinux",
                    "boot_args": "console=ttyS0 reboot=k panic=1"
                },
                "drives": [
                    {"drive_id": "rootfs", "is_root_device": true,
                     "path_on_host": "/h/clones/fc-1/disk.raw", "is_read_only": false},
                    {"drive_id": "extra0", "is_root_device": false,
                     "path_on_host": "/h/clones/fc-1/seed.img", "is_read_only": true}
                ],
                "machine-config": {"vcpu_count": 2, "mem_size_mib": 256},
                "network-interfaces": []
            })
        );
        assert_eq!(
            command_line(Path::new("/h/clones/fc-1"))
                .unwrap()
                .shell_line(),
            "firecracker --api-sock /h/clones/fc-1/firecracker.sock \
             --config-file /h/clones/fc-1/firecracker.json"
        );
    }

    /// Removes `key` from the object at `path` of the built config and asserts that the result
    /// no longer parses as the schema's types.
    fn without(path: &[&str], key: &str) {
        let mut value = built();
        let mut object = &mut value;
        for step in path {
            object = match step.parse::<usize>() {
                Ok(i) => &mut object[i],
                Err(_) => &mut object[*step],
            };
        }
        let removed = object.as_object_mut().unwrap().remove(key);
        assert!(removed.is_some(), "{key} was not in the built config");
        let parsed = serde_json::from_value::<VmConfig>(value);
        assert!(parsed.is_err(), "parsed without required {path:?}.{key}");
    }

    #[test]
    fn boot_source_requires_kernel_image_path() {
        without(&["boot-source"], "kernel_image_path");
    }

    #[test]
    fn drive_requires_drive_id() {
        without(&["drives", "0"], "drive_id");
    }

    #[test]
    fn drive_requires_is_root_device() {
        without(&["drives", "0"], "is_root_device");
    }

    #[test]
    fn virtio_block_drive_requires_path_on_host() {
        without(&["drives", "0"], "path_on_host");
    }

    #[test]
    fn virtio_block_drive_requires_is_read_only() {
        without(&["drives", "0"], "is_read_only");
    }

    #[test]
    fn machine_config_requires_vcpu_count() {
        without(&["machine-config"], "vcpu_count");
    }

    #[test]
    fn machine_config_requires_mem_size_mib() {
        without(&["machine-config"], "mem_size_mib");
    }

    #[test]
    fn the_config_file_requires_boot_source_and_drives() {
        without(&[], "boot-source");
        without(&[], "drives");
    }

    #[test]
    fn network_interface_requires_iface_id_and_host_dev_name() {
        let nic = json!({"iface_id": "eth0", "host_dev_name": "tap0"});
        serde_json::from_value::<NetworkInterface>(nic.clone()).unwrap();
        for key in ["iface_id", "host_dev_name"] {
            let mut partial = nic.clone();
            partial.as_object_mut().unwrap().remove(key);
            assert!(
                serde_json::from_value::<NetworkInterface>(partial).is_err(),
                "{key}"
            );
        }
    }

    #[test]
    fn unknown_fields_and_wrong_types_are_rejected() {
        let mut value = built();
        value["machine-config"]["vcpus"] = json!(2);
        assert!(serde_json::from_value::<VmConfig>(value).is_err());
        let mut value = built();
        value["drives"][0]["is_read_only"] = json!("no");
        assert!(serde_json::from_value::<VmConfig>(value).is_err());
        let mut value = built();
        value["serial"] = json!({});
        assert!(serde_json::from_value::<VmConfig>(value).is_err());
    }

    #[test]
    fn vcpu_counts_follow_the_schema() {
        for (cpus, ok) in [(1, true), (2, true), (3, false), (32, true), (34, false)] {
            let mut s = spec();
            s.cpus = cpus;
            assert_eq!(config(&s).is_ok(), ok, "{cpus}");
        }
    }

    #[test]
    fn overlays_and_what_firecracker_cannot_do_are_refused() {
        let refused = |s: &VmSpec, needle: &str| {
            let err = config(s).unwrap_err().to_string();
            assert!(err.contains(needle), "{err}");
        };
        let mut s = spec();
        s.disks = vec![
            DiskLayer {
                path: "/h/clones/fc-1/disk.qcow2".into(),
                format: ImageFormat::Qcow2,
                read_only: false,
            },
            DiskLayer {
                path: "/srv/base.raw".into(),
                format: ImageFormat::Raw,
                read_only: true,
            },
        ];
        refused(&s, "--method reflink");
        refused(&s, "convert -O raw");
        s.disks.truncate(1);
        refused(&s, "--method reflink");
        let mut s = spec();
        s.kernel = None;
        refused(&s, "--kernel");
        let mut s = spec();
        s.ingress.push(PortForward {
            host: 2222,
            guest: 22,
        });
        refused(&s, "TAP");
        let mut s = spec();
        s.accel = Accel::Tcg;
        refused(&s, "KVM");
    }

    #[test]
    fn stop_sends_ctrl_alt_del_through_the_api_socket() {
        assert_eq!(
            ctrl_alt_del(Path::new("/h/clones/fc-1")).shell_line(),
            "curl --silent --fail --unix-socket /h/clones/fc-1/firecracker.sock -X PUT \
             http://localhost/actions -H 'Content-Type: application/json' \
             -d '{\"action_type\":\"SendCtrlAltDel\"}'"
        );
    }
}
