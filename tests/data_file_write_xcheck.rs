//! Writing qcow2 images that keep their guest data in an external data file, cross-checked by
//! qemu: the same writes, zero writes and discards done by cowclone (through the library) on
//! one image and by qemu-io on a twin that qemu-img made alike; then `qemu-img check` must find
//! ours clean, `qemu-img compare` the two equal, `qemu-img map` the same shape, and a raw data
//! file (`data_file_raw=on`) must hold the same bytes as qemu's; then the same for random
//! operations (proptest; there the map is compared where data lies, since cowclone leaves a
//! range that already reads as zeros as it is where qemu-io sets the zero flag). resize,
//! commit, rebase, bitmap and convert through the qemu-img personality are judged the same way
//! against qemu-img itself, and a writer must hold the data file's lock.
//! Tools: Debian package qemu-utils.

use std::path::{Path, PathBuf};

use imagefmt::backing::BackingPolicy;
use imagefmt::chain::{open_qcow2_rw_with, ChainOptions};
use imagefmt::qcow2::write::WriteOptions;

use crate::util::{
    assert_qemu_check_clean, assert_same_content, cowclone_ok_args_in, qemu_img_ok_in, qemu_io_in,
    qemu_map_shape,
};

/// The virtual size of every image here.
const SIZE: u64 = 4 << 20;

/// One guest operation, as cowclone's writer and qemu-io each express it.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write { offset: u64, len: u64, byte: u8 },
    Zero { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

/// Whole and partial clusters (64 KiB), guest cluster 0 (host offset 0 in the data file),
/// runs, copy-on-write into zero clusters, zero writes and discards of allocated clusters.
const OPS: &[Op] = &[
    Op::Write {
        offset: 0,
        len: 0x10000,
        byte: 0x11,
    },
    Op::Write {
        offset: 0x100,
        len: 0x200,
        byte: 0x12,
    },
    Op::Write {
        offset: 0x10100,
        len: 0x300,
        byte: 0x22,
    },
    Op::Write {
        offset: 0x30000,
        len: 0x28000,
        byte: 0x33,
    },
    Op::Write {
        offset: 0x100000,
        len: 0x80000,
        byte: 0x44,
    },
    Op::Zero {
        offset: 0x100000,
        len: 0x20000,
    },
    Op::Zero {
        offset: 0x130100,
        len: 0x100,
    },
    Op::Discard {
        offset: 0x140000,
        len: 0x10000,
    },
    Op::Write {
        offset: 0x14ff00,
        len: 0x200,
        byte: 0x55,
    },
    Op::Write {
        offset: 0x100800,
        len: 0x1000,
        byte: 0x77,
    },
    Op::Write {
        offset: 0x3f0000,
        len: 0x10000,
        byte: 0x66,
    },
    Op::Zero {
        offset: 0x3f0000,
        len: 0x10000,
    },
];

/// Zeroing a cluster that a backing file shows through (only meaningful with one).
const BACKING_OPS: &[Op] = &[
    Op::Zero {
        offset: 0x200000,
        len: 0x10000,
    },
    Op::Write {
        offset: 0x210400,
        len: 0x400,
        byte: 0x88,
    },
];

/// The qemu-io command for `op` (`write -z -u`: zero clusters without keeping their data
/// clusters, as cowclone's `write_zeroes` makes them).
fn qemu_io_command(op: Op) -> String {
    match op {
        Op::Write { offset, len, byte } => format!("write -P {byte} {offset} {len}"),
        Op::Zero { offset, len } => format!("write -z -u {offset} {len}"),
        Op::Discard { offset, len } => format!("discard {offset} {len}"),
    }
}

/// Chain options that open data files (the header names them by absolute path here).
fn with_data_files(policy: &BackingPolicy) -> ChainOptions<'_> {
    ChainOptions {
        allow_data_files: true,
        ..ChainOptions::new(policy)
    }
}

