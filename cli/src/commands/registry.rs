//! The registry commands: `base register|list|show|verify|rm`, `clone`, `promote`, `ls`, `rm`,
//! `gc`, `plan`, `log`. Each parses its arguments, opens the registry of `--home` (else
//! `$COWCLONE_HOME`, else the XDG data directory) and prints human text or JSON.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use cloner::runtime::StateProbe;
use cloner::{CloneSpec, Home, ImageRecord, Kind, RegisterBase, Registry};
use imagefmt::ImageFormat;
use serde_json::json;

use crate::args::{OutputArg, OutputFormat};
use crate::output::{human_size, write_qemu_json};

/// The registry's subcommands (flattened into the top-level command list).
#[derive(Debug, Subcommand)]
pub enum RegistryCommand {
    /// Manage golden base images: register, list, show, verify, rm.
    Base(BaseArgs),
    /// Clone a registered base (or clone) as NAME: a native overlay registered with its lineage.
    Clone(CloneArgs),
    /// Turn a clone into a base (read-only, fingerprinted, registered).
    Promote(PromoteArgs),
    /// List registered bases and clones.
    Ls(ListArgs),
    /// Remove clones (records and files).
    Rm(RmArgs),
    /// Reconcile files and records: remove what cowclone made that no record claims (orphaned
    /// clone directories, temporary files), report what it keeps and records whose file is gone.
    Gc(GcArgs),
    /// Print the provisioning plan in a script's `/* rexxjs-vm-KEY: VALUE */` lines.
    Plan(PlanArgs),
    /// Show the audit log of registry changes.
    Log(ListArgs),
}

/// `--home DIR`, shared by every registry command.
#[derive(Debug, Args)]
pub struct HomeArg {
    /// Registry home directory (default: $COWCLONE_HOME, else $XDG_DATA_HOME/cowclone).
    #[arg(long, value_name = "DIR", global = true)]
    pub home: Option<PathBuf>,
}

impl HomeArg {
    fn open(&self) -> Result<Registry> {
        open_registry(self.home.as_deref())
    }
}

/// Opens the registry in `home` (else `$COWCLONE_HOME`, else the XDG data directory).
pub(crate) fn open_registry(home: Option<&std::path::Path>) -> Result<Registry> {
    let home = Home::resolve(home)?;
    tracing::info!(home = %home.root().display(), "opening the registry");
    Registry::open(&home)
        .with_context(|| format!("opening the registry in {}", home.root().display()))
}

/// The registry guard of the plain-path commands that write images (commit, rebase, resize,
/// check -r): a registered base, or a clone that has clones, is refused whatever its file mode,
/// recognised by device and inode in the registry of the effective home (which is consulted only
/// if it exists; none is created).
#[derive(Debug, Args)]
pub struct WriteGuardArgs {
    /// Registry home whose registered images are protected (default: $COWCLONE_HOME, else
    /// $XDG_DATA_HOME/cowclone).
    #[arg(long, value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Write even a registered base or a clone that has clones (its clones then read different
    /// data). Warned about on stderr and recorded in the registry's audit log.
    #[arg(long)]
    pub force_registered_write: bool,
}

impl WriteGuardArgs {
    /// Refuses `operation` if it would write a protected image among `paths`; with
    /// `--force-registered-write`, warns on stderr instead (the registry logs it).
    pub fn check(&self, operation: &str, paths: &[PathBuf]) -> Result<()> {
        let home = Home::resolve(self.home.as_deref())?;
        let Some(mut registry) = Registry::open_existing(&home)
            .with_context(|| format!("opening the registry in {}", home.root().display()))?
        else {
            return Ok(());
        };
        let forced = registry.guard_writes(operation, paths, self.force_registered_write)?;
        for protection in forced {
            eprintln!(
                "cowclone: WARNING: --force-registered-write: {operation} writes {} ({}); \
                 its clones will read different data (recorded in the audit log of {})",
                protection.path.display(),
                protection.what(),
                home.root().display()
            );
        }
        Ok(())
    }

    /// Like [`WriteGuardArgs::check`] for `commit` of the overlay `file`: the overlay (emptied
    /// unless kept) and the backing file it writes into.
    pub fn check_commit(&self, file: &std::path::Path, keep: bool) -> Result<()> {
        let mut paths = Vec::new();
        if !keep {
            paths.push(file.to_owned());
        }
        // An image that cannot be read here fails in commit itself, with its own error.
        if let Ok((_, header)) = imagefmt::image::read_file_header(file) {
            if let Some(name) = header.backing_name() {
                if let Ok(backing) = imagefmt::backing::resolve(file, name) {
                    paths.push(backing);
                }
            }
        }
        self.check("commit", &paths)
    }
}

