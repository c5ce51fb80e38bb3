//! `amend` and `dd` judged by qemu-img 10: every amended image is checked clean by
//! `qemu-img check`, shows the new value in `qemu-img info`, and reads the same as a copy taken
//! before (`qemu-img compare`); the same amend done by `qemu-img amend` on another copy must
//! give an image that reads the same and maps the same, and refusals must be worded alike.
//! `dd` outputs are compared with `qemu-img dd`'s for a grid of operands (byte for byte for
//! raw), and refusals by exit code and message.

use std::path::{Path, PathBuf};

use imagefmt::open::{open_image, OpenHow};
use imagefmt::qcow2::amend::{amend, AmendError, AmendOptions};
use serde_json::Value;

use crate::util::{
    assert_qemu_check_clean, assert_same_content, cowclone, describe, qemu_img, qemu_img_ok,
    qemu_info_json, qemu_io_ok, qemu_map_shape, qemu_overlay,
};

/// A 4 MiB qcow2 image with every kind of cluster: data, a plain zero cluster, a preallocated
/// zero cluster, one compressed cluster and a partly written cluster.
fn image_with_data(dir: &Path, name: &str, create_options: &str) -> PathBuf {
    let path = dir.join(name);
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-o",
        &create_options,
        &path,
        &"4M",
    ]);
    let v3 = !create_options.contains("compat=0.10");
    let mut commands = vec![
        "write -P 0x11 0 128k",
        "write -P 0x55 2M 64k",
        "write -c -P 0x33 512k 64k",
        "write -P 0x44 1M 4k",
    ];
    if v3 {
        commands.extend(["write -z 256k 64k", "write -z 2M 64k"]);
    }
    let mut args: Vec<String> = Vec::new();
    for c in commands {
        args.push("-c".into());
        args.push(c.into());
    }
    args.push(path.to_string_lossy().into_owned());
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    qemu_io_ok(&args);
    path
}

fn copy(from: &Path, to: &Path) -> PathBuf {
    std::fs::copy(from, to).expect("copy image");
    to.to_path_buf()
}

/// Our amend, in-process; a refusal comes back as the lines qemu-img prints for it.
fn our_amend(path: &Path, options: &str) -> Result<(), String> {
    let as_lines = |e: AmendError| match e {
        AmendError::Refused { message, hint } => {
            let mut text = format!("qemu-img: {message}");
            if let Some(hint) = hint {
                text.push('\n');
                text.push_str(hint);
            }
            text
        }
        other => format!("error: {other}"),
    };
    let options = AmendOptions::parse(options).map_err(as_lines)?;
    let file = open_image(path, OpenHow::write()).map_err(|e| format!("open: {e}"))?;
    amend(file, &options).map(drop).map_err(as_lines)
}

/// `qemu-img amend -o OPTIONS path`: Ok, or its stderr trimmed.
fn qemu_amend(path: &Path, options: &str) -> Result<(), String> {
    let output = qemu_img(&[&"amend", &"-o", &options, &path]);
    if output.status.success() {
        Ok(())
    } else {
        assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
        Err(String::from_utf8_lossy(&output.stderr)
            .trim_end()
            .to_owned())
    }
}

fn specific(info: &Value, key: &str) -> Value {
    info["format-specific"]["data"][key].clone()
}

/// Amends copies of `original` with cowclone and with qemu-img and judges ours.
fn amend_both(dir: &Path, original: &Path, options: &str, case: &str) -> (PathBuf, PathBuf) {
    let ours = copy(original, &dir.join(format!("{case}-ours.qcow2")));
    let theirs = copy(original, &dir.join(format!("{case}-qemu.qcow2")));
    qemu_amend(&theirs, options).unwrap_or_else(|e| panic!("{case}: qemu-img amend: {e}"));
    our_amend(&ours, options).unwrap_or_else(|e| panic!("{case}: cowclone amend: {e}"));
    assert_qemu_check_clean(&ours, case);
    assert_same_content(&ours, &theirs, case);
    let (our_info, their_info) = (qemu_info_json(&ours), qemu_info_json(&theirs));
    assert_eq!(
        our_info["virtual-size"], their_info["virtual-size"],
        "{case}"
    );
    for key in [
        "compat",
        "lazy-refcounts",
        "refcount-bits",
        "data-file",
        "data-file-raw",
    ] {
        assert_eq!(
            specific(&our_info, key),
            specific(&their_info, key),
            "{case}: format-specific {key}"
        );
    }
    (ours, theirs)
}

