//! The VDI commands of the `cowclone` binary, cross-checked against tools no one here wrote:
//! `qemu-img` (check, info, map, compare, convert) for base images, which qemu opens, and the
//! Python reader `dissect.hypervisor` for differencing chains, which qemu refuses.

use std::path::Path;

use serde_json::Value;

use crate::util::{cowclone_in, describe, tool_in, tool_ok_in};
use crate::vdi_xcheck::dissect_read;

const MIB: usize = 1 << 20;

/// Runs cowclone in `dir`; asserts success and returns stdout.
fn ours(dir: &Path, args: &[&str]) -> String {
    let argv: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    let output = cowclone_in(dir, &argv);
    assert!(
        output.status.success(),
        "cowclone {} failed: {}",
        args.join(" "),
        describe(&output)
    );
    String::from_utf8(output.stdout).unwrap()
}

/// Runs cowclone in `dir` expecting failure; returns (exit code, stderr).
fn ours_fails(dir: &Path, args: &[&str]) -> (i32, String) {
    let argv: Vec<&dyn AsRef<std::ffi::OsStr>> = args.iter().map(|a| a as _).collect();
    let output = cowclone_in(dir, &argv);
    assert!(
        !output.status.success(),
        "cowclone {} should fail: {}",
        args.join(" "),
        describe(&output)
    );
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn qemu_img(dir: &Path, args: &[&str]) -> String {
    String::from_utf8(tool_ok_in("qemu-img", dir, args).stdout).unwrap()
}

fn qemu_io(dir: &Path, format: &str, file: &str, commands: &[&str]) {
    let mut args = vec!["-f", format];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(file);
    let out = tool_ok_in("qemu-io", dir, &args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("failed"), "qemu-io {args:?}: {stdout}");
}

/// The guest bytes of `file` as qemu-img reads them.
fn qemu_raw(dir: &Path, format: &str, file: &str) -> Vec<u8> {
    let out = format!("{file}.qemu-view.raw");
    qemu_img(dir, &["convert", "-f", format, "-O", "raw", file, &out]);
    let bytes = std::fs::read(dir.join(&out)).unwrap();
    std::fs::remove_file(dir.join(&out)).unwrap();
    bytes
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at} (block {}): got {:#04x}, want {:#04x}",
            at / MIB,
            got[at],
            want[at]
        );
    }
}

fn json(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn qemu_check_clean(dir: &Path, file: &str) {
    let out = qemu_img(dir, &["check", "-f", "vdi", file]);
    assert!(out.contains("No errors were found"), "{file}: {out}");
}

#[test]
fn created_bases_pass_qemu_and_read_back_what_qemu_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let line = ours(dir, &["create", "-f", "vdi", "dyn.vdi", "5M"]);
    assert_eq!(
        line,
        "Formatting 'dyn.vdi', fmt=vdi size=5242880 static=off\n"
    );
    ours(
        dir,
        &["create", "-f", "vdi", "-o", "static=on", "fix.vdi", "3M"],
    );
    for (file, size, kind) in [
        ("dyn.vdi", 5 * MIB, "normal"),
        ("fix.vdi", 3 * MIB, "fixed"),
    ] {
        qemu_check_clean(dir, file);
        let theirs = json(&qemu_img(dir, &["info", "--output=json", file]));
        assert_eq!(theirs["virtual-size"], size as u64, "{file}");
        assert_eq!(theirs["format"], "vdi");
        let info = json(&ours(dir, &["info", "--output", "json", file]));
        assert_eq!(info["format-specific"]["data"]["image-type"], kind);
        // qemu writes a pattern across a block boundary; our compare and convert agree.
        qemu_io(
            dir,
            "vdi",
            file,
            &["write -P 0x5a 1040k 64k", "write -P 0x11 0 512"],
        );
        let raw = format!("{file}.raw");
        ours(dir, &["convert", "-O", "raw", file, &raw]);
        assert_same(
            "our convert vs qemu's view",
            &std::fs::read(dir.join(&raw)).unwrap(),
            &qemu_raw(dir, "vdi", file),
        );
        let cmp = ours(dir, &["compare", file, &raw]);
        assert_eq!(cmp, "Images are identical.\n");
    }
    // Fixed images really are preallocated: every block allocated in qemu's map.
    let map = json(&qemu_img(dir, &["map", "--output=json", "fix.vdi"]));
    assert!(
        map.as_array().unwrap().iter().all(|e| e["data"] == true),
        "{map}"
    );
}

