//! `cowclone bitmap`: qemu-img bitmap's syntax and messages. The actions (`--add`, `--remove`,
//! `--clear`, `--enable`, `--disable`, `--merge SOURCE`) may be repeated and mixed and run in
//! the order given, as qemu-img 10 runs them; the work is [`imagefmt::ops::bitmap`].

use std::io::Write;
use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Arg, ArgAction, ArgMatches, Command, FromArgMatches};
use imagefmt::ops::bitmap::{bitmap_with, SourceImage};
use imagefmt::qcow2::bitmap::BitmapAction;
use imagefmt::ImageFormat;

/// `cowclone bitmap (--merge SOURCE | --add | --remove | --clear | --enable | --disable)...
/// [-f FMT] [-b SOURCE_FILE [-F SOURCE_FMT]] [-g SIZE] FILENAME BITMAP`
///
/// Parsed by hand (`clap::Args` below) because the actions' order matters and clap's derive
/// keeps each flag's occurrences apart.
#[derive(Debug, Clone, Default)]
pub struct BitmapArgs {
    /// The actions, in command-line order.
    pub actions: Vec<BitmapAction>,
    /// `-g`: granularity for `--add` (0: the default).
    pub granularity: Option<String>,
    /// `-f`: the image's format (qcow2).
    pub format: Option<String>,
    /// `-b`: the image `--merge` reads its source bitmap from.
    pub source_file: Option<PathBuf>,
    /// `-F`: that image's format.
    pub source_format: Option<String>,
    /// The image and the bitmap (qemu-img checks their number itself).
    pub positional: Vec<String>,
    /// How the image's external data file is found (opened for writing with the image).
    pub data_files: crate::args::DataFileArgs,
}

const FLAGS: [(&str, &str); 5] = [
    ("add", "Create BITMAP, recording future writes"),
    ("remove", "Remove BITMAP"),
    ("clear", "Clear BITMAP"),
    ("enable", "Start recording writes in BITMAP"),
    ("disable", "Stop recording writes in BITMAP"),
];

impl clap::Args for BitmapArgs {
    fn augment_args(cmd: Command) -> Command {
        let mut cmd = <crate::args::DataFileArgs as clap::Args>::augment_args(cmd);
        for (name, help) in FLAGS {
            cmd = cmd.arg(
                Arg::new(name)
                    .long(name)
                    .help(help)
                    .action(ArgAction::Append)
                    .num_args(0)
                    .default_missing_value(""),
            );
        }
        cmd.arg(
            Arg::new("merge")
                .long("merge")
                .value_name("SOURCE")
                .help("Merge the contents of bitmap SOURCE (of -b SOURCE_FILE, or of FILENAME) into BITMAP")
                .action(ArgAction::Append),
        )
        .arg(
            Arg::new("granularity")
                .short('g')
                .long("granularity")
                .value_name("SIZE")
                .help("Granularity for --add (bytes per bit, k/M/G suffixes; default: the cluster size within 4k..64k)"),
        )
        .arg(
            Arg::new("format")
                .short('f')
                .long("format")
                .value_name("FMT")
                .help("Format of FILENAME (qcow2)"),
        )
        .arg(
            Arg::new("source_file")
                .short('b')
                .long("source-file")
                .value_name("SOURCE_FILE")
                .value_parser(clap::value_parser!(PathBuf))
                .help("Image that --merge reads SOURCE from"),
        )
        .arg(
            Arg::new("source_format")
                .short('F')
                .long("source-format")
                .value_name("SOURCE_FMT")
                .help("Format of SOURCE_FILE (default: recognised by content)"),
        )
        .arg(
            Arg::new("positional")
                .value_name("FILENAME BITMAP")
                .num_args(0..)
                .action(ArgAction::Append)
                .help("The image and the bitmap's name"),
        )
    }

    fn augment_args_for_update(cmd: Command) -> Command {
        Self::augment_args(cmd)
    }
}

