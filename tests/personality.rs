//! The qemu-img personality (cowclone run as `qemu-img`) against the real qemu-img on the same
//! inputs: exit codes, standard output, the error messages of common mistakes, and the files
//! written (judged by `qemu-img compare` and `qemu-img check`). The locks and the registry
//! guards stay on under the personality.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::util::{
    assert_qemu_check_clean, cowclone, cowclone_bin, describe, qemu_img_ok, qemu_io_ok,
    qemu_overlay, run,
};

/// A directory holding a `qemu-img` symlink to cowclone (the personality's usual install).
pub(crate) fn personality_dir(tmp: &Path) -> PathBuf {
    let dir = tmp.join("personality-bin");
    std::fs::create_dir_all(&dir).unwrap();
    let link = dir.join("qemu-img");
    if !link.exists() {
        std::os::unix::fs::symlink(cowclone_bin(), &link).unwrap();
    }
    dir
}

/// Runs `qemu-img ARGS` in `dir`, as `qemu-img` found on PATH (so that argv[0], which usage
/// messages repeat, is the same for both): the personality when `bin` is given, else the real
/// qemu-img.
pub(crate) fn qemu_img_as(
    bin: Option<&Path>,
    dir: &Path,
    args: &[&str],
    env: &[(&str, &OsStr)],
) -> Output {
    let mut command = Command::new("qemu-img");
    command.args(args).current_dir(dir);
    if let Some(bin) = bin {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths = vec![bin.to_path_buf()];
        paths.extend(std::env::split_paths(&path));
        command.env("PATH", std::env::join_paths(paths).unwrap());
    }
    for (key, value) in env {
        command.env(key, value);
    }
    match command.output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("qemu-img not found: install the Debian package qemu-utils")
        }
        Err(e) => panic!("cannot run qemu-img: {e}"),
    }
}

/// Two directories with the same images, made by the real qemu-img and qemu-io: `base.qcow2`
/// (4 MiB: data, a zero run) and `ov.qcow2` over it (data across the base's), and `raw.img`.
/// One is for the real qemu-img, one for the personality.
pub(crate) fn twin_dirs(tmp: &Path) -> [PathBuf; 2] {
    let dirs = [tmp.join("qemu"), tmp.join("cowclone")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        let base = dir.join("base.qcow2");
        let ov = dir.join("ov.qcow2");
        qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &base, &"4M"]);
        qemu_io_ok(&[
            &"-f",
            &"qcow2",
            &"-c",
            &"write -P 0x11 0 1M",
            &"-c",
            &"write -z 2M 64k",
            &base,
        ]);
        qemu_overlay("base.qcow2", &ov);
        qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0x22 512k 1M", &ov]);
        std::fs::write(dir.join("raw.img"), vec![0x33u8; 1 << 20]).unwrap();
    }
    dirs
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Runs `args` with the real qemu-img in `dirs[0]` and the personality in `dirs[1]`; asserts
/// the same exit code and the same stdout (`stdout`) and/or stderr (`stderr`).
pub(crate) fn assert_same(
    bin: &Path,
    dirs: &[PathBuf; 2],
    args: &[&str],
    stdout: bool,
    stderr: bool,
) {
    let theirs = qemu_img_as(None, &dirs[0], args, &[]);
    let ours = qemu_img_as(Some(bin), &dirs[1], args, &[]);
    let line = args.join(" ");
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "qemu-img {line}: exit codes differ\nqemu-img: {}\npersonality: {}",
        describe(&theirs),
        describe(&ours)
    );
    if stdout {
        assert_eq!(
            text(&ours.stdout),
            text(&theirs.stdout),
            "qemu-img {line}: stdout"
        );
    }
    if stderr {
        assert_eq!(
            text(&ours.stderr),
            text(&theirs.stderr),
            "qemu-img {line}: stderr"
        );
    }
}

