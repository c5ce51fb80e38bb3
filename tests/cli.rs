//! The `cowclone` command line end to end: human and JSON output checked against qemu-img's
//! view of the same files, one-line errors, size syntax, `info --backing-chain --confine` and
//! `clone`.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use serde_json::Value;

use crate::util::*;

/// Writes `0xab` at 0..64k and `0x17` at 1M..1M+4k into `path` (in `format`) with qemu-io.
fn write_patterns(path: &Path, format: &str) {
    qemu_io_ok(&[
        &"-f",
        &format,
        &"-c",
        &"write -P 0xab 0 64k",
        &"-c",
        &"write -P 0x17 1M 4k",
        &path,
    ]);
}

#[test]
fn info_human_output_reads_like_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &dir.join("base.qcow2"),
        &"1G",
    ]);
    std::fs::create_dir(dir.join("sub")).unwrap();
    let output = cowclone_in(
        dir,
        &[
            &"create",
            &"-q",
            &"-b",
            &"../base.qcow2",
            &"-F",
            &"qcow2",
            &"sub/ov.qcow2",
        ],
    );
    assert!(output.status.success(), "{}", describe(&output));

    let ours = cowclone_in(dir, &[&"info", &"sub/ov.qcow2"]);
    assert!(ours.status.success(), "{}", describe(&ours));
    let ours = String::from_utf8(ours.stdout).unwrap();
    let theirs = qemu_img_in(dir, &[&"info", &"sub/ov.qcow2"]);
    assert!(theirs.status.success(), "{}", describe(&theirs));
    let theirs = String::from_utf8(theirs.stdout).unwrap();

    for line in [
        "file format: qcow2",
        "virtual size: 1 GiB (1073741824 bytes)",
        "cluster_size: 65536",
        "backing file format: qcow2",
        "backing file: ../base.qcow2 (actual path: sub/../base.qcow2)",
    ] {
        assert!(
            ours.lines().any(|l| l == line),
            "cowclone info lacks {line:?}:\n{ours}"
        );
    }
    // Every line we print, qemu-img prints too, in the same order (same file, so the disk size
    // line must agree as well).
    let their_lines: Vec<&str> = theirs.lines().collect();
    let mut from = 0;
    for line in ours.lines() {
        match their_lines[from..].iter().position(|l| *l == line) {
            Some(i) => from += i + 1,
            None => panic!(
                "line {line:?} of cowclone info is not in qemu-img info's output (in order)\n\
                 --- cowclone\n{ours}--- qemu-img\n{theirs}"
            ),
        }
    }
}

/// Asserts the error contract: non-zero exit, one line on stderr starting with `cowclone:`, no
/// panic, no backtrace hint, nothing on stdout.
fn assert_one_line_error(output: &Output, context: &str) -> String {
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "{context}: succeeded: {}",
        describe(output)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{context}: not exactly one line on stderr: {stderr:?}"
    );
    assert!(
        stderr.starts_with("cowclone:"),
        "{context}: does not start with cowclone: {stderr:?}"
    );
    for bad in ["panicked", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(bad), "{context}: {bad}: {stderr:?}");
    }
    assert!(
        output.stdout.is_empty(),
        "{context}: printed on stdout: {}",
        describe(output)
    );
    stderr
}

/// One error case: our arguments, and qemu-img's equivalent if qemu-img refuses it too.
struct ErrorCase {
    what: &'static str,
    ours: Vec<&'static str>,
    qemu: Option<Vec<&'static str>>,
    /// A word the message must contain (it must say what is wrong).
    mentions: &'static str,
}

