//! The registry end to end: real SQLite files in temporary homes, real images checked with
//! `qemu-img`, the CLI's JSON parsed, 8 processes cloning at once, and processes killed with
//! SIGKILL at fault-injection points and at random moments, then reconciled by `gc`.

use std::collections::BTreeSet;
use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use imagefmt::backing::BackingPolicy;
use imagefmt::chain::ChainOptions;
use imagefmt::extent::GuestRead;
use imagefmt::offsets::GuestOffset;
use serde_json::Value;

use crate::util::*;

/// `cowclone ARGS --home HOME`, asserting success; returns stdout.
pub(crate) fn ok_in(home: &Path, args: &[&dyn AsRef<OsStr>]) -> String {
    let mut all = args.to_vec();
    all.push(&"--home");
    all.push(&home);
    cowclone_ok(&all)
}

/// `cowclone ARGS --home HOME --output json`, parsed.
pub(crate) fn json_in(home: &Path, args: &[&dyn AsRef<OsStr>]) -> Value {
    let mut all = args.to_vec();
    all.extend([&"--output" as &dyn AsRef<OsStr>, &"json"]);
    let stdout = ok_in(home, &all);
    serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "{}: no JSON ({e}): {stdout}",
            command_line("cowclone", args)
        )
    })
}

/// `cowclone ARGS --home HOME`, expected to fail with a one-line error; returns the line.
pub(crate) fn err_in(home: &Path, args: &[&dyn AsRef<OsStr>]) -> String {
    let mut all = args.to_vec();
    all.push(&"--home");
    all.push(&home);
    let output = cowclone(&all);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "{} succeeded: {}",
        command_line("cowclone", &all),
        describe(&output)
    );
    assert!(
        stderr.starts_with("cowclone: ") && stderr.lines().count() == 1,
        "not one line: {stderr:?}"
    );
    stderr
}

/// Every record of `cowclone ls --output json`.
pub(crate) fn ls(home: &Path) -> Vec<Value> {
    json_in(home, &[&"ls"])
        .as_array()
        .expect("ls prints an array")
        .clone()
}

fn names_of(records: &[Value], kind: &str) -> BTreeSet<String> {
    records
        .iter()
        .filter(|r| r["kind"] == kind)
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect()
}