#[test]
fn personality_reports_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    for args in [
        &["map", "--output=json", "ov.qcow2"][..],
        &["map", "ov.qcow2"],
        &["map", "-f", "qcow2", "--output", "json", "base.qcow2"],
        &["check", "ov.qcow2"],
        &["check", "--output=json", "ov.qcow2"],
        &["check", "-U", "--output=json", "base.qcow2"],
        &["compare", "base.qcow2", "ov.qcow2"],
        &[
            "compare", "-f", "qcow2", "-F", "qcow2", "ov.qcow2", "ov.qcow2",
        ],
        &["compare", "-q", "base.qcow2", "ov.qcow2"],
        &["check", "-q", "ov.qcow2"],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
    // info: the keys both report (qemu-img 10 also lists child nodes, which cowclone lacks).
    let keys = [
        "filename",
        "format",
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "dirty-flag",
        "format-specific",
    ];
    for args in [
        &["info", "--output=json", "ov.qcow2"][..],
        &["info", "--output", "json", "-U", "base.qcow2"],
        &["info", "--output=json", "file:ov.qcow2"],
    ] {
        let theirs = qemu_img_as(None, &dirs[0], args, &[]);
        let ours = qemu_img_as(Some(&bin), &dirs[1], args, &[]);
        assert!(theirs.status.success(), "{}", describe(&theirs));
        assert!(ours.status.success(), "{}", describe(&ours));
        let theirs: Value = serde_json::from_slice(&theirs.stdout).unwrap();
        let ours: Value = serde_json::from_slice(&ours.stdout).unwrap();
        for key in keys {
            assert_eq!(ours[key], theirs[key], "info {args:?}: key {key}");
        }
    }
    // The json: and --image-opts names of a local file read the same image as its path.
    let plain = qemu_img_as(
        Some(&bin),
        &dirs[1],
        &["map", "--output=json", "ov.qcow2"],
        &[],
    );
    for args in [
        &[
            "map",
            "--output=json",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"ov.qcow2"}}"#,
        ][..],
        &[
            "map",
            "--output=json",
            "--image-opts",
            "driver=qcow2,file.driver=file,file.filename=ov.qcow2",
        ],
    ] {
        let ours = qemu_img_as(Some(&bin), &dirs[1], args, &[]);
        assert!(ours.status.success(), "{}", describe(&ours));
        assert_eq!(text(&ours.stdout), text(&plain.stdout), "{args:?}");
        assert_same(&bin, &dirs, args, true, false);
    }
}

#[test]
fn personality_refuses_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    for args in [
        &["frobnicate"][..],
        &[],
        &["info"],
        &["check", "-x", "ov.qcow2"],
        &["check", "--foo", "ov.qcow2"],
        &["check", "--force-share=on", "ov.qcow2"],
        &["info", "-f"],
        &["info", "--output"],
        &["info", "--f", "ov.qcow2"],
        &["info", "--output=xml", "ov.qcow2"],
        &["check", "-r", "foo", "ov.qcow2"],
        &["check", "a", "b"],
        &["compare", "ov.qcow2"],
        &["create"],
        &["create", "-f", "qcow2", "x.qcow2", "1M", "extra"],
        &["create", "-f", "qcow2", "-b", "base.qcow2", "y.qcow2"],
        &["create", "-f", "qcow2", "-o", ",,", "y.qcow2", "1M"],
        &["create", "-f", "qcow2", "-o", ",help", "y.qcow2", "1M"],
        &["convert", "ov.qcow2"],
        &["rebase", "ov.qcow2"],
        &["resize", "ov.qcow2"],
        &["measure", "a", "b"],
        &["info", "nosuch"],
        &["check", "nosuch"],
        &["map", "nosuch"],
        &["convert", "-O", "qcow2", "nosuch", "x.qcow2"],
        &["compare", "nosuch", "ov.qcow2"],
        &["info", "foo:bar"],
        &["resize", "ov.qcow2", "1M"],
        // Cache modes: -T is the source cache in qemu-img's words, compare fails with 2,
        // convert checks -T before -t and rebase -t before -T, amend only with options.
        &["check", "-T", "bogus", "ov.qcow2"],
        &["compare", "-T", "bogus", "ov.qcow2", "ov.qcow2"],
        &["commit", "-t", "bogus", "ov.qcow2"],
        &[
            "convert", "-t", "bogus1", "-T", "bogus2", "-O", "raw", "ov.qcow2", "x.qcow2",
        ],
        &[
            "rebase", "-t", "bogus1", "-T", "bogus2", "-b", "", "ov.qcow2",
        ],
        &["amend", "-t", "bogus", "-o", "compat=1.1", "ov.qcow2"],
        &["amend", "-t", "bogus", "ov.qcow2"],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
    // Neither wrote anything.
    for dir in &dirs {
        assert!(!dir.join("x.qcow2").exists() && !dir.join("y.qcow2").exists());
    }
}

