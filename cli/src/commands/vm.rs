//! `cowclone start | stop | status | provision`: run registered clones as VMs through the
//! hypervisors' own tools (qemu-system by default; libvirt's virsh; VirtualBox's VBoxManage).
//! `--dry-run` prints the exact command lines (and libvirt's domain XML) without running them.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use cloner::vm::limits::{self, Limits};
use cloner::vm::provision::{provision, resolve_accel, ProvisionRequest};
use cloner::vm::qemu::{self, Stopped, VmState};
use cloner::vm::runner::{CommandRunner, Invocation, SystemRunner};
use cloner::vm::spec::command_log;
use cloner::vm::{
    cloud_hypervisor, firecracker, libvirt, vbox, Accel, Egress, KernelBoot, PortForward, VmSpec,
};
use serde_json::json;

use crate::args::{OutputArg, OutputFormat};
use crate::commands::registry::open_registry;
use crate::output::write_qemu_json;

/// VM subcommands (flattened into the top level).
#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Start clone NAME as a VM (daemonized; pidfile, QMP socket, serial log in its directory).
    Start(StartArgs),
    /// Stop clone NAME's VM: ACPI powerdown, then quit after a timeout.
    Stop(StopArgs),
    /// Show whether clone NAME's VM runs.
    Status(StatusArgs),
    /// Run SCRIPT in a fresh clone of the base its `/* rexxjs-vm-base: NAME */` line names and
    /// return its output and exit status.
    Provision(ProvisionArgs),
    /// Relay stdin/stdout to HOST:PORT (what qemu runs per guest connection for --egress allow).
    #[command(hide = true)]
    Relay(RelayArgs),
}

/// `cowclone relay HOST PORT` (internal).
#[derive(Debug, Args)]
pub struct RelayArgs {
    /// The allowed endpoint's host.
    host: String,
    /// Its TCP port.
    port: u16,
}

/// The program qemu runs per guest connection for `--egress allow`: this binary.
fn relay_program() -> Result<PathBuf> {
    std::env::current_exe().context("locating the cowclone binary (the egress relay)")
}

/// Relays one guest connection. stdout and stderr are the guest's socket, so nothing is printed:
/// a failure only closes the connection (exit status 1).
fn run_relay(args: RelayArgs) -> u8 {
    let stdout = std::io::stdout();
    match cloner::vm::relay::relay(&args.host, args.port, std::io::stdin(), stdout.lock()) {
        Ok(()) => 0,
        Err(_) => 1,
    }
}

/// Which hypervisor tool runs the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Driver {
    /// qemu-system-x86_64.
    Qemu,
    /// libvirt's virsh (domain XML with the full backingStore chain).
    Libvirt,
    /// VirtualBox's VBoxManage (VDI clones).
    Virtualbox,
    /// cloud-hypervisor (raw or qcow2 clones; KVM; --kernel or --firmware).
    CloudHypervisor,
    /// Firecracker (one raw image: a reflink or flattened clone; KVM; --kernel).
    Firecracker,
}

/// Options shared by the commands that name a clone.
#[derive(Debug, Args)]
pub struct Target {
    /// The registered clone.
    pub name: String,
    /// Registry home directory (default: $COWCLONE_HOME, else $XDG_DATA_HOME/cowclone).
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Hypervisor tool.
    #[arg(long, value_enum, default_value_t = Driver::Qemu)]
    pub driver: Driver,
    /// libvirt connection URI (e.g. qemu+ssh://host/system).
    #[arg(long, value_name = "URI")]
    pub connect: Option<String>,
    /// Print the command lines instead of running them.
    #[arg(long)]
    pub dry_run: bool,
}

/// Direct kernel boot options.
#[derive(Debug, Args)]
pub struct KernelArgs {
    /// Boot this kernel directly (for disks without a boot loader).
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ram disk (with --kernel).
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line (with --kernel).
    #[arg(long, value_name = "TEXT", requires = "kernel")]
    pub append: Option<String>,
}

impl KernelArgs {
    /// The boot options with absolute paths (qemu runs as a daemon from `/`).
    fn boot(&self) -> Result<Option<KernelBoot>> {
        let absolute =
            |p: &PathBuf| std::fs::canonicalize(p).with_context(|| format!("{}", p.display()));
        let Some(kernel) = &self.kernel else {
            return Ok(None);
        };
        Ok(Some(KernelBoot {
            kernel: absolute(kernel)?,
            initrd: self.initrd.as_ref().map(absolute).transpose()?,
            append: self.append.clone(),
        }))
    }
}