#[test]
fn each_amendable_option_matches_qemu_img_amend() {
    let dir = tempfile::tempdir().unwrap();
    let v3 = image_with_data(dir.path(), "v3.qcow2", "compat=1.1");
    let v2 = image_with_data(dir.path(), "v2.qcow2", "compat=0.10");

    let (ours, _) = amend_both(dir.path(), &v2, "compat=1.1", "upgrade");
    assert_eq!(specific(&qemu_info_json(&ours), "compat"), "1.1");
    assert_same_content(&ours, &v2, "upgrade vs before");

    let (ours, _) = amend_both(dir.path(), &v3, "lazy_refcounts=on", "lazy-on");
    assert_eq!(specific(&qemu_info_json(&ours), "lazy-refcounts"), true);
    assert_same_content(&ours, &v3, "lazy-on vs before");
    let (back, _) = amend_both(dir.path(), &ours, "lazy_refcounts=off", "lazy-off");
    assert_eq!(specific(&qemu_info_json(&back), "lazy-refcounts"), false);

    let (ours, _) = amend_both(dir.path(), &v3, "size=8M", "grow");
    assert_eq!(qemu_info_json(&ours)["virtual-size"], 8 << 20);
    assert_same_content(&ours, &v3, "grow vs before");
    let (ours, _) = amend_both(dir.path(), &v3, "size=3M", "shrink");
    assert_eq!(qemu_info_json(&ours)["virtual-size"], 3 << 20);
    // Shrinking below data drops it, as qemu-img amend does (v3: zero clusters; v2: unallocated).
    for (image, case) in [(&v3, "shrink-over-data-v3"), (&v2, "shrink-over-data-v2")] {
        let (ours, _) = amend_both(dir.path(), image, "size=1M", case);
        assert_eq!(qemu_info_json(&ours)["virtual-size"], 1 << 20, "{case}");
        // What stays reads as before: the first 1 MiB.
        qemu_io_ok(&[
            &"-c",
            &"read -P 0x11 0 128k",
            &"-c",
            &"read -P 0x33 512k 64k",
            &ours,
        ]);
    }

    let (ours, _) = amend_both(
        dir.path(),
        &v3,
        "compat=0.10,size=6M,lazy_refcounts=off",
        "combined",
    );
    let info = qemu_info_json(&ours);
    assert_eq!(
        (specific(&info, "compat"), &info["virtual-size"]),
        ("0.10".into(), &(6 << 20).into())
    );
}

#[test]
fn downgrade_expands_zero_clusters_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let v3 = image_with_data(dir.path(), "v3.qcow2", "compat=1.1");
    let (ours, theirs) = amend_both(dir.path(), &v3, "compat=0.10", "downgrade");
    assert_eq!(specific(&qemu_info_json(&ours), "compat"), "0.10");
    assert_same_content(&ours, &v3, "downgrade vs before");
    assert_eq!(
        qemu_map_shape(&ours),
        qemu_map_shape(&theirs),
        "downgrade: map"
    );

    // An overlay: zero clusters must hide the backing file, so they become zeroed data.
    let base = dir.path().join("base.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &base, &"4M"]);
    qemu_io_ok(&[&"-c", &"write -P 0x77 0 4M", &base]);
    let overlay = dir.path().join("overlay.qcow2");
    qemu_overlay("base.qcow2", &overlay);
    qemu_io_ok(&[
        &"-c",
        &"write -P 0x11 64k 64k",
        &"-c",
        &"write -z 256k 128k",
        &"-c",
        &"write -P 0x55 1M 64k",
        &"-c",
        &"write -z 1M 64k",
        &overlay,
    ]);
    let (ours, theirs) = amend_both(dir.path(), &overlay, "compat=0.10", "downgrade-overlay");
    assert_same_content(&ours, &overlay, "downgrade-overlay vs before");
    assert_eq!(
        qemu_map_shape(&ours),
        qemu_map_shape(&theirs),
        "downgrade-overlay: map"
    );
    let (ours, _) = amend_both(
        dir.path(),
        &overlay,
        "backing_file=base.qcow2,backing_fmt=qcow2",
        "same-backing",
    );
    assert_same_content(&ours, &overlay, "same-backing vs before");
}

