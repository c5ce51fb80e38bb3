//! Internal snapshots, judged by qemu-img 10: snapshots cowclone creates are listed, applied and
//! checked clean by qemu-img; snapshots qemu-img creates are applied and deleted by cowclone;
//! writes over snapshotted clusters leave the snapshot's data intact (qemu-io, qemu-img compare).

use std::path::Path;

use imagefmt::backing::BackingPolicy;
use imagefmt::chain::open_qcow2_rw;
use imagefmt::qcow2::write::WriteOptions;

use crate::util::{
    assert_qemu_check_clean, assert_same_content, qemu_img, qemu_img_ok, qemu_io_ok,
};

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

/// Sets fields qemu-img cannot set itself in entry 0 of the snapshot table of `path`: a VM
/// clock of 1 h 2 min 3.456 s, 1.5 MiB of VM state (a disk-only image: nothing reads it) and
/// icount -1 (absent).
fn patch_first_entry(path: &Path) {
    use std::os::unix::fs::FileExt;
    crate::util::set_first_snapshot_vm_state(path, 1536 << 10);
    let (file, table) = crate::util::first_snapshot_entry(path);
    file.write_all_at(&3_723_456_000_000u64.to_be_bytes(), table + 24)
        .unwrap(); // vm_clock_nsec
    file.write_all_at(&u64::MAX.to_be_bytes(), table + 56)
        .unwrap(); // icount
}

