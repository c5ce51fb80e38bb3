//! Broken snapshot metadata under the qemu-img personality, judged by the real qemu-img 10 on a
//! twin of each image (the same bytes, made by qemu-img and qemu-io, then poked as QEMU's iotests
//! 080 and 261 poke them): exit codes, standard output and standard error of the operations
//! that meet the damage, then `qemu-img check` and `qemu-img snapshot -l` of what is left.
//!
//! - An invalid snapshot L1 table (unaligned, or larger than 32 MiB) does not stop the image
//!   from opening; the operations that need the table fail, with qemu's words and errnos.
//! - `snapshot -c` refuses a reference to a cluster no refcount block covers (EAGAIN, or EFBIG
//!   when the refcount table could not list it), and here writes nothing.
//! - A snapshot table qemu does not open (too much extra data in an entry, a table over 64 MiB,
//!   more than 65,536 entries) fails `info` and `check` as in qemu-img, and `check -r all`
//!   repairs it as qemu-img does.

use std::path::{Path, PathBuf};

use crate::personality::{assert_same, peek, personality_dir, poke, qemu_img_as};
use crate::util::{
    assert_qemu_check_clean, case_twin_dirs as twin_dirs, describe, qemu_img_ok, qemu_io_in,
    twin_image,
};

/// 64 KiB clusters, as the iotests' images have.
const CLUSTER: u64 = 1 << 16;

fn be64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().unwrap())
}

fn be32(bytes: &[u8]) -> u32 {
    u32::from_be_bytes(bytes.try_into().unwrap())
}

/// The first snapshot table entry's offset (the table's).
fn snapshot_table_offset(path: &Path) -> u64 {
    be64(&peek(path, 64, 8))
}

/// Sets the refcount of every cluster in `[start, end)` to 1 in refcount block 0 (16-bit
/// refcounts), as iotest 261's `refblock0_allocate` does.
fn refblock0_allocate(path: &Path, start: u64, end: u64) {
    let reftable = be64(&peek(path, 48, 8));
    let refblock = be64(&peek(path, reftable, 8));
    for cluster in start / CLUSTER..end.div_ceil(CLUSTER) {
        assert!(
            cluster < CLUSTER / 2,
            "cluster {cluster} is past refcount block 0"
        );
        poke(path, refblock + cluster * 2, &[0, 1]);
    }
}

/// Runs qemu-io's `commands` on the qcow2 image at `path`.
fn qemu_io(path: &Path, commands: &[&str]) {
    let name = path.file_name().unwrap().to_str().unwrap();
    qemu_io_in(path.parent().unwrap(), name, commands);
}

/// Runs each of `commands` with the real qemu-img and the personality on the twins
/// ([`assert_same`]): the same exit codes, stdout and stderr.
fn assert_same_each(bin: &Path, dirs: &[PathBuf; 2], commands: &[&[&str]]) {
    for args in commands {
        assert_same(bin, dirs, args, true, true);
    }
}

