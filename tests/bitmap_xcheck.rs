//! Persistent dirty bitmaps, judged by qemu 10: bitmaps cowclone adds, changes or merges are
//! listed by `qemu-img info` as on a twin image where `qemu-img bitmap` did the same, `qemu-img
//! check` finds them clean, and after cowclone writes to an image with enabled bitmaps qemu
//! sees exactly the dirty ranges it sees on a twin that `qemu-io` wrote. The dirty ranges are
//! read by qemu itself: `qemu-nbd -B BITMAP` exports the bitmap and `qemu-img map` of the export
//! with `x-dirty-bitmap` reports dirty ranges as `"data": false`.

use std::path::{Path, PathBuf};

use imagefmt::backing::BackingPolicy;
use imagefmt::ops::bitmap::{bitmap, SourceImage};
use imagefmt::qcow2::bitmap::BitmapAction;
use imagefmt::qcow2::write::WriteOptions;
use serde_json::Value;

use crate::util::{
    assert_qemu_check_clean, describe, qemu_dirty_ranges, qemu_img, qemu_img_ok, qemu_info_json,
    qemu_io_ok, run,
};

/// Two identical fresh images: one for cowclone, one for qemu-img.
fn twins(dir: &Path, size: &str, options: &str) -> (PathBuf, PathBuf) {
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    for path in [&ours, &theirs] {
        qemu_img_ok(&[&"create", &"-f", &"qcow2", &"-o", &options, path, &size]);
    }
    (ours, theirs)
}

/// `format-specific.data.bitmaps` of `qemu-img info --output=json` (null if absent).
fn qemu_bitmaps(path: &Path) -> Value {
    qemu_info_json(path)["format-specific"]["data"]["bitmaps"].clone()
}

/// The `qemu-img bitmap` arguments for one action.
fn qemu_args(action: &BitmapAction) -> Vec<String> {
    match action {
        BitmapAction::Add { granularity } => {
            let mut args = vec!["--add".to_owned()];
            if let Some(g) = granularity {
                args.extend(["-g".to_owned(), g.to_string()]);
            }
            args
        }
        BitmapAction::Remove => vec!["--remove".into()],
        BitmapAction::Clear => vec!["--clear".into()],
        BitmapAction::Enable => vec!["--enable".into()],
        BitmapAction::Disable => vec!["--disable".into()],
        BitmapAction::Merge { source } => vec!["--merge".into(), source.clone()],
    }
}

/// Runs `qemu-img bitmap ACTIONS... [-b source] image name` and asserts success.
fn qemu_bitmap(image: &Path, name: &str, actions: &[BitmapAction], source: Option<&Path>) {
    let mut args: Vec<String> = vec!["bitmap".into()];
    for action in actions {
        args.extend(qemu_args(action));
    }
    if let Some(source) = source {
        args.extend([
            "-b".into(),
            source.display().to_string(),
            "-F".into(),
            "qcow2".into(),
        ]);
    }
    args.extend([image.display().to_string(), name.to_owned()]);
    qemu_img_ok(&crate::util::args_of(&args));
}

/// An error and its causes on one line, joined by ": " (how the CLI reports errors).
fn error_line(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        line.push_str(": ");
        line.push_str(&c.to_string());
        cause = c.source();
    }
    line
}

/// Applies the same actions with cowclone (in-process) and with qemu-img.
fn both(ours: &Path, theirs: &Path, name: &str, actions: &[BitmapAction]) {
    bitmap(ours, None, name, actions, None)
        .unwrap_or_else(|e| panic!("cowclone bitmap {actions:?} {name}: {e}"));
    qemu_bitmap(theirs, name, actions, None);
}

