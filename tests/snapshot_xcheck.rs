//! Internal snapshots, judged by qemu-img 10: snapshots cowclone creates are listed, applied and
//! checked clean by qemu-img; snapshots qemu-img creates are applied and deleted by cowclone;
//! writes over snapshotted clusters leave the snapshot's data intact (qemu-io, qemu-img compare).

use std::path::Path;

use imagefmt::backing::BackingPolicy;
use imagefmt::chain::open_qcow2_rw;
use imagefmt::qcow2::write::WriteOptions;

use crate::util::{assert_qemu_check_clean, qemu_img, qemu_img_ok, qemu_io_ok};

/// Writes `len` bytes of `pattern` at `offset` through qemu-io.
fn qemu_write(path: &Path, pattern: u8, offset: u64, len: u64) {
    let cmd = format!("write -P {pattern} {offset} {len}");
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &cmd, &path]);
}

/// Asserts through qemu-io that `len` bytes at `offset` read as `pattern`.
fn qemu_expect(path: &Path, pattern: u8, offset: u64, len: u64, context: &str) {
    let cmd = format!("read -P {pattern} {offset} {len}");
    let output = crate::util::run(
        "qemu-io",
        "qemu-utils",
        None,
        &[&"-f", &"qcow2", &"-c", &cmd, &path],
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success()
            && !stdout.contains("failed")
            && !stdout.contains("Pattern verification"),
        "{context}: qemu-io {cmd} on {}: {}",
        path.display(),
        crate::util::describe(&output)
    );
}

/// `qemu-img compare` of two images (any formats) must report them identical.
fn assert_same_content(a: &Path, b: &Path, context: &str) {
    let output = qemu_img(&[&"compare", &a, &b]);
    assert!(
        output.status.success(),
        "{context}: qemu-img compare {} {}: {}",
        a.display(),
        b.display(),
        crate::util::describe(&output)
    );
}