/// Applies `ops` to the image at `path` with cowclone's writer.
fn cowclone_writes(path: &Path, ops: &[Op]) {
    let policy = BackingPolicy::FollowLocal;
    let mut image = open_qcow2_rw_with(path, &with_data_files(&policy), WriteOptions::default())
        .unwrap_or_else(|e| panic!("opening {} for writing: {e}", path.display()));
    for &op in ops {
        match op {
            Op::Write { offset, len, byte } => image.write_at(&vec![byte; len as usize], offset),
            Op::Zero { offset, len } => image.write_zeroes(offset, len),
            Op::Discard { offset, len } => image.discard(offset, len),
        }
        .unwrap_or_else(|e| panic!("{op:?}: {e}"));
    }
    image.flush().unwrap();
}

/// Twin images `DIR/{ours,theirs}/img.qcow2`, each with its data file `d.raw` beside it (named
/// by absolute path), made by qemu-img with `options` (and `backing`, if any).
fn twins(dir: &Path, options: &str, backing: Option<&Path>) -> [PathBuf; 2] {
    ["ours", "theirs"].map(|side| {
        let sub = dir.join(side);
        std::fs::create_dir_all(&sub).unwrap();
        let data = sub.join("d.raw");
        let mut opts = format!("data_file={}", data.display());
        if !options.is_empty() {
            opts = format!("{opts},{options}");
        }
        let image = sub.join("img.qcow2");
        let mut args = vec!["create", "-q", "-f", "qcow2", "-o", &opts];
        let backing_name;
        if let Some(backing) = backing {
            backing_name = backing.display().to_string();
            args.extend(["-b", &backing_name, "-F", "qcow2"]);
        }
        let image_name = image.display().to_string();
        let size = SIZE.to_string();
        args.extend([image_name.as_str(), size.as_str()]);
        qemu_img_ok_in(dir, &args);
        image
    })
}

/// A 4 MiB qcow2 base image in `dir` filled with 0x99.
fn base_image(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "4M"]);
    qemu_io_in(dir, "base.qcow2", &["write -P 153 0 4M"]);
    base
}

/// The data file of a twin.
fn data_of(image: &Path) -> PathBuf {
    image.with_file_name("d.raw")
}

/// Judges our image against qemu's twin: check clean, same content, same map shape, data files
/// of the same length, and the same bytes in a raw data file.
fn assert_twins_agree(ours: &Path, theirs: &Path, raw: bool, context: &str) {
    assert_qemu_check_clean(ours, context);
    assert_same_content(ours, theirs, context);
    assert_eq!(
        qemu_map_shape(ours),
        qemu_map_shape(theirs),
        "{context}: qemu-img map shapes differ"
    );
    let (our_data, their_data) = (data_of(ours), data_of(theirs));
    assert_eq!(
        std::fs::metadata(&our_data).unwrap().len(),
        std::fs::metadata(&their_data).unwrap().len(),
        "{context}: data file lengths differ"
    );
    if raw {
        assert!(
            std::fs::read(&our_data).unwrap() == std::fs::read(&their_data).unwrap(),
            "{context}: the raw data files differ"
        );
        // And the raw data file is the guest disk.
        let raw_args = ["compare", "-f", "raw", "-F", "qcow2"];
        let (a, b) = (our_data.display().to_string(), ours.display().to_string());
        let mut args = raw_args.to_vec();
        args.extend([a.as_str(), b.as_str()]);
        qemu_img_ok_in(ours.parent().unwrap(), &args);
    }
    // Nothing but metadata went into the image file: the data clusters are in the data file.
    let image_len = std::fs::metadata(ours).unwrap().len();
    assert!(
        image_len < 1 << 20,
        "{context}: our image file grew to {image_len} bytes"
    );
}

/// The layouts written: options for qemu-img create, whether the data file is raw, whether a
/// backing file lies below.
const CASES: &[(&str, bool, bool)] = &[
    ("", false, false),
    ("data_file_raw=on", true, false),
    ("", false, true),
    ("extended_l2=on", false, false),
    ("extended_l2=on", false, true),
    (
        "data_file_raw=on,extended_l2=on,cluster_size=32k",
        true,
        false,
    ),
    ("cluster_size=4k", false, true),
];

