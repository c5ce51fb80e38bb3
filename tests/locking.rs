//! Image locks against real processes: qemu-io, qemu-img and qemu-system-x86_64 (TCG) on one
//! side, cowclone on the other, in both directions; and the concurrency matrix of issue 12
//! (commit‖commit into one base, commit‖rebase of one overlay, resize‖convert) with real
//! processes started together.
//!
//! Holding is never timed: qemu-io is kept open on a pipe and is known to hold its locks once
//! it prints its prompt; qemu-system is known to once its QMP greeting arrives; cowclone holds a
//! written image while `COWCLONE_HOLD_LOCKS` is set, until its stdin closes, after saying so on
//! stderr.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};

use crate::util::{
    assert_qemu_check_clean, cowclone, cowclone_bin, describe, qemu_img_ok, qemu_info_json,
    qemu_io_ok, qemu_overlay,
};

const WRITE_LOCK: &str = "Failed to get \"write\" lock";
const SHARED_WRITE_LOCK: &str = "Failed to get shared \"write\" lock";

/// A process that holds an image until dropped (stdin closed, then waited for or killed).
pub(crate) struct Holder {
    child: Option<Child>,
    stdin: Option<ChildStdin>,
    what: String,
}

impl Holder {
    /// `qemu-io [-r] path`, kept open on a pipe; returns once qemu-io has opened the image
    /// (its first prompt), i.e. once it holds its locks.
    pub(crate) fn qemu_io(path: &Path, read_only: bool) -> Self {
        let mut command = Command::new("qemu-io");
        if read_only {
            command.arg("-r");
        }
        command.arg(path);
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("qemu-io not found ({e}): install the Debian package qemu-utils")
            });
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut byte = [0u8; 1];
        while !seen.ends_with(b"qemu-io> ") {
            match stdout.read(&mut byte) {
                Ok(1) => seen.push(byte[0]),
                _ => {
                    let mut err = String::new();
                    child.stderr.take().unwrap().read_to_string(&mut err).ok();
                    panic!("qemu-io {} did not open it: {err}", path.display());
                }
            }
        }
        // Keep draining stdout so that qemu-io never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let stdin = child.stdin.take();
        Self {
            child: Some(child),
            stdin,
            what: format!("qemu-io {}", path.display()),
        }
    }

    /// `cowclone resize path +size` with `COWCLONE_HOLD_LOCKS`: returns once cowclone says it
    /// holds the resized image (and so its write locks, and shared-read locks on its backing
    /// chain).
    fn cowclone_resize(path: &Path, size: &str) -> Self {
        let mut child = Command::new(cowclone_bin())
            .args(["resize".as_ref(), path.as_os_str(), size.as_ref()])
            .env("COWCLONE_HOLD_LOCKS", "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cowclone runs");
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        stderr.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("cowclone: holding "),
            "cowclone resize did not hold {}: {line}",
            path.display()
        );
        let stdin = child.stdin.take();
        Self {
            child: Some(child),
            stdin,
            what: format!("cowclone resize {}", path.display()),
        }
    }

    /// `qemu-system-x86_64 -accel tcg -S` with `disk` attached read-write (qcow2 over its backing
    /// chain) to a virtio-blk device; returns once QMP greets, by which time the machine is built
    /// and the disk's locks are held.
    fn qemu_system(disk: &Path) -> Self {
        let drive = format!("file={},format=qcow2,if=virtio", disk.display());
        let mut child = Command::new("qemu-system-x86_64")
            .args([
                "-accel",
                "tcg",
                "-S",
                "-nodefaults",
                "-display",
                "none",
                "-m",
                "64",
                "-qmp",
                "stdio",
                "-drive",
                &drive,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "qemu-system-x86_64 not found ({e}): install the Debian package qemu-system-x86"
                )
            });
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut greeting = String::new();
        stdout.read_line(&mut greeting).unwrap();
        if !greeting.contains("\"QMP\"") {
            let mut err = String::new();
            child.stderr.take().unwrap().read_to_string(&mut err).ok();
            panic!("qemu-system-x86_64 did not start: {greeting}{err}");
        }
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        let mut stdin = child.stdin.take().unwrap();
        stdin
            .write_all(b"{\"execute\":\"qmp_capabilities\"}\n")
            .unwrap();
        Self {
            child: Some(child),
            stdin: Some(stdin),
            what: format!("qemu-system-x86_64 with {}", disk.display()),
        }
    }

    /// Lets go: quits the process (closing stdin; QMP `quit` for qemu-system) and asserts that it
    /// exited successfully.
    fn release(mut self) -> Output {
        if let Some(mut stdin) = self.stdin.take() {
            if self.what.starts_with("qemu-system") {
                stdin.write_all(b"{\"execute\":\"quit\"}\n").ok();
            }
        }
        let child = self.child.take().expect("not released twice");
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{} failed: {}",
            self.what,
            describe(&output)
        );
        output
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        // A test that failed while holding: do not leave the process behind.
        drop(self.stdin.take());
        if let Some(mut child) = self.child.take() {
            if child.try_wait().ok().flatten().is_none() {
                child.kill().ok();
                child.wait().ok();
            }
        }
    }
}

