//! convert's `--bitmaps`, `--skip-broken-bitmaps`, `--salvage`, `--target-is-zero`, `-r` and
//! measure's `-l`, run through the qemu-img personality and through the real qemu-img 10 on
//! twin inputs (built by qemu-img and qemu-io in two directories): the same exit codes, standard
//! output and standard error, and outputs judged by qemu itself (`qemu-img compare`, `map
//! --output=json`, `check`, `info --output=json` for the bitmaps, and the dirty bits read back
//! through `qemu-nbd -B`). The native `cowclone convert` and `measure` are checked against the
//! same results.

use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;

use crate::personality::{personality_dir, qemu_img_as};
use crate::util::{
    assert_qemu_check_clean, assert_same_content, cowclone_in, describe, qemu_dirty_ranges,
    qemu_img_ok_in, qemu_info_json, qemu_io_in, qemu_map_shape, tool_in,
};

/// Two directories with the same inputs, made by `setup` with the real tools: the first for the
/// real qemu-img, the second for the personality.
fn twins(tmp: &Path, setup: impl Fn(&Path)) -> [PathBuf; 2] {
    let dirs = [tmp.join("qemu"), tmp.join("cowclone")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        setup(dir);
    }
    dirs
}

/// Runs `qemu-img ARGS` in both directories: the real one in the first, the personality in the
/// second; asserts that both exit alike and print the same; returns the personality's output.
fn same_as_qemu_img(tmp: &Path, dirs: &[PathBuf; 2], args: &[&str]) -> Output {
    let bin = personality_dir(tmp);
    let theirs = qemu_img_as(None, &dirs[0], args, &[]);
    let ours = qemu_img_as(Some(&bin), &dirs[1], args, &[]);
    assert_eq!(
        (ours.status.code(), &ours.stdout, &ours.stderr),
        (theirs.status.code(), &theirs.stdout, &theirs.stderr),
        "qemu-img {args:?}\npersonality: {}\nqemu-img: {}",
        describe(&ours),
        describe(&theirs)
    );
    ours
}

/// The `bitmaps` list of `qemu-img info --output=json` (empty without one).
fn qemu_bitmaps(path: &Path) -> Value {
    qemu_info_json(path)["format-specific"]["data"]["bitmaps"].clone()
}

