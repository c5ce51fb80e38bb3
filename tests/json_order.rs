//! cowclone's JSON against qemu-img's, byte for byte: `info` (plain, a chain, internal snapshots,
//! persistent bitmaps, an external data file, extended L2 entries, zstd compression, qcow2 v2,
//! raw), `check` (clean, and with a leaked cluster) and `measure`, all run on the same images
//! made by the real qemu-img. qemu-img prints each object in its `QDict`'s hash order and with
//! its own pretty printer; the personality (`cowclone qemu-img …`) and the native commands must
//! print the same bytes.

use std::path::Path;

use crate::util::{cowclone_in, describe, qemu_img_in};

/// Runs `qemu-img ARGS` in `dir` with the real qemu-img and as `cowclone qemu-img ARGS`, and
/// asserts that both succeed and print the same bytes; returns qemu-img's output.
fn assert_same_output(dir: &Path, args: &[&str]) -> String {
    let qemu = qemu_img_in(dir, &crate::util::args_of(args));
    assert!(
        qemu.status.success(),
        "qemu-img {args:?}: {}",
        describe(&qemu)
    );
    let mut ours_args = vec!["qemu-img"];
    ours_args.extend_from_slice(args);
    let ours = cowclone_in(dir, &crate::util::args_of(&ours_args));
    assert!(
        ours.status.success(),
        "cowclone {ours_args:?}: {}",
        describe(&ours)
    );
    let (theirs, ours) = (
        String::from_utf8(qemu.stdout).unwrap(),
        String::from_utf8(ours.stdout).unwrap(),
    );
    assert_eq!(ours, theirs, "qemu-img {args:?}: cowclone's output differs");
    theirs
}

/// Runs the real qemu-img in `dir`, asserting success.
fn qemu_ok(dir: &Path, args: &[&str]) {
    let output = qemu_img_in(dir, &crate::util::args_of(args));
    assert!(
        output.status.success(),
        "qemu-img {args:?}: {}",
        describe(&output)
    );
}

#[test]
fn info_check_and_measure_json_are_qemu_imgs_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qemu_ok(dir, &["create", "-q", "-f", "qcow2", "base.qcow2", "64M"]);
    qemu_ok(dir, &["snapshot", "-c", "first", "base.qcow2"]);
    qemu_ok(dir, &["snapshot", "-c", "second", "base.qcow2"]);
    qemu_ok(
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
    qemu_ok(
        dir,
        &["create", "-q", "-f", "qcow2", "bitmaps.qcow2", "16M"],
    );
    qemu_ok(dir, &["bitmap", "--add", "bitmaps.qcow2", "b0"]);
    qemu_ok(
        dir,
        &["bitmap", "--add", "-g", "128k", "bitmaps.qcow2", "b1"],
    );
    qemu_ok(dir, &["bitmap", "--disable", "bitmaps.qcow2", "b1"]);
    qemu_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "data_file=data.raw,data_file_raw=on,extended_l2=on,compression_type=zstd",
            "external.qcow2",
            "4M",
        ],
    );
    qemu_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "compat=0.10,cluster_size=4096",
            "v2.qcow2",
            "1M",
        ],
    );
    qemu_ok(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,refcount_bits=1",
            "lazy.qcow2",
            "1M",
        ],
    );
    qemu_ok(dir, &["create", "-q", "-f", "raw", "disk.raw", "1M"]);

    for image in [
        "base.qcow2",
        "top.qcow2",
        "bitmaps.qcow2",
        "external.qcow2",
        "v2.qcow2",
        "lazy.qcow2",
        "disk.raw",
    ] {
        assert_same_output(dir, &["info", "--output=json", image]);
        if image.ends_with(".qcow2") {
            assert_same_output(dir, &["check", "--output=json", image]);
        }
    }
    let chain = assert_same_output(
        dir,
        &["info", "--output=json", "--backing-chain", "top.qcow2"],
    );
    // The output holds what the comparison is about: keys that share a hash bucket
    // (`children` before `backing-filename-format`), snapshots, nested dictionaries.
    assert!(chain.find("\"children\"") < chain.find("\"backing-filename-format\""));
    assert!(chain.contains("\"name\": \"second\""), "{chain}");
    let bitmaps = assert_same_output(dir, &["info", "--output=json", "bitmaps.qcow2"]);
    assert!(bitmaps.contains("\"granularity\": 131072"), "{bitmaps}");
    let external = assert_same_output(dir, &["info", "--output=json", "external.qcow2"]);
    assert!(external.contains("\"data-file-raw\": true"), "{external}");
    assert!(
        external.contains("\"compression-type\": \"zstd\""),
        "{external}"
    );

    // A leaked cluster: check's JSON gains "leaks" (exit code 3 from both).
    qemu_ok(dir, &["create", "-q", "-f", "qcow2", "leak.qcow2", "1M"]);
    crate::util::qemu_io_ok(&[&"-c", &"write 0 64k", &dir.join("leak.qcow2")]);
    leak_first_data_cluster(&dir.join("leak.qcow2"));
    let check = |ours: bool| {
        let args: &[&str] = if ours {
            &["qemu-img", "check", "--output=json", "leak.qcow2"]
        } else {
            &["check", "--output=json", "leak.qcow2"]
        };
        let out = if ours {
            cowclone_in(dir, &crate::util::args_of(args))
        } else {
            qemu_img_in(dir, &crate::util::args_of(args))
        };
        (out.status.code(), String::from_utf8(out.stdout).unwrap())
    };
    let theirs = check(false);
    assert_eq!(theirs.0, Some(3), "{theirs:?}");
    assert!(theirs.1.contains("\"leaks\": 1"), "{theirs:?}");
    assert_eq!(check(true), theirs);

    assert_same_output(
        dir,
        &["measure", "--output=json", "-O", "qcow2", "top.qcow2"],
    );
    assert_same_output(
        dir,
        &["measure", "--output=json", "--size", "1G", "-O", "qcow2"],
    );
    assert_same_output(dir, &["measure", "--output=json", "disk.raw"]);

    // The native command prints the same bytes.
    let native = cowclone_in(dir, &[&"info", &"--output", &"json", &"top.qcow2"]);
    assert!(native.status.success(), "{}", describe(&native));
    let qemu = qemu_img_in(dir, &[&"info", &"--output=json", &"top.qcow2"]);
    assert_eq!(native.stdout, qemu.stdout, "cowclone info --output json");
}

/// Clears the L2 entry of guest cluster 0 of a qcow2 image with 64 KiB clusters (L1 at 0x30000,
/// as qemu-img creates it), so that its data cluster is leaked.
fn leak_first_data_cluster(path: &Path) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut entry = [0u8; 8];
    file.read_exact_at(&mut entry, 0x30000).unwrap();
    let l2 = u64::from_be_bytes(entry) & 0x00ff_ffff_ffff_fe00;
    assert_ne!(l2, 0, "guest cluster 0 has no L2 table");
    file.write_all_at(&[0; 8], l2).unwrap();
}