#[test]
fn upgraded_header_cluster_is_byte_identical_to_qemu_imgs() {
    let dir = tempfile::tempdir().unwrap();
    for cluster in ["4k", "64k"] {
        let v2 = image_with_data(
            dir.path(),
            &format!("v2-{cluster}.qcow2"),
            &format!("compat=0.10,cluster_size={cluster}"),
        );
        let (ours, theirs) = amend_both(dir.path(), &v2, "compat=1.1", &format!("up-{cluster}"));
        let first = |p: &Path| std::fs::read(p).unwrap()[..4096].to_vec();
        assert!(
            first(&ours) == first(&theirs),
            "{cluster}: cluster 0 differs"
        );
    }
}

#[test]
fn refcount_widths_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let original = image_with_data(dir.path(), "orig.qcow2", "compat=1.1");
    for bits in [1u64, 2, 8, 16, 64] {
        let case = format!("refcount-{bits}");
        let (ours, _) = amend_both(
            dir.path(),
            &original,
            &format!("refcount_bits={bits}"),
            &case,
        );
        assert_eq!(
            specific(&qemu_info_json(&ours), "refcount-bits"),
            bits,
            "{case}"
        );
        assert_same_content(&ours, &original, &case);
        // And back to 16 bits, and the image stays writable by qemu.
        our_amend(&ours, "refcount_bits=16").unwrap_or_else(|e| panic!("{case} back: {e}"));
        assert_qemu_check_clean(&ours, &format!("{case} back"));
        assert_eq!(
            specific(&qemu_info_json(&ours), "refcount-bits"),
            16,
            "{case} back"
        );
        assert_same_content(&ours, &original, &format!("{case} back"));
        qemu_io_ok(&[&"-c", &"write -P 0x99 3M 128k", &ours]);
        assert_qemu_check_clean(&ours, &format!("{case} written by qemu"));
    }
}

#[test]
fn refusals_are_worded_as_qemu_img_words_them() {
    let dir = tempfile::tempdir().unwrap();
    let v3 = image_with_data(dir.path(), "v3.qcow2", "compat=1.1");
    let v2 = image_with_data(dir.path(), "v2.qcow2", "compat=0.10");
    let narrow = image_with_data(dir.path(), "narrow.qcow2", "refcount_bits=8");
    let ext = image_with_data(dir.path(), "ext.qcow2", "extended_l2=on");
    let zstd = image_with_data(dir.path(), "zstd.qcow2", "compression_type=zstd");
    // Two compressed clusters written in one session share a host cluster (refcount 2).
    let shared = dir.path().join("shared.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &shared, &"4M"]);
    qemu_io_ok(&[
        &"-c",
        &"write -c -P 0x33 512k 64k",
        &"-c",
        &"write -c -P 0x66 576k 64k",
        &shared,
    ]);
    let cases: [(&Path, &str); 14] = [
        (&v3, "compat=0.9"),
        (&v3, "refcount_bits=3"),
        (&v3, "refcount_bits=128"),
        (&v3, "backing_file=other.qcow2"),
        (&v3, "data_file=x.raw"),
        (&v3, "data_file_raw=on"),
        (&v3, "compat=0.10,refcount_bits=8"),
        (&v3, "lazy_refcounts=on,compat=0.10"),
        (&v2, "lazy_refcounts=on"),
        (&narrow, "compat=0.10"),
        (&ext, "compat=0.10"),
        (&zstd, "compat=0.10"),
        (&shared, "refcount_bits=1"),
        (&v3, "cluster_size=4k"),
    ];
    for (i, (image, options)) in cases.into_iter().enumerate() {
        let ours = copy(image, &dir.path().join(format!("r{i}-ours.qcow2")));
        let theirs = copy(image, &dir.path().join(format!("r{i}-qemu.qcow2")));
        let expected = qemu_amend(&theirs, options).expect_err(options);
        let got = our_amend(&ours, options).expect_err(options);
        assert_eq!(got, expected, "{options} on {}", image.display());
        // What was done before the refusal is done alike: the images still read the same.
        assert_same_content(&ours, &theirs, options);
        assert_qemu_check_clean(&ours, options);
    }
}

#[test]
fn lazy_refcounts_off_repairs_a_dirty_image_first() {
    let dir = tempfile::tempdir().unwrap();
    let dirty = dir.path().join("dirty.qcow2");
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-o",
        &"lazy_refcounts=on",
        &dirty,
        &"4M",
    ]);
    // qemu-io killed after a write leaves the dirty bit and refcounts never written.
    let output = crate::util::run(
        "qemu-io",
        "qemu-utils",
        None,
        &[&"-c", &"write -P 0x11 0 256k", &"-c", &"sigraise 9", &dirty],
    );
    assert_ne!(output.status.code(), Some(0), "{}", describe(&output));
    assert_eq!(
        crate::util::qemu_check(&dirty).0,
        2,
        "the killed write left refcounts stale"
    );
    let (ours, _) = amend_both(dir.path(), &dirty, "lazy_refcounts=off", "dirty-lazy-off");
    assert_eq!(specific(&qemu_info_json(&ours), "lazy-refcounts"), false);
    qemu_io_ok(&[&"-c", &"read -P 0x11 0 256k", &ours]);
}