impl FromArgMatches for BitmapArgs {
    fn from_arg_matches(m: &ArgMatches) -> Result<Self, clap::Error> {
        let mut ordered: Vec<(usize, BitmapAction)> = Vec::new();
        for (name, _) in FLAGS {
            let action = match name {
                "add" => BitmapAction::Add { granularity: None },
                "remove" => BitmapAction::Remove,
                "clear" => BitmapAction::Clear,
                "enable" => BitmapAction::Enable,
                _ => BitmapAction::Disable,
            };
            if let Some(indices) = m.indices_of(name) {
                ordered.extend(indices.map(|i| (i, action.clone())));
            }
        }
        if let (Some(indices), Some(values)) =
            (m.indices_of("merge"), m.get_many::<String>("merge"))
        {
            ordered.extend(indices.zip(values).map(|(i, source)| {
                (
                    i,
                    BitmapAction::Merge {
                        source: source.clone(),
                    },
                )
            }));
        }
        ordered.sort_by_key(|(i, _)| *i);
        Ok(Self {
            actions: ordered.into_iter().map(|(_, a)| a).collect(),
            granularity: m.get_one::<String>("granularity").cloned(),
            format: m.get_one::<String>("format").cloned(),
            source_file: m.get_one::<PathBuf>("source_file").cloned(),
            source_format: m.get_one::<String>("source_format").cloned(),
            positional: m
                .get_many::<String>("positional")
                .map(|v| v.cloned().collect())
                .unwrap_or_default(),
            data_files: crate::args::DataFileArgs::from_arg_matches(m)?,
        })
    }

    fn update_from_arg_matches(&mut self, m: &ArgMatches) -> Result<(), clap::Error> {
        *self = Self::from_arg_matches(m)?;
        Ok(())
    }
}

/// Runs `bitmap`: checks the command line as qemu-img does, then applies the actions in order.
/// Prints nothing on success.
pub fn bitmap_cmd(args: BitmapArgs, _out: &mut impl Write) -> Result<()> {
    if args.actions.is_empty() {
        bail!("Need at least one of --add, --remove, --clear, --enable, --disable, or --merge");
    }
    let adds = args
        .actions
        .iter()
        .any(|a| matches!(a, BitmapAction::Add { .. }));
    let merges = args
        .actions
        .iter()
        .any(|a| matches!(a, BitmapAction::Merge { .. }));
    if args.granularity.is_some() && !adds {
        bail!("granularity only supported with --add");
    }
    if args.source_format.is_some() && args.source_file.is_none() {
        bail!("-F only supported with -b");
    }
    if args.source_file.is_some() && !merges {
        bail!("Merge bitmap source file only supported with --merge");
    }
    let [file, name] = args.positional.as_slice() else {
        bail!("Expecting filename and bitmap name");
    };
    let granularity = match &args.granularity {
        None => None,
        Some(text) => match imagefmt::size::parse_size(text) {
            Ok(0) => None,
            Ok(g) => Some(g),
            Err(_) => bail!("Invalid granularity specified: '{text}'."),
        },
    };
    let actions: Vec<BitmapAction> = args
        .actions
        .into_iter()
        .map(|a| match a {
            BitmapAction::Add { .. } => BitmapAction::Add { granularity },
            other => other,
        })
        .collect();
    let format = args
        .format
        .as_deref()
        .map(str::parse::<ImageFormat>)
        .transpose()?;
    let source_format = args
        .source_format
        .as_deref()
        .map(str::parse::<ImageFormat>)
        .transpose()?;
    let source = args.source_file.as_deref().map(|path| SourceImage {
        path,
        format: source_format,
    });
    // No backing file is opened; the policy admits the data file.
    let policy = imagefmt::backing::BackingPolicy::FollowLocal;
    let chain = args.data_files.options(&policy);
    bitmap_with(file.as_ref(), format, name, &actions, source, &chain)?;
    Ok(())
}