/// A base with a data pattern and a qcow2 overlay on it with another pattern, both made by
/// qemu-img/qemu-io.
fn base_and_overlay(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let overlay = dir.join("overlay.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &base, &"64M"]);
    qemu_io_ok(&[&"-c", &"write -P 0x11 0 4M", &base]);
    qemu_overlay("base.qcow2", &overlay);
    qemu_io_ok(&[&"-c", &"write -P 0x22 1M 2M", &overlay]);
    (base, overlay)
}

fn virtual_size(path: &Path) -> u64 {
    qemu_info_json(path)["virtual-size"].as_u64().unwrap()
}

/// Asserts that cowclone `args` failed with qemu's lock message for `lock` naming `image`.
fn assert_refused(args: &[&dyn AsRef<std::ffi::OsStr>], lock: &str, image: &Path) {
    let output = cowclone(args);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let line = format!(
        "{lock}: Is another process using the image [{}]?",
        image.display()
    );
    assert!(
        !output.status.success() && stderr.contains(&line),
        "cowclone {:?} was not refused with {line:?}: {}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        describe(&output)
    );
    assert_eq!(stderr.lines().count(), 1, "the error is one line: {stderr}");
}

fn assert_ok(args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
    let output = cowclone(args);
    assert!(
        output.status.success(),
        "cowclone {:?} failed: {}",
        args.iter()
            .map(|a| a.as_ref().to_owned())
            .collect::<Vec<_>>(),
        describe(&output)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[test]
fn qemu_io_writing_an_image_refuses_every_cowclone_write_and_plain_reads() {
    let dir = tempfile::tempdir().unwrap();
    let (base, overlay) = base_and_overlay(dir.path());
    let other = dir.path().join("other.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &other, &"64M"]);
    let size = virtual_size(&overlay);
    let holder = Holder::qemu_io(&overlay, false);

    assert_refused(&[&"resize", &overlay, &"+1M"], WRITE_LOCK, &overlay);
    assert_refused(&[&"commit", &overlay], WRITE_LOCK, &overlay);
    assert_refused(&[&"rebase", &"-b", &other, &overlay], WRITE_LOCK, &overlay);
    assert_refused(
        &[&"rebase", &"-u", &"-b", &other, &"-F", &"qcow2", &overlay],
        WRITE_LOCK,
        &overlay,
    );
    assert_refused(&[&"check", &"-r", &"all", &overlay], WRITE_LOCK, &overlay);
    assert_refused(
        &[&"create", &"-q", &"--overwrite", &overlay, &"1M"],
        WRITE_LOCK,
        &overlay,
    );
    assert_refused(
        &[
            &"convert",
            &"-O",
            &"qcow2",
            &"--overwrite",
            &other,
            &overlay,
        ],
        WRITE_LOCK,
        &overlay,
    );
    assert_refused(
        &[&"amend", &"-o", &"lazy_refcounts=on", &overlay],
        WRITE_LOCK,
        &overlay,
    );
    // Reads refuse as qemu-img's do...
    let dd_input = format!("if={}", overlay.display());
    let dd_output = format!("of={}", dir.path().join("dd.raw").display());
    assert_refused(&[&"dd", &dd_input, &dd_output], SHARED_WRITE_LOCK, &overlay);
    assert_refused(&[&"info", &overlay], SHARED_WRITE_LOCK, &overlay);
    assert_refused(&[&"check", &overlay], SHARED_WRITE_LOCK, &overlay);
    assert_refused(&[&"map", &overlay], SHARED_WRITE_LOCK, &overlay);
    // ...unless -U, like qemu-img -U.
    assert!(assert_ok(&[&"info", &"-U", &overlay]).contains("file format: qcow2"));
    assert_ok(&[&"info", &"-U", &"--backing-chain", &overlay]);
    assert_ok(&[&"check", &"-U", &overlay]);
    assert_ok(&[&"map", &"-U", &overlay]);
    assert_ok(&[&"dd", &"-U", &dd_input, &dd_output]);
    assert_ok(&[
        &"convert",
        &"-U",
        &"-O",
        &"raw",
        &overlay,
        &dir.path().join("copy.raw"),
    ]);
    // Creating an overlay reads the backing file's header under no lock, as qemu-img create
    // does: both may stack a new image on one in use.
    assert_ok(&[
        &"create",
        &"-q",
        &"-b",
        &overlay,
        &"-F",
        &"qcow2",
        &dir.path().join("ours.qcow2"),
    ]);
    qemu_overlay(&overlay, &dir.path().join("theirs.qcow2"));
    // The base is only read by qemu-io: reading it is fine, writing it is not.
    assert_ok(&[&"info", &base]);
    assert_refused(&[&"resize", &base, &"+1M"], WRITE_LOCK, &base);

    holder.release();
    assert_eq!(
        virtual_size(&overlay),
        size,
        "a refused resize changed the image"
    );
    assert_qemu_check_clean(&overlay, "overlay after the refusals");
    qemu_io_ok(&[&"-r", &"-c", &"read -P 0x22 1M 2M", &overlay]);
    // The refusals were the locks': with qemu-io gone the same command goes ahead.
    assert_ok(&[&"resize", &overlay, &"+1M"]);
    assert_eq!(virtual_size(&overlay), size + (1 << 20));
}

#[test]
fn qemu_io_reading_the_base_refuses_a_commit_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let (base, overlay) = base_and_overlay(dir.path());
    let holder = Holder::qemu_io(&base, true);
    assert_refused(&[&"commit", &overlay], WRITE_LOCK, &base);
    holder.release();
    // Nothing was committed and the overlay was not emptied.
    qemu_io_ok(&[&"-r", &"-c", &"read -P 0x11 1M 2M", &base]);
    qemu_io_ok(&[&"-r", &"-c", &"read -P 0x22 1M 2M", &overlay]);
    assert_qemu_check_clean(&base, "base");
    assert_qemu_check_clean(&overlay, "overlay");
}

#[test]
fn cowclone_writing_an_image_refuses_qemu_img_and_qemu_io() {
    let dir = tempfile::tempdir().unwrap();
    let (base, overlay) = base_and_overlay(dir.path());
    let size = virtual_size(&overlay);
    let holder = Holder::cowclone_resize(&overlay, "+1M");

    let qemu_refused = |program: &str, args: &[&str], lock: &str| {
        let output = Command::new(program)
            .args(args)
            .output()
            .expect("the qemu tools run (Debian package qemu-utils)");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(lock) && stderr.contains("Is another process using the image"),
            "{program} {args:?} was not refused with {lock:?}: {}",
            describe(&output)
        );
    };
    let ov = overlay.to_str().unwrap();
    qemu_refused("qemu-img", &["resize", ov, "+2M"], WRITE_LOCK);
    qemu_refused("qemu-io", &["-c", "write -P 0x33 0 64k", ov], WRITE_LOCK);
    qemu_refused("qemu-img", &["info", ov], SHARED_WRITE_LOCK);
    qemu_refused("qemu-img", &["check", ov], SHARED_WRITE_LOCK);
    // The backing file is held for shared reading: qemu may read it but not write it.
    let b = base.to_str().unwrap();
    qemu_refused("qemu-img", &["resize", b, "+1M"], WRITE_LOCK);
    qemu_img_ok(&[&"info", &base]);
    // -U reads while cowclone writes, as with any writer.
    qemu_img_ok(&[&"info", &"-U", &overlay]);

    holder.release();
    assert_eq!(virtual_size(&overlay), size + (1 << 20));
    assert_qemu_check_clean(&overlay, "overlay resized while qemu was refused");
    // qemu-io's refused write left nothing behind.
    qemu_io_ok(&[&"-r", &"-c", &"read -P 0x11 0 64k", &overlay]);
}

#[test]
fn a_running_qemu_system_holds_its_clone_against_every_cowclone_write() {
    let dir = tempfile::tempdir().unwrap();
    let (base, clone) = base_and_overlay(dir.path());
    let other = dir.path().join("other.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &other, &"64M"]);
    let vm = Holder::qemu_system(&clone);

    assert_refused(&[&"resize", &clone, &"+1M"], WRITE_LOCK, &clone);
    assert_refused(&[&"commit", &clone], WRITE_LOCK, &clone);
    assert_refused(&[&"rebase", &"-b", &other, &clone], WRITE_LOCK, &clone);
    assert_refused(&[&"check", &"-r", &"leaks", &clone], WRITE_LOCK, &clone);
    assert_refused(
        &[&"create", &"-q", &"--overwrite", &clone, &"1M"],
        WRITE_LOCK,
        &clone,
    );
    assert_refused(
        &[&"convert", &"-O", &"qcow2", &"--overwrite", &other, &clone],
        WRITE_LOCK,
        &clone,
    );
    // The VM reads the base: writing it is refused, reading it is not.
    assert_refused(&[&"resize", &base, &"+1M"], WRITE_LOCK, &base);
    assert_ok(&[&"info", &base]);
    // Reads of the running clone refuse as qemu-img's do; -U reads.
    assert_refused(&[&"info", &clone], SHARED_WRITE_LOCK, &clone);
    assert_refused(&[&"compare", &clone, &base], SHARED_WRITE_LOCK, &clone);
    assert!(assert_ok(&[&"info", &"-U", &clone]).contains("backing file: base.qcow2"));
    assert_ok(&[&"map", &"-U", &clone]);
    let copy = dir.path().join("copy.raw");
    assert_ok(&[&"convert", &"-U", &"-O", &"raw", &clone, &copy]);
    // qemu-img agrees about what the VM holds.
    let refused = Command::new("qemu-img")
        .args(["info".as_ref(), clone.as_os_str()])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&refused.stderr).contains(SHARED_WRITE_LOCK));

    vm.release();
    assert_qemu_check_clean(&clone, "clone after the VM");
    assert_qemu_check_clean(&base, "base after the VM");
    qemu_io_ok(&[&"-r", &"-c", &"read -P 0x22 1M 2M", &clone]);
    qemu_img_ok(&[&"compare", &"-q", &clone, &copy]);
}

/// What one process of a race did.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    Refused,
}

