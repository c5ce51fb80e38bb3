//! The registry's safety guarantees (issue 12): guards that hold even for root, `rm` of a running
//! clone refused, `gc` and `rm` touching only what cowclone made, private file modes, `base
//! register` refusing what cannot be read in full, and operator limits for `start`/`provision`.
//! Images are made and checked with `qemu-img`/`qemu-io`, hashes taken with `sha256sum`.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

use crate::registry::{err_in, json_in, ok_in, qcow2_base};
use crate::util::*;

/// `sha256sum PATH`: the hex digest (coreutils, independent of cowclone).
fn sha256(path: &Path) -> String {
    let output = run("sha256sum", "coreutils", None, &[&path]);
    assert!(output.status.success(), "sha256sum: {}", describe(&output));
    String::from_utf8_lossy(&output.stdout)
        .split_whitespace()
        .next()
        .expect("sha256sum prints a digest")
        .to_owned()
}

/// `cowclone ARGS` with extra environment variables (no `--home` added).
fn cowclone_env(args: &[&dyn AsRef<OsStr>], env: &[(&str, &OsStr)]) -> Output {
    let mut command = Command::new(cowclone_bin());
    command.args(args.iter().map(|a| a.as_ref()));
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().expect("cowclone runs")
}

fn stderr_of(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

fn record<'a>(records: &'a [Value], name: &str) -> &'a Value {
    records
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no record {name}"))
}

#[test]
fn regression_issue_12_root_commit_of_a_clone_into_its_registered_base_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    assert_eq!(mode(&base), 0o444, "register makes the base read-only");
    ok_in(&home, &[&"clone", &"b", &"vm1"]);
    let records = crate::registry::ls(&home);
    let clone = PathBuf::from(record(&records, "vm1")["path"].as_str().unwrap());
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0x11 0 64k", &clone]);
    let before = sha256(&base);

    // Through the plain path, the home given by COWCLONE_HOME (as an operator's shell has it).
    let out = cowclone_env(&[&"commit", &clone], &[("COWCLONE_HOME", home.as_os_str())]);
    let stderr = stderr_of(&out);
    assert!(
        !out.status.success(),
        "commit went ahead: {}",
        describe(&out)
    );
    assert!(
        stderr.contains("registered base \"b\"") && stderr.contains("refusing"),
        "{stderr}"
    );
    assert_eq!(sha256(&base), before, "the base's bytes changed");
    // The clone still holds its own data (it was not emptied either).
    let compare = qemu_img(&[&"compare", &"-q", &clone, &base]);
    assert_eq!(compare.status.code(), Some(1), "{}", describe(&compare));

    // The same file under another name (a hard link), as the backing file of a stranger's
    // overlay, made by qemu-img: recognised by its inode.
    let link = tmp.path().join("alias.qcow2");
    std::fs::hard_link(&base, &link).unwrap();
    let overlay = tmp.path().join("overlay.qcow2");
    qemu_img_ok(&[
        &"create", &"-q", &"-f", &"qcow2", &"-b", &link, &"-F", &"qcow2", &overlay,
    ]);
    qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0x22 0 64k", &overlay]);
    let e = err_in(&home, &[&"commit", &overlay]);
    assert!(e.contains("registered base \"b\""), "{e}");
    // Every other writing command, on the base itself.
    for args in [
        vec!["resize", "BASE", "8M"],
        vec!["rebase", "-u", "-b", "", "BASE"],
        vec!["check", "-r", "all", "BASE"],
        vec!["create", "-f", "qcow2", "--overwrite", "BASE", "1M"],
        vec!["convert", "-O", "qcow2", "--overwrite", "OVERLAY", "BASE"],
    ] {
        let args: Vec<PathBuf> = args
            .iter()
            .map(|a| {
                if *a == "BASE" {
                    base.clone()
                } else if *a == "OVERLAY" {
                    overlay.clone()
                } else {
                    PathBuf::from(a)
                }
            })
            .collect();
        let e = err_in(&home, &args_of(&args));
        assert!(e.contains("refusing"), "{args:?}: {e}");
    }
    assert_eq!(sha256(&base), before, "the base's bytes changed");

    // A clone that has clones is protected the same way.
    ok_in(&home, &[&"clone", &"vm1", &"vm1a"]);
    let e = err_in(&home, &[&"resize", &clone, &"+1M"]);
    assert!(e.contains("clone \"vm1\" that has clones (vm1a)"), "{e}");

    // The override: loud, recorded, and it does write.
    let out = cowclone(&[
        &"commit",
        &overlay,
        &"--force-registered-write",
        &"--home",
        &home,
    ]);
    assert!(out.status.success(), "{}", describe(&out));
    assert!(stderr_of(&out).contains("WARNING"), "{}", describe(&out));
    assert_ne!(sha256(&base), before, "forced commit wrote the base");
    assert_qemu_check_clean(&base, "after a forced commit");
    let log = json_in(&home, &[&"log"]);
    let entries = log.as_array().unwrap();
    assert!(
        entries
            .iter()
            .any(|e| e["operation"] == "forced-write" && e["outcome"] == "ok"),
        "{log}"
    );
    assert!(
        entries
            .iter()
            .any(|e| e["operation"] == "write-refused" && e["outcome"] == "error"),
        "{log}"
    );
}