/// `cowclone base SUBCOMMAND`
#[derive(Debug, Args)]
pub struct BaseArgs {
    /// What to do.
    #[command(subcommand)]
    pub command: BaseCommand,
    #[command(flatten)]
    home: HomeArg,
}

/// Base subcommands.
#[derive(Debug, Subcommand)]
pub enum BaseCommand {
    /// Register DISK (qcow2, VDI or raw) as base NAME; makes the file read-only.
    Register(RegisterArgs),
    /// List the bases.
    List(ListArgs),
    /// Show one base.
    Show(NameArgs),
    /// Hash the base's whole file and check it against its fingerprint (exit 1 if modified).
    Verify(NameArgs),
    /// Unregister a base (refused while it has clones, unless --with-clones).
    Rm(BaseRmArgs),
}

/// `cowclone base register NAME DISK [--meta key=value]... [--memory SIZE] [--cpus N]`
#[derive(Debug, Args)]
pub struct RegisterArgs {
    /// The base's name.
    pub name: String,
    /// The disk image.
    pub disk: PathBuf,
    /// Free metadata (repeatable).
    #[arg(long, value_name = "KEY=VALUE")]
    pub meta: Vec<String>,
    /// Guest memory for clones (e.g. 2G).
    #[arg(long, value_name = "SIZE")]
    pub memory: Option<String>,
    /// Guest CPUs for clones.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub cpus: Option<u32>,
    /// The image's format (default: recognised by content; raw if unrecognised).
    #[arg(long, value_name = "FMT")]
    pub format: Option<String>,
    /// Accept an image that has a backing file of its own.
    #[arg(long)]
    pub allow_backing: bool,
    /// Also record a SHA-256 of the whole file.
    #[arg(long)]
    pub sha256: bool,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
}

/// A command with only an output format.
#[derive(Debug, Args)]
pub struct ListArgs {
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
    #[command(flatten)]
    home: HomeArg,
}

/// `cowclone gc [--dry-run] [--output json]`
#[derive(Debug, Args)]
pub struct GcArgs {
    /// Report what would be removed, and remove nothing.
    #[arg(long)]
    pub dry_run: bool,
    #[command(flatten)]
    list: ListArgs,
}

/// A command naming one record.
#[derive(Debug, Args)]
pub struct NameArgs {
    /// The name.
    pub name: String,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
}

/// `cowclone base rm NAME [--with-clones]`
#[derive(Debug, Args)]
pub struct BaseRmArgs {
    /// The base.
    pub name: String,
    /// Remove its clones (and their clones) too.
    #[arg(long)]
    pub with_clones: bool,
}

/// `cowclone clone BASE NAME [--count N] [--dir DIR] [--format qcow2|vdi]`
#[derive(Debug, Args)]
pub struct CloneArgs {
    /// The registered base or clone to clone.
    pub base: String,
    /// The clone's name (with --count: NAME-1 … NAME-N).
    pub name: String,
    /// Make N clones in one call.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
    /// Make the clones' directories in DIR (default: HOME/clones).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Clone format: qcow2 (default) or vdi (VDI differencing image; VDI bases only).
    #[arg(long, value_name = "FMT")]
    pub format: Option<String>,
    /// fsync each clone and its directory before registering.
    #[arg(long)]
    pub durable: bool,
    /// overlay (default): a qcow2/VDI overlay over the source; reflink: a full copy sharing the
    /// source's extents (btrfs, XFS; refused elsewhere); auto: reflink where possible.
    #[arg(long, value_name = "overlay|reflink|auto", default_value = "overlay")]
    pub method: cloner::CloneMethod,
    /// Make the clones on this registered libvirt host (`cowclone host add`): the base is
    /// uploaded there once, each overlay is made here and uploaded as a volume.
    #[arg(long, value_name = "HOST")]
    pub host: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
    #[command(flatten)]
    home: HomeArg,
}

/// `cowclone promote CLONE BASENAME`
#[derive(Debug, Args)]
pub struct PromoteArgs {
    /// The clone.
    pub clone: String,
    /// The new base's name.
    pub base: String,
    #[command(flatten)]
    home: HomeArg,
}

