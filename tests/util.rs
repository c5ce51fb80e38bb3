//! Helpers shared by the integration tests: running the reference tools (`qemu-img`, `qemu-io`)
//! and the `cowclone` binary, and comparing files.
//!
//! A missing reference tool is a test failure naming the Debian package to install
//! (`qemu-utils`), never a silent skip.

use std::ffi::OsStr;
use std::io::ErrorKind;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use serde_json::Value;

/// Arguments for the process helpers: anything that is an `OsStr` (`&"x"`, `&path`, `&os_string`).
pub type Args<'a> = [&'a dyn AsRef<OsStr>];

/// Borrows a list of strings (or paths) as [`Args`].
pub fn args_of<S: AsRef<OsStr>>(items: &[S]) -> Vec<&dyn AsRef<OsStr>> {
    items.iter().map(|a| a as &dyn AsRef<OsStr>).collect()
}

/// Runs `program args` in `dir` (or the current directory) and returns its output; a program that
/// is not installed fails the test with a message naming the package that provides it.
pub fn run(program: &str, package: &str, dir: Option<&Path>, args: &Args) -> Output {
    let mut command = Command::new(program);
    command.args(args.iter().map(|a| a.as_ref()));
    if let Some(dir) = dir {
        command.current_dir(dir);
    }
    match command.output() {
        Ok(output) => output,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("{program} not found: install the Debian package {package}")
        }
        Err(e) => panic!("cannot run {program}: {e}"),
    }
}

/// A command line for messages: `qemu-img create -f qcow2 x 1G`.
pub fn command_line(program: &str, args: &Args) -> String {
    let mut line = program.to_owned();
    for arg in args {
        line.push(' ');
        line.push_str(&arg.as_ref().to_string_lossy());
    }
    line
}

/// A finished process described for a failure message.
pub fn describe(output: &Output) -> String {
    format!(
        "status {:?}\n--- stdout\n{}--- stderr\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// Runs `qemu-img` with `args`.
pub fn qemu_img(args: &Args) -> Output {
    run("qemu-img", "qemu-utils", None, args)
}

/// Runs `qemu-img` with `args` in directory `dir`.
pub fn qemu_img_in(dir: &Path, args: &Args) -> Output {
    run("qemu-img", "qemu-utils", Some(dir), args)
}

/// Runs `qemu-img` with `args`, asserts that it succeeded and returns its stdout.
pub fn qemu_img_ok(args: &Args) -> String {
    let output = qemu_img(args);
    assert!(
        output.status.success(),
        "{} failed: {}",
        command_line("qemu-img", args),
        describe(&output)
    );
    String::from_utf8(output.stdout).expect("qemu-img printed UTF-8")
}

/// `qemu-img create -q -f qcow2 -b BACKING -F qcow2 OVERLAY`: a qcow2 overlay made by qemu-img,
/// its backing name stored as given (relative names resolve against the overlay's directory).
pub fn qemu_overlay(backing: impl AsRef<OsStr>, overlay: &Path) {
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-b",
        &backing.as_ref(),
        &"-F",
        &"qcow2",
        &overlay,
    ]);
}

/// `qemu-img create -q -f qcow2 [-o OPTIONS] PATH SIZE` (no `-o` when `options` is empty);
/// asserts that it succeeded.
pub fn qemu_create_qcow2(path: &Path, options: &str, size: &str) {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"create", &"-q", &"-f", &"qcow2"];
    if !options.is_empty() {
        args.extend([&"-o" as &dyn AsRef<OsStr>, &options]);
    }
    args.extend([&path as &dyn AsRef<OsStr>, &size]);
    qemu_img_ok(&args);
}

/// Runs `qemu-img args`: cowclone's qemu-img personality (`cowclone qemu-img ARGS`) when
/// `personality`, else the real qemu-img.
pub fn qemu_img_or_personality(personality: bool, args: &Args) -> Output {
    if personality {
        let mut with_prefix: Vec<&dyn AsRef<OsStr>> = vec![&"qemu-img"];
        with_prefix.extend(args);
        cowclone(&with_prefix)
    } else {
        qemu_img(args)
    }
}