#[test]
fn bitmaps_added_by_cowclone_are_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = twins(dir.path(), "100M", "cluster_size=65536");
    both(
        &ours,
        &theirs,
        "b1",
        &[BitmapAction::Add { granularity: None }],
    );
    both(
        &ours,
        &theirs,
        "b2",
        &[
            BitmapAction::Add {
                granularity: Some(128 << 10),
            },
            BitmapAction::Disable,
        ],
    );
    both(
        &ours,
        &theirs,
        "tiny grains",
        &[BitmapAction::Add {
            granularity: Some(512),
        }],
    );
    let listed = qemu_bitmaps(&ours);
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed}");
    assert_eq!(listed, qemu_bitmaps(&theirs));
    assert_qemu_check_clean(&ours, "after adding three bitmaps");

    // Default granularity follows the cluster size within 4 KiB..64 KiB, as qemu's does.
    for cluster in ["512", "16384", "2M"] {
        let sub = dir.path().join(cluster);
        std::fs::create_dir(&sub).unwrap();
        let (ours, theirs) = twins(&sub, "1G", &format!("cluster_size={cluster}"));
        both(
            &ours,
            &theirs,
            "x",
            &[BitmapAction::Add { granularity: None }],
        );
        assert_eq!(
            qemu_bitmaps(&ours),
            qemu_bitmaps(&theirs),
            "cluster {cluster}"
        );
        assert_qemu_check_clean(&ours, &format!("bitmap in a {cluster}-cluster image"));
    }
}

#[test]
fn qemu_bitmaps_changed_by_cowclone() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = twins(dir.path(), "64M", "cluster_size=65536");
    for path in [&ours, &theirs] {
        qemu_bitmap(path, "a", &[BitmapAction::Add { granularity: None }], None);
        qemu_bitmap(
            path,
            "b",
            &[
                BitmapAction::Add {
                    granularity: Some(4096),
                },
                BitmapAction::Disable,
            ],
            None,
        );
        qemu_bitmap(path, "c", &[BitmapAction::Add { granularity: None }], None);
        qemu_io_ok(&[
            &"-c",
            &"write 1M 64k",
            &"-c",
            &"write 10M 300k",
            &"-f",
            &"qcow2",
            path,
        ]);
    }
    assert!(
        !qemu_dirty_ranges(&theirs, "a").is_empty(),
        "qemu-io left a dirty"
    );
    both(&ours, &theirs, "b", &[BitmapAction::Enable]);
    both(&ours, &theirs, "a", &[BitmapAction::Disable]);
    both(
        &ours,
        &theirs,
        "b",
        &[BitmapAction::Merge { source: "a".into() }],
    );
    both(&ours, &theirs, "c", &[BitmapAction::Clear]);
    both(&ours, &theirs, "c", &[BitmapAction::Remove]);
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs));
    assert_qemu_check_clean(&ours, "after enable, disable, merge, clear, remove");
    for name in ["a", "b"] {
        let dirty = qemu_dirty_ranges(&ours, name);
        assert_eq!(dirty, qemu_dirty_ranges(&theirs, name), "bitmap {name}");
        assert!(!dirty.is_empty(), "bitmap {name} has dirty ranges");
    }
    // Removing the last bitmaps drops the extension and the autoclear bit, as qemu does.
    both(&ours, &theirs, "a", &[BitmapAction::Remove]);
    both(&ours, &theirs, "b", &[BitmapAction::Remove]);
    assert_eq!(qemu_bitmaps(&ours), Value::Null);
    assert_qemu_check_clean(&ours, "after removing every bitmap");
}

#[test]
fn merge_from_another_image_with_another_granularity() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = twins(dir.path(), "32M", "cluster_size=65536");
    let source = dir.path().join("source.qcow2");
    qemu_img_ok(&[
        &"create",
        &"-f",
        &"qcow2",
        &"-o",
        &"cluster_size=4096",
        &source,
        &"32M",
    ]);
    qemu_bitmap(
        &source,
        "src",
        &[BitmapAction::Add {
            granularity: Some(512),
        }],
        None,
    );
    qemu_io_ok(&[
        &"-c",
        &"write 3k 1k",
        &"-c",
        &"write 5M 70k",
        &"-c",
        &"write 31M 1M",
        &"-f",
        &"qcow2",
        &source,
    ]);
    let add = [
        BitmapAction::Add {
            granularity: Some(1 << 20),
        },
        BitmapAction::Disable,
    ];
    both(&ours, &theirs, "dst", &add);
    let merge = [BitmapAction::Merge {
        source: "src".into(),
    }];
    bitmap(
        &ours,
        None,
        "dst",
        &merge,
        Some(SourceImage {
            path: &source,
            format: None,
        }),
    )
    .unwrap();
    qemu_bitmap(&theirs, "dst", &merge, Some(&source));
    let dirty = qemu_dirty_ranges(&ours, "dst");
    assert_eq!(dirty, qemu_dirty_ranges(&theirs, "dst"));
    assert_eq!(dirty.len(), 3, "{dirty:?}");
    assert_qemu_check_clean(&ours, "after a merge from another image");
}