/// `cowclone rm NAME...`
#[derive(Debug, Args)]
pub struct RmArgs {
    /// The clones.
    #[arg(required = true)]
    pub names: Vec<String>,
    #[command(flatten)]
    home: HomeArg,
}

/// `cowclone plan SCRIPT`
#[derive(Debug, Args)]
pub struct PlanArgs {
    /// The script.
    pub script: PathBuf,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
}

/// Runs a registry command; returns the exit code.
pub fn run(command: RegistryCommand, out: &mut impl Write) -> Result<u8> {
    match command {
        RegistryCommand::Base(args) => base(args, out),
        RegistryCommand::Clone(args) => clone(args, out).map(|()| 0),
        RegistryCommand::Promote(args) => {
            let record = args.home.open()?.promote(&args.clone, &args.base)?;
            writeln!(out, "promoted {} to base {}", args.clone, record.name)?;
            Ok(0)
        }
        RegistryCommand::Ls(args) => {
            let records = args.home.open()?.list(None)?;
            print_records(out, &records, args.output.format, true)?;
            Ok(0)
        }
        RegistryCommand::Rm(args) => {
            let mut registry = args.home.open()?;
            let local = crate::commands::host::remove_remote(&mut registry, &args.names, out)?;
            if local.is_empty() {
                return Ok(0);
            }
            let removed = registry.remove_clones(&local)?;
            for record in removed {
                writeln!(out, "removed {} ({})", record.name, record.path.display())?;
            }
            Ok(0)
        }
        RegistryCommand::Gc(args) => gc(args, out).map(|()| 0),
        RegistryCommand::Plan(args) => plan(args, out).map(|()| 0),
        RegistryCommand::Log(args) => log(args, out).map(|()| 0),
    }
}

fn base(args: BaseArgs, out: &mut impl Write) -> Result<u8> {
    let mut registry = args.home.open()?;
    match args.command {
        BaseCommand::Register(a) => {
            let request = RegisterBase {
                meta: parse_meta(&a.meta)?,
                memory: a.memory.as_deref().map(parse_size).transpose()?,
                cpus: a.cpus,
                format: a.format.as_deref().map(str::parse).transpose()?,
                allow_backing: a.allow_backing,
                sha256: a.sha256,
                ..RegisterBase::new(&a.name, &a.disk)
            };
            let record = registry.register_base(&request)?;
            match a.output.format {
                OutputFormat::Json => write_qemu_json(out, &record)?,
                OutputFormat::Human => writeln!(
                    out,
                    "registered base {} ({}, {} virtual, read-only): {}",
                    record.name,
                    record.format,
                    human_size(record.virtual_size),
                    record.path.display()
                )?,
            }
        }
        BaseCommand::List(a) => {
            let records = registry.list(Some(Kind::Base))?;
            print_records(out, &records, a.output.format, false)?;
        }
        BaseCommand::Show(a) => {
            let record = registry.get(&a.name)?;
            if record.kind != Kind::Base {
                bail!("{:?} is a clone, not a base (see `cowclone ls`)", a.name);
            }
            match a.output.format {
                OutputFormat::Json => write_qemu_json(out, &record)?,
                OutputFormat::Human => show(out, &record)?,
            }
        }
        BaseCommand::Verify(a) => {
            let verification = registry.verify_base(&a.name)?;
            match a.output.format {
                OutputFormat::Json => write_qemu_json(out, &verification)?,
                OutputFormat::Human if verification.ok => writeln!(
                    out,
                    "{}: unchanged (sha256 {})",
                    a.name, verification.sha256
                )?,
                OutputFormat::Human => writeln!(
                    out,
                    "{}: MODIFIED: {}{}",
                    a.name,
                    verification
                        .changes
                        .as_deref()
                        .unwrap_or("fingerprint matches"),
                    match &verification.recorded_sha256 {
                        Some(h) if *h != verification.sha256 =>
                            format!("; sha256 {h} -> {}", verification.sha256),
                        _ => String::new(),
                    }
                )?,
            }
            return Ok(if verification.ok { 0 } else { 1 });
        }
        BaseCommand::Rm(a) => {
            let removed = registry.remove_base(&a.name, a.with_clones)?;
            for clone in &removed.clones {
                writeln!(out, "removed clone {}", clone.name)?;
            }
            writeln!(out, "removed base {}", removed.base.name)?;
        }
    }
    Ok(0)
}

