//! Reflink clones (`clone --method reflink|auto`) on real btrfs and XFS filesystems, made in
//! files with `mkfs.btrfs` / `mkfs.xfs -m reflink=1` and loop-mounted for the test (root
//! needed; unmounted and detached again by a drop guard), and refused on the temporary
//! directory's filesystem (ext4 here), where `auto` falls back to an overlay.
//!
//! Sharing is measured by the filesystems' own tools: the used space `df` reports before and
//! after 100 clones, the `shared` flag `filefrag -v` prints for every extent of a clone, and
//! (btrfs) the exclusive bytes of `btrfs filesystem du`. Independence is checked with qemu-io
//! writes and `qemu-img compare` / `qemu-img check`.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::util::*;

/// Size of the data written into each base: 100 full copies (3.2 GiB) could not fit in the
/// 512 MiB test filesystem, so merely succeeding already shows sharing.
const BASE_DATA: u64 = 32 << 20;
/// Filesystem image size (sparse; XFS wants at least 300 MiB).
const FS_SIZE: &str = "512M";
/// Clones per test.
const CLONES: usize = 100;

/// Runs `program args`, asserting success (a missing program fails naming `package`).
fn sh_ok(program: &str, package: &str, args: &[&dyn AsRef<OsStr>]) -> String {
    let output = run(program, package, None, args);
    assert!(
        output.status.success(),
        "{} failed: {}",
        command_line(program, args),
        describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A filesystem made in a file and loop-mounted; unmounted and its loop device detached on drop.
pub(crate) struct LoopFs {
    kind: &'static str,
    /// Where it is mounted.
    pub(crate) mount: PathBuf,
    device: String,
    _tmp: tempfile::TempDir,
}

impl LoopFs {
    /// Makes a `kind` filesystem (btrfs or xfs) in a sparse file and mounts it.
    pub(crate) fn new(kind: &'static str) -> LoopFs {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join(format!("{kind}.img"));
        let mount = tmp.path().join("mnt");
        std::fs::create_dir(&mount).unwrap();
        sh_ok("truncate", "coreutils", &[&"-s", &FS_SIZE, &image]);
        match kind {
            "btrfs" => sh_ok("mkfs.btrfs", "btrfs-progs", &[&"-q", &image]),
            _ => sh_ok(
                "mkfs.xfs",
                "xfsprogs",
                &[&"-q", &"-m", &"reflink=1", &image],
            ),
        };
        let device = sh_ok("losetup", "mount", &[&"--find", &"--show", &image])
            .trim()
            .to_owned();
        let fs = LoopFs {
            kind,
            mount,
            device,
            _tmp: tmp,
        };
        sh_ok("mount", "mount", &[&fs.device, &fs.mount]);
        fs
    }

    /// Bytes in use on the filesystem, after flushing (btrfs accounts lazily).
    fn used(&self) -> u64 {
        sh_ok("sync", "coreutils", &[&"-f", &self.mount]);
        let out = sh_ok("df", "coreutils", &[&"-B1", &"--output=used", &self.mount]);
        out.lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .unwrap_or_else(|| panic!("df printed {out:?}"))
    }
}

impl Drop for LoopFs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg(&self.mount)
            .status();
        let _ = std::process::Command::new("losetup")
            .args(["-d", &self.device])
            .status();
    }
}

/// `cowclone ARGS --home HOME --output json`, parsed.
fn json_in(home: &Path, args: &[&dyn AsRef<OsStr>]) -> Value {
    let mut all = args.to_vec();
    all.extend([&"--home" as &dyn AsRef<OsStr>, &home, &"--output", &"json"]);
    serde_json::from_str(&cowclone_ok(&all)).expect("cowclone printed JSON")
}

/// A base of `format` (raw or qcow2) in `dir` with [`BASE_DATA`] bytes of patterned data,
/// written by qemu-io.
fn make_base(dir: &Path, format: &str) -> PathBuf {
    let base = dir.join(format!("base.{format}"));
    qemu_img_ok(&[&"create", &"-q", &"-f", &format, &base, &"64M"]);
    for (k, pattern) in ["0x11", "0x22", "0x33", "0x44"].iter().enumerate() {
        let write = format!("write -P {pattern} {}M 8M", k as u64 * 16);
        qemu_io_ok(&[&"-f", &format, &"-c", &write, &base]);
    }
    base
}

/// The extents `filefrag -v` lists for `path` that hold data, and how many of them are flagged
/// shared.
fn shared_extents(path: &Path) -> (usize, usize) {
    let out = sh_ok("filefrag", "e2fsprogs", &[&"-v", &path]);
    let extents: Vec<&str> = out
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()) && l.contains(':'))
        .collect();
    let shared = extents.iter().filter(|l| l.contains("shared")).count();
    (extents.len(), shared)
}