/// The snapshot names `qemu-img snapshot -l` prints, in order, as (id, tag).
fn qemu_snapshot_list(path: &Path) -> Vec<(String, String)> {
    let out = qemu_img_ok(&[&"snapshot", &"-l", &"-U", &path]);
    out.lines()
        .skip(2)
        .map(|l| {
            let mut words = l.split_whitespace();
            (
                words.next().unwrap_or_default().to_owned(),
                words.next().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

fn now() -> (u32, u32) {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (d.as_secs() as u32, d.subsec_micros() * 1000)
}

fn open_rw(path: &Path) -> imagefmt::qcow2::image::Qcow2Image<std::fs::File> {
    open_qcow2_rw(path, &BackingPolicy::Deny, WriteOptions::default()).unwrap()
}

/// An image with data, zero and compressed clusters: 64 KiB clusters, 4 MiB.
fn mixed_image(dir: &Path, extra: &[&str]) -> std::path::PathBuf {
    let raw = dir.join("src.raw");
    std::fs::write(&raw, vec![0x5au8; 256 << 10]).unwrap();
    let img = dir.join("img.qcow2");
    // Compressed clusters at 0..256K, from qemu-img itself.
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"convert", &"-c", &"-O", &"qcow2"];
    let extras: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for e in &extras {
        args.push(e);
    }
    args.push(&raw);
    args.push(&img);
    qemu_img_ok(&args);
    qemu_img_ok(&[&"resize", &img, &"4M"]);
    qemu_write(&img, 0x11, 1 << 20, 192 << 10);
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -z 2M 128k", &img]);
    qemu_write(&img, 0x22, 3 << 20, 4096);
    img
}

/// A snapshot cowclone creates is listed by qemu-img, the image checks clean, writes over every
/// kind of shared cluster keep the snapshot intact, and qemu-img applies it back.
#[test]
fn cowclone_snapshot_survives_writes_and_qemu_img_applies_it() {
    for extra in [
        &[][..],
        &["-o", "extended_l2=on,cluster_size=128k"][..],
        &["-o", "compat=0.10"][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let img = mixed_image(dir.path(), extra);
        let before = dir.path().join("before.raw");
        qemu_img_ok(&[&"convert", &"-O", &"raw", &img, &before]);
        let ctx = format!("options {extra:?}");

        let mut image = open_rw(&img);
        let sn = image.create_snapshot("first", now()).unwrap();
        assert_eq!(sn.id_str(), "1");
        drop(image);
        assert_qemu_check_clean(&img, &format!("{ctx}: after create"));
        assert_eq!(
            qemu_snapshot_list(&img),
            [("1".into(), "first".into())],
            "{ctx}"
        );

        // Writes into compressed, data, zero and unallocated clusters, partial and whole.
        let mut image = open_rw(&img);
        image.write_at(&vec![0x33; 4096], 8192).unwrap(); // compressed cluster, partly
        image.write_at(&vec![0x44; 128 << 10], 1 << 20).unwrap(); // data clusters, whole
        image.write_at(&vec![0x55; 512], (2 << 20) + 100).unwrap(); // zero cluster, partly
        image.write_zeroes(3 << 20, 64 << 10).unwrap(); // data cluster made zero
        image.write_at(&vec![0x66; 70000], 3_500_000).unwrap(); // unallocated
        drop(image);
        assert_qemu_check_clean(&img, &format!("{ctx}: after writes"));
        qemu_expect(&img, 0x33, 8192, 4096, &ctx);
        qemu_expect(&img, 0x5a, 0, 8192, &ctx);
        qemu_expect(&img, 0x44, 1 << 20, 128 << 10, &ctx);
        qemu_expect(&img, 0x11, (1 << 20) + (128 << 10), 64 << 10, &ctx);
        qemu_expect(&img, 0x55, (2 << 20) + 100, 512, &ctx);
        qemu_expect(&img, 0, 3 << 20, 64 << 10, &ctx);
        qemu_expect(&img, 0x66, 3_500_000, 70000, &ctx);

        // A second snapshot over the written state, then qemu-img goes back to the first.
        let mut image = open_rw(&img);
        assert_eq!(
            image.create_snapshot("second", now()).unwrap().id_str(),
            "2"
        );
        drop(image);
        assert_qemu_check_clean(&img, &format!("{ctx}: after second create"));
        let after = dir.path().join("after.raw");
        qemu_img_ok(&[&"convert", &"-O", &"raw", &img, &after]);
        qemu_img_ok(&[&"snapshot", &"-a", &"first", &img]);
        assert_qemu_check_clean(&img, &format!("{ctx}: after qemu-img apply"));
        assert_same_content(
            &img,
            &before,
            &format!("{ctx}: snapshot 1 applied by qemu-img"),
        );
        qemu_img_ok(&[&"snapshot", &"-a", &"2", &img]);
        assert_same_content(
            &img,
            &after,
            &format!("{ctx}: snapshot 2 applied by qemu-img"),
        );
    }
}

/// Snapshots qemu-img creates are applied and deleted by cowclone; qemu-img then finds the data
/// of the applied snapshot, the remaining list, and a clean image (no leaks).
#[test]
fn qemu_img_snapshots_are_applied_and_deleted_by_cowclone() {
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path(), &[]);
    let state = |name: &str| {
        let path = dir.path().join(format!("{name}.raw"));
        qemu_img_ok(&[&"convert", &"-O", &"raw", &img, &path]);
        path
    };
    let a = state("a");
    qemu_img_ok(&[&"snapshot", &"-c", &"sa", &img]);
    qemu_write(&img, 0x77, 0, 100 << 10);
    qemu_write(&img, 0x78, 3 << 20, 1 << 20);
    let b = state("b");
    qemu_img_ok(&[&"snapshot", &"-c", &"sb", &img]);
    qemu_img_ok(&[&"resize", &img, &"6M"]);
    qemu_write(&img, 0x79, 5 << 20, 64 << 10);

    let mut image = open_rw(&img);
    let names: Vec<String> = image
        .snapshots()
        .unwrap()
        .iter()
        .map(|s| s.name_str())
        .collect();
    assert_eq!(names, ["sa", "sb"]);
    image.apply_snapshot("sa").unwrap();
    drop(image);
    assert_qemu_check_clean(&img, "after cowclone applied sa");
    assert_same_content(&img, &a, "sa applied by cowclone");
    let info = crate::util::qemu_info_json(&img);
    assert_eq!(
        info["virtual-size"],
        4 << 20,
        "the disk size follows the snapshot"
    );

    // Writing after the apply must not disturb either snapshot.
    let mut image = open_rw(&img);
    image.write_at(&vec![0x7a; 200 << 10], 50 << 10).unwrap();
    image.apply_snapshot("2").unwrap(); // by id
    drop(image);
    assert_qemu_check_clean(&img, "after cowclone applied sb");
    assert_same_content(&img, &b, "sb applied by cowclone");

    let mut image = open_rw(&img);
    assert!(
        image.delete_snapshot("2").is_err(),
        "deletion matches names only"
    );
    image.delete_snapshot("sa").unwrap();
    drop(image);
    assert_qemu_check_clean(&img, "after cowclone deleted sa");
    assert_eq!(qemu_snapshot_list(&img), [("2".into(), "sb".into())]);
    assert_same_content(&img, &b, "active state kept by the deletion");
    qemu_img_ok(&[&"snapshot", &"-a", &"sb", &img]);
    assert_same_content(&img, &b, "sb applied by qemu-img");

    let mut image = open_rw(&img);
    image.delete_snapshot("sb").unwrap();
    drop(image);
    assert_qemu_check_clean(&img, "after cowclone deleted sb");
    assert!(qemu_snapshot_list(&img).is_empty());
    assert_same_content(&img, &b, "active state after deleting every snapshot");
}
