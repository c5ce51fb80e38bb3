//! `convert -c` cross-checked against qemu-img (Debian package qemu-utils) on an ext4
//! filesystem image (mkfs.ext4 -d, Debian package e2fsprogs) holding compressible text,
//! incompressible random data and holes: our output must be no larger than
//! `qemu-img convert -c -O qcow2`'s, `qemu-img check` must find it clean and `qemu-img compare`
//! identical to the source, for deflate and zstd. A zstd cluster whose stream expands past the
//! cluster must read as an I/O error, as in qemu. The output is the same file whatever `-m`;
//! qemu-img's compressed images convert to raw identical to their source; `-c` with
//! preallocation is refused by both.

use std::path::{Path, PathBuf};

use crate::util::{
    assert_qemu_check_clean, cowclone, cowclone_ok, qemu_img, qemu_img_ok, qemu_info_json,
};

/// A 48 MiB ext4 image made from a generated tree: text files (compressible), files of random
/// bytes (incompressible, like the .gz files of a real tree) and empty space.
fn filesystem_image(dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
    std::fs::create_dir_all(tree.join("text")).unwrap();
    std::fs::create_dir_all(tree.join("random")).unwrap();
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let words = [
        "cluster",
        "refcount",
        "table",
        "guest",
        "host",
        "offset",
        "image",
        "the",
        "a",
        "of",
        "compressed",
        "sector",
        "qemu",
        "write",
        "read",
        "backing",
    ];
    for i in 0..300 {
        let lines = 50 + next() % 900;
        let mut text = String::new();
        for _ in 0..lines {
            for _ in 0..(4 + next() % 12) {
                text.push_str(words[(next() % words.len() as u64) as usize]);
                text.push(' ');
            }
            text.push('\n');
        }
        std::fs::write(tree.join("text").join(format!("f{i}.txt")), text).unwrap();
    }
    for i in 0..6 {
        let len = 4096 + (next() % (600 << 10)) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        std::fs::write(tree.join("random").join(format!("r{i}.bin")), bytes).unwrap();
    }
    let image = dir.join("fs.img");
    std::fs::File::create(&image)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let mkfs = crate::util::run(
        "mkfs.ext4",
        "e2fsprogs",
        Some(dir),
        &[&"-q", &"-E", &"root_owner=0:0", &"-d", &tree, &image],
    );
    assert!(
        mkfs.status.success(),
        "mkfs.ext4: {}",
        crate::util::describe(&mkfs)
    );
    image
}

/// [`filesystem_image`] grown by 1.5 KiB: the disk ends inside a 64 KiB cluster.
fn filesystem_image_ending_inside_a_cluster(dir: &Path) -> PathBuf {
    let image = filesystem_image(dir);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len((48 << 20) + 1536)
        .unwrap();
    image
}

fn convert_c_is_no_larger_than_qemu_img(compression: &str) {
    let dir = tempfile::tempdir().unwrap();
    let source = filesystem_image(dir.path());
    let theirs = dir.path().join("theirs.qcow2");
    let ours = dir.path().join("ours.qcow2");
    let option = format!("compression_type={compression}");
    qemu_img_ok(&[
        &"convert", &"-c", &"-f", &"raw", &"-O", &"qcow2", &"-o", &option, &source, &theirs,
    ]);
    cowclone_ok(&[
        &"convert", &"-c", &"-f", &"raw", &"-O", &"qcow2", &"-o", &option, &source, &ours,
    ]);
    let what = format!("convert -c ({compression})");
    assert_qemu_check_clean(&ours, &what);
    qemu_img_ok(&[&"compare", &"-f", &"raw", &"-F", &"qcow2", &source, &ours]);
    let info = qemu_info_json(&ours);
    assert_eq!(
        info["format-specific"]["data"]["compression-type"], compression,
        "{what}: {info}"
    );
    let (our_len, their_len) = (
        std::fs::metadata(&ours).unwrap().len(),
        std::fs::metadata(&theirs).unwrap().len(),
    );
    assert!(
        our_len <= their_len,
        "{what}: ours is {our_len} bytes, qemu-img's {their_len}"
    );
    // Packed, not one host cluster per compressed cluster: much smaller than the data.
    let (_, check) = crate::util::qemu_check(&ours);
    let check: serde_json::Value = serde_json::from_str(&check).unwrap();
    let compressed = check["compressed-clusters"].as_u64().unwrap_or(0);
    assert!(compressed > 100, "{what}: {check}");
    assert!(
        our_len < check["allocated-clusters"].as_u64().unwrap() * 65536 * 3 / 4,
        "{what}: {our_len} bytes for {check}"
    );
}

