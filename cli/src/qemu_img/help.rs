//! `qemu-img --help` and `qemu-img COMMAND --help` (or `-h`): one table of the commands and
//! their options, printed in the shape qemu-img 10 prints its help (a usage block, then each
//! option with its short and long forms), in this project's own words. The option names and
//! their arguments are those qemu-img 10.0.2 accepts (its option tables); where its help names
//! one its parser refuses (`convert --target-format`), the name is left out here too.

use std::io::Write;

use super::getopt::Parsed;
use super::{error, usage, Failure, QEMU_IMG_VERSION};

/// One option of a command: its short letter, its long name, its argument, what it does.
struct Opt {
    short: Option<char>,
    long: Option<&'static str>,
    arg: Option<&'static str>,
    about: &'static str,
}

const fn opt(
    short: Option<char>,
    long: Option<&'static str>,
    arg: Option<&'static str>,
    about: &'static str,
) -> Opt {
    Opt {
        short,
        long,
        arg,
        about,
    }
}

// Options several commands share, described once.
const HELP: Opt = opt(Some('h'), Some("help"), None, "show this text and exit");
const QUIET: Opt = opt(Some('q'), Some("quiet"), None, "print nothing but errors");
const PROGRESS: Opt = opt(
    Some('p'),
    Some("progress"),
    None,
    "report progress as it goes",
);
const FORMAT_ABOUT: &str =
    "the image's format (qcow2, raw, vdi); read from the image when not given";
const FORMAT: Opt = opt(Some('f'), Some("format"), Some("FMT"), FORMAT_ABOUT);
/// `-f` where qemu-img has no `--format` (bitmap).
const FORMAT_SHORT: Opt = opt(Some('f'), None, Some("FMT"), FORMAT_ABOUT);
const IMAGE_OPTS: Opt = opt(
    None,
    Some("image-opts"),
    None,
    "FILENAME is an option list (driver=...,file.filename=...), not a file name",
);
const FORCE_SHARE: Opt = opt(
    Some('U'),
    Some("force-share"),
    None,
    "read the image even while another process has it open",
);
const OBJECT: Opt = opt(
    None,
    Some("object"),
    Some("OBJDEF"),
    "a QEMU object (refused here: cowclone has no secrets or other objects)",
);
const OUTPUT: Opt = opt(
    None,
    Some("output"),
    Some("human|json"),
    "text for people (the default) or JSON",
);
const CACHE: &str =
    "cache mode (none, writeback, writethrough, directsync, unsafe): checked, then the same I/O";

/// One command: its name, what it does, its synopsis, its options and its operands.
struct Command {
    name: &'static str,
    about: &'static str,
    synopsis: &'static str,
    options: &'static [Opt],
    operands: &'static [(&'static str, &'static str)],
}

