//! The qemu-img personality's long options, per-command help and `bench`, against the real
//! qemu-img 10.0 on twin inputs: the same exit codes, stdout and stderr for reads and
//! refusals; for writes, images that `qemu-img compare`, `check` and `info` judge the same.
//! The help test reads the option names out of real qemu-img's help at run time.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::personality::{assert_same, personality_dir, qemu_img_as, twin_dirs};
use crate::util::{
    assert_qemu_check_clean, assert_same_content, describe, qemu_img_ok, qemu_io_in,
};

/// Every command qemu-img 10.0 has.
const COMMANDS: [&str; 15] = [
    "amend", "bench", "bitmap", "check", "commit", "compare", "convert", "create", "dd", "info",
    "map", "measure", "snapshot", "rebase", "resize",
];

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `qemu-img info --output=json` of `path`.
fn info(path: &Path) -> Value {
    serde_json::from_str(&qemu_img_ok(&[&"info", &"--output=json", &path])).unwrap()
}

#[test]
fn long_options_read_and_refuse_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    for args in [
        &["check", "--format", "qcow2", "--output=json", "ov.qcow2"][..],
        &[
            "check",
            "--cache",
            "none",
            "--force-share",
            "--quiet",
            "ov.qcow2",
        ],
        &["check", "--form=qcow2", "base.qcow2"],
        &[
            "compare",
            "--a-format",
            "qcow2",
            "--b-format=qcow2",
            "base.qcow2",
            "ov.qcow2",
        ],
        &[
            "compare",
            "--left-format",
            "qcow2",
            "--right-format",
            "qcow2",
            "--strict",
            "ov.qcow2",
            "ov.qcow2",
        ],
        &[
            "compare",
            "--cache",
            "writeback",
            "--force-share",
            "--quiet",
            "base.qcow2",
            "ov.qcow2",
        ],
        &[
            "map",
            "--format",
            "qcow2",
            "--start-offset",
            "64k",
            "--max-length",
            "2M",
            "--output",
            "json",
            "ov.qcow2",
        ],
        &[
            "measure",
            "--target-format",
            "qcow2",
            "--size",
            "1G",
            "--output",
            "json",
        ],
        &[
            "measure",
            "--format",
            "qcow2",
            "--target-format",
            "qcow2",
            "--options",
            "cluster_size=4096",
            "ov.qcow2",
        ],
        &[
            "snapshot",
            "--list",
            "--force-share",
            "--format",
            "qcow2",
            "base.qcow2",
        ],
        // Refusals: names qemu-img 10.0.2's help shows but its parser refuses, prefixes that are
        // ambiguous, arguments to flags, values it checks.
        &["convert", "--target-format", "raw", "base.qcow2", "t.raw"],
        &[
            "convert",
            "--target-options",
            "size=1M",
            "base.qcow2",
            "t.raw",
        ],
        &["convert", "--source", "qcow2", "base.qcow2", "t.raw"],
        &["convert", "--rate", "-1", "base.qcow2", "t.raw"],
        &["commit", "--rate", "fast", "ov.qcow2"],
        &["create", "--backing-unsafe=yes", "x.qcow2", "1M"],
        &["create", "--format"],
        &["info", "--limits", "base.qcow2"],
        &["info", "--backing-chain=1", "base.qcow2"],
        &["measure", "-s", "1G"],
        &["snapshot", "--create", "s1", "base.qcow2"],
        &["snapshot", "--list=x", "base.qcow2"],
        &["rebase", "--backing", "base.qcow2", "ov.qcow2"],
        &["resize", "--shrink=1", "base.qcow2", "1M"],
        &["bitmap", "--granularity", "64k", "base.qcow2", "b0"],
        &[
            "bitmap",
            "--merge",
            "b0",
            "--source-format",
            "qcow2",
            "base.qcow2",
            "b1",
        ],
        &[
            "bitmap",
            "--add",
            "--source-file",
            "ov.qcow2",
            "base.qcow2",
            "b1",
        ],
        &["dd", "--output-format"],
        &["amend", "--options"],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
    // info: the keys both report, for each image of the chain.
    for args in [
        &["info", "--backing-chain", "--output=json", "ov.qcow2"][..],
        &[
            "info",
            "--format",
            "qcow2",
            "--force-share",
            "--output",
            "json",
            "base.qcow2",
        ],
    ] {
        let theirs = qemu_img_as(None, &dirs[0], args, &[]);
        let ours = qemu_img_as(Some(&bin), &dirs[1], args, &[]);
        assert!(theirs.status.success(), "{}", describe(&theirs));
        assert!(ours.status.success(), "{}", describe(&ours));
        let as_list = |v: Value| match v {
            Value::Array(items) => items,
            one => vec![one],
        };
        let theirs = as_list(serde_json::from_slice(&theirs.stdout).unwrap());
        let ours = as_list(serde_json::from_slice(&ours.stdout).unwrap());
        assert_eq!(ours.len(), theirs.len(), "{args:?}: images listed");
        for (ours, theirs) in ours.iter().zip(&theirs) {
            for key in ["filename", "format", "virtual-size", "backing-filename"] {
                assert_eq!(ours[key], theirs[key], "{args:?}: {key}");
            }
        }
    }
}