/// A 4 MiB qcow2 base with data, made by qemu-img.
pub(crate) fn qcow2_base(dir: &Path) -> PathBuf {
    let base = dir.join("base.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &base, &"4M"]);
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0x5a 0 1M", &base]);
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0xa5 3M 64k", &base]);
    base
}

/// Asserts that the registry's clones and the clone directories on disk match exactly, that
/// every clone passes `qemu-img check` and reads like `base`, and that no temp file is left.
fn assert_consistent(home: &Path, base: &Path, context: &str) -> Vec<Value> {
    let records = ls(home);
    // Every record's own directory (clones, and bases promoted from clones) is on disk, and
    // nothing else is.
    let claimed: BTreeSet<String> = records
        .iter()
        .filter_map(|r| r["dir"].as_str())
        .map(|d| {
            Path::new(d)
                .file_name()
                .unwrap()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    let on_disk: BTreeSet<String> = dir_entries(&home.join("clones")).into_iter().collect();
    assert_eq!(
        claimed, on_disk,
        "{context}: records and clone directories differ"
    );
    for record in records.iter().filter(|r| r["kind"] == "clone") {
        let path = PathBuf::from(record["path"].as_str().unwrap());
        assert!(path.is_file(), "{context}: {} has no file", record["name"]);
        assert_qemu_check_clean(&path, context);
        assert_no_temp_files(path.parent().unwrap(), context);
    }
    if let Some(first) = records.iter().find(|r| r["kind"] == "clone") {
        let path = first["path"].as_str().unwrap();
        let out = qemu_img(&[&"compare", &path, &base]);
        assert_eq!(out.status.code(), Some(0), "{context}: {}", describe(&out));
    }
    records
}

#[test]
fn base_and_clone_lifecycle_through_the_cli() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());

    let record = json_in(
        &home,
        &[
            &"base",
            &"register",
            &"deb12",
            &base,
            &"--memory",
            &"2G",
            &"--cpus",
            &"2",
            &"--meta",
            &"os=debian",
            &"--sha256",
        ],
    );
    assert_eq!(record["format"], "qcow2");
    assert_eq!(record["virtual_size"], 4 << 20);
    assert_eq!(record["memory"], 2u64 << 30);
    assert_eq!(record["meta"]["os"], "debian");
    assert_eq!(record["fingerprint"]["size"], file_len(&base));
    assert_eq!(
        std::fs::metadata(&base).unwrap().permissions().mode() & 0o222,
        0,
        "a registered base is read-only"
    );
    let sha = String::from_utf8(
        Command::new("sha256sum")
            .arg(&base)
            .output()
            .expect("sha256sum (coreutils)")
            .stdout,
    )
    .unwrap();
    assert_eq!(record["sha256"].as_str().unwrap(), &sha[..64]);
    assert!(
        std::fs::metadata(home.join("registry.sqlite"))
            .unwrap()
            .len()
            > 0
    );

    // Refusals: duplicate name, same file again, an image with a backing file.
    err_in(&home, &[&"base", &"register", &"deb12", &base]);
    let again = err_in(&home, &[&"base", &"register", &"other", &base]);
    assert!(again.contains("already registered as \"deb12\""), "{again}");
    let overlay = tmp.path().join("overlay.qcow2");
    qemu_img_ok(&[
        &"create", &"-q", &"-f", &"qcow2", &"-b", &base, &"-F", &"qcow2", &overlay,
    ]);
    let backed = err_in(&home, &[&"base", &"register", &"ov", &overlay]);
    assert!(backed.contains("--allow-backing"), "{backed}");
    ok_in(
        &home,
        &[&"base", &"register", &"ov", &overlay, &"--allow-backing"],
    );
    ok_in(&home, &[&"base", &"rm", &"ov"]);
    assert_ne!(
        std::fs::metadata(&overlay).unwrap().permissions().mode() & 0o200,
        0,
        "base rm gives a registered-in-place file its mode back"
    );

    // Clones: --count, then a clone of a clone.
    let made = json_in(&home, &[&"clone", &"deb12", &"web", &"--count", &"3"]);
    let clones = made["clones"].as_array().unwrap();
    let names: Vec<&str> = clones.iter().map(|c| c["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["web-1", "web-2", "web-3"]);
    let nested = json_in(&home, &[&"clone", &"web-2", &"db"]);
    assert_eq!(nested["clones"][0]["parent"], "web-2");
    let db = PathBuf::from(nested["clones"][0]["path"].as_str().unwrap());
    assert_eq!(
        qemu_info_json(&db)["backing-filename"],
        clones[1]["path"],
        "a clone of a clone reads through its parent clone"
    );
    let records = assert_consistent(&home, &base, "after cloning");
    let web2 = records.iter().find(|r| r["name"] == "web-2").unwrap();
    assert_eq!(web2["guarded"], true, "a clone with clones is guarded");
    assert!(records.iter().all(|r| r.get("state").is_some()));

    // The library view the hypervisor drivers use.
    let registry = cloner::Registry::open(&cloner::Home::at(&home)).unwrap();
    let vm = registry.clone_record("db").unwrap();
    let chain: Vec<&str> = vm.chain.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(chain, ["web-2", "deb12"]);
    assert_eq!((vm.memory, vm.cpus), (Some(2 << 30), Some(2)));
    assert_eq!(vm.image, db);
    drop(registry);

    // Removal rules.
    let refused = err_in(&home, &[&"base", &"rm", &"deb12"]);
    assert!(refused.contains("web-1, web-2, web-3"), "{refused}");
    let refused = err_in(&home, &[&"rm", &"web-2"]);
    assert!(refused.contains("db"), "{refused}");
    ok_in(&home, &[&"rm", &"db"]);
    assert!(
        !db.parent().unwrap().exists(),
        "rm deletes the clone's directory"
    );
    let web2_path = PathBuf::from(clones[1]["path"].as_str().unwrap());
    assert_ne!(
        std::fs::metadata(&web2_path).unwrap().permissions().mode() & 0o200,
        0,
        "a clone whose last clone is removed is writable again"
    );

    // Promote: web-3 becomes base "web-golden"; clone it.
    ok_in(&home, &[&"promote", &"web-3", &"web-golden"]);
    let shown = json_in(&home, &[&"base", &"show", &"web-golden"]);
    assert_eq!(shown["kind"], "base");
    assert_eq!(shown["parent"], "deb12");
    ok_in(&home, &[&"clone", &"web-golden", &"from-promoted"]);
    let verify = json_in(&home, &[&"base", &"verify", &"web-golden"]);
    assert_eq!(verify["ok"], true);
    assert_consistent(&home, &base, "after promote");

    ok_in(&home, &[&"base", &"rm", &"deb12", &"--with-clones"]);
    assert!(ls(&home).is_empty());
    assert_eq!(dir_entries(&home.join("clones")), Vec::<String>::new());

    // The audit log has every change, refusals included.
    let log = json_in(&home, &[&"log"]);
    let ops: Vec<(String, String)> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["operation"].as_str().unwrap().to_owned(),
                e["outcome"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    for expected in [
        ("base-register", "ok"),
        ("base-register", "error"),
        ("clone", "ok"),
        ("rm", "ok"),
        ("rm", "error"),
        ("promote", "ok"),
        ("base-verify", "ok"),
        ("base-rm", "error"),
        ("base-rm", "ok"),
    ] {
        assert!(
            ops.contains(&(expected.0.to_owned(), expected.1.to_owned())),
            "{expected:?} missing from {ops:?}"
        );
    }
    assert_eq!(log[0]["arguments"]["name"], "deb12");
}

#[test]
fn a_modified_base_is_refused_with_what_changed() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    ok_in(&home, &[&"clone", &"b", &"before"]);

    // Root ignores the read-only mode; the fingerprint does not. Rewrite the L1 table (data
    // mapping metadata) in place, size unchanged.
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0x11 2M 64k", &base]);
    let refused = err_in(&home, &[&"clone", &"b", &"after"]);
    assert!(refused.contains("\"b\" was modified"), "{refused}");
    assert!(
        refused.contains("mtime")
            && (refused.contains("metadata crc32") || refused.contains("size")),
        "{refused}"
    );
    assert!(!home.join("clones/after").exists());

    let output = cowclone(&[
        &"base",
        &"verify",
        &"b",
        &"--output",
        &"json",
        &"--home",
        &home,
    ]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    let verify: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verify["ok"], false);
    assert!(verify["changes"].as_str().unwrap().contains("mtime"));

    // A size-only change (appended bytes) is named as such.
    let tmp2 = tempfile::tempdir().unwrap();
    let home2 = tmp2.path().join("home");
    let raw = tmp2.path().join("disk.raw");
    write_pattern_file(&raw, 1 << 20);
    ok_in(
        &home2,
        &[&"base", &"register", &"r", &raw, &"--format", &"raw"],
    );
    let mut perms = std::fs::metadata(&raw).unwrap().permissions();
    perms.set_mode(0o644);
    std::fs::set_permissions(&raw, perms).unwrap();
    std::fs::OpenOptions::new()
        .append(true)
        .open(&raw)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &[1u8; 512]))
        .unwrap();
    let refused = err_in(&home2, &[&"clone", &"r", &"x"]);
    assert!(refused.contains("size 1048576 -> 1049088"), "{refused}");
}

#[test]
fn vdi_bases_get_vdi_diffs_resolved_through_the_registry() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = tmp.path().join("base.vdi");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"vdi", &base, &"4M"]);
    qemu_io_ok(&[&"-f", &"vdi", &"-c", &"write -P 0x3c 1M 1M", &base]);
    let record = json_in(&home, &[&"base", &"register", &"win", &base]);
    assert_eq!(record["format"], "vdi");
    assert!(record["vdi"]["uuid_create"].as_str().unwrap().len() == 36);

    // A qcow2 overlay over the VDI base, checked by qemu-img.
    let q = json_in(&home, &[&"clone", &"win", &"q"]);
    let qpath = PathBuf::from(q["clones"][0]["path"].as_str().unwrap());
    assert_qemu_check_clean(&qpath, "qcow2 over VDI");
    let out = qemu_img(&[&"compare", &qpath, &base]);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));

    // VDI diff, then a VDI diff of that diff (VDI is the default over a VDI diff).
    let d1 = json_in(&home, &[&"clone", &"win", &"d1", &"--format", &"vdi"]);
    let d2 = json_in(&home, &[&"clone", &"d1", &"d2"]);
    assert_eq!(d2["clones"][0]["format"], "vdi");
    assert_eq!(
        d2["clones"][0]["vdi"]["uuid_linkage"],
        d1["clones"][0]["vdi"]["uuid_create"]
    );
    let refused = err_in(&home, &[&"clone", &"d1", &"q2", &"--format", &"qcow2"]);
    assert!(refused.contains("--format vdi"), "{refused}");

    // The grandchild reads like the base (as qemu-img converts it), parents found by UUID
    // through the registry (each clone lives in its own directory).
    let expected_raw = tmp.path().join("expected.raw");
    qemu_img_ok(&[&"convert", &"-O", &"raw", &base, &expected_raw]);
    let expected = std::fs::read(&expected_raw).unwrap();
    let registry = cloner::Registry::open(&cloner::Home::at(&home)).unwrap();
    let resolver = registry.vdi_resolver().unwrap();
    let d2_path = PathBuf::from(d2["clones"][0]["path"].as_str().unwrap());
    let policy = BackingPolicy::FollowLocal;
    let options = ChainOptions::new(&policy).with_vdi_parents(&resolver);
    let image = imagefmt::chain::open_vdi(&d2_path, &options).unwrap();
    assert_eq!(image.parent_links().len(), 2);
    let mut got = vec![0u8; expected.len()];
    image.read_at(&mut got, GuestOffset(0)).unwrap();
    assert!(got == expected, "VDI chain content differs from the base");
    let vm = registry.clone_record("d2").unwrap();
    assert_eq!(vm.chain.len(), 2);
    assert_eq!(vm.chain[1].path, base.canonicalize().unwrap());
    // The base is still valid for qemu.
    assert_eq!(qemu_img(&[&"check", &base]).status.code(), Some(0));
}