/// The names of the bitmaps `qemu-img info` lists.
fn bitmap_names(path: &Path) -> Vec<String> {
    qemu_bitmaps(path)
        .as_array()
        .map(|list| {
            list.iter()
                .map(|b| b["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Asserts that two qcow2 images hold the same guest data, the same bitmaps (names,
/// granularity, flags, in order) with the same dirty ranges as qemu reads them, and are clean.
fn assert_same_image_and_bitmaps(ours: &Path, theirs: &Path, context: &str) {
    assert_same_content(ours, theirs, context);
    assert_qemu_check_clean(ours, context);
    assert_eq!(
        qemu_bitmaps(ours),
        qemu_bitmaps(theirs),
        "{context}: bitmaps"
    );
    for name in bitmap_names(theirs) {
        assert_eq!(
            qemu_dirty_ranges(ours, &name),
            qemu_dirty_ranges(theirs, &name),
            "{context}: dirty ranges of bitmap {name}"
        );
    }
}

/// qemu-img-bitmaps' setup: `t.base` with bitmap b0, `t.orig` over it with b1 (512 KiB
/// granularity, disabled, cleared once) and b2 (disabled, then enabled), with writes between.
fn bitmap_images(dir: &Path) {
    qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "t.base", "10M"]);
    qemu_img_ok_in(dir, &["bitmap", "--add", "t.base", "b0"]);
    qemu_io_in(dir, "t.base", &["write 3M 1M"]);
    let backed = ["create", "-q", "-f", "qcow2", "-b", "t.base", "-F", "qcow2"];
    qemu_img_ok_in(dir, &[&backed[..], &["t.orig", "10M"]].concat());
    qemu_io_in(dir, "t.orig", &["write -P 1 0 1M"]);
    qemu_img_ok_in(dir, &["bitmap", "--add", "-g", "512k", "t.orig", "b1"]);
    qemu_img_ok_in(dir, &["bitmap", "--add", "--disable", "t.orig", "b2"]);
    qemu_io_in(dir, "t.orig", &["write -P 2 3M 1M"]);
    qemu_img_ok_in(dir, &["bitmap", "--clear", "t.orig", "b1"]);
    qemu_io_in(dir, "t.orig", &["write -P 3 1M 1M"]);
    qemu_img_ok_in(dir, &["bitmap", "--disable", "t.orig", "b1"]);
    qemu_img_ok_in(dir, &["bitmap", "--enable", "t.orig", "b2"]);
    qemu_io_in(dir, "t.orig", &["write -P 4 2M 1M"]);
}

#[test]
fn bitmaps_are_copied_as_qemu_img_copies_them() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = twins(tmp.path(), bitmap_images);
    same_as_qemu_img(
        tmp.path(),
        &dirs,
        &["convert", "--bitmaps", "-O", "qcow2", "t.orig", "t.copy"],
    );
    let [theirs, ours] = [dirs[0].join("t.copy"), dirs[1].join("t.copy")];
    assert_eq!(bitmap_names(&theirs), ["b1", "b2"], "qemu-img's copy");
    assert_same_image_and_bitmaps(&ours, &theirs, "convert --bitmaps");
    // The native command copies the same bitmaps.
    let native = dirs[1].join("native.qcow2");
    let out = cowclone_in(
        &dirs[1],
        &[
            &"convert",
            &"--bitmaps",
            &"-O",
            &"qcow2",
            &"t.orig",
            &native,
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_same_image_and_bitmaps(&native, &theirs, "cowclone convert --bitmaps");
    // Into an existing image (-n): the target's own bitmaps stay first, the copies follow;
    // the data written sets the target's enabled bitmap.
    for dir in &dirs {
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "t.into", "10M"]);
        qemu_img_ok_in(dir, &["bitmap", "--add", "t.into", "own"]);
    }
    same_as_qemu_img(
        tmp.path(),
        &dirs,
        &[
            "convert",
            "-n",
            "--bitmaps",
            "-O",
            "qcow2",
            "t.orig",
            "t.into",
        ],
    );
    let [theirs, ours] = [dirs[0].join("t.into"), dirs[1].join("t.into")];
    assert_eq!(
        bitmap_names(&theirs),
        ["own", "b1", "b2"],
        "qemu-img's -n copy"
    );
    assert_same_image_and_bitmaps(&ours, &theirs, "convert -n --bitmaps");
}

#[test]
fn bitmap_refusals_and_skips_are_qemu_imgs() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = twins(tmp.path(), |dir| {
        bitmap_images(dir);
        qemu_img_ok_in(
            dir,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "v2",
                "10M",
            ],
        );
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "big", "20M"]);
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "named", "10M"]);
        qemu_img_ok_in(dir, &["bitmap", "--add", "named", "b2"]);
        // b1 and b2 left in use by a qemu that did not close the image; b4 added after.
        std::fs::copy(dir.join("t.orig"), dir.join("broken")).unwrap();
        let _ = tool_in("qemu-io", dir, &["-f", "qcow2", "-c", "abort", "broken"]);
        qemu_img_ok_in(dir, &["bitmap", "--add", "broken", "b4"]);
    });
    let refused: &[&[&str]] = &[
        &[
            "convert",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "t.orig",
            "x",
        ],
        &[
            "convert",
            "--bitmaps",
            "-O",
            "qcow2",
            "t.orig",
            "t.orig",
            "x",
        ],
        &["convert", "--bitmaps", "-O", "qcow2", "v2", "x"],
        &["convert", "--bitmaps", "-O", "qcow2", "broken", "x"],
        &[
            "convert",
            "-n",
            "--bitmaps",
            "-O",
            "qcow2",
            "t.orig",
            "named",
        ],
        &["convert", "-n", "--bitmaps", "-O", "qcow2", "t.orig", "big"],
        &["convert", "-n", "--bitmaps", "-O", "qcow2", "t.orig", "v2"],
    ];
    for args in refused {
        let out = same_as_qemu_img(tmp.path(), &dirs, args);
        assert_eq!(out.status.code(), Some(1), "{args:?}");
    }
    for (name, context) in [("named", "name taken"), ("big", "sizes differ")] {
        let [theirs, ours] = [dirs[0].join(name), dirs[1].join(name)];
        assert_same_image_and_bitmaps(&ours, &theirs, context);
    }
    assert!(!dirs[1].join("x").exists(), "nothing created");
    // The target's format has no bitmaps: qemu-img creates it first, cowclone does not (the
    // messages and exit codes are the same).
    let args = ["convert", "--bitmaps", "-O", "raw", "t.orig", "x.raw"];
    same_as_qemu_img(tmp.path(), &dirs, &args);
    // Skipping the broken ones: a warning each (in qemu-img's order), the rest copied.
    same_as_qemu_img(
        tmp.path(),
        &dirs,
        &[
            "convert",
            "--bitmaps",
            "--skip-broken-bitmaps",
            "-O",
            "qcow2",
            "broken",
            "skipped",
        ],
    );
    let [theirs, ours] = [dirs[0].join("skipped"), dirs[1].join("skipped")];
    assert_eq!(bitmap_names(&theirs), ["b4"], "qemu-img skipped b1 and b2");
    assert_same_image_and_bitmaps(&ours, &theirs, "--skip-broken-bitmaps");
}