#[test]
fn long_options_write_what_qemu_img_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    for args in [
        &[
            "create",
            "--format",
            "qcow2",
            "--options",
            "cluster_size=4096",
            "--quiet",
            "new.qcow2",
            "3M",
        ][..],
        &[
            "create",
            "--format=qcow2",
            "--backing",
            "base.qcow2",
            "--backing-format",
            "qcow2",
            "ov2.qcow2",
        ],
        &[
            "create",
            "-f",
            "qcow2",
            "--backing",
            "gone.qcow2",
            "--backing-format",
            "qcow2",
            "--backing-unsafe",
            "dangling.qcow2",
            "1M",
        ],
        &[
            "convert",
            "--source-format",
            "qcow2",
            "--output-format",
            "qcow2",
            "--options",
            "cluster_size=65536",
            "--sparse-size",
            "4k",
            "--parallel",
            "4",
            "--oob-writes",
            "--rate",
            "1M",
            "--output-cache",
            "unsafe",
            "--source-cache",
            "none",
            "ov.qcow2",
            "conv.qcow2",
        ],
        &[
            "convert",
            "--source-image-opts",
            "driver=qcow2,file.filename=ov.qcow2",
            "conv.raw",
        ],
        &[
            "convert",
            "-O",
            "qcow2",
            "--backing",
            "base.qcow2",
            "--backing-format",
            "qcow2",
            "ov.qcow2",
            "conv-ov.qcow2",
        ],
        &["resize", "--format", "qcow2", "--quiet", "new.qcow2", "4M"],
        &[
            "snapshot",
            "--format",
            "qcow2",
            "--quiet",
            "-c",
            "s1",
            "new.qcow2",
        ],
        &[
            "bitmap",
            "--add",
            "--granularity",
            "128k",
            "new.qcow2",
            "b0",
        ],
        &["bitmap", "--add", "new.qcow2", "b1"],
        &["bitmap", "--merge", "b0", "new.qcow2", "b1"],
        &["bitmap", "--disable", "--clear", "new.qcow2", "b1"],
        &[
            "dd",
            "--format",
            "qcow2",
            "--output-format",
            "qcow2",
            "bs=64k",
            "if=ov.qcow2",
            "of=dd.qcow2",
        ],
        &[
            "amend",
            "--format",
            "qcow2",
            "--options",
            "lazy_refcounts=on",
            "--quiet",
            "--cache",
            "none",
            "base.qcow2",
        ],
        &[
            "rebase",
            "--format",
            "qcow2",
            "--backing",
            "base.qcow2",
            "--backing-format",
            "qcow2",
            "--backing-cache",
            "none",
            "--cache",
            "none",
            "--compress",
            "--quiet",
            "ov2.qcow2",
        ],
        &[
            "rebase",
            "--backing",
            "",
            "--backing-unsafe",
            "--quiet",
            "dangling.qcow2",
        ],
        &[
            "commit", "--format", "qcow2", "--drop", "--rate", "1M", "--cache", "none", "--quiet",
            "ov.qcow2",
        ],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
    for name in [
        "new.qcow2",
        "ov2.qcow2",
        "dangling.qcow2",
        "conv.qcow2",
        "conv.raw",
        "conv-ov.qcow2",
        "dd.qcow2",
        "base.qcow2",
        "ov.qcow2",
    ] {
        let (theirs, ours) = (dirs[0].join(name), dirs[1].join(name));
        if name.ends_with(".qcow2") && name != "dangling.qcow2" {
            assert_qemu_check_clean(&ours, name);
            assert_same_content(&theirs, &ours, name);
        }
        let (theirs, ours) = (info(&theirs), info(&ours));
        for key in [
            "format",
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "snapshots",
        ] {
            assert_eq!(ours[key]["name"], theirs[key]["name"], "{name}: {key}");
            if key != "snapshots" {
                assert_eq!(ours[key], theirs[key], "{name}: {key}");
            }
        }
        let specific = |v: &Value, key: &str| v["format-specific"]["data"][key].clone();
        for key in ["bitmaps", "lazy-refcounts", "compat"] {
            assert_eq!(
                specific(&ours, key),
                specific(&theirs, key),
                "{name}: {key}"
            );
        }
    }
    let snapshots = |dir: &Path| {
        let out = qemu_img_ok(&[&"snapshot", &"-l", &dir.join("new.qcow2")]);
        out.lines()
            .skip(2)
            .map(|l| l.split_whitespace().nth(1).map(str::to_owned))
            .collect::<Vec<_>>()
    };
    assert_eq!(snapshots(&dirs[1]), snapshots(&dirs[0]), "snapshot names");
}

