//! Creating qcow2 images with an external data file (`create -o data_file=NAME[,data_file_raw=on]`,
//! with `preallocation=`; natively `cowclone create --data-file NAME [--data-file-raw]`), judged
//! by the real qemu-img: the personality writes the same bytes (image and data file, allocated
//! as much) and prints the same "Formatting" line as qemu-img, before the same refusals, and what
//! qemu-io writes through a cowclone-made image lands in its data file, reads back, and leaves
//! the image clean for `qemu-img check`.

use std::path::{Path, PathBuf};

use crate::util::{cowclone_in, cowclone_ok, describe, qemu_img_in, qemu_img_ok, qemu_io_ok};

/// Runs `args` with the real qemu-img in `dirs[0]` and as `cowclone qemu-img` in `dirs[1]`;
/// asserts the same exit code and standard output.
fn assert_same(dirs: &[PathBuf; 2], args: &[&str]) {
    let theirs = qemu_img_in(&dirs[0], &crate::util::args_of(args));
    let mut ours_args = vec!["qemu-img"];
    ours_args.extend_from_slice(args);
    let ours = cowclone_in(&dirs[1], &crate::util::args_of(&ours_args));
    assert_eq!(
        ours.status.code(),
        theirs.status.code(),
        "qemu-img {args:?}\nqemu-img: {}\ncowclone: {}",
        describe(&theirs),
        describe(&ours)
    );
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "qemu-img {args:?}: stdout"
    );
}

fn same_bytes(a: &Path, b: &Path) {
    let (x, y) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    assert!(
        x == y,
        "{} and {} differ ({} and {} bytes)",
        a.display(),
        b.display(),
        x.len(),
        y.len()
    );
}

#[test]
fn personality_creates_data_file_images_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = [tmp.path().join("qemu"), tmp.path().join("cowclone")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        qemu_img_ok(&[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &dir.join("base.qcow2"),
            &"4G",
        ]);
    }
    let made = [
        ("plain.qcow2", "plain.raw", "data_file=plain.raw", "3M"),
        (
            "raw.qcow2",
            "raw.raw",
            "data_file=raw.raw,data_file_raw=on",
            "3M",
        ),
        (
            "ext.qcow2",
            "ext.raw",
            "data_file=ext.raw,data_file_raw=on,extended_l2=on",
            "3M",
        ),
        // 512-byte clusters: 288 L2 tables, more than the first refcount block counts.
        (
            "small.qcow2",
            "small.raw",
            "data_file=small.raw,data_file_raw=on,cluster_size=512",
            "9M",
        ),
    ];
    for (image, _, options, size) in made {
        assert_same(
            &dirs,
            &["create", "-f", "qcow2", "-o", options, image, size],
        );
    }
    // iotest 270's image: 2 MiB clusters, a backing file and a data file.
    assert_same(
        &dirs,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=2M,data_file=t.orig",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "t.qcow2",
            "4G",
        ],
    );
    for (image, data) in made
        .iter()
        .map(|(i, d, _, _)| (*i, *d))
        .chain([("t.qcow2", "t.orig")])
    {
        same_bytes(&dirs[0].join(image), &dirs[1].join(image));
        let len = |dir: &Path| std::fs::metadata(dir.join(data)).unwrap().len();
        assert_eq!(len(&dirs[1]), len(&dirs[0]), "{data}: length");
        // qemu opens a relative data file name from its working directory.
        let check = qemu_img_in(&dirs[1], &[&"check", &image]);
        assert_eq!(
            check.status.code(),
            Some(0),
            "{image}: {}",
            describe(&check)
        );
    }
    // Refused by both: v2 images, a raw data file with a backing file, raw without a data file.
    for options in ["data_file=x.raw,compat=0.10", "data_file_raw=on"] {
        assert_same(
            &dirs,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                options,
                "bad.qcow2",
                "1M",
            ],
        );
    }
    assert_same(
        &dirs,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=x.raw,data_file_raw=on",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "bad.qcow2",
            "1M",
        ],
    );
    assert!(!dirs[1].join("bad.qcow2").exists() && !dirs[1].join("x.raw").exists());
}