/// Takes the internal snapshot `name` of the qcow2 image `path` with VM state, as a VM's
/// `savevm` does: qemu-system-x86_64 (Debian package `qemu-system-x86`) with no machine
/// (`-M none`, TCG), the image as its only drive, `savevm` through the HMP monitor on stdin.
/// qemu-img cannot take such snapshots. Asserts that the snapshot exists afterwards.
pub fn qemu_savevm(path: &Path, name: &str) {
    use std::io::Write as _;
    // A comma in an option value is written twice.
    let file = path.display().to_string().replace(',', ",,");
    let drive = format!("if=none,id=d0,format=qcow2,file={file}");
    let mut child = match Command::new("qemu-system-x86_64")
        .args([
            "-M",
            "none",
            "-accel",
            "tcg",
            "-nodefaults",
            "-display",
            "none",
        ])
        .args(["-monitor", "stdio", "-drive", &drive])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == ErrorKind::NotFound => {
            panic!("qemu-system-x86_64 not found: install the Debian package qemu-system-x86")
        }
        Err(e) => panic!("cannot run qemu-system-x86_64: {e}"),
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin
        .write_all(format!("savevm {name}\nquit\n").as_bytes())
        .expect("writing to qemu's monitor");
    drop(stdin);
    let output = child
        .wait_with_output()
        .expect("waiting for qemu-system-x86_64");
    let list = qemu_img_ok(&[&"snapshot", &"-l", &path]);
    assert!(
        output.status.success()
            && list
                .lines()
                .any(|l| l.split_whitespace().nth(1) == Some(name)),
        "savevm {name} on {}: {}\nsnapshot -l: {list}",
        path.display(),
        describe(&output)
    );
}

/// The qcow2 image `path` opened for reading and writing, and the file offset of the first
/// entry of its snapshot table (the header's `snapshots_offset`), for tests that patch entry
/// fields qemu-img cannot set.
pub fn first_snapshot_entry(path: &Path) -> (std::fs::File, u64) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut offset = [0u8; 8];
    file.read_exact_at(&mut offset, 64).unwrap();
    (file, u64::from_be_bytes(offset))
}

/// Sets the VM state size of the first entry of the snapshot table of the qcow2 image `path`
/// as qemu writes it: the 64-bit field of the extra data, and the 32-bit field when the size
/// fits it (else 0). Asserts that the entry has the 24 bytes of extra data qemu writes.
pub fn set_first_snapshot_vm_state(path: &Path, size: u64) {
    use std::os::unix::fs::FileExt;
    let (file, table) = first_snapshot_entry(path);
    let mut extra_size = [0u8; 4];
    file.read_exact_at(&mut extra_size, table + 36).unwrap();
    assert_eq!(
        u32::from_be_bytes(extra_size),
        24,
        "qemu writes 24 bytes of extra data"
    );
    let narrow = u32::try_from(size).unwrap_or(0);
    file.write_all_at(&narrow.to_be_bytes(), table + 32)
        .unwrap(); // vm_state_size
    file.write_all_at(&size.to_be_bytes(), table + 40).unwrap(); // vm_state_size_large
}

/// `dirs[0]` for the real qemu-img, `dirs[1]` for the personality (`root/qemu`,
/// `root/cowclone`), each made and then prepared alike by `setup`.
pub fn twin_dirs(root: &Path, setup: impl Fn(&Path)) -> [PathBuf; 2] {
    let dirs = [root.join("qemu"), root.join("cowclone")];
    for dir in &dirs {
        std::fs::create_dir_all(dir).unwrap();
        setup(dir);
    }
    dirs
}

/// [`twin_dirs`] under `tmp/case`, left empty.
pub fn case_twin_dirs(tmp: &Path, case: &str) -> [PathBuf; 2] {
    twin_dirs(&tmp.join(case), |_| {})
}

/// `t.qcow2`, 64 MiB, created by qemu-img with `options` and `edit`ed in `dirs[0]`, then
/// copied to `dirs[1]` (the same bytes, snapshot dates included).
pub fn twin_image(dirs: &[PathBuf; 2], options: &str, edit: impl Fn(&Path)) {
    let path = dirs[0].join("t.qcow2");
    qemu_create_qcow2(&path, options, "64M");
    edit(&path);
    std::fs::copy(&path, dirs[1].join("t.qcow2")).unwrap();
}

