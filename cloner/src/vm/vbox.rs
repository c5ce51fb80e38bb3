//! The VirtualBox driver: the `VBoxManage` command sequence that runs a VDI differencing clone.
//!
//! A VDI diff names its parent only by UUID, and VirtualBox resolves it among media it already
//! knows, so the parents are opened (registered) first, base upward, before the diff is
//! attached (FORMATS.md §2.3). VirtualBox cannot be installed on the build machine: the sequence
//! is verified with a recording runner against VirtualBox's documented behaviour
//! (docs/drivers/virtualbox.md).

use imagefmt::ImageFormat;

use super::runner::{CommandRunner, Invocation};
use super::spec::{Egress, VmSpec};
use super::{Result, VmError};

/// The storage controller the clone's disk is attached to.
pub const CONTROLLER: &str = "SATA";

fn vbox(args: &[&str]) -> Invocation {
    Invocation::new("VBoxManage", args.iter().map(|s| s.to_string()).collect())
}

fn path(spec_path: &std::path::Path) -> String {
    spec_path.to_string_lossy().into_owned()
}

/// The commands that register the chain's parents, create the VM, attach the clone's diff, set
/// memory, CPUs and NAT port forwards, and start it headless.
pub fn start_sequence(spec: &VmSpec) -> Result<Vec<Invocation>> {
    if let Some(layer) = spec.disks.iter().find(|l| l.format != ImageFormat::Vdi) {
        return Err(VmError::Invalid(format!(
            "{} is {}: the VirtualBox driver runs VDI chains (clone with --format vdi)",
            layer.path.display(),
            layer.format.name()
        )));
    }
    let name = spec.name.as_str();
    let mut steps = Vec::new();
    // Parents first, base upward: each open registers the medium so the next diff's linkage
    // UUID resolves.
    for layer in spec.disks.iter().skip(1).rev() {
        steps.push(vbox(&["showmediuminfo", "disk", &path(&layer.path)]));
    }
    let folder = path(&spec.run_dir);
    steps.push(vbox(&[
        "createvm",
        "--name",
        name,
        "--ostype",
        "Linux_64",
        "--basefolder",
        &folder,
        "--register",
    ]));
    steps.push(vbox(&[
        "storagectl",
        name,
        "--name",
        CONTROLLER,
        "--add",
        "sata",
        "--controller",
        "IntelAhci",
        "--portcount",
        "1",
    ]));
    let top = path(&spec.disks[0].path);
    steps.push(vbox(&[
        "storageattach",
        name,
        "--storagectl",
        CONTROLLER,
        "--port",
        "0",
        "--device",
        "0",
        "--type",
        "hdd",
        "--medium",
        &top,
    ]));
    let memory = spec.memory.div_ceil(1 << 20).to_string();
    let cpus = spec.cpus.to_string();
    let mut modify: Vec<String> = ["modifyvm", name, "--memory", &memory, "--cpus", &cpus]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if let Egress::Allow(_) = spec.egress {
        return Err(VmError::Invalid(
            "VirtualBox's NAT cannot limit the guest to chosen destinations: --egress allow \
             needs --driver qemu"
                .into(),
        ));
    }
    // No NIC at all unless a port forward needs NAT (which VirtualBox cannot stop from also
    // reaching outside: see docs/drivers/virtualbox.md).
    let nic = if spec.ingress.is_empty() {
        "none"
    } else {
        "nat"
    };
    modify.extend(["--nic1".into(), nic.into()]);
    for (k, forward) in spec.ingress.iter().enumerate() {
        modify.push("--natpf1".into());
        modify.push(format!(
            "cowclone{k},tcp,127.0.0.1,{},,{}",
            forward.host, forward.guest
        ));
    }
    steps.push(Invocation::new("VBoxManage", modify));
    steps.push(vbox(&["startvm", name, "--type", "headless"]));
    Ok(steps)
}