/// Starts every command at once (all spawned before any is waited for) and returns each one's
/// outcome; anything but success or qemu's lock error fails the test.
fn race(commands: &[Vec<std::ffi::OsString>]) -> Vec<Outcome> {
    let children: Vec<Child> = commands
        .iter()
        .map(|args| {
            Command::new(cowclone_bin())
                .args(args)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("cowclone runs")
        })
        .collect();
    children
        .into_iter()
        .zip(commands)
        .map(|(child, args)| {
            let output = child.wait_with_output().unwrap();
            let stderr = String::from_utf8_lossy(&output.stderr);
            if output.status.success() {
                Outcome::Done
            } else if stderr.contains(WRITE_LOCK) || stderr.contains(SHARED_WRITE_LOCK) {
                assert!(stderr.contains("Is another process using the image ["));
                Outcome::Refused
            } else {
                panic!("cowclone {args:?} failed otherwise: {}", describe(&output));
            }
        })
        .collect()
}

fn os(args: &[&dyn AsRef<std::ffi::OsStr>]) -> Vec<std::ffi::OsString> {
    args.iter().map(|a| a.as_ref().to_owned()).collect()
}

const RUNS: usize = 5;

#[test]
fn commit_and_commit_of_two_clones_into_one_base_lose_nothing() {
    let mut tally = Vec::new();
    for run in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &base, &"64M"]);
        let clones = ["a.qcow2", "b.qcow2"].map(|name| dir.path().join(name));
        for (i, clone) in clones.iter().enumerate() {
            qemu_img_ok(&[
                &"create",
                &"-q",
                &"-f",
                &"qcow2",
                &"-b",
                &"base.qcow2",
                &"-F",
                &"qcow2",
                clone,
            ]);
            let write = format!("write -P {} {}M 16M", 0xa1 + i, i * 32);
            qemu_io_ok(&[&"-c", &write, clone]);
        }
        let outcomes = race(&[os(&[&"commit", &clones[0]]), os(&[&"commit", &clones[1]])]);
        assert_qemu_check_clean(&base, &format!("run {run}: base"));
        for (i, (clone, outcome)) in clones.iter().zip(&outcomes).enumerate() {
            assert_qemu_check_clean(clone, &format!("run {run}: clone {i}"));
            let read = format!("read -P {} {}M 16M", 0xa1 + i, i * 32);
            match outcome {
                // Committed: the data is in the base (and the clone still reads it).
                Outcome::Done => qemu_io_ok(&[&"-r", &"-c", &read, &base]),
                // Refused: nothing of it reached the base, and the clone still has its data.
                Outcome::Refused => {
                    let zeros = format!("read -P 0 {}M 16M", i * 32);
                    qemu_io_ok(&[&"-r", &"-c", &zeros, &base])
                }
            };
            qemu_io_ok(&[&"-r", &"-c", &read, clone]);
        }
        tally.push(outcomes);
    }
    eprintln!("commit‖commit outcomes over {RUNS} runs: {tally:?}");
}

