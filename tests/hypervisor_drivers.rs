//! `start|stop --driver cloud-hypervisor|firecracker --dry-run` on registered clones: neither
//! hypervisor can run here (no package; nested KVM guests hang), so what is checked is that the
//! command line and config they would get describe the clone as qemu-img sees it — the image,
//! its format, the backing chain its header names with the formats pinned — and that what they
//! cannot open is refused.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::reflink::LoopFs;
use crate::util::*;

/// `cowclone ARGS --home HOME`: (success, stdout, stderr).
fn in_home(home: &Path, args: &[&dyn AsRef<OsStr>]) -> (bool, String, String) {
    let mut all = args.to_vec();
    all.extend([&"--home" as &dyn AsRef<OsStr>, &home]);
    let output = cowclone(&all);
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn ok(home: &Path, args: &[&dyn AsRef<OsStr>]) -> String {
    let (success, stdout, stderr) = in_home(home, args);
    assert!(success, "{}: {stderr}", command_line("cowclone", args));
    stdout
}

fn refused(home: &Path, args: &[&dyn AsRef<OsStr>]) -> String {
    let (success, stdout, stderr) = in_home(home, args);
    assert!(
        !success,
        "{} succeeded: {stdout}",
        command_line("cowclone", args)
    );
    stderr
}

/// The path of a registered clone, from `ls --output json`.
fn clone_path(home: &Path, name: &str) -> PathBuf {
    let records: Value = serde_json::from_str(&ok(home, &[&"ls", &"--output", &"json"])).unwrap();
    let record = records
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("no {name} in {records:#}"));
    PathBuf::from(record["path"].as_str().unwrap())
}

/// The `key=value` options of cloud-hypervisor's `--disk` arguments in `line`.
fn disk_options(line: &str) -> Vec<Vec<(String, String)>> {
    let words: Vec<&str> = line.split_whitespace().collect();
    words
        .windows(2)
        .filter(|w| w[0] == "--disk")
        .map(|w| {
            w[1].split(',')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap();
                    (k.to_owned(), v.to_owned())
                })
                .collect()
        })
        .collect()
}

fn option<'a>(options: &'a [(String, String)], key: &str) -> &'a str {
    options
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} in {options:?}"))
}

/// A qcow2 overlay of a raw base: cloud-hypervisor gets the overlay with `image_type=qcow2` and
/// `backing_files=on`, and the header it will follow (read by qemu-img) names the registered
/// base with its format pinned. A clone of a VDI base is refused, as is `--firmware` elsewhere.
#[test]
fn cloud_hypervisor_gets_the_overlay_whose_header_names_the_pinned_base() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = tmp.path().join("base.raw");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"raw", &base, &"16M"]);
    ok(&home, &[&"base", &"register", &"deb", &base]);
    ok(&home, &[&"clone", &"deb", &"web"]);
    let kernel = tmp.path().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let line = ok(
        &home,
        &[
            &"start",
            &"web",
            &"--driver",
            &"cloud-hypervisor",
            &"--dry-run",
            &"--kernel",
            &kernel,
            &"--cpus",
            &"2",
            &"--memory",
            &"1G",
        ],
    );
    assert!(line.starts_with("cloud-hypervisor --kernel "), "{line}");
    assert!(
        line.contains(" --cpus boot=2 --memory size=1024M "),
        "{line}"
    );
    let disks = disk_options(&line);
    assert_eq!(disks.len(), 1, "{line}");
    let top = PathBuf::from(option(&disks[0], "path"));
    assert_eq!(top, clone_path(&home, "web"));
    assert_eq!(option(&disks[0], "backing_files"), "on");
    let info = qemu_info_json(&top);
    assert_eq!(
        option(&disks[0], "image_type"),
        info["format"].as_str().unwrap()
    );
    assert_eq!(
        info["backing-filename"].as_str().unwrap(),
        base.to_str().unwrap()
    );
    assert_eq!(info["backing-filename-format"], "raw", "{info:#}");
    let stop = ok(
        &home,
        &[
            &"stop",
            &"web",
            &"--driver",
            &"cloud-hypervisor",
            &"--dry-run",
        ],
    );
    assert!(stop.contains("ch-remote --api-socket "), "{stop}");
    assert!(stop.contains(" power-button"), "{stop}");

    let err = refused(
        &home,
        &[
            &"start",
            &"web",
            &"--driver",
            &"cloud-hypervisor",
            &"--dry-run",
        ],
    );
    assert!(err.contains("--firmware"), "{err}");
    let err = refused(
        &home,
        &[&"start", &"web", &"--dry-run", &"--firmware", &kernel],
    );
    assert!(err.contains("--driver cloud-hypervisor"), "{err}");
    let err = refused(
        &home,
        &[
            &"start",
            &"web",
            &"--driver",
            &"cloud-hypervisor",
            &"--dry-run",
            &"--kernel",
            &kernel,
            &"--ingress",
            &"2222:22",
        ],
    );
    assert!(err.contains("TAP"), "{err}");

    let vdi = tmp.path().join("base.vdi");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"vdi", &vdi, &"16M"]);
    ok(&home, &[&"base", &"register", &"win", &vdi]);
    ok(&home, &[&"clone", &"win", &"w1"]);
    let err = refused(
        &home,
        &[
            &"start",
            &"w1",
            &"--driver",
            &"cloud-hypervisor",
            &"--dry-run",
            &"--kernel",
            &kernel,
        ],
    );
    assert!(err.contains("VDI"), "{err}");
}