#[test]
fn data_file_settings_change_in_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("df.qcow2");
    // qemu opens a relative data file name relative to its working directory: use absolute ones.
    let data = dir.path().join("df.raw");
    let create_options = format!("data_file={},data_file_raw=on", data.display());
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-o",
        &create_options,
        &image,
        &"4M",
    ]);
    qemu_io_ok(&[&"-c", &"write -P 0x21 0 192k", &image]);
    let (ours, _) = amend_both(dir.path(), &image, "data_file_raw=off", "data-file-raw-off");
    assert_eq!(specific(&qemu_info_json(&ours), "data-file-raw"), false);
    let moved = dir.path().join("moved.raw");
    std::fs::copy(&data, &moved).unwrap();
    let rename = format!("data_file={}", moved.display());
    let (ours, _) = amend_both(dir.path(), &image, &rename, "data-file-renamed");
    assert_eq!(
        specific(&qemu_info_json(&ours), "data-file"),
        moved.display().to_string()
    );
    assert_same_content(&ours, &image, "data-file-renamed vs before");
}

/// A 3 MiB qcow2 overlay on a 2 MiB raw base: data, zero clusters, a compressed cluster,
/// ranges falling through to the base and ranges past the base's end.
fn dd_input(dir: &Path) -> PathBuf {
    let base = dir.join("base.raw");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"raw", &base, &"2M"]);
    qemu_io_ok(&[&"-f", &"raw", &"-c", &"write -P 0x5a 0 2M", &base]);
    let top = dir.join("top.qcow2");
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-b",
        &"base.raw",
        &"-F",
        &"raw",
        &top,
        &"3M",
    ]);
    qemu_io_ok(&[
        &"-c",
        &"write -P 0x11 4k 100k",
        &"-c",
        &"write -z 256k 64k",
        &"-c",
        &"write -c -P 0x33 512k 64k",
        &"-c",
        &"write -P 0x44 2000k 300k",
        &top,
    ]);
    top
}

/// Runs `qemu-img dd` and `cowclone dd` with `operands` (plus if= and of=) into fresh outputs;
/// returns (exit code, stderr without the program prefix, output path) of each.
fn dd_both(
    dir: &Path,
    input: &Path,
    format: &str,
    operands: &[&str],
    case: &str,
) -> [(Option<i32>, String, PathBuf); 2] {
    let run = |tool: &str| {
        let output = dir.join(format!("{case}-{tool}.{format}"));
        let mut args: Vec<String> = vec!["dd".into(), "-O".into(), format.into()];
        args.extend(operands.iter().map(|s| s.to_string()));
        args.push(format!("if={}", input.display()));
        args.push(format!("of={}", output.display()));
        let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        let result = if tool == "qemu" {
            qemu_img(&args)
        } else {
            cowclone(&args)
        };
        let stderr = String::from_utf8_lossy(&result.stderr);
        let message = stderr
            .trim_end()
            .strip_prefix(if tool == "qemu" {
                "qemu-img: "
            } else {
                "cowclone: "
            })
            .unwrap_or(&stderr)
            .to_owned();
        (result.status.code(), message, output)
    };
    [run("qemu"), run("ours")]
}

