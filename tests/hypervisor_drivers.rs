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

/// Writes an executable shell script `name` into `bin`: a stand-in for a hypervisor tool.
fn stand_in(bin: &Path, name: &str, body: &str) {
    use std::os::unix::fs::PermissionsExt;
    let path = bin.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// `cowclone ARGS --home HOME` with `bin` first in PATH: (success, stdout + stderr).
fn run_with_stand_ins(home: &Path, bin: &Path, args: &[&str]) -> (bool, String) {
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let output = std::process::Command::new(cowclone_bin())
        .args(args)
        .arg("--home")
        .arg(home)
        .env("PATH", path)
        .output()
        .unwrap();
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned()
            + &String::from_utf8_lossy(&output.stderr),
    )
}

/// The contents of `path` once a detached stand-in has written it (up to 5 s).
fn written(path: &Path) -> String {
    for _ in 0..100 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if !text.is_empty() {
            return text;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("{} was not written", path.display())
}

/// A stand-in hypervisor: records its arguments (and, for Firecracker, the config file named
/// after `--config-file`) and waits, as a running VM does.
fn hypervisor_stand_in(bin: &Path, name: &str, record: &Path) {
    stand_in(
        bin,
        name,
        &format!(
            "echo \"$@\" > {0}.args\n[ \"$3\" = --config-file ] && cp \"$4\" {0}.config\n\
             sleep 60\nexit 0",
            record.display()
        ),
    );
}

/// The real start/stop path of both drivers with stand-ins first in PATH: start runs the
/// hypervisor detached and writes its pidfile, a second start is refused while it runs, stop
/// asks through the API socket (the stand-in client ends the VM's process group, as the guest
/// powering off would) and reports the power-down, and the command log has both.
fn runs_detached_and_stops_through_the_api(
    home: &Path,
    clone: &str,
    driver: &str,
    pidfile: &str,
    client: &str,
    client_body: &str,
) -> (String, String) {
    let bin = home.parent().unwrap().join(format!("bin-{driver}"));
    std::fs::create_dir(&bin).unwrap();
    let record = bin.join("record");
    let program = if driver == "cloud-hypervisor" {
        "cloud-hypervisor"
    } else {
        "firecracker"
    };
    hypervisor_stand_in(&bin, program, &record);
    stand_in(&bin, client, client_body);
    let kernel = home.parent().unwrap().join("vmlinux");
    std::fs::write(&kernel, b"not a kernel").unwrap();
    let kernel = kernel.to_str().unwrap();
    let start = ["start", clone, "--driver", driver, "--kernel", kernel];
    let (started, text) = run_with_stand_ins(home, &bin, &start);
    assert!(started, "{text}");
    assert!(text.contains("(pid "), "{text}");
    let dir = clone_path(home, clone).parent().unwrap().to_owned();
    let pid = std::fs::read_to_string(dir.join(pidfile)).unwrap();
    let (again, text) = run_with_stand_ins(home, &bin, &start);
    assert!(!again && text.contains("already running"), "{text}");
    let args = written(&record.with_extension("args"));
    let stop = ["stop", clone, "--driver", driver, "--timeout", "10"];
    let (stopped, text) = run_with_stand_ins(home, &bin, &stop);
    assert!(stopped, "{text}");
    assert_eq!(text.trim(), format!("{clone}: powered down"));
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", pid.trim())).unwrap_or_default();
    assert!(cmdline.is_empty(), "the VM process is still there");
    let (_, text) = run_with_stand_ins(home, &bin, &stop);
    assert_eq!(text.trim(), format!("{clone}: was not running"));
    let log = std::fs::read_to_string(dir.join("commands.log")).unwrap();
    assert!(log.contains(&format!("{program} --")), "{log}");
    assert!(
        log.contains("started, pid") && log.contains(client),
        "{log}"
    );
    let config = std::fs::read_to_string(record.with_extension("config")).unwrap_or_default();
    (args, config)
}

#[test]
fn cloud_hypervisor_runs_detached_and_stops_through_its_api() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let base = tmp.path().join("base.raw");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"raw", &base, &"16M"]);
    ok(&home, &[&"base", &"register", &"deb", &base]);
    ok(&home, &[&"clone", &"deb", &"web"]);
    // ch-remote --api-socket SOCKET power-button: end the process group whose pidfile sits by
    // the socket.
    let client = "[ \"$3\" = power-button ] || exit 1\n\
                  kill -TERM -\"$(cat \"$(dirname \"$2\")/cloud-hypervisor.pid\")\"";
    let (args, _) = runs_detached_and_stops_through_the_api(
        &home,
        "web",
        "cloud-hypervisor",
        "cloud-hypervisor.pid",
        "ch-remote",
        client,
    );
    assert!(args.contains(",backing_files=on "), "{args}");
}

#[test]
fn firecracker_runs_detached_and_stops_through_its_api() {
    let fs = LoopFs::new("btrfs");
    let home = fs.mount.join("home");
    let base = fs.mount.join("rootfs.raw");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"raw", &base, &"16M"]);
    ok(&home, &[&"base", &"register", &"rootfs", &base]);
    ok(
        &home,
        &[&"clone", &"rootfs", &"fc", &"--method", &"reflink"],
    );
    // curl --silent --fail --unix-socket SOCKET -X PUT …/actions … -d '{"action_type":…}':
    // end the process group whose pidfile sits by the socket, for SendCtrlAltDel only.
    let client = "case \"$*\" in *SendCtrlAltDel*) ;; *) exit 1 ;; esac\n\
                  kill -TERM -\"$(cat \"$(dirname \"$4\")/firecracker.pid\")\"";
    let (_, config) = runs_detached_and_stops_through_the_api(
        &home,
        "fc",
        "firecracker",
        "firecracker.pid",
        "curl",
        client,
    );
    let config: Value = serde_json::from_str(&config).unwrap();
    let root = PathBuf::from(config["drives"][0]["path_on_host"].as_str().unwrap());
    assert_eq!(root, clone_path(&home, "fc"));
}