#[test]
fn cowclone_writes_are_recorded_in_enabled_bitmaps() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = twins(dir.path(), "64M", "cluster_size=65536");
    for path in [&ours, &theirs] {
        qemu_bitmap(path, "on", &[BitmapAction::Add { granularity: None }], None);
        qemu_bitmap(
            path,
            "fine",
            &[BitmapAction::Add {
                granularity: Some(512),
            }],
            None,
        );
        qemu_bitmap(
            path,
            "off",
            &[
                BitmapAction::Add { granularity: None },
                BitmapAction::Disable,
            ],
            None,
        );
    }
    // The same writes by cowclone and by qemu-io: data, zeros, a discard.
    let mut image =
        imagefmt::chain::open_qcow2_rw(&ours, &BackingPolicy::Deny, WriteOptions::default())
            .unwrap();
    image.write_at(&[0xa5; 4096], 3 << 20).unwrap();
    image
        .write_at(&vec![0x5a; 200 << 10], (20 << 20) + 1000)
        .unwrap();
    image.write_zeroes(40 << 20, 1 << 20).unwrap();
    image.write_at(&[1; 512], (64 << 20) - 512).unwrap();
    image.flush().unwrap();
    drop(image);
    qemu_io_ok(&[
        &"-f",
        &"qcow2",
        &"-c",
        &"write -P 0xa5 3M 4k",
        &"-c",
        &format!("write -P 0x5a {} {}", (20 << 20) + 1000, 200 << 10),
        &"-c",
        &"write -z 40M 1M",
        &"-c",
        &format!("write -P 1 {} 512", (64 << 20) - 512),
        &theirs,
    ]);
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs));
    assert_qemu_check_clean(&ours, "after writes with enabled bitmaps");
    for name in ["on", "fine", "off"] {
        assert_eq!(
            qemu_dirty_ranges(&ours, name),
            qemu_dirty_ranges(&theirs, name),
            "bitmap {name}"
        );
    }
    assert_eq!(qemu_dirty_ranges(&ours, "off"), vec![]);
    assert_eq!(qemu_dirty_ranges(&ours, "on").len(), 4);
    // The guest data is the same too.
    qemu_img_ok(&[&"compare", &ours, &theirs]);
}

#[test]
fn refusals_are_qemus() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = twins(dir.path(), "16M", "cluster_size=65536");
    both(
        &ours,
        &theirs,
        "b",
        &[BitmapAction::Add { granularity: None }],
    );
    let cases: Vec<(&str, Vec<BitmapAction>)> = vec![
        ("b", vec![BitmapAction::Add { granularity: None }]),
        ("nope", vec![BitmapAction::Remove]),
        ("nope", vec![BitmapAction::Enable]),
        ("b", vec![BitmapAction::Merge { source: "x".into() }]),
        (
            "g",
            vec![BitmapAction::Add {
                granularity: Some(1000),
            }],
        ),
        ("", vec![BitmapAction::Add { granularity: None }]),
    ];
    for (name, actions) in cases {
        let ours_err = error_line(&bitmap(&ours, None, name, &actions, None).expect_err("refused"));
        let mut args: Vec<String> = vec!["bitmap".into()];
        for a in &actions {
            args.extend(qemu_args(a));
        }
        args.extend([theirs.display().to_string(), name.to_owned()]);
        let out = run("qemu-img", "qemu-utils", None, &crate::util::args_of(&args));
        assert_eq!(out.status.code(), Some(1));
        let theirs_err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(
            format!("qemu-img: {ours_err}\n"),
            theirs_err,
            "{actions:?} {name:?}"
        );
    }
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs));
    assert_qemu_check_clean(&ours, "after refused actions");
}