#[test]
fn guest_writes_into_data_file_images_match_qemu_io() {
    for &(options, raw, with_backing) in CASES {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let base = with_backing.then(|| base_image(dir));
        let [ours, theirs] = twins(dir, options, base.as_deref());
        let mut ops = OPS.to_vec();
        if with_backing {
            ops.extend_from_slice(BACKING_OPS);
        }
        cowclone_writes(&ours, &ops);
        let commands: Vec<String> = ops.iter().map(|&op| qemu_io_command(op)).collect();
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io_in(dir, &theirs.display().to_string(), &commands);
        let context = format!("options {options:?}, backing {with_backing}");
        assert_twins_agree(&ours, &theirs, raw, &context);
        // The data clusters lie at their guest offsets in the data file, as qemu puts them.
        if !raw {
            let data = std::fs::read(data_of(&ours)).unwrap();
            assert_eq!(data[0], 0x11, "{context}: guest cluster 0 not at offset 0");
            assert_eq!(data[0x100], 0x12, "{context}");
            assert_eq!(data[0x160000 - 1], 0x44, "{context}");
        }
    }
}

#[test]
fn compressed_writes_into_a_data_file_image_are_refused_and_convert_n_writes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let [ours, _] = twins(dir, "", None);
    let source = dir.join("src.qcow2");
    qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]);
    qemu_io_in(dir, "src.qcow2", &["write -P 7 64k 64k"]);
    // As qemu-img words it, and nothing is created.
    let args = |name: &str| -> Vec<String> {
        let data = dir.join(format!("{name}.raw")).display().to_string();
        let option = format!("data_file={data}");
        let target = format!("{name}.qcow2");
        [
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            &option,
            "src.qcow2",
            &target,
        ]
        .iter()
        .map(|a| (*a).to_owned())
        .collect()
    };
    // qemu-img's run (it leaves q.qcow2 behind), then ours.
    let theirs = args("q");
    let theirs: Vec<&str> = theirs.iter().map(String::as_str).collect();
    let theirs = crate::util::tool_in("qemu-img", dir, &theirs);
    let ours_args = args("c");
    let mut personality = vec!["qemu-img"];
    personality.extend(ours_args.iter().map(String::as_str));
    let out = crate::util::cowclone_args_in(dir, &personality);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        crate::util::describe(&out)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&theirs.stderr),
        "convert -c -o data_file="
    );
    assert!(!dir.join("c.qcow2").exists());
    // Uncompressed, convert -n writes an existing data file image, as qemu-img does.
    let (source, target) = (source.display().to_string(), ours.display().to_string());
    cowclone_ok_args_in(
        dir,
        &["qemu-img", "convert", "-n", "-O", "qcow2", &source, &target],
    );
    assert_same_content(
        Path::new(&source),
        &ours,
        "convert -n into a data file image",
    );
    assert_qemu_check_clean(&ours, "convert -n into a data file image");
}

/// Runs qemu-img `args` on qemu's twin and the personality on ours: `{}` in `args` stands for
/// the twin's image.
fn both(dir: &Path, images: &[PathBuf; 2], args: &[&str]) {
    let [ours, theirs] = images;
    let with = |image: &Path| -> Vec<String> {
        args.iter()
            .map(|a| a.replace("{}", &image.display().to_string()))
            .collect()
    };
    let our_args = with(ours);
    let mut personality = vec!["qemu-img"];
    personality.extend(our_args.iter().map(String::as_str));
    cowclone_ok_args_in(dir, &personality);
    let their_args = with(theirs);
    let their_args: Vec<&str> = their_args.iter().map(String::as_str).collect();
    qemu_img_ok_in(dir, &their_args);
}