/// Runs the real qemu-img with `args` in both twin directories (after each tool worked on its
/// twin); asserts the same exit code, stdout and stderr. Returns qemu-img's output for
/// `dirs[0]`.
pub fn assert_qemu_img_judges_twins_alike(dirs: &[PathBuf; 2], args: &[&str]) -> Output {
    let [theirs, ours] = dirs.clone().map(|dir| qemu_img_in(&dir, &args_of(args)));
    let line = args.join(" ");
    assert_eq!(
        (
            ours.status.code(),
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&ours.stderr)
        ),
        (
            theirs.status.code(),
            String::from_utf8_lossy(&theirs.stdout),
            String::from_utf8_lossy(&theirs.stderr)
        ),
        "qemu-img {line}: the personality's result (left) against qemu-img's (right)"
    );
    theirs
}

/// Runs `qemu-io` with `args`, asserts that it succeeded and returns its stdout. (qemu-io reports
/// some I/O errors on stdout with exit status 0, so its output is checked for them too.)
pub fn qemu_io_ok(args: &Args) -> String {
    let output = run("qemu-io", "qemu-utils", None, args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success() && !stdout.contains("failed"),
        "{} failed: {}",
        command_line("qemu-io", args),
        describe(&output)
    );
    stdout
}

/// `qemu-img info --output=json path`.
pub fn qemu_info_json(path: &Path) -> Value {
    let stdout = qemu_img_ok(&[&"info", &"--output=json", &path]);
    serde_json::from_str(&stdout).expect("qemu-img info printed JSON")
}

/// `qemu-img check --output=json path`: the exit code (0 clean, 1 not completed, 2 corruption,
/// 3 leaks only) and stdout.
pub fn qemu_check(path: &Path) -> (i32, String) {
    let output = qemu_img(&[&"check", &"--output=json", &path]);
    (
        output.status.code().expect("qemu-img check was not killed"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
    )
}

/// Asserts that `qemu-img check` finds no corruption, no leak and no check error in `path`.
/// `context` names the case in the failure message.
pub fn assert_qemu_check_clean(path: &Path, context: &str) {
    let (code, stdout) = qemu_check(path);
    assert_eq!(
        code,
        0,
        "{context}: qemu-img check {} exited {code}: {stdout}",
        path.display()
    );
    let report: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("{context}: qemu-img check printed no JSON ({e}): {stdout}"));
    for key in ["corruptions", "leaks", "check-errors", "corruptions-fixed"] {
        let count = report
            .get(key)
            .map_or(0, |v| v.as_u64().unwrap_or(u64::MAX));
        assert_eq!(
            count,
            0,
            "{context}: qemu-img check {} reports {key}: {stdout}",
            path.display()
        );
    }
}

/// Asserts that `qemu-img compare` finds `a` and `b` (any formats) identical in guest content.
/// `context` names the case in the failure message.
pub fn assert_same_content(a: &Path, b: &Path, context: &str) {
    let output = qemu_img(&[&"compare", &a, &b]);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{context}: qemu-img compare {} {}: {}",
        a.display(),
        b.display(),
        describe(&output)
    );
}

/// `qemu-img map --output=json` of `path` with host offsets left out and neighbours that became
/// equal merged: which guest ranges are data, zero, compressed or unallocated, at what depth,
/// wherever the clusters lie in the file.
pub fn qemu_map_shape(path: &Path) -> Vec<Value> {
    let out = qemu_img_ok(&[&"map", &"--output=json", &path]);
    let entries: Vec<Value> = serde_json::from_str(&out).expect("qemu-img map JSON");
    let mut merged: Vec<Value> = Vec::new();
    for mut entry in entries {
        entry.as_object_mut().unwrap().remove("offset");
        if let Some(last) = merged.last_mut() {
            let same = ["depth", "present", "zero", "data", "compressed"]
                .iter()
                .all(|k| last[k] == entry[k]);
            if same {
                let length = last["length"].as_u64().unwrap() + entry["length"].as_u64().unwrap();
                last["length"] = length.into();
                continue;
            }
        }
        merged.push(entry);
    }
    merged
}

