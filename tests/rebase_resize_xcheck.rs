//! `rebase`, `resize` and `commit -b` under the qemu-img personality against the real qemu-img: the same
//! images are made in two directories by qemu-img and qemu-io, the operation runs with the real
//! qemu-img in one and with the personality in the other, and the real qemu-img then judges
//! both results — `map --output=json` (allocation, zero flags, compressed clusters and host
//! offsets), `check` (compressed-cluster counts and image end offset), `compare` — and the file
//! lengths and allocated bytes must agree.

use std::path::{Path, PathBuf};

use crate::personality::{assert_same, personality_dir};
use crate::util::{allocated_bytes, assert_qemu_check_clean, file_len, qemu_img_ok, qemu_io_ok};

const CLUSTER: u64 = 65536;

/// Two empty directories: `[0]` for the real qemu-img, `[1]` for the personality.
fn twin_dirs(tmp: &Path, name: &str) -> [PathBuf; 2] {
    let dirs = [
        tmp.join(format!("{name}-qemu")),
        tmp.join(format!("{name}-cowclone")),
    ];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
    }
    dirs
}

/// `qemu-img create -q -f FMT [-o OPTS] [-b BACKING -F BFMT] PATH SIZE` by the real qemu-img.
fn create(path: &Path, fmt: &str, opts: &str, backing: Option<(&str, &str)>, size: &str) {
    let mut args: Vec<String> = vec!["create".into(), "-q".into(), "-f".into(), fmt.into()];
    if !opts.is_empty() {
        args.extend(["-o".into(), opts.into()]);
    }
    if let Some((name, format)) = backing {
        args.extend(["-b".into(), name.into(), "-F".into(), format.into()]);
    }
    args.extend([path.display().to_string(), size.into()]);
    qemu_img_ok(&crate::util::args_of(&args));
}

/// qemu-io `commands` on the qcow2 (or `fmt`) image at `path`.
fn io(path: &Path, fmt: &str, commands: &[String]) {
    let mut args: Vec<String> = vec!["-f".into(), fmt.into()];
    for command in commands {
        args.extend(["-c".into(), command.clone()]);
    }
    args.push(path.display().to_string());
    qemu_io_ok(&crate::util::args_of(&args));
}

/// What the real qemu-img reports of `image` in each twin directory must be the same: its map
/// (JSON, host offsets included), its check (human: compressed clusters, image end offset) and
/// the file's length (where `same_length`: after compressed writes qemu's file ends at the
/// last compressed byte, cowclone's at the sector after it).
fn assert_judged_same(dirs: &[PathBuf; 2], image: &str, same_length: bool, context: &str) {
    let judge = |dir: &Path| {
        let path = dir.join(image);
        let map = qemu_img_ok(&[&"map", &"--output=json", &path]);
        let check = qemu_img_ok(&[&"check", &path]);
        (map, check, file_len(&path))
    };
    let (theirs, ours) = (judge(&dirs[0]), judge(&dirs[1]));
    assert_eq!(ours.0, theirs.0, "{context}: qemu-img map --output=json");
    assert_eq!(ours.1, theirs.1, "{context}: qemu-img check");
    if same_length {
        assert_eq!(ours.2, theirs.2, "{context}: file length");
    }
    assert_qemu_check_clean(&dirs[1].join(image), context);
}

#[test]
fn rebase_writes_the_old_chains_zeros_as_data_and_zero_clusters_past_its_end_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let c = CLUSTER;
    // Old 11 11 -- 11, new -- 22 22 11: cluster 2 reads zeros from the old backing file and
    // data from the new one; qemu-img writes those zeros as a data cluster (iotest 024).
    let dirs = twin_dirs(tmp.path(), "across");
    for dir in &dirs {
        let (old, new) = (dir.join("old.qcow2"), dir.join("new.qcow2"));
        create(&old, "qcow2", "", None, "1M");
        create(&new, "qcow2", "", None, "1M");
        create(
            &dir.join("t.qcow2"),
            "qcow2",
            "",
            Some(("old.qcow2", "qcow2")),
            "1M",
        );
        let w = |p: &str, at: u64, len: u64| format!("write -P {p} {} {}", at * c, len * c);
        io(&old, "qcow2", &[w("0x11", 0, 2), w("0x11", 3, 1)]);
        io(&new, "qcow2", &[w("0x22", 1, 2), w("0x11", 3, 1)]);
    }
    let args = [
        "rebase",
        "-f",
        "qcow2",
        "-b",
        "new.qcow2",
        "-F",
        "qcow2",
        "t.qcow2",
    ];
    assert_same(&bin, &dirs, &args, true, true);
    assert_judged_same(&dirs, "t.qcow2", true, "rebase onto a different chain");
    let compare = qemu_img_ok(&[
        &"compare",
        &dirs[0].join("t.qcow2"),
        &dirs[1].join("t.qcow2"),
    ]);
    assert!(compare.contains("identical"), "{compare}");

    // new <- old (4 clusters) <- t (5 clusters): past the old backing file's end qemu-img writes
    // a zero cluster over the new backing file's data (iotest 024, rebase within one chain).
    let dirs = twin_dirs(tmp.path(), "within");
    for dir in &dirs {
        let (old, new) = (dir.join("old.qcow2"), dir.join("new.qcow2"));
        create(&new, "qcow2", "", None, &(5 * c).to_string());
        create(
            &old,
            "qcow2",
            "",
            Some(("new.qcow2", "qcow2")),
            &(4 * c).to_string(),
        );
        create(
            &dir.join("t.qcow2"),
            "qcow2",
            "",
            Some(("old.qcow2", "qcow2")),
            &(5 * c).to_string(),
        );
        io(&new, "qcow2", &[format!("write -P 0x11 0 {}", 5 * c)]);
        io(&old, "qcow2", &[format!("write -P 0x22 0 {}", 4 * c)]);
    }
    let args = ["rebase", "-b", "new.qcow2", "-F", "qcow2", "t.qcow2"];
    assert_same(&bin, &dirs, &args, true, true);
    assert_judged_same(&dirs, "t.qcow2", true, "rebase within one chain");
    io(
        &dirs[1].join("t.qcow2"),
        "qcow2",
        &[
            format!("read -P 0x22 0 {}", 4 * c),
            format!("read -P 0 {} {c}", 4 * c),
        ],
    );
}