#[test]
fn resize_grows_and_shrinks_the_image_and_its_data_file_as_qemu_img() {
    for (options, raw) in [("", false), ("data_file_raw=on", true)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let images = twins(dir, options, None);
        for image in &images {
            qemu_io_in(
                dir,
                &image.display().to_string(),
                &["write -P 5 0x3f8000 0x8000"],
            );
        }
        both(dir, &images, &["resize", "-q", "{}", "7M"]);
        assert_twins_agree(&images[0], &images[1], raw, &format!("{options}: grown"));
        both(dir, &images, &["resize", "-q", "--shrink", "{}", "3M"]);
        assert_twins_agree(&images[0], &images[1], raw, &format!("{options}: shrunk"));
        both(dir, &images, &["resize", "-q", "{}", "+1M"]);
        assert_twins_agree(&images[0], &images[1], raw, &format!("{options}: regrown"));
    }
}

#[test]
fn commit_into_a_data_file_base_matches_qemu_img() {
    for (options, raw) in [("", false), ("data_file_raw=on", true)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let bases = twins(dir, options, None);
        for (base, top_name) in bases.iter().zip(["ours/top.qcow2", "theirs/top.qcow2"]) {
            qemu_io_in(dir, &base.display().to_string(), &["write -P 1 0 1M"]);
            let backing = base.display().to_string();
            qemu_img_ok_in(
                dir,
                &[
                    "create", "-q", "-f", "qcow2", "-b", &backing, "-F", "qcow2", top_name,
                ],
            );
            qemu_io_in(
                dir,
                top_name,
                &[
                    "write -P 2 0x8000 0x10000",
                    "write -z 0x80000 0x10000",
                    "write -P 3 2M 1M",
                ],
            );
        }
        let tops = [dir.join("ours/top.qcow2"), dir.join("theirs/top.qcow2")];
        both(dir, &tops, &["commit", "-q", "{}"]);
        assert_twins_agree(&bases[0], &bases[1], raw, &format!("{options}: committed"));
        assert_same_content(&tops[0], &tops[1], "the emptied overlays");
    }
}

#[test]
fn rebase_of_a_data_file_image_matches_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let old = base_image(dir);
    qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "new.qcow2", "4M"]);
    qemu_io_in(dir, "new.qcow2", &["write -P 153 0 1M", "write -P 7 1M 1M"]);
    let images = twins(dir, "", Some(&old));
    for image in &images {
        qemu_io_in(
            dir,
            &image.display().to_string(),
            &["write -P 4 0x1f000 0x2000"],
        );
    }
    let new = dir.join("new.qcow2").display().to_string();
    both(
        dir,
        &images,
        &["rebase", "-q", "-F", "qcow2", "-b", &new, "{}"],
    );
    assert_twins_agree(&images[0], &images[1], false, "rebased");
    both(dir, &images, &["rebase", "-q", "-b", "", "{}"]);
    assert_twins_agree(&images[0], &images[1], false, "rebased onto nothing");
}

#[test]
fn bitmap_add_on_a_data_file_image_matches_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let images = twins(dir, "data_file_raw=on", None);
    both(dir, &images, &["bitmap", "--add", "{}", "b0"]);
    assert_twins_agree(&images[0], &images[1], true, "bitmap added");
    // Later writes are recorded in it, as in qemu's.
    cowclone_writes(
        &images[0],
        &[Op::Write {
            offset: 0x20000,
            len: 0x1000,
            byte: 9,
        }],
    );
    qemu_io_in(
        dir,
        &images[1].display().to_string(),
        &["write -P 9 0x20000 0x1000"],
    );
    assert_twins_agree(
        &images[0],
        &images[1],
        true,
        "written after the bitmap was added",
    );
    assert_eq!(
        crate::util::qemu_dirty_ranges(&images[0], "b0"),
        crate::util::qemu_dirty_ranges(&images[1], "b0"),
    );
}