/// The "Snapshot list:" section of a human `info` output, up to the next section.
fn snapshot_section(info: &str) -> String {
    let mut lines = info
        .lines()
        .skip_while(|l| !l.starts_with("Snapshot list:"));
    let mut out = String::new();
    if let Some(first) = lines.next() {
        out.push_str(first);
        out.push('\n');
    }
    for line in lines.take_while(|l| !l.ends_with(':') || l.starts_with(' ')) {
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// `snapshot -l`, the human info section and the JSON `snapshots` equal qemu-img 10's for the
/// same image: snapshots made by both tools, one with VM clock, VM state and no icount.
#[test]
fn snapshot_list_and_info_match_qemu_img() {
    use crate::util::{cowclone_info_json, cowclone_ok, qemu_info_json};
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    qemu_img_ok(&[&"create", &"-f", &"qcow2", &img, &"16M"]);
    qemu_write(&img, 1, 0, 64 << 10);
    qemu_img_ok(&[&"snapshot", &"-c", &"made-by-qemu-img", &img]);
    patch_first_entry(&img);
    cowclone_ok(&[&"snapshot", &"-c", &"made by cowclone", &img]);
    qemu_img_ok(&[
        &"snapshot",
        &"-c",
        &"a-name-longer-than-the-tag-column",
        &img,
    ]);
    cowclone_ok(&[&"snapshot", &"-c", &"x", &img]);
    let long = "n".repeat(300); // both keep 255 bytes
    cowclone_ok(&[&"snapshot", &"-c", &long, &img]);
    qemu_img_ok(&[&"snapshot", &"-c", &long, &img]);
    assert_qemu_check_clean(&img, "snapshots by both tools");

    let ours = cowclone_ok(&[&"snapshot", &"-l", &img]);
    let theirs = qemu_img_ok(&[&"snapshot", &"-l", &img]);
    assert_eq!(ours, theirs, "snapshot -l");
    assert!(
        theirs.contains("0001:02:03.456") && theirs.contains("1.5 MiB"),
        "{theirs}"
    );

    let ours = snapshot_section(&cowclone_ok(&[&"info", &img]));
    let theirs = snapshot_section(&qemu_img_ok(&[&"info", &img]));
    assert_eq!(ours, theirs, "info's snapshot list");
    assert_eq!(theirs.lines().count(), 8, "{theirs}");

    let ours = cowclone_info_json(&img)["snapshots"].clone();
    let theirs = qemu_info_json(&img)["snapshots"].clone();
    let (ours, theirs) = (ours.as_array().unwrap(), theirs.as_array().unwrap());
    assert_eq!(ours.len(), 6);
    assert_eq!(theirs[4]["name"], "n".repeat(255));
    assert_eq!(ours.len(), theirs.len());
    for (i, (o, t)) in ours.iter().zip(theirs).enumerate() {
        let keys: Vec<&String> = t.as_object().unwrap().keys().collect();
        assert_eq!(
            o.as_object().unwrap().keys().count(),
            keys.len(),
            "snapshot {i}: keys\n{o:#}\n{t:#}"
        );
        for key in keys {
            assert_eq!(o.get(key), t.get(key), "snapshot {i}: key {key}");
        }
    }
    assert!(theirs[0].get("icount").is_none() && theirs[1]["icount"] == 0);

    // Without snapshots, neither prints a list or a key.
    let empty = dir.path().join("empty.qcow2");
    qemu_img_ok(&[&"create", &"-f", &"qcow2", &empty, &"1M"]);
    assert_eq!(cowclone_ok(&[&"snapshot", &"-l", &empty]), "");
    assert!(cowclone_info_json(&empty).get("snapshots").is_none());
}

/// The CLI end to end: `snapshot -c/-a/-d` by cowclone on an image qemu-io writes between them,
/// judged by qemu-img (list, compare, check); errors exit as qemu-img's with its messages.
#[test]
fn snapshot_cli_round_trip_and_errors_match_qemu_img() {
    use crate::util::{cowclone, cowclone_ok};
    let dir = tempfile::tempdir().unwrap();
    let img = mixed_image(dir.path(), &[]);
    let before = dir.path().join("before.raw");
    qemu_img_ok(&[&"convert", &"-O", &"raw", &img, &before]);
    cowclone_ok(&[&"snapshot", &"-c", &"base", &img]);
    qemu_write(&img, 0x42, 0, 4 << 20);
    assert_qemu_check_clean(&img, "qemu-io wrote over a cowclone snapshot");
    cowclone_ok(&[&"snapshot", &"-a", &"base", &img]);
    assert_qemu_check_clean(&img, "after snapshot -a");
    assert_same_content(&img, &before, "snapshot -a by cowclone");
    cowclone_ok(&[&"snapshot", &"-d", &"base", &img]);
    assert_qemu_check_clean(&img, "after snapshot -d");
    assert!(qemu_snapshot_list(&img).is_empty());
    assert_same_content(&img, &before, "after snapshot -d");

    qemu_img_ok(&[&"snapshot", &"-c", &"s", &img]);
    let cases: [&[&str]; 5] = [
        &["-a", "nope"],
        &["-d", "1"],
        &["-l", "-c", "x"],
        &["-U", "-c", "x"],
        &["-f", "raw", "-c", "x"],
    ];
    for case in cases {
        let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"snapshot"];
        for a in case {
            args.push(a);
        }
        args.push(&img);
        let ours = cowclone(&args);
        let theirs = qemu_img(&args);
        assert_eq!(
            ours.status.code(),
            theirs.status.code(),
            "{case:?}: exit codes"
        );
        assert_eq!(ours.status.code(), Some(1), "{case:?}");
        let message = |o: &std::process::Output| {
            let text = String::from_utf8_lossy(&o.stderr).into_owned();
            let first = text.lines().next().unwrap_or_default().to_owned();
            first
                .split_once(": ")
                .map(|(_, m)| m.to_owned())
                .unwrap_or(first)
        };
        assert_eq!(message(&ours), message(&theirs), "{case:?}: messages");
    }
    assert_eq!(qemu_snapshot_list(&img), [("1".into(), "s".into())]);
    assert_qemu_check_clean(&img, "after the refused operations");
}

/// `provision --snapshot NAME`: after the script ran (it writes a pattern into the clone's disk)
/// and the VM stopped, the clone's image carries snapshot NAME, which qemu-img lists and checks
/// clean; after qemu-io overwrites the data, `snapshot -a NAME` brings the provisioned state
/// back (read by qemu-io). Boots the test guest under TCG (see `vm_guest`).
#[test]
fn provision_snapshot_returns_to_the_provisioned_state() {
    use crate::util::{cowclone, cowclone_ok, describe};
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    crate::vm_e2e::registered_base(tmp.path(), &home);
    let script = tmp.path().join("job.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n: <<'PLAN'\n/* rexxjs-vm-base: gold */\n/* rexxjs-vm-memory: 256M */\n\
         /* rexxjs-vm-timeout: 120 */\nPLAN\n\
         head -c 65536 /dev/zero | tr '\\0' '\\132' | dd of=/dev/vda bs=512 seek=2048 conv=notrunc\n\
         sync\necho provisioned\n",
    )
    .unwrap();
    let g = crate::vm_guest::guest();
    let output = cowclone(&[
        &"provision",
        &script,
        &"--home",
        &home,
        &"--name",
        &"job",
        &"--accel",
        &"tcg",
        &"--kernel",
        &g.kernel,
        &"--initrd",
        &g.initrd,
        &"--append",
        &"console=ttyS0 quiet panic=-1",
        &"--snapshot",
        &"ready",
        &"--output",
        &"json",
    ]);
    let _ = cowclone(&[&"stop", &"job", &"--home", &home, &"--timeout", &"1"]);
    assert!(output.status.success(), "{}", describe(&output));
    let outcome: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(outcome["snapshot"]["name"], "ready", "{outcome:#}");
    assert_eq!(outcome["snapshot"]["id"], "1", "{outcome:#}");

    let overlay = home.join("clones/job/disk.qcow2");
    assert_eq!(qemu_snapshot_list(&overlay), [("1".into(), "ready".into())]);
    assert_qemu_check_clean(&overlay, "clone after provision --snapshot");
    qemu_expect(&overlay, 0x5a, 1 << 20, 64 << 10, "provisioned data");
    qemu_write(&overlay, 0x01, 1 << 20, 128 << 10);
    qemu_expect(&overlay, 0x01, 1 << 20, 64 << 10, "overwritten");
    cowclone_ok(&[&"snapshot", &"-a", &"ready", &overlay]);
    assert_qemu_check_clean(&overlay, "clone after snapshot -a");
    qemu_expect(
        &overlay,
        0x5a,
        1 << 20,
        64 << 10,
        "provisioned state returned to",
    );

    // A snapshot needs the VM stopped: refused with --keep-running before anything runs.
    let refused = cowclone(&[
        &"provision",
        &script,
        &"--home",
        &home,
        &"--keep-running",
        &"--snapshot",
        &"x",
    ]);
    assert!(!refused.status.success(), "{}", describe(&refused));
}

/// Narrow refcounts: 1 bit cannot count a shared cluster, qemu-img fails the same create (and
/// leaks a cluster); 2 bits count three references. cowclone refuses before writing anything,
/// so the image stays clean.
#[test]
fn narrow_refcounts_refuse_a_snapshot_without_leaking() {
    use crate::util::cowclone;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("r1.qcow2");
    qemu_img_ok(&[
        &"create",
        &"-f",
        &"qcow2",
        &"-o",
        &"refcount_bits=1",
        &img,
        &"4M",
    ]);
    qemu_write(&img, 7, 0, 64 << 10);
    let copy = dir.path().join("copy.qcow2");
    std::fs::copy(&img, &copy).unwrap();
    let ours = cowclone(&[&"snapshot", &"-c", &"s", &img]);
    let theirs = qemu_img(&[&"snapshot", &"-c", &"s", &copy]);
    assert_eq!(ours.status.code(), Some(1));
    assert_eq!(theirs.status.code(), Some(1), "qemu-img refuses too");
    assert_qemu_check_clean(&img, "after the refused create");
    assert!(qemu_snapshot_list(&img).is_empty());
    qemu_expect(&img, 7, 0, 64 << 10, "data kept");

    // 2-bit refcounts count up to 3: two snapshots, then the third is refused cleanly.
    let img = dir.path().join("r2.qcow2");
    qemu_img_ok(&[
        &"create",
        &"-f",
        &"qcow2",
        &"-o",
        &"refcount_bits=2",
        &img,
        &"4M",
    ]);
    qemu_write(&img, 7, 0, 64 << 10);
    crate::util::cowclone_ok(&[&"snapshot", &"-c", &"a", &img]);
    crate::util::cowclone_ok(&[&"snapshot", &"-c", &"b", &img]);
    assert_eq!(
        cowclone(&[&"snapshot", &"-c", &"c", &img]).status.code(),
        Some(1)
    );
    assert_qemu_check_clean(&img, "2-bit refcounts after the refused third create");
    let names: Vec<String> = qemu_snapshot_list(&img)
        .into_iter()
        .map(|(_, t)| t)
        .collect();
    assert_eq!(names, ["a", "b"]);
}

/// One step of the interleaving proptest.
#[derive(Debug, Clone)]
enum Step {
    Write { offset: u64, len: u64, byte: u8 },
    Zero { offset: u64, len: u64 },
    Create,
    Apply(usize),
    Delete(usize),
}

fn step(size: u64) -> impl proptest::strategy::Strategy<Value = Step> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..size, 1u64..40_000, any::<u8>()).prop_map(move |(offset, len, byte)| Step::Write {
            offset,
            len: len.min(size - offset),
            byte,
        }),
        1 => (0..size, 1u64..40_000).prop_map(move |(offset, len)| Step::Zero {
            offset,
            len: len.min(size - offset),
        }),
        2 => Just(Step::Create),
        1 => any::<usize>().prop_map(Step::Apply),
        1 => any::<usize>().prop_map(Step::Delete),
    ]
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 12, ..Default::default() })]

    /// Writes, zero writes and snapshot create/apply/delete interleaved on a small image with
    /// many L2 tables (512-byte clusters), against an in-memory model of the active disk and of
    /// every snapshot: after each run qemu-img checks the image clean, the active disk equals
    /// the model (qemu-img compare), and every remaining snapshot, applied by qemu-img to a
    /// copy, equals its model.
    #[test]
    fn interleaved_writes_and_snapshots_match_a_model(
        extended in proptest::prelude::any::<bool>(),
        steps in proptest::collection::vec(step(256 << 10), 1..24),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("img.qcow2");
        let size = 256u64 << 10;
        let options = if extended { "cluster_size=16k,extended_l2=on" } else { "cluster_size=512" };
        qemu_img_ok(&[&"create", &"-f", &"qcow2", &"-o", &options, &img, &"256k"]);
        let mut active = vec![0u8; size as usize];
        let mut snapshots: Vec<(String, Vec<u8>)> = Vec::new();
        let mut made = 0;
        let mut image = open_rw(&img);
        for step in &steps {
            match *step {
                Step::Write { offset, len, byte } => {
                    image.write_at(&vec![byte; len as usize], offset).unwrap();
                    active[offset as usize..(offset + len) as usize].fill(byte);
                }
                Step::Zero { offset, len } => {
                    image.write_zeroes(offset, len).unwrap();
                    active[offset as usize..(offset + len) as usize].fill(0);
                }
                Step::Create => {
                    made += 1;
                    let name = format!("s{made}");
                    image.create_snapshot(&name, now()).unwrap();
                    snapshots.push((name, active.clone()));
                }
                Step::Apply(i) if !snapshots.is_empty() => {
                    let (name, data) = &snapshots[i % snapshots.len()];
                    image.apply_snapshot(name).unwrap();
                    active = data.clone();
                }
                Step::Delete(i) if !snapshots.is_empty() => {
                    let (name, _) = snapshots.remove(i % snapshots.len());
                    image.delete_snapshot(&name).unwrap();
                }
                Step::Apply(_) | Step::Delete(_) => {}
            }
        }
        drop(image);
        assert_qemu_check_clean(&img, &format!("{steps:?}"));
        // cowclone's own check (which reads the table through the same codec) agrees.
        let file = std::fs::File::open(&img).unwrap();
        let report = imagefmt::qcow2::check::check(&file, imagefmt::qcow2::check::Repair::None).unwrap();
        assert_eq!((report.corruptions, report.leaks, report.check_errors), (0, 0, 0), "{report:?}");
        let model = dir.path().join("model.raw");
        std::fs::write(&model, &active).unwrap();
        assert_same_content(&img, &model, "active disk");
        let listed: Vec<String> = qemu_snapshot_list(&img).into_iter().map(|(_, tag)| tag).collect();
        let expected: Vec<String> = snapshots.iter().map(|(name, _)| name.clone()).collect();
        assert_eq!(listed, expected);
        for (name, data) in &snapshots {
            let copy = dir.path().join("copy.qcow2");
            std::fs::copy(&img, &copy).unwrap();
            qemu_img_ok(&[&"snapshot", &"-a", name, &copy]);
            std::fs::write(&model, data).unwrap();
            assert_same_content(&copy, &model, &format!("snapshot {name}"));
        }
    }
}