/// `cowclone start NAME [...]`
#[derive(Debug, Args)]
pub struct StartArgs {
    #[command(flatten)]
    target: Target,
    /// Guest memory (default: the base's, else 512M).
    #[arg(long, value_name = "SIZE")]
    memory: Option<String>,
    /// Guest CPUs (default: the base's, else 1).
    #[arg(long, value_name = "N")]
    cpus: Option<u32>,
    /// Acceleration: auto uses KVM only if a probe guest proves alive under it.
    #[arg(long, value_name = "auto|kvm|tcg", default_value = "auto")]
    accel: String,
    /// Forward host port HOST (on 127.0.0.1) to guest port GUEST (repeatable).
    #[arg(long, value_name = "HOST:GUEST")]
    ingress: Vec<String>,
    /// What the guest may reach: deny (default) or allow:HOST:PORT,...
    #[arg(long, value_name = "POLICY", default_value = "deny")]
    egress: String,
    #[command(flatten)]
    kernel: KernelArgs,
    /// Boot this firmware instead of a kernel (--driver cloud-hypervisor only).
    #[arg(long, value_name = "FILE", conflicts_with = "kernel")]
    firmware: Option<PathBuf>,
}

/// `cowclone stop NAME [...]`
#[derive(Debug, Args)]
pub struct StopArgs {
    #[command(flatten)]
    target: Target,
    /// Seconds to wait for the guest to power down before quitting qemu.
    #[arg(long, value_name = "SECONDS", default_value_t = 30)]
    timeout: u64,
}

/// `cowclone status NAME [--output json]`
#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The registered clone.
    name: String,
    /// Registry home directory (default: $COWCLONE_HOME, else $XDG_DATA_HOME/cowclone).
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Output format.
    #[command(flatten)]
    output: OutputArg,
}

/// `cowclone provision SCRIPT [--keep-running] [...]`
#[derive(Debug, Args)]
pub struct ProvisionArgs {
    /// The script; its `/* rexxjs-vm-KEY: VALUE */` lines give base, memory, cpus, ports, timeout.
    script: PathBuf,
    /// Leave the VM running after the script finished.
    #[arg(long)]
    keep_running: bool,
    /// Name of the clone to make (default: BASE-run-XXXXXXXX).
    #[arg(long, value_name = "NAME")]
    name: Option<String>,
    /// Registry home directory (default: $COWCLONE_HOME, else $XDG_DATA_HOME/cowclone).
    #[arg(long, value_name = "DIR")]
    home: Option<PathBuf>,
    /// Acceleration: auto uses KVM only if a probe guest proves alive under it.
    #[arg(long, value_name = "auto|kvm|tcg", default_value = "auto")]
    accel: String,
    #[command(flatten)]
    kernel: KernelArgs,
    /// Output format: human prints the script's output and exits with its status; json prints
    /// the whole outcome (and still exits with the script's status).
    #[command(flatten)]
    output: OutputArg,
    /// After the script exited 0 and the VM stopped, take internal snapshot NAME of the clone,
    /// so that state can be returned to (`cowclone snapshot -a NAME`). Not with --keep-running.
    #[arg(long, value_name = "NAME", conflicts_with = "keep_running")]
    snapshot: Option<String>,
}

fn spec_for(target: &Target) -> Result<VmSpec> {
    let registry = open_registry(target.home.as_deref())?;
    let record = registry.clone_record(&target.name)?;
    Ok(VmSpec::from_clone(&record)?)
}

/// Runs a VM subcommand; returns the exit code.
pub fn run(command: VmCommand, out: &mut impl Write) -> Result<u8> {
    match command {
        VmCommand::Start(args) => start(args, out).map(|()| 0),
        VmCommand::Stop(args) => stop(args, out).map(|()| 0),
        VmCommand::Status(args) => status(args, out).map(|()| 0),
        VmCommand::Provision(args) => run_provision(args, out),
        VmCommand::Relay(args) => Ok(run_relay(args)),
    }
}