#[test]
fn a_writer_takes_the_data_files_lock_too() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let [ours, _] = twins(dir, "", None);
    let before = std::fs::read(&ours).unwrap();
    // qemu-io writes the data file: cowclone does not write the image over it (stricter than
    // qemu, which shares write access to a data file).
    let holder = crate::locking::Holder::qemu_io(&data_of(&ours), false);
    let image = ours.display().to_string();
    let out = crate::util::cowclone_args_in(dir, &["resize", "--allow-data-file", &image, "8M"]);
    assert!(!out.status.success(), "{}", crate::util::describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Failed to get shared \"write\" lock"),
        "{}",
        crate::util::describe(&out)
    );
    drop(holder);
    assert!(
        std::fs::read(&ours).unwrap() == before,
        "the refused resize changed the image"
    );
    cowclone_ok_args_in(dir, &["resize", "-q", "--allow-data-file", &image, "8M"]);
    assert_qemu_check_clean(&ours, "resized once the data file was free");
}

#[test]
fn convert_into_a_new_data_file_image_matches_qemu_img() {
    for options in ["", ",data_file_raw=on", ",extended_l2=on,cluster_size=128k"] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", "src.qcow2", "4M"]);
        qemu_io_in(
            dir,
            "src.qcow2",
            &[
                "write -P 3 0 1M",
                "write -z 2M 64k",
                "write -P 4 0x300100 0x200",
            ],
        );
        let images = ["ours", "theirs"].map(|side| {
            std::fs::create_dir_all(dir.join(side)).unwrap();
            dir.join(side).join("img.qcow2")
        });
        let data = images
            .each_ref()
            .map(|image| data_of(image).display().to_string());
        let targets = images.each_ref().map(|image| image.display().to_string());
        let opts = data.each_ref().map(|d| format!("data_file={d}{options}"));
        cowclone_ok_args_in(
            dir,
            &[
                "qemu-img",
                "convert",
                "-O",
                "qcow2",
                "-o",
                &opts[0],
                "src.qcow2",
                &targets[0],
            ],
        );
        qemu_img_ok_in(
            dir,
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                &opts[1],
                "src.qcow2",
                &targets[1],
            ],
        );
        let raw = options.contains("raw");
        assert_twins_agree(
            &images[0],
            &images[1],
            raw,
            &format!("convert -o {options:?}"),
        );
        assert_same_content(&dir.join("src.qcow2"), &images[0], "converted");
    }
}

/// Random operations, 512-byte aligned (qemu-io's `write -z` and `discard` want sectors),
/// anywhere on the disk.
fn random_op() -> impl proptest::strategy::Strategy<Value = Op> {
    use proptest::prelude::*;
    let sectors = SIZE / 512;
    let range = (0..sectors).prop_flat_map(move |s| (Just(s * 512), 1..=(sectors - s).min(600)));
    prop_oneof![
        4 => (range.clone(), 1..=255u8)
            .prop_map(|((offset, n), byte)| Op::Write { offset, len: n * 512, byte }),
        1 => range.clone().prop_map(|(offset, n)| Op::Zero { offset, len: n * 512 }),
        1 => range.prop_map(|(offset, n)| Op::Discard { offset, len: n * 512 }),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..Default::default() })]

    /// Random writes, zero writes and discards through cowclone and qemu-io on twin data file
    /// images (raw or not, standard or extended L2 entries, with a backing file or not) leave
    /// images qemu finds clean, equal, of the same map shape, with equal raw data files.
    #[test]
    fn random_writes_into_data_file_images_match_qemu_io(
        case in 0..CASES.len(),
        ops in proptest::collection::vec(random_op(), 1..12),
    ) {
        let (options, raw, with_backing) = CASES[case];
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let base = with_backing.then(|| base_image(dir));
        let [ours, theirs] = twins(dir, options, base.as_deref());
        cowclone_writes(&ours, &ops);
        let commands: Vec<String> = ops.iter().map(|&op| qemu_io_command(op)).collect();
        let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
        qemu_io_in(dir, &theirs.display().to_string(), &commands);
        let context = format!("{options:?} {with_backing} {ops:?}");
        assert_qemu_check_clean(&ours, &context);
        assert_same_content(&ours, &theirs, &context);
        // Where the data lies (cowclone leaves a range that reads as zeros already as it is,
        // where qemu-io's `write -z` sets the zero flag: zero ranges are not told apart).
        proptest::prop_assert_eq!(data_shape(&ours), data_shape(&theirs), "{}", context);
        if raw {
            proptest::prop_assert!(
                std::fs::read(data_of(&ours)).unwrap() == std::fs::read(data_of(&theirs)).unwrap(),
                "{}: the raw data files differ",
                context
            );
        }
    }
}