/// The snapshot table of `path`, decoded by the codec (header from cluster 0).
fn table_of(path: &Path) -> (u64, Vec<imagefmt::qcow2::snapshot::Snapshot>) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).unwrap();
    let header = imagefmt::qcow2::HeaderCluster::read_from(&file)
        .unwrap()
        .header;
    let table = imagefmt::qcow2::snapshot::read_table(
        |buf: &mut [u8], at: u64| {
            buf.fill(0);
            let _ = file.read_at(buf, at);
            Ok(())
        },
        header.snapshots_offset,
        header.nb_snapshots,
    )
    .unwrap();
    (header.snapshots_offset, table.entries)
}

/// Rewrites the snapshot table of `path` in place as iotest 261 does: entry 0 without extra
/// data, entry 1 with 50 bytes (26 of them unknown to qemu), entry 2 with 8.
fn shorten_extra_data(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap();
    let be32 = |b: &[u8], at: usize| u32::from_be_bytes(b[at..at + 4].try_into().unwrap());
    let be16 = |b: &[u8], at: usize| u16::from_be_bytes(b[at..at + 2].try_into().unwrap());
    let count = be32(&bytes, 60) as usize;
    let offset = u64::from_be_bytes(bytes[64..72].try_into().unwrap()) as usize;
    let mut at = offset;
    let mut out = Vec::new();
    for i in 0..count {
        at = at.next_multiple_of(8);
        let mut head = bytes[at..at + 40].to_vec();
        let extra_len = be32(&head, 36) as usize;
        let ids = be16(&head, 12) as usize + be16(&head, 14) as usize;
        let extra = bytes[at + 40..at + 40 + extra_len].to_vec();
        let names = bytes[at + 40 + extra_len..at + 40 + extra_len + ids].to_vec();
        at += 40 + extra_len + ids;
        let new_extra = match i {
            0 => Vec::new(),
            1 => {
                let mut e = extra[..24].to_vec();
                e.extend_from_slice(b"very important data\0\0\0\0\0\0\0");
                e
            }
            _ => extra[..8].to_vec(),
        };
        head[36..40].copy_from_slice(&(new_extra.len() as u32).to_be_bytes());
        out.resize(out.len().next_multiple_of(8), 0);
        out.extend_from_slice(&head);
        out.extend_from_slice(&new_extra);
        out.extend_from_slice(&names);
    }
    bytes[offset..offset + out.len()].copy_from_slice(&out);
    std::fs::write(path, bytes).unwrap();
}

