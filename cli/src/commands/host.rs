//! libvirt hosts: `host add|ls|rm`, and the arms of `clone --host`, `start`, `stop`, `status`,
//! `rm` and `gc` for clones that live on a host (see `docs/remote-hosts.md`).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cloner::registry::hosts::{HostGc, RemoteClone};
use cloner::vm::libvirt;
use cloner::vm::runner::SystemRunner;
use cloner::vm::spec::{command_log, VmSpec};
use cloner::{CloneSpec, Registry};
use serde_json::json;

use crate::args::{OutputArg, OutputFormat};
use crate::commands::registry::open_registry;
use crate::output::write_qemu_json;

/// `cowclone host SUBCOMMAND`
#[derive(Debug, Args)]
pub struct HostArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: HostCommand,
    /// Registry home directory (default: $COWCLONE_HOME, else $XDG_DATA_HOME/cowclone).
    #[arg(long, value_name = "DIR", global = true)]
    pub home: Option<PathBuf>,
}

/// Host subcommands.
#[derive(Debug, Subcommand)]
pub enum HostCommand {
    /// Register a libvirt host: it must answer; a missing pool is created as a directory pool.
    Add(AddArgs),
    /// List the hosts, their replicas and clones.
    Ls(LsArgs),
    /// Unregister a host (refused while clones live there); deletes its replica volumes.
    Rm(RmArgs),
}

/// `cowclone host add NAME --connect URI [--pool POOL] [--pool-dir DIR]`
#[derive(Debug, Args)]
pub struct AddArgs {
    /// The host's name in the registry.
    pub name: String,
    /// libvirt URI (qemu+ssh://user@host/system, qemu+tcp://host/system, qemu:///system, …).
    #[arg(long, value_name = "URI")]
    pub connect: String,
    /// Storage pool for cowclone's volumes there.
    #[arg(long, value_name = "POOL", default_value = cloner::registry::hosts::DEFAULT_POOL)]
    pub pool: String,
    /// Directory of the pool if it must be created (a path on the host; default
    /// /var/lib/libvirt/images/POOL).
    #[arg(long, value_name = "DIR")]
    pub pool_dir: Option<PathBuf>,
}

/// `cowclone host ls [--output json]`
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
}

/// `cowclone host rm NAME`
#[derive(Debug, Args)]
pub struct RmArgs {
    /// The host.
    pub name: String,
}

/// Runs a host subcommand.
pub fn run(args: HostArgs, out: &mut impl Write) -> Result<u8> {
    let mut registry = open_registry(args.home.as_deref())?;
    match args.command {
        HostCommand::Add(a) => {
            let host = registry
                .add_host(&a.name, &a.connect, Some(&a.pool), a.pool_dir.as_deref())
                .with_context(|| format!("adding host {}", a.name))?;
            writeln!(
                out,
                "host {} at {}: pool {} ({})",
                host.name,
                host.uri,
                host.pool,
                host.pool_dir.display()
            )?;
        }
        HostCommand::Ls(a) => {
            let hosts = registry.hosts()?;
            match a.output.format {
                OutputFormat::Json => {
                    write_qemu_json(out, &hosts)?;
                }
                OutputFormat::Human => {
                    for host in &hosts {
                        writeln!(
                            out,
                            "{}  {}  pool {} ({})  {} replica(s), {} clone(s)",
                            host.name,
                            host.uri,
                            host.pool,
                            host.pool_dir.display(),
                            host.replicas.len(),
                            host.clones.len()
                        )?;
                        for replica in &host.replicas {
                            writeln!(
                                out,
                                "  base {} -> {} (sha256 {})",
                                replica.base,
                                replica.path.display(),
                                replica.sha256
                            )?;
                        }
                        for clone in &host.clones {
                            writeln!(out, "  clone {clone}")?;
                        }
                    }
                }
            }
        }
        HostCommand::Rm(a) => {
            let host = registry
                .remove_host(&a.name)
                .with_context(|| format!("removing host {}", a.name))?;
            writeln!(
                out,
                "removed host {} ({} replica volume(s) deleted)",
                host.name,
                host.replicas.len()
            )?;
        }
    }
    Ok(0)
}

/// `clone BASE NAME --host H [--count N]`.
pub fn clone_on_host(
    registry: &mut Registry,
    spec: &CloneSpec,
    host: &str,
    output: OutputFormat,
    out: &mut impl Write,
) -> Result<()> {
    if spec.dir.is_some() || spec.format.is_some() || spec.method != cloner::CloneMethod::Overlay {
        bail!("--host makes qcow2 overlays in the host's pool: --dir, --format and --method do not apply");
    }
    let clones = registry
        .clone_remote(spec, host)
        .with_context(|| format!("cloning {} on host {host}", spec.source))?;
    match output {
        OutputFormat::Json => write_qemu_json(
            out,
            &json!({ "source": spec.source, "host": host, "clones": clones }),
        )?,
        OutputFormat::Human => {
            for clone in &clones {
                writeln!(
                    out,
                    "cloned {} -> {} on host {}: {} (backing {})",
                    spec.source,
                    clone.name,
                    host,
                    clone.path.display(),
                    clone.base_path.display()
                )?;
            }
        }
    }
    Ok(())
}

