//! The VirtualBox driver: the `VBoxManage` command sequence that runs a VDI differencing clone.
//!
//! A VDI diff names its parent only by UUID, and VirtualBox resolves it among media it already
//! knows, so the parents are opened (registered) first, base upward, before the diff is
//! attached (FORMATS.md §2.3). VirtualBox cannot be installed on the build machine: the sequence
//! is verified with a recording runner against VirtualBox's documented behaviour
//! (docs/drivers/virtualbox.md).

use imagefmt::ImageFormat;

use super::runner::{CommandRunner, Invocation};
use super::spec::VmSpec;
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
    modify.extend(["--nic1".into(), "nat".into()]);
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