#[test]
fn commit_and_rebase_of_one_overlay_keep_its_guest_content() {
    let mut tally = Vec::new();
    for run in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        let (base, overlay) = base_and_overlay(dir.path());
        qemu_io_ok(&[&"-c", &"write -P 0x44 8M 16M", &overlay]);
        let other = dir.path().join("other.qcow2");
        qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &other, &"64M"]);
        qemu_io_ok(&[&"-c", &"write -P 0x55 0 32M", &other]);
        let reference = dir.path().join("reference.raw");
        qemu_img_ok(&[&"convert", &"-O", &"raw", &overlay, &reference]);
        let outcomes = race(&[
            os(&[&"commit", &overlay]),
            os(&[&"rebase", &"-b", &"other.qcow2", &"-F", &"qcow2", &overlay]),
        ]);
        for image in [&overlay, &base, &other] {
            assert_qemu_check_clean(image, &format!("run {run}: {}", image.display()));
        }
        // Whoever won, the overlay's guest content is what it was.
        qemu_img_ok(&[&"compare", &overlay, &reference]);
        tally.push(outcomes);
    }
    eprintln!("commit‖rebase outcomes over {RUNS} runs: {tally:?}");
}

#[test]
fn resize_and_convert_of_one_image_agree_with_qemu() {
    let mut tally = Vec::new();
    for run in 0..RUNS {
        let dir = tempfile::tempdir().unwrap();
        let image = dir.path().join("image.qcow2");
        qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &image, &"64M"]);
        qemu_io_ok(&[&"-c", &"write -P 0x66 0 32M", &image]);
        let reference = dir.path().join("reference.raw");
        qemu_img_ok(&[&"convert", &"-O", &"raw", &image, &reference]);
        let copy = dir.path().join("copy.qcow2");
        let outcomes = race(&[
            os(&[&"resize", &image, &"+64M"]),
            os(&[&"convert", &"-O", &"qcow2", &image, &copy]),
        ]);
        assert_qemu_check_clean(&image, &format!("run {run}: image"));
        let grown = virtual_size(&image) == 128 << 20;
        assert_eq!(
            grown,
            outcomes[0] == Outcome::Done,
            "run {run}: {outcomes:?}"
        );
        qemu_img_ok(&[&"compare", &image, &reference]);
        if outcomes[1] == Outcome::Done {
            assert_qemu_check_clean(&copy, &format!("run {run}: copy"));
            qemu_img_ok(&[&"compare", &copy, &reference]);
        } else {
            assert!(
                !copy.exists(),
                "run {run}: a refused convert left its output"
            );
        }
        tally.push(outcomes);
    }
    eprintln!("resize‖convert outcomes over {RUNS} runs: {tally:?}");
}