/// stdout and stderr of `cowclone qemu-img ARGS` and of `qemu-img ARGS` must be the same, and
/// so must their exit codes.
fn same_as_qemu_img(ours: &[&dyn AsRef<std::ffi::OsStr>], theirs: &[&dyn AsRef<std::ffi::OsStr>]) {
    let mut with_personality: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"qemu-img"];
    with_personality.extend_from_slice(ours);
    let a = crate::util::cowclone(&with_personality);
    let b = qemu_img(theirs);
    let text = |o: &std::process::Output| {
        format!(
            "{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        )
    };
    assert_eq!(
        (a.status.code(), text(&a)),
        (b.status.code(), text(&b)),
        "cowclone qemu-img vs qemu-img"
    );
}

/// A v2 table whose entries lack the extra data v3 needs: `amend -o compat=1.1` writes it anew
/// (full extra data, unknown extra data kept) where qemu-img does, and `check -r all` of the
/// same table in a v3 header repairs it with qemu-img's report; qemu-img then checks both
/// clean and reads the same entries.
#[test]
fn incomplete_snapshot_entries_are_rewritten_as_qemu_img_rewrites_them() {
    let dir = tempfile::tempdir().unwrap();
    let v2 = dir.path().join("v2.qcow2");
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-o",
        &"compat=0.10",
        &v2,
        &"64M",
    ]);
    for name in ["sn0", "sn1", "sn2"] {
        qemu_img_ok(&[&"snapshot", &"-c", &name, &v2]);
    }
    shorten_extra_data(&v2);
    assert_qemu_check_clean(&v2, "v2 with short extra data");

    let (ours, theirs) = (
        dir.path().join("ours.qcow2"),
        dir.path().join("theirs.qcow2"),
    );
    for path in [&ours, &theirs] {
        std::fs::copy(&v2, path).unwrap();
    }
    crate::util::cowclone_ok(&[&"qemu-img", &"amend", &"-o", &"compat=1.1", &ours]);
    qemu_img_ok(&[&"amend", &"-o", &"compat=1.1", &theirs]);
    assert_qemu_check_clean(&ours, "after amend compat=1.1");
    let (offset, table) = table_of(&ours);
    assert_eq!(
        (offset, &table),
        (table_of(&theirs).0, &table_of(&theirs).1)
    );
    assert_eq!(
        table
            .iter()
            .map(|sn| sn.extra_data_size)
            .collect::<Vec<_>>(),
        [24, 50, 24]
    );
    assert_eq!(table[1].unknown_extra[..19], *b"very important data");

    // The v2 table under a v3 header (as iotest 261 botches it): check -r all repairs it.
    for path in [&ours, &theirs] {
        let mut bytes = std::fs::read(&v2).unwrap();
        bytes[4..8].copy_from_slice(&3u32.to_be_bytes());
        bytes[96..100].copy_from_slice(&4u32.to_be_bytes());
        bytes[100..104].copy_from_slice(&104u32.to_be_bytes());
        std::fs::write(path, bytes).unwrap();
    }
    same_as_qemu_img(&[&"check", &ours], &[&"check", &theirs]);
    same_as_qemu_img(
        &[&"check", &"-r", &"all", &ours],
        &[&"check", &"-r", &"all", &theirs],
    );
    assert_qemu_check_clean(&ours, "after check -r all");
    assert_eq!(table_of(&ours), table_of(&theirs));
}

