//! Command-line syntax, parsed by clap. Doc comments are the help text.

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Create, inspect and clone VM disk images (qcow2, VDI, raw) natively, without qemu-img.
#[derive(Debug, Parser)]
#[command(
    name = "cowclone",
    version,
    subcommand_required = true,
    arg_required_else_help = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
    /// Global options, accepted before or after the subcommand.
    #[command(flatten)]
    pub global: GlobalArgs,
}

/// Options every subcommand accepts, before or after its name (`cowclone --home D ls` and
/// `cowclone ls --home D` are the same).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct GlobalArgs {
    /// Registry home directory (default: $COWCLONE_HOME, else $XDG_DATA_HOME/cowclone).
    #[arg(long, value_name = "DIR", global = true)]
    pub home: Option<PathBuf>,
    /// Log what cowclone does on stderr: -v for each step, -vv for every layer opened and
    /// command run (RUST_LOG, e.g. RUST_LOG=imagefmt=debug, takes precedence).
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a qcow2 or VDI image, or an overlay on a backing file (qemu-img create syntax).
    Create(CreateArgs),
    /// Show an image's format, size, backing file and header facts (qemu-img info syntax).
    Info(InfoArgs),
    /// Compare the guest content of two images (exit 0 same, 1 different, 2 error).
    Compare(CompareArgs),
    /// Check a qcow2 or VDI image for corruptions and leaks, optionally repairing them (qemu-img
    /// check).
    Check(crate::commands::check_map::CheckArgs),
    /// Show how an image chain's guest ranges map to layers and files (qemu-img map).
    Map(crate::commands::check_map::MapArgs),
    /// Copy an image's guest content into a new qcow2, VDI or raw image (sparse, streaming).
    Convert(crate::commands::ops::ConvertArgs),
    /// Fold an overlay into its backing file.
    Commit(crate::commands::ops::CommitArgs),
    /// Change an image's backing file, keeping guest data the same (unless -u).
    Rebase(crate::commands::ops::RebaseArgs),
    /// Grow (or, with --shrink, shrink) an image's virtual size.
    Resize(crate::commands::ops::ResizeArgs),
    /// Change a qcow2 image's compat level, lazy refcounts, refcount width or size in place
    /// (qemu-img amend).
    Amend(crate::commands::amend::AmendArgs),
    /// Copy part of an image into a new raw, qcow2 or VDI image (qemu-img dd syntax).
    Dd(crate::commands::dd::DdArgs),
    /// How large a new qcow2 or raw image would be, for a size or an image (qemu-img measure).
    Measure(crate::commands::measure::MeasureArgs),
    /// Add, remove, clear, enable, disable or merge a qcow2 image's persistent dirty bitmaps
    /// (qemu-img bitmap syntax; actions run in the order given).
    Bitmap(crate::commands::bitmap::BitmapArgs),
    /// List, create, apply or delete qcow2 internal snapshots (qemu-img snapshot).
    Snapshot(crate::commands::snapshot::SnapshotArgs),
    /// Benchmark cloning methods or guest I/O against qemu-img, on this machine.
    Bench(crate::commands::bench::BenchArgs),
    /// Registry commands: base, clone, promote, ls, rm, gc, plan, log.
    #[command(flatten)]
    Registry(crate::commands::registry::RegistryCommand),
    #[command(flatten)]
    Vm(crate::commands::vm::VmCommand),
    /// libvirt hosts that clones can live on: add, ls, rm.
    Host(crate::commands::host::HostArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(crate::commands::shell::CompletionsArgs),
    /// Print the manual page (roff) on stdout, or write one page per command into a directory.
    Man(crate::commands::shell::ManArgs),
    /// Run a qemu-img 10.0 command line as qemu-img would (also: run cowclone as `qemu-img`).
    #[command(name = "qemu-img")]
    QemuImg(crate::qemu_img::QemuImgArgs),
}