/// The workspace root (the tests crate is one of its members).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The `cowclone` binary of this workspace, built once per test process.
///
/// It belongs to another package, so cargo does not build it for this crate: run
/// `cargo build -p cowclone-cli --bin cowclone` and take the executable's path from cargo's own
/// report, which accounts for `CARGO_TARGET_DIR`, `--target-dir` configuration and build targets.
pub fn cowclone_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let output = Command::new(cargo)
            .args([
                "build",
                "--quiet",
                "--message-format=json",
                "-p",
                "cowclone-cli",
                "--bin",
                "cowclone",
            ])
            .current_dir(workspace_root())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {cargo} to build cowclone: {e}"));
        let messages: Vec<Value> = String::from_utf8_lossy(&output.stdout)
            .lines()
            .filter_map(|line| serde_json::from_str::<Value>(line).ok())
            .collect();
        if !output.status.success() {
            let rendered: Vec<&str> = messages
                .iter()
                .filter_map(|m| m["message"]["rendered"].as_str())
                .collect();
            panic!(
                "building cowclone failed ({:?}):\n{}{}",
                output.status.code(),
                rendered.join(""),
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let reported = messages
            .iter()
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "cowclone")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from));
        let bin = reported.unwrap_or_else(|| {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .map(|t| {
                    if t.is_absolute() {
                        t
                    } else {
                        workspace_root().join(t)
                    }
                })
                .unwrap_or_else(|| workspace_root().join("target"));
            target.join("debug").join("cowclone")
        });
        assert!(
            bin.is_file(),
            "cowclone binary not found at {}",
            bin.display()
        );
        bin
    })
    .clone()
}

/// Runs `cowclone args`.
pub fn cowclone(args: &Args) -> Output {
    cowclone_cmd(args).output().expect("cowclone binary runs")
}

/// Runs `cowclone args` in directory `dir`.
pub fn cowclone_in(dir: &Path, args: &Args) -> Output {
    cowclone_cmd(args)
        .current_dir(dir)
        .output()
        .expect("cowclone binary runs")
}

/// [`cowclone_in`] with string arguments.
pub fn cowclone_args_in(dir: &Path, args: &[&str]) -> Output {
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    cowclone_in(dir, &args)
}

/// Like [`cowclone_args_in`], and asserts that cowclone succeeded.
pub fn cowclone_ok_args_in(dir: &Path, args: &[&str]) -> Output {
    let out = cowclone_args_in(dir, args);
    assert!(
        out.status.success(),
        "cowclone {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn cowclone_cmd(args: &Args) -> Command {
    let mut command = Command::new(cowclone_bin());
    command.args(args.iter().map(|a| a.as_ref()));
    // The error path must not depend on the caller's environment.
    command
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE");
    command
}

/// Runs `cowclone args`, asserts that it succeeded and returns its stdout.
pub fn cowclone_ok(args: &Args) -> String {
    let output = cowclone(args);
    assert!(
        output.status.success(),
        "{} failed: {}",
        command_line("cowclone", args),
        describe(&output)
    );
    String::from_utf8(output.stdout).expect("cowclone printed UTF-8")
}

/// `cowclone info --output json path`.
pub fn cowclone_info_json(path: &Path) -> Value {
    let stdout = cowclone_ok(&[&"info", &"--output", &"json", &path]);
    serde_json::from_str(&stdout).expect("cowclone info printed JSON")
}

/// Bytes allocated to `path` on disk (st_blocks × 512).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .blocks()
        * 512
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// The first offset at which `a` and `b` differ, the shorter file read as if zero-padded to the
/// longer one's length (qemu versions differ in trailing padding); `None` if they are equal.
pub fn first_difference_zero_extended(a: &Path, b: &Path) -> Option<u64> {
    let (a, b) = (read(a), read(b));
    let (short, long) = if a.len() <= b.len() {
        (&a, &b)
    } else {
        (&b, &a)
    };
    // Slice comparisons (memcmp) first: the byte-by-byte search runs only on a mismatch.
    const CHUNK: usize = 64 << 10;
    let zeros = [0u8; CHUNK];
    let mut offset = 0;
    while offset < long.len() {
        let end = (offset + CHUNK).min(long.len());
        let l = &long[offset..end];
        let s = &short[offset.min(short.len())..end.min(short.len())];
        if l[..s.len()] != *s || l[s.len()..] != zeros[..l.len() - s.len()] {
            let at = (0..l.len())
                .find(|&i| l[i] != s.get(i).copied().unwrap_or(0))
                .expect("a differing byte");
            return Some((offset + at) as u64);
        }
        offset = end;
    }
    None
}

/// True if `a` and `b` hold the same bytes, the shorter read as if zero-padded.
pub fn bytes_equal_zero_extended(a: &Path, b: &Path) -> bool {
    first_difference_zero_extended(a, b).is_none()
}

/// Asserts [`bytes_equal_zero_extended`], naming the first differing offset.
pub fn assert_bytes_equal_zero_extended(ours: &Path, theirs: &Path, context: &str) {
    if let Some(offset) = first_difference_zero_extended(ours, theirs) {
        panic!(
            "{context}: {} (ours, {} bytes) differs from {} (qemu-img, {} bytes) at offset {offset:#x}",
            ours.display(),
            file_len(ours),
            theirs.display(),
            file_len(theirs)
        );
    }
}

/// A file's length.
pub fn file_len(path: &Path) -> u64 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("stat {}: {e}", path.display()))
        .len()
}