/// sha256 of a file, for "not modified" checks.
fn digest(path: &Path) -> String {
    let out = run("sha256sum", "coreutils", None, &[&path]);
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_owned()
}

#[test]
fn personality_writes_what_qemu_img_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    for dir in &dirs {
        std::fs::write(dir.join("old.qcow2"), b"not an image, to be replaced").unwrap();
        std::fs::write(dir.join("conv.qcow2"), vec![0x44u8; 3 << 20]).unwrap();
    }
    for args in [
        // create replaces an existing file; -o backing_file/backing_fmt are -b/-F.
        &["create", "-f", "qcow2", "old.qcow2", "8M"][..],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2,cluster_size=4096",
            "ov2.qcow2",
        ],
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov3.qcow2",
            "6M",
        ],
        // convert replaces its target too.
        &["convert", "-O", "qcow2", "ov.qcow2", "conv.qcow2"],
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-c",
            "raw.img",
            "rawc.qcow2",
        ],
        // --shrink drops the data past the new end.
        &["resize", "--shrink", "ov.qcow2", "1536K"],
        &["resize", "-q", "base.qcow2", "+2M"],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
    for name in [
        "old.qcow2",
        "ov2.qcow2",
        "ov3.qcow2",
        "conv.qcow2",
        "rawc.qcow2",
        "ov.qcow2",
        "base.qcow2",
    ] {
        let (theirs, ours) = (dirs[0].join(name), dirs[1].join(name));
        assert_qemu_check_clean(&ours, name);
        let out = crate::util::qemu_img(&[&"compare", &"-s", &theirs, &ours]);
        assert_eq!(out.status.code(), Some(0), "{name}: {}", describe(&out));
        let info = |path: &Path| -> Value {
            let out = qemu_img_ok(&[&"info", &"--output=json", &path]);
            serde_json::from_str(&out).unwrap()
        };
        let (theirs, ours) = (info(&theirs), info(&ours));
        for key in [
            "virtual-size",
            "cluster-size",
            "backing-filename",
            "backing-filename-format",
        ] {
            assert_eq!(ours[key], theirs[key], "{name}: {key}");
        }
    }
}

#[test]
fn personality_keeps_the_locks_and_the_registry_guards() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());

    // An image a qemu process has open for writing: both refuse to replace it, alike.
    let held = dirs[1].join("ov.qcow2");
    // Returns once qemu-io has opened the image (its prompt), so holds its locks: polling
    // with qemu-img info instead could take a read lock just as qemu-io asked for its own.
    let holder = crate::locking::Holder::qemu_io(&held, false);
    let before = digest(&held);
    let args = ["create", "-f", "qcow2", "ov.qcow2", "1M"];
    let theirs = qemu_img_as(None, &dirs[1], &args, &[]);
    let ours = qemu_img_as(Some(&bin), &dirs[1], &args, &[]);
    for args in [&["resize", "ov.qcow2", "8M"][..], &["commit", "ov.qcow2"]] {
        let ours = qemu_img_as(Some(&bin), &dirs[1], args, &[]);
        assert_eq!(ours.status.code(), Some(1), "{args:?}: {}", describe(&ours));
        assert!(
            text(&ours.stderr).contains("Failed to get \"write\" lock"),
            "{}",
            describe(&ours)
        );
    }
    drop(holder);
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "{}",
        describe(&ours)
    );
    assert_eq!(ours.status.code(), Some(1));
    assert_eq!(text(&ours.stderr), text(&theirs.stderr));
    assert_eq!(digest(&held), before, "the image in use was modified");

    // A registered base: the personality refuses to write it as every cowclone command does.
    let home = tmp.path().join("home");
    let base = dirs[1].join("base.qcow2");
    let out = cowclone(&[&"base", &"register", &"b", &base, &"--home", &home]);
    assert!(out.status.success(), "{}", describe(&out));
    let before = digest(&base);
    let env = [("COWCLONE_HOME", home.as_os_str())];
    for args in [
        &["create", "-f", "qcow2", "base.qcow2", "1M"][..],
        &["convert", "-O", "qcow2", "raw.img", "base.qcow2"],
        &["resize", "base.qcow2", "8M"],
        &["commit", "ov.qcow2"],
        &["rebase", "-u", "-b", "", "base.qcow2"],
    ] {
        let ours = qemu_img_as(Some(&bin), &dirs[1], args, &env);
        assert_eq!(ours.status.code(), Some(1), "{args:?}: {}", describe(&ours));
        assert!(
            text(&ours.stderr).starts_with("qemu-img: ")
                && text(&ours.stderr).contains("registered base \"b\""),
            "{args:?}: {}",
            describe(&ours)
        );
    }
    assert_eq!(digest(&base), before, "the registered base was modified");
}