/// The whole scenario on one filesystem for one base format: 100 reflink clones share the
/// base's extents; a write into one clone changes neither the base nor a sibling.
fn reflink_clones_share_and_stay_independent(fs: &LoopFs, format: &str) {
    let home = fs.mount.join(format!("home-{format}"));
    let base = make_base(&fs.mount, format);
    json_in(&home, &[&"base", &"register", &"deb", &base]);
    let clones_dir = fs.mount.join(format!("clones-{format}"));
    let used_before = fs.used();
    let made = json_in(
        &home,
        &[
            &"clone",
            &"deb",
            &"c",
            &"--count",
            &CLONES.to_string(),
            &"--method",
            &"reflink",
            &"--dir",
            &clones_dir,
        ],
    );
    let used_after = fs.used();
    assert_eq!(made["method"], "reflink", "{made:#}");
    let clones = made["clones"].as_array().unwrap();
    assert_eq!(clones.len(), CLONES);
    let path_of = |i: usize| PathBuf::from(clones[i]["path"].as_str().unwrap());
    for clone in clones {
        assert_eq!(clone["format"], format, "{clone:#}");
        assert!(clone["parent"].is_null(), "a copy reads through nothing");
    }

    // Almost nothing allocated: 100 clones together take less than a tenth of one copy of the
    // base's data (metadata, directories, registry rows).
    let grown = used_after.saturating_sub(used_before);
    eprintln!(
        "{format} on {}: {CLONES} reflink clones of {} MiB data: filesystem use grew by {grown} bytes",
        fs.kind,
        BASE_DATA >> 20
    );
    assert!(
        grown < BASE_DATA / 10,
        "{CLONES} clones grew use by {grown} bytes"
    );
    for i in [0, CLONES / 2, CLONES - 1] {
        let (extents, shared) = shared_extents(&path_of(i));
        assert!(extents > 0, "clone {i} has no extents");
        assert_eq!(shared, extents, "clone {i}: not every extent is shared");
    }

    // Identical to the base, clean.
    let compare = |a: &Path, b: &Path| {
        qemu_img(&[&"compare", &"-f", &format, &"-F", &format, &a, &b])
            .status
            .code()
    };
    assert_eq!(compare(&path_of(0), &base), Some(0));
    if format == "qcow2" {
        assert_qemu_check_clean(&path_of(0), "reflink clone");
    }

    // A write into clone 0 stays there.
    qemu_io_ok(&[&"-f", &format, &"-c", &"write -P 0xab 20M 1M", &path_of(0)]);
    qemu_io_ok(&[&"-f", &format, &"-c", &"read -P 0xab 20M 1M", &path_of(0)]);
    assert_eq!(
        compare(&path_of(0), &base),
        Some(1),
        "the write is not visible in the clone"
    );
    assert_eq!(compare(&path_of(1), &base), Some(0), "the sibling changed");
    let read_base = "read -P 0x22 16M 8M";
    qemu_io_ok(&[&"-f", &format, &"-r", &"-c", &read_base, &base]);
    qemu_io_ok(&[&"-f", &format, &"-r", &"-c", &read_base, &path_of(1)]);
    if format == "qcow2" {
        assert_qemu_check_clean(&path_of(0), "written reflink clone");
        assert_qemu_check_clean(&base, "base after the clones");
    }
}

/// btrfs only: `btrfs filesystem du` counts what only one file holds.
fn btrfs_exclusive_bytes(dir: &Path) -> u64 {
    let out = sh_ok(
        "btrfs",
        "btrfs-progs",
        &[&"filesystem", &"du", &"-s", &"--raw", &dir],
    );
    // "     Total   Exclusive  Set shared  Filename" then one line of numbers.
    let line = out.lines().nth(1).unwrap_or_else(|| panic!("{out}"));
    line.split_whitespace()
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("btrfs filesystem du printed {out:?}"))
}