/// Every command qemu-img 10.0 has, as the personality runs it.
const COMMANDS: &[Command] = &[
    Command {
        name: "amend",
        about: "Change format options of an existing image (qcow2: compat, lazy_refcounts, refcount_bits, ...).",
        synopsis: "[-f FMT | --image-opts] [-t CACHE] [--force] [-p] [-q]\n        [--object OBJDEF] -o OPTIONS FILENAME",
        options: &[
            HELP, QUIET, PROGRESS, FORMAT, IMAGE_OPTS,
            opt(Some('t'), Some("cache"), Some("CACHE"), CACHE),
            opt(Some('o'), Some("options"), Some("OPTIONS"), "key=value list of the options to change ('-o help' lists them)"),
            opt(None, Some("force"), None, "allow changes that may lose data"),
            OBJECT,
        ],
        operands: &[("FILENAME", "the image to change")],
    },
    Command {
        name: "bench",
        about: "Time a run of equal read or write requests on an image.",
        synopsis: "[-f FMT | --image-opts] [-t CACHE] [-c COUNT] [-d DEPTH]\n        [-o OFFSET] [-s BUFFER_SIZE] [-S STEP_SIZE] [-i AIO] [-n] [-q] [-U]\n        [-w [--pattern PATTERN] [--flush-interval INTERVAL [--no-drain]]] FILENAME",
        options: &[
            HELP,
            opt(Some('q'), None, None, "accepted; the report is printed all the same, as qemu-img prints it"),
            FORMAT, IMAGE_OPTS,
            opt(Some('t'), Some("cache"), Some("CACHE"), CACHE),
            opt(Some('c'), Some("count"), Some("COUNT"), "how many requests to send (75000)"),
            opt(Some('d'), Some("depth"), Some("DEPTH"), "how many requests may be in flight at once (64)"),
            opt(Some('o'), Some("offset"), Some("OFFSET"), "guest offset of the first request (0)"),
            opt(Some('s'), Some("buffer-size"), Some("BUFFER_SIZE"), "bytes per request (4096)"),
            opt(Some('S'), Some("step-size"), Some("STEP_SIZE"), "distance from one request to the next (BUFFER_SIZE); offsets wrap at the image's end"),
            opt(Some('i'), Some("aio"), Some("AIO"), "I/O backend (threads, native, io_uring): checked, then the same I/O"),
            opt(Some('n'), Some("native"), None, "native AIO: needs -t none or directsync"),
            opt(Some('w'), Some("write"), None, "write instead of read"),
            opt(None, Some("pattern"), Some("PATTERN"), "the byte the writes fill their buffer with (0)"),
            opt(None, Some("flush-interval"), Some("INTERVAL"), "flush after every INTERVAL requests (write runs only)"),
            opt(None, Some("no-drain"), None, "flush without waiting for the requests in flight"),
            FORCE_SHARE,
        ],
        operands: &[("FILENAME", "the image to run the requests on")],
    },
    Command {
        name: "bitmap",
        about: "Add, remove, clear, enable, disable or merge a persistent dirty bitmap.",
        synopsis: "(--merge SOURCE | --add | --remove | --clear | --enable | --disable)...\n        [-f FMT | --image-opts] [-b SRC_FILENAME [-F SRC_FMT]] [-g SIZE]\n        [--object OBJDEF] FILENAME BITMAP",
        options: &[
            HELP, FORMAT_SHORT, IMAGE_OPTS,
            opt(None, Some("add"), None, "create BITMAP, recording writes from now on"),
            opt(Some('g'), Some("granularity"), Some("SIZE"), "bytes each bit of a new bitmap stands for (--add only)"),
            opt(None, Some("remove"), None, "delete BITMAP"),
            opt(None, Some("clear"), None, "forget what BITMAP recorded"),
            opt(None, Some("enable"), None, "make BITMAP record writes"),
            opt(None, Some("disable"), None, "make BITMAP stop recording writes"),
            opt(None, Some("merge"), Some("SOURCE"), "add what bitmap SOURCE recorded into BITMAP"),
            opt(Some('b'), Some("source-file"), Some("SRC_FILENAME"), "the image holding SOURCE (--merge)"),
            opt(Some('F'), Some("source-format"), Some("SRC_FMT"), "that image's format"),
            OBJECT,
        ],
        operands: &[("FILENAME", "the image"), ("BITMAP", "the bitmap's name")],
    },
    Command {
        name: "check",
        about: "Look for corruptions and leaked clusters in an image, and optionally repair them.",
        synopsis: "[-f FMT | --image-opts] [-T CACHE] [-r leaks|all] [-q] [-U]\n        [--output human|json] [--object OBJDEF] FILENAME",
        options: &[
            HELP, QUIET, FORMAT, IMAGE_OPTS,
            opt(Some('T'), Some("cache"), Some("CACHE"), CACHE),
            FORCE_SHARE, OUTPUT,
            opt(Some('r'), Some("repair"), Some("leaks|all"), "repair leaks only, or everything (opens the image for writing)"),
            OBJECT,
        ],
        operands: &[("FILENAME", "the image to check")],
    },
    Command {
        name: "commit",
        about: "Write an overlay's data into its backing image.",
        synopsis: "[-f FMT | --image-opts] [-t CACHE] [-b BASE] [-d] [-r RATE] [-p] [-q]\n        [--object OBJDEF] FILENAME",
        options: &[
            HELP, QUIET, PROGRESS, FORMAT, IMAGE_OPTS,
            opt(Some('t'), Some("cache"), Some("CACHE"), CACHE),
            opt(Some('d'), Some("drop"), None, "leave FILENAME's data in place afterwards"),
            opt(Some('b'), Some("base"), Some("BASE"), "commit down to this image of the chain (implies -d)"),
            opt(Some('r'), Some("rate"), Some("RATE"), "bandwidth limit: accepted; the commit runs unthrottled"),
            OBJECT,
        ],
        operands: &[("FILENAME", "the overlay to commit")],
    },
    Command {
        name: "compare",
        about: "Tell whether two images hold the same guest data.",
        synopsis: "[--image-opts | [-f FMT] [-F FMT]] [-s] [-T CACHE] [-p] [-q] [-U]\n        [--object OBJDEF] FILENAME1 FILENAME2",
        options: &[
            HELP, QUIET, PROGRESS,
            opt(Some('f'), Some("a-format"), Some("FMT"), "FILENAME1's format (also --left-format)"),
            opt(Some('F'), Some("b-format"), Some("FMT"), "FILENAME2's format (also --right-format)"),
            IMAGE_OPTS,
            opt(Some('s'), Some("strict"), None, "images of different sizes differ"),
            opt(Some('T'), Some("cache"), Some("CACHE"), CACHE),
            FORCE_SHARE, OBJECT,
        ],
        operands: &[("FILENAME1 FILENAME2", "the images to compare")],
    },
    Command {
        name: "convert",
        about: "Copy the guest data of one or more images into a new image, in any format written here.",
        synopsis: "[-f SRC_FMT | --image-opts] [-T SRC_CACHE] [-l SNAPSHOT] [--bitmaps\n        [--skip-broken-bitmaps]] [-O TGT_FMT] [-o TGT_OPTS | --target-image-opts]\n        [-t TGT_CACHE] [-n] [-c] [-B BACKING [-F BACKING_FMT]] [-S SPARSE_SIZE]\n        [-m NUM] [-W] [-C] [-r RATE] [-p] [-q] [-U] [--salvage] [--target-is-zero]\n        [--object OBJDEF] SRC_FILENAME [SRC_FILENAME2 [...]] TGT_FILENAME",
        options: &[
            HELP, QUIET,
            opt(Some('p'), None, None, "report progress as it goes"),
            opt(Some('f'), Some("source-format"), Some("SRC_FMT"), "the sources' format"),
            opt(None, Some("image-opts"), None, "source names are option lists (also --source-image-opts)"),
            opt(Some('l'), Some("snapshot"), Some("SNAPSHOT"), "copy this internal snapshot of the source"),
            opt(Some('T'), Some("source-cache"), Some("SRC_CACHE"), CACHE),
            opt(Some('O'), Some("output-format"), Some("TGT_FMT"), "the new image's format (raw)"),
            opt(None, Some("target-image-opts"), None, "TGT_FILENAME is an option list"),
            opt(Some('o'), Some("options"), Some("TGT_OPTS"), "creation options of the new image ('-o help' lists them)"),
            opt(Some('c'), None, None, "compress the new image's clusters (qcow2)"),
            opt(Some('t'), Some("output-cache"), Some("TGT_CACHE"), CACHE),
            opt(Some('B'), Some("backing"), Some("BACKING"), "make the new image an overlay of BACKING"),
            opt(Some('F'), Some("backing-format"), Some("BACKING_FMT"), "BACKING's format"),
            opt(Some('n'), None, None, "write into TGT_FILENAME as it exists instead of creating it"),
            opt(None, Some("target-is-zero"), None, "the existing target reads as zeros (with -n)"),
            opt(Some('S'), Some("sparse-size"), Some("SPARSE_SIZE"), "zero runs at least this long stay unallocated (0: write everything)"),
            opt(None, Some("bitmaps"), None, "copy the source's persistent bitmaps too"),
            opt(None, Some("skip-broken-bitmaps"), None, "leave out bitmaps that cannot be copied"),
            FORCE_SHARE,
            opt(Some('r'), Some("rate"), Some("RATE"), "bandwidth limit in bytes per second: the copy is paced to it"),
            opt(Some('m'), Some("parallel"), Some("NUM"), "requests in flight (1 to 16)"),
            opt(Some('C'), Some("copy-range-offloading"), None, "copy with copy_file_range where the bytes sit verbatim"),
            opt(None, Some("salvage"), None, "carry on past read errors, writing zeros"),
            opt(Some('W'), Some("oob-writes"), None, "allow writes out of order"),
            OBJECT,
        ],
        operands: &[
            ("SRC_FILENAME", "a source image (several are concatenated)"),
            ("TGT_FILENAME", "the image to write (replaced if it exists, unless -n)"),
        ],
    },
    Command {
        name: "create",
        about: "Create a new image, empty or as an overlay of a backing image.",
        synopsis: "[-f FMT] [-o OPTIONS] [-b BACKING [-F BACKING_FMT]] [-u] [-q]\n        [--object OBJDEF] FILENAME [SIZE]",
        options: &[
            HELP, QUIET,
            opt(Some('f'), Some("format"), Some("FMT"), "the new image's format (raw)"),
            opt(Some('o'), Some("options"), Some("OPTIONS"), "creation options ('-o help' lists them)"),
            opt(Some('b'), Some("backing"), Some("BACKING"), "make the image an overlay of BACKING"),
            opt(Some('F'), Some("backing-format"), Some("BACKING_FMT"), "BACKING's format (needed with -b)"),
            opt(Some('u'), Some("backing-unsafe"), None, "do not open BACKING (SIZE is then needed)"),
            OBJECT,
        ],
        operands: &[
            ("FILENAME", "the image to create (replaced if it exists)"),
            ("SIZE", "virtual size, with an optional k, M, G, T, P or E suffix (powers of 1024); BACKING's size if left out"),
        ],
    },
    Command {
        name: "dd",
        about: "Copy the first bytes of an image into a new image, dd style.",
        synopsis: "[-f FMT | --image-opts] [-O OUTPUT_FMT] [-U] [bs=BLOCK_SIZE]\n        [count=BLOCKS] [skip=BLOCKS] if=INPUT of=OUTPUT",
        options: &[
            HELP, FORMAT, IMAGE_OPTS,
            opt(Some('O'), Some("output-format"), Some("OUTPUT_FMT"), "OUTPUT's format (raw)"),
            FORCE_SHARE, OBJECT,
        ],
        operands: &[
            ("bs=BLOCK_SIZE", "bytes per block (512)"),
            ("count=BLOCKS", "blocks to copy (all of INPUT)"),
            ("skip=BLOCKS", "blocks of INPUT to skip first"),
            ("if=INPUT", "the image to read"),
            ("of=OUTPUT", "the image to create"),
        ],
    },
    Command {
        name: "info",
        about: "Show an image's format, sizes, backing chain, snapshots and bitmaps.",
        synopsis: "[-f FMT | --image-opts] [-b] [-U] [--object OBJDEF]\n        [--output human|json] FILENAME",
        options: &[
            HELP, FORMAT, IMAGE_OPTS,
            opt(Some('b'), Some("backing-chain"), None, "show every image of the backing chain"),
            FORCE_SHARE, OBJECT, OUTPUT,
        ],
        operands: &[("FILENAME", "the image to describe")],
    },
    Command {
        name: "map",
        about: "Show where each range of the guest's data lies: which file, which offset.",
        synopsis: "[-f FMT | --image-opts] [--object OBJDEF] [--output human|json]\n        [-s OFFSET] [-l LENGTH] [-U] FILENAME",
        options: &[
            HELP, FORMAT, IMAGE_OPTS,
            opt(Some('s'), Some("start-offset"), Some("OFFSET"), "start the map at this guest offset"),
            opt(Some('l'), Some("max-length"), Some("LENGTH"), "map at most this many bytes"),
            OUTPUT, FORCE_SHARE, OBJECT,
        ],
        operands: &[("FILENAME", "the image to map")],
    },
    Command {
        name: "measure",
        about: "Compute how large a new image would be, for a size or for an existing image's data.",
        synopsis: "[-f FMT | --image-opts] [-o OPTIONS] [-O OUTPUT_FMT] [--output human|json]\n        [--object OBJDEF] [-l SNAPSHOT] [-U] (--size SIZE | FILENAME)",
        options: &[
            HELP,
            opt(Some('O'), Some("target-format"), Some("OUTPUT_FMT"), "the new image's format (raw)"),
            opt(Some('o'), Some("options"), Some("OPTIONS"), "its creation options"),
            opt(None, Some("size"), Some("SIZE"), "measure an empty image of this virtual size"),
            FORMAT, IMAGE_OPTS,
            opt(Some('l'), Some("snapshot"), Some("SNAPSHOT"), "measure this internal snapshot of FILENAME"),
            OUTPUT, FORCE_SHARE, OBJECT,
        ],
        operands: &[("FILENAME", "the image whose data the new image would hold")],
    },
    Command {
        name: "rebase",
        about: "Put an image on another backing image (or on none), keeping what the guest reads unless -u.",
        synopsis: "[-f FMT | --image-opts] [-t CACHE] [-q] [-U] [-p] [-c]\n        [-b BACKING [-F BACKING_FMT] [-T BACKING_CACHE]] [-u]\n        [--object OBJDEF] FILENAME",
        options: &[
            HELP, QUIET, PROGRESS, FORMAT, IMAGE_OPTS,
            opt(Some('t'), Some("cache"), Some("CACHE"), CACHE),
            opt(Some('b'), Some("backing"), Some("BACKING"), "the new backing image (\"\": none)"),
            opt(Some('F'), Some("backing-format"), Some("BACKING_FMT"), "its format"),
            opt(Some('T'), Some("backing-cache"), Some("CACHE"), CACHE),
            opt(Some('u'), Some("backing-unsafe"), None, "only rewrite the backing reference; copy no data"),
            opt(Some('c'), Some("compress"), None, "compress the clusters the rebase writes"),
            FORCE_SHARE, OBJECT,
        ],
        operands: &[("FILENAME", "the image to rebase")],
    },
    Command {
        name: "resize",
        about: "Change an image's virtual size.",
        synopsis: "[-f FMT | --image-opts] [--preallocation PREALLOC] [--shrink] [-q]\n        [--object OBJDEF] FILENAME [+|-]SIZE",
        options: &[
            HELP, QUIET, FORMAT, IMAGE_OPTS,
            opt(None, Some("preallocation"), Some("PREALLOC"), "how to allocate the added range (off, metadata, falloc, full)"),
            opt(None, Some("shrink"), None, "allow a smaller size (the data past the new end is lost)"),
            OBJECT,
        ],
        operands: &[
            ("FILENAME", "the image to resize"),
            ("[+|-]SIZE", "the new size, or (+/-) the change, with an optional k, M, G, T, P or E suffix"),
        ],
    },
    Command {
        name: "snapshot",
        about: "List, create, apply or delete internal snapshots of a qcow2 image.",
        synopsis: "[-f FMT | --image-opts] [-l | -a SNAPSHOT | -c SNAPSHOT | -d SNAPSHOT]\n        [-q] [-U] [--object OBJDEF] FILENAME",
        options: &[
            HELP, QUIET, FORMAT, IMAGE_OPTS, FORCE_SHARE, OBJECT,
            opt(Some('l'), Some("list"), None, "list the snapshots (what happens without an action)"),
            opt(Some('c'), Some("create"), Some("SNAPSHOT"), "take a snapshot of the image as it is (give the name to -c: in qemu-img 10.0.2 --create takes none)"),
            opt(Some('a'), Some("apply"), Some("SNAPSHOT"), "return the image to the snapshot (-a NAME; --apply takes no name in 10.0.2)"),
            opt(Some('d'), Some("delete"), Some("SNAPSHOT"), "delete the snapshot (-d NAME; --delete takes no name in 10.0.2)"),
        ],
        operands: &[("FILENAME", "the image")],
    },
];