/// cowclone's `info` facts for `path`, as JSON: `format-specific.data.bitmaps`.
fn our_bitmaps(path: &Path) -> Value {
    let info = imagefmt::ops::info::image_info(path).expect("cowclone info");
    serde_json::to_value(info).unwrap()["format-specific"]["data"]["bitmaps"].clone()
}

#[test]
fn info_lists_bitmaps_as_qemu_does_in_use_included() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = twins(dir.path(), "16M", "cluster_size=65536");
    assert_eq!(our_bitmaps(&image), Value::Null);
    qemu_bitmap(
        &image,
        "a",
        &[BitmapAction::Add { granularity: None }],
        None,
    );
    qemu_bitmap(
        &image,
        "b",
        &[
            BitmapAction::Add {
                granularity: Some(1 << 20),
            },
            BitmapAction::Disable,
        ],
        None,
    );
    assert_eq!(our_bitmaps(&image), qemu_bitmaps(&image));
    // A writer that dies leaves every bitmap in use (qemu-io's abort is such a death).
    let out = run(
        "qemu-io",
        "qemu-utils",
        None,
        &[
            &"-f",
            &"qcow2",
            &"-c",
            &"write 0 64k",
            &"-c",
            &"abort",
            &image,
        ],
    );
    assert!(!out.status.success(), "qemu-io abort: {}", describe(&out));
    let listed = qemu_bitmaps(&image);
    assert_eq!(
        listed[0]["flags"],
        serde_json::json!(["in-use", "auto"]),
        "{listed}"
    );
    assert_eq!(our_bitmaps(&image), listed);
    // An inconsistent bitmap is refused as qemu-img refuses it, and writing leaves it in use.
    let err =
        error_line(&bitmap(&image, None, "a", &[BitmapAction::Clear], None).expect_err("in use"));
    let out = run(
        "qemu-img",
        "qemu-utils",
        None,
        &[&"bitmap", &"--clear", &image, &"a"],
    );
    assert_eq!(
        format!("qemu-img: {err}\n"),
        String::from_utf8_lossy(&out.stderr)
    );
    let mut writer =
        imagefmt::chain::open_qcow2_rw(&image, &BackingPolicy::Deny, WriteOptions::default())
            .unwrap();
    writer.write_at(&[7; 4096], 1 << 20).unwrap();
    drop(writer);
    assert_eq!(our_bitmaps(&image), qemu_bitmaps(&image));
    assert_eq!(qemu_bitmaps(&image), listed, "still in use");
    // Removing is what qemu allows for them.
    bitmap(&image, None, "a", &[BitmapAction::Remove], None).unwrap();
    assert_eq!(qemu_bitmaps(&image), serde_json::json!([listed[1]]));
    assert_qemu_check_clean(&image, "in-use bitmaps, a write, a removal");
}