#[test]
fn reflink_clones_on_btrfs_share_extents_and_stay_independent() {
    let fs = LoopFs::new("btrfs");
    for format in ["raw", "qcow2"] {
        reflink_clones_share_and_stay_independent(&fs, format);
        let exclusive = btrfs_exclusive_bytes(&fs.mount.join(format!("clones-{format}")));
        eprintln!(
            "btrfs {format}: exclusive bytes of {CLONES} clones after one 1 MiB write: {exclusive}"
        );
        // One clone wrote 1 MiB of its own (plus qcow2 metadata it rewrote); the other 99 own
        // nothing.
        assert!(
            (1 << 20..4 << 20).contains(&exclusive),
            "exclusive {exclusive}"
        );
    }
    // Extents are shared within one filesystem only: into a directory elsewhere (the
    // temporary directory's filesystem), reflink is refused naming why, and auto makes overlays.
    let elsewhere = tempfile::tempdir().unwrap();
    let home = fs.mount.join("home-raw");
    let output = cowclone(&[
        &"clone",
        &"deb",
        &"x",
        &"--method",
        &"reflink",
        &"--dir",
        &elsewhere.path(),
        &"--home",
        &home,
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(stderr.contains("different filesystems"), "{stderr}");
    let made = json_in(
        &home,
        &[
            &"clone",
            &"deb",
            &"y",
            &"--method",
            &"auto",
            &"--dir",
            &elsewhere.path(),
        ],
    );
    assert_eq!(made["method"], "overlay", "{made:#}");
}

#[test]
fn reflink_clones_on_xfs_share_extents_and_stay_independent() {
    let fs = LoopFs::new("xfs");
    for format in ["raw", "qcow2"] {
        reflink_clones_share_and_stay_independent(&fs, format);
    }
}

/// The temporary directory's filesystem (ext4 here) has no reflinks: `--method reflink` is
/// refused naming why and leaves nothing behind; `auto` makes a qcow2 overlay instead.
#[test]
fn without_reflinks_reflink_is_refused_and_auto_makes_an_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    let df = sh_ok("df", "coreutils", &[&"--output=fstype", &tmp.path()]);
    let fstype = df.lines().nth(1).unwrap_or("").trim().to_owned();
    assert!(
        !["btrfs", "xfs", "bcachefs", "ocfs2", "nfs4"].contains(&fstype.as_str()),
        "this test needs a temporary directory without reflinks, found {fstype}"
    );
    let home = tmp.path().join("home");
    let base = make_base(tmp.path(), "raw");
    json_in(&home, &[&"base", &"register", &"deb", &base]);
    let output = cowclone(&[
        &"clone",
        &"deb",
        &"r",
        &"--method",
        &"reflink",
        &"--home",
        &home,
    ]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{}", describe(&output));
    assert!(
        stderr.contains("cannot share extents") && stderr.contains("--method overlay"),
        "{stderr}"
    );
    assert!(
        dir_entries(&home.join("clones")).is_empty(),
        "a refused clone left files"
    );
    let made = json_in(&home, &[&"clone", &"deb", &"a", &"--method", &"auto"]);
    assert_eq!(made["method"], "overlay", "{made:#}");
    let clone = PathBuf::from(made["clones"][0]["path"].as_str().unwrap());
    let info = qemu_info_json(&clone);
    assert_eq!(info["format"], "qcow2");
    assert_eq!(info["backing-filename-format"], "raw");
    assert_qemu_check_clean(&clone, "auto overlay");
    let compare = qemu_img(&[&"compare", &"-F", &"raw", &clone, &base]);
    assert_eq!(compare.status.code(), Some(0), "{}", describe(&compare));
}

/// `bench clone` measures `reflink` for real on XFS: not skipped, every clone as long as the
/// base and (by `st_blocks`) as allocated, yet owning no extent of its own, unlike the full
/// copy; the overlays own what they allocate. The kept clones are checked by qemu-img.
#[test]
fn bench_clone_measures_reflinks_on_xfs() {
    let fs = LoopFs::new("xfs");
    let keep = fs.mount.join("bench");
    let stdout = cowclone_ok(&[
        &"bench",
        &"clone",
        &"--count",
        &"3",
        &"--size",
        &"32M",
        &"--methods",
        &"native-qcow2,qemu-img,copy,reflink",
        &"--output",
        &"json",
        &"--keep",
        &keep,
    ]);
    let report: Value = serde_json::from_str(&stdout).expect("bench printed JSON");
    let results = report["results"]
        .as_array()
        .unwrap_or_else(|| panic!("no results array in {stdout}"));
    let by = |name: &str| {
        results
            .iter()
            .find(|r| r["method"] == name)
            .unwrap_or_else(|| panic!("no {name} in {stdout}"))
            .clone()
    };
    let reflink = by("reflink");
    assert!(reflink["skipped"].is_null(), "{reflink}");
    let base = keep.join("base.qcow2");
    let base_len = file_len(&base);
    assert_eq!(reflink["apparent-bytes"], base_len, "{reflink}");
    assert!(reflink["allocated-bytes"].as_u64().unwrap() >= 32 << 20);
    assert_eq!(reflink["unshared-bytes"], 0, "{reflink}");
    let copy = by("copy");
    assert!(
        copy["unshared-bytes"].as_u64().unwrap() >= 32 << 20,
        "{copy}"
    );
    let native = by("native-qcow2");
    assert_eq!(native["unshared-bytes"], native["allocated-bytes"]);
    for round in 0..3 {
        let clone = keep.join(format!("reflink-{round}.qcow2"));
        assert_eq!(shared_extents(&clone).0, shared_extents(&clone).1);
        assert_qemu_check_clean(&clone, "bench reflink");
        let compare = qemu_img(&[&"compare", &"-f", &"qcow2", &"-F", &"qcow2", &clone, &base]);
        assert_eq!(compare.status.code(), Some(0), "{}", describe(&compare));
    }
}

/// A reflink of a qcow2 clone is a copy of the overlay, so it reads through the clone's base:
/// its record's parent is that base (the backing file qemu-img finds in its header), it reads
/// like its source, and removing it leaves the source and base alone.
#[test]
fn a_reflink_of_an_overlay_reads_through_the_overlays_base() {
    let fs = LoopFs::new("btrfs");
    let home = fs.mount.join("home");
    let base = make_base(&fs.mount, "qcow2");
    json_in(&home, &[&"base", &"register", &"deb", &base]);
    let clones = fs.mount.join("clones");
    let overlay = json_in(&home, &[&"clone", &"deb", &"ov", &"--dir", &clones]);
    let overlay = PathBuf::from(overlay["clones"][0]["path"].as_str().unwrap());
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0x77 40M 1M", &overlay]);
    let made = json_in(
        &home,
        &[
            &"clone",
            &"ov",
            &"rf",
            &"--method",
            &"reflink",
            &"--dir",
            &clones,
        ],
    );
    let record = &made["clones"][0];
    assert_eq!(record["parent"], "deb", "{made:#}");
    let copy = PathBuf::from(record["path"].as_str().unwrap());
    let info = qemu_info_json(&copy);
    assert_eq!(
        info["backing-filename"].as_str().unwrap(),
        base.to_str().unwrap()
    );
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert_qemu_check_clean(&copy, "reflink of an overlay");
    let compare = qemu_img(&[&"compare", &copy, &overlay]);
    assert_eq!(compare.status.code(), Some(0), "{}", describe(&compare));
    cowclone_ok(&[&"rm", &"rf", &"--home", &home]);
    assert!(!copy.exists() && overlay.exists() && base.exists());
    let compare = qemu_img(&[&"compare", &overlay, &base]);
    assert_eq!(
        compare.status.code(),
        Some(1),
        "the overlay's own write is still there"
    );
}

/// A `clone --method reflink` killed (SIGKILL, at the fault-injection points) after a clone's
/// file appeared but before the commit leaves no record and a directory holding a complete
/// `disk.raw`, which `gc` removes; killed after the commit, the clones are registered and
/// complete.
#[test]
fn a_killed_reflink_clone_leaves_what_gc_removes_or_complete_clones() {
    let fs = LoopFs::new("xfs");
    let home = fs.mount.join("home");
    let base = make_base(&fs.mount, "raw");
    json_in(&home, &[&"base", &"register", &"deb", &base]);
    let clones = fs.mount.join("clones");
    let kill_at = |point: &str, name: &str| {
        let output = std::process::Command::new(cowclone_bin())
            .args([
                "clone", "deb", name, "--count", "3", "--method", "reflink", "--dir",
            ])
            .arg(&clones)
            .arg("--home")
            .arg(&home)
            .env("COWCLONE_CRASH_AT", point)
            .output()
            .unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(output.status.signal(), Some(9), "{}", describe(&output));
    };
    kill_at("after-create:1", "a");
    let listed = json_in(&home, &[&"ls"]);
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "only the base: {listed:#}"
    );
    let left = dir_entries(&clones);
    assert_eq!(left, ["a-1", "a-2"], "directories of the two clones made");
    let raw = clones.join("a-1/disk.raw");
    assert_eq!(file_len(&raw), file_len(&base), "complete, never partial");
    let report = json_in(&home, &[&"gc"]);
    let removed: Vec<&str> = report["removed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        removed,
        [clones.join("a-1"), clones.join("a-2")].map(|p| p.to_string_lossy().into_owned()),
        "{report:#}"
    );
    assert!(dir_entries(&clones).is_empty());
    kill_at("after-commit:2", "b");
    let listed = json_in(&home, &[&"ls"]);
    assert_eq!(listed.as_array().unwrap().len(), 4, "{listed:#}");
    for i in 1..=3 {
        let clone = clones.join(format!("b-{i}/disk.raw"));
        let compare = qemu_img(&[&"compare", &"-f", &"raw", &"-F", &"raw", &clone, &base]);
        assert_eq!(compare.status.code(), Some(0), "{}", describe(&compare));
    }
}
