//! Regression tests for issue 12's hostile names: backing, parent and data files that are not
//! regular files (a FIFO used to hang `info --backing-chain`, `check`, `map`, `convert` and
//! `compare` forever, even under `--confine`), and `check` opening an external data file
//! without `--allow-data-file`.
//!
//! Every command runs under a hang guard: a process still running after a minute is killed and
//! the test fails saying it hung (the guard is no timing assertion; a passing command ends in
//! milliseconds).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::util::{cowclone_bin, cowclone_ok, describe, qemu_img_in, qemu_img_ok, tool_ok_in};

/// Runs cowclone `args` in `dir`, killing it (and failing the test) if it hangs.
fn cowclone_guarded(dir: &Path, args: &[&str]) -> Output {
    let mut child = Command::new(cowclone_bin())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cowclone runs");
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().ok();
            child.wait().ok();
            panic!("cowclone {args:?} hung");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// Asserts that cowclone `args` failed with a one-line error naming `file` as a `kind`.
fn assert_refused_as(dir: &Path, args: &[&str], file: &str, kind: &str) {
    let output = cowclone_guarded(dir, args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let expected = format!("{file} is a {kind}, not a regular file");
    assert!(
        !output.status.success() && stderr.contains(&expected),
        "cowclone {args:?} was not refused with {expected:?}: {}",
        describe(&output)
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
}

fn mkfifo(path: &Path) {
    let status = Command::new("mkfifo")
        .arg(path)
        .status()
        .expect("mkfifo runs (coreutils)");
    assert!(status.success());
}

/// An overlay `ov.qcow2` in `dir` whose backing name is `name` (raw format recorded, so no
/// probing is needed to get to the open).
fn overlay_on(dir: &Path, name: &str) -> PathBuf {
    let overlay = dir.join("ov.qcow2");
    qemu_img_ok(&[
        &"create", &"-q", &"-f", &"qcow2", &"-u", &"-b", &name, &"-F", &"raw", &overlay, &"64M",
    ]);
    overlay
}

/// The five reading commands of the issue, with and without `--confine`.
fn every_reader(dir: &Path, file: &str, kind: &str) {
    let d = dir.to_str().unwrap();
    for confine in [&[][..], &["--confine", d][..]] {
        // `--confine DIR` right after the command name.
        let with = |args: &[&str]| -> Vec<String> {
            let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
            for (i, c) in confine.iter().enumerate() {
                v.insert(1 + i, c.to_string());
            }
            v
        };
        for args in [
            with(&["info", "--backing-chain", "ov.qcow2"]),
            with(&["check", "ov.qcow2"]),
            with(&["map", "ov.qcow2"]),
            with(&["convert", "-O", "raw", "ov.qcow2", "out.raw"]),
            with(&["compare", "ov.qcow2", "ov.qcow2"]),
        ] {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            assert_refused_as(dir, &args, file, kind);
        }
    }
    assert!(
        !dir.join("out.raw").exists(),
        "a refused convert left output"
    );
}

#[test]
fn issue_12_a_fifo_backing_file_is_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("fifo"));
    overlay_on(dir.path(), "fifo");
    every_reader(dir.path(), "fifo", "FIFO");
}

#[test]
fn issue_12_a_socket_backing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _listener = std::os::unix::net::UnixListener::bind(dir.path().join("sock")).unwrap();
    overlay_on(dir.path(), "sock");
    every_reader(dir.path(), "sock", "socket");
}

#[test]
fn issue_12_a_character_device_backing_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    overlay_on(dir.path(), "/dev/zero");
    for args in [
        &["info", "--backing-chain", "ov.qcow2"][..],
        &["check", "ov.qcow2"],
        &["map", "ov.qcow2"],
        &["convert", "-O", "raw", "ov.qcow2", "out.raw"],
        &["compare", "ov.qcow2", "ov.qcow2"],
    ] {
        assert_refused_as(dir.path(), args, "/dev/zero", "character device");
    }
    // Under --confine the device is outside the directory: refused before any open.
    let output = cowclone_guarded(
        dir.path(),
        &["map", "--confine", dir.path().to_str().unwrap(), "ov.qcow2"],
    );
    assert!(
        !output.status.success()
            && String::from_utf8_lossy(&output.stderr).contains("outside the allowed directory"),
        "{}",
        describe(&output)
    );
}