#[test]
fn native_data_file_images_hold_what_qemu_io_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let (image, data) = (dir.join("vm.qcow2"), dir.join("vm.raw"));
    // Absolute names: qemu resolves a relative data file name against its working directory,
    // cowclone against the image's directory.
    let out = cowclone_ok(&[
        &"create",
        &"--data-file",
        &data,
        &"--data-file-raw",
        &image,
        &"8M",
    ]);
    assert!(
        out.contains(&format!("data_file={} data_file_raw=on", data.display())),
        "{out}"
    );
    qemu_io_ok(&[
        &"-f",
        &"qcow2",
        &"-c",
        &"write -P 0x5a 0 1M",
        &"-c",
        &"write -P 0xa5 7M 64k",
        &image,
    ]);
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"read -P 0xa5 7M 64k", &image]);
    crate::util::assert_qemu_check_clean(&image, "after qemu-io writes");
    // A raw data file is the disk itself: guest offset = file offset.
    let same = qemu_img_ok(&[&"compare", &"-f", &"qcow2", &"-F", &"raw", &image, &data]);
    assert!(same.contains("identical"), "{same}");
    let info = crate::util::qemu_info_json(&image);
    assert_eq!(
        info["format-specific"]["data"]["data-file"],
        data.to_str().unwrap()
    );
    assert_eq!(info["format-specific"]["data"]["data-file-raw"], true);

    // Not raw: the data still goes to the data file (nothing but metadata in the image).
    let (plain, plain_data) = (dir.join("plain.qcow2"), dir.join("plain.raw"));
    cowclone_ok(&[&"create", &"--data-file", &plain_data, &plain, &"4M"]);
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0x11 1M 1M", &plain]);
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"read -P 0x11 1M 1M", &plain]);
    crate::util::assert_qemu_check_clean(&plain, "plain data file");
    let raw = std::fs::read(&plain_data).unwrap();
    assert!(raw[1 << 20..2 << 20].iter().all(|&b| b == 0x11));

    // An existing data file is kept unless --overwrite, and then no image appears either.
    let again = cowclone_in(
        dir,
        &[
            &"create",
            &"--data-file",
            &"plain.raw",
            &"other.qcow2",
            &"4M",
        ],
    );
    assert!(!again.status.success(), "{}", describe(&again));
    assert!(!dir.join("other.qcow2").exists());
    assert_eq!(std::fs::read(&plain_data).unwrap(), raw);
}