/// `cowclone create [-f qcow2] [-b BACKING [-F FMT]] [-u] [-o key=value,...] FILE [SIZE]`
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Format of the new image: qcow2, or vdi (-o static=on for a fixed image; -b PARENT.vdi
    /// for a differencing image linked to its parent by UUID).
    #[arg(short = 'f', value_name = "FMT", default_value = "qcow2")]
    pub format: String,
    /// Backing file, stored verbatim; relative names resolve against FILE's directory.
    #[arg(short = 'b', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Backing file format (qcow2, raw, vdi); default: read from the backing file's magic.
    /// With -u, any qemu block driver name (host_device, nbd, …) is written as given.
    #[arg(short = 'F', value_name = "FMT", requires = "backing")]
    pub backing_format: Option<String>,
    /// Do not open the backing file (then -F and SIZE are required).
    #[arg(short = 'u', requires = "backing")]
    pub unsafe_no_open: bool,
    /// Options: cluster_size, compat, refcount_bits, lazy_refcounts, extended_l2,
    /// compression_type (also size, backing_file, backing_fmt). Repeatable.
    #[arg(short = 'o', value_name = "key=value,...")]
    pub options: Vec<String>,
    /// Print nothing on success.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Keep the guest data in an external data file PATH (qcow2; -o data_file=PATH): created
    /// as large as the disk, stored in the header as given (relative to FILE's directory).
    #[arg(long, value_name = "PATH")]
    pub data_file: Option<String>,
    /// Keep the data file a valid raw image of the disk (-o data_file_raw=on): every cluster is
    /// mapped at creation; no backing file.
    #[arg(long, requires = "data_file")]
    pub data_file_raw: bool,
    /// Create a relative data file name in the working directory, as qemu-img 10 does
    /// (default: in the image's directory, where cowclone's commands look for it).
    #[arg(long)]
    pub data_file_from_cwd: bool,
    /// Replace FILE if it exists (default: refuse).
    #[arg(long)]
    pub overwrite: bool,
    /// fsync the image and its directory before returning.
    #[arg(long)]
    pub durable: bool,
    /// The name the "Formatting" line shows instead of FILE (the qemu-img personality's file
    /// name as it was given, such as `file:a:b.qcow2`).
    #[arg(long, hide = true, value_name = "NAME")]
    pub shown_name: Option<String>,
    /// The image to create.
    pub file: PathBuf,
    /// Virtual size in bytes, or with a suffix k/K, M, G, T; default: the backing file's size.
    pub size: Option<String>,
    #[command(flatten)]
    pub guard: crate::commands::registry::WriteGuardArgs,
}

/// `cowclone info [-f FMT] [--output human|json] [--backing-chain] [-U] FILE`
#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Format of FILE (default: recognised by content, raw otherwise); a file not in FMT is
    /// refused.
    #[arg(short = 'f', value_name = "FMT")]
    pub format: Option<String>,
    /// Output format.
    #[command(flatten)]
    pub output: OutputArg,
    /// Also show every image in the backing chain (follows local files only).
    #[arg(long)]
    pub backing_chain: bool,
    /// Backing, parent and data file policy (with --backing-chain).
    #[command(flatten)]
    pub chain: ChainPolicyArgs,
    /// The image.
    pub file: PathBuf,
}

/// Which images below the one named may be opened, and how: the options every command that
/// reads a chain shares (backing files, VDI parents and external data files follow one policy).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ChainPolicyArgs {
    /// Refuse any backing, parent or data file outside DIR.
    #[arg(long, value_name = "DIR")]
    pub confine: Option<PathBuf>,
    /// Open no backing file: what would fall through to one reads as zeros.
    #[arg(long, conflicts_with = "confine")]
    pub no_backing: bool,
    #[command(flatten)]
    pub data_files: DataFileArgs,
    /// Read the images even if another process is writing them (qemu-img -U): takes no lock
    /// that keeps writers out; what is read may be inconsistent.
    #[arg(short = 'U', long)]
    pub force_share: bool,
    /// Accept block devices as the image and in its chain (default: only regular files).
    #[arg(long)]
    pub allow_block_devices: bool,
    /// Parent of a VDI differencing image in the chain, nearest first (repeatable); default:
    /// found by UUID among the VDI files in the image's own directory.
    #[arg(long = "parent", value_name = "FILE")]
    pub parents: Vec<PathBuf>,
}

impl ChainPolicyArgs {
    /// The backing policy: none with `--no-backing`, else local files, confined to
    /// `--confine` if given.
    pub fn policy(&self) -> imagefmt::backing::BackingPolicy {
        match &self.confine {
            _ if self.no_backing => imagefmt::backing::BackingPolicy::Detach,
            Some(dir) => imagefmt::backing::BackingPolicy::Confine(dir.clone()),
            None => imagefmt::backing::BackingPolicy::FollowLocal,
        }
    }

    /// The VDI parents named with `--parent`, nearest first.
    pub fn vdi_parents(&self) -> imagefmt::vdi::Explicit {
        imagefmt::vdi::Explicit(self.parents.clone())
    }

    /// Chain options for `policy` (from [`Self::policy`]) with these flags.
    pub fn options<'a>(
        &'a self,
        policy: &'a imagefmt::backing::BackingPolicy,
        parents: &'a imagefmt::vdi::Explicit,
    ) -> imagefmt::chain::ChainOptions<'a> {
        let mut options = self.data_files.options(policy);
        options.vdi_parents = (!parents.0.is_empty()).then_some(parents as _);
        options.force_share = self.force_share;
        options.block_devices = self.allow_block_devices;
        options
    }
}