#[test]
fn an_image_that_is_its_own_backing_file_is_a_loop_not_a_lock() {
    // One process opening one file twice meets its own locks; that must not be reported as
    // another process using the image.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("loop.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &image, &"1M"]);
    qemu_img_ok(&[
        &"rebase",
        &"-u",
        &"-b",
        &"loop.qcow2",
        &"-F",
        &"qcow2",
        &image,
    ]);
    for args in [
        &[&"resize" as &dyn AsRef<std::ffi::OsStr>, &image, &"+1M"][..],
        &[&"commit", &image],
        &[&"rebase", &"-b", &"", &image],
        &[&"info", &"--backing-chain", &image],
        &[&"map", &image],
    ] {
        let output = cowclone(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success()
                && stderr.contains("backing chain loops back to")
                && !stderr.contains("lock"),
            "{}",
            describe(&output)
        );
    }
}

/// The OFD locks the kernel lists for `path` in /proc/locks: (READ/WRITE, first byte, last byte).
fn ofd_locks(path: &Path) -> Vec<(String, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let inode = std::fs::metadata(path).unwrap().ino();
    let table = std::fs::read_to_string("/proc/locks").expect("/proc/locks is readable");
    let mut locks: Vec<(String, u64, u64)> = table
        .lines()
        .filter_map(|line| {
            // "1: OFDLCK ADVISORY READ -1 08:01:1234 100 101"
            let f: Vec<&str> = line.split_whitespace().collect();
            let owner = f.get(5)?;
            if f.get(1) != Some(&"OFDLCK") || owner.rsplit(':').next() != Some(&*inode.to_string())
            {
                return None;
            }
            Some((f[3].to_owned(), f[6].parse().ok()?, f[7].parse().ok()?))
        })
        .collect();
    locks.sort();
    locks
}