/// Makes the file at `path` `len` bytes long.
fn set_file_len(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Gives the snapshot table entry at `entry` (of the table at `table`) an L1 table of one
/// entry two clusters before the table, pointing at an L2 table one cluster before it, and
/// counts every cluster from that L1 table to `end` in refcount block 0.
fn give_entry_tables(path: &Path, entry: u64, table: u64, end: u64) {
    poke(path, entry, &(table - 2 * CLUSTER).to_be_bytes());
    poke(path, entry + 8, &1u32.to_be_bytes());
    poke(
        path,
        table - 2 * CLUSTER,
        &(0x8000_0000_0000_0000 | (table - CLUSTER)).to_be_bytes(),
    );
    refblock0_allocate(path, table - 2 * CLUSTER, end);
}

/// Runs `qemu-img snapshot -l` (the real one) on both twins: the same list. Dates are left out:
/// a snapshot each tool took itself may fall in another second.
fn assert_same_snapshot_lists(dirs: &[PathBuf; 2]) -> String {
    let lists: Vec<String> = dirs
        .iter()
        .map(|dir| without_dates(&qemu_img_ok(&[&"snapshot", &"-l", &dir.join("t.qcow2")])))
        .collect();
    assert_eq!(
        lists[1], lists[0],
        "qemu-img snapshot -l after the personality"
    );
    lists[0].clone()
}

/// `list` with every `YYYY-MM-DD HH:MM:SS` date blanked out.
fn without_dates(list: &str) -> String {
    list.lines()
        .map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let is_date =
                |f: &&str| f.len() == 10 && f.as_bytes()[4] == b'-' && f.as_bytes()[7] == b'-';
            match fields.iter().position(is_date) {
                Some(i) if i + 1 < fields.len() => {
                    let mut kept = fields.clone();
                    kept.drain(i..=i + 1);
                    kept.join(" ")
                }
                _ => line.to_owned(),
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// iotest 080 "Invalid snapshot L1 table offset/size": convert -l, amend's downgrade,
/// snapshot -a and -d fail as in qemu-img, check reports the same; the image still takes a
/// new snapshot (qemu opens it for writing), and qemu-img check finds the same afterwards.
#[test]
fn operations_needing_an_invalid_snapshot_l1_table_fail_as_in_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    // (case, offset in the entry, bytes): an unaligned table, then one of 2^28 entries.
    let cases: [(&str, u64, Vec<u8>); 2] = [
        ("offset", 0, 0x40_0200u64.to_be_bytes().to_vec()),
        ("size", 8, 0x1000_0000u32.to_be_bytes().to_vec()),
    ];
    for (case, field, bytes) in cases {
        let dirs = twin_dirs(tmp.path(), case);
        twin_image(&dirs, "compat=1.1", |path| {
            qemu_io(path, &["write 0 512"]);
            qemu_img_ok(&[&"snapshot", &"-c", &"test", &path]);
            poke(path, snapshot_table_offset(path) + field, &bytes);
        });
        assert_same_each(
            &bin,
            &dirs,
            &[
                &["convert", "-l", "test", "t.qcow2", "t.snap"],
                &["amend", "-o", "compat=0.10", "t.qcow2"],
                &["snapshot", "-a", "test", "t.qcow2"],
                &["snapshot", "-d", "test", "t.qcow2"],
                &["check", "t.qcow2"],
            ],
        );
        // info lists the snapshot (its "disk size" lines differ: the copy is not sparse).
        assert_same(&bin, &dirs, &["info", "t.qcow2"], false, true);
        // qemu opens the image for writing, and so does the personality (it refused before).
        let create = ["snapshot", "-c", "second", "t.qcow2"];
        if case == "offset" {
            assert_same_each(&bin, &dirs, &[&create, &["check", "t.qcow2"]]);
            let list = assert_same_snapshot_lists(&dirs);
            assert!(list.contains("second"), "{case}: {list}");
            continue;
        }
        // A table of 2^28 entries claims 2 GiB from its offset: qemu's overlap check refuses
        // the new snapshot's first write there and marks the image corrupt. The personality
        // never follows that table; its snapshot is judged by qemu-img instead.
        let theirs = qemu_img_as(None, &dirs[0], &create, &[]);
        assert!(
            String::from_utf8_lossy(&theirs.stderr).contains("Input/output error"),
            "{}",
            describe(&theirs)
        );
        let ours = dirs[1].join("t.qcow2");
        let before = dirs[1].join("before.qcow2");
        std::fs::copy(&ours, &before).unwrap();
        let out = qemu_img_as(Some(&bin), &dirs[1], &create, &[]);
        assert!(out.status.success(), "{}", describe(&out));
        let check = qemu_img_as(None, &dirs[1], &["check", "t.qcow2"], &[]);
        let report = describe(&check);
        assert_eq!(check.status.code(), Some(2), "{report}");
        assert!(
            report.contains("1 errors were found") && report.contains("L1 table is too large"),
            "only the invalid table is an error: {report}"
        );
        let raw = dirs[1].join("second.raw");
        qemu_img_ok(&[&"convert", &"-l", &"second", &"-O", &"raw", &ours, &raw]);
        for other in [&before, &ours] {
            qemu_img_ok(&[&"compare", &"-f", &"raw", &"-F", &"qcow2", &raw, other]);
        }
    }
}

/// iotest 080 "Invalid L2 entry (huge physical offset)": an L2 entry pointing past anything a
/// refcount block covers. qemu fails the snapshot's refcount update with EFBIG when the
/// refcount table could not list the block, else with EAGAIN; the personality fails the same
/// way and leaves the image as it was.
#[test]
fn a_snapshot_of_a_cluster_no_refcount_block_covers_fails_as_in_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    for (case, entry) in [
        ("efbig", 0xbfff_ffff_ffff_0000u64),
        ("eagain", 0x8000_00ff_ffff_0000),
    ] {
        let dirs = twin_dirs(tmp.path(), case);
        twin_image(&dirs, "compat=1.1", |path| {
            qemu_io(path, &["write 0 512"]);
            let l1 = be64(&peek(path, 40, 8));
            let l2 = be64(&peek(path, l1, 8)) & 0x00ff_ffff_ffff_fe00;
            poke(path, l2, &entry.to_be_bytes());
        });
        let ours = dirs[1].join("t.qcow2");
        let before = std::fs::read(&ours).unwrap();
        assert_same(
            &bin,
            &dirs,
            &["snapshot", "-c", "test", "t.qcow2"],
            true,
            true,
        );
        let theirs = qemu_img_as(None, &dirs[0], &["check", "t.qcow2"], &[]);
        assert_ne!(
            theirs.status.code(),
            Some(0),
            "{case}: qemu-img check of qemu's image"
        );
        assert!(
            std::fs::read(&ours).unwrap() == before,
            "{case}: the personality changed the image it refused to snapshot"
        );
    }
}

/// iotest 261 "Reject too much unknown extra data": an entry whose extra data (64 KiB) runs
/// into the next cluster. info and check fail as in qemu-img; check -r all cuts it to 1 KiB and
/// repairs the refcounts as qemu-img does, and the repaired image checks clean.
#[test]
fn too_much_extra_data_in_a_snapshot_entry_is_reported_and_repaired_as_in_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path(), "extra");
    twin_image(&dirs, "compat=1.1", |path| {
        qemu_io(path, &["write 0 64k"]);
        for name in ["sn0", "sn1", "sn2"] {
            qemu_img_ok(&[&"snapshot", &"-c", &name, &path]);
        }
        // The last entry: after two entries of 40 + 24 + 1 + 3 bytes, each padded to 72.
        let last = snapshot_table_offset(path) + 2 * 72;
        assert_eq!(&peek(path, last + 40 + 24, 4), b"3sn2", "entry layout");
        poke(path, last + 36, &0x1_0000u32.to_be_bytes());
    });
    assert_same_each(
        &bin,
        &dirs,
        &[
            &["info", "t.qcow2"],
            &["snapshot", "-l", "t.qcow2"],
            &["check", "t.qcow2"],
            &["check", "-r", "all", "t.qcow2"],
            &["check", "t.qcow2"],
        ],
    );
    assert_qemu_check_clean(&dirs[1].join("t.qcow2"), "after check -r all");
    // The cut entry keeps its place; its id and name were read after the 64 KiB of extra
    // data, so they are empty (zeros), in qemu-img's repair as in the personality's.
    let list = assert_same_snapshot_lists(&dirs);
    assert_eq!(list.lines().count(), 2 + 3, "{list}");
}