/// Overwrites the 8 bytes at `at` of `path` with `value` (big-endian).
fn poke_u64(path: &Path, at: u64, value: u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&value.to_be_bytes(), at).unwrap();
}

/// Reads the 8 bytes at `at` of `path` (big-endian).
fn peek_u64(path: &Path, at: u64) -> u64 {
    use std::os::unix::fs::FileExt;
    let mut bytes = [0u8; 8];
    let file = std::fs::File::open(path).unwrap();
    file.read_exact_at(&mut bytes, at).unwrap();
    u64::from_be_bytes(bytes)
}

/// Offset of the first L2 table of a qcow2 image (its L1 table's first entry).
fn first_l2_table(path: &Path) -> u64 {
    let l1 = peek_u64(path, 40);
    peek_u64(path, l1) & 0x00ff_ffff_ffff_fe00
}

/// Images with unreadable parts, as qemu-img and qemu-io wrote them, then poked: `l2.qcow2`
/// (1 MiB; data at 0..128k and 256k..320k; the L2 entry of the cluster at 64k made unaligned)
/// and `zip.qcow2` (compressed clusters; the second one's deflate stream overwritten).
fn corrupt_images(dir: &Path) {
    qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "l2.qcow2", "1M"]);
    qemu_io_in(
        dir,
        "l2.qcow2",
        &["write -P 0x11 0 128k", "write -P 0x22 256k 64k"],
    );
    let l2 = dir.join("l2.qcow2");
    let entry = first_l2_table(&l2) + 8;
    poke_u64(&l2, entry, peek_u64(&l2, entry) | 0x200);
    std::fs::write(
        dir.join("plain.raw"),
        [vec![0x33u8; 64 << 10], vec![0x44u8; 64 << 10]].concat(),
    )
    .unwrap();
    qemu_img_ok_in(
        dir,
        &["convert", "-c", "-O", "qcow2", "plain.raw", "zip.qcow2"],
    );
    let zip = dir.join("zip.qcow2");
    let entry = peek_u64(&zip, first_l2_table(&zip) + 8);
    // 64 KiB clusters: the host offset is in the low 62 - (16 - 8) = 54 bits.
    let host = entry & ((1 << 54) - 1);
    poke_u64(&zip, host, u64::MAX);
    poke_u64(&zip, host + 8, u64::MAX);
}

