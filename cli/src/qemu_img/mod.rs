//! The qemu-img personality: run as `qemu-img` (a symlink to the binary) or as
//! `cowclone qemu-img ARGS…`, cowclone takes qemu-img 10.0's command lines and answers with its
//! messages (`qemu-img: …`) and exit codes.
//!
//! Nothing here implements a command. Each qemu-img command line is parsed with qemu-img's
//! option syntax ([`getopt`]), its file names resolved ([`filename`]: `file:`, `json:` and
//! `--image-opts` for local files), and it is then rewritten into the equivalent `cowclone`
//! command line, parsed by the same clap definitions as the binary's and run by [`crate::run`].
//! Where qemu-img's defaults differ from cowclone's (create and convert replace an existing
//! file; `resize --shrink` drops the data past the new end), the rewrite asks for qemu-img's
//! behaviour with cowclone's own options. The image locks and the registry guards apply as they
//! do to every cowclone command.

mod amend;
mod bench;
mod convert;
mod data_file;
mod filename;
mod getopt;
mod help;
mod messages;
pub(crate) mod options;
mod options_help;

use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::Path;

use clap::{CommandFactory, Parser};

use crate::args::Cli;
use getopt::{Parsed, Spec, UsageError};

/// The qemu-img release whose command lines and messages the personality follows.
pub const QEMU_IMG_VERSION: &str = "10.0.2";

/// `cowclone qemu-img ARGS…`: the qemu-img command line, taken as it is.
#[derive(Debug, clap::Args)]
pub struct QemuImgArgs {
    /// qemu-img's arguments: a subcommand and its options, in qemu-img's syntax.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, num_args = 0..)]
    pub args: Vec<OsString>,
}

/// Whether a program name (`argv[0]`) asks for the personality: its file name is `qemu-img`.
pub fn invoked_as_qemu_img(argv0: &OsStr) -> bool {
    Path::new(argv0).file_name() == Some(OsStr::new("qemu-img"))
}

/// Runs one qemu-img command line (`args`: the words after the program name `program`, which
/// usage messages repeat as qemu-img does), writing its output to `out` and its errors to
/// standard error as qemu-img does. Returns the exit code.
pub fn main(program: &str, args: &[OsString], out: &mut impl Write) -> u8 {
    let _personality = Personality::enter();
    messages::forget_given_names();
    let mut command = None;
    let failure = match run(args, out, &mut command) {
        Ok(code) => return code,
        Err(failure) => failure,
    };
    // qemu-img names the subcommand in its usage hints: "Try 'qemu-img info --help' ...".
    let invocation = match &command {
        Some(command) => format!("{program} {command}"),
        None => program.to_owned(),
    };
    let hint = format!("Try '{invocation} --help' for more info");
    match failure {
        Failure::Getopt(UsageError(message)) => {
            eprintln!("{invocation}: {message}\n{hint}");
            1
        }
        Failure::Usage(message) => {
            eprintln!("qemu-img: {message}\n{hint}");
            1
        }
        Failure::Error(message, code) => {
            // What the command printed (qemu-img create's "Formatting" line) comes first.
            let _ = out.flush();
            eprintln!("qemu-img: {message}");
            code
        }
        Failure::Help(command) => help::write_command_help(command, out),
    }
}

thread_local! {
    /// Set while this thread runs a qemu-img command line ([`main`]).
    static PERSONALITY: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks this thread as running the personality until dropped.
struct Personality(bool);

impl Personality {
    fn enter() -> Self {
        Self(PERSONALITY.with(|p| p.replace(true)))
    }
}

impl Drop for Personality {
    fn drop(&mut self) {
        PERSONALITY.with(|p| p.set(self.0));
    }
}

/// What qemu's own driver prints for `warning`, on a line of its own, inside the personality.
pub fn driver_line(warning: &imagefmt::ops::convert_salvage::SalvageWarning) -> Option<String> {
    PERSONALITY
        .with(std::cell::Cell::get)
        .then(|| messages::salvage_driver_line(warning))
        .flatten()
}

/// The program name that starts the warnings a command prints itself while it runs: `qemu-img`
/// inside the personality, else `cowclone`.
pub fn message_prefix() -> &'static str {
    if PERSONALITY.with(std::cell::Cell::get) {
        "qemu-img"
    } else {
        "cowclone"
    }
}