#[test]
fn gc_removes_only_what_cowclone_made_keeps_strangers_reports_missing() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    ok_in(&home, &[&"clone", &"b", &"keep"]);
    let elsewhere = tmp.path().join("elsewhere");
    ok_in(&home, &[&"clone", &"b", &"far", &"--dir", &elsewhere]);
    let clones = home.join("clones");
    // A real orphan: a clone killed after its image was made, before its commit.
    let killed = spawn_in(
        &home,
        &["clone", "b", "lost"],
        Some((cloner::registry::clones::CRASH_ENV, "after-create:0")),
    )
    .wait_with_output()
    .unwrap();
    assert!(!killed.status.success());
    assert!(clones.join("lost/disk.qcow2").is_file());
    // Look-alikes cowclone did not make: a directory holding only a disk.qcow2, an empty one,
    // a stranger's notes, an empty directory in the other place. And a temp file in a clone
    // directory, and a record whose file is gone.
    std::fs::create_dir(clones.join("lookalike")).unwrap();
    std::fs::copy(
        clones.join("keep/disk.qcow2"),
        clones.join("lookalike/disk.qcow2"),
    )
    .unwrap();
    std::fs::create_dir(clones.join("empty")).unwrap();
    let temp = clones.join("keep/.disk.qcow2.x1.cowclone-tmp");
    std::fs::write(&temp, b"partial").unwrap();
    std::fs::create_dir(clones.join("stranger")).unwrap();
    std::fs::write(clones.join("stranger/notes.txt"), b"mine").unwrap();
    std::fs::create_dir(elsewhere.join("far-orphan")).unwrap();
    std::fs::remove_dir_all(elsewhere.join("far")).unwrap();

    let names = |report: &Value, key: &str| -> Vec<String> {
        report[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|item| {
                Path::new(item["path"].as_str().unwrap())
                    .file_name()
                    .unwrap()
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    };
    let before = dir_entries(&clones);
    let dry = json_in(&home, &[&"gc", &"--dry-run"]);
    assert_eq!(dry["dry_run"], true);
    assert_eq!(dir_entries(&clones), before, "a dry run removed something");
    assert!(temp.is_file());
    let report = json_in(&home, &[&"gc"]);
    assert_eq!(report["dry_run"], false);
    for report in [&dry, &report] {
        assert_eq!(
            names(report, "removed"),
            [".disk.qcow2.x1.cowclone-tmp", "lost"],
            "{report}"
        );
        assert_eq!(
            names(report, "kept"),
            ["empty", "lookalike", "stranger", "far-orphan"],
            "{report}"
        );
        for item in report["kept"].as_array().unwrap() {
            assert!(!item["reason"].as_str().unwrap().is_empty(), "{item}");
        }
        assert_eq!(report["missing_files"][0]["name"], "far");
    }
    assert_eq!(
        dir_entries(&clones),
        ["empty", "keep", "lookalike", "stranger"]
    );
    assert!(clones.join("lookalike/disk.qcow2").is_file());
    assert!(clones.join("keep/disk.qcow2").is_file());
    assert!(elsewhere.join("far-orphan").is_dir());
    // rm drops the record whose file is gone; a second gc finds nothing to do.
    ok_in(&home, &[&"rm", &"far"]);
    let again = json_in(&home, &[&"gc"]);
    assert_eq!(again["removed"], Value::Array(vec![]));
    assert_eq!(again["missing_files"], Value::Array(vec![]));
}

/// Spawns `cowclone ARGS --home HOME` without waiting.
fn spawn_in(home: &Path, args: &[&str], env: Option<(&str, &str)>) -> std::process::Child {
    let mut command = Command::new(cowclone_bin());
    command
        .args(args)
        .arg("--home")
        .arg(home)
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    if let Some((key, value)) = env {
        command.env(key, value);
    }
    command.spawn().expect("cowclone runs")
}

#[test]
fn eight_processes_cloning_at_once_lose_nothing_and_duplicate_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    const PER: usize = 25;
    // 8 distinct batches, then 8 processes racing for the same names.
    let mut children = Vec::new();
    for i in 0..8 {
        let prefix = format!("p{i}");
        children.push(spawn_in(
            &home,
            &["clone", "b", &prefix, "--count", &PER.to_string()],
            None,
        ));
    }
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", describe(&out));
    }
    let mut racers = Vec::new();
    for _ in 0..8 {
        racers.push(spawn_in(
            &home,
            &["clone", "b", "same", "--count", "5"],
            None,
        ));
    }
    let mut winners = 0;
    for child in racers {
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            winners += 1;
        } else {
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert!(stderr.contains("already registered"), "{stderr}");
        }
    }
    assert_eq!(winners, 1, "exactly one process gets the names");
    let records = ls(&home);
    let clones = names_of(&records, "clone");
    let expected: BTreeSet<String> = (0..8)
        .flat_map(|i| (1..=PER).map(move |n| format!("p{i}-{n}")))
        .chain((1..=5).map(|n| format!("same-{n}")))
        .collect();
    assert_eq!(clones, expected);
    assert_eq!(records.len(), expected.len() + 1, "no duplicate records");
    let paths: BTreeSet<&str> = records
        .iter()
        .map(|r| r["path"].as_str().unwrap())
        .collect();
    assert_eq!(paths.len(), records.len());
    assert_consistent(&home, &base, "after concurrent clones");
    let report = json_in(&home, &[&"gc"]);
    assert_eq!(report["removed"], Value::Array(vec![]), "{report}");
}

