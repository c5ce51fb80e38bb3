//! `amend -o compat=0.10` of images with internal snapshots, and `amend -p`, judged by qemu-img
//! 10 and qemu-io. Images are built by qemu-img/qemu-io (zero clusters in tables a snapshot
//! shares, in tables only a snapshot reaches, preallocated zero clusters, several snapshots),
//! amended through the qemu-img personality and, on a copy, by qemu-img itself. Ours must
//! check clean, read like the image before the amend — the active layer and every snapshot
//! (`qemu-img convert -l`, and `qemu-io` after `qemu-img snapshot -a` on a copy) — and like
//! qemu-img's result; where qemu-img's result is itself clean, the files must be the same
//! bytes. The `-p` lines must be byte for byte qemu-img's. Snapshots with VM state are taken
//! by qemu-system-x86_64's `savevm` (Debian package qemu-system-x86), their sizes then set in
//! the table where the case needs more.

use std::path::{Path, PathBuf};

use crate::util::{
    args_of, assert_qemu_check_clean, describe, qemu_check, qemu_create_qcow2, qemu_img,
    qemu_img_ok, qemu_img_or_personality, qemu_info_json, qemu_io_ok, qemu_overlay,
};

/// One image to downgrade: how it is built.
struct Case {
    name: &'static str,
    /// A backing file holding 0x2a in its first 256 KiB (zero clusters then need data).
    backed: bool,
    /// qemu-io commands, with `SNAP` taking the next internal snapshot (s1, s2, …).
    steps: &'static [&'static str],
}

const CASES: [Case; 6] = [
    Case {
        name: "backed, zero clusters in a table the snapshot shares",
        backed: true,
        steps: &["write -z 0 128k", "SNAP"],
    },
    Case {
        name: "backed, zero clusters only the snapshot reaches",
        backed: true,
        steps: &["write -z 0 64k", "SNAP", "write -P 0x42 0 128k"],
    },
    Case {
        name: "unbacked, zero clusters in two snapshots",
        backed: false,
        steps: &[
            "write -P 1 0 1M",
            "write -z -u 0 64k",
            "SNAP",
            "write -z -u 128k 64k",
            "SNAP",
            "write -P 3 1M 64k",
        ],
    },
    Case {
        name: "backed, one table shared by two snapshots and the active layer",
        backed: true,
        steps: &["write -z 0 128k", "SNAP", "SNAP"],
    },
    Case {
        name: "backed, preallocated zero clusters under two snapshots",
        backed: true,
        steps: &[
            "write -P 1 0 1M",
            "write -z 0 512k",
            "SNAP",
            "write -P 5 64k 64k",
            "SNAP",
            "write -z -u 512k 64k",
        ],
    },
    Case {
        name: "backed, zero clusters in several tables, snapshot of all",
        backed: true,
        steps: &[
            "write -z 0 64k",
            "write -z 32M 64k",
            "write -z 63M 64k",
            "SNAP",
            "write -P 7 32M 4k",
        ],
    },
];

/// Builds `case` in `dir` as `name`, returns the image and its snapshot names.
fn build(dir: &Path, case: &Case, name: &str) -> (PathBuf, Vec<String>) {
    let image = dir.join(name);
    if case.backed {
        let base = dir.join(format!("{name}.base"));
        qemu_create_qcow2(&base, "", "64M");
        qemu_io_ok(&[&"-c", &"write -P 0x2a 0 256k", &base]);
        qemu_overlay(&base, &image);
    } else {
        qemu_create_qcow2(&image, "", "64M");
    }
    let mut snapshots = Vec::new();
    for step in case.steps {
        if *step == "SNAP" {
            let snapshot = format!("s{}", snapshots.len() + 1);
            qemu_img_ok(&[&"snapshot", &"-c", &snapshot, &image]);
            snapshots.push(snapshot);
        } else {
            qemu_io_ok(&[&"-c", step, &image]);
        }
    }
    (image, snapshots)
}

/// The guest contents of `snapshot` of `image` (or the active layer), as raw bytes read by
/// qemu-img.
fn contents(image: &Path, snapshot: Option<&str>, out: &Path) -> Vec<u8> {
    let mut args: Vec<String> = vec!["convert".into()];
    if let Some(name) = snapshot {
        args.extend(["-l".into(), format!("snapshot.name={name}")]);
    }
    args.extend([
        "-O".into(),
        "raw".into(),
        image.to_string_lossy().into_owned(),
        out.to_string_lossy().into_owned(),
    ]);
    qemu_img_ok(&args_of(&args));
    std::fs::read(out).expect("read converted image")
}