fn clone(args: CloneArgs, out: &mut impl Write) -> Result<()> {
    let format = match args.format.as_deref() {
        None => None,
        Some("qcow2") => Some(ImageFormat::Qcow2),
        Some("vdi") => Some(ImageFormat::Vdi),
        Some(other) => bail!("invalid clone format {other:?}: expected qcow2 or vdi"),
    };
    let spec = CloneSpec {
        count: args.count,
        dir: args.dir.clone(),
        format,
        durable: args.durable,
        method: args.method,
        ..CloneSpec::new(&args.base, &args.name)
    };
    if let Some(host) = &args.host {
        let mut registry = args.home.open()?;
        return crate::commands::host::clone_on_host(
            &mut registry,
            &spec,
            host,
            args.output.format,
            out,
        );
    }
    let made = args
        .home
        .open()?
        .clone_images(&spec)
        .with_context(|| format!("cloning {}", args.base))?;
    let elapsed_us = made.elapsed.as_secs_f64() * 1e6;
    let per_clone_us = elapsed_us / made.clones.len().max(1) as f64;
    match args.output.format {
        OutputFormat::Json => write_qemu_json(
            out,
            &json!({
                "source": args.base,
                "method": made.method,
                "clones": made.clones,
                "elapsed-us": elapsed_us.round() as u64,
                "per-clone-us": (per_clone_us * 10.0).round() / 10.0,
            }),
        )?,
        OutputFormat::Human => {
            const SHOWN: usize = 10;
            for record in made.clones.iter().take(SHOWN) {
                writeln!(
                    out,
                    "cloned {} -> {} ({}, {} virtual): {}",
                    args.base,
                    record.name,
                    record.format,
                    human_size(record.virtual_size),
                    record.path.display()
                )?;
            }
            if made.clones.len() > SHOWN {
                writeln!(out, "… and {} more", made.clones.len() - SHOWN)?;
            }
            writeln!(
                out,
                "{} {} clone(s) in {:.0} us ({per_clone_us:.1} us per clone)",
                made.clones.len(),
                made.method.name(),
                elapsed_us
            )?;
        }
    }
    Ok(())
}

fn gc(args: GcArgs, out: &mut impl Write) -> Result<()> {
    let mut registry = args.list.home.open()?;
    let report = registry.gc(args.dry_run)?;
    let hosts = crate::commands::host::gc_hosts(&mut registry, args.dry_run)?;
    match args.list.output.format {
        OutputFormat::Json => {
            let mut value = serde_json::to_value(&report)?;
            value["hosts"] = serde_json::to_value(&hosts)?;
            write_qemu_json(out, &value)?
        }
        OutputFormat::Human => {
            crate::commands::host::print_gc_hosts(&hosts, args.dry_run, out)?;
            let verb = if report.dry_run {
                "would remove"
            } else {
                "removed"
            };
            for item in &report.removed {
                writeln!(out, "{verb} {} ({})", item.path.display(), item.reason)?;
            }
            for item in &report.kept {
                writeln!(out, "kept {} ({})", item.path.display(), item.reason)?;
            }
            for missing in &report.missing_files {
                writeln!(
                    out,
                    "missing: {} ({}); `cowclone rm {}` drops it",
                    missing.name,
                    missing.path.display(),
                    missing.name
                )?;
            }
            writeln!(
                out,
                "gc: {verb} {}, kept {}; {} record(s) without file",
                report.removed.len(),
                report.kept.len(),
                report.missing_files.len()
            )?;
        }
    }
    Ok(())
}

fn plan(args: PlanArgs, out: &mut impl Write) -> Result<()> {
    let text = std::fs::read(&args.script)
        .with_context(|| format!("reading {}", args.script.display()))?;
    let text = String::from_utf8_lossy(&text);
    let plan =
        cloner::plan::parse_plan(&text).with_context(|| format!("{}", args.script.display()))?;
    match args.output.format {
        OutputFormat::Json => write_qemu_json(out, &plan)?,
        OutputFormat::Human => {
            let or_dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
            writeln!(out, "base:         {}", plan.base)?;
            writeln!(
                out,
                "memory:       {}",
                or_dash(plan.memory.map(human_size))
            )?;
            writeln!(
                out,
                "cpus:         {}",
                or_dash(plan.cpus.map(|c| c.to_string()))
            )?;
            writeln!(
                out,
                "ingress-port: {}",
                or_dash(plan.ingress_port.map(|p| p.to_string()))
            )?;
            let egress: Vec<String> = plan.egress_ports.iter().map(u16::to_string).collect();
            writeln!(
                out,
                "egress-ports: {}",
                if egress.is_empty() {
                    "none".into()
                } else {
                    egress.join(",")
                }
            )?;
            writeln!(
                out,
                "timeout:      {}",
                or_dash(plan.timeout_secs.map(|t| format!("{t}s")))
            )?;
            for (line, key) in &plan.unknown_keys {
                writeln!(out, "warning: line {line}: unknown key rexxjs-vm-{key}")?;
            }
        }
    }
    Ok(())
}