/// The names of the entries of `dir`, sorted.
pub fn dir_entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| {
            e.expect("directory entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    names.sort();
    names
}

/// Asserts that no temporary file of an unfinished create (`*.cowclone-tmp`) is left in `dir`.
pub fn assert_no_temp_files(dir: &Path, context: &str) {
    let leftovers: Vec<String> = dir_entries(dir)
        .into_iter()
        .filter(|n| n.ends_with(imagefmt::new_file::TEMP_SUFFIX))
        .collect();
    assert!(
        leftovers.is_empty(),
        "{context}: temporary files left in {}: {leftovers:?}",
        dir.display()
    );
}

/// The keys `qemu-img info --output=json` and cowclone must agree on for two different files
/// that should describe the same image.
pub const INFO_KEYS: &[&str] = &[
    "virtual-size",
    "format",
    "cluster-size",
    "dirty-flag",
    "format-specific",
    "backing-filename",
    "backing-filename-format",
    "full-backing-filename",
];

/// Asserts that two info objects agree on `keys` (a key absent from both agrees).
pub fn assert_info_keys_equal(ours: &Value, theirs: &Value, keys: &[&str], context: &str) {
    for key in keys {
        assert_eq!(
            ours.get(key),
            theirs.get(key),
            "{context}: info key {key:?} differs\n--- ours\n{ours:#}\n--- qemu-img\n{theirs:#}"
        );
    }
}

/// Writes `len` bytes of a repeating, position-dependent pattern to `path`.
pub fn write_pattern_file(path: &Path, len: usize) {
    let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8 ^ 0x3c).collect();
    std::fs::write(path, data).unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
}

/// The comparator every byte-identity assertion relies on must be able to say "different".
#[test]
fn zero_extended_comparison_finds_every_kind_of_difference() {
    let tmp = tempfile::tempdir().unwrap();
    let file = |name: &str, bytes: &[u8]| {
        let path = tmp.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        path
    };
    let mut long = vec![7u8; 200_000];
    long.extend([0u8; 1000]);
    let a = file("a", &long);
    let b = file("b", &long[..200_000]);
    assert_eq!(
        first_difference_zero_extended(&a, &b),
        None,
        "trailing zeros"
    );
    assert!(bytes_equal_zero_extended(&b, &a));
    long[150_001] = 8;
    let c = file("c", &long);
    assert_eq!(first_difference_zero_extended(&a, &c), Some(150_001));
    long[150_001] = 7;
    long[200_500] = 1; // inside the part the shorter file lacks
    let d = file("d", &long);
    assert_eq!(first_difference_zero_extended(&b, &d), Some(200_500));
    assert_eq!(first_difference_zero_extended(&d, &b), Some(200_500));
    let empty = file("empty", &[]);
    assert_eq!(
        first_difference_zero_extended(&empty, &file("z", &[0; 70_000])),
        None
    );
    assert_eq!(first_difference_zero_extended(&empty, &a), Some(0));
}