/// A reflink clone of a raw base on btrfs is what Firecracker boots: the config's root drive
/// is that file, which qemu-img sees as raw, without a backing file, with the base's bytes.
/// The qcow2 overlay of the same base is refused with the way out.
#[test]
fn firecracker_boots_a_reflink_clone_and_refuses_an_overlay() {
    let fs = LoopFs::new("btrfs");
    let home = fs.mount.join("home");
    let base = fs.mount.join("rootfs.raw");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"raw", &base, &"16M"]);
    qemu_io_ok(&[&"-f", &"raw", &"-c", &"write -P 0x5a 0 4M", &base]);
    ok(&home, &[&"base", &"register", &"rootfs", &base]);
    ok(
        &home,
        &[&"clone", &"rootfs", &"fc", &"--method", &"reflink"],
    );
    ok(&home, &[&"clone", &"rootfs", &"ov"]);
    let kernel = fs.mount.join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let printed = ok(
        &home,
        &[
            &"start",
            &"fc",
            &"--driver",
            &"firecracker",
            &"--dry-run",
            &"--kernel",
            &kernel,
            &"--append",
            &"console=ttyS0",
        ],
    );
    let mut lines = printed.lines();
    let first = lines.next().unwrap();
    assert!(
        first.starts_with("# ") && first.ends_with("firecracker.json"),
        "{printed}"
    );
    let rest: Vec<&str> = lines.collect();
    let (command, json) = rest.split_last().unwrap();
    assert!(command.starts_with("firecracker --api-sock "), "{printed}");
    assert!(command.contains(" --config-file "), "{printed}");
    let config: Value = serde_json::from_str(&json.join("\n")).unwrap();
    let root = &config["drives"][0];
    assert_eq!(root["is_root_device"], true, "{config:#}");
    let path = PathBuf::from(root["path_on_host"].as_str().unwrap());
    assert_eq!(path, clone_path(&home, "fc"));
    let info = qemu_info_json(&path);
    assert_eq!(info["format"], "raw");
    assert!(info.get("backing-filename").is_none(), "{info:#}");
    let compare = qemu_img(&[&"compare", &"-f", &"raw", &"-F", &"raw", &path, &base]);
    assert_eq!(compare.status.code(), Some(0), "{}", describe(&compare));
    assert_eq!(config["boot-source"]["boot_args"], "console=ttyS0");
    assert_eq!(config["machine-config"]["mem_size_mib"], 512);

    let err = refused(
        &home,
        &[
            &"start",
            &"ov",
            &"--driver",
            &"firecracker",
            &"--dry-run",
            &"--kernel",
            &kernel,
        ],
    );
    assert!(
        err.contains("--method reflink") && err.contains("convert -O raw"),
        "{err}"
    );
}