#[test]
fn cowclone_qemu_img_is_the_same_personality_and_cowclone_keeps_its_defaults() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    let ov = dirs[1].join("ov.qcow2");
    let via_link = qemu_img_as(
        Some(&bin),
        &dirs[1],
        &["map", "--output=json", "ov.qcow2"],
        &[],
    );
    let via_sub = cowclone(&[&"qemu-img", &"map", &"--output=json", &ov]);
    assert!(via_sub.status.success(), "{}", describe(&via_sub));
    assert_eq!(text(&via_sub.stdout), text(&via_link.stdout));
    let refused = cowclone(&[&"qemu-img", &"frobnicate"]);
    assert_eq!(refused.status.code(), Some(1));
    assert_eq!(
        text(&refused.stderr),
        "qemu-img: Command not found: frobnicate\nTry 'qemu-img --help' for more info\n"
    );
    // Run as cowclone, an existing file is not replaced without --overwrite.
    let before = digest(&ov);
    let out = cowclone(&[&"create", &"-f", &"qcow2", &ov, &"1M"]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert_eq!(digest(&ov), before);
}

/// Found by iotest 292: growing an image after a shrink must not bring back the data a shrink
/// left in the tail of its last cluster, nor let a larger backing file show through.
#[test]
fn regression_grow_after_shrink_reads_zeros_past_the_old_end() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dir = tmp.path();
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &dir.join("base.qcow2"),
        &"1M",
    ]);
    qemu_io_ok(&[
        &"-f",
        &"qcow2",
        &"-c",
        &"write -P 0x11 0 1M",
        &dir.join("base.qcow2"),
    ]);
    let top = dir.join("top.qcow2");
    qemu_overlay("base.qcow2", &top);
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0x22 0 1M", &top]);
    for args in [
        &["resize", "--shrink", "top.qcow2", "520k"][..],
        &["resize", "top.qcow2", "567k"],
    ] {
        let out = qemu_img_as(Some(&bin), dir, args, &[]);
        assert!(out.status.success(), "{args:?}: {}", describe(&out));
    }
    qemu_io_ok(&[
        &"-f",
        &"qcow2",
        &"-c",
        &"read -P 0x22 0 520k",
        &"-c",
        &"read -P 0 520k 47k",
        &top,
    ]);
    assert_qemu_check_clean(&top, "grown after a shrink");
}