/// Writes `qemu-img COMMAND --help`: the usage block of `command`. Exit code 0, as qemu-img's.
pub(super) fn write_command_help(command: &str, out: &mut impl Write) -> u8 {
    let Some(cmd) = COMMANDS.iter().find(|c| c.name == command) else {
        return 1;
    };
    let mut text = format!(
        "Usage:\n  qemu-img {} {}\n\n{}\n\nArguments:\n",
        cmd.name, cmd.synopsis, cmd.about
    );
    for o in cmd.options {
        let forms = match (o.short, o.long) {
            (Some(s), Some(l)) => format!("-{s}, --{l}"),
            (Some(s), None) => format!("-{s}"),
            (None, Some(l)) => format!("--{l}"),
            (None, None) => continue,
        };
        let arg = o.arg.map(|a| format!(" {a}")).unwrap_or_default();
        text.push_str(&format!("  {forms}{arg}\n     {}\n", o.about));
    }
    for (name, about) in cmd.operands {
        text.push_str(&format!("  {name}\n     {about}\n"));
    }
    u8::from(out.write_all(text.as_bytes()).is_err())
}

/// Writes `qemu-img --help`: the standard options and every command.
pub(super) fn write_top_help(out: &mut impl Write) -> Result<u8, Failure> {
    let mut text = format!(
        "qemu-img version {QEMU_IMG_VERSION} (cowclone {} personality)\n\
         Usage:\n\n  qemu-img [standard options] COMMAND [--help | command options]\n\n\
         qemu-img's command lines, run by cowclone on local qcow2, raw and VDI files.\n\n\
         Standard options:\n  -h, --help\n     show this text and exit\n  \
         -V, --version\n     show the version and exit\n  \
         -T, --trace TRACE\n     QEMU trace events: accepted, nothing is traced\n\n\
         Commands (qemu-img COMMAND --help shows each one's options):\n\n",
        env!("CARGO_PKG_VERSION")
    );
    for cmd in COMMANDS {
        text.push_str(&format!("  {} - {}\n", cmd.name, cmd.about));
    }
    text.push_str(
        "\nImage formats: qcow2, raw, vdi.\n\
         See docs/qemu-img-personality.md for what differs from qemu-img.\n",
    );
    out.write_all(text.as_bytes())
        .map_err(|e| error(e.to_string()))?;
    Ok(0)
}

