//! The qemu-img personality against the real qemu-img 10.0 where they used to differ: the
//! progress lines of `commit -p` and `rebase -p`, lock conflicts of `bitmap`, `-f vdi` on a
//! file in another format, the names of `--image-opts`/`json:`/`file:` images in errors, a
//! data file named for the second image of `compare` and `convert`, and `bitmap
//! --image-opts`. Each compares exit codes and output with qemu-img's on twin inputs.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::locking::Holder;
use crate::personality::{assert_same, personality_dir, qemu_img_as};
use crate::util::{assert_same_content, describe, qemu_img_ok_in, qemu_io_in};

/// Two directories (the real qemu-img's, the personality's) prepared alike by `setup`.
fn twins(tmp: &Path, setup: impl Fn(&Path)) -> [PathBuf; 2] {
    let dirs = [tmp.join("qemu"), tmp.join("cowclone")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        setup(dir);
    }
    dirs
}

/// Runs `args` with the real qemu-img in `dirs[0]` and the personality in `dirs[1]`.
fn both(bin: &Path, dirs: &[PathBuf; 2], args: &[&str]) -> [Output; 2] {
    [
        qemu_img_as(None, &dirs[0], args, &[]),
        qemu_img_as(Some(bin), &dirs[1], args, &[]),
    ]
}

/// The data writes of the multi-MiB overlay: scattered runs of 1 MiB, 3 MiB, 64 KiB, 7 MiB and
/// 1 MiB, as (offset, length) in MiB units of 64 KiB.
const SCATTERED: [&str; 5] = [
    "write -P 1 0 1M",
    "write -P 2 5M 3M",
    "write -P 3 20M 64k",
    "write -P 4 40M 7M",
    "write -P 5 63M 1M",
];

/// `base.qcow2` (`size`, full of data) and `top.qcow2` over it with `writes`; also
/// `other.qcow2`, a copy of the base with different data, to rebase onto.
fn chain(dir: &Path, size: &str, writes: &[&str]) {
    for (name, pattern) in [("base.qcow2", 9), ("other.qcow2", 8)] {
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", name, size]);
        qemu_io_in(dir, name, &[&format!("write -P {pattern} 0 {size}")]);
    }
    qemu_img_ok_in(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    );
    if !writes.is_empty() {
        qemu_io_in(dir, "top.qcow2", writes);
    }
}

/// The progress lines of `stdout` (each "    (x.xx/100%)" ended by '\r') as their values,
/// and what follows them.
fn progress(stdout: &[u8]) -> (Vec<String>, String) {
    let text = String::from_utf8_lossy(stdout).into_owned();
    let mut parts: Vec<&str> = text.split('\r').collect();
    let rest = parts.pop().unwrap_or_default().to_owned();
    let values = parts
        .iter()
        .map(|line| {
            line.strip_prefix("    (")
                .and_then(|l| l.strip_suffix("/100%)"))
                .unwrap_or_else(|| panic!("not a progress line: {line:?} in {text:?}"))
                .to_owned()
        })
        .collect();
    (values, rest)
}

/// The values without repeats in a row.
fn distinct(values: &[String]) -> Vec<String> {
    let mut out: Vec<String> = values.to_vec();
    out.dedup();
    out
}

/// What qemu's commit job (a mirror job) copies of `top.qcow2` in `dir`, request by request,
/// in bytes: from where a run of ranges the overlay holds (`qemu-img map`, depth 0) starts, a
/// pass reaches 16 MiB at most; within it each data range goes in requests of at most 1 MiB,
/// each zero range in one.
fn commit_requests(dir: &Path) -> Vec<u64> {
    let out = qemu_img_ok_in(dir, &["map", "--output=json", "top.qcow2"]);
    let map: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let mut requests = Vec::new();
    let mut pass_end = 0;
    for entry in map.iter().filter(|e| e["depth"] == 0) {
        let mut at = entry["start"].as_u64().unwrap();
        let end = at + entry["length"].as_u64().unwrap();
        let data = entry["data"] == true;
        while at < end {
            if at >= pass_end {
                pass_end = at + (16 << 20);
            }
            let mut piece = (end - at).min(pass_end - at);
            if data {
                piece = piece.min(1 << 20);
            }
            requests.push(piece);
            at += piece;
        }
    }
    requests
}

/// A percentage as qemu-img prints it: `done` of `total` in single precision.
fn percent(done: u64, total: u64) -> String {
    format!("{:.2}", done as f32 / total as f32 * 100.0)
}