/// Runs a reference tool (`qemu-img`, `qemu-io`) with `args` in `dir`. A missing tool fails the
/// test naming the Debian package that provides it.
pub fn tool_in(tool: &str, dir: &Path, args: &[&str]) -> Output {
    Command::new(tool)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{tool} not found ({e}): install the Debian package qemu-utils"))
}

/// Like [`tool_in`], and asserts that the tool succeeded.
pub fn tool_ok_in(tool: &str, dir: &Path, args: &[&str]) -> Output {
    let out = tool_in(tool, dir, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// `qemu-img ARGS` run in `dir`; asserts that it succeeded.
pub fn qemu_img_ok_in(dir: &Path, args: &[&str]) -> Output {
    tool_ok_in("qemu-img", dir, args)
}

/// Runs qemu-io's `commands` (one `-c` each, in one process) on the qcow2 image `image` in `dir`;
/// asserts that it succeeded.
pub fn qemu_io_in(dir: &Path, image: &str, commands: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for command in commands {
        args.extend(["-c", command]);
    }
    args.push(image);
    tool_ok_in("qemu-io", dir, &args);
}

/// Runs `program args` under GNU time (Debian package `time`) with stderr discarded (it may be
/// huge); returns (exit code, stdout, peak RSS in KiB).
pub fn run_with_peak_rss(
    program: &Path,
    args: &[&dyn AsRef<std::ffi::OsStr>],
) -> (i32, String, u64) {
    let dir = tempfile::tempdir().unwrap();
    let rss_file = dir.path().join("rss");
    let output = std::process::Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M")
        .arg("-o")
        .arg(&rss_file)
        .arg(program)
        .args(args.iter().map(|a| a.as_ref()))
        .stderr(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| {
            panic!("cannot run /usr/bin/time ({e}): install the Debian package time")
        });
    let rss = std::fs::read_to_string(&rss_file).unwrap_or_default();
    let rss: u64 = rss
        .lines()
        .last()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("GNU time reported no peak RSS: {rss:?}"));
    (
        output.status.code().expect("not killed by a signal"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        rss,
    )
}

/// qemu's view of the dirty ranges of bitmap `name`: (start, length) of every range
/// `qemu-img map` reports as dirty through a `qemu-nbd -B name` export.
pub fn qemu_dirty_ranges(image: &Path, name: &str) -> Vec<(u64, u64)> {
    let socket = image.with_extension("nbd.sock");
    let _ = std::fs::remove_file(&socket);
    let mut server: std::process::Child = match Command::new("qemu-nbd")
        .args(["-r", "-f", "qcow2", "-B", name, "-k"])
        .arg(&socket)
        .arg(image)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
    {
        Ok(child) => child,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("qemu-nbd not found: install the Debian package qemu-utils")
        }
        Err(e) => panic!("cannot run qemu-nbd: {e}"),
    };
    // Wait until the server listens (or has exited with an error).
    while !socket.exists() {
        if let Some(status) = server.try_wait().expect("polling qemu-nbd") {
            let out = server.wait_with_output().expect("qemu-nbd output");
            panic!(
                "qemu-nbd -B {name} {} exited {status}: {}",
                image.display(),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let opts = format!(
        "driver=nbd,server.type=unix,server.path={},x-dirty-bitmap=qemu:dirty-bitmap:{name}",
        socket.display()
    );
    let args: [&dyn AsRef<std::ffi::OsStr>; 4] = [&"map", &"--output=json", &"--image-opts", &opts];
    let output = qemu_img(&args);
    let _ = server.kill();
    let _ = server.wait();
    assert!(
        output.status.success(),
        "{} failed: {}",
        command_line("qemu-img", &args),
        describe(&output)
    );
    let map: Value = serde_json::from_slice(&output.stdout).expect("qemu-img map printed JSON");
    map.as_array()
        .expect("map is a list")
        .iter()
        .filter(|e| e["data"] == Value::Bool(false))
        .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
        .collect()
}