#[test]
fn plain_commands_create_no_registry_and_need_none() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("a.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &image, &"1M"]);
    let home = tmp.path().join("no-home");
    let out = cowclone_env(
        &[&"resize", &image, &"2M"],
        &[("COWCLONE_HOME", home.as_os_str())],
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(!home.exists(), "a registry was created for a plain command");
    assert_eq!(qemu_info_json(&image)["virtual-size"], 2 << 20);
}

#[test]
fn rm_of_a_running_clone_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    ok_in(&home, &[&"clone", &"b", &"vm"]);
    let records = crate::registry::ls(&home);
    let dir = PathBuf::from(record(&records, "vm")["dir"].as_str().unwrap());
    let pidfile = dir.join("qemu.pid");
    // A live process whose command line names the pidfile, as the qemu started for the clone
    // does (`-pidfile PATH`); `; :` keeps sh from exec-ing sleep in its place.
    let mut process = Command::new("sh")
        .arg("-c")
        .arg("sleep 600; :")
        .arg(&pidfile)
        .spawn()
        .unwrap();
    std::fs::write(&pidfile, process.id().to_string()).unwrap();
    let status = json_in(&home, &[&"status", &"vm"]);
    let refused = err_in(&home, &[&"rm", &"vm"]);
    let refused_base = err_in(&home, &[&"base", &"rm", &"b", &"--with-clones"]);
    process.kill().unwrap();
    process.wait().unwrap();
    assert_eq!(status["state"], "running", "{status}");
    assert!(refused.contains("is running"), "{refused}");
    assert!(refused_base.contains("is running"), "{refused_base}");
    assert!(
        dir.join("disk.qcow2").is_file(),
        "the running clone's disk is gone"
    );
    // Once it stopped, rm goes ahead.
    ok_in(&home, &[&"rm", &"vm"]);
    assert!(!dir.exists());
}

#[test]
fn regression_issue_12_gc_keeps_a_directory_it_did_not_make_beside_clones() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    let place = tmp.path().join("vms");
    ok_in(&home, &[&"clone", &"b", &"web", &"--dir", &place]);
    // The operator's own VM, in the same directory, holding only a disk.qcow2 (made by qemu-img).
    let important = place.join("important-vm");
    std::fs::create_dir(&important).unwrap();
    let disk = important.join("disk.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &disk, &"1M"]);
    let before = sha256(&disk);
    for args in [vec!["gc", "--dry-run"], vec!["gc"]] {
        let report = json_in(&home, &args_of(&args));
        let kept: Vec<&str> = report["kept"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["path"].as_str().unwrap())
            .collect();
        assert!(
            kept.iter().any(|p| p.ends_with("/vms/important-vm")),
            "{args:?}: {report}"
        );
        assert_eq!(report["removed"], Value::Array(vec![]), "{report}");
    }
    assert_eq!(sha256(&disk), before, "gc touched important-vm");
    // rm of the clone leaves the stranger alone too, and a file put into the clone's own
    // directory survives the clone's removal.
    std::fs::write(place.join("web/notes.txt"), b"mine").unwrap();
    ok_in(&home, &[&"rm", &"web"]);
    assert!(disk.is_file());
    assert_eq!(dir_entries(&place.join("web")), ["notes.txt"]);
}