#[test]
fn errors_are_one_line_and_exit_like_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &dir.join("base.qcow2"),
        &"1M",
    ]);
    let garbage: Vec<u8> = (0..100u8).map(|i| i.wrapping_mul(37) | 1).collect();
    std::fs::write(dir.join("garbage.bin"), &garbage).unwrap();
    std::fs::write(dir.join("existing.qcow2"), b"keep me").unwrap();

    let case = |what, ours: &[&'static str], qemu: Option<&[&'static str]>, mentions| ErrorCase {
        what,
        ours: ours.to_vec(),
        qemu: qemu.map(<[_]>::to_vec),
        mentions,
    };
    let cases = [
        case(
            "missing file",
            &["info", "missing.qcow2"],
            Some(&["info", "missing.qcow2"]),
            "missing.qcow2",
        ),
        case(
            "missing backing file",
            &["create", "-b", "missing.qcow2", "-F", "qcow2", "new.qcow2"],
            Some(&[
                "create",
                "-f",
                "qcow2",
                "-b",
                "missing.qcow2",
                "-F",
                "qcow2",
                "new.qcow2",
            ]),
            "missing.qcow2",
        ),
        // qemu-img needs -F always, so it has no equivalent here; we refuse to guess raw.
        case(
            "garbage backing file without -F",
            &["create", "-b", "garbage.bin", "new.qcow2"],
            None,
            "garbage.bin",
        ),
        case(
            "raw file named as qcow2",
            &["create", "-b", "garbage.bin", "-F", "qcow2", "new.qcow2"],
            Some(&[
                "create",
                "-f",
                "qcow2",
                "-b",
                "garbage.bin",
                "-F",
                "qcow2",
                "new.qcow2",
            ]),
            "qcow2",
        ),
        case(
            "-u without -F",
            &["create", "-u", "-b", "base.qcow2", "new.qcow2", "1M"],
            Some(&[
                "create",
                "-f",
                "qcow2",
                "-u",
                "-b",
                "base.qcow2",
                "new.qcow2",
                "1M",
            ]),
            "format",
        ),
        case(
            "empty backing name",
            &["create", "-b", "", "-F", "qcow2", "new.qcow2"],
            Some(&[
                "create",
                "-f",
                "qcow2",
                "-b",
                "",
                "-F",
                "qcow2",
                "new.qcow2",
            ]),
            "empty",
        ),
        case(
            "cluster_size=3000",
            &["create", "-o", "cluster_size=3000", "new.qcow2", "1G"],
            Some(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                "cluster_size=3000",
                "new.qcow2",
                "1G",
            ]),
            "cluster_size",
        ),
        case(
            "unknown option",
            &["create", "-o", "nonsense=1", "new.qcow2", "1G"],
            Some(&[
                "create",
                "-f",
                "qcow2",
                "-o",
                "nonsense=1",
                "new.qcow2",
                "1G",
            ]),
            "nonsense",
        ),
        case(
            "bad size",
            &["create", "new.qcow2", "12X"],
            Some(&["create", "-f", "qcow2", "new.qcow2", "12X"]),
            "12X",
        ),
        // qemu-img knows vmdk (and would fail here only because base.qcow2 is not one).
        case(
            "unsupported backing format",
            &["create", "-b", "base.qcow2", "-F", "vmdk", "new.qcow2"],
            None,
            "vmdk",
        ),
        // qemu-img would follow a json: name; cowclone never does (it can name any host file).
        case(
            "json: backing name",
            &[
                "create",
                "-b",
                r#"json:{"file.driver":"file","file.filename":"base.qcow2"}"#,
                "-F",
                "qcow2",
                "new.qcow2",
                "1M",
            ],
            None,
            "protocol",
        ),
        case(
            "existing target",
            &["create", "existing.qcow2", "1G"],
            None,
            "existing.qcow2",
        ),
        case(
            "no size and no backing file",
            &["create", "new.qcow2"],
            Some(&["create", "-f", "qcow2", "new.qcow2"]),
            "size",
        ),
    ];
    for case in &cases {
        let args = args_of(&case.ours);
        let output = cowclone_in(dir, &args);
        let message = assert_one_line_error(&output, case.what);
        assert!(
            message.contains(case.mentions),
            "{}: the message does not mention {:?}: {message}",
            case.what,
            case.mentions
        );
        assert_eq!(
            dir_entries(dir),
            ["base.qcow2", "existing.qcow2", "garbage.bin"],
            "{}: files changed",
            case.what
        );
        assert_eq!(
            std::fs::read(dir.join("existing.qcow2")).unwrap(),
            b"keep me"
        );
        if let Some(qemu) = &case.qemu {
            let args = args_of(qemu);
            let theirs = qemu_img_in(dir, &args);
            assert_eq!(
                output.status.code(),
                theirs.status.code(),
                "{}: exit codes of cowclone and qemu-img differ: {}",
                case.what,
                describe(&theirs)
            );
            let _ = std::fs::remove_file(dir.join("new.qcow2"));
        }
    }
}

#[test]
fn info_json_of_a_raw_file_agrees_with_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("disk.img");
    write_pattern_file(&raw, 3 << 19); // 1.5 MiB
    let ours = cowclone_info_json(&raw);
    assert_eq!(ours["format"], "raw");
    assert_eq!(ours["virtual-size"], file_len(&raw));
    let theirs = qemu_info_json(&raw);
    let keys = [
        "filename",
        "format",
        "virtual-size",
        "actual-size",
        "dirty-flag",
        "cluster-size",
        "format-specific",
        "backing-filename",
    ];
    assert_info_keys_equal(&ours, &theirs, &keys, "raw file");
}