/// The option names (`--name`) a help text shows.
fn long_names(help: &str) -> BTreeSet<String> {
    help.split(|c: char| c.is_whitespace() || matches!(c, '[' | ']' | '(' | ')' | '|' | ','))
        .filter_map(|w| w.strip_prefix("--"))
        .map(|w| {
            w.trim_end_matches(|c: char| !c.is_ascii_alphanumeric())
                .to_owned()
        })
        .filter(|w| !w.is_empty() && w.chars().next().is_some_and(|c| c.is_ascii_lowercase()))
        .collect()
}

#[test]
fn help_names_every_option_qemu_img_accepts_and_exits_as_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dir = tmp.path();
    let real_top = qemu_img_as(None, dir, &["--help"], &[]);
    let ours_top = qemu_img_as(Some(&bin), dir, &["--help"], &[]);
    assert_eq!(
        ours_top.status.code(),
        real_top.status.code(),
        "--help exit code"
    );
    let ours_top = text(&ours_top.stdout);
    // The commands real qemu-img lists ("  NAME - what it does").
    let listed: Vec<String> = text(&real_top.stdout)
        .lines()
        .filter_map(|l| {
            l.strip_prefix("  ")?
                .split_once(" - ")
                .map(|(n, _)| n.to_owned())
        })
        .collect();
    assert_eq!(
        listed.len(),
        COMMANDS.len(),
        "real qemu-img lists {listed:?}"
    );
    for command in &listed {
        assert!(
            ours_top.contains(&format!("  {command} - ")),
            "qemu-img --help lacks {command}"
        );
    }
    for command in COMMANDS {
        for flag in ["--help", "-h"] {
            let theirs = qemu_img_as(None, dir, &[command, flag], &[]);
            let ours = qemu_img_as(Some(&bin), dir, &[command, flag], &[]);
            assert_eq!(ours.status.code(), theirs.status.code(), "{command} {flag}");
            assert_eq!(ours.stderr, theirs.stderr, "{command} {flag}: stderr");
            assert!(
                ours.stdout.starts_with(b"Usage:\n"),
                "{command} {flag}: {}",
                describe(&ours)
            );
        }
        let theirs = text(&qemu_img_as(None, dir, &[command, "--help"], &[]).stdout);
        let ours = text(&qemu_img_as(Some(&bin), dir, &[command, "--help"], &[]).stdout);
        let ours_names = long_names(&ours);
        for name in long_names(&theirs) {
            let option = format!("--{name}");
            // What real qemu-img's parser makes of the name: refused, or an option.
            let real = qemu_img_as(None, dir, &[command, &option, "-h"], &[]);
            let refused = text(&real.stderr).contains("unrecognized option");
            let mine = qemu_img_as(Some(&bin), dir, &[command, &option, "-h"], &[]);
            // A flag leaves -h to print the help (exit 0); an option takes "-h" as its value,
            // and what it makes of it is not this test's subject, only that it is an option.
            if real.status.success() {
                assert!(
                    mine.status.success(),
                    "{command} {option} -h: {}",
                    describe(&mine)
                );
            } else {
                assert!(
                    mine.status.code().is_some_and(|c| c != 0),
                    "{command} {option} -h: {}",
                    describe(&mine)
                );
            }
            let mine_refused = ["unrecognized option", "is ambiguous"]
                .iter()
                .any(|m| text(&mine.stderr).contains(m));
            assert_eq!(
                mine_refused,
                refused,
                "{command} {option}: {}",
                describe(&mine)
            );
            if refused {
                assert_eq!(text(&mine.stderr), text(&real.stderr), "{command} {option}");
                assert!(
                    !ours_names.contains(&name),
                    "{command} --help names {option}, which qemu-img refuses"
                );
            } else {
                // A name qemu-img takes (maybe as the prefix of a longer one) is in our help.
                assert!(
                    ours_names.iter().any(|n| n.starts_with(&name)),
                    "{command} --help does not name {option}:\n{ours}"
                );
            }
        }
    }
}