#[test]
fn salvage_copies_what_cannot_be_read_as_zeros() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = twins(tmp.path(), corrupt_images);
    // qemu's qcow2 driver prints one line of its own when it meets the corrupt entry, so does
    // the personality: the whole of standard error matches.
    let bin = personality_dir(tmp.path());
    // A read-only open does not mark the image corrupt (neither does qemu's).
    let sources_before =
        [&dirs[1].join("l2.qcow2"), &dirs[1].join("zip.qcow2")].map(|p| std::fs::read(p).unwrap());
    for (source, format, flags) in [
        ("l2.qcow2", "raw", &[][..]),
        ("l2.qcow2", "qcow2", &[]),
        ("zip.qcow2", "raw", &[]),
        ("zip.qcow2", "qcow2", &[]),
        // Compressed output takes whole clusters: one status failure per cluster.
        ("l2.qcow2", "qcow2", &["-c"]),
        ("zip.qcow2", "qcow2", &["-c"]),
        // Into an existing image: the same warnings.
        ("l2.qcow2", "qcow2", &["-n"]),
    ] {
        for dir in &dirs {
            qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "out", "1M"]);
        }
        let args = [
            &["convert", "--salvage"],
            flags,
            &["-O", format, source, "out"],
        ]
        .concat();
        let theirs = qemu_img_as(None, &dirs[0], &args, &[]);
        let ours = qemu_img_as(Some(&bin), &dirs[1], &args, &[]);
        let theirs_err = String::from_utf8_lossy(&theirs.stderr);
        let theirs_err: Vec<&str> = theirs_err.lines().collect();
        let ours_err = String::from_utf8_lossy(&ours.stderr);
        assert!(
            ours_err.lines().count() >= 128,
            "{args:?}: a warning per sector"
        );
        assert_eq!(
            (ours.status.code(), ours_err.lines().collect::<Vec<_>>()),
            (theirs.status.code(), theirs_err),
            "{args:?}"
        );
        let [theirs, ours] = [dirs[0].join("out"), dirs[1].join("out")];
        assert_same_content(&ours, &theirs, &format!("{args:?}"));
        assert_eq!(
            qemu_map_shape(&ours),
            qemu_map_shape(&theirs),
            "{args:?}: map"
        );
        // Without --salvage both refuse, with the same words (the failed request's offset).
        let strict = [&["convert"], flags, &["-O", format, source, "out"]].concat();
        let theirs = qemu_img_as(None, &dirs[0], &strict, &[]);
        let ours = qemu_img_as(Some(&bin), &dirs[1], &strict, &[]);
        assert_eq!(ours.status.code(), Some(1), "{}", describe(&ours));
        assert_eq!(theirs.status.code(), Some(1), "{}", describe(&theirs));
        assert_eq!(
            String::from_utf8_lossy(&ours.stderr),
            String::from_utf8_lossy(&theirs.stderr),
            "{strict:?}"
        );
    }
    let sources_after =
        [&dirs[1].join("l2.qcow2"), &dirs[1].join("zip.qcow2")].map(|p| std::fs::read(p).unwrap());
    assert!(
        sources_after == sources_before,
        "a source image was modified"
    );
    // The native command salvages too, with the same warnings under its own name.
    let out = cowclone_in(
        &dirs[1],
        &[
            &"convert",
            &"--salvage",
            &"-O",
            &"raw",
            &"zip.qcow2",
            &"native",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with(
            "cowclone: warning: error while reading offset 65536: Input/output error\n"
        ),
        "{stderr}"
    );
    let reference = [
        "convert",
        "--salvage",
        "-O",
        "raw",
        "zip.qcow2",
        "reference",
    ];
    let _ = tool_in("qemu-img", &dirs[0], &reference);
    assert_same_content(
        &dirs[1].join("native"),
        &dirs[0].join("reference"),
        "native --salvage",
    );
}