/// The real start/stop path with stand-ins for `cloud-hypervisor` and `ch-remote` first in
/// PATH (shell scripts: the hypervisor records its arguments and waits; `ch-remote
/// power-button` ends it, as the guest powering off would): `start` runs it detached and writes
/// its pidfile, a second `start` is refused while it runs, `stop` asks through the API socket
/// and reports the power-down, and the command log has both.
#[test]
fn cloud_hypervisor_runs_detached_and_stops_through_its_api() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = tmp.path().join("base.raw");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"raw", &base, &"16M"]);
    ok(&home, &[&"base", &"register", &"deb", &base]);
    ok(&home, &[&"clone", &"deb", &"web"]);
    let kernel = tmp.path().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let script = |name: &str, body: &str| {
        let path = bin.join(name);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    let args_file = tmp.path().join("args");
    script(
        "cloud-hypervisor",
        &format!("echo \"$@\" > {}\nsleep 60\nexit 0", args_file.display()),
    );
    // ch-remote --api-socket SOCKET power-button: end the VM (its process group) whose pidfile
    // sits by the socket.
    script(
        "ch-remote",
        "[ \"$3\" = power-button ] || exit 1\nkill -TERM -\"$(cat \"$(dirname \"$2\")/cloud-hypervisor.pid\")\"",
    );
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let run = |args: &[&str]| {
        let output = std::process::Command::new(cowclone_bin())
            .args(args)
            .arg("--home")
            .arg(&home)
            .env("PATH", &path)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).into_owned()
                + &String::from_utf8_lossy(&output.stderr),
        )
    };
    let kernel = kernel.to_str().unwrap();
    let start = [
        "start",
        "web",
        "--driver",
        "cloud-hypervisor",
        "--kernel",
        kernel,
    ];
    let (started, text) = run(&start);
    assert!(started, "{text}");
    assert!(
        text.contains("running under cloud-hypervisor (pid "),
        "{text}"
    );
    let dir = clone_path(&home, "web").parent().unwrap().to_owned();
    let pid: i32 = std::fs::read_to_string(dir.join("cloud-hypervisor.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let (again, text) = run(&start);
    assert!(!again && text.contains("already running"), "{text}");
    // The stand-in got the command line (written before it sleeps; wait for it).
    let mut recorded = String::new();
    for _ in 0..100 {
        recorded = std::fs::read_to_string(&args_file).unwrap_or_default();
        if !recorded.is_empty() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert!(recorded.contains(",backing_files=on "), "{recorded}");
    let (stopped, text) = run(&[
        "stop",
        "web",
        "--driver",
        "cloud-hypervisor",
        "--timeout",
        "10",
    ]);
    assert!(stopped, "{text}");
    assert_eq!(text.trim(), "web: powered down");
    assert!(
        !Path::new(&format!("/proc/{pid}/cmdline")).exists() || {
            std::fs::read(format!("/proc/{pid}/cmdline"))
                .unwrap_or_default()
                .is_empty()
        }
    );
    let (stopped, text) = run(&["stop", "web", "--driver", "cloud-hypervisor"]);
    assert!(stopped && text.trim() == "web: was not running", "{text}");
    let log = std::fs::read_to_string(dir.join("commands.log")).unwrap();
    assert!(
        log.contains("cloud-hypervisor --kernel ") && log.contains("started, pid"),
        "{log}"
    );
    assert!(
        log.contains("ch-remote --api-socket ") && log.contains("power-button"),
        "{log}"
    );
}
