//! Clones on libvirt hosts, for real: two libvirtd instances, each in its own network namespace
//! behind a veth link on a private bridge (10.77.0.0/24), reached over libvirt's remote
//! protocol (`qemu+tcp://10.77.0.11/system`, `…12…`), made by `tests/support/hosts.sh`
//! (idempotent; `.ci/run` tears them down). Uploads are counted independently of cowclone: a
//! `virsh` wrapper first on `PATH` logs every invocation. Volumes are checked with `qemu-img`
//! (the hosts run on this machine, so their pool directories are readable here) and the tiny
//! TCG guest boots from a clone on each host.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{
    assert_qemu_check_clean, cowclone_bin, describe, qemu_img, qemu_img_ok, workspace_root,
};
use crate::vm_e2e::{registered_base, start_marker_guest};

/// The test hosts' URIs.
const HOSTS: [&str; 2] = [
    "qemu+tcp://10.77.0.11/system",
    "qemu+tcp://10.77.0.12/system",
];
/// Where the test hosts keep their state (pool directories go below).
const HOSTS_DIR: &str = "/var/tmp/cowclone-test-hosts";

/// The tests share the hosts; one runs at a time (one stops host 2's daemon).
static HOSTS_LOCK: Mutex<()> = Mutex::new(());

/// Runs `tests/support/hosts.sh ARGS`, failing the test with its output.
fn hosts_sh(args: &[&str]) {
    let script = workspace_root().join("tests/support/hosts.sh");
    let output = Command::new("bash")
        .arg(&script)
        .args(args)
        .output()
        .expect("bash runs");
    assert!(
        output.status.success(),
        "{} {args:?} failed (needs root, iproute2, libvirt-daemon, libvirt-daemon-driver-qemu, \
         libvirt-daemon-driver-storage, libvirt-clients): {}",
        script.display(),
        describe(&output)
    );
}

/// The virsh wrapper's directory and log: every virsh invocation is appended to the log.
struct VirshLog {
    dir: tempfile::TempDir,
}

impl VirshLog {
    fn new() -> VirshLog {
        let dir = tempfile::tempdir().unwrap();
        let real = ["/usr/bin/virsh", "/bin/virsh"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("virsh not found: install the Debian package libvirt-clients");
        let log = dir.path().join("virsh.log");
        let script = format!(
            "#!/bin/sh\nprintf '%s\\n' \"$*\" >> '{}'\nexec {real} \"$@\"\n",
            log.display()
        );
        let wrapper = dir.path().join("virsh");
        std::fs::write(&wrapper, script).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        VirshLog { dir }
    }

    /// `PATH` with the wrapper first.
    fn path_env(&self) -> std::ffi::OsString {
        let mut path = self.dir.path().as_os_str().to_owned();
        path.push(":");
        path.push(std::env::var_os("PATH").unwrap_or_default());
        path
    }

    /// How many `vol-upload`s of a base replica went to `uri`.
    fn base_uploads(&self, uri: &str) -> usize {
        std::fs::read_to_string(self.dir.path().join("virsh.log"))
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(uri) && l.contains("vol-upload") && l.contains("cowclone-base-"))
            .count()
    }