/// Runs `steps` for real (logging each to the clone's commands.log) or prints them.
fn execute(steps: &[Invocation], spec: &VmSpec, dry_run: bool, out: &mut impl Write) -> Result<()> {
    if dry_run {
        for step in steps {
            writeln!(out, "{}", step.shell_line())?;
        }
        return Ok(());
    }
    let runner = SystemRunner::logging_to(command_log(&spec.run_dir));
    for step in steps {
        runner.run(step)?;
    }
    Ok(())
}

fn start(args: StartArgs, out: &mut impl Write) -> Result<()> {
    // A clone on a libvirt host runs there, through libvirt, whatever --driver says.
    let remote =
        crate::commands::host::remote_clone(args.target.home.as_deref(), &args.target.name)?;
    let mut spec = match &remote {
        Some((clone, run_dir)) => crate::commands::host::spec(clone, run_dir.clone())?,
        None => spec_for(&args.target)?,
    };
    if let Some(memory) = &args.memory {
        spec.memory = imagefmt::size::parse_size(memory)?;
    }
    if let Some(cpus) = args.cpus {
        if cpus == 0 {
            bail!("--cpus must be at least 1");
        }
        spec.cpus = cpus;
    }
    spec.ingress = args
        .ingress
        .iter()
        .map(|s| s.parse::<PortForward>())
        .collect::<Result<_, _>>()?;
    spec.egress = args.egress.parse::<Egress>()?;
    spec.egress_relay = Some(relay_program()?);
    spec.kernel = args.kernel.boot()?;
    // The operator's limits, before anything runs (a dry run is refused too).
    Limits::load()?.check(&limits::Request {
        memory: spec.memory,
        cpus: spec.cpus,
        run_time: None,
        egress: &spec.egress,
    })?;
    let requested: Accel = args.accel.parse()?;
    let dry_run = args.target.dry_run;
    if args.firmware.is_some() && args.target.driver != Driver::CloudHypervisor {
        bail!("--firmware is for --driver cloud-hypervisor");
    }
    if let Some((clone, _)) = &remote {
        let kvm = requested == Accel::Kvm;
        return crate::commands::host::start(clone, &spec, kvm, dry_run, out);
    }
    match args.target.driver {
        Driver::Qemu => {
            if dry_run {
                // Nothing runs, not even the KVM probe: for auto, the probe and both outcomes.
                if requested == Accel::Auto {
                    let probe = cloner::vm::accel::probe_invocation(qemu::QEMU, &spec.run_dir)?;
                    writeln!(
                        out,
                        "# --accel auto: KVM only if this probe guest writes K to its serial \
                         port within {} s",
                        cloner::vm::accel::PROBE_DEADLINE.as_secs()
                    )?;
                    writeln!(out, "{}", probe.shell_line())?;
                    writeln!(out, "# if it does:")?;
                    writeln!(
                        out,
                        "{}",
                        qemu::command_line(&spec, Accel::Kvm)?.shell_line()
                    )?;
                    writeln!(out, "# otherwise:")?;
                }
                let accel = if requested == Accel::Auto {
                    Accel::Tcg
                } else {
                    requested
                };
                writeln!(out, "{}", qemu::command_line(&spec, accel)?.shell_line())?;
                return Ok(());
            }
            let home = cloner::Home::resolve(args.target.home.as_deref())?;
            let accel = resolve_accel(requested, &spec.run_dir, &home)?;
            let runner = SystemRunner::logging_to(command_log(&spec.run_dir));
            qemu::start(&spec, accel, &runner)?;
            let VmState::Running(pid) = qemu::state(&spec.run_dir) else {
                bail!(
                    "qemu exited right after starting; see {}",
                    command_log(&spec.run_dir).display()
                );
            };
            writeln!(
                out,
                "{} running (pid {pid}, accel {}); serial log {}",
                spec.name,
                if accel == Accel::Kvm { "kvm" } else { "tcg" },
                spec.serial_log().display()
            )?;
        }
        Driver::Libvirt => {
            let kvm = requested == Accel::Kvm;
            let xml = libvirt::domain_xml(&spec, kvm)?;
            let xml_path = spec.run_dir.join("domain.xml");
            let virsh = libvirt::Virsh {
                connect: args.target.connect.clone(),
            };
            let path = xml_path.to_string_lossy();
            let steps = [virsh.define(&path), virsh.start(&spec.name)];
            if dry_run {
                write!(out, "{xml}")?;
            } else {
                std::fs::write(&xml_path, &xml)
                    .with_context(|| format!("writing {}", xml_path.display()))?;
            }
            execute(&steps, &spec, dry_run, out)?;
        }
        Driver::Virtualbox => {
            let steps = vbox::start_sequence(&spec)?;
            execute(&steps, &spec, dry_run, out)?;
        }
        Driver::CloudHypervisor => {
            spec.accel = requested;
            let payload = match &args.firmware {
                Some(firmware) => cloud_hypervisor::Payload::Firmware(
                    std::fs::canonicalize(firmware)
                        .with_context(|| format!("{}", firmware.display()))?,
                ),
                None => cloud_hypervisor::Payload::Kernel,
            };
            if dry_run {
                cloud_hypervisor::check_chain_headers(&spec)?;
                let line = cloud_hypervisor::command_line(&spec, &payload)?;
                writeln!(out, "{}", line.shell_line())?;
                return Ok(());
            }
            let pid = cloud_hypervisor::start(&spec, &payload)?;
            writeln!(
                out,
                "{} running under cloud-hypervisor (pid {pid}); serial log {}",
                spec.name,
                spec.serial_log().display()
            )?;
        }
        Driver::Firecracker => {
            spec.accel = requested;
            if dry_run {
                let config = firecracker::config(&spec)?;
                let file = firecracker::config_file(&spec.run_dir);
                writeln!(out, "# {}", file.display())?;
                write!(out, "{}", firecracker::config_json(&config)?)?;
                let line = firecracker::command_line(&spec.run_dir)?;
                writeln!(out, "{}", line.shell_line())?;
                return Ok(());
            }
            let pid = firecracker::start(&spec)?;
            writeln!(
                out,
                "{} running under Firecracker (pid {pid}); serial log {}",
                spec.name,
                spec.serial_log().display()
            )?;
        }
    }
    Ok(())
}