#[test]
fn map_and_check_output_equal_qemu_img_on_bases() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qemu_img(dir, &["create", "-f", "vdi", "q.vdi", "6M"]);
    qemu_io(
        dir,
        "vdi",
        "q.vdi",
        &["write -P 1 0 4k", "write -P 2 3M 1M", "write -P 3 5M 512"],
    );
    for file in ["q.vdi"] {
        for args in [
            vec!["map", "--output=json", file],
            vec!["map", file],
            vec!["check", "--output=json", file],
            vec!["check", file],
        ] {
            let theirs = qemu_img(dir, &args);
            let mut our_args: Vec<&str> = args.clone();
            if our_args[1] == "--output=json" {
                our_args.splice(1..2, ["--output", "json"]);
            }
            assert_eq!(ours(dir, &our_args), theirs, "{args:?}");
        }
    }
}

/// Hand-corrupts block map entries of a qemu-made image; our check counts what qemu counts.
#[test]
fn check_counts_corruptions_as_qemu_img_does() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qemu_img(dir, &["create", "-f", "vdi", "base.vdi", "8M"]);
    qemu_io(
        dir,
        "vdi",
        "base.vdi",
        &["write -P 1 0 4k", "write -P 2 2M 4k", "write -P 3 5M 4k"],
    );
    let pristine = std::fs::read(dir.join("base.vdi")).unwrap();
    let map_at = u32::from_le_bytes(pristine[0x154..0x158].try_into().unwrap()) as usize;
    // (what, edits: (block, new entry) ...)
    let cases: [(&str, &[(usize, u32)]); 4] = [
        ("entry past blocks_in_image", &[(2, 40)]),
        ("two entries share a data block", &[(1, 0)]),
        ("both, and a count mismatch", &[(1, 0), (5, 9), (7, 2)]),
        ("an entry cleared: count mismatch", &[(5, 0xFFFF_FFFF)]),
    ];
    for (what, edits) in cases {
        let mut bytes = pristine.clone();
        for &(block, value) in edits {
            bytes[map_at + 4 * block..map_at + 4 * block + 4].copy_from_slice(&value.to_le_bytes());
        }
        std::fs::write(dir.join("bad.vdi"), &bytes).unwrap();
        let theirs = tool_in("qemu-img", dir, &["check", "--output=json", "bad.vdi"]);
        let ours_out = cowclone_in(dir, &[&"check", &"--output", &"json", &"bad.vdi"]);
        assert_eq!(
            ours_out.status.code(),
            theirs.status.code(),
            "{what}: exit codes\n{}",
            describe(&ours_out)
        );
        let (a, b) = (
            json(&String::from_utf8_lossy(&ours_out.stdout)),
            json(&String::from_utf8_lossy(&theirs.stdout)),
        );
        assert_eq!(
            a["corruptions"], b["corruptions"],
            "{what}: ours {a}, qemu {b}"
        );
        assert!(
            b["corruptions"].as_u64().unwrap() > 0,
            "{what}: qemu found nothing"
        );
    }
}