#[test]
fn cowclone_places_the_lock_bytes_qemu_places() {
    // The same chain twice: qemu-io holds one for writing, cowclone the other; the kernel's
    // lock table must show the same bytes on the overlays and on the bases.
    let dir = tempfile::tempdir().unwrap();
    let theirs_dir = dir.path().join("qemu");
    let ours_dir = dir.path().join("cowclone");
    std::fs::create_dir(&theirs_dir).unwrap();
    std::fs::create_dir(&ours_dir).unwrap();
    let (their_base, their_overlay) = base_and_overlay(&theirs_dir);
    let (our_base, our_overlay) = base_and_overlay(&ours_dir);

    let qemu = Holder::qemu_io(&their_overlay, false);
    let ours = Holder::cowclone_resize(&our_overlay, "+0");
    let (their_top, their_below) = (ofd_locks(&their_overlay), ofd_locks(&their_base));
    let (our_top, our_below) = (ofd_locks(&our_overlay), ofd_locks(&our_base));
    ours.release();
    qemu.release();

    // qemu-io read-write: holds 100, 101, 103; does not share 201, 203. Its backing file:
    // holds 100; does not share 201, 203. All shared (READ) locks.
    assert!(
        !their_top.is_empty() && !their_below.is_empty(),
        "qemu-io took no locks?"
    );
    let bytes = |locks: &[(String, u64, u64)]| -> Vec<u64> {
        locks
            .iter()
            .flat_map(|(kind, first, last)| {
                assert_eq!(kind, "READ");
                *first..=*last
            })
            .collect()
    };
    assert_eq!(bytes(&our_top), bytes(&their_top), "writer's bytes");
    assert_eq!(
        bytes(&our_below),
        bytes(&their_below),
        "backing file's bytes"
    );
    assert_eq!(bytes(&our_top), [100, 101, 103, 201, 203]);
    assert_eq!(bytes(&our_below), [100, 201, 203]);
}