#[test]
fn commit_progress_steps_as_qemu_imgs_job_reports() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    for (size, writes) in [
        ("4M", &["write -P 1 0 64k"][..]),
        ("64M", &SCATTERED[..]),
        ("4M", &[]),
        (
            "64M",
            &[
                "write -P 1 0 1M",
                "write -z 1M 3M",
                "write -P 2 10M 2M",
                "write -z 30M 20M",
            ],
        ),
    ] {
        let dirs = twins(&tmp.path().join(format!("c{size}{}", writes.len())), |d| {
            chain(d, size, writes)
        });
        let requests = commit_requests(&dirs[1]);
        let total: u64 = requests.iter().sum();
        let [theirs, ours] = both(&bin, &dirs, &["commit", "-p", "top.qcow2"]);
        let what = format!("commit -p of {size} with {writes:?}");
        assert_eq!(ours.status.code(), theirs.status.code(), "{what}");
        let (t, t_rest) = progress(&theirs.stdout);
        let (o, o_rest) = progress(&ours.stdout);
        assert_eq!(o_rest, t_rest, "{what}: after the lines");
        // The lines qemu-img always prints: 0.00 once before its job and once more as it
        // starts, 100.00 when the job is done and once more after it (only the last without
        // data); the number of repeats in between depends on qemu's timing.
        let zeros = |v: &[String]| v.iter().take_while(|x| *x == "0.00").count();
        let hundreds = |v: &[String]| v.iter().rev().take_while(|x| *x == "100.00").count();
        let expected_hundreds = if total == 0 { 1 } else { 2 };
        assert_eq!(zeros(&o), 2, "{what}: {o:?}");
        assert_eq!(hundreds(&o), expected_hundreds, "{what}: {o:?}");
        assert!(zeros(&t) >= 2, "{what}: qemu-img {t:?}");
        assert!(hundreds(&t) >= expected_hundreds, "{what}: qemu-img {t:?}");
        // In between: one value per request done (where it moved by more than 1), ours in
        // request order; qemu's requests run in parallel and may finish in another order, so
        // each of its values is the share of some of the requests.
        let mut expected = Vec::new();
        let mut last = 0f32;
        let mut done = 0;
        for request in &requests {
            done += request;
            let value = done as f32 / total as f32 * 100.0;
            if value > last + 1.0 {
                last = value;
                expected.push(percent(done, total));
            }
        }
        let inner = |v: &[String]| {
            distinct(v)
                .into_iter()
                .filter(|x| x != "0.00" && x != "100.00")
                .collect::<Vec<_>>()
        };
        expected.retain(|x| x != "100.00");
        assert_eq!(inner(&o), expected, "{what}");
        let mut sums = std::collections::BTreeSet::from([0u64]);
        for request in &requests {
            let more: Vec<u64> = sums.iter().map(|s| s + request).collect();
            sums.extend(more);
        }
        let shares: Vec<String> = sums.iter().map(|&s| percent(s, total)).collect();
        for value in inner(&t) {
            assert!(
                shares.contains(&value),
                "{what}: qemu-img printed {value}, no share of {requests:?}"
            );
        }
        assert_same_content(
            &dirs[1].join("base.qcow2"),
            &dirs[0].join("base.qcow2"),
            &what,
        );
    }
}

#[test]
fn rebase_progress_steps_as_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    for (size, writes) in [
        ("4M", &["write -P 1 0 64k"][..]),
        ("64M", &SCATTERED[..]),
        ("3M", &["write -P 1 1M 64k"]),
    ] {
        for new in ["", "other.qcow2", "base.qcow2"] {
            let dirs = twins(
                &tmp.path().join(format!("r{size}{}{new}", writes.len())),
                |d| chain(d, size, writes),
            );
            let mut args = vec!["rebase", "-p", "-b", new];
            if !new.is_empty() {
                args.extend(["-F", "qcow2"]);
            }
            args.push("top.qcow2");
            // qemu-img's rebase is sequential: the very same lines.
            assert_same(&bin, &dirs, &args, true, true);
            assert_same_content(
                &dirs[1].join("top.qcow2"),
                &dirs[0].join("top.qcow2"),
                &format!("{args:?}"),
            );
        }
    }
    // -u, and a failure: the first line, then the newline.
    let dirs = twins(&tmp.path().join("u"), |d| chain(d, "1M", &[]));
    for args in [
        &["rebase", "-p", "-u", "-b", "", "top.qcow2"][..],
        &["rebase", "-p", "-b", "", "missing.qcow2"],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
}

#[test]
fn commit_progress_of_a_missing_image_prints_nothing_as_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path(), |_| {});
    assert_same(&bin, &dirs, &["commit", "-p", "missing.qcow2"], true, true);
}