/// Found by iotest 252: a safe rebase onto a backing file that holds data where the old chain
/// read zeros must keep those zeros (as zero clusters), as qemu-img rebase does.
#[test]
fn regression_safe_rebase_keeps_zeros_over_new_backing_data() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = [tmp.path().join("qemu"), tmp.path().join("cowclone")];
    let cluster = 65536;
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        let (img, base) = (dir.join("t.qcow2"), dir.join("base_new.qcow2"));
        for path in [&img, &base] {
            qemu_img_ok(&[
                &"create",
                &"-q",
                &"-f",
                &"qcow2",
                path,
                &(6 * cluster).to_string(),
            ]);
        }
        let w = |spec: String| format!("write -P {spec}");
        qemu_io_ok(&[
            &"-f",
            &"qcow2",
            &"-c",
            &w(format!("0x22 0 {}", 2 * cluster)),
            &"-c",
            &w(format!("0x11 {} {}", 2 * cluster, 2 * cluster)),
            &img,
        ]);
        for at in [0, 2, 4] {
            qemu_io_ok(&[
                &"-f",
                &"qcow2",
                &"-c",
                &w(format!("0x11 {} {cluster}", at * cluster)),
                &base,
            ]);
        }
    }
    let args = ["rebase", "-b", "base_new.qcow2", "-F", "qcow2", "t.qcow2"];
    assert_same(&bin, &dirs, &args, true, true);
    let ours = dirs[1].join("t.qcow2");
    qemu_io_ok(&[
        &"-f",
        &"qcow2",
        &"-c",
        &format!("read -P 0 {} {}", 4 * cluster, 2 * cluster),
        &ours,
    ]);
    let out = crate::util::qemu_img(&[&"compare", &dirs[0].join("t.qcow2"), &ours]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    assert_qemu_check_clean(&ours, "rebased");
}

/// iotests 126 and 031: a `file:` name is echoed as given in the "Formatting" line and opens
/// `./NAME` when NAME has a colon before any slash (so `info` shows `image: ./image:top.qcow2`
/// and `(actual path: ./base.qcow2)`); `create -u` and `rebase -u` write a backing format
/// cowclone does not read (`host_device`) as qemu-img does, byte for byte, while cowclone
/// still refuses to open that backing file.
#[test]
fn personality_names_files_and_backing_formats_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = [tmp.path().join("qemu"), tmp.path().join("cowclone")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
    }
    let same = |args: &[&str]| assert_same(&bin, &dirs, args, true, true);
    same(&["create", "-f", "qcow2", "base.qcow2", "64M"]);
    same(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "file:image:top.qcow2",
    ]);
    // Allocation differs (cowclone writes sparse files): the rest of info must not.
    let info = |bin: Option<&Path>, dir: &Path| {
        let out = qemu_img_as(bin, dir, &["info", "file:image:top.qcow2"], &[]);
        assert!(out.status.success(), "{}", describe(&out));
        text(&out.stdout)
            .lines()
            .filter(|l| !l.trim_start().starts_with("disk size:"))
            .collect::<Vec<_>>()
            .join("\n")
    };
    let theirs = info(None, &dirs[0]);
    assert!(theirs.contains("image: ./image:top.qcow2"), "{theirs}");
    assert!(theirs.contains("(actual path: ./base.qcow2)"), "{theirs}");
    assert_eq!(info(Some(&bin), &dirs[1]), theirs);

    same(&[
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/some/path",
        "-F",
        "host_device",
        "hd.qcow2",
        "1M",
    ]);
    same(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "compat=0.10",
        "v2.qcow2",
        "64M",
    ]);
    same(&["rebase", "-u", "-b", "", "v2.qcow2"]);
    same(&[
        "rebase",
        "-u",
        "-b",
        "/some/backing/file/path",
        "-F",
        "host_device",
        "v2.qcow2",
    ]);
    for name in ["hd.qcow2", "v2.qcow2"] {
        assert_eq!(
            digest(&dirs[1].join(name)),
            digest(&dirs[0].join(name)),
            "{name}: cowclone wrote other bytes than qemu-img"
        );
    }
    // Not a qemu block driver: both refuse, in the same words.
    same(&["rebase", "-u", "-b", "/x", "-F", "foo", "v2.qcow2"]);
    // (qemu-img prints its "Formatting" line before this refusal; cowclone does not.)
    let create_foo = [
        "create",
        "-f",
        "qcow2",
        "-u",
        "-b",
        "/x",
        "-F",
        "foo",
        "foo.qcow2",
        "1M",
    ];
    assert_same(&bin, &dirs, &create_foo, false, true);
    // cowclone opens no backing file of a format it does not read.
    let out = cowclone(&[&"info", &"--backing-chain", &dirs[1].join("hd.qcow2")]);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        text(&out.stderr).contains("host_device"),
        "{}",
        describe(&out)
    );
}