fn log(args: ListArgs, out: &mut impl Write) -> Result<()> {
    let entries = args.home.open()?.audit_log()?;
    match args.output.format {
        OutputFormat::Json => write_qemu_json(out, &entries)?,
        OutputFormat::Human => {
            for e in &entries {
                writeln!(
                    out,
                    "{} {:<13} {:<5} {} {}",
                    e.time, e.operation, e.outcome, e.arguments, e.detail
                )?;
            }
        }
    }
    Ok(())
}

/// Prints records as a table or a JSON array (with `state` from the runtime probe for `ls`).
fn print_records(
    out: &mut impl Write,
    records: &[ImageRecord],
    output: OutputFormat,
    with_state: bool,
) -> Result<()> {
    // Running state from the qemu driver's pidfiles in each clone's directory.
    let probe = cloner::vm::qemu::QemuStateProbe;
    match output {
        OutputFormat::Json => {
            let rows: Vec<serde_json::Value> = records
                .iter()
                .map(|r| {
                    let mut value = serde_json::to_value(r).unwrap_or_default();
                    if with_state {
                        value["state"] = json!(probe.state(r));
                    }
                    value
                })
                .collect();
            write_qemu_json(out, &rows)?;
        }
        OutputFormat::Human => {
            writeln!(
                out,
                "{:<24} {:<5} {:<5} {:>9} {:<20} {:<7} PATH",
                "NAME", "KIND", "FMT", "SIZE", "PARENT", "STATE"
            )?;
            for r in records {
                writeln!(
                    out,
                    "{:<24} {:<5} {:<5} {:>9} {:<20} {:<7} {}",
                    r.name,
                    r.kind.name(),
                    r.format.name(),
                    human_size(r.virtual_size),
                    r.parent.as_deref().unwrap_or("-"),
                    probe.state(r).unwrap_or_else(|| "-".into()),
                    r.path.display()
                )?;
            }
        }
    }
    Ok(())
}

fn show(out: &mut impl Write, r: &ImageRecord) -> Result<()> {
    writeln!(out, "name:         {}", r.name)?;
    writeln!(out, "path:         {}", r.path.display())?;
    writeln!(out, "format:       {}", r.format.name())?;
    writeln!(
        out,
        "virtual size: {} ({} bytes)",
        human_size(r.virtual_size),
        r.virtual_size
    )?;
    if let Some(parent) = &r.parent {
        writeln!(out, "parent:       {parent}")?;
    }
    if let Some(p) = &r.fingerprint {
        writeln!(
            out,
            "fingerprint:  size {} mtime_ns {} metadata crc32 {:08x}",
            p.size, p.mtime_ns, p.metadata_crc32
        )?;
    }
    if let Some(sha) = &r.sha256 {
        writeln!(out, "sha256:       {sha}")?;
    }
    if let Some(vdi) = &r.vdi {
        writeln!(
            out,
            "vdi uuid:     {} (modify {})",
            vdi.uuid_create, vdi.uuid_modify
        )?;
    }
    if let Some(memory) = r.memory {
        writeln!(out, "memory:       {}", human_size(memory))?;
    }
    if let Some(cpus) = r.cpus {
        writeln!(out, "cpus:         {cpus}")?;
    }
    for (key, value) in &r.meta {
        writeln!(out, "meta:         {key}={value}")?;
    }
    writeln!(out, "registered:   {}", r.created)?;
    Ok(())
}

fn parse_meta(items: &[String]) -> Result<BTreeMap<String, String>> {
    let mut meta = BTreeMap::new();
    for item in items {
        let (key, value) = item
            .split_once('=')
            .with_context(|| format!("invalid --meta {item:?}: expected KEY=VALUE"))?;
        if key.is_empty() {
            bail!("invalid --meta {item:?}: empty key");
        }
        meta.insert(key.to_owned(), value.to_owned());
    }
    Ok(meta)
}

fn parse_size(text: &str) -> Result<u64> {
    Ok(imagefmt::size::parse_size(text)?)
}