/// A v2 image with snapshots cannot be resized, and a downgrade is refused while a snapshot
/// has another disk size than the image (iotest 061's sequence, with qemu-img's messages and
/// the headers qemu-img leaves).
#[test]
fn v2_resize_and_downgrade_with_snapshots_follow_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let (ours, theirs) = (
        dir.path().join("ours.qcow2"),
        dir.path().join("theirs.qcow2"),
    );
    for path in [&ours, &theirs] {
        qemu_img_ok(&[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &"-o",
            &"compat=0.10",
            path,
            &"32M",
        ]);
        qemu_write(path, 0x2a, 24 << 20, 65536);
        qemu_img_ok(&[&"snapshot", &"-c", &"foo", path]);
    }
    let header = |path: &Path| {
        let h = imagefmt::qcow2::HeaderCluster::read_from(&std::fs::File::open(path).unwrap())
            .unwrap()
            .header;
        (h.version, h.size, h.nb_snapshots)
    };
    let steps: [&[&str]; 7] = [
        &["resize", "IMG", "64M"],
        &["amend", "-o", "compat=1.1,size=128M", "IMG"],
        &["snapshot", "-c", "bar", "IMG"],
        &["resize", "--shrink", "IMG", "64M"],
        &["amend", "-o", "compat=0.10,size=32M", "IMG"],
        &["snapshot", "-a", "bar", "IMG"],
        &["amend", "-o", "compat=0.10,size=32M", "IMG"],
    ];
    for (i, step) in steps.iter().enumerate() {
        if i == 6 {
            same_as_qemu_img(
                &[&"snapshot", &"-d", &"bar", &ours],
                &[&"snapshot", &"-d", &"bar", &theirs],
            );
        }
        let with = |path: &Path| -> Vec<std::ffi::OsString> {
            step.iter()
                .map(|a| {
                    if *a == "IMG" {
                        path.as_os_str().to_owned()
                    } else {
                        (*a).into()
                    }
                })
                .collect()
        };
        let (a, b) = (with(&ours), with(&theirs));
        let a: Vec<&dyn AsRef<std::ffi::OsStr>> = a.iter().map(|s| s as _).collect();
        let b: Vec<&dyn AsRef<std::ffi::OsStr>> = b.iter().map(|s| s as _).collect();
        same_as_qemu_img(&a, &b);
        assert_eq!(header(&ours), header(&theirs), "after {step:?}");
    }
    assert_qemu_check_clean(&ours, "after the resize and amend sequence");
}

/// Regression (found by `interleaved_writes_and_snapshots_match_a_model` in a fresh-clone CI
/// run, 2026-12-02): three snapshots, two deleted, a zero write over shared clusters, the last
/// snapshot applied, then a write; qemu-img check found 11 leaked clusters. The write copied
/// an L2 table into a cluster a freed table had used, whose stale copy was still cached.
#[test]
fn write_after_zeroing_and_applying_a_snapshot_leaks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("img.qcow2");
    crate::util::qemu_create_qcow2(&img, "cluster_size=512", "256k");
    let mut image = open_rw(&img);
    image.write_at(&vec![63; 11958], 129536).unwrap();
    image.write_at(&vec![74; 5011], 87843).unwrap();
    for name in ["s1", "s2", "s3"] {
        image.create_snapshot(name, now()).unwrap();
    }
    image.delete_snapshot("s1").unwrap();
    image.delete_snapshot("s3").unwrap();
    image.write_zeroes(129361, 26422).unwrap();
    image.apply_snapshot("s2").unwrap();
    image.write_at(&vec![213; 23506], 87421).unwrap();
    drop(image);
    assert_qemu_check_clean(&img, "after the writes, snapshots and zeroes");
}