/// The `Format specific information:` section of a human `info` (up to the next section).
fn format_specific_lines(text: &str) -> String {
    text.lines()
        .skip_while(|l| !l.starts_with("Format specific information:"))
        .take_while(|l| !l.starts_with("Child node"))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn cli_is_qemu_img_bitmap_flag_for_flag() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = twins(dir.path(), "64M", "cluster_size=65536");
    let source = dir.path().join("source.qcow2");
    qemu_img_ok(&[&"create", &"-f", &"qcow2", &source, &"64M"]);
    qemu_bitmap(
        &source,
        "s",
        &[BitmapAction::Add { granularity: None }],
        None,
    );
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write 7M 1M", &source]);
    let src = source.display().to_string();
    // Each line: the arguments before FILENAME, then the bitmap name (None: left out).
    let cases: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec!["--add"], Some("a")),
        (vec!["--add", "-g", "256k", "--disable"], Some("b")),
        (vec!["--add", "-g", "0"], Some("zero-is-default")),
        (
            vec!["--add", "--disable", "--clear", "--enable", "--disable"],
            Some("c"),
        ),
        (
            vec!["--merge", "s", "-b", &src, "-F", "qcow2", "--enable"],
            Some("b"),
        ),
        (vec!["--merge", "s", "-b", &src], Some("a")),
        (vec!["--merge", "b", "--merge", "a"], Some("c")),
        (vec!["--remove"], Some("zero-is-default")),
        // Refusals, with qemu-img's messages and exit code 1.
        (vec!["--add"], Some("a")),
        (vec!["--add", "-g", "1000"], Some("g")),
        (vec!["--add", "-g", "abc"], Some("g")),
        (vec!["--remove"], Some("missing")),
        (vec!["--clear", "-g", "64k"], Some("a")),
        (vec!["--merge", "s", "-F", "qcow2"], Some("a")),
        (vec!["--enable", "-b", &src], Some("a")),
        (vec![], Some("a")),
        (vec!["--add"], None),
        (vec!["--merge", "nope"], Some("a")),
        (vec!["--merge", "s", "--add"], Some("later")),
    ];
    for (before, name) in &cases {
        let mut theirs_args: Vec<String> = vec!["bitmap".into()];
        theirs_args.extend(before.iter().map(|s| s.to_string()));
        let mut ours_args = theirs_args.clone();
        ours_args.push(ours.display().to_string());
        theirs_args.push(theirs.display().to_string());
        if let Some(name) = name {
            ours_args.push(name.to_string());
            theirs_args.push(name.to_string());
        }
        let ours_out = crate::util::cowclone(&crate::util::args_of(&ours_args));
        let theirs_out = qemu_img(&crate::util::args_of(&theirs_args));
        let context = format!("{before:?} {name:?}");
        assert_eq!(
            ours_out.status.code(),
            theirs_out.status.code(),
            "exit code of {context}: ours {} theirs {}",
            describe(&ours_out),
            describe(&theirs_out)
        );
        let normalise = |out: &std::process::Output, image: &Path, prog: &str| {
            String::from_utf8_lossy(&out.stderr)
                .replace(&image.display().to_string(), "IMAGE")
                .replacen(&format!("{prog}: "), "", 1)
        };
        assert_eq!(
            normalise(&ours_out, &ours, "cowclone"),
            normalise(&theirs_out, &theirs, "qemu-img"),
            "stderr of {context}"
        );
    }
    assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs));
    for name in ["a", "b", "c"] {
        assert_eq!(
            qemu_dirty_ranges(&ours, name),
            qemu_dirty_ranges(&theirs, name),
            "bitmap {name}"
        );
    }
    assert!(!qemu_dirty_ranges(&ours, "c").is_empty());
    assert_qemu_check_clean(&ours, "after the CLI cases");
    // info: the JSON list and the human lines are qemu-img's.
    let ours_json = crate::util::cowclone_info_json(&ours);
    assert_eq!(
        ours_json["format-specific"]["data"]["bitmaps"],
        qemu_bitmaps(&ours)
    );
    let ours_human = crate::util::cowclone_ok(&[&"info", &ours]);
    let theirs_human = qemu_img_ok(&[&"info", &ours]);
    assert_eq!(
        format_specific_lines(&ours_human),
        format_specific_lines(&theirs_human)
    );
    assert!(ours_human.contains("    bitmaps:\n        [0]:\n            flags:\n"));
}

#[test]
fn resize_resizes_bitmaps_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = twins(dir.path(), "40M", "cluster_size=4096");
    for path in [&ours, &theirs] {
        qemu_bitmap(
            path,
            "fine",
            &[BitmapAction::Add {
                granularity: Some(512),
            }],
            None,
        );
        qemu_bitmap(
            path,
            "coarse",
            &[BitmapAction::Add {
                granularity: Some(1 << 20),
            }],
            None,
        );
        // Dirty bits near the end that a shrink cuts off (a discard leaves no data there).
        qemu_io_ok(&[
            &"-f",
            &"qcow2",
            &"-c",
            &"write 1M 8k",
            &"-c",
            &"write 37M 2M",
            &"-c",
            &"discard 37M 2M",
            path,
        ]);
    }
    let resize = |size: u64| {
        let mut image =
            imagefmt::chain::open_qcow2_rw(&ours, &BackingPolicy::Deny, WriteOptions::default())
                .unwrap();
        image.resize(size, true).unwrap();
    };
    // Shrink to a size that cuts a bitmap cluster in the middle, then grow.
    for (size, arg) in [(((38 << 20) + 4096) as u64, "38M+4k"), (100 << 20, "100M")] {
        resize(size);
        let shown = size.to_string();
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"resize", &"-f", &"qcow2"];
        if size < 100 << 20 {
            args.push(&"--shrink");
        }
        args.push(&theirs);
        args.push(&shown);
        qemu_img_ok(&args);
        assert_eq!(qemu_bitmaps(&ours), qemu_bitmaps(&theirs), "after {arg}");
        assert_qemu_check_clean(&ours, &format!("bitmaps after resize to {arg}"));
        for name in ["fine", "coarse"] {
            let dirty = qemu_dirty_ranges(&ours, name);
            assert_eq!(
                dirty,
                qemu_dirty_ranges(&theirs, name),
                "{name} after {arg}"
            );
            assert_eq!(dirty.len(), 2, "{name} after {arg}: {dirty:?}");
        }
    }
}