#[test]
fn dd_grid_matches_qemu_img_dd_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let input = dd_input(dir.path());
    let mut cases = 0;
    for bs in [
        None,
        Some("4k"),
        Some("1000"),
        Some("64k"),
        Some("1.5k"),
        Some("1M"),
    ] {
        for count in [None, Some("0"), Some("3"), Some("5000"), Some("0x10")] {
            for skip in [None, Some("1"), Some("7"), Some("10000"), Some("010")] {
                let mut operands = Vec::new();
                let owned: Vec<String> = [("bs", bs), ("count", count), ("skip", skip)]
                    .iter()
                    .filter_map(|(k, v)| v.map(|v| format!("{k}={v}")))
                    .collect();
                operands.extend(owned.iter().map(String::as_str));
                let case = format!("raw{cases}");
                let [(qcode, qmsg, theirs), (ocode, omsg, ours)] =
                    dd_both(dir.path(), &input, "raw", &operands, &case);
                let context = format!("dd {operands:?}");
                assert_eq!(qcode, Some(0), "{context}: qemu-img: {qmsg}");
                assert_eq!(ocode, qcode, "{context}: cowclone: {omsg}");
                assert_eq!(omsg, qmsg, "{context}: messages");
                assert!(
                    std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
                    "{context}: raw outputs differ"
                );
                cases += 1;
            }
        }
    }
    assert_eq!(cases, 150);
}

#[test]
fn dd_qcow2_and_vdi_outputs_read_as_qemu_img_dds() {
    let dir = tempfile::tempdir().unwrap();
    let input = dd_input(dir.path());
    let grid: [&[&str]; 5] = [
        &[],
        &["bs=64k", "skip=3"],
        &["bs=1000", "count=3", "skip=1"],
        &["bs=1M", "count=2"],
        &["bs=4k", "skip=100", "count=400"],
    ];
    for format in ["qcow2", "vdi"] {
        for (i, operands) in grid.iter().enumerate() {
            let case = format!("{format}{i}");
            let [(qcode, qmsg, theirs), (ocode, omsg, ours)] =
                dd_both(dir.path(), &input, format, operands, &case);
            let context = format!("dd -O {format} {operands:?}");
            assert_eq!(qcode, Some(0), "{context}: qemu-img: {qmsg}");
            assert_eq!(ocode, Some(0), "{context}: cowclone: {omsg}");
            assert_eq!(
                qemu_info_json(&ours)["virtual-size"],
                qemu_info_json(&theirs)["virtual-size"],
                "{context}: virtual size"
            );
            assert_same_content(&ours, &theirs, &context);
            if format == "qcow2" {
                assert_qemu_check_clean(&ours, &context);
            }
        }
    }
}