/// `create -f vdi -b` and `convert -O vdi -B` make differencing images whose chains the
/// independent reader reads as the intended content; info, map, check and compare follow the
/// chain by UUID.
#[test]
fn differencing_images_from_the_cli_read_right_in_dissect() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    // The base: written by qemu.
    ours(dir, &["create", "-f", "vdi", "base.vdi", "6M"]);
    qemu_io(
        dir,
        "vdi",
        "base.vdi",
        &["write -P 0x21 0 2M", "write -P 0x22 4M 1M"],
    );
    // A diff made by create -b, then changed through a qcow2 overlay's view: instead, build the
    // wanted content as a qcow2 overlay over the base (qemu reads VDI bases) and convert it
    // into a diff with -B.
    qemu_img(
        dir,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.vdi",
            "-F",
            "vdi",
            "want.qcow2",
        ],
    );
    qemu_io(
        dir,
        "qcow2",
        "want.qcow2",
        &[
            "write -P 0x33 1M 4k", // changes one base block
            "write -z 4M 1M",      // zeroes a base block: must become a ZERO entry
            "write -P 0x44 5M 1M", // a block the base never wrote
        ],
    );
    let want = qemu_raw(dir, "qcow2", "want.qcow2");
    let line = ours(
        dir,
        &[
            "convert",
            "-O",
            "vdi",
            "-B",
            "base.vdi",
            "want.qcow2",
            "diff.vdi",
        ],
    );
    assert_eq!(line, "");
    let seen = dissect_read(&[&dir.join("base.vdi"), &dir.join("diff.vdi")], dir);
    assert_eq!(seen.image_type, 4);
    assert_same(
        "dissect reading base + converted diff",
        &seen.content,
        &want,
    );
    // Only the three differing blocks are stored, one of them as a ZERO entry (no data).
    let info = json(&ours(dir, &["info", "--output", "json", "diff.vdi"]));
    assert_eq!(info["format-specific"]["data"]["image-type"], "diff");
    let map = json(&ours(dir, &["map", "--output", "json", "diff.vdi"]));
    let at_depth0: Vec<(u64, bool)> = map
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0)
        .map(|e| (e["start"].as_u64().unwrap(), e["data"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        at_depth0,
        [
            (MIB as u64, true),
            (4 * MIB as u64, false),
            (5 * MIB as u64, true)
        ],
        "{map}"
    );
    assert_eq!(
        ours(dir, &["check", "diff.vdi"]),
        "No errors were found on the image.\n"
    );
    assert_eq!(
        ours(dir, &["compare", "diff.vdi", "want.qcow2"]),
        "Images are identical.\n"
    );

    // A diff on the diff by create -b; the chain of three reads the same in dissect.
    let line = ours(dir, &["create", "-f", "vdi", "-b", "diff.vdi", "top.vdi"]);
    assert!(
        line.starts_with("Formatting 'top.vdi', fmt=vdi size=6291456 parent=diff.vdi"),
        "{line}"
    );
    let top = dissect_read(
        &[
            &dir.join("base.vdi"),
            &dir.join("diff.vdi"),
            &dir.join("top.vdi"),
        ],
        dir,
    );
    assert_same("dissect reading a three-image chain", &top.content, &want);
    assert_eq!(
        top.uuid_linkage, seen.uuid_create,
        "top links to diff by UUID"
    );
    assert_eq!(top.uuid_parent_modify, seen.uuid_modify);
    // info --backing-chain lists the chain found by UUID.
    let chain = json(&ours(
        dir,
        &["info", "--backing-chain", "--output", "json", "top.vdi"],
    ));
    let names: Vec<&str> = chain
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["top.vdi", "diff.vdi", "base.vdi"]);
    // Converting the chain back out reads through every level.
    ours(dir, &["convert", "-O", "qcow2", "top.vdi", "flat.qcow2"]);
    assert_same(
        "qemu reading our flattening",
        &qemu_raw(dir, "qcow2", "flat.qcow2"),
        &want,
    );
}