/// `qemu-img amend -p -o OPTIONS` by qemu-img (`ours == false`) or cowclone's personality:
/// the progress printed on stdout.
fn amend_p(image: &Path, options: &str, ours: bool) -> (bool, Vec<u8>) {
    let output = qemu_img_or_personality(ours, &[&"amend", &"-p", &"-o", &options, &image]);
    (output.status.success(), output.stdout)
}

#[test]
fn downgrade_expands_zero_clusters_in_every_snapshot_as_qemu_img_does() {
    let dir = tempfile::tempdir().unwrap();
    for (n, case) in CASES.iter().enumerate() {
        let context = case.name;
        let (original, snapshots) = build(dir.path(), case, &format!("c{n}.qcow2"));
        let ours = dir.path().join(format!("c{n}.ours.qcow2"));
        let theirs = dir.path().join(format!("c{n}.theirs.qcow2"));
        std::fs::copy(&original, &ours).unwrap();
        std::fs::copy(&original, &theirs).unwrap();

        let (ok, our_progress) = amend_p(&ours, "compat=0.10", true);
        assert!(ok, "{context}: cowclone qemu-img amend failed");
        let (ok, their_progress) = amend_p(&theirs, "compat=0.10", false);
        assert!(ok, "{context}: qemu-img amend failed");
        assert_eq!(
            String::from_utf8_lossy(&our_progress),
            String::from_utf8_lossy(&their_progress),
            "{context}: -p lines"
        );
        assert_qemu_check_clean(&ours, context);
        let info = qemu_info_json(&ours);
        assert_eq!(
            info["format-specific"]["data"]["compat"], "0.10",
            "{context}: {info}"
        );

        let raw = dir.path().join("contents.raw");
        for snapshot in std::iter::once(None).chain(snapshots.iter().map(|s| Some(s.as_str()))) {
            let what = format!("{context}, {}", snapshot.unwrap_or("active layer"));
            let before = contents(&original, snapshot, &raw);
            assert!(
                contents(&ours, snapshot, &raw) == before,
                "{what}: cowclone's downgrade changed the contents"
            );
            assert!(
                contents(&theirs, snapshot, &raw) == before,
                "{what}: qemu-img's downgrade changed the contents (the reference is broken)"
            );
        }
        // Applied by qemu-img on a copy, every snapshot reads back through qemu-io (a zero
        // flag left in a v2 image is an I/O error there) and checks clean.
        for snapshot in &snapshots {
            let applied = dir.path().join("applied.qcow2");
            std::fs::copy(&ours, &applied).unwrap();
            qemu_img_ok(&[&"snapshot", &"-a", snapshot, &applied]);
            assert_qemu_check_clean(&applied, &format!("{context}, {snapshot} applied"));
            let expected = contents(&original, Some(snapshot), &raw);
            let pattern = expected[..65536].iter().all(|&b| b == expected[0]);
            assert!(pattern, "{context}: the first cluster holds one byte value");
            qemu_io_ok(&[
                &"-c",
                &format!("read -P {} 0 64k", expected[0]),
                &"-c",
                &"read 0 64M",
                &applied,
            ]);
        }
        // Where qemu-img's result is consistent, ours is the same file (same placement of the
        // new clusters, same refcounts and flags).
        if qemu_check(&theirs).0 == 0 {
            assert!(
                std::fs::read(&ours).unwrap() == std::fs::read(&theirs).unwrap(),
                "{context}: not the bytes qemu-img amend wrote"
            );
        }
    }
}

/// An image of 512-byte clusters with 1-bit refcounts and 58 clusters of data: widening its
/// refcounts to 64 bits fills the first new refcount block exactly, so qemu walks the refcount
/// table four times instead of three.
fn settling_walks_image(path: &Path) {
    qemu_create_qcow2(path, "refcount_bits=1,cluster_size=512", "64k");
    qemu_io_ok(&[&"-c", &"write 0 29696", &path]);
}

/// A 4 GiB overlay with zero clusters in four L2 tables (and one snapshot if asked).
fn four_tables_image(dir: &Path, path: &Path, snapshot: bool) {
    let base = dir.join("four.base");
    qemu_create_qcow2(&base, "", "4G");
    qemu_overlay(&base, path);
    for at in ["0", "1G", "2G", "3G"] {
        qemu_io_ok(&[&"-c", &format!("write -z {at} 64k"), &path]);
    }
    if snapshot {
        qemu_img_ok(&[&"snapshot", &"-c", &"foo", &path]);
    }
}