#[test]
fn personality_preallocates_data_file_images_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = [tmp.path().join("qemu"), tmp.path().join("cowclone")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        qemu_img_ok(&[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &dir.join("base.qcow2"),
            &"4M",
        ]);
    }
    // (image, data file, options, size, extra arguments)
    let made: &[(&str, &str, &str, &str, &[&str])] = &[
        ("m.qcow2", "m.raw", "preallocation=metadata", "8M", &[]),
        ("f.qcow2", "f.raw", "preallocation=falloc", "8M", &[]),
        ("z.qcow2", "z.raw", "preallocation=full", "8M", &[]),
        // An unaligned disk: the last cluster's copy on write writes zeros to its end (and
        // leaves the rest of the data file alone, also under falloc).
        (
            "t.qcow2",
            "t.raw",
            "preallocation=falloc,cluster_size=2M",
            "5M",
            &[],
        ),
        // Extended L2: the copy on write ends at the subcluster.
        (
            "x.qcow2",
            "x.raw",
            "preallocation=metadata,extended_l2=on",
            "3072512",
            &[],
        ),
        (
            "r.qcow2",
            "r.raw",
            "preallocation=full,data_file_raw=on",
            "3000k",
            &[],
        ),
        (
            "b.qcow2",
            "b.raw",
            "preallocation=falloc,extended_l2=on",
            "4M",
            &["-b", "base.qcow2", "-F", "qcow2"],
        ),
    ];
    for (image, data, options, size, extra) in made {
        let options = format!("data_file={data},{options}");
        let mut args = vec!["create", "-f", "qcow2", "-o", &options];
        args.extend_from_slice(extra);
        args.extend_from_slice(&[image, size]);
        assert_same(&dirs, &args);
        same_bytes(&dirs[0].join(image), &dirs[1].join(image));
        same_bytes(&dirs[0].join(data), &dirs[1].join(data));
        let allocated = |dir: &Path| crate::util::allocated_bytes(&dir.join(data));
        assert_eq!(
            allocated(&dirs[1]),
            allocated(&dirs[0]),
            "{data}: allocated bytes ({options})"
        );
        let check = qemu_img_in(&dirs[1], &[&"check", image]);
        assert_eq!(
            check.status.code(),
            Some(0),
            "{image}: {}",
            describe(&check)
        );
        // Every cluster maps to its guest offset: qemu-img's data file is the disk, as raw.
        let theirs = dirs[0].join(data);
        let same = qemu_img_in(
            &dirs[1],
            &[&"compare", &"-f", &"qcow2", &"-F", &"raw", image, &theirs],
        );
        assert_eq!(same.status.code(), Some(0), "{image}: {}", describe(&same));
        // qemu-img map also asks the file system about the data file where qemu guesses an
        // image is metadata-preallocated, which it guesses from the image file's allocated
        // size: the image files are allocated alike, so the maps are the same, holes and all.
        // (Synced first: ext4 counts blocks it reserves for delayed allocation until then.)
        let image_allocated = |dir: &Path| {
            let path = dir.join(image);
            std::fs::File::open(&path).unwrap().sync_all().unwrap();
            crate::util::allocated_bytes(&path)
        };
        assert_eq!(
            image_allocated(&dirs[1]),
            image_allocated(&dirs[0]),
            "{image}: allocated bytes ({options})"
        );
        let map = |dir: &Path| {
            let out = qemu_img_in(dir, &[&"map", &"--output=json", image]);
            assert!(out.status.success(), "{image}: {}", describe(&out));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        assert_eq!(map(&dirs[1]), map(&dirs[0]), "{image}: qemu-img map");
    }
    // Every cluster is mapped, as data, at its guest offset of the data file.
    let map = qemu_img_in(&dirs[1], &[&"map", &"--output=json", &"f.qcow2"]);
    let map: serde_json::Value = serde_json::from_slice(&map.stdout).unwrap();
    assert_eq!(map.as_array().unwrap().len(), 1, "{map}");
    assert_eq!(map[0]["length"], 8 << 20);
    assert_eq!(
        (map[0]["data"].as_bool(), map[0]["offset"].as_u64()),
        (Some(true), Some(0))
    );
    // falloc and full take the disk's space in the data file, metadata does not.
    let allocated = |name: &str| crate::util::allocated_bytes(&dirs[1].join(name));
    assert!(allocated("f.raw") >= 8 << 20 && allocated("z.raw") >= 8 << 20);
    assert!(allocated("m.raw") < 1 << 20);
    // qemu-io's writes through a preallocated image land in its data file (relative data file
    // names are opened from the working directory).
    crate::util::tool_ok_in(
        "qemu-io",
        &dirs[1],
        &["-f", "qcow2", "-c", "write -P 0x3c 1M 64k", "r.qcow2"],
    );
    crate::util::tool_ok_in(
        "qemu-img",
        &dirs[1],
        &["compare", "-f", "qcow2", "-F", "raw", "r.qcow2", "r.raw"],
    );
    crate::util::tool_ok_in("qemu-img", &dirs[1], &["check", "r.qcow2"]);
    let raw = std::fs::read(dirs[1].join("r.raw")).unwrap();
    assert!(raw[1 << 20..(1 << 20) + (64 << 10)]
        .iter()
        .all(|&b| b == 0x3c));

    // A preallocated overlay would hide its backing file: refused without extended L2, after
    // the line, and no file is left behind.
    assert_same(
        &dirs,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=bad.raw,preallocation=metadata",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "bad.qcow2",
            "1M",
        ],
    );
    assert!(!dirs[1].join("bad.qcow2").exists() && !dirs[1].join("bad.raw").exists());
}

#[test]
fn formatting_line_doubles_commas_and_precedes_create_refusals_as_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs = [tmp.path().join("qemu"), tmp.path().join("cowclone")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
    }
    // String values are printed as qemu writes them in an option list: commas doubled.
    assert_same(
        &dirs,
        &[
            "create",
            "-f",
            "qcow2",
            "-u",
            "-b",
            "a,b.qcow2",
            "-F",
            "qcow2",
            "c.qcow2",
            "1M",
        ],
    );
    // The line comes first where the format refuses the request.
    for options in [
        "data_file_raw=on",
        "data_file=x.raw,compat=0.10",
        "preallocation=sometimes",
    ] {
        assert_same(
            &dirs,
            &["create", "-f", "qcow2", "-o", options, "bad.qcow2", "1M"],
        );
    }
    assert_same(
        &dirs,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "data_file=x.raw,data_file_raw=on",
            "-u",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "bad.qcow2",
            "1M",
        ],
    );
    assert_same(
        &dirs,
        &[
            "create",
            "-f",
            "raw",
            "-o",
            "preallocation=metadata",
            "bad.raw",
            "1M",
        ],
    );
    for name in ["bad.qcow2", "x.raw", "bad.raw"] {
        assert!(!dirs[1].join(name).exists(), "{name} left behind");
    }
}