/// How a command finds the external data file of a qcow2 image (shared by the commands that
/// read chains and those that write an image, which open its data file for writing).
#[derive(Debug, Clone, Default, clap::Args)]
pub struct DataFileArgs {
    /// Open the qcow2 external data file the header names (refused by default: the name can
    /// point at any host file; --confine applies to it too).
    #[arg(long)]
    pub allow_data_file: bool,
    /// Look a relative data file name up in the working directory, as qemu 10 does (default:
    /// in the image's own directory, as backing file names are).
    #[arg(long)]
    pub data_file_from_cwd: bool,
    /// Use PATH as the (first) image's external data file instead of the file its header
    /// names (qemu's `data-file.filename`); refused for an image without one.
    #[arg(long, value_name = "PATH")]
    pub open_data_file: Option<PathBuf>,
    /// Read the Nth image's guest data (1: the first image the command reads) from PATH, its
    /// external data file, instead of the file its header names; repeatable (compare and
    /// convert read several images).
    #[arg(long = "image-data-file", value_name = "N=PATH", value_parser = image_data_file)]
    pub image_data_files: Vec<(usize, PathBuf)>,
}

impl DataFileArgs {
    /// Chain options for `policy` that open data files as these flags say.
    pub fn options<'a>(
        &'a self,
        policy: &'a imagefmt::backing::BackingPolicy,
    ) -> imagefmt::chain::ChainOptions<'a> {
        let mut options = imagefmt::chain::ChainOptions::new(policy);
        options.allow_data_files = self.allow_data_file;
        if self.data_file_from_cwd {
            options.data_file_base = imagefmt::chain::DataFileBase::WorkingDirectory;
        }
        options.data_file = self.data_file_of(0);
        options
    }

    /// The data file named for the image at `index` (0: the first image the command reads),
    /// by `--image-data-file` (the last one for it) or, for the first, `--open-data-file`.
    pub fn data_file_of(&self, index: usize) -> Option<&std::path::Path> {
        let named = self
            .image_data_files
            .iter()
            .rev()
            .find(|(n, _)| *n == index + 1)
            .map(|(_, path)| path.as_path());
        match index {
            0 => named.or(self.open_data_file.as_deref()),
            _ => named,
        }
    }
}

/// Parses `--image-data-file N=PATH` (N counts from 1).
fn image_data_file(text: &str) -> Result<(usize, PathBuf), String> {
    let (n, path) = text
        .split_once('=')
        .ok_or_else(|| format!("expected N=PATH, not '{text}'"))?;
    match n.parse::<usize>() {
        Ok(n) if n >= 1 && !path.is_empty() => Ok((n, PathBuf::from(path))),
        _ => Err(format!("expected N=PATH with N from 1, not '{text}'")),
    }
}

/// `cowclone compare [-f FMT] [-F FMT] [-s] [-q] [-U] [--confine DIR] FILE1 FILE2`
#[derive(Debug, clap::Args)]
pub struct CompareArgs {
    /// Format of FILE1 (default: recognised by content, raw otherwise).
    #[arg(short = 'f', value_name = "FMT")]
    pub format1: Option<String>,
    /// Format of FILE2 (default: recognised by content, raw otherwise).
    #[arg(short = 'F', value_name = "FMT")]
    pub format2: Option<String>,
    /// Strict: images of different sizes differ even if the extra part reads as zeros.
    #[arg(short = 's')]
    pub strict: bool,
    /// Print nothing; only the exit code tells.
    #[arg(short = 'q', long)]
    pub quiet: bool,
    /// Backing, parent and data file policy (for both images).
    #[command(flatten)]
    pub chain: ChainPolicyArgs,
    /// First image.
    pub file1: PathBuf,
    /// Second image.
    pub file2: PathBuf,
}

/// `--output human|json` (also spelled `--output=json`, as qemu-img does), shared by every
/// command that reports.
#[derive(Debug, Clone, Copy, clap::Args)]
pub struct OutputArg {
    /// Output format (also spelled --output=json, as qemu-img does).
    #[arg(id = "output", long = "output", value_enum, value_name = "FORMAT", default_value_t = OutputFormat::Human)]
    pub format: OutputFormat,
}

/// Output format for commands that report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Text for people (laid out as qemu-img's where qemu-img has the command).
    #[default]
    Human,
    /// JSON, kebab-case keys (qemu-img's own where qemu-img has the command).
    Json,
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// clap's own consistency checks over every subcommand (unique names, valid references).
    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