/// `qemu-img bench ARGS` in both twin directories, the run time masked; asserts the same exit
/// code, stdout and stderr.
fn assert_same_bench(bin: &Path, dirs: &[PathBuf; 2], args: &[&str]) {
    let mut all = vec!["bench"];
    all.extend_from_slice(args);
    let mask = |out: &[u8]| {
        text(out)
            .lines()
            .map(|l| match l.strip_prefix("Run completed in ") {
                Some(rest) => {
                    let seconds = rest.strip_suffix(" seconds.").expect("seconds");
                    let (whole, fraction) = seconds.split_once('.').expect("X.XXX");
                    assert!(whole.parse::<u64>().is_ok() && fraction.len() == 3, "{l}");
                    "Run completed in X seconds.".to_owned()
                }
                None => l.to_owned(),
            })
            .collect::<Vec<_>>()
    };
    let theirs = qemu_img_as(None, &dirs[0], &all, &[]);
    let ours = qemu_img_as(Some(bin), &dirs[1], &all, &[]);
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "bench {args:?}: {}",
        describe(&ours)
    );
    assert_eq!(
        mask(&ours.stdout),
        mask(&theirs.stdout),
        "bench {args:?}: stdout"
    );
    assert_eq!(
        text(&ours.stderr),
        text(&theirs.stderr),
        "bench {args:?}: stderr"
    );
}

#[test]
fn bench_reports_refuses_and_writes_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    for args in [
        &["-c", "100", "ov.qcow2"][..],
        &[
            "--count",
            "0x20",
            "--depth",
            "4",
            "--buffer-size",
            "1k",
            "--step-size",
            "3k",
            "--offset",
            "1.5k",
            "ov.qcow2",
        ],
        &["-c", "3", "-o", "4190208", "base.qcow2"],
        &[
            "-c", "2", "-s", "3000", "-S", "0", "-t", "none", "-i", "io_uring", "-U", "-q",
            "raw.img",
        ],
        &["-c", "010", "-f", "raw", "raw.img"],
        // Past the end: the first request, a request larger than the image.
        &["-c", "1", "-o", "4M", "base.qcow2"],
        &["-c", "1", "-s", "2M", "raw.img"],
        // Refusals, worded and exiting as qemu-img's.
        &["-c", "x", "base.qcow2"],
        &["-c", "0", "base.qcow2"],
        &["-d", "99999999999", "base.qcow2"],
        &["-s", "1.5", "base.qcow2"],
        &["-s", "-1", "base.qcow2"],
        &["-S", "3G", "base.qcow2"],
        &["-o", "x", "base.qcow2"],
        &["--pattern", "256", "base.qcow2"],
        &["--pattern", "x", "-w", "base.qcow2"],
        &["--flush-interval", "2", "base.qcow2"],
        &["-w", "--flush-interval", "2", "base.qcow2"],
        &["-w", "--flush-interval", "x", "base.qcow2"],
        &["-t", "bogus", "base.qcow2"],
        &["-i", "bogus", "base.qcow2"],
        &["-n", "-c", "1", "base.qcow2"],
        &["-w", "-U", "base.qcow2"],
        &["-c", "1"],
        &["-c", "1", "base.qcow2", "ov.qcow2"],
        &["--count"],
        &["--no-drain=1", "base.qcow2"],
        &["-x", "base.qcow2"],
    ] {
        assert_same_bench(&bin, &dirs, args);
    }
    // Writes: the same requests leave the same guest data, and a clean image.
    for args in [
        &[
            "-w",
            "-c",
            "40",
            "-s",
            "3000",
            "-S",
            "100000",
            "-o",
            "100",
            "--pattern",
            "0xab",
            "ov.qcow2",
        ][..],
        &[
            "--write",
            "--count",
            "300",
            "--depth",
            "2",
            "--flush-interval",
            "16",
            "--no-drain",
            "--pattern",
            "7",
            "-s",
            "64k",
            "base.qcow2",
        ],
        &[
            "-w",
            "-c",
            "20",
            "-s",
            "4k",
            "-S",
            "60k",
            "--pattern",
            "0x5a",
            "raw.img",
        ],
    ] {
        assert_same_bench(&bin, &dirs, args);
    }
    for name in ["ov.qcow2", "base.qcow2", "raw.img"] {
        let (theirs, ours) = (dirs[0].join(name), dirs[1].join(name));
        assert_same_content(&theirs, &ours, name);
        if name.ends_with(".qcow2") {
            assert_qemu_check_clean(&ours, name);
        }
    }
    // The pattern is where the requests went: ov.qcow2's 40 requests of 3000 bytes from 100,
    // 100000 apart (wrapping at 4 MiB); base.qcow2 all 7s (300 × 64 KiB wraps over 4 MiB).
    let mut reads = Vec::new();
    for i in 0..40u64 {
        let offset = (100 + i * 100_000) % (4 << 20);
        reads.push(format!("read -P 0xab {offset} 3000"));
    }
    let reads: Vec<&str> = reads.iter().map(String::as_str).collect();
    qemu_io_in(&dirs[1], "ov.qcow2", &reads);
    qemu_io_in(&dirs[1], "base.qcow2", &["read -P 7 0 4M"]);
}