/// iotest 261 "Too many snapshots": a v2 header declaring 131,072 all-zero entries, the first
/// one past the limit with an L1 and an L2 table. Open fails ("Snapshot table too large"),
/// check fails with qemu's hint, check -r all discards the 65,536 overhanging entries and
/// frees what they held, exactly as qemu-img does.
#[test]
fn more_than_65536_snapshots_are_discarded_by_check_repair_as_in_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path(), "many");
    let table = 1u64 << 20;
    twin_image(&dirs, "compat=0.10", |path| {
        poke(path, 64, &table.to_be_bytes());
        poke(path, 60, &0x2_0000u32.to_be_bytes());
        let end = table + 40 * 0x2_0000;
        set_file_len(path, end);
        give_entry_tables(path, table + 40 * 0x1_0000, table, end); // entry 65536
    });
    assert_same_each(
        &bin,
        &dirs,
        &[
            // Every open refuses it, as qemu's.
            &["info", "t.qcow2"],
            &["map", "t.qcow2"],
            &["compare", "t.qcow2", "t.qcow2"],
            &["convert", "-O", "raw", "t.qcow2", "t.raw"],
            &["measure", "-O", "qcow2", "t.qcow2"],
            &["resize", "t.qcow2", "+1M"],
            &["snapshot", "-l", "t.qcow2"],
            &["snapshot", "-c", "x", "t.qcow2"],
            // check opens it, reports it, and -r all repairs it.
            &["check", "t.qcow2"],
            &["check", "-r", "all", "t.qcow2"],
            &["check", "t.qcow2"],
        ],
    );
    let ours = dirs[1].join("t.qcow2");
    assert_qemu_check_clean(&ours, "after check -r all");
    assert_eq!(be32(&peek(&ours, 60, 4)), 0x1_0000, "header count");
    let list = assert_same_snapshot_lists(&dirs);
    assert_eq!(
        list.lines().count(),
        0x1_0000 + 2,
        "header lines + 65536 snapshots"
    );
}