#[test]
fn issue_12_a_fifo_named_as_the_image_itself_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    mkfifo(&dir.path().join("img"));
    for args in [
        &["info", "img"][..],
        &["check", "img"],
        &["resize", "img", "+1M"],
    ] {
        assert_refused_as(dir.path(), args, "img", "FIFO");
    }
}

/// A qcow2 image keeping its data in `data.raw` (made by qemu-img, with one written cluster).
fn image_with_data_file(dir: &Path) {
    qemu_img_in(
        dir,
        &[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &"-o",
            &"data_file=data.raw",
            &"img.qcow2",
            &"4M",
        ],
    );
    // qemu opens a relative data file name from its working directory.
    tool_ok_in("qemu-io", dir, &["-c", "write -P 0x5a 1M 64k", "img.qcow2"]);
    assert!(dir.join("data.raw").is_file());
}

#[test]
fn issue_12_check_opens_no_data_file_without_allow_data_file() {
    let dir = tempfile::tempdir().unwrap();
    image_with_data_file(dir.path());
    // A data file that cannot be opened proves whether check tried.
    std::fs::remove_file(dir.path().join("data.raw")).unwrap();
    let output = cowclone_guarded(dir.path(), &["check", "img.qcow2"]);
    assert!(output.status.success(), "{}", describe(&output));
    let output = cowclone_guarded(dir.path(), &["check", "--allow-data-file", "img.qcow2"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("data.raw"),
        "check --allow-data-file did not try the data file: {}",
        describe(&output)
    );
    // A FIFO in its place is refused by check and map, naming it.
    mkfifo(&dir.path().join("data.raw"));
    assert_refused_as(
        dir.path(),
        &["check", "--allow-data-file", "img.qcow2"],
        "data.raw",
        "FIFO",
    );
    assert_refused_as(
        dir.path(),
        &["map", "--allow-data-file", "img.qcow2"],
        "data.raw",
        "FIFO",
    );
}

#[test]
fn issue_12_map_follows_a_data_file_only_when_allowed_and_confined() {
    let dir = tempfile::tempdir().unwrap();
    image_with_data_file(dir.path());
    let refused = cowclone_guarded(dir.path(), &["map", "img.qcow2"]);
    assert!(
        !refused.status.success()
            && String::from_utf8_lossy(&refused.stderr).contains("external data files are refused"),
        "{}",
        describe(&refused)
    );
    // Allowed: the same map as qemu-img's, mapped into the data file.
    let ours = cowclone_guarded(dir.path(), &["map", "--allow-data-file", "img.qcow2"]);
    assert!(ours.status.success(), "{}", describe(&ours));
    let theirs = tool_ok_in("qemu-img", dir.path(), &["map", "img.qcow2"]);
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout)
    );
    assert!(String::from_utf8_lossy(&ours.stdout).contains("data.raw"));
    // Confined to a directory the data file is not in: refused, naming it.
    let sub = dir.path().join("sub");
    std::fs::create_dir(&sub).unwrap();
    let output = cowclone_guarded(
        dir.path(),
        &[
            "map",
            "--allow-data-file",
            "--confine",
            sub.to_str().unwrap(),
            "img.qcow2",
        ],
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success() && stderr.contains("data.raw") && stderr.contains("outside"),
        "{}",
        describe(&output)
    );
}

#[test]
fn issue_12_a_fifo_named_as_a_vdi_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    cowclone_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"vdi",
        &dir.path().join("base.vdi"),
        &"4M",
    ]);
    cowclone_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"vdi",
        &"-b",
        &dir.path().join("base.vdi"),
        &dir.path().join("diff.vdi"),
    ]);
    mkfifo(&dir.path().join("parent-fifo"));
    assert_refused_as(
        dir.path(),
        &[
            "info",
            "--backing-chain",
            "--parent",
            "parent-fifo",
            "diff.vdi",
        ],
        "parent-fifo",
        "FIFO",
    );
}