/// How a stop of `hypervisor` went, for people.
fn stopped_text(how: Stopped, hypervisor: &str) -> String {
    match how {
        Stopped::WasNotRunning => "was not running".into(),
        Stopped::PoweredDown => "powered down".into(),
        Stopped::Quit => format!("did not power down in time; {hypervisor} quit"),
        Stopped::Killed => format!("{hypervisor} did not answer; killed"),
    }
}

/// Stops libvirt domain `name` (ACPI shutdown; destroy if it still runs after `timeout`) and
/// undefines it; says how it went.
pub(crate) fn libvirt_stop(
    runner: &SystemRunner,
    virsh: &libvirt::Virsh,
    name: &str,
    timeout: Duration,
) -> Result<&'static str> {
    let domstate = || {
        runner
            .run(&virsh.domstate(name))
            .map(|s| s.trim().to_owned())
    };
    let how = if domstate()? == "running" {
        // A domain that stops between the check and the request makes shutdown fail; the
        // state is what counts.
        let _ = runner.run(&virsh.shutdown(name));
        let start = std::time::Instant::now();
        while domstate()? == "running" && start.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(250));
        }
        if domstate()? == "running" {
            runner.run(&virsh.destroy(name))?;
            "did not power down in time; destroyed"
        } else {
            "powered down"
        }
    } else {
        "was not running"
    };
    runner.run(&virsh.undefine(name))?;
    Ok(how)
}