/// iotest 261 "Snapshot table too big": entries of 1 KiB extra data and 64 KiB id and name,
/// one more than fit in 64 MiB, the last with an L1 and an L2 table. Open and check fail with
/// qemu's hint naming the one overhanging entry; check -r all drops it as qemu-img does.
#[test]
fn a_snapshot_table_over_64_mib_is_reported_and_repaired_as_in_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    let dirs = twin_dirs(tmp.path(), "big");
    let table = 1u64 << 20;
    // Fixed part: id and name of 65535 bytes each, 1 KiB of extra data (all zeros).
    let mut fixed = [0u8; 40];
    fixed[12..16].copy_from_slice(&[0xff; 4]);
    fixed[36..40].copy_from_slice(&1024u32.to_be_bytes());
    let entry_len = 40 + 1024 + 65535 + 65535 + 2;
    let count = (64u64 << 20) / entry_len + 1;
    twin_image(&dirs, "compat=1.1", |path| {
        poke(path, 64, &table.to_be_bytes());
        for i in 0..count {
            poke(path, table + i * entry_len, &fixed);
        }
        let end = table + count * entry_len;
        set_file_len(path, end);
        give_entry_tables(path, table + (count - 1) * entry_len, table, end); // the last entry
        poke(path, 60, &(count as u32).to_be_bytes());
    });
    assert_same_each(
        &bin,
        &dirs,
        &[
            &["info", "t.qcow2"],
            &["check", "t.qcow2"],
            &["check", "-r", "all", "t.qcow2"],
            &["check", "t.qcow2"],
        ],
    );
    let ours = dirs[1].join("t.qcow2");
    assert_qemu_check_clean(&ours, "after check -r all");
    assert_eq!(
        u64::from(be32(&peek(&ours, 60, 4))),
        count - 1,
        "header count"
    );
}