/// snapshot's long actions as qemu-img 10.0.2 parses them: `--create`, `--apply` and `--delete`
/// take no argument there, so a name after one is a second operand ("Expecting one image file
/// name", as qemu-img says). With the image as the only operand qemu-img crashes on the missing
/// name; here that is refused instead.
pub(super) fn snapshot_long_forms(parsed: &Parsed) -> Result<(), Failure> {
    let Some(action) = parsed
        .opts
        .iter()
        .find(|o| matches!(o.key, "a" | "c" | "d") && o.value.is_none())
    else {
        return Ok(());
    };
    if parsed.operands.len() != 1 {
        return Err(usage("Expecting one image file name"));
    }
    let long = match action.key {
        "a" => "apply",
        "c" => "create",
        _ => "delete",
    };
    Err(error(format!(
        "--{long} takes no snapshot name in qemu-img {QEMU_IMG_VERSION}; use -{} SNAPSHOT",
        action.key
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_has_help_and_each_option_once() {
        for cmd in COMMANDS {
            let mut out = Vec::new();
            assert_eq!(write_command_help(cmd.name, &mut out), 0);
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains(&format!("qemu-img {} ", cmd.name)));
            let mut seen = std::collections::HashSet::new();
            for o in cmd.options {
                assert!(
                    seen.insert((o.short, o.long)),
                    "{} lists {:?} twice",
                    cmd.name,
                    o.long
                );
            }
        }
        assert_eq!(COMMANDS.len(), 15);
    }
}