#[test]
fn amend_progress_prints_qemu_img_lines() {
    let dir = tempfile::tempdir().unwrap();
    type Build = fn(&Path, &Path);
    let cases: [(&str, &str, Build); 8] = [
        ("downgrade", "compat=0.10", |d, p| {
            four_tables_image(d, p, false)
        }),
        ("downgrade with a snapshot", "compat=0.10", |d, p| {
            four_tables_image(d, p, true)
        }),
        (
            "refcount walks that settle late",
            "refcount_bits=64",
            |_, p| settling_walks_image(p),
        ),
        ("narrowing", "refcount_bits=1", |d, p| {
            four_tables_image(d, p, false)
        }),
        (
            "narrowing refused: a shared cluster",
            "refcount_bits=1",
            |d, p| four_tables_image(d, p, true),
        ),
        (
            "upgrade and widening",
            "compat=1.1,refcount_bits=64",
            |_, p| {
                qemu_create_qcow2(p, "compat=0.10", "1G");
                qemu_io_ok(&[&"-c", &"write 0 3M", &p]);
                qemu_img_ok(&[&"snapshot", &"-c", &"old", &p]);
            },
        ),
        (
            "widening and downgrade",
            "refcount_bits=16,compat=0.10",
            |_, p| {
                qemu_create_qcow2(p, "refcount_bits=8", "1G");
                qemu_io_ok(&[&"-c", &"write -P 1 0 3M", &"-c", &"write -z 1M 1M", &p]);
            },
        ),
        ("no long operation", "lazy_refcounts=on", |d, p| {
            four_tables_image(d, p, false)
        }),
    ];
    for (n, (name, options, build)) in cases.into_iter().enumerate() {
        let ours = dir.path().join(format!("p{n}.ours.qcow2"));
        let theirs = dir.path().join(format!("p{n}.theirs.qcow2"));
        build(dir.path(), &theirs);
        std::fs::copy(&theirs, &ours).unwrap();
        let (their_ok, their_progress) = amend_p(&theirs, options, false);
        let (our_ok, our_progress) = amend_p(&ours, options, true);
        assert_eq!(our_ok, their_ok, "{name}: success differs");
        assert_eq!(
            String::from_utf8_lossy(&our_progress),
            String::from_utf8_lossy(&their_progress),
            "{name}: -p lines"
        );
        assert!(
            their_progress.starts_with(b"    (0.00/100%)\r")
                && their_progress.ends_with(b"    (100.00/100%)\r\n"),
            "{name}: qemu-img's lines look unlike what the test expects: {:?}",
            String::from_utf8_lossy(&their_progress)
        );
        if our_ok {
            assert_qemu_check_clean(&ours, name);
            let compare = qemu_img(&[&"compare", &ours, &theirs]);
            assert!(compare.status.success(), "{name}: {}", describe(&compare));
        }
    }
}

#[test]
fn amend_progress_ends_as_qemu_img_when_refused_early() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("early.qcow2");
    qemu_create_qcow2(&image, "", "1M");
    let missing = dir.path().join("missing.qcow2");
    // (options, image): a refused option, a missing image, the option list, -q.
    let cases: [(&[&str], &Path); 5] = [
        (&["-p", "-o", "foo=bar"], &image),
        (&["-p", "-o", "compat=0.10"], &missing),
        (&["-p", "-o", "help"], &image),
        (&["-p", "-q", "-o", "help"], &image),
        (&["-p", "-q", "-o", "compat=0.42"], &image),
    ];
    for (options, path) in cases {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"amend"];
        args.extend(options.iter().map(|o| o as &dyn AsRef<std::ffi::OsStr>));
        args.push(&path);
        let theirs = qemu_img_or_personality(false, &args);
        let ours = qemu_img_or_personality(true, &args);
        let context = format!("amend {options:?}");
        assert_eq!(ours.status.code(), theirs.status.code(), "{context}");
        assert_eq!(
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "{context}: stdout"
        );
    }
}

#[test]
fn downgrade_of_a_data_file_image_is_refused_as_qemu_img_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    for (n, options) in [
        "compat=0.10",
        "compat=0.10,lazy_refcounts=on",
        "compat=0.10,refcount_bits=8",
        "lazy_refcounts=on,compat=0.10",
    ]
    .into_iter()
    .enumerate()
    {
        let mut outputs = Vec::new();
        for who in ["theirs", "ours"] {
            let image = dir.path().join(format!("d{n}.{who}.qcow2"));
            let data = dir.path().join(format!("d{n}.{who}.data"));
            let create_options = format!("compat=1.1,data_file={}", data.display());
            qemu_create_qcow2(&image, &create_options, "64M");
            let output =
                qemu_img_or_personality(who == "ours", &[&"amend", &"-o", &options, &image]);
            let info = qemu_info_json(&image);
            outputs.push((
                output.status.code(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
                info["format-specific"]["data"]["compat"].clone(),
                info["format-specific"]["data"]["lazy-refcounts"].clone(),
            ));
        }
        assert_eq!(outputs[1], outputs[0], "amend -o {options}");
        assert!(
            outputs[0].1.contains("qemu-img: "),
            "{options}: qemu-img refused nothing: {:?}",
            outputs[0]
        );
    }
}