fn stop(args: StopArgs, out: &mut impl Write) -> Result<()> {
    if let Some((clone, run_dir)) =
        crate::commands::host::remote_clone(args.target.home.as_deref(), &args.target.name)?
    {
        let spec = crate::commands::host::spec(&clone, run_dir)?;
        let timeout = Duration::from_secs(args.timeout);
        return crate::commands::host::stop(&clone, &spec, timeout, args.target.dry_run, out);
    }
    let spec = spec_for(&args.target)?;
    let dry_run = args.target.dry_run;
    match args.target.driver {
        Driver::Qemu => {
            if dry_run {
                writeln!(
                    out,
                    "# QMP {}: system_powerdown; after {} s: quit; then SIGKILL",
                    spec.qmp_socket().display(),
                    args.timeout
                )?;
                return Ok(());
            }
            let how = qemu::stop(&spec.run_dir, Duration::from_secs(args.timeout))?;
            writeln!(out, "{}: {}", spec.name, stopped_text(how, "qemu"))?;
        }
        Driver::Libvirt => {
            let virsh = libvirt::Virsh {
                connect: args.target.connect.clone(),
            };
            if dry_run {
                let steps = [
                    virsh.shutdown(&spec.name),
                    virsh.destroy(&spec.name),
                    virsh.undefine(&spec.name),
                ];
                writeln!(
                    out,
                    "# shutdown; destroy if still running after {} s; undefine",
                    args.timeout
                )?;
                return execute(&steps, &spec, true, out);
            }
            let runner = SystemRunner::logging_to(command_log(&spec.run_dir));
            let how = libvirt_stop(
                &runner,
                &virsh,
                &spec.name,
                Duration::from_secs(args.timeout),
            )?;
            writeln!(out, "{}: {how}; undefined", spec.name)?;
        }
        Driver::Virtualbox => execute(&vbox::stop_sequence(&spec), &spec, dry_run, out)?,
        Driver::CloudHypervisor | Driver::Firecracker => {
            let run_dir = &spec.run_dir;
            let timeout = Duration::from_secs(args.timeout);
            let cloud = args.target.driver == Driver::CloudHypervisor;
            if dry_run {
                let (graceful, forceful) = if cloud {
                    (
                        cloud_hypervisor::remote(run_dir, "power-button"),
                        Some(cloud_hypervisor::remote(run_dir, "shutdown-vmm")),
                    )
                } else {
                    (firecracker::ctrl_alt_del(run_dir), None)
                };
                writeln!(out, "{}", graceful.shell_line())?;
                writeln!(out, "# after {} s:", args.timeout)?;
                if let Some(forceful) = forceful {
                    writeln!(out, "{}", forceful.shell_line())?;
                    writeln!(out, "# after 5 s more:")?;
                }
                writeln!(out, "# SIGKILL")?;
                return Ok(());
            }
            let runner = SystemRunner::logging_to(command_log(run_dir));
            let (how, hypervisor) = if cloud {
                let how = cloud_hypervisor::stop(run_dir, &runner, timeout)?;
                (how, cloud_hypervisor::PROGRAM)
            } else {
                (
                    firecracker::stop(run_dir, &runner, timeout)?,
                    firecracker::PROGRAM,
                )
            };
            writeln!(out, "{}: {}", spec.name, stopped_text(how, hypervisor))?;
        }
    }
    Ok(())
}

fn status(args: StatusArgs, out: &mut impl Write) -> Result<()> {
    if let Some((clone, _)) = crate::commands::host::remote_clone(args.home.as_deref(), &args.name)?
    {
        return crate::commands::host::status(&clone, args.output.format, out);
    }
    let registry = open_registry(args.home.as_deref())?;
    let record = registry.clone_record(&args.name)?;
    let spec = VmSpec::from_clone(&record)?;
    let (state, pid) = match qemu::state(&spec.run_dir) {
        VmState::Running(pid) => ("running", Some(pid)),
        VmState::Stopped => ("stopped", None),
    };
    match args.output.format {
        OutputFormat::Json => write_qemu_json(
            out,
            &json!({
                "name": spec.name, "state": state, "pid": pid,
                "serial-log": spec.serial_log(), "qmp-socket": spec.qmp_socket(),
            }),
        )?,
        OutputFormat::Human => match pid {
            Some(pid) => writeln!(out, "{}: running (pid {pid})", spec.name)?,
            None => writeln!(out, "{}: stopped", spec.name)?,
        },
    }
    Ok(())
}

fn run_provision(args: ProvisionArgs, out: &mut impl Write) -> Result<u8> {
    let mut registry = open_registry(args.home.as_deref())?;
    let request = ProvisionRequest {
        script: args.script.clone(),
        clone_name: args.name.clone(),
        keep_running: args.keep_running,
        accel: args.accel.parse()?,
        kernel: args.kernel.boot()?,
        egress_relay: Some(relay_program()?),
        limits: Limits::load()?,
        snapshot: args.snapshot.clone(),
    };
    let outcome = provision(&mut registry, &request, None)
        .with_context(|| format!("provisioning {}", args.script.display()))?;
    match args.output.format {
        OutputFormat::Json => write_qemu_json(out, &outcome)?,
        OutputFormat::Human => write!(out, "{}", outcome.output)?,
    }
    Ok(u8::try_from(outcome.exit_status).unwrap_or(1))
}