/// The clones among `names` that live on hosts, removed (records, then volumes); the names
/// left are local clones.
pub fn remove_remote(
    registry: &mut Registry,
    names: &[String],
    out: &mut impl Write,
) -> Result<Vec<String>> {
    let mut remote = Vec::new();
    let mut local = Vec::new();
    for name in names {
        match registry.remote_clone(name)? {
            Some(_) => remote.push(name.clone()),
            None => local.push(name.clone()),
        }
    }
    if !remote.is_empty() {
        for clone in registry.remove_remote_clones(&remote)? {
            writeln!(
                out,
                "removed {} (volume {} on host {})",
                clone.name, clone.volume, clone.host
            )?;
        }
    }
    Ok(local)
}

/// `gc` on every host; prints the human report.
pub fn gc_hosts(registry: &mut Registry, dry_run: bool) -> Result<Vec<HostGc>> {
    Ok(registry.gc_hosts(dry_run)?)
}

/// Prints what [`gc_hosts`] found, for people.
pub fn print_gc_hosts(reports: &[HostGc], dry_run: bool, out: &mut impl Write) -> Result<()> {
    let verb = if dry_run { "would remove" } else { "removed" };
    for report in reports {
        if let Some(why) = &report.unreachable {
            writeln!(
                out,
                "host {}: not reconciled, nothing changed there: {why}",
                report.host
            )?;
            continue;
        }
        for volume in &report.removed_volumes {
            writeln!(
                out,
                "host {}: {verb} volume {volume} (no record claims it)",
                report.host
            )?;
        }
        for volume in &report.dropped_pending {
            writeln!(
                out,
                "host {}: {verb} the record of {volume} (left pending by a process that died)",
                report.host
            )?;
        }
        for volume in &report.missing_volumes {
            writeln!(out, "host {}: missing volume {volume}", report.host)?;
        }
    }
    Ok(())
}

/// The remote clone `name` in the registry of `home`, if it is one.
pub fn remote_clone(home: Option<&Path>, name: &str) -> Result<Option<(RemoteClone, PathBuf)>> {
    let registry = open_registry(home)?;
    let Some(clone) = registry.remote_clone(name)? else {
        return Ok(None);
    };
    let run_dir = registry.home().root().join("hosts").join(name);
    Ok(Some((clone, run_dir)))
}

/// The VM spec of a remote clone (its local run directory is made).
pub fn spec(clone: &RemoteClone, run_dir: PathBuf) -> Result<VmSpec> {
    std::fs::create_dir_all(&run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    Ok(VmSpec::from_clone(&clone.clone_record(run_dir))?)
}

/// `start` of a remote clone: the domain (explicit disk chain, serial console into the pool)
/// is defined and started on its host.
pub fn start(
    clone: &RemoteClone,
    spec: &VmSpec,
    kvm: bool,
    dry_run: bool,
    out: &mut impl Write,
) -> Result<()> {
    let xml = libvirt::domain_xml_with_serial(spec, kvm, &clone.serial_log)?;
    let xml_path = spec.run_dir.join("domain.xml");
    let virsh = clone.pool().domains();
    let steps = [
        virsh.define(&xml_path.to_string_lossy()),
        virsh.start(&spec.name),
    ];
    if dry_run {
        write!(out, "{xml}")?;
        for step in &steps {
            writeln!(out, "{}", step.shell_line())?;
        }
        return Ok(());
    }
    clone.pool().check_answers()?;
    std::fs::write(&xml_path, &xml).with_context(|| format!("writing {}", xml_path.display()))?;
    let runner = SystemRunner::logging_to(command_log(&spec.run_dir));
    for step in &steps {
        cloner::vm::runner::CommandRunner::run(&runner, step)?;
    }
    writeln!(
        out,
        "{} running on host {}; serial log {} (on the host)",
        clone.name,
        clone.host,
        clone.serial_log.display()
    )?;
    Ok(())
}

/// `stop` of a remote clone, through libvirt on its host.
pub fn stop(
    clone: &RemoteClone,
    spec: &VmSpec,
    timeout: Duration,
    dry_run: bool,
    out: &mut impl Write,
) -> Result<()> {
    let virsh = clone.pool().domains();
    if dry_run {
        writeln!(
            out,
            "# shutdown; destroy if still running after {} s; undefine",
            timeout.as_secs()
        )?;
        for step in [
            virsh.shutdown(&spec.name),
            virsh.destroy(&spec.name),
            virsh.undefine(&spec.name),
        ] {
            writeln!(out, "{}", step.shell_line())?;
        }
        return Ok(());
    }
    clone.pool().check_answers()?;
    let runner = SystemRunner::logging_to(command_log(&spec.run_dir));
    let how = crate::commands::vm::libvirt_stop(&runner, &virsh, &spec.name, timeout)?;
    writeln!(out, "{}: {how}; undefined (host {})", spec.name, clone.host)?;
    Ok(())
}

/// `status` of a remote clone: the domain's state on its host.
pub fn status(clone: &RemoteClone, output: OutputFormat, out: &mut impl Write) -> Result<()> {
    let pool = clone.pool();
    pool.check_answers()?;
    let state = match pool.domain_state(&clone.name)? {
        Some(state) if state == "running" => "running".to_owned(),
        Some(state) => state,
        None => "stopped".to_owned(),
    };
    match output {
        OutputFormat::Json => write_qemu_json(
            out,
            &json!({
                "name": clone.name, "state": state, "host": clone.host, "uri": clone.uri,
                "serial_log": clone.serial_log,
            }),
        )?,
        OutputFormat::Human => writeln!(
            out,
            "{}: {state} on host {} ({})",
            clone.name, clone.host, clone.uri
        )?,
    }
    Ok(())
}