#[test]
fn sigkill_at_any_point_leaves_complete_clones_or_what_gc_removes() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    const BATCH: usize = 20;

    // Deterministic: the process kills itself (SIGKILL) at each injection point.
    let mut outcomes = Vec::new();
    for (i, point) in [
        "before-create:0",
        "before-create:7",
        "after-create:0",
        "after-create:19",
        "after-commit:19",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("f{i}");
        let child = spawn_in(
            &home,
            &["clone", "b", &name, "--count", &BATCH.to_string()],
            Some((cloner::registry::clones::CRASH_ENV, point)),
        );
        let out = child.wait_with_output().unwrap();
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(out.status.signal(), Some(9), "{point}: {}", describe(&out));
        outcomes.push((name, point.starts_with("after-commit")));
    }
    let leftovers = dir_entries(&home.join("clones")).len();
    assert!(
        leftovers >= BATCH + 8,
        "kills mid-batch leave unregistered images ({leftovers})"
    );

    // Random: real kill -9 after a pseudo-random delay, while a batch is being made.
    let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
    for i in 0..30 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let name = format!("k{i}");
        let mut child = spawn_in(
            &home,
            &["clone", "b", &name, "--count", &BATCH.to_string()],
            None,
        );
        std::thread::sleep(Duration::from_micros(seed % 40_000));
        let _ = child.kill();
        let _ = child.wait();
        outcomes.push((name, false));
    }

    let report = json_in(&home, &[&"gc"]);
    assert!(
        !report["removed"].as_array().unwrap().is_empty(),
        "gc removed the unregistered images: {report}"
    );
    let records = assert_consistent(&home, &base, "after kills and gc");
    let clones = names_of(&records, "clone");
    for (name, committed) in &outcomes {
        let count = (1..=BATCH)
            .filter(|n| clones.contains(&format!("{name}-{n}")))
            .count();
        assert!(
            count == 0 || count == BATCH,
            "{name}: batch half registered ({count})"
        );
        if *committed {
            assert_eq!(count, BATCH, "{name}: committed before the kill");
        }
    }
    // Each f batch killed before its commit left nothing registered.
    for name in ["f0", "f1", "f2", "f3"] {
        assert!(!clones.iter().any(|c| c.starts_with(&format!("{name}-"))));
    }
    // The registry still works, and a second gc has nothing to do.
    ok_in(&home, &[&"clone", &"b", &"after"]);
    let again = json_in(&home, &[&"gc"]);
    assert_eq!(again["removed"], Value::Array(vec![]), "{again}");
}