#[test]
fn parents_are_named_explicitly_or_refused_with_both_uuids() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir(dir.join("bases")).unwrap();
    ours(dir, &["create", "-f", "vdi", "bases/base.vdi", "2M"]);
    ours(dir, &["create", "-f", "vdi", "other.vdi", "2M"]);
    qemu_io(dir, "vdi", "bases/base.vdi", &["write -P 0x61 0 2M"]);
    ours(
        dir,
        &["create", "-f", "vdi", "-b", "bases/base.vdi", "diff.vdi"],
    );
    // The parent is not in the diff's directory: not found, exit 1, the UUID named.
    let (code, err) = ours_fails(dir, &["compare", "diff.vdi", "bases/base.vdi"]);
    assert_eq!(code, 2, "compare's error code");
    assert!(
        err.contains("not found") && err.contains("--parent") || err.contains("name it"),
        "{err}"
    );
    let (code, _) = ours_fails(dir, &["check", "diff.vdi"]);
    assert_eq!(code, 1);
    // Named explicitly: found.
    let same = ours(
        dir,
        &[
            "compare",
            "--parent",
            "bases/base.vdi",
            "diff.vdi",
            "bases/base.vdi",
        ],
    );
    assert_eq!(same, "Images are identical.\n");
    ours(dir, &["check", "--parent", "bases/base.vdi", "diff.vdi"]);
    // A wrong parent named: refused, both UUIDs in the message.
    let (_, err) = ours_fails(
        dir,
        &[
            "convert",
            "--parent",
            "other.vdi",
            "-O",
            "raw",
            "diff.vdi",
            "x.raw",
        ],
    );
    let uuid = |file: &str| {
        json(&ours(dir, &["info", "--output", "json", file]))["format-specific"]["data"]["uuid"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    assert!(
        err.contains(&uuid("other.vdi")) && err.contains(&uuid("bases/base.vdi")),
        "{err}"
    );
    assert!(!dir.join("x.raw").exists(), "nothing left behind");
    // Creating a diff on a non-VDI parent, or at a different size, is refused.
    qemu_img(dir, &["create", "-f", "qcow2", "q.qcow2", "2M"]);
    let (_, err) = ours_fails(dir, &["create", "-f", "vdi", "-b", "q.qcow2", "bad.vdi"]);
    assert!(err.contains("qcow2"), "{err}");
    let (_, err) = ours_fails(
        dir,
        &["create", "-f", "vdi", "-b", "other.vdi", "bad.vdi", "4M"],
    );
    assert!(err.contains("parent's size"), "{err}");
    assert!(!dir.join("bad.vdi").exists());
}

#[test]
fn convert_to_vdi_round_trips_through_qemu() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qemu_img(dir, &["create", "-f", "qcow2", "src.qcow2", "5000k"]);
    qemu_io(
        dir,
        "qcow2",
        "src.qcow2",
        &[
            "write -P 0x71 100k 300k",
            "write -P 0x72 3M 1M",
            "write -P 0x73 4999k 1k",
        ],
    );
    let want = qemu_raw(dir, "qcow2", "src.qcow2");
    for (out, extra) in [("d.vdi", None), ("s.vdi", Some("static=on"))] {
        let mut args = vec!["convert", "-O", "vdi"];
        if let Some(o) = extra {
            args.extend(["-o", o]);
        }
        args.extend(["src.qcow2", out]);
        ours(dir, &args);
        qemu_check_clean(dir, out);
        assert_same(out, &qemu_raw(dir, "vdi", out), &want);
        let compare = tool_in("qemu-img", dir, &["compare", "src.qcow2", out]);
        assert!(compare.status.success(), "{}", describe(&compare));
    }
    // The dynamic one stores only blocks with data: 100k..400k (block 0), 3M..4M (block 3) and
    // the last kilobyte (block 4).
    let blocks = json(&qemu_img(dir, &["map", "--output=json", "d.vdi"]))
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(blocks, (2 * MIB + (5000 * 1024 - 4 * MIB)) as u64);
}