#[test]
fn the_home_registry_clone_dirs_and_disks_are_private() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    ok_in(&home, &[&"clone", &"b", &"vm"]);
    // Hold the database open so that its -wal and -shm files exist while modes are read.
    let registry = cloner::Registry::open(&cloner::Home::at(&home)).unwrap();
    let record = registry.get("vm").unwrap();
    let dir = record.dir.clone().unwrap();
    let mut expected = vec![
        (home.clone(), 0o700),
        (home.join("clones"), 0o700),
        (home.join("registry.sqlite"), 0o600),
        (dir.clone(), 0o700),
        (record.path.clone(), 0o600),
        (base.clone(), 0o444),
    ];
    for side in ["registry.sqlite-wal", "registry.sqlite-shm"] {
        let path = home.join(side);
        assert!(path.exists(), "{side} exists while the database is open");
        expected.push((path, 0o600));
    }
    for (path, want) in &expected {
        assert_eq!(mode(path), *want, "{}", path.display());
    }
    drop(registry);
    // The clone directory (where the QMP socket and pidfile go) is private to its owner: the
    // socket path qemu gets is inside it.
    let status = json_in(&home, &[&"status", &"vm"]);
    let socket = PathBuf::from(status["qmp-socket"].as_str().unwrap());
    assert_eq!(socket.parent(), Some(dir.as_path()), "{status}");
    assert_eq!(mode(&dir), 0o700);
}

/// Sets bits in the qcow2 header's incompatible-features field (bytes 72-79, big-endian).
fn set_incompatible_bits(path: &Path, bits: u8) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, 79).unwrap();
    file.write_all_at(&[byte[0] | bits], 79).unwrap();
}

#[test]
fn regression_issue_12_base_register_refuses_what_cannot_be_read_in_full() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let make = |name: &str| -> PathBuf {
        let path = tmp.path().join(name);
        qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &path, &"1M"]);
        qemu_io_ok(&[&"-f", &"qcow2", &"-c", &"write -P 0x33 0 64k", &path]);
        path
    };
    let encrypted = tmp.path().join("encrypted.qcow2");
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"--object",
        &"secret,id=sec0,data=password",
        &"-o",
        &"encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10",
        &encrypted,
        &"1M",
    ]);
    let corrupt = make("corrupt.qcow2");
    set_incompatible_bits(&corrupt, 0x02);
    let info = qemu_info_json(&corrupt);
    assert_eq!(info["format-specific"]["data"]["corrupt"], true, "{info}");
    let dirty = make("dirty.qcow2");
    set_incompatible_bits(&dirty, 0x01);
    let unknown = make("unknown-bit.qcow2");
    set_incompatible_bits(&unknown, 0x80);
    let l1_past_eof = make("l1-past-eof.qcow2");
    {
        use std::os::unix::fs::FileExt;
        let file = std::fs::OpenOptions::new()
            .write(true)
            .open(&l1_past_eof)
            .unwrap();
        // l1_table_offset (bytes 40-47): 1 GiB, cluster-aligned, far past the end.
        file.write_all_at(&(1u64 << 30).to_be_bytes(), 40).unwrap();
    }
    // qemu-img does not read these in full either: it refuses the unknown feature bit, and its
    // check finds the L1 table past the end of the file (exit 2: corruption).
    let out = qemu_img(&[
        &"convert",
        &"-O",
        &"raw",
        &unknown,
        &tmp.path().join("out.raw"),
    ]);
    assert!(!out.status.success(), "{}", describe(&out));
    let (code, report) = qemu_check(&l1_past_eof);
    assert_eq!(code, 2, "{report}");
    for (path, reason) in [
        (&encrypted, "encrypted (LUKS)"),
        (&corrupt, "marked corrupt"),
        (&dirty, "marked dirty"),
        (&unknown, "incompatible features 0x80"),
        (
            &l1_past_eof,
            "L1 table (offset 1073741824, 8 bytes) lies past the end",
        ),
    ] {
        let mode_before = mode(path);
        let e = err_in(&home, &[&"base", &"register", &"x", path]);
        assert!(e.contains(reason), "{}: {e}", path.display());
        assert_eq!(mode(path), mode_before, "{}: mode changed", path.display());
    }
    assert_eq!(crate::registry::ls(&home), Vec::<Value>::new());
}

#[test]
fn regression_issue_12_an_unreadable_base_is_reported_as_unreadable_not_modified() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    ok_in(&home, &[&"clone", &"b", &"first"]);
    // Root reads any mode, so make the path unreadable another way: a directory in its place.
    std::fs::remove_file(&base).unwrap();
    std::fs::create_dir(&base).unwrap();
    for args in [vec!["clone", "b", "second"], vec!["base", "verify", "b"]] {
        let e = err_in(&home, &args_of(&args));
        assert!(
            e.contains("cannot be read") && e.contains("os error 21"),
            "{args:?}: {e}"
        );
        assert!(!e.contains("modified"), "{args:?}: {e}");
    }
}