#[test]
fn target_is_zero_leaves_zero_ranges_alone_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = twins(tmp.path(), |dir| {
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "src", "4M"]);
        qemu_io_in(
            dir,
            "src",
            &["write -P 0x55 0 1M", "write -z 1M 1M", "write -P 0 2M 64k"],
        );
        for target in ["fresh", "stale", "plain", "kept"] {
            qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", target, "4M"]);
        }
        // Not zero, whatever the caller says: what --target-is-zero leaves is seen.
        qemu_io_in(dir, "stale", &["write -P 0x77 1M 2M"]);
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "backing", "4M"]);
    });
    for target in ["fresh", "stale"] {
        let args = [
            "convert",
            "-n",
            "--target-is-zero",
            "-O",
            "qcow2",
            "src",
            target,
        ];
        same_as_qemu_img(tmp.path(), &dirs, &args);
        let [theirs, ours] = [dirs[0].join(target), dirs[1].join(target)];
        assert_same_content(&ours, &theirs, target);
        assert_eq!(
            qemu_map_shape(&ours),
            qemu_map_shape(&theirs),
            "{target}: map"
        );
        assert_qemu_check_clean(&ours, target);
    }
    // Without the flag the zero ranges are written over the target.
    same_as_qemu_img(
        tmp.path(),
        &dirs,
        &["convert", "-n", "-O", "qcow2", "src", "plain"],
    );
    let plain = qemu_map_shape(&dirs[1].join("plain"));
    assert_ne!(
        plain,
        qemu_map_shape(&dirs[1].join("fresh")),
        "zeros written"
    );
    assert_eq!(plain, qemu_map_shape(&dirs[0].join("plain")));
    let out = same_as_qemu_img(
        tmp.path(),
        &dirs,
        &["convert", "--target-is-zero", "-O", "qcow2", "src", "new"],
    );
    assert_eq!(out.status.code(), Some(1));
    // With a backing file qemu-img refuses, copies nothing, and still exits 0.
    let args = [
        "convert",
        "-n",
        "--target-is-zero",
        "-B",
        "backing",
        "-O",
        "qcow2",
        "src",
        "kept",
    ];
    let out = same_as_qemu_img(tmp.path(), &dirs, &args);
    assert_eq!(out.status.code(), Some(0));
    let kept = qemu_map_shape(&dirs[1].join("kept"));
    assert_eq!(kept, qemu_map_shape(&dirs[0].join("kept")));
    assert!(
        kept.iter().all(|e| e["data"] == Value::Bool(false)),
        "nothing copied: {kept:?}"
    );
}

#[test]
fn rate_limited_convert_copies_the_same_and_refuses_as_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = twins(tmp.path(), |dir| {
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "src", "8M"]);
        qemu_io_in(dir, "src", &["write -P 0x66 0 3M", "write -P 0x67 5M 1M"]);
    });
    let args = ["convert", "-r", "64M", "-O", "qcow2", "src", "out"];
    same_as_qemu_img(tmp.path(), &dirs, &args);
    let [theirs, ours] = [dirs[0].join("out"), dirs[1].join("out")];
    assert_same_content(&ours, &theirs, "-r 64M");
    assert_eq!(
        qemu_map_shape(&ours),
        qemu_map_shape(&theirs),
        "-r 64M: map"
    );
    for rate in ["foo", "-5", "1x"] {
        let out = same_as_qemu_img(
            tmp.path(),
            &dirs,
            &["convert", "-r", rate, "-O", "qcow2", "src", "bad"],
        );
        assert_eq!(out.status.code(), Some(1), "-r {rate}");
    }
}

#[test]
fn measure_of_a_snapshot_is_qemu_imgs() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = twins(tmp.path(), |dir| {
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "img", "1G"]);
        qemu_io_in(dir, "img", &["write 512 512", "write 64k 64k"]);
        qemu_img_ok_in(dir, &["snapshot", "-c", "snapshot1", "img"]);
        qemu_io_in(dir, "img", &["write 128M 63k"]);
    });
    let mut numbers = Vec::new();
    for args in [
        &["measure", "-O", "qcow2", "img"][..],
        &["measure", "-O", "qcow2", "-l", "snapshot1", "img"],
        &[
            "measure",
            "--output=json",
            "-O",
            "qcow2",
            "-l",
            "snapshot.name=snapshot1",
            "img",
        ],
        &["measure", "-O", "raw", "-l", "snapshot.id=1", "img"],
        &["measure", "-l", "nosuch", "img"],
        &["measure", "-l", "snap1"],
        &["measure", "-l", "snapshot.foo=bar", "img"],
    ] {
        let out = same_as_qemu_img(tmp.path(), &dirs, args);
        numbers.push(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    assert_ne!(
        numbers[0], numbers[1],
        "the snapshot holds less than the image"
    );
    // The native command: --snapshot gives the same numbers.
    let out = cowclone_in(
        &dirs[1],
        &[
            &"measure",
            &"-O",
            &"qcow2",
            &"--snapshot",
            &"snapshot1",
            &"img",
        ],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), numbers[1]);
}