#[test]
fn convert_c_deflate_is_no_larger_than_qemu_img_clean_and_identical() {
    convert_c_is_no_larger_than_qemu_img("zlib");
}

#[test]
fn convert_c_zstd_is_no_larger_than_qemu_img_clean_and_identical() {
    convert_c_is_no_larger_than_qemu_img("zstd");
}

/// A zstd image with one compressed cluster at guest 0 (written by qemu-io), whose stream is
/// replaced by a hand-made frame of `content_size` bytes of 0x07 (one RLE block).
fn zstd_image_with_frame(dir: &Path, name: &str, content_size: u32) -> PathBuf {
    let path = dir.join(name);
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-o",
        &"compression_type=zstd",
        &path,
        &"1M",
    ]);
    crate::util::qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -c -P 7 0 64k", &path]);
    let mut bytes = std::fs::read(&path).unwrap();
    let be64 = |b: &[u8], at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    let l1 = be64(&bytes, 40) as usize;
    let l2 = (be64(&bytes, l1) & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = be64(&bytes, l2);
    assert_eq!(
        entry >> 62,
        1,
        "qemu-io wrote no compressed cluster: {entry:#x}"
    );
    // 64 KiB clusters: bits 0-53 are the host offset.
    let host = (entry & ((1 << 54) - 1)) as usize;
    let block = 1 | (1 << 1) | (content_size << 3); // last block, RLE, repeat count
    let mut frame = vec![0x28, 0xb5, 0x2f, 0xfd]; // magic
    frame.push(0xa0); // single segment, 4-byte content size, no checksum, no dictionary
    frame.extend_from_slice(&content_size.to_le_bytes()); // frame content size
    frame.extend_from_slice(&block.to_le_bytes()[..3]); // block header
    frame.push(0x07); // the repeated byte
    bytes[host..host + frame.len()].copy_from_slice(&frame);
    std::fs::write(&path, bytes).unwrap();
    path
}

#[test]
fn regression_zstd_cluster_expanding_past_the_cluster_is_an_io_error() {
    // Issue 12 item 7: such a cluster was silently truncated to 64 KiB; qemu reports EIO.
    let dir = tempfile::tempdir().unwrap();
    let good = zstd_image_with_frame(dir.path(), "good.qcow2", 65536);
    let bad = zstd_image_with_frame(dir.path(), "bad.qcow2", 65536 + 4096);
    // The reference: qemu reads the exact frame and refuses the long one.
    crate::util::qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"read -P 7 0 64k", &good]);
    let read = crate::util::run(
        "qemu-io",
        "qemu-utils",
        None,
        &[&"-f", &"qcow2", &"-c", &"read 0 64k", &bad],
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&read.stdout),
        String::from_utf8_lossy(&read.stderr)
    );
    assert!(said.contains("Input/output error"), "qemu-io: {said}");
    let out = dir.path().join("good.raw");
    cowclone_ok(&[&"convert", &"-O", &"raw", &good, &out]);
    assert_eq!(std::fs::read(&out).unwrap()[..65536], [7u8; 65536]);
    let out = dir.path().join("bad.raw");
    let result = cowclone(&[&"convert", &"-O", &"raw", &bad, &out]);
    assert!(
        !result.status.success(),
        "convert of the overflowing cluster succeeded"
    );
    assert!(
        String::from_utf8_lossy(&result.stderr).contains("does not decompress to one cluster"),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    // qemu-img's own convert fails the same way.
    let theirs = qemu_img(&[&"convert", &"-O", &"raw", &bad, &dir.path().join("q.raw")]);
    assert!(!theirs.status.success());
}

#[test]
fn convert_c_in_other_layouts_is_clean_identical_and_no_larger_than_qemu_img() {
    // Small and large clusters, narrow refcounts (a 2-bit refcount caps the compressed clusters
    // sharing a host cluster at 3), extended L2 entries and version 2.
    let dir = tempfile::tempdir().unwrap();
    let source = filesystem_image(dir.path());
    for options in [
        "cluster_size=4k",
        "cluster_size=2M",
        "refcount_bits=2",
        "extended_l2=on,cluster_size=128k",
        "compat=0.10",
    ] {
        let theirs = dir.path().join("theirs.qcow2");
        let ours = dir.path().join("ours.qcow2");
        for path in [&theirs, &ours] {
            let _ = std::fs::remove_file(path);
        }
        qemu_img_ok(&[
            &"convert", &"-c", &"-f", &"raw", &"-O", &"qcow2", &"-o", &options, &source, &theirs,
        ]);
        cowclone_ok(&[
            &"convert", &"-c", &"-f", &"raw", &"-O", &"qcow2", &"-o", &options, &source, &ours,
        ]);
        assert_qemu_check_clean(&ours, options);
        qemu_img_ok(&[&"compare", &"-f", &"raw", &"-F", &"qcow2", &source, &ours]);
        let (our_len, their_len) = (
            std::fs::metadata(&ours).unwrap().len(),
            std::fs::metadata(&theirs).unwrap().len(),
        );
        assert!(
            our_len <= their_len,
            "{options}: ours is {our_len} bytes, qemu-img's {their_len}"
        );
    }
}