/// The ranges `qemu-img map` reports as data (with their depth), merged: what
/// [`qemu_map_shape`] shows with every range that holds no data taken as one kind.
fn data_shape(path: &Path) -> Vec<(u64, u64, u64)> {
    let mut ranges: Vec<(u64, u64, u64)> = Vec::new();
    for entry in qemu_map_shape(path) {
        if entry["data"] != true {
            continue;
        }
        let (start, length) = (
            entry["start"].as_u64().unwrap(),
            entry["length"].as_u64().unwrap(),
        );
        let depth = entry["depth"].as_u64().unwrap();
        match ranges.last_mut() {
            Some(last) if last.0 + last.1 == start && last.2 == depth => last.1 += length,
            _ => ranges.push((start, length, depth)),
        }
    }
    ranges
}

#[test]
fn amend_of_the_size_resizes_the_data_file_as_qemu_img() {
    for (options, raw) in [("", false), ("data_file_raw=on", true)] {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let images = twins(dir, options, None);
        for image in &images {
            qemu_io_in(dir, &image.display().to_string(), &["write -P 6 1M 2M"]);
        }
        both(dir, &images, &["amend", "-o", "size=9M", "{}"]);
        assert_twins_agree(
            &images[0],
            &images[1],
            raw,
            &format!("{options}: amend grown"),
        );
        both(dir, &images, &["amend", "-o", "size=2M", "{}"]);
        assert_twins_agree(
            &images[0],
            &images[1],
            raw,
            &format!("{options}: amend shrunk"),
        );
        both(dir, &images, &["amend", "-o", "refcount_bits=4", "{}"]);
        assert_twins_agree(
            &images[0],
            &images[1],
            raw,
            &format!("{options}: refcount width"),
        );
    }
}

#[test]
fn commit_from_an_overlay_with_a_data_file_matches_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let bases = ["ours", "theirs"].map(|side| {
        std::fs::create_dir_all(dir.join(side)).unwrap();
        let base = dir.join(side).join("base.qcow2");
        let name = base.display().to_string();
        qemu_img_ok_in(dir, &["create", "-q", "-f", "qcow2", &name, "4M"]);
        qemu_io_in(dir, &name, &["write -P 1 0 4M"]);
        base
    });
    // The overlays are twins with data files over those bases.
    let tops = ["ours", "theirs"].map(|side| dir.join(side).join("img.qcow2"));
    for (top, base) in tops.iter().zip(&bases) {
        let option = format!("data_file={}", data_of(top).display());
        let (top, base) = (top.display().to_string(), base.display().to_string());
        qemu_img_ok_in(
            dir,
            &[
                "create", "-q", "-f", "qcow2", "-o", &option, "-b", &base, "-F", "qcow2", &top,
                "4M",
            ],
        );
        qemu_io_in(
            dir,
            &top,
            &[
                "write -P 2 0x10100 0x100",
                "write -z 1M 64k",
                "write -P 3 2M 64k",
            ],
        );
    }
    both(dir, &tops, &["commit", "-q", "{}"]);
    assert_qemu_check_clean(&bases[0], "the base committed into");
    assert_same_content(&bases[0], &bases[1], "the bases");
    assert_eq!(
        qemu_map_shape(&bases[0]),
        qemu_map_shape(&bases[1]),
        "the bases' maps"
    );
    assert_twins_agree(&tops[0], &tops[1], false, "the emptied overlays");
}