#[test]
fn dd_refusals_match_qemu_img_by_exit_code_and_message() {
    let dir = tempfile::tempdir().unwrap();
    let input = dd_input(dir.path());
    let refused: [&[&str]; 12] = [
        &["bs=0"],
        &["bs=-1"],
        &["bs=3G"],
        &["bs=1.5"],
        &["bs=4kB"],
        &["count=1k"],
        &["count=08"],
        &["count=-1"],
        &["skip=x"],
        &["skip=9223372036854775808"],
        &["foo=1"],
        &["junk"],
    ];
    for (i, operands) in refused.iter().enumerate() {
        let [(qcode, qmsg, theirs), (ocode, omsg, ours)] =
            dd_both(dir.path(), &input, "raw", operands, &format!("bad{i}"));
        assert_eq!(qcode, Some(1), "{operands:?}: qemu-img: {qmsg}");
        assert_eq!(ocode, qcode, "{operands:?}: cowclone: {omsg}");
        assert_eq!(omsg, qmsg, "{operands:?}");
        assert!(
            !theirs.exists() && !ours.exists(),
            "{operands:?}: no output"
        );
    }
    // A missing input and a missing of= exit 1 for both (the wording of the OS error differs).
    for args in [
        vec!["dd", "if=/nonexistent/in.raw", "of=x.raw"],
        vec!["dd", "if=in.raw"],
        vec!["dd", "-O", "nosuchformat", "if=/dev/null", "of=y.raw"],
    ] {
        let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        let (theirs, ours) = (
            crate::util::qemu_img_in(dir.path(), &args),
            crate::util::cowclone_in(dir.path(), &args),
        );
        assert_eq!(theirs.status.code(), Some(1), "{}", describe(&theirs));
        assert_eq!(ours.status.code(), Some(1), "{}", describe(&ours));
    }
}

#[test]
fn amend_cli_exit_codes_match_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let v3 = image_with_data(dir.path(), "v3.qcow2", "compat=1.1");
    let raw = dir.path().join("disk.raw");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"raw", &raw, &"1M"]);
    let cases: [(&[&str], &Path); 6] = [
        (&["-o", "compat=0.10"], &v3),
        (&["-o", "lazy_refcounts=on", "-o", "refcount_bits=8"], &v3),
        (&[], &v3),
        (&["-o", "refcount_bits=3"], &v3),
        (&["-o", "size=2M"], &raw),
        (&["-f", "raw", "-o", "size=2M"], &raw),
    ];
    for (i, (options, image)) in cases.into_iter().enumerate() {
        let ours = copy(image, &dir.path().join(format!("cli{i}-ours")));
        let theirs = copy(image, &dir.path().join(format!("cli{i}-qemu")));
        let run = |path: &Path, qemu: bool| {
            let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"amend"];
            args.extend(options.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
            args.push(&path);
            if qemu {
                qemu_img(&args)
            } else {
                cowclone(&args)
            }
        };
        let (q, o) = (run(&theirs, true), run(&ours, false));
        assert_eq!(
            o.status.code(),
            q.status.code(),
            "{options:?}: {}\n{}",
            describe(&q),
            describe(&o)
        );
        if q.status.success() {
            assert_same_content(&ours, &theirs, &format!("{options:?}"));
            assert_eq!(
                qemu_info_json(&ours)["format-specific"],
                qemu_info_json(&theirs)["format-specific"]
            );
        }
    }
}

#[test]
fn amend_option_list_names_options_qemu_img_amend_lists() {
    let dir = tempfile::tempdir().unwrap();
    let image = image_with_data(dir.path(), "v3.qcow2", "compat=1.1");
    let theirs = qemu_img_ok(&[&"amend", &"-o", &"help", &image]);
    let ours = crate::util::cowclone_ok(&[&"amend", &"-o", &"help", &image]);
    let keys = |text: &str| -> Vec<String> {
        text.lines()
            .skip(1)
            .filter_map(|l| l.trim_start().split_once('=').map(|(k, _)| k.to_owned()))
            .filter(|k| !k.starts_with("encrypt."))
            .collect()
    };
    assert_eq!(ours.lines().next(), theirs.lines().next());
    assert_eq!(keys(&ours), keys(&theirs));
}

#[test]
fn amend_and_dd_overwrite_refuse_a_registered_base() {
    use crate::registry::{err_in, ok_in, qcow2_base};
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    let before = std::fs::read(&base).unwrap();
    let e = err_in(&home, &[&"amend", &"-o", &"lazy_refcounts=on", &base]);
    assert!(e.contains("refusing"), "amend: {e}");
    let other = image_with_data(tmp.path(), "other.qcow2", "compat=1.1");
    let input = format!("if={}", other.display());
    let output = format!("of={}", base.display());
    let e = err_in(&home, &[&"dd", &"--overwrite", &input, &output]);
    assert!(e.contains("refusing"), "dd --overwrite: {e}");
    assert!(std::fs::read(&base).unwrap() == before, "the base changed");
}