#[test]
fn plan_prints_a_typed_plan_and_refuses_bad_values() {
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("job.rexx");
    std::fs::write(
        &script,
        "/* rexxjs-vm-base: deb12 */\n/* rexxjs-vm-memory: 512M */\n/* rexxjs-vm-cpus: 2 */\n\
         /* rexxjs-vm-egress-ports: 443,80 */\n/* rexxjs-vm-timeout: 90s */\n/* rexxjs-vm-gpu: yes */\nsay 1\n",
    )
    .unwrap();
    let plan: Value =
        serde_json::from_str(&cowclone_ok(&[&"plan", &script, &"--output", &"json"])).unwrap();
    assert_eq!(plan["base"], "deb12");
    assert_eq!(plan["memory"], 512u64 << 20);
    assert_eq!(plan["cpus"], 2);
    assert_eq!(plan["egress_ports"], serde_json::json!([443, 80]));
    assert_eq!(plan["timeout_secs"], 90);
    assert_eq!(plan["ingress_port"], Value::Null);
    assert_eq!(plan["unknown_keys"], serde_json::json!([[6, "gpu"]]));

    std::fs::write(
        &script,
        "/* rexxjs-vm-base: deb12 */\n/* rexxjs-vm-ingress-port: 70000 */\n",
    )
    .unwrap();
    let output = cowclone(&[&"plan", &script]);
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("line 2 ingress-port") && stderr.contains("65535"),
        "{stderr}"
    );
}