#[test]
fn rebase_c_compresses_what_it_writes_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let size = 6 << 20;
    let half = size / 2;

    // Only qcow2 compresses: a raw image is refused with qemu-img's words.
    let dirs = twin_dirs(tmp.path(), "raw");
    for dir in &dirs {
        create(&dir.join("r.img"), "raw", "", None, &size.to_string());
    }
    assert_same(
        &bin,
        &dirs,
        &["rebase", "-c", "-f", "raw", "-b", "", "r.img"],
        true,
        true,
    );

    // A compressed half below, a compressed half above; rebased onto nothing (iotest 314).
    let dirs = twin_dirs(tmp.path(), "flatten");
    for dir in &dirs {
        let (base, top) = (dir.join("b.qcow2"), dir.join("t.qcow2"));
        create(&base, "qcow2", "", None, &size.to_string());
        create(
            &top,
            "qcow2",
            "",
            Some(("b.qcow2", "qcow2")),
            &size.to_string(),
        );
        io(&base, "qcow2", &[format!("write -c -P 0xaa 0 {half}")]);
        io(&top, "qcow2", &[format!("write -c -P 0xbb {half} {half}")]);
    }
    assert_same(
        &bin,
        &dirs,
        &["rebase", "-c", "-f", "qcow2", "-b", "", "t.qcow2"],
        true,
        true,
    );
    assert_judged_same(&dirs, "t.qcow2", false, "rebase -c onto no backing file");
    let check = qemu_img_ok(&[&"check", &dirs[1].join("t.qcow2")]);
    assert!(check.contains("100.00% compressed clusters"), "{check}");

    // Less than half a cluster of data below a one-cluster overlay: the whole cluster is
    // written, compressed (iotest 314, unaligned data).
    let dirs = twin_dirs(tmp.path(), "unaligned");
    for dir in &dirs {
        let (base, top) = (dir.join("b.qcow2"), dir.join("t.qcow2"));
        create(&base, "qcow2", "", None, "64k");
        create(&top, "qcow2", "", Some(("b.qcow2", "qcow2")), "64k");
        io(&base, "qcow2", &["write -P 0xaa 0 32767".to_owned()]);
    }
    assert_same(
        &bin,
        &dirs,
        &["rebase", "-c", "-f", "qcow2", "-b", "", "t.qcow2"],
        true,
        true,
    );
    assert_judged_same(
        &dirs,
        "t.qcow2",
        false,
        "rebase -c of a partly written cluster",
    );

    // Extended L2 entries: compression writes whole clusters, never subclusters (iotest 271).
    let dirs = twin_dirs(tmp.path(), "subclusters");
    let opts = "cluster_size=1M,extended_l2=on";
    for dir in &dirs {
        let (base, mid, top) = (
            dir.join("b.qcow2"),
            dir.join("m.qcow2"),
            dir.join("t.qcow2"),
        );
        create(&base, "qcow2", opts, None, "3M");
        create(&mid, "qcow2", opts, Some(("b.qcow2", "qcow2")), "3M");
        create(&top, "qcow2", opts, Some(("m.qcow2", "qcow2")), "3M");
        io(&base, "qcow2", &["write -P 0x11 1M 1M".to_owned()]);
        io(
            &mid,
            "qcow2",
            &[
                "write -P 0x22 992k 32k".to_owned(),
                "write -P 0x33 2M 32k".to_owned(),
            ],
        );
    }
    assert_same(
        &bin,
        &dirs,
        &["rebase", "-c", "-b", "b.qcow2", "-F", "qcow2", "t.qcow2"],
        true,
        true,
    );
    assert_judged_same(&dirs, "t.qcow2", false, "rebase -c with subclusters");
    let map = qemu_img_ok(&[&"map", &"--output=json", &dirs[1].join("t.qcow2")]);
    assert_eq!(map.matches("\"compressed\": true").count(), 2, "{map}");
}