/// Overwrites `bytes` at `offset` in the file at `path`.
pub(crate) fn poke(path: &Path, offset: u64, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(bytes, offset).unwrap();
}

/// Reads `len` bytes at `offset` of the file at `path`.
pub(crate) fn peek(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut bytes = vec![0u8; len];
    let file = std::fs::File::open(path).unwrap();
    file.read_exact_at(&mut bytes, offset).unwrap();
    bytes
}

/// In both directories, a fresh 64 MiB qcow2 image `name` made by the real qemu-img, changed by
/// `edit` (the same bytes in both).
fn twin_images(dirs: &[PathBuf; 2], name: &str, edit: impl Fn(&Path)) {
    for dir in dirs {
        let path = dir.join(name);
        qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &path, &"64M"]);
        edit(&path);
    }
}

#[test]
fn personality_words_format_refusals_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    // Values the format's create refuses: qemu-img prints its "Formatting" line first.
    for options in [
        "cluster_size=4M",
        "refcount_bits=0",
        "refcount_bits=128",
        "refcount_bits=42",
        "compat=0.10,refcount_bits=1",
        "compat=0.10,refcount_bits=64",
        "extended_l2=on,cluster_size=8k",
        "compat=foo",
    ] {
        assert_same(
            &bin,
            &dirs,
            &["create", "-f", "qcow2", "-o", options, "new.qcow2", "64M"],
            true,
            true,
        );
    }
    for args in [
        // A size no L1 table of 64 KiB clusters maps (refused after the line).
        &["create", "-f", "qcow2", "new.qcow2", "1E"][..],
        // A value that is no number, an unknown option (refused before the line).
        &["create", "-f", "qcow2", "-o", "foo=1", "new.qcow2", "64M"],
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=abc",
            "new.qcow2",
            "64M",
        ],
        // measure: a size no L1 table maps, extended L2 entries in small clusters.
        &[
            "measure",
            "-O",
            "qcow2",
            "--size",
            "1025T",
            "-o",
            "extended_l2=on,cluster_size=64k",
        ],
        &[
            "measure",
            "-O",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=8k",
            "--size",
            "1M",
        ],
        // A backing file without its format.
        &["rebase", "-u", "-b", "base.qcow2", "ov.qcow2"],
        &["rebase", "-b", "base.qcow2", "ov.qcow2"],
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "raw.img",
            "raw.img",
            "new.qcow2",
        ],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
    // -1 is read as 2^64 - 1, refused after the line (whose value cowclone does not repeat).
    assert_same(
        &bin,
        &dirs,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "refcount_bits=-1",
            "new.qcow2",
            "64M",
        ],
        false,
        true,
    );
    assert!(!dirs[1].join("new.qcow2").exists());

    // Unknown incompatible features, named from the image's feature-name table where it names
    // them: its first entry ("dirty bit", bit 0) renamed to name bit 63.
    twin_images(&dirs, "features.qcow2", |path| {
        poke(path, 72, &(0b111u64 << 61).to_be_bytes());
        let cluster0 = peek(path, 0, 4096);
        let table = cluster0
            .windows(4)
            .position(|w| w == 0x6803_f857u32.to_be_bytes())
            .expect("qemu-img writes a feature-name table") as u64;
        let mut entry = vec![0u8, 63];
        entry.extend_from_slice(b"Test feature");
        entry.resize(48, 0);
        poke(path, table + 8, &entry);
    });
    assert_same(&bin, &dirs, &["info", "features.qcow2"], true, true);
    let theirs = qemu_img_as(None, &dirs[0], &["info", "features.qcow2"], &[]);
    assert!(
        text(&theirs.stderr)
            .contains("Test feature, Unknown incompatible feature: 6000000000000000"),
        "{}",
        describe(&theirs)
    );

    // An L1 table too small for the disk, and one whose size no int can count.
    twin_images(&dirs, "l1.qcow2", |path| {
        poke(path, 36, &0u32.to_be_bytes())
    });
    twin_images(&dirs, "huge.qcow2", |path| {
        poke(path, 24, &(1u64 << 60).to_be_bytes())
    });
    for args in [&["info", "l1.qcow2"][..], &["info", "huge.qcow2"]] {
        assert_same(&bin, &dirs, args, true, true);
    }

    // A snapshot that 1-bit refcounts cannot count: qemu-img refuses it with EINVAL (and leaks
    // a cluster, which cowclone does not: its image stays clean).
    for dir in &dirs {
        let path = dir.join("narrow.qcow2");
        qemu_img_ok(&[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &"-o",
            &"refcount_bits=1",
            &path,
            &"64M",
        ]);
        qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write 0 512", &path]);
    }
    assert_same(
        &bin,
        &dirs,
        &["snapshot", "-c", "foo", "narrow.qcow2"],
        true,
        true,
    );
    assert_qemu_check_clean(&dirs[1].join("narrow.qcow2"), "after the refused snapshot");
}