#[test]
fn a_bitmap_table_pointing_at_metadata_is_refused_not_written_through() {
    let dir = tempfile::tempdir().unwrap();
    let (image, _) = twins(dir.path(), "16M", "cluster_size=65536");
    qemu_bitmap(
        &image,
        "b",
        &[BitmapAction::Add { granularity: None }],
        None,
    );
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write 0 64k", &image]);
    // Point the bitmap's data cluster at the refcount table (cluster 1).
    let mut bytes = std::fs::read(&image).unwrap();
    let cluster = imagefmt::qcow2::HeaderCluster::parse(&bytes[..65536]).unwrap();
    let backend = std::fs::File::open(&image).unwrap();
    let entries = imagefmt::qcow2::bitmap::read_directory(&backend, &cluster).unwrap();
    let slot = entries[0].table_offset as usize;
    assert_ne!(
        bytes[slot..slot + 8],
        [0; 8],
        "qemu stored the dirty cluster"
    );
    bytes[slot..slot + 8].copy_from_slice(&0x1_0000u64.to_be_bytes());
    std::fs::write(&image, &bytes).unwrap();
    let refcount_table = bytes[0x1_0000..0x2_0000].to_vec();
    let mut writer =
        imagefmt::chain::open_qcow2_rw(&image, &BackingPolicy::Deny, WriteOptions::default())
            .unwrap();
    let err = writer.write_at(&[9; 512], 8 << 20).expect_err("refused");
    assert!(
        error_line(&err).contains("shared or overlaps metadata"),
        "{err}"
    );
    drop(writer);
    let after = std::fs::read(&image).unwrap();
    assert_eq!(
        after[0x1_0000..0x2_0000],
        refcount_table[..],
        "refcount table untouched"
    );
    // qemu agrees that the image is corrupt (the cluster is referenced twice).
    let (code, _) = crate::util::qemu_check(&image);
    assert_eq!(code, 2);
}

/// `measure` of an image with persistent bitmaps: the `bitmaps size` (human) and `"bitmaps"`
/// (JSON) qemu-img prints, for output cluster sizes other than the source's and for v2 and raw
/// output (no bitmaps line). Bitmaps added one command at a time leave the file as long as
/// qemu-img's do (every stored bitmap is copied to fresh clusters, tables and directory are
/// written only as far as they go), so even measuring the file as raw agrees.
#[test]
fn measure_counts_bitmaps_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = twins(dir.path(), "2T", "cluster_size=2M");
    for (name, granularity) in [("b1", 512), ("b2", 2 << 20)] {
        both(
            &ours,
            &theirs,
            name,
            &[BitmapAction::Add {
                granularity: Some(granularity),
            }],
        );
    }
    assert_eq!(
        crate::util::file_len(&ours),
        crate::util::file_len(&theirs),
        "file length after two bitmap --add commands"
    );
    assert_qemu_check_clean(&ours, "after two bitmap --add commands");
    for args in [
        vec!["-O", "qcow2", "-o", "cluster_size=64k", "-f", "qcow2"],
        vec!["--output=json", "-O", "qcow2", "-o", "cluster_size=2M"],
        vec!["-O", "qcow2", "-o", "compat=0.10", "-f", "qcow2"],
        vec!["-O", "raw", "-f", "qcow2"],
        vec!["-O", "qcow2", "-f", "raw"],
    ] {
        let run_on = |image: &Path| {
            let mut all: Vec<String> = vec!["measure".into()];
            all.extend(args.iter().map(|a| (*a).to_owned()));
            all.push(image.display().to_string());
            all
        };
        let expected = qemu_img_ok(&crate::util::args_of(&run_on(&theirs)));
        let mut ours_args = vec!["qemu-img".to_owned()];
        ours_args.extend(run_on(&ours));
        let out = crate::util::cowclone_ok(&crate::util::args_of(&ours_args));
        assert_eq!(out, expected, "measure {args:?}");
        if args.contains(&"cluster_size=64k") {
            assert!(expected.contains("bitmaps size: 537198592"), "{expected}");
        }
    }
}