/// The table an open image holds is the one on disk, after every snapshot operation (the
/// image reads it once at open and keeps it up to date), including entries qemu-img wrote
/// without the extra data v3 needs.
#[test]
fn the_held_snapshot_table_follows_every_operation() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("t.qcow2");
    crate::util::qemu_create_qcow2(&path, "", "64M");
    qemu_io(&path, &["write 0 64k"]);
    qemu_img_ok(&[&"snapshot", &"-c", &"by-qemu", &path]);
    let on_disk = |path: &Path| {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(path).unwrap();
        let header = imagefmt::qcow2::HeaderCluster::read_from(&file)
            .unwrap()
            .header;
        imagefmt::qcow2::snapshot::read_table(
            |buf: &mut [u8], at: u64| {
                buf.fill(0);
                let _ = file.read_at(buf, at);
                Ok(())
            },
            header.snapshots_offset,
            header.nb_snapshots,
        )
        .unwrap()
    };
    let mut image = imagefmt::ops::snapshot::open(&path).unwrap();
    assert_eq!(image.snapshot_table(), &on_disk(&path));
    image.create_snapshot("a", (1, 2)).unwrap();
    assert_eq!(image.snapshot_table(), &on_disk(&path));
    image.create_snapshot("b", (3, 4)).unwrap();
    image.delete_snapshot("by-qemu").unwrap();
    assert_eq!(image.snapshot_table(), &on_disk(&path));
    image.apply_snapshot("a").unwrap();
    assert_eq!(image.snapshot_table(), &on_disk(&path));
    image.flush().unwrap();
    drop(image);
    assert_qemu_check_clean(&path, "after the operations");
    let list = qemu_img_ok(&[&"snapshot", &"-l", &path]);
    assert!(
        list.contains(" a ") && list.contains(" b ") && !list.contains("by-qemu"),
        "{list}"
    );
}

/// A snapshot table qemu does not open fails every `amend`, as qemu-img opens the image (and
/// reads the table) before it looks at the options: also an amend that only rewrites the
/// header (`lazy_refcounts`, or nothing at all), and one of a dirty image, whose repair would
/// otherwise mend the table first. The personality answers as qemu-img does and, like it,
/// leaves the image as it was.
#[test]
fn every_amend_fails_on_a_snapshot_table_qemu_does_not_open() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = personality_dir(tmp.path());
    /// Too much extra data in the first entry.
    fn extra_data(path: &Path) {
        poke(
            path,
            snapshot_table_offset(path) + 36,
            &0x1_0000u32.to_be_bytes(),
        );
    }
    /// The table's offset off the cluster boundary.
    fn unaligned(path: &Path) {
        poke(path, 64, &(snapshot_table_offset(path) + 512).to_be_bytes());
    }
    // (case, creation options (lazy refcounts: the image is left dirty), damage, amend options)
    type Damage = fn(&Path);
    let cases: [(&str, &str, Damage, &str); 5] = [
        ("extra lazy", "compat=1.1", extra_data, "lazy_refcounts=on"),
        ("extra same compat", "compat=1.1", extra_data, "compat=1.1"),
        (
            "unaligned lazy",
            "compat=1.1",
            unaligned,
            "lazy_refcounts=on",
        ),
        (
            "extra dirty",
            "lazy_refcounts=on",
            extra_data,
            "lazy_refcounts=off",
        ),
        (
            "extra dirty v2",
            "lazy_refcounts=on",
            extra_data,
            "compat=0.10",
        ),
    ];
    for (case, options, damage, amend) in cases {
        let dirs = twin_dirs(tmp.path(), case);
        twin_image(&dirs, options, |path| {
            qemu_io(path, &["write 0 64k"]);
            qemu_img_ok(&[&"snapshot", &"-c", &"sn0", &path]);
            if options.contains("lazy_refcounts") {
                // Dirty, as a crash with lazy refcounts leaves it (incompatible bit 0).
                poke(path, 79, &[1]);
            }
            damage(path);
        });
        let before = std::fs::read(dirs[1].join("t.qcow2")).unwrap();
        let args = ["amend", "-o", amend, "t.qcow2"];
        let theirs = qemu_img_as(None, &dirs[0], &args, &[]);
        assert!(
            String::from_utf8_lossy(&theirs.stderr).contains("Could not open 't.qcow2'"),
            "{case}: qemu-img did not refuse to open: {}",
            describe(&theirs)
        );
        assert_same(&bin, &dirs, &args, true, true);
        assert!(
            std::fs::read(dirs[1].join("t.qcow2")).unwrap() == before,
            "{case}: the personality changed the image"
        );
    }
}