#[test]
fn backing_chain_confinement_refuses_files_outside_the_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("jail")).unwrap();
    std::fs::create_dir_all(dir.join("outside")).unwrap();
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &dir.join("outside/base.qcow2"),
        &"1M",
    ]);
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &dir.join("jail/inner.qcow2"),
        &"1M",
    ]);
    std::os::unix::fs::symlink("../outside/base.qcow2", dir.join("jail/link.qcow2")).unwrap();
    for (overlay, backing) in [
        ("jail/escape.qcow2", "../outside/base.qcow2"),
        (
            "jail/absolute.qcow2",
            dir.join("outside/base.qcow2").to_str().unwrap(),
        ),
        ("jail/via-link.qcow2", "link.qcow2"),
        ("jail/ok.qcow2", "inner.qcow2"),
    ] {
        qemu_overlay(backing, &dir.join(overlay));
    }
    let jail = dir.join("jail");
    for overlay in [
        "jail/escape.qcow2",
        "jail/absolute.qcow2",
        "jail/via-link.qcow2",
    ] {
        let output = cowclone(&[
            &"info",
            &"--backing-chain",
            &"--confine",
            &jail,
            &dir.join(overlay),
        ]);
        let message = assert_one_line_error(&output, overlay);
        assert!(message.contains("outside"), "{overlay}: {message}");
        // Without confinement the same chain is followed, exactly as qemu-img follows it.
        let output = cowclone(&[
            &"info",
            &"--backing-chain",
            &"--output",
            &"json",
            &dir.join(overlay),
        ]);
        assert!(output.status.success(), "{overlay}: {}", describe(&output));
        let chain: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
        let theirs = qemu_img_ok(&[
            &"info",
            &"--backing-chain",
            &"--output=json",
            &dir.join(overlay),
        ]);
        let theirs: Vec<Value> = serde_json::from_str(&theirs).unwrap();
        assert_eq!(chain.len(), theirs.len(), "{overlay}");
        assert_eq!(chain[1]["filename"], theirs[1]["filename"], "{overlay}");
    }
    // Inside the directory: followed.
    let output = cowclone(&[
        &"info",
        &"--backing-chain",
        &"--confine",
        &jail,
        &"--output",
        &"json",
        &dir.join("jail/ok.qcow2"),
    ]);
    assert!(output.status.success(), "{}", describe(&output));
    let chain: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(
        chain[1]["filename"],
        dir.join("jail/inner.qcow2").to_str().unwrap()
    );
}

#[test]
fn size_suffixes_mean_what_they_mean_to_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for (i, size) in [
        "1k", "1K", "1M", "1G", "1T", "1.5G", "1000", "0.5k", "100b", "1.25M", "512B",
    ]
    .iter()
    .enumerate()
    {
        let ours = dir.join(format!("ours{i}.qcow2"));
        let theirs = dir.join(format!("theirs{i}.qcow2"));
        cowclone_ok(&[&"create", &"-q", &ours, size]);
        qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &theirs, size]);
        let (o, t) = (qemu_info_json(&ours), qemu_info_json(&theirs));
        assert_eq!(o["virtual-size"], t["virtual-size"], "size {size}");
        assert_bytes_equal_zero_extended(&ours, &theirs, &format!("size {size}"));
    }
}

/// qemu-img refuses a fraction without a unit ("1.5"), and so does the size parser's own
/// documentation ("decimals allowed with a suffix").
#[test]
fn fractional_sizes_without_a_unit_are_refused_like_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    for size in ["1.5", "1000.5"] {
        let theirs = qemu_img_in(dir, &[&"create", &"-q", &"-f", &"qcow2", &"t.qcow2", &size]);
        assert!(!theirs.status.success(), "qemu-img accepts {size}");
        let ours = cowclone_in(dir, &[&"create", &"-q", &"o.qcow2", &size]);
        assert_one_line_error(&ours, size);
        assert!(!dir.join("o.qcow2").exists(), "{size}: an image was made");
    }
}