#[test]
fn convert_c_output_is_the_same_for_any_m_clean_and_identical_with_w() {
    // The reader threads compress (as many as -m asks for) and the clusters are placed in
    // guest order: the file is the same byte for byte whatever -m; with -W (any order) it is
    // still clean and reads the same. The disk ends 1.5 KiB into a cluster.
    let dir = tempfile::tempdir().unwrap();
    let source = filesystem_image_ending_inside_a_cluster(dir.path());
    let mut outputs = Vec::new();
    for flags in [&["-m", "1"][..], &[][..], &["-m", "16"][..], &["-W"][..]] {
        let out = dir.path().join(format!("ours{}.qcow2", outputs.len()));
        let mut args: Vec<std::ffi::OsString> = ["convert", "-c", "-f", "raw", "-O", "qcow2"]
            .iter()
            .chain(flags)
            .map(std::ffi::OsString::from)
            .collect();
        args.extend([source.clone().into(), out.clone().into()]);
        cowclone_ok(&crate::util::args_of(&args));
        let what = format!("convert -c {flags:?}");
        assert_qemu_check_clean(&out, &what);
        qemu_img_ok(&[&"compare", &"-f", &"raw", &"-F", &"qcow2", &source, &out]);
        outputs.push((what, std::fs::read(&out).unwrap()));
    }
    let (first, bytes) = &outputs[0];
    for (what, other) in &outputs[1..3] {
        assert!(other == bytes, "{what} wrote another file than {first}");
    }
}

#[test]
fn compressed_clusters_decode_into_raw_output_as_qemu_img_reads_them() {
    // qemu-img's compressed image (deflate and zstd), its disk ending inside a cluster,
    // converted to raw by cowclone with 1 and 16 reader threads: identical to the source.
    let dir = tempfile::tempdir().unwrap();
    let source = filesystem_image_ending_inside_a_cluster(dir.path());
    for compression in ["zlib", "zstd"] {
        let packed = dir.path().join(format!("{compression}.qcow2"));
        let option = format!("compression_type={compression}");
        qemu_img_ok(&[
            &"convert", &"-c", &"-f", &"raw", &"-O", &"qcow2", &"-o", &option, &source, &packed,
        ]);
        for m in ["1", "16"] {
            let raw = dir.path().join(format!("{compression}-{m}.raw"));
            cowclone_ok(&[
                &"convert", &"-m", &m, &"-f", &"qcow2", &"-O", &"raw", &packed, &raw,
            ]);
            qemu_img_ok(&[&"compare", &"-f", &"raw", &"-F", &"raw", &source, &raw]);
        }
    }
}

#[test]
fn convert_c_with_preallocation_is_refused_as_by_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("s.raw");
    std::fs::write(&source, vec![7u8; 1 << 20]).unwrap();
    for mode in ["metadata", "falloc", "full"] {
        let option = format!("preallocation={mode}");
        let out = dir.path().join(format!("{mode}.qcow2"));
        let args: Vec<std::ffi::OsString> = ["convert", "-c", "-f", "raw", "-O", "qcow2", "-o"]
            .iter()
            .map(std::ffi::OsString::from)
            .chain([option.into(), source.clone().into(), out.clone().into()])
            .collect();
        let args = crate::util::args_of(&args);
        for (tool, output) in [("qemu-img", qemu_img(&args)), ("cowclone", cowclone(&args))] {
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                !output.status.success() && stderr.contains("Compression and preallocation"),
                "{tool} -c -o preallocation={mode}: {}",
                crate::util::describe(&output)
            );
            assert!(!out.exists(), "{tool}: a refused convert left {out:?}");
        }
        let mut personality: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"qemu-img"];
        personality.extend(args.iter().copied());
        let (ours, theirs) = (cowclone(&personality), qemu_img(&args));
        assert_eq!(
            (ours.status.code(), String::from_utf8_lossy(&ours.stderr)),
            (
                theirs.status.code(),
                String::from_utf8_lossy(&theirs.stderr)
            ),
            "cowclone qemu-img convert -c -o preallocation={mode}"
        );
    }
}