/// Internal snapshots beside persistent bitmaps, as qemu-img 10 handles them: `snapshot -c` and
/// `-d` leave the bitmaps and what they recorded as they were, and `snapshot -a` is refused while
/// any bitmap exists (qemu: "Device has active dirty bitmaps", exit 1), before the snapshot is
/// even looked up, leaving the image untouched.
#[test]
fn snapshots_beside_bitmaps_are_taken_kept_and_refused_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = twins(dir.path(), "64M", "cluster_size=64k");
    let enabled = [BitmapAction::Add { granularity: None }];
    both(&ours, &theirs, "enabled", &enabled);
    both(
        &ours,
        &theirs,
        "disabled",
        &[
            BitmapAction::Add { granularity: None },
            BitmapAction::Disable,
        ],
    );
    for image in [&ours, &theirs] {
        qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 1 0 64k", image]);
    }
    let snapshot = |tool: &str, image: &Path, flag: &str, name: &str| -> std::process::Output {
        let args: [&dyn AsRef<std::ffi::OsStr>; 4] = [&"snapshot", &flag, &name, &image];
        if tool == "cowclone" {
            let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"qemu-img"];
            all.extend(args);
            crate::util::cowclone(&all)
        } else {
            qemu_img(&args)
        }
    };
    for (tool, image) in [("cowclone", &ours), ("qemu-img", &theirs)] {
        let out = snapshot(tool, image, "-c", "s1");
        assert!(
            out.status.success(),
            "{tool} snapshot -c: {}",
            describe(&out)
        );
        qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 2 1M 64k", image]);
    }
    assert_qemu_check_clean(&ours, "snapshot -c beside bitmaps");
    assert_eq!(
        qemu_bitmaps(&ours),
        qemu_bitmaps(&theirs),
        "after snapshot -c"
    );
    assert_eq!(
        qemu_dirty_ranges(&ours, "enabled"),
        qemu_dirty_ranges(&theirs, "enabled"),
        "writes after snapshot -c are recorded"
    );
    let before = dir.path().join("before.qcow2");
    std::fs::copy(&ours, &before).unwrap();
    for name in ["s1", "missing"] {
        let mine = snapshot("cowclone", &ours, "-a", name);
        let reference = snapshot("qemu-img", &theirs, "-a", name);
        assert_eq!(reference.status.code(), Some(1), "{}", describe(&reference));
        assert_eq!(
            (mine.status.code(), String::from_utf8_lossy(&mine.stderr)),
            (
                reference.status.code(),
                String::from_utf8_lossy(&reference.stderr)
            ),
            "snapshot -a {name} beside bitmaps"
        );
    }
    assert_eq!(
        std::fs::read(&ours).unwrap(),
        std::fs::read(&before).unwrap(),
        "a refused snapshot -a changed the image"
    );
    for (tool, image) in [("cowclone", &ours), ("qemu-img", &theirs)] {
        let out = snapshot(tool, image, "-d", "s1");
        assert!(
            out.status.success(),
            "{tool} snapshot -d: {}",
            describe(&out)
        );
    }
    assert_qemu_check_clean(&ours, "snapshot -d beside bitmaps");
    assert_eq!(
        qemu_bitmaps(&ours),
        qemu_bitmaps(&theirs),
        "after snapshot -d"
    );
    for name in ["enabled", "disabled"] {
        assert_eq!(
            qemu_dirty_ranges(&ours, name),
            qemu_dirty_ranges(&theirs, name),
            "bitmap {name} after snapshot -d"
        );
    }
}