#[test]
fn personality_check_repair_clears_unknown_autoclear_bits_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    twin_images(&dirs, "autoclear.qcow2", |path| {
        poke(path, 88, &(1u64 << 63).to_be_bytes())
    });
    // A check without repair opens read-only and changes nothing.
    assert_same(&bin, &dirs, &["check", "autoclear.qcow2"], true, true);
    for dir in &dirs {
        assert_eq!(
            peek(&dir.join("autoclear.qcow2"), 88, 8),
            (1u64 << 63).to_be_bytes()
        );
    }
    assert_same(
        &bin,
        &dirs,
        &["check", "-r", "all", "autoclear.qcow2"],
        true,
        true,
    );
    let [theirs, ours] = [&dirs[0], &dirs[1]].map(|dir| peek(&dir.join("autoclear.qcow2"), 72, 32));
    assert_eq!(ours, theirs, "feature bits after check -r all");
    assert_eq!(ours[16..24], [0u8; 8], "autoclear bits after check -r all");
    assert_qemu_check_clean(&dirs[1].join("autoclear.qcow2"), "after check -r all");
}

#[test]
fn personality_reads_a_repeated_backing_format_extension_as_qemu_img_does() {
    use imagefmt::qcow2::extensions::Extension;
    use imagefmt::qcow2::HeaderCluster;
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path());
    // ov.qcow2 gets a second backing-format extension naming "foo" after its "qcow2" one.
    for dir in &dirs {
        let path = dir.join("ov.qcow2");
        let mut cluster = HeaderCluster::parse(&peek(&path, 0, 65536)).unwrap();
        cluster
            .extensions
            .push(Extension::BackingFormat("foo".into()));
        poke(&path, 0, &cluster.to_bytes().unwrap());
    }
    let line = |output: &Output| {
        text(&output.stdout)
            .lines()
            .find(|l| l.starts_with("backing file format:"))
            .map(str::to_owned)
    };
    let theirs = qemu_img_as(None, &dirs[0], &["info", "ov.qcow2"], &[]);
    let ours = qemu_img_as(Some(&bin), &dirs[1], &["info", "ov.qcow2"], &[]);
    assert!(ours.status.success(), "{}", describe(&ours));
    assert_eq!(line(&theirs).as_deref(), Some("backing file format: foo"));
    assert_eq!(line(&ours), line(&theirs));
    // Naming the format again repairs the image: one extension, read by qemu-io.
    let args = [
        "rebase",
        "-u",
        "-b",
        "base.qcow2",
        "-F",
        "qcow2",
        "ov.qcow2",
    ];
    assert_same(&bin, &dirs, &args, true, true);
    let info = qemu_img_ok(&[&"info", &"--output=json", &dirs[1].join("ov.qcow2")]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["backing-filename-format"], "qcow2");
    qemu_io_ok(&[
        &"-f",
        &"qcow2",
        &"-c",
        &"read -P 0x22 512k 1M",
        &"-c",
        &"read -P 0x11 0 512k",
        &dirs[1].join("ov.qcow2"),
    ]);
    assert_qemu_check_clean(&dirs[1].join("ov.qcow2"), "after the rebase");
}