#[test]
fn lock_conflicts_and_foreign_formats_are_worded_as_qemu_img_words_them() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path(), |d| chain(d, "4M", &["write -P 1 0 64k"]));
    // Both run against the one image qemu-io holds.
    let held = dirs[1].join("top.qcow2");
    let holder = Holder::qemu_io(&held, false);
    for args in [
        &["bitmap", "--add", "top.qcow2", "b0"][..],
        &[
            "bitmap",
            "--add",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2",
            "b0",
        ],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2",
        ],
        &["resize", "file:top.qcow2", "8M"],
    ] {
        let theirs = qemu_img_as(None, &dirs[1], args, &[]);
        let ours = qemu_img_as(Some(&bin), &dirs[1], args, &[]);
        assert_eq!(
            (ours.status.code(), String::from_utf8_lossy(&ours.stderr)),
            (
                theirs.status.code(),
                String::from_utf8_lossy(&theirs.stderr)
            ),
            "{args:?}"
        );
        assert!(!theirs.status.success(), "{args:?}: {}", describe(&theirs));
    }
    drop(holder);
    // -f vdi on a qcow2 image: qemu's VDI driver refuses it, by its first check that fails.
    for args in [
        &["bench", "-f", "vdi", "-c", "1", "top.qcow2"][..],
        &["info", "-f", "vdi", "top.qcow2"],
        &["info", "-f", "vdi", "base.qcow2"],
        &[
            "check",
            "--image-opts",
            "driver=vdi,file.filename=top.qcow2",
        ],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
}

#[test]
fn images_named_by_options_are_named_so_in_errors_as_qemu_img_names_them() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path(), |d| chain(d, "1M", &[]));
    let json = r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"missing.qcow2"}}"#;
    for args in [
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=missing.qcow2",
        ][..],
        &["info", "--image-opts", "file.filename=missing.qcow2"],
        &["info", json],
        &["info", "file:missing.qcow2"],
        &[
            "check",
            "--image-opts",
            "driver=qcow2,file.filename=missing.qcow2",
        ],
        &["map", json],
        &["convert", "-O", "raw", json, "out.raw"],
        &[
            "compare",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2",
            "driver=qcow2,file.filename=missing.qcow2",
        ],
        &[
            "info",
            "--image-opts",
            "driver=qcow2,file.filename=other.qcow2,,x",
        ],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
}

#[test]
fn a_data_file_named_for_the_second_image_is_read_as_qemu_img_reads_it() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path(), |d| {
        qemu_img_ok_in(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "data_file=d.data,data_file_raw=on",
                "df.qcow2",
                "1M",
            ],
        );
        qemu_io_in(d, "df.qcow2", &["write -P 7 0 64k"]);
        // Another data file for it, with other data, and a plain image with that data.
        qemu_img_ok_in(d, &["create", "-q", "-f", "raw", "d2.data", "1M"]);
        crate::util::tool_ok_in(
            "qemu-io",
            d,
            &["-f", "raw", "-c", "write -P 8 0 64k", "d2.data"],
        );
        qemu_img_ok_in(d, &["create", "-q", "-f", "qcow2", "plain.qcow2", "1M"]);
        qemu_io_in(d, "plain.qcow2", &["write -P 8 0 64k"]);
    });
    let other = "file.filename=df.qcow2,data-file.filename=d2.data";
    for args in [
        &[
            "compare",
            "--image-opts",
            "driver=qcow2,file.filename=plain.qcow2",
            other,
        ][..],
        &[
            "compare",
            "--image-opts",
            "driver=qcow2,file.filename=plain.qcow2",
            "file.filename=df.qcow2",
        ],
        &[
            "convert",
            "--image-opts",
            "driver=qcow2,file.filename=plain.qcow2",
            other,
            "-O",
            "raw",
            "out.raw",
        ],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
    assert_same_content(
        &dirs[1].join("out.raw"),
        &dirs[0].join("out.raw"),
        "convert with the second image's data file",
    );
}

#[test]
fn bitmap_takes_image_opts_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twins(tmp.path(), |d| chain(d, "1M", &[]));
    for args in [
        &[
            "bitmap",
            "--add",
            "-g",
            "128k",
            "--image-opts",
            "driver=qcow2,file.filename=top.qcow2",
            "b0",
        ][..],
        &[
            "bitmap",
            "--disable",
            "--image-opts",
            "file.filename=top.qcow2",
            "b0",
        ],
    ] {
        assert_same(&bin, &dirs, args, true, true);
    }
    let bitmaps = |dir: &Path| {
        let out = qemu_img_ok_in(dir, &["info", "--output=json", "top.qcow2"]);
        let info: Value = serde_json::from_slice(&out.stdout).unwrap();
        info["format-specific"]["data"]["bitmaps"].clone()
    };
    assert_eq!(bitmaps(&dirs[1]), bitmaps(&dirs[0]));
    assert_ne!(bitmaps(&dirs[0]), Value::Null, "qemu-img added the bitmap");
}