#[test]
fn create_prints_the_line_qemu_img_prints() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours_dir, their_dir) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    for dir in [&ours_dir, &their_dir] {
        std::fs::create_dir(dir).unwrap();
        qemu_img_ok(&[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &dir.join("base.qcow2"),
            &"2G",
        ]);
    }
    let cases: [&[&str]; 5] = [
        &["new0.qcow2", "1G"],
        &[
            "-o",
            "cluster_size=4k,lazy_refcounts=on,refcount_bits=8",
            "new1.qcow2",
            "1G",
        ],
        &[
            "-o",
            "extended_l2=on,compression_type=zstd",
            "new2.qcow2",
            "3M",
        ],
        &["-b", "base.qcow2", "-F", "qcow2", "new3.qcow2"],
        &["-b", "base.qcow2", "-F", "qcow2", "new4.qcow2", "5G"],
    ];
    for args in cases {
        let mut ours: Vec<&dyn AsRef<OsStr>> = vec![&"create"];
        ours.extend(args_of(args));
        let mut theirs: Vec<&dyn AsRef<OsStr>> = vec![&"create", &"-f", &"qcow2"];
        theirs.extend(args_of(args));
        let (o, t) = (
            cowclone_in(&ours_dir, &ours),
            qemu_img_in(&their_dir, &theirs),
        );
        assert!(o.status.success(), "{args:?}: {}", describe(&o));
        assert!(t.status.success(), "{args:?}: {}", describe(&t));
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&t.stdout),
            "{args:?}"
        );
    }
}

#[test]
fn create_prints_the_line_qemu_img_prints_for_compat_and_unaligned_sizes() {
    let tmp = tempfile::tempdir().unwrap();
    let (ours_dir, their_dir) = (tmp.path().join("ours"), tmp.path().join("theirs"));
    std::fs::create_dir(&ours_dir).unwrap();
    std::fs::create_dir(&their_dir).unwrap();
    let cases: [&[&str]; 3] = [
        &["-o", "compat=0.10", "new0.qcow2", "1G"],
        &["-o", "compat=1.1", "new1.qcow2", "1G"],
        &["new2.qcow2", "1000"],
    ];
    for args in cases {
        let mut ours: Vec<&dyn AsRef<OsStr>> = vec![&"create"];
        ours.extend(args_of(args));
        let mut theirs: Vec<&dyn AsRef<OsStr>> = vec![&"create", &"-f", &"qcow2"];
        theirs.extend(args_of(args));
        let (o, t) = (
            cowclone_in(&ours_dir, &ours),
            qemu_img_in(&their_dir, &theirs),
        );
        assert_eq!(
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&t.stdout),
            "{args:?}"
        );
    }
}

#[test]
fn clone_json_describes_a_clone_qemu_img_can_use() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let home = dir.join("home");
    let base = dir.join("base.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &base, &"3M"]);
    write_patterns(&base, "qcow2");
    let raw = dir.join("base.img");
    write_pattern_file(&raw, 2 << 20);

    for (base, format) in [(&base, "qcow2"), (&raw, "raw")] {
        let name = format!("base-{format}");
        cowclone_ok(&[
            &"base",
            &"register",
            &name,
            base,
            &"--format",
            &format,
            &"--home",
            &home,
        ]);
        let clone_name = format!("clone-{format}");
        let stdout = cowclone_ok(&[
            &"clone",
            &name,
            &clone_name,
            &"--output",
            &"json",
            &"--home",
            &home,
        ]);
        let report: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("clone --output json printed no JSON ({e}): {stdout}"));
        let made = &report["clones"][0];
        assert_eq!(made["name"], clone_name.as_str(), "{report}");
        let clone = std::path::PathBuf::from(made["path"].as_str().expect("a clone path"));
        assert!(clone.starts_with(home.canonicalize().unwrap()), "{report}");

        let info = qemu_info_json(&clone);
        assert_eq!(
            info["backing-filename"],
            base.canonicalize().unwrap().to_str().unwrap(),
            "the clone names its base by canonical path"
        );
        assert_eq!(info["backing-filename-format"], format);
        assert_eq!(made["virtual-size"], info["virtual-size"]);
        assert_eq!(made["virtual-size"], qemu_info_json(base)["virtual-size"]);
        assert_qemu_check_clean(&clone, format);
        let output = qemu_img(&[&"compare", &"-F", &format, &clone, base]);
        assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    }

    // An unregistered base is refused in one line, and nothing is created.
    let output = cowclone(&[&"clone", &"nope", &"c", &"--home", &home]);
    assert_one_line_error(&output, "clone of an unregistered base");
    assert!(!home.join("clones/c").exists());
}