/// `qemu-img info --output=json` of `path` without what names or measures the file (its name
/// and disk usage, at every level): what two images in different places should share.
fn image_info(path: &Path) -> serde_json::Value {
    fn strip(info: &mut serde_json::Value) {
        if let Some(object) = info.as_object_mut() {
            object.remove("filename");
            object.remove("actual-size");
        }
        if let Some(children) = info["children"].as_array_mut() {
            for child in children {
                strip(&mut child["info"]);
            }
        }
    }
    let mut info = qemu_info_json(path);
    strip(&mut info);
    info
}

/// `amend -o compat=0.10` of images whose snapshots carry VM state (taken by `savevm` in
/// qemu-system), on twins: qemu-img downgrades them while the VM state fits v2's 32-bit size
/// field (up to 4 GiB − 1 bytes, the entries left as they are), and refuses more ("Internal
/// snapshots prevent downgrade of image", also before it looks at incompatible features such
/// as extended L2 entries). The personality must answer the same (`-p` lines included), and
/// qemu-img's `check`, `snapshot -l` and `info` must then find its twin as they find
/// qemu-img's; the files must be the same bytes.
#[test]
fn downgrade_of_snapshots_with_vm_state_is_accepted_and_refused_as_qemu_img_does() {
    use crate::personality::{assert_same, personality_dir};
    use crate::util::{
        assert_qemu_img_judges_twins_alike, case_twin_dirs, qemu_savevm,
        set_first_snapshot_vm_state, twin_image,
    };
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    // (case, creation options, VM state size set in the first entry, qemu-img downgrades)
    let cases: [(&str, &str, Option<u64>, bool); 5] = [
        ("savevm", "compat=1.1", None, true),
        ("4 GiB - 1", "compat=1.1", Some(u64::from(u32::MAX)), true),
        ("4 GiB", "compat=1.1", Some(1 << 32), false),
        ("4 GiB, extended L2", "extended_l2=on", Some(1 << 32), false),
        ("savevm, extended L2", "extended_l2=on", None, false),
    ];
    for (case, options, vm_state, downgraded) in cases {
        let dirs = case_twin_dirs(tmp.path(), case);
        twin_image(&dirs, options, |path| {
            qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 1 0 1M", &path]);
            qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -z 256k 128k", &path]);
            qemu_savevm(path, "vm1");
            qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -z 512k 64k", &path]);
            qemu_savevm(path, "vm2");
            if let Some(size) = vm_state {
                set_first_snapshot_vm_state(path, size);
            }
        });
        let list = qemu_img_ok(&[&"snapshot", &"-l", &dirs[1].join("t.qcow2")]);
        assert!(
            !list.lines().any(|l| l.contains(" 0 B ")),
            "{case}: every snapshot has VM state: {list}"
        );
        assert_same(
            &bin,
            &dirs,
            &["amend", "-p", "-o", "compat=0.10", "t.qcow2"],
            true,
            true,
        );
        for args in [
            &["check", "t.qcow2"][..],
            &["snapshot", "-l", "t.qcow2"],
            &["info", "--output=json", "t.qcow2"],
        ] {
            if args[0] == "info" {
                let [theirs, ours] = dirs.clone().map(|dir| image_info(&dir.join("t.qcow2")));
                assert_eq!(ours, theirs, "{case}: qemu-img info");
                let compat = &theirs["format-specific"]["data"]["compat"];
                let expected = if downgraded { "0.10" } else { "1.1" };
                assert_eq!(compat, expected, "{case}: qemu-img's amend");
            } else {
                assert_qemu_img_judges_twins_alike(&dirs, args);
            }
        }
        assert_qemu_check_clean(&dirs[1].join("t.qcow2"), case);
        let [theirs, ours] = dirs
            .clone()
            .map(|dir| std::fs::read(dir.join("t.qcow2")).unwrap());
        assert!(ours == theirs, "{case}: not the bytes qemu-img amend left");
    }
}