/// Why a command line did not run to its end.
enum Failure {
    /// An option the option parser refuses (printed after "PROGRAM COMMAND: "); exit 1.
    Getopt(UsageError),
    /// A usage error (printed with qemu-img's "Try ... --help" line); exit 1.
    Usage(String),
    /// An error message and the exit code.
    Error(String, u8),
    /// `-h`/`--help` of a command: its help is printed and the exit code is 0.
    Help(&'static str),
}

/// Parses a command's options; `-h`/`--help` stops there with the command's help.
fn parse_options(spec: &Spec, command: &'static str, args: &[String]) -> Result<Parsed, Failure> {
    let parsed = getopt::parse(spec, args)?;
    if parsed.has("h") {
        return Err(Failure::Help(command));
    }
    Ok(parsed)
}

impl From<UsageError> for Failure {
    fn from(e: UsageError) -> Self {
        Failure::Getopt(e)
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure::Usage(message.into())
}

fn error(message: impl Into<String>) -> Failure {
    Failure::Error(message.into(), 1)
}

/// qemu-img's global options: `-h`, `-V`, `-T trace` before the subcommand.
const GLOBAL: Spec = Spec {
    short: "hVT:",
    long: &[
        ("help", false, "h"),
        ("version", false, "V"),
        ("trace", true, "T"),
    ],
};

fn run(
    args: &[OsString],
    out: &mut impl Write,
    command_name: &mut Option<String>,
) -> Result<u8, Failure> {
    let args = args
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_owned)
                .ok_or_else(|| error(format!("argument {a:?} is not valid UTF-8")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if args.is_empty() {
        return Err(usage("Not enough arguments"));
    }
    // Global options end at the first word that is not one (getopt's "+").
    let first_command = args
        .iter()
        .position(|a| !a.starts_with('-') || a == "-")
        .unwrap_or(args.len());
    let globals = getopt::parse(&GLOBAL, &args[..first_command])?;
    for opt in &globals.opts {
        match opt.key {
            "h" => return write_help(out),
            "V" => return write_version(out),
            // Tracing names QEMU trace events; there are none here, so it changes nothing.
            _ => {}
        }
    }
    let Some((command, rest)) = args[first_command..].split_first() else {
        return Ok(0);
    };
    let known = [
        "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd",
        "info", "map", "measure", "snapshot", "rebase", "resize",
    ];
    if known.contains(&command.as_str()) {
        *command_name = Some(command.clone());
    }
    let plan = match command.as_str() {
        "create" => create(rest)?,
        "convert" => convert(rest)?,
        "info" => info(rest)?,
        "check" => check(rest)?,
        "compare" => compare(rest)?,
        "commit" => commit(rest)?,
        "map" => map(rest)?,
        "rebase" => rebase(rest)?,
        "resize" => resize(rest)?,
        "measure" => measure(rest)?,
        "bench" => return bench::run(rest, out),
        "amend" => match options_help::amend_help(rest)? {
            Some(plan) => plan,
            None => passthrough(command, rest)?,
        },
        "snapshot" | "bitmap" | "dd" => passthrough(command, rest)?,
        other => return Err(usage(format!("Command not found: {other}"))),
    };
    plan.run(out)
}

/// A cowclone command line that does what the qemu-img one asked.
struct Plan {
    /// The cowclone subcommand.
    command: &'static str,
    /// Its arguments.
    args: Vec<String>,
    /// qemu-img's `-q`: standard output is dropped.
    quiet: bool,
    /// Text qemu-img prints instead of running anything (`-o help`).
    text: Option<String>,
}

impl Plan {
    fn new(command: &'static str) -> Self {
        Plan {
            command,
            args: Vec::new(),
            quiet: false,
            text: None,
        }
    }

    /// A plan that only prints `text` (what qemu-img prints for `-o help`).
    fn print(command: &'static str, text: String) -> Self {
        Plan {
            text: Some(text),
            ..Plan::new(command)
        }
    }

    fn arg(&mut self, arg: impl Into<String>) -> &mut Self {
        self.args.push(arg.into());
        self
    }

    /// Adds `flag` (and its value) if cowclone's command takes it; else refuses it as a gap.
    fn flag(&mut self, flag: &str, value: Option<&str>) -> Result<&mut Self, Failure> {
        if !takes(self.command, flag) {
            return Err(error(format!(
                "{}: option '{flag}' is not supported by cowclone",
                self.command
            )));
        }
        self.args.push(flag.to_owned());
        if let Some(value) = value {
            self.args.push(value.to_owned());
        }
        Ok(self)
    }

    /// Adds `flag` if cowclone's command takes it; otherwise leaves it out (for options that
    /// change nothing here, such as `-U` where no lock is taken that would need it).
    fn flag_if_taken(&mut self, flag: &str, value: Option<&str>) -> &mut Self {
        if takes(self.command, flag) {
            self.args.push(flag.to_owned());
            if let Some(value) = value {
                self.args.push(value.to_owned());
            }
        }
        self
    }

    fn run(self, out: &mut impl Write) -> Result<u8, Failure> {
        if let Some(text) = &self.text {
            return Ok(u8::from(out.write_all(text.as_bytes()).is_err()));
        }
        let mut argv = vec!["cowclone".to_owned(), self.command.to_owned()];
        argv.extend(data_file::qemu_defaults(self.command));
        argv.extend(self.args);
        let cli = Cli::try_parse_from(&argv).map_err(|e| clap_failure(self.command, &e))?;
        let result = if self.quiet {
            crate::run(cli, &mut std::io::sink())
        } else {
            crate::run(cli, out)
        };
        match result {
            Ok(code) => Ok(code),
            Err((e, _)) if crate::is_broken_pipe(&e) => Ok(0),
            Err((e, code)) => {
                messages::print_before_error(&e, out);
                Err(Failure::Error(message(self.command, &e), code))
            }
        }
    }
}

/// Whether cowclone's `command` takes the option `flag` (`-f`, `--output`).
fn takes(command: &str, flag: &str) -> bool {
    let cli = Cli::command();
    let Some(sub) = cli.find_subcommand(command) else {
        return false;
    };
    let found = sub
        .get_arguments()
        .any(|arg| match flag.strip_prefix("--") {
            Some(long) => arg.get_long() == Some(long),
            None => flag
                .strip_prefix('-')
                .and_then(|s| s.chars().next())
                .is_some_and(|c| arg.get_short() == Some(c)),
        });
    found
}

/// A clap error on the rewritten command line, as one qemu-img-style line.
fn clap_failure(command: &str, e: &clap::Error) -> Failure {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let invalid = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => arg.clone(),
        _ => String::new(),
    };
    match e.kind() {
        ErrorKind::UnknownArgument | ErrorKind::ArgumentConflict => error(format!(
            "{command}: option '{invalid}' is not supported by cowclone"
        )),
        ErrorKind::InvalidValue => {
            let value = match e.get(ContextKind::InvalidValue) {
                Some(ContextValue::String(value)) => value.clone(),
                _ => String::new(),
            };
            error(format!("{command}: invalid value '{value}' for {invalid}"))
        }
        ErrorKind::MissingRequiredArgument => usage("Expecting image file name"),
        _ => error(
            e.to_string()
                .lines()
                .next()
                .unwrap_or_default()
                .trim_start_matches("error: ")
                .to_owned(),
        ),
    }
}

/// A cowclone error of `command` in qemu-img's words where qemu-img's are known (failing to
/// open an image, an image in use, a shrink without `--shrink`); otherwise cowclone's own line.
fn message(command: &str, e: &anyhow::Error) -> String {
    use imagefmt::lock::LockError;
    // qemu-img reports open failures of the image being created without "Could not open".
    let could_not_open = |path: &Path| match command {
        "create" => format!("{}: ", path.display()),
        _ => format!("Could not open '{}': ", messages::shown_name(path)),
    };
    if let Some(message) = messages::data_file_message(e) {
        return message;
    }
    if let Some(message) = messages::qemu_message(command, e) {
        return message;
    }
    for cause in e.chain() {
        let engine = messages::engine_error(cause);
        let lock = match engine {
            Some(imagefmt::Error::Lock(lock)) => Some(lock),
            Some(imagefmt::Error::Backing(imagefmt::backing::BackingError::Loop { path })) => {
                return format!(
                    "Backing file '{}' creates an infinite loop.",
                    path.display()
                );
            }
            Some(imagefmt::Error::Io { step, source }) => {
                if let Some(path) = step.strip_prefix("opening ") {
                    let path = Path::new(path.strip_suffix(" for writing").unwrap_or(path));
                    // The file itself is named by its path.
                    let inner = match command {
                        "create" => format!("{}: ", path.display()),
                        _ => format!("Could not open '{}': ", path.display()),
                    };
                    return format!("{}{inner}{}", could_not_open(path), strerror(source));
                }
                None
            }
            _ => cause.downcast_ref::<LockError>(),
        };
        match lock {
            Some(LockError::NotShared { path, permission }) => {
                return format!(
                    "{}Failed to get \"{permission}\" lock\nIs another process using the image [{}]?",
                    could_not_open(path),
                    path.display()
                );
            }
            Some(LockError::Held { path, permission }) => {
                return format!(
                    "{}Failed to get shared \"{permission}\" lock\nIs another process using the image [{}]?",
                    could_not_open(path),
                    path.display()
                );
            }
            _ => {}
        }
    }
    let line = crate::error_line(e);
    let v2_resize = imagefmt::qcow2::snapshot::SnapshotError::V2Resize.to_string();
    if command == "resize" && line.ends_with(&v2_resize) {
        return v2_resize;
    }
    if command == "resize" && line.contains("shrinking needs --shrink") {
        return "Use the --shrink option to perform a shrink operation.\n\
                qemu-img: warning: Shrinking an image will delete all data beyond the shrunken \
                image's end. Before performing such an operation, make sure there is no \
                important data there."
            .to_owned();
    }
    line
}

/// An operating system error as C's strerror words it (without Rust's " (os error N)").
fn strerror(e: &std::io::Error) -> String {
    let text = e.to_string();
    match text.find(" (os error ") {
        Some(at) => text[..at].to_owned(),
        None => text,
    }
}

/// The image named by `name` (`--image-opts` says how to read it).
fn target(name: &str, image_opts: bool) -> Result<filename::Target, Failure> {
    let target = if image_opts {
        filename::parse_image_opts(name)
    } else {
        filename::parse(name)
    }
    .map_err(error)?;
    messages::remember_given_name(&target.path, name);
    Ok(target)
}

/// Adds `-f FMT` for the image's format: from `-f`, else from the filename's `driver`. Where
/// cowclone's command has no `-f` it reads the format from the image, so the image must be in
/// the format named.
fn format_flag(
    plan: &mut Plan,
    given: Option<&str>,
    image: &filename::Target,
) -> Result<(), Failure> {
    let Some(format) = given.or(image.format.as_deref()) else {
        return Ok(());
    };
    if takes(plan.command, "-f") {
        plan.arg("-f").arg(format);
        return Ok(());
    }
    let path = Path::new(&image.path);
    let detected =
        imagefmt::image::read_file_header_with(path, imagefmt::open::OpenHow::reading(true))
            .map(|(_, header)| header.format().name().to_owned());
    match detected {
        Ok(detected) if detected == format => Ok(()),
        Ok(_) => Err(error(format!(
            "Could not open '{}': Image is not in {format} format",
            messages::shown_name(path)
        ))),
        // The command itself reports why the image cannot be read.
        Err(_) => Ok(()),
    }
}

/// Whether qemu knows `name` as a block driver (a backing format `-F` may name).
fn is_qemu_format(name: &str) -> bool {
    imagefmt::qcow2::create::QEMU_BACKING_FORMATS.contains(&name)
}

/// Checks a cache mode (`-t`, `-T`): qemu's names are accepted; none changes what cowclone
/// does (it writes through the page cache and flushes before it returns). `option` is the
/// option's letter: qemu-img calls `-T` the source cache in its refusal.
fn cache_mode(option: &str, mode: &str) -> Result<(), Failure> {
    match mode {
        "none" | "off" | "writeback" | "writethrough" | "directsync" | "unsafe" => Ok(()),
        other if option == "T" => Err(error(format!("Invalid source cache option: {other}"))),
        other => Err(error(format!("Invalid cache option: {other}"))),
    }
}

/// Checks the cache modes of `options` (letters) in that order, qemu-img's for the command.
fn cache_modes(parsed: &Parsed, options: &[&str]) -> Result<(), Failure> {
    for &option in options {
        if let Some(mode) = parsed.last(option) {
            cache_mode(option, mode)?;
        }
    }
    Ok(())
}

/// Checks `--output`.
fn output_flag(plan: &mut Plan, parsed: &Parsed) -> Result<(), Failure> {
    match parsed.last("output") {
        None => Ok(()),
        Some(format @ ("human" | "json")) => {
            plan.arg("--output").arg(format);
            Ok(())
        }
        Some(other) => Err(usage(format!(
            "--output expects 'human' or 'json' not '{other}'"
        ))),
    }
}

/// Refuses `--object`: there are no QEMU objects (secrets, TLS credentials) here.
fn no_objects(parsed: &Parsed) -> Result<(), Failure> {
    if parsed.has("object") {
        return Err(error(
            "--object is not supported by cowclone (it has no QEMU objects: no encryption secrets, TLS credentials or throttle groups)",
        ));
    }
    Ok(())
}

/// The `-o` lists of a command, checked as qemu-img checks them, as (key, value) items.
fn option_items(parsed: &Parsed) -> Result<Vec<(String, Option<String>)>, Failure> {
    let mut items = Vec::new();
    for list in parsed.all("o") {
        if !options::is_valid_list(list) {
            return Err(error(format!("Invalid option list: {list}")));
        }
        items.extend(
            options::split(list).map_err(|_| error(format!("Invalid option list: {list}")))?,
        );
    }
    Ok(items)
}

/// Adds the remaining `-o` items as one `-o` list (cowclone splits at commas, so a value that
/// holds one cannot be passed on).
fn pass_options(plan: &mut Plan, items: &[(String, Option<String>)]) -> Result<(), Failure> {
    if items.is_empty() {
        return Ok(());
    }
    if items
        .iter()
        .any(|(_, v)| v.as_deref().is_some_and(|v| v.contains(',')))
    {
        return Err(error(
            "option values that contain a comma are not supported by cowclone",
        ));
    }
    plan.arg("-o").arg(options::join(items));
    Ok(())
}

/// Takes `key` out of `items`, returning its last value.
fn take_option(items: &mut Vec<(String, Option<String>)>, key: &str) -> Option<String> {
    let mut found = None;
    items.retain(|(k, v)| {
        if k == key {
            found = v.clone();
            false
        } else {
            true
        }
    });
    found
}

/// `-q`: cowclone's own quiet flag where the command has one, and no standard output anyway.
fn quiet(plan: &mut Plan, parsed: &Parsed) {
    if parsed.has("q") {
        plan.quiet = true;
        plan.flag_if_taken("-q", None);
    }
}

const CREATE: Spec = Spec {
    short: "F:b:f:ho:qu",
    long: &[
        ("help", false, "h"),
        ("quiet", false, "q"),
        ("object", true, "object"),
        ("format", true, "f"),
        ("backing", true, "b"),
        ("backing-format", true, "F"),
        ("backing-unsafe", false, "u"),
        ("options", true, "o"),
    ],
};

fn create(args: &[String]) -> Result<Plan, Failure> {
    let parsed = parse_options(&CREATE, "create", args)?;
    no_objects(&parsed)?;
    let mut items = option_items(&parsed)?;
    options_help::take_file_options(&mut items)?;
    if options_help::asks_for_help(&items) {
        let format = parsed.last("f").unwrap_or("raw");
        let file = parsed.operands.first().map(String::as_str);
        return options_help::help_text(format, file)
            .map(|text| Plan::print("create", text))
            .map_err(error);
    }
    let mut plan = Plan::new("create");
    let file = match parsed.operands.as_slice() {
        [] => return Err(usage("Expecting image file name")),
        [file] | [file, _] => file,
        [_, _, extra, ..] => return Err(usage(format!("Unexpected argument: {extra}"))),
    };
    let size = parsed.operands.get(1);
    let backing = parsed
        .last("b")
        .map(str::to_owned)
        .or(take_option(&mut items, "backing_file"));
    let backing_format = parsed
        .last("F")
        .map(str::to_owned)
        .or(take_option(&mut items, "backing_fmt"));
    let given = file;
    let file = target(file, false)?;
    if let Some(format) = backing_format.as_deref().filter(|f| !is_qemu_format(f)) {
        return Err(error(format!(
            "{}: Parameter 'backing-fmt' does not accept value '{format}'",
            file.path
        )));
    }
    if let (Some(backing), None) = (&backing, &backing_format) {
        let resolved = imagefmt::backing::resolve(Path::new(&file.path), backing).ok();
        // qemu-img opens the backing file before it looks for its format.
        if let Some(path) = resolved
            .as_ref()
            .filter(|p| !p.exists() && !parsed.has("u"))
        {
            return Err(error(format!(
                "{}: Could not open '{}': No such file or directory\nCould not open backing image.",
                file.path,
                path.display()
            )));
        }
        // qemu-img names the format it would have probed, as a hint.
        let detected = resolved
            .and_then(|path| {
                imagefmt::image::read_file_header_with(
                    &path,
                    imagefmt::open::OpenHow::reading(true),
                )
                .ok()
            })
            .map(|(_, header)| format!("\nDetected format of {}.", header.format().name()))
            .unwrap_or_default();
        return Err(error(format!(
            "{}: Backing file specified without backing format{detected}",
            file.path
        )));
    }
    plan.arg("-f").arg(parsed.last("f").unwrap_or("raw"));
    if let Some(backing) = &backing {
        plan.arg("-b").arg(backing);
    }
    if let Some(format) = &backing_format {
        plan.arg("-F").arg(format);
    }
    if parsed.has("u") {
        plan.arg("-u");
    }
    pass_options(&mut plan, &items)?;
    quiet(&mut plan, &parsed);
    // qemu-img's "Formatting" line shows the name as given (`file:x`).
    if *given != file.path {
        plan.arg("--shown-name").arg(given);
    }
    // qemu-img create replaces an existing file.
    plan.arg("--overwrite").arg("--").arg(file.path);
    if let Some(size) = size {
        plan.arg(size);
    }
    Ok(plan)
}

const CONVERT: Spec = Spec {
    short: "hf:O:B:CcF:o:l:S:pt:T:qnm:WUr:",
    long: &[
        ("help", false, "h"),
        ("quiet", false, "q"),
        ("object", true, "object"),
        ("image-opts", false, "image-opts"),
        ("source-image-opts", false, "image-opts"),
        ("source-format", true, "f"),
        ("source-cache", true, "T"),
        ("snapshot", true, "l"),
        ("sparse-size", true, "S"),
        ("output-format", true, "O"),
        ("options", true, "o"),
        ("output-cache", true, "t"),
        ("backing", true, "B"),
        ("backing-format", true, "F"),
        ("force-share", false, "U"),
        ("target-image-opts", false, "target-image-opts"),
        ("salvage", false, "salvage"),
        ("target-is-zero", false, "target-is-zero"),
        ("bitmaps", false, "bitmaps"),
        ("skip-broken-bitmaps", false, "skip-broken-bitmaps"),
        ("rate", true, "r"),
        ("parallel", true, "m"),
        ("oob-writes", false, "W"),
        ("copy-range-offloading", false, "C"),
    ],
};

fn convert(args: &[String]) -> Result<Plan, Failure> {
    let parsed = parse_options(&CONVERT, "convert", args)?;
    no_objects(&parsed)?;
    convert::option_refusals(&parsed)?;
    let mut items = option_items(&parsed)?;
    options_help::take_file_options(&mut items)?;
    if options_help::asks_for_help(&items) {
        let format = parsed.last("O").unwrap_or("raw");
        let file = match parsed.operands.as_slice() {
            [_, .., last] => Some(last.as_str()),
            _ => None,
        };
        return options_help::help_text(format, file)
            .map(|text| Plan::print("convert", text))
            .map_err(error);
    }
    let mut plan = Plan::new("convert");
    let (dest, sources) = match parsed.operands.split_last() {
        Some((dest, sources)) if !sources.is_empty() => (dest, sources),
        _ => return Err(error("Must specify image file name")),
    };
    let sources = sources
        .iter()
        .map(|name| target(name, parsed.has("image-opts")))
        .collect::<Result<Vec<_>, _>>()?;
    if let Some(snapshot) = parsed.last("l") {
        plan.arg("--snapshot")
            .arg(convert::snapshot_flag(snapshot, sources.len())?);
    }
    let dest = target(dest, parsed.has("target-image-opts"))?;
    cache_modes(&parsed, &["T", "t"])?;
    let backing = parsed
        .last("B")
        .map(str::to_owned)
        .or(take_option(&mut items, "backing_file"));
    let backing_format = parsed
        .last("F")
        .map(str::to_owned)
        .or(take_option(&mut items, "backing_fmt"));
    // One -f for every source, as qemu-img's.
    format_flag(&mut plan, parsed.last("f"), &sources[0])?;
    let output_format = parsed.last("O").or(dest.format.as_deref()).unwrap_or("raw");
    plan.arg("-O").arg(output_format);
    if let Some(backing) = &backing {
        if sources.len() > 1 {
            return Err(error(
                "Having a backing file for the target makes no sense when concatenating multiple input images",
            ));
        }
        if !parsed.has("n") {
            if backing_format.is_none() {
                return Err(error(
                    "Use of backing file requires explicit backing format",
                ));
            }
            convert::missing_backing(&dest.path, backing)?;
        }
        plan.arg("-B").arg(backing);
    }
    if let Some(format) = &backing_format {
        plan.arg("-F").arg(format);
    }
    pass_options(&mut plan, &items)?;
    for opt in &parsed.opts {
        match opt.key {
            // Copy offloading: checked as qemu-img checks it, otherwise cowclone's choice.
            "C" => {}
            "c" | "n" | "W" => {
                plan.flag(&format!("-{}", opt.key), None)?;
            }
            // -r: a rate limit, checked and kept by cowclone convert's own --rate.
            "m" | "S" | "r" => {
                plan.flag(&format!("-{}", opt.key), opt.value.as_deref())?;
            }
            "U" => {
                plan.flag_if_taken("-U", None);
            }
            "p" | "t" | "T" => {
                plan.flag_if_taken(&format!("-{}", opt.key), opt.value.as_deref());
            }
            "salvage" | "target-is-zero" | "bitmaps" | "skip-broken-bitmaps" => {
                plan.flag(&format!("--{}", opt.key), None)?;
            }
            _ => {}
        }
    }
    quiet(&mut plan, &parsed);
    // qemu-img convert replaces an existing target, unless -n (use it as it is).
    if !parsed.has("n") {
        plan.arg("--overwrite");
    }
    for (index, source) in sources.iter().enumerate() {
        data_file::named_at(&mut plan, source, index)?;
    }
    if dest.data_file.is_some() {
        return Err(error(
            "convert: a 'data-file' option for the target is not supported by cowclone",
        ));
    }
    plan.arg("--");
    for source in sources {
        plan.arg(source.path);
    }
    plan.arg(dest.path);
    Ok(plan)
}

/// The one image operand of commands that take one.
fn one_image(parsed: &Parsed) -> Result<&String, Failure> {
    match parsed.operands.as_slice() {
        [file] => Ok(file),
        _ => Err(usage("Expecting one image file name")),
    }
}

const INFO: Spec = Spec {
    short: "f:hbU",
    long: &[
        ("help", false, "h"),
        ("format", true, "f"),
        ("output", true, "output"),
        ("backing-chain", false, "b"),
        ("object", true, "object"),
        ("image-opts", false, "image-opts"),
        ("force-share", false, "U"),
    ],
};

fn info(args: &[String]) -> Result<Plan, Failure> {
    let parsed = parse_options(&INFO, "info", args)?;
    no_objects(&parsed)?;
    let image = target(one_image(&parsed)?, parsed.has("image-opts"))?;
    let mut plan = Plan::new("info");
    output_flag(&mut plan, &parsed)?;
    format_flag(&mut plan, parsed.last("f"), &image)?;
    if parsed.has("b") {
        plan.arg("--backing-chain");
    }
    if parsed.has("U") {
        plan.flag_if_taken("-U", None);
    }
    data_file::named(&mut plan, &image, true)?;
    plan.arg("--").arg(image.path);
    Ok(plan)
}

const CHECK: Spec = Spec {
    short: "hf:r:T:qU",
    long: &[
        ("help", false, "h"),
        ("quiet", false, "q"),
        ("format", true, "f"),
        ("cache", true, "T"),
        ("repair", true, "r"),
        ("output", true, "output"),
        ("object", true, "object"),
        ("image-opts", false, "image-opts"),
        ("force-share", false, "U"),
    ],
};

fn check(args: &[String]) -> Result<Plan, Failure> {
    let parsed = parse_options(&CHECK, "check", args)?;
    no_objects(&parsed)?;
    let mut plan = Plan::new("check");
    if let Some(repair) = parsed.last("r") {
        if repair != "leaks" && repair != "all" {
            return Err(usage(format!(
                "--repair (-r) expects 'leaks' or 'all' not '{repair}'"
            )));
        }
        plan.arg("-r").arg(repair);
    }
    let image = target(one_image(&parsed)?, parsed.has("image-opts"))?;
    output_flag(&mut plan, &parsed)?;
    cache_modes(&parsed, &["T"])?;
    format_flag(&mut plan, parsed.last("f"), &image)?;
    if parsed.has("U") {
        plan.arg("-U");
    }
    quiet(&mut plan, &parsed);
    data_file::named(&mut plan, &image, true)?;
    plan.arg("--").arg(image.path);
    Ok(plan)
}

const COMPARE: Spec = Spec {
    short: "hf:F:T:pqsU",
    long: &[
        ("help", false, "h"),
        ("quiet", false, "q"),
        ("object", true, "object"),
        ("cache", true, "T"),
        ("image-opts", false, "image-opts"),
        ("a-format", true, "f"),
        ("left-format", true, "f"),
        ("b-format", true, "F"),
        ("right-format", true, "F"),
        ("force-share", false, "U"),
        ("strict", false, "s"),
        ("progress", false, "p"),
    ],
};

fn compare(args: &[String]) -> Result<Plan, Failure> {
    let parsed = parse_options(&COMPARE, "compare", args)?;
    no_objects(&parsed)?;
    let [first, second] = parsed.operands.as_slice() else {
        return Err(usage("Expecting two image file names"));
    };
    let first = target(first, parsed.has("image-opts"))?;
    let second = target(second, parsed.has("image-opts"))?;
    // compare's failures exit 2 (1 means "the images differ").
    cache_modes(&parsed, &["T"]).map_err(|failure| match failure {
        Failure::Error(message, _) => Failure::Error(message, 2),
        other => other,
    })?;
    let mut plan = Plan::new("compare");
    if let Some(format) = parsed.last("f").or(first.format.as_deref()) {
        plan.arg("-f").arg(format);
    }
    if let Some(format) = parsed.last("F").or(second.format.as_deref()) {
        plan.arg("-F").arg(format);
    }
    if parsed.has("s") {
        plan.arg("-s");
    }
    if parsed.has("U") {
        plan.arg("-U");
    }
    quiet(&mut plan, &parsed);
    data_file::named(&mut plan, &first, true)?;
    data_file::named(&mut plan, &second, false)?;
    plan.arg("--").arg(first.path).arg(second.path);
    Ok(plan)
}

const COMMIT: Spec = Spec {
    short: "f:ht:b:dpqr:",
    long: &[
        ("help", false, "h"),
        ("quiet", false, "q"),
        ("object", true, "object"),
        ("format", true, "f"),
        ("image-opts", false, "image-opts"),
        ("cache", true, "t"),
        ("drop", false, "d"),
        ("base", true, "b"),
        ("progress", false, "p"),
        ("rate", true, "r"),
    ],
};

fn commit(args: &[String]) -> Result<Plan, Failure> {
    let parsed = parse_options(&COMMIT, "commit", args)?;
    no_objects(&parsed)?;
    let image = target(one_image(&parsed)?, parsed.has("image-opts"))?;
    cache_modes(&parsed, &["t"])?;
    let mut plan = Plan::new("commit");
    format_flag(&mut plan, parsed.last("f"), &image)?;
    if let Some(base) = parsed.last("b") {
        plan.flag("-b", Some(base))?;
    }
    if parsed.has("d") {
        plan.arg("-d");
    }
    if parsed.has("p") {
        plan.flag_if_taken("-p", None);
    }
    // -r is a rate limit, checked as qemu-img checks it: without it the commit only finishes
    // sooner.
    for rate in parsed.all("r") {
        bench::size_option("rate limit", rate)?;
    }
    quiet(&mut plan, &parsed);
    data_file::named(&mut plan, &image, true)?;
    plan.arg("--").arg(image.path);
    Ok(plan)
}

const MAP: Spec = Spec {
    short: "f:s:l:hU",
    long: &[
        ("help", false, "h"),
        ("format", true, "f"),
        ("output", true, "output"),
        ("object", true, "object"),
        ("image-opts", false, "image-opts"),
        ("force-share", false, "U"),
        ("start-offset", true, "s"),
        ("max-length", true, "l"),
    ],
};

fn map(args: &[String]) -> Result<Plan, Failure> {
    let parsed = parse_options(&MAP, "map", args)?;
    no_objects(&parsed)?;
    let image = target(one_image(&parsed)?, parsed.has("image-opts"))?;
    let mut plan = Plan::new("map");
    output_flag(&mut plan, &parsed)?;
    format_flag(&mut plan, parsed.last("f"), &image)?;
    if let Some(start) = parsed.last("s") {
        plan.flag("--start-offset", Some(start))?;
    }
    if let Some(length) = parsed.last("l") {
        plan.flag("--max-length", Some(length))?;
    }
    if parsed.has("U") {
        plan.arg("-U");
    }
    data_file::named(&mut plan, &image, true)?;
    plan.arg("--").arg(image.path);
    Ok(plan)
}

const REBASE: Spec = Spec {
    short: "hf:F:b:upt:T:qUc",
    long: &[
        ("help", false, "h"),
        ("quiet", false, "q"),
        ("progress", false, "p"),
        ("object", true, "object"),
        ("image-opts", false, "image-opts"),
        ("force-share", false, "U"),
        ("format", true, "f"),
        ("cache", true, "t"),
        ("compress", false, "c"),
        ("backing", true, "b"),
        ("backing-format", true, "F"),
        ("backing-cache", true, "T"),
        ("backing-unsafe", false, "u"),
    ],
};

fn rebase(args: &[String]) -> Result<Plan, Failure> {
    let parsed = parse_options(&REBASE, "rebase", args)?;
    no_objects(&parsed)?;
    let image = target(one_image(&parsed)?, parsed.has("image-opts"))?;
    let unsafe_mode = parsed.has("u");
    if !unsafe_mode && !parsed.has("b") {
        return Err(usage(
            "Must specify backing file (-b) or use unsafe mode (-u)",
        ));
    }
    cache_modes(&parsed, &["t", "T"])?;
    let backing = parsed.last("b").unwrap_or("");
    if !backing.is_empty() && parsed.last("F").is_none() {
        return Err(error(format!(
            "Could not change the backing file to '{backing}': backing format must be specified"
        )));
    }
    if let Some(format) = parsed.last("F").filter(|f| !is_qemu_format(f)) {
        return Err(error(format!("Invalid format name: '{format}'")));
    }
    let mut plan = Plan::new("rebase");
    format_flag(&mut plan, parsed.last("f"), &image)?;
    if unsafe_mode {
        plan.arg("-u");
    }
    plan.arg("-b").arg(backing);
    if let Some(format) = parsed.last("F") {
        plan.arg("-F").arg(format);
    }
    if parsed.has("c") {
        plan.flag("-c", None)?;
    }
    if parsed.has("p") {
        plan.flag_if_taken("-p", None);
    }
    quiet(&mut plan, &parsed);
    data_file::named(&mut plan, &image, true)?;
    plan.arg("--").arg(image.path);
    Ok(plan)
}

const RESIZE: Spec = Spec {
    short: "f:hq",
    long: &[
        ("help", false, "h"),
        ("quiet", false, "q"),
        ("object", true, "object"),
        ("format", true, "f"),
        ("image-opts", false, "image-opts"),
        ("preallocation", true, "preallocation"),
        ("shrink", false, "shrink"),
    ],
};

fn resize(args: &[String]) -> Result<Plan, Failure> {
    // The size is the last word, taken before the options so that "-1G" is not one.
    // ...unless -h/--help is among the words (qemu-img prints the help whatever follows).
    if getopt::parse(&RESIZE, args).is_ok_and(|p| p.has("h")) {
        return Err(Failure::Help("resize"));
    }
    let Some((size, rest)) = args.split_last().filter(|_| args.len() >= 2) else {
        return Err(usage("Expecting image file name and size"));
    };
    let parsed = parse_options(&RESIZE, "resize", rest)?;
    no_objects(&parsed)?;
    let image = match parsed.operands.as_slice() {
        [file] => target(file, parsed.has("image-opts"))?,
        _ => return Err(usage("Expecting image file name and size")),
    };
    let mut plan = Plan::new("resize");
    format_flag(&mut plan, parsed.last("f"), &image)?;
    if let Some(mode) = parsed.last("preallocation") {
        plan.flag("--preallocation", Some(mode))?;
    }
    if parsed.has("shrink") {
        // qemu-img's --shrink drops whatever lies past the new end.
        plan.arg("--shrink").flag("--drop-data-past-end", None)?;
    }
    quiet(&mut plan, &parsed);
    data_file::named(&mut plan, &image, true)?;
    plan.arg("--").arg(image.path).arg(size);
    Ok(plan)
}

const MEASURE: Spec = Spec {
    short: "hf:O:o:l:U",
    long: &[
        ("help", false, "h"),
        ("target-format", true, "O"),
        ("format", true, "f"),
        ("image-opts", false, "image-opts"),
        ("options", true, "o"),
        ("snapshot", true, "l"),
        ("object", true, "object"),
        ("output", true, "output"),
        ("size", true, "size"),
        ("force-share", false, "U"),
    ],
};

fn measure(args: &[String]) -> Result<Plan, Failure> {
    let parsed = parse_options(&MEASURE, "measure", args)?;
    no_objects(&parsed)?;
    let items = option_items(&parsed)?;
    // qemu-img reads -l as it reads its options, and refuses a malformed keyed form there.
    let snapshot = parsed
        .last("l")
        .map(|snapshot| convert::snapshot_flag(snapshot, 1))
        .transpose()?;
    let mut plan = Plan::new("measure");
    output_flag(&mut plan, &parsed)?;
    if let Some(format) = parsed.last("O") {
        plan.arg("-O").arg(format);
    }
    pass_options(&mut plan, &items)?;
    if let Some(size) = parsed.last("size") {
        // One word, so that a negative size is not read as an option.
        plan.arg(format!("--size={size}"));
    }
    if let Some(snapshot) = snapshot {
        plan.flag("--snapshot", Some(&snapshot))?;
    }
    if parsed.has("U") {
        plan.flag_if_taken("-U", None);
    }
    match parsed.operands.as_slice() {
        [] if parsed.has("image-opts") || parsed.has("f") || parsed.has("l") => {
            return Err(error(
                "--image-opts, -f, and -l require a filename argument.",
            ));
        }
        [] => {}
        [file] => {
            let image = target(file, parsed.has("image-opts"))?;
            if let Some(format) = parsed.last("f").or(image.format.as_deref()) {
                plan.arg("-f").arg(format);
            }
            data_file::named(&mut plan, &image, true)?;
            plan.arg("--").arg(image.path);
        }
        _ => return Err(error("At most one filename argument is allowed.")),
    }
    Ok(plan)
}

const SNAPSHOT: Spec = Spec {
    short: "la:c:d:f:hqU",
    long: &[
        ("help", false, "h"),
        ("quiet", false, "q"),
        ("object", true, "object"),
        ("format", true, "f"),
        ("image-opts", false, "image-opts"),
        ("force-share", false, "U"),
        // qemu-img 10.0.2 (Debian's build) takes no snapshot name after these long forms.
        ("list", false, "l"),
        ("apply", false, "a"),
        ("create", false, "c"),
        ("delete", false, "d"),
    ],
};

const BITMAP: Spec = Spec {
    short: "b:f:F:g:h",
    long: &[
        ("help", false, "h"),
        ("object", true, "object"),
        ("image-opts", false, "image-opts"),
        ("add", false, "add"),
        ("remove", false, "remove"),
        ("clear", false, "clear"),
        ("enable", false, "enable"),
        ("disable", false, "disable"),
        ("merge", true, "merge"),
        ("granularity", true, "g"),
        ("source-file", true, "b"),
        ("source-format", true, "F"),
    ],
};

const DD: Spec = Spec {
    short: "hf:O:U",
    long: &[
        ("help", false, "h"),
        ("object", true, "object"),
        ("format", true, "f"),
        ("image-opts", false, "image-opts"),
        ("output-format", true, "O"),
        ("force-share", false, "U"),
    ],
};

/// Subcommands whose cowclone form has qemu-img's syntax already: passed on with their long
/// options spelled short ([`getopt::canonical`]), if this cowclone has them.
fn passthrough(command: &str, args: &[String]) -> Result<Plan, Failure> {
    let (known, spec): (&'static str, &Spec) = match command {
        "snapshot" => ("snapshot", &SNAPSHOT),
        "amend" => ("amend", &options_help::AMEND),
        "bitmap" => ("bitmap", &BITMAP),
        _ => ("dd", &DD),
    };
    let parsed = parse_options(spec, known, args)?;
    no_objects(&parsed)?;
    if known == "snapshot" {
        help::snapshot_long_forms(&parsed)?;
    }
    // amend checks its cache mode once it has options to apply, before opening the image.
    if known == "amend" {
        if !parsed.has("o") {
            return Err(usage("Must specify options (-o)"));
        }
        cache_modes(&parsed, &["t"])?;
    }
    let args = &getopt::canonical(&parsed);
    if Cli::command().find_subcommand(known).is_none() {
        return Err(error(format!("{command}: not supported by cowclone")));
    }
    let mut plan = Plan::new(known);
    // qemu-img dd replaces an existing output, as create and convert do.
    if known == "dd" {
        plan.arg("--overwrite");
    }
    if known == "amend" || known == "bitmap" {
        let with_value = match known {
            "amend" => amend::AMEND_WITH_VALUE,
            _ => amend::BITMAP_WITH_VALUE,
        };
        plan.args.extend(amend::resolve_image(args, with_value)?);
    } else {
        plan.args.extend_from_slice(args);
    }
    Ok(plan)
}

fn write_help(out: &mut impl Write) -> Result<u8, Failure> {
    help::write_top_help(out)
}

fn write_version(out: &mut impl Write) -> Result<u8, Failure> {
    writeln!(
        out,
        "qemu-img version {QEMU_IMG_VERSION} (cowclone {})",
        env!("CARGO_PKG_VERSION")
    )
    .map_err(|e| error(e.to_string()))?;
    Ok(0)
}