#[test]
fn operator_limits_refuse_start_and_provision_beyond_them_naming_limit_and_file() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = qcow2_base(tmp.path());
    ok_in(&home, &[&"base", &"register", &"b", &base]);
    ok_in(&home, &[&"clone", &"b", &"vm"]);
    // An empty XDG config directory: no file, today's bounds.
    let xdg_empty = tmp.path().join("xdg-empty");
    std::fs::create_dir(&xdg_empty).unwrap();
    // A config in the XDG config directory, and one named by COWCLONE_CONFIG.
    let xdg = tmp.path().join("xdg");
    std::fs::create_dir_all(xdg.join("cowclone")).unwrap();
    let xdg_file = xdg.join("cowclone/config.toml");
    std::fs::write(&xdg_file, "[limits]\nmax-memory = \"1G\"\n").unwrap();
    let explicit = tmp.path().join("limits.toml");
    std::fs::write(
        &explicit,
        "[limits]\nmax-cpus = 1\nmax-run-time = \"1m\"\nallowed-egress = [\"10.0.2.2:3128\"]\n",
    )
    .unwrap();
    let start = |extra: &[&str], config: Option<&Path>, xdg: &Path| -> Output {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![
            &"start",
            &"vm",
            &"--dry-run",
            &"--accel",
            &"tcg",
            &"--home",
            &home,
        ];
        for a in extra {
            args.push(a);
        }
        let mut command = Command::new(cowclone_bin());
        command
            .args(args.iter().map(|a| a.as_ref()))
            .env("XDG_CONFIG_HOME", xdg)
            .env_remove("COWCLONE_CONFIG");
        if let Some(config) = config {
            command.env("COWCLONE_CONFIG", config);
        }
        command.output().unwrap()
    };
    let out = start(&["--memory", "2G", "--cpus", "4"], None, &xdg_empty);
    assert!(
        out.status.success(),
        "no file, no limit: {}",
        describe(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("-m 2048 -smp 4"));
    let out = start(&["--memory", "2G"], None, &xdg);
    let e = stderr_of(&out);
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        e.contains("memory 2048 MiB") && e.contains("max-memory = 1024 MiB"),
        "{e}"
    );
    assert!(e.contains(&xdg_file.display().to_string()), "{e}");
    assert!(start(&["--memory", "1G"], None, &xdg).status.success());
    let out = start(&["--cpus", "2"], Some(&explicit), &xdg);
    let e = stderr_of(&out);
    assert!(
        e.contains("max-cpus = 1") && e.contains(&explicit.display().to_string()),
        "{e}"
    );
    let out = start(
        &["--egress", "allow:example.org:443"],
        Some(&explicit),
        &xdg,
    );
    assert!(
        stderr_of(&out).contains("egress to example.org:443"),
        "{}",
        describe(&out)
    );
    let out = start(&["--egress", "allow:10.0.2.2:3128"], Some(&explicit), &xdg);
    assert!(out.status.success(), "{}", describe(&out));

    // provision: refused before anything is cloned or booted.
    for (directive, limit) in [
        ("/* rexxjs-vm-cpus: 2 */", "max-cpus = 1"),
        ("/* rexxjs-vm-timeout: 5m */", "max-run-time = 60 s"),
        (
            "/* rexxjs-vm-egress-ports: 443 */",
            "egress to 127.0.0.1:443",
        ),
    ] {
        let script = tmp.path().join("job.sh");
        std::fs::write(
            &script,
            format!("#!/bin/sh\n/* rexxjs-vm-base: b */\n{directive}\necho hi\n"),
        )
        .unwrap();
        let out = cowclone_env(
            &[&"provision", &script, &"--accel", &"tcg", &"--home", &home],
            &[("COWCLONE_CONFIG", explicit.as_os_str())],
        );
        let e = stderr_of(&out);
        assert!(!out.status.success(), "{}", describe(&out));
        assert!(
            e.contains(limit) && e.contains("limits.toml"),
            "{directive}: {e}"
        );
    }
    let names: Vec<String> = crate::registry::ls(&home)
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(names, ["b", "vm"], "a refused provision left a clone");
}