/// The commands that stop the VM (hard power-off) and unregister it, keeping its disks.
pub fn stop_sequence(spec: &VmSpec) -> Vec<Invocation> {
    let name = spec.name.as_str();
    vec![
        vbox(&["controlvm", name, "poweroff"]),
        vbox(&["unregistervm", name]),
    ]
}

/// Runs `steps` in order with `runner`, stopping at the first failure.
pub fn run_sequence(steps: &[Invocation], runner: &dyn CommandRunner) -> Result<()> {
    for step in steps {
        runner.run(step)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::vm::runner::RecordingRunner;
    use crate::vm::spec::{Accel, DiskLayer, Egress, PortForward};

    fn vdi(path: &str, read_only: bool) -> DiskLayer {
        DiskLayer {
            path: PathBuf::from(path),
            format: ImageFormat::Vdi,
            read_only,
        }
    }

    fn spec() -> VmSpec {
        VmSpec {
            name: "win-1".into(),
            run_dir: "/h/clones/win-1".into(),
            disks: vec![
                vdi("/h/clones/win-1/disk.vdi", false),
                vdi("/h/clones/mid/disk.vdi", true),
                vdi("/srv/base.vdi", true),
            ],
            memory: 2 << 30,
            cpus: 2,
            accel: Accel::Auto,
            ingress: vec![PortForward {
                host: 2222,
                guest: 22,
            }],
            egress: Egress::Deny,
            kernel: None,
            extra_drives: vec![],
            extra_serial_logs: vec![],
            egress_relay: None,
        }
    }

    /// VirtualBox resolves a diff's parent among registered media: every parent must be opened
    /// (base first) before the diff is attached, and the VM must exist before storagectl.
    #[test]
    fn parents_are_registered_base_first_before_the_diff_is_attached() {
        let runner = RecordingRunner::default();
        run_sequence(&start_sequence(&spec()).unwrap(), &runner).unwrap();
        let lines: Vec<String> = runner.calls().iter().map(|c| c.shell_line()).collect();
        assert_eq!(
            lines,
            [
                "VBoxManage showmediuminfo disk /srv/base.vdi",
                "VBoxManage showmediuminfo disk /h/clones/mid/disk.vdi",
                "VBoxManage createvm --name win-1 --ostype Linux_64 --basefolder /h/clones/win-1 --register",
                "VBoxManage storagectl win-1 --name SATA --add sata --controller IntelAhci --portcount 1",
                "VBoxManage storageattach win-1 --storagectl SATA --port 0 --device 0 --type hdd --medium /h/clones/win-1/disk.vdi",
                "VBoxManage modifyvm win-1 --memory 2048 --cpus 2 --nic1 nat --natpf1 cowclone0,tcp,127.0.0.1,2222,,22",
                "VBoxManage startvm win-1 --type headless",
            ]
        );
        let stop: Vec<String> = stop_sequence(&spec())
            .iter()
            .map(|c| c.shell_line())
            .collect();
        assert_eq!(
            stop,
            [
                "VBoxManage controlvm win-1 poweroff",
                "VBoxManage unregistervm win-1"
            ]
        );
    }

    #[test]
    fn no_ingress_means_no_nic_and_egress_destinations_are_refused() {
        let mut s = spec();
        s.ingress.clear();
        let steps = start_sequence(&s).unwrap();
        let modify = steps[steps.len() - 2].shell_line();
        assert_eq!(
            modify,
            "VBoxManage modifyvm win-1 --memory 2048 --cpus 2 --nic1 none"
        );
        s.egress = "allow:10.0.0.1:443".parse().unwrap();
        assert!(start_sequence(&s)
            .unwrap_err()
            .to_string()
            .contains("--driver qemu"));
    }

    #[test]
    fn qcow2_chains_are_refused() {
        let mut s = spec();
        s.disks[0].format = ImageFormat::Qcow2;
        assert!(start_sequence(&s)
            .unwrap_err()
            .to_string()
            .contains("--format vdi"));
    }
}