#[test]
fn resize_with_preallocation_allocates_and_zeroes_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    for backing in ["none", "longer", "shorter"] {
        for mode in ["off", "metadata", "falloc", "full"] {
            for from in ["31k", "64k"] {
                let name = format!("{backing}-{mode}-{from}");
                let dirs = twin_dirs(tmp.path(), &name);
                for dir in &dirs {
                    let base_len = if backing == "longer" { "128k" } else { "16k" };
                    let image = dir.join("t.qcow2");
                    if backing == "none" {
                        create(&image, "qcow2", "", None, from);
                    } else {
                        let base = dir.join("base.img");
                        create(&base, "raw", "", None, base_len);
                        io(&base, "raw", &[format!("write -P 1 0 {base_len}")]);
                        create(&image, "qcow2", "", Some(("base.img", "raw")), from);
                    }
                }
                let prealloc = format!("--preallocation={mode}");
                let args = ["resize", "-f", "qcow2", &prealloc, "t.qcow2", "160k"];
                assert_same(&bin, &dirs, &args, true, true);
                assert_judged_same(&dirs, "t.qcow2", true, &name);
                let compare = qemu_img_ok(&[
                    &"compare",
                    &dirs[0].join("t.qcow2"),
                    &dirs[1].join("t.qcow2"),
                ]);
                assert!(compare.contains("identical"), "{name}: {compare}");
            }
        }
    }
}

#[test]
fn resize_shrink_punches_the_freed_clusters_out_of_the_file_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path(), "shrink");
    for dir in &dirs {
        let image = dir.join("t.qcow2");
        create(&image, "qcow2", "", None, "16M");
        // The last 2 MiB first, so that they lie before the first 2 MiB in the file: shrinking
        // to 1 MiB frees clusters in the middle of the file, which truncation cannot return.
        io(
            &image,
            "qcow2",
            &[
                "write -P 0x5a 14M 2M".to_owned(),
                "write -P 0xa5 0 2M".to_owned(),
            ],
        );
    }
    let before = allocated_bytes(&dirs[1].join("t.qcow2"));
    assert_same(
        &bin,
        &dirs,
        &["resize", "--shrink", "t.qcow2", "1M"],
        true,
        true,
    );
    assert_judged_same(&dirs, "t.qcow2", true, "resize --shrink");
    let theirs = allocated_bytes(&dirs[0].join("t.qcow2"));
    let ours = allocated_bytes(&dirs[1].join("t.qcow2"));
    // Within one cluster of qemu-img's result (the file system's block accounting of the
    // metadata writes may differ by a block or so between runs).
    assert!(
        ours.abs_diff(theirs) <= CLUSTER,
        "allocated bytes after the shrink: ours {ours}, qemu-img's {theirs}"
    );
    // 3 MiB of data lie past the new end; truncation alone returns only the 1 MiB at the
    // file's end (the other 2 MiB sit before it), so more than 2 MiB back means punched holes.
    // Not exactly 3 MiB: ext4's accounting moved by a block in one CI run (4 KiB short).
    assert!(
        before - ours > 2 << 20,
        "{before} -> {ours}: the freed data stayed on disk"
    );
}

#[test]
fn commit_b_takes_a_relative_base_relative_to_the_image_above_it_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path(), "commit");
    for dir in &dirs {
        let sub = dir.join("subdir");
        std::fs::create_dir_all(&sub).unwrap();
        create(&sub.join("t.base"), "qcow2", "", None, "1M");
        create(
            &sub.join("t.mid"),
            "qcow2",
            "",
            Some(("t.base", "qcow2")),
            "1M",
        );
        create(&sub.join("t"), "qcow2", "", Some(("t.mid", "qcow2")), "1M");
        io(&sub.join("t"), "qcow2", &["write -P 0x33 0 64k".to_owned()]);
    }
    // Relative to the overlay's directory, a path from the working directory names nothing
    // (iotest 020); the name the chain stores, or an absolute path, names the middle image.
    assert_same(
        &bin,
        &dirs,
        &["commit", "-b", "subdir/t.mid", "subdir/t"],
        true,
        true,
    );
    assert_same(
        &bin,
        &dirs,
        &["commit", "-b", "t.mid", "subdir/t"],
        true,
        true,
    );
    for dir in &dirs {
        let absolute = dir.join("subdir/t.mid").display().to_string();
        let args = ["commit", "-b", &absolute, "subdir/t"];
        let output = crate::personality::qemu_img_as(
            (dir == &dirs[1]).then_some(bin.as_path()),
            dir,
            &args,
            &[],
        );
        assert!(
            output.status.success(),
            "{}",
            crate::util::describe(&output)
        );
    }
    io(
        &dirs[1].join("subdir/t.mid"),
        "qcow2",
        &["read -P 0x33 0 64k".to_owned()],
    );
    let compare = qemu_img_ok(&[
        &"compare",
        &dirs[0].join("subdir/t.mid"),
        &dirs[1].join("subdir/t.mid"),
    ]);
    assert!(compare.contains("identical"), "{compare}");
}