    /// Runs cowclone with the wrapper on `PATH`.
    fn cowclone(&self, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Output {
        Command::new(cowclone_bin())
            .args(args.iter().map(|a| a.as_ref()))
            .env("PATH", self.path_env())
            .output()
            .expect("cowclone runs")
    }

    fn cowclone_ok(&self, args: &[&dyn AsRef<std::ffi::OsStr>]) -> String {
        let output = self.cowclone(args);
        assert!(output.status.success(), "{}", describe(&output));
        String::from_utf8(output.stdout).unwrap()
    }
}

/// `virsh -c URI ARGS` (the real one), its output.
fn virsh(uri: &str, args: &[&str]) -> Output {
    Command::new("virsh")
        .args(["-q", "-c", uri])
        .args(args)
        .output()
        .expect("virsh not found: install the Debian package libvirt-clients")
}

/// Removes the test's pools (and their volumes) from the hosts, and brings host 2's daemon back,
/// whatever happened.
struct Cleanup {
    pools: Vec<(&'static str, String)>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        hosts_sh(&["start", "2"]);
        for (uri, pool) in &self.pools {
            let list = virsh(uri, &["list", "--all", "--name"]);
            for domain in String::from_utf8_lossy(&list.stdout).lines() {
                if domain.starts_with("rh-") {
                    let _ = virsh(uri, &["destroy", domain]);
                    let _ = virsh(uri, &["undefine", domain]);
                }
            }
            let _ = virsh(uri, &["pool-destroy", pool]);
            let _ = virsh(uri, &["pool-delete", pool]);
            let _ = virsh(uri, &["pool-undefine", pool]);
        }
    }
}

/// A pool name and directory unique to this test run, on host `index` (1 or 2).
fn pool(index: usize, test: &str) -> (String, PathBuf) {
    let name = format!("cc-{}-{test}", std::process::id());
    (
        name.clone(),
        Path::new(HOSTS_DIR).join(format!("h{index}")).join(name),
    )
}

/// `host add h1 … hN` of the first `count` test hosts into `home`, each with a fresh pool for
/// `test`; returns the pools (name, directory) and the guard that deletes them.
fn add_hosts(
    log: &VirshLog,
    home: &Path,
    test: &str,
    count: usize,
) -> (Vec<(String, PathBuf)>, Cleanup) {
    let pools: Vec<(String, PathBuf)> = (1..=count).map(|i| pool(i, test)).collect();
    let cleanup = Cleanup {
        pools: pools
            .iter()
            .zip(HOSTS)
            .map(|((name, _), uri)| (uri, name.clone()))
            .collect(),
    };
    for (i, ((name, dir), uri)) in pools.iter().zip(HOSTS).enumerate() {
        let host = format!("h{}", i + 1);
        log.cowclone_ok(&[
            &"host",
            &"add",
            &host,
            &"--connect",
            &uri,
            &"--pool",
            name,
            &"--pool-dir",
            dir,
            &"--home",
            &home,
        ]);
    }
    (pools, cleanup)
}

/// The registry's view of hosts and clones, to compare before and after a failure.
fn registry_state(home: &Path, log: &VirshLog) -> (Value, Value) {
    let hosts = log.cowclone_ok(&[&"host", &"ls", &"--output", &"json", &"--home", &home]);
    let local = log.cowclone_ok(&[&"ls", &"--output", &"json", &"--home", &home]);
    (
        serde_json::from_str(&hosts).unwrap(),
        serde_json::from_str(&local).unwrap(),
    )
}

/// Waits until domain `name` on `uri` is shut off (the marker guest powers off by itself).
fn wait_shut_off(uri: &str, name: &str) {
    let start = Instant::now();
    loop {
        let state = virsh(uri, &["domstate", name]);
        let text = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        if text == "shut off" {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{name} on {uri} still {text:?}: {}",
            describe(&state)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn clones_on_two_libvirt_hosts_boot_and_a_lost_host_changes_nothing() {
    let _one = HOSTS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    hosts_sh(&["up", "2"]);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let (base, base_bytes) = registered_base(tmp.path(), &home);
    let log = VirshLog::new();
    let (pools, _cleanup) = add_hosts(&log, &home, "boot", 2);
    let [(pool1, dir1), (pool2, dir2)] = [&pools[0], &pools[1]];
    for (uri, pool, dir) in [(HOSTS[0], pool1, dir1), (HOSTS[1], pool2, dir2)] {
        // The pool was made by libvirt on the host, as a directory pool at that path.
        let info = virsh(uri, &["pool-dumpxml", pool]);
        let xml = String::from_utf8_lossy(&info.stdout);
        assert!(xml.contains("type='dir'"), "{xml}");
        assert!(xml.contains(&dir.to_string_lossy().into_owned()), "{xml}");
    }

    // Two clones on host 1 in one call, one more later, one on host 2.
    let prefix = format!("rh-{}", std::process::id());
    let web = format!("{prefix}-web");
    let db = format!("{prefix}-db");
    let extra = format!("{prefix}-extra");
    log.cowclone_ok(&[
        &"clone", &"gold", &web, &"--host", &"h1", &"--count", &"2", &"--home", &home,
    ]);
    log.cowclone_ok(&[
        &"clone", &"gold", &extra, &"--host", &"h1", &"--home", &home,
    ]);
    log.cowclone_ok(&[&"clone", &"gold", &db, &"--host", &"h2", &"--home", &home]);
    assert_eq!(
        log.base_uploads(HOSTS[0]),
        1,
        "the base goes to host 1 once"
    );
    assert_eq!(
        log.base_uploads(HOSTS[1]),
        1,
        "the base goes to host 2 once"
    );

    // Every volume: the replicas are the base byte for byte, the overlays are clean qcow2 whose
    // backing file is the replica's path on their host, format pinned.
    let (hosts, _) = registry_state(&home, &log);
    let web1 = format!("{web}-1");
    for (host, dir, clones) in [
        (
            &hosts[0],
            &dir1,
            vec![web1.clone(), format!("{web}-2"), extra.clone()],
        ),
        (&hosts[1], &dir2, vec![db.clone()]),
    ] {
        let replica = &host["replicas"][0];
        let replica_path = PathBuf::from(replica["path"].as_str().unwrap());
        assert!(replica_path.starts_with(dir), "{host}");
        qemu_img_ok(&[
            &"compare",
            &"-f",
            &"raw",
            &"-F",
            &"raw",
            &base,
            &replica_path,
        ]);
        let mut names: Vec<String> = host["clones"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_owned())
            .collect();
        names.sort();
        let mut expected = clones.clone();
        expected.sort();
        assert_eq!(names, expected);
        for clone in &clones {
            let volume = dir.join(format!("cowclone-clone-{clone}.qcow2"));
            assert_qemu_check_clean(&volume, "remote overlay");
            let info = qemu_img_ok(&[&"info", &"--output=json", &volume]);
            let info: Value = serde_json::from_str(&info).unwrap();
            assert_eq!(info["backing-filename"], replica["path"], "{info}");
            assert_eq!(info["backing-filename-format"], "raw", "{info}");
            qemu_img_ok(&[&"compare", &"-f", &"qcow2", &"-F", &"raw", &volume, &base]);
        }
    }

    // The guest boots from a clone on each host, reads the base's bytes through it, and writes
    // its marker into the clone.
    for (uri, name, dir) in [(HOSTS[0], &web1, &dir1), (HOSTS[1], &db, &dir2)] {
        let started = start_marker_guest(&home, name, &[]);
        assert!(started.status.success(), "{}", describe(&started));
        let status = log.cowclone_ok(&[&"status", name, &"--home", &home, &"--output", &"json"]);
        let status: Value = serde_json::from_str(&status).unwrap();
        assert!(
            status["state"] == "running" || status["state"] == "shut off",
            "{status}"
        );
        wait_shut_off(uri, name);
        let serial = std::fs::read_to_string(dir.join(format!("cowclone-serial-{name}.log")))
            .unwrap_or_default();
        assert!(
            serial.contains("GUEST-PATTERN: COWCLONE-PATTERN"),
            "the guest on {uri} did not read the base through its clone: {serial}"
        );
        // The domain libvirt ran had the chain written out, format pinned.
        let xml = String::from_utf8_lossy(&virsh(uri, &["dumpxml", name]).stdout).into_owned();
        assert!(xml.contains("<format type='raw'/>"), "{xml}");
        let volume = dir.join(format!("cowclone-clone-{name}.qcow2"));
        assert_qemu_check_clean(&volume, "remote overlay after the guest ran");
        let theirs = tmp.path().join(format!("{name}.raw"));
        qemu_img_ok(&[&"convert", &"-O", &"raw", &volume, &theirs]);
        let bytes = std::fs::read(&theirs).unwrap();
        assert_eq!(&bytes[1 << 20..(1 << 20) + 17], b"MARKER-FROM-GUEST");
        let stopped = log.cowclone_ok(&[&"stop", name, &"--home", &home]);
        assert!(stopped.contains("undefined"), "{stopped}");
        assert!(
            !virsh(uri, &["domstate", name]).status.success(),
            "undefined"
        );
    }
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base changed"
    );

    // Host 2's daemon stops: every operation that needs it fails clearly and changes nothing.
    let before = registry_state(&home, &log);
    hosts_sh(&["stop", "2"]);
    for args in [
        vec!["clone", "gold", "lost", "--host", "h2"],
        vec!["rm", db.as_str()],
        vec!["status", db.as_str()],
        vec!["stop", db.as_str()],
    ] {
        let mut all: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        all.extend([&"--home" as &dyn AsRef<std::ffi::OsStr>, &home]);
        let failed = log.cowclone(&all);
        let stderr = String::from_utf8_lossy(&failed.stderr);
        assert!(!failed.status.success(), "{args:?}: {}", describe(&failed));
        assert!(
            stderr.contains("\"h2\"") && stderr.contains("does not answer"),
            "{args:?}: {}",
            describe(&failed)
        );
    }
    let gc = log.cowclone_ok(&[&"gc", &"--output", &"json", &"--home", &home]);
    let gc: Value = serde_json::from_str(&gc).unwrap();
    let h2 = gc["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "h2")
        .unwrap();
    assert!(
        h2["unreachable"]
            .as_str()
            .unwrap()
            .contains("does not answer"),
        "{gc}"
    );
    assert_eq!(registry_state(&home, &log), before, "the registry changed");
    assert!(dir2.join(format!("cowclone-clone-{db}.qcow2")).exists());
    hosts_sh(&["start", "2"]);

    // gc removes a cowclone volume no record claims, and nothing else.
    let stray = virsh(
        HOSTS[0],
        &[
            "vol-create-as",
            pool1,
            "cowclone-stray",
            "1024",
            "--format",
            "raw",
        ],
    );
    assert!(stray.status.success(), "{}", describe(&stray));
    let foreign = virsh(
        HOSTS[0],
        &[
            "vol-create-as",
            pool1,
            "not-ours",
            "1024",
            "--format",
            "raw",
        ],
    );
    assert!(foreign.status.success(), "{}", describe(&foreign));
    let gc = log.cowclone_ok(&[&"gc", &"--output", &"json", &"--home", &home]);
    let gc: Value = serde_json::from_str(&gc).unwrap();
    let h1 = gc["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "h1")
        .unwrap();
    assert_eq!(
        h1["removed-volumes"],
        serde_json::json!(["cowclone-stray"]),
        "{gc}"
    );
    assert!(!dir1.join("cowclone-stray").exists());
    assert!(dir1.join("not-ours").exists());

    // rm deletes the remote volumes; the replica stays for the next clone.
    log.cowclone_ok(&[&"rm", &web1, &"--home", &home]);
    assert!(!dir1.join(format!("cowclone-clone-{web1}.qcow2")).exists());
    assert!(!dir1.join(format!("cowclone-serial-{web1}.log")).exists());
    assert_eq!(
        registry_state(&home, &log).0[0]["clones"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    // A host with clones is not removed; without, its replicas go with it.
    let refused = log.cowclone(&[&"host", &"rm", &"h2", &"--home", &home]);
    assert!(!refused.status.success(), "{}", describe(&refused));
    log.cowclone_ok(&[&"rm", &db, &"--home", &home]);
    log.cowclone_ok(&[&"host", &"rm", &"h2", &"--home", &home]);
    let left: Vec<_> = std::fs::read_dir(dir2).unwrap().collect();
    assert!(left.is_empty(), "host 2's pool keeps {left:?}");
}

#[test]
fn two_controllers_racing_for_one_host_upload_the_base_once() {
    let _one = HOSTS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    hosts_sh(&["up", "2"]);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    registered_base(tmp.path(), &home);
    let log = VirshLog::new();
    let (pools, _cleanup) = add_hosts(&log, &home, "race", 1);
    let (_, dir1) = &pools[0];
    let prefix = format!("rh-{}-race", std::process::id());
    let children: Vec<_> = (0..3)
        .map(|i| {
            Command::new(cowclone_bin())
                .args([
                    "clone",
                    "gold",
                    &format!("{prefix}-{i}"),
                    "--host",
                    "h1",
                    "--home",
                ])
                .arg(&home)
                .env("PATH", log.path_env())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", describe(&output));
    }
    assert_eq!(
        log.base_uploads(HOSTS[0]),
        1,
        "one upload for three racing controllers"
    );
    let (hosts, _) = registry_state(&home, &log);
    assert_eq!(hosts[0]["clones"].as_array().unwrap().len(), 3, "{hosts}");
    for i in 0..3 {
        let volume = dir1.join(format!("cowclone-clone-{prefix}-{i}.qcow2"));
        assert_qemu_check_clean(&volume, "overlay made in a race");
    }
    let replicas: Vec<_> = std::fs::read_dir(dir1)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("cowclone-base-")
        })
        .collect();
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    let check = qemu_img(&[&"info", &replicas[0].path()]);
    assert!(check.status.success(), "{}", describe(&check));
}

/// Waits until the virsh wrapper has logged a base upload to `uri` (the clone is mid-upload).
fn wait_for_upload(log: &VirshLog, uri: &str, child: &mut std::process::Child) {
    loop {
        if log.base_uploads(uri) > 0 {
            return;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the clone ended ({status}) before its upload was seen");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_killed_controller_or_a_lost_host_mid_clone_leaves_the_registry_consistent() {
    use std::os::unix::process::CommandExt;
    let _one = HOSTS_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    hosts_sh(&["up", "2"]);
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    // A base with no holes, so that its upload and verification take a while.
    let base = tmp.path().join("big.raw");
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let bytes: Vec<u8> = (0..64u32 << 20)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    std::fs::write(&base, &bytes).unwrap();
    let log = VirshLog::new();
    log.cowclone_ok(&[&"base", &"register", &"gold", &base, &"--home", &home]);
    let (pools, _cleanup) = add_hosts(&log, &home, "crash", 2);
    let [(_, dir1), (_, dir2)] = [&pools[0], &pools[1]];
    let spawn = |name: &str, host: &str| {
        Command::new(cowclone_bin())
            .args(["clone", "gold", name, "--host", host, "--home"])
            .arg(&home)
            .env("PATH", log.path_env())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .process_group(0)
            .spawn()
            .unwrap()
    };
    let before = registry_state(&home, &log);

    // A controller killed (with its virsh) mid-upload: nothing is registered; the next clone
    // takes the abandoned replica over; gc drops the dead controller's reservation.
    let mut child = spawn("killed", "h1");
    wait_for_upload(&log, HOSTS[0], &mut child);
    rustix_kill_group(child.id());
    let _ = child.wait_with_output();
    assert_eq!(
        registry_state(&home, &log),
        before,
        "a killed clone left a record"
    );
    log.cowclone_ok(&[
        &"clone", &"gold", &"after", &"--host", &"h1", &"--home", &home,
    ]);
    let gc = log.cowclone_ok(&[&"gc", &"--output", &"json", &"--home", &home]);
    let gc: Value = serde_json::from_str(&gc).unwrap();
    let h1 = gc["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["host"] == "h1")
        .unwrap();
    assert_eq!(
        h1["dropped-pending"],
        serde_json::json!(["cowclone-clone-killed.qcow2"]),
        "{gc}"
    );
    let (hosts, _) = registry_state(&home, &log);
    assert_eq!(hosts[0]["clones"], serde_json::json!(["after"]), "{hosts}");
    let replica = PathBuf::from(hosts[0]["replicas"][0]["path"].as_str().unwrap());
    assert!(
        std::fs::read(&replica).unwrap() == bytes,
        "the replica taken over is the base"
    );
    assert_qemu_check_clean(
        &dir1.join("cowclone-clone-after.qcow2"),
        "overlay after takeover",
    );

    // Host 2's daemon stops mid-upload: the clone is registered and present, or absent.
    let before = registry_state(&home, &log);
    let mut child = spawn("lost", "h2");
    wait_for_upload(&log, HOSTS[1], &mut child);
    // The daemon has started writing the replica: the upload stream is under way.
    let replica2 = dir2.join("cowclone-base-1-gold");
    while child.try_wait().unwrap().is_none()
        && !std::fs::metadata(&replica2).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt;
            m.blocks() > 0
        })
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    hosts_sh(&["stop", "2"]);
    let output = child.wait_with_output().unwrap();
    let after = registry_state(&home, &log);
    eprintln!(
        "clone with host 2 stopped mid-upload: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    );
    if output.status.success() {
        assert_eq!(
            after.0[1]["clones"],
            serde_json::json!(["lost"]),
            "{}",
            describe(&output)
        );
        assert!(dir2.join("cowclone-clone-lost.qcow2").exists());
    } else {
        assert_eq!(
            after,
            before,
            "a failed clone left a record: {}",
            describe(&output)
        );
    }
    hosts_sh(&["start", "2"]);
    // Once the host is back, gc leaves exactly the claimed volumes in its pool.
    log.cowclone_ok(&[&"gc", &"--home", &home]);
    let (hosts, _) = registry_state(&home, &log);
    let mut claimed: Vec<String> = hosts[1]["clones"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("cowclone-clone-{}.qcow2", c.as_str().unwrap()))
        .chain(
            hosts[1]["replicas"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["volume"].as_str().unwrap().to_owned()),
        )
        .collect();
    claimed.sort();
    let mut present: Vec<String> = std::fs::read_dir(dir2)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    present.sort();
    assert_eq!(present, claimed, "host 2's pool after gc");
}

/// SIGKILL to the process group `pgid` (a controller and the virsh it runs).
fn rustix_kill_group(pgid: u32) {
    let status = Command::new("kill")
        .args(["-KILL", "--", &format!("-{pgid}")])
        .status()
        .expect("kill runs");
    assert!(status.success());
}
