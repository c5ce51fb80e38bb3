//! Clones booted for real under qemu-system (TCG: nested KVM hangs on the build machine) with
//! the tiny guest of `vm_guest`, through the CLI: start/status/ls/stop and provision. What the
//! guest did is checked by cowclone's reader and by qemu-img; the base must stay byte-identical.
//! Needs `qemu-system-x86_64` (Debian `qemu-system-x86`), `qemu-img` (`qemu-utils`), and the
//! kernel and busybox packages named in `vm_guest`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::{assert_qemu_check_clean, cowclone, cowclone_ok, describe, qemu_img_ok};
use crate::vm_guest::guest;

/// Stops the clone's VM when the test ends, pass or fail.
struct StopOnDrop {
    home: PathBuf,
    name: String,
}

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = cowclone(&[
            &"stop",
            &self.name,
            &"--home",
            &self.home,
            &"--timeout",
            &"1",
        ]);
    }
}

fn state(home: &Path, name: &str) -> String {
    let out = cowclone_ok(&[&"status", &name, &"--home", &home, &"--output", &"json"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    v["state"].as_str().unwrap().to_owned()
}

/// `cowclone start NAME EXTRA...` of the test guest under TCG in marker mode (it reads the
/// pattern, writes the marker and powers off); `extra` adds options (`--dry-run`, `--driver`).
pub(crate) fn start_marker_guest(home: &Path, name: &str, extra: &[&str]) -> std::process::Output {
    start_guest(
        home,
        name,
        "console=ttyS0 quiet panic=-1 cowclone.test=marker",
        extra,
    )
}

/// `cowclone start NAME EXTRA...` of the test guest under TCG with kernel command line
/// `append` (without the marker option the guest boots and stays up).
fn start_guest(home: &Path, name: &str, append: &str, extra: &[&str]) -> std::process::Output {
    let g = guest();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"start",
        &name,
        &"--home",
        &home,
        &"--accel",
        &"tcg",
        &"--memory",
        &"256M",
        &"--kernel",
        &g.kernel,
        &"--initrd",
        &g.initrd,
        &"--append",
        &append,
    ];
    for option in extra {
        args.push(option);
    }
    cowclone(&args)
}

/// `cowclone provision SCRIPT --name NAME [--keep-running] --output json`, booting the test
/// guest under TCG with kernel command line `append`.
fn provision_json(
    home: &Path,
    script: &Path,
    name: &str,
    keep_running: bool,
    append: &str,
) -> std::process::Output {
    let g = guest();
    let mut args: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![
        &"provision",
        &script,
        &"--home",
        &home,
        &"--name",
        &name,
        &"--accel",
        &"tcg",
        &"--kernel",
        &g.kernel,
        &"--initrd",
        &g.initrd,
        &"--append",
        &append,
        &"--output",
        &"json",
    ];
    if keep_running {
        args.push(&"--keep-running");
    }
    cowclone(&args)
}

fn wait_stopped(home: &Path, name: &str, limit: Duration) {
    let start = Instant::now();
    while state(home, name) != "stopped" {
        assert!(
            start.elapsed() < limit,
            "{name} still running after {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// A 4 MiB raw base carrying `COWCLONE-PATTERN` and a pattern, registered as `gold`.
pub(crate) fn registered_base(dir: &Path, home: &Path) -> (PathBuf, Vec<u8>) {
    let base = dir.join("gold.raw");
    let mut bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    bytes[..16].copy_from_slice(b"COWCLONE-PATTERN");
    std::fs::write(&base, &bytes).unwrap();
    cowclone_ok(&[&"base", &"register", &"gold", &base, &"--home", &home]);
    (base, bytes)
}

#[test]
fn a_booted_clone_writes_its_overlay_and_leaves_the_base_untouched() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let (base, base_bytes) = registered_base(tmp.path(), &home);
    cowclone_ok(&[&"clone", &"gold", &"vm1", &"--home", &home]);
    let _guard = StopOnDrop {
        home: home.clone(),
        name: "vm1".into(),
    };
    // The dry run prints exactly the command line the real start then runs (and logs).
    let dry = start_marker_guest(&home, "vm1", &["--dry-run"]);
    assert!(dry.status.success(), "{}", describe(&dry));
    let dry = String::from_utf8(dry.stdout).unwrap();
    assert_eq!(dry.lines().count(), 1, "{dry}");
    let started = start_marker_guest(&home, "vm1", &[]);
    assert!(started.status.success(), "{}", describe(&started));
    let started = String::from_utf8(started.stdout).unwrap();
    assert!(started.contains("vm1 running"), "{started}");
    // ls shows the running state while it runs (the guest needs seconds under TCG).
    let ls: Value = serde_json::from_str(&cowclone_ok(&[
        &"ls",
        &"--home",
        &home,
        &"--output",
        &"json",
    ]))
    .unwrap();
    let vm1 = ls
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "vm1")
        .unwrap();
    assert_eq!(vm1["state"], "running", "{ls:#}");
    // Starting it again is refused.
    let again = cowclone(&[&"start", &"vm1", &"--home", &home, &"--accel", &"tcg"]);
    assert!(!again.status.success(), "{}", describe(&again));
    assert!(String::from_utf8_lossy(&again.stderr).contains("already running"));

    wait_stopped(&home, "vm1", Duration::from_secs(120));
    let clone_dir = home.join("clones/vm1");
    let serial = std::fs::read_to_string(clone_dir.join("serial.log")).unwrap();
    assert!(
        serial.contains("GUEST-PATTERN: COWCLONE-PATTERN"),
        "{serial}"
    );
    assert!(serial.contains("GUEST: marker written"), "{serial}");
    let log = std::fs::read_to_string(clone_dir.join("commands.log")).unwrap();
    assert!(
        log.contains("qemu-system-x86_64") && log.contains(r#""backing":"disk1""#),
        "{log}"
    );
    assert!(
        log.lines()
            .any(|l| l.contains(&format!(" {} # exit status: 0", dry.trim()))),
        "the dry run's line is not what ran:\n{dry}\n{log}"
    );

    // The marker is in the overlay: read by cowclone and by qemu-img.
    let overlay = clone_dir.join("disk.qcow2");
    let ours = tmp.path().join("ours.raw");
    cowclone_ok(&[&"convert", &"-O", &"raw", &overlay, &ours]);
    let theirs = tmp.path().join("theirs.raw");
    qemu_img_ok(&[&"convert", &"-O", &"raw", &overlay, &theirs]);
    for view in [&ours, &theirs] {
        let bytes = std::fs::read(view).unwrap();
        assert_eq!(
            &bytes[1 << 20..(1 << 20) + 17],
            b"MARKER-FROM-GUEST",
            "{}",
            view.display()
        );
        let mut expected = base_bytes.clone();
        expected[1 << 20..(1 << 20) + 18].copy_from_slice(b"MARKER-FROM-GUEST\n");
        assert!(
            bytes == expected,
            "{}: only the marker differs from the base",
            view.display()
        );
    }
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base changed"
    );
    assert_qemu_check_clean(&overlay, "overlay after the guest ran");
    assert_eq!(
        cowclone_ok(&[&"stop", &"vm1", &"--home", &home]),
        "vm1: was not running\n"
    );
}

/// `start --dry-run` with `--accel auto` runs nothing, not even the KVM probe, and prints the
/// probe with both outcomes.
#[test]
fn a_dry_run_with_auto_accel_shows_the_probe_and_both_command_lines() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    registered_base(tmp.path(), &home);
    cowclone_ok(&[&"clone", &"gold", &"vm1", &"--home", &home]);
    let dry = cowclone_ok(&[&"start", &"vm1", &"--home", &home, &"--dry-run"]);
    let lines: Vec<&str> = dry.lines().collect();
    assert_eq!(lines.len(), 6, "{dry}");
    assert!(lines[0].starts_with("# --accel auto: KVM only if"), "{dry}");
    assert!(
        lines[1].starts_with("qemu-system-x86_64 -accel kvm -machine pc -m 16"),
        "{dry}"
    );
    assert_eq!(
        (lines[2], lines[4]),
        ("# if it does:", "# otherwise:"),
        "{dry}"
    );
    assert!(
        lines[3].contains(" -accel kvm ") && lines[5].contains(" -accel tcg "),
        "{dry}"
    );
    assert_eq!(
        lines[3].replace(" -accel kvm ", " -accel tcg "),
        lines[5],
        "the two outcomes differ only in the accelerator"
    );
    let clone_dir = home.join("clones/vm1");
    for ran in ["commands.log", "qemu.pid", "kvm-probe.img"] {
        assert!(!clone_dir.join(ran).exists(), "a dry run left {ran}");
    }
}

/// A clone of a clone of a qcow2 base: three qcow2 layers, the bottom one with `"backing":
/// null`, in a home whose path has a comma (escaped in `-chardev`, verbatim in JSON). qemu must
/// open the chain exactly as given; the guest reads the base's pattern through both overlays.
#[test]
fn a_clone_of_a_clone_of_a_qcow2_base_boots_and_writes_only_its_own_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home,1");
    let raw = tmp.path().join("gold.raw");
    let mut bytes: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
    bytes[..16].copy_from_slice(b"COWCLONE-PATTERN");
    std::fs::write(&raw, &bytes).unwrap();
    let base = tmp.path().join("gold.qcow2");
    qemu_img_ok(&[&"convert", &"-O", &"qcow2", &raw, &base]);
    cowclone_ok(&[&"base", &"register", &"gold", &base, &"--home", &home]);
    cowclone_ok(&[&"clone", &"gold", &"mid", &"--home", &home]);
    cowclone_ok(&[&"clone", &"mid", &"vm2", &"--home", &home]);
    let mid = home.join("clones/mid/disk.qcow2");
    let base_before = std::fs::read(&base).unwrap();
    let mid_before = std::fs::read(&mid).unwrap();
    let _guard = StopOnDrop {
        home: home.clone(),
        name: "vm2".into(),
    };
    let started = start_marker_guest(&home, "vm2", &[]);
    assert!(started.status.success(), "{}", describe(&started));
    wait_stopped(&home, "vm2", Duration::from_secs(120));
    let clone_dir = home.join("clones/vm2");
    let serial = std::fs::read_to_string(clone_dir.join("serial.log")).unwrap();
    assert!(
        serial.contains("GUEST-PATTERN: COWCLONE-PATTERN"),
        "{serial}"
    );
    assert!(serial.contains("GUEST: marker written"), "{serial}");
    let log = std::fs::read_to_string(clone_dir.join("commands.log")).unwrap();
    for node in [
        r#""backing":"disk1""#,
        r#""backing":"disk2""#,
        r#""backing":null"#,
    ] {
        assert!(log.contains(node), "{node} missing: {log}");
    }

    let overlay = clone_dir.join("disk.qcow2");
    let ours = tmp.path().join("ours.raw");
    cowclone_ok(&[&"convert", &"-O", &"raw", &overlay, &ours]);
    let theirs = tmp.path().join("theirs.raw");
    qemu_img_ok(&[&"convert", &"-O", &"raw", &overlay, &theirs]);
    let mut expected = bytes.clone();
    expected[1 << 20..(1 << 20) + 18].copy_from_slice(b"MARKER-FROM-GUEST\n");
    for view in [&ours, &theirs] {
        assert!(
            std::fs::read(view).unwrap() == expected,
            "{}: the base's bytes plus the marker",
            view.display()
        );
    }
    assert!(
        std::fs::read(&base).unwrap() == base_before,
        "the base changed"
    );
    assert!(
        std::fs::read(&mid).unwrap() == mid_before,
        "the middle clone changed"
    );
    assert_qemu_check_clean(&overlay, "top overlay after the guest ran");
    assert_qemu_check_clean(&mid, "middle overlay after the guest ran");
}

#[test]
fn provision_runs_a_script_in_a_fresh_clone_and_returns_output_and_status() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    registered_base(tmp.path(), &home);
    let script = tmp.path().join("job.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n: <<'PLAN'\n/* rexxjs-vm-base: gold */\n/* rexxjs-vm-memory: 256M */\n\
         /* rexxjs-vm-timeout: 120 */\nPLAN\necho \"hello from $(uname -s)\"\n\
         echo to-stderr >&2\nprintf 'crlf\\r\\n'\nexit 3\n",
    )
    .unwrap();
    // Not quiet: kernel messages fill the console while the report has a port of its own.
    let output = provision_json(&home, &script, "job1", false, "console=ttyS0 panic=-1");
    let _guard = StopOnDrop {
        home: home.clone(),
        name: "job1".into(),
    };
    assert_eq!(
        output.status.code(),
        Some(3),
        "exit status is the script's: {}",
        describe(&output)
    );
    let outcome: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        outcome["output"], "hello from Linux\nto-stderr\ncrlf\r\n",
        "{outcome:#}"
    );
    assert_eq!(outcome["exit-status"], 3);
    assert_eq!(outcome["clone"], "job1");
    assert_eq!(outcome["kept-running"], false);
    let serial = std::fs::read_to_string(outcome["serial-log"].as_str().unwrap()).unwrap();
    assert!(
        serial.contains("Linux version"),
        "the console had the kernel's messages"
    );
    let report = std::fs::read_to_string(outcome["result-log"].as_str().unwrap()).unwrap();
    assert!(!report.contains("Linux version"), "{report}");
    // The VM was stopped and the clone is registered.
    assert_eq!(state(&home, "job1"), "stopped");
    let ls = cowclone_ok(&[&"ls", &"--home", &home]);
    assert!(ls.contains("job1"), "{ls}");
}

/// `provision --keep-running` leaves the VM up; `status` sees it running and `stop` powers it
/// down through the ACPI power button (QMP `system_powerdown`), without needing `quit`.
#[test]
fn a_kept_vm_runs_until_stop_powers_it_down_through_acpi() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    registered_base(tmp.path(), &home);
    let script = tmp.path().join("job.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\n: <<'PLAN'\n/* rexxjs-vm-base: gold */\n/* rexxjs-vm-memory: 256M */\n\
         /* rexxjs-vm-timeout: 120 */\nPLAN\necho kept\n",
    )
    .unwrap();
    let _guard = StopOnDrop {
        home: home.clone(),
        name: "kept".into(),
    };
    let output = provision_json(&home, &script, "kept", true, "console=ttyS0 quiet panic=-1");
    assert!(output.status.success(), "{}", describe(&output));
    let outcome: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(outcome["output"], "kept\n", "{outcome:#}");
    assert_eq!(outcome["kept-running"], true);
    assert_eq!(state(&home, "kept"), "running");
    let stopped = cowclone_ok(&[&"stop", &"kept", &"--home", &home, &"--timeout", &"60"]);
    assert_eq!(stopped, "kept: powered down\n");
    assert_eq!(state(&home, "kept"), "stopped");
    let clone_dir = home.join("clones/kept");
    let serial = std::fs::read_to_string(clone_dir.join("serial.log")).unwrap();
    assert!(serial.contains("GUEST: ACPI power button"), "{serial}");
    let log = std::fs::read_to_string(clone_dir.join("commands.log")).unwrap();
    assert!(log.contains("qmp.sock system_powerdown # ok"), "{log}");
    assert!(!log.contains(" quit #"), "no quit was needed: {log}");
}

/// Networking for real, through a provision plan: `egress-ports P` lets the guest reach the
/// host's 127.0.0.1:P at 10.0.2.100:P (twice: one relay per connection), another host port stays
/// unreachable (`restrict=on`), and `ingress-port Q` lets the host reach the guest's port Q.
#[test]
fn provision_networking_reaches_allowed_endpoints_only_and_accepts_ingress() {
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    registered_base(tmp.path(), &home);
    // The allowed endpoint answers every connection with its sequence number.
    let allowed = TcpListener::bind("127.0.0.1:0").unwrap();
    let allowed_port = allowed.local_addr().unwrap().port();
    // Its second connection also tells the ingress side that the guest's network is up.
    let (network_up, wait_network) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for (n, conn) in allowed.incoming().enumerate() {
            let Ok(mut conn) = conn else { break };
            let _ = writeln!(conn, "EGRESS-OK {n}");
            if n == 1 {
                let _ = network_up.send(());
            }
        }
    });
    // A host service the plan does not allow: it must see no connection.
    let forbidden = TcpListener::bind("127.0.0.1:0").unwrap();
    let forbidden_port = forbidden.local_addr().unwrap().port();
    forbidden.set_nonblocking(true).unwrap();
    let ingress_port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let script = tmp.path().join("net.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n: <<'PLAN'\n/* rexxjs-vm-base: gold */\n/* rexxjs-vm-memory: 256M */\n\
             /* rexxjs-vm-timeout: 120 */\n/* rexxjs-vm-egress-ports: {allowed_port} */\n\
             /* rexxjs-vm-ingress-port: {ingress_port} */\nPLAN\n\
             nc -w 10 10.0.2.100 {allowed_port} </dev/null\n\
             nc -w 10 10.0.2.100 {allowed_port} </dev/null\n\
             nc -w 3 10.0.2.2 {forbidden_port} </dev/null && echo REACHED-FORBIDDEN\n\
             echo INGRESS-OK | nc -l -p {ingress_port}\necho done\n"
        ),
    )
    .unwrap();
    // The host side of the ingress check: connect until the guest's listener answers. Only
    // once the guest's network is up: before, qemu accepts on the host side and keeps retrying
    // the guest for seconds; after, a port nobody listens on is refused at once.
    let ingress = std::thread::spawn(move || {
        if wait_network.recv_timeout(Duration::from_secs(120)).is_err() {
            return String::new();
        }
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(120) {
            if let Ok(mut conn) = TcpStream::connect(("127.0.0.1", ingress_port)) {
                let mut got = String::new();
                let _ = conn.read_to_string(&mut got);
                if got.contains("INGRESS-OK") {
                    return got;
                }
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        String::new()
    });
    let _guard = StopOnDrop {
        home: home.clone(),
        name: "net".into(),
    };
    let output = provision_json(&home, &script, "net", false, "console=ttyS0 quiet panic=-1");
    assert!(output.status.success(), "{}", describe(&output));
    let outcome: Value = serde_json::from_slice(&output.stdout).unwrap();
    // Two connections, two relays; the forbidden port is refused by qemu's restricted network.
    assert_eq!(
        outcome["output"],
        "EGRESS-OK 0\nEGRESS-OK 1\n\
         nc: can't connect to remote host (10.0.2.2): Connection refused\ndone\n",
        "{outcome:#}"
    );
    assert_eq!(ingress.join().unwrap().trim(), "INGRESS-OK");
    assert!(
        forbidden.accept().is_err(),
        "the guest reached a port the plan does not allow"
    );
    let log = std::fs::read_to_string(home.join("clones/net/commands.log")).unwrap();
    assert!(
        log.contains(&format!(
            "guestfwd=tcp:10.0.2.100:{allowed_port}-cmd:{}",
            crate::util::cowclone_bin().display()
        )),
        "{log}"
    );
}

/// The KVM liveness probe's guest is a real guest: run by the probe's own command line, with
/// only the accelerator switched to TCG, it speaks.
#[test]
fn the_kvm_probe_guest_speaks_under_tcg() {
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("kvm-probe.img");
    let serial = tmp.path().join("kvm-probe.serial");
    std::fs::write(&disk, cloner::vm::accel::probe_boot_sector()).unwrap();
    let probe = cloner::vm::accel::probe_invocation("qemu-system-x86_64", tmp.path()).unwrap();
    let mut args = probe.args.clone();
    let accel = args.iter().position(|a| a == "-accel").unwrap() + 1;
    assert_eq!(args[accel], "kvm");
    args[accel] = "tcg".into();
    let mut child = std::process::Command::new(&probe.program)
        .args(&args)
        .spawn()
        .expect("qemu-system-x86_64 not found: install the Debian package qemu-system-x86");
    let start = Instant::now();
    let mut spoke = false;
    while start.elapsed() < Duration::from_secs(30) {
        if std::fs::read(&serial).is_ok_and(|s| s.contains(&b'K')) {
            spoke = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    assert!(spoke, "the probe boot sector printed nothing under TCG");
}

/// `virsh -c qemu:///system STATE-QUERY`, failing the test with how to get libvirt if it is not
/// there.
fn virsh(args: &[&str]) -> std::process::Output {
    std::process::Command::new("virsh")
        .args(["-c", "qemu:///system"])
        .args(args)
        .output()
        .expect(
            "virsh not found: install the Debian packages libvirt-clients, libvirt-daemon and \
             libvirt-daemon-driver-qemu, and start libvirtd (.ci/run does both)",
        )
}

/// The libvirt driver for real: the domain XML with the explicit backingStore chain is defined
/// and started by libvirtd, the guest writes its marker through it, and stop undefines it.
#[test]
fn libvirt_boots_a_clone_from_the_domain_xml() {
    let version = virsh(&["version"]);
    assert!(
        version.status.success(),
        "libvirtd is not reachable at qemu:///system (start it: see .ci/run): {}",
        describe(&version)
    );
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let (base, base_bytes) = registered_base(tmp.path(), &home);
    let name = format!("cowclone-test-{}", std::process::id());
    cowclone_ok(&[&"clone", &"gold", &name, &"--home", &home]);
    struct Undefine(String);
    impl Drop for Undefine {
        fn drop(&mut self) {
            let _ = virsh(&["destroy", &self.0]);
            let _ = virsh(&["undefine", &self.0]);
        }
    }
    let _cleanup = Undefine(name.clone());
    let started = start_marker_guest(
        &home,
        &name,
        &["--driver", "libvirt", "--connect", "qemu:///system"],
    );
    assert!(started.status.success(), "{}", describe(&started));
    let start = Instant::now();
    loop {
        let state = virsh(&["domstate", &name]);
        let text = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        if text == "shut off" {
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(120), "still {text:?}");
        std::thread::sleep(Duration::from_millis(250));
    }
    let overlay = home.join("clones").join(&name).join("disk.qcow2");
    let theirs = tmp.path().join("theirs.raw");
    qemu_img_ok(&[&"convert", &"-O", &"raw", &overlay, &theirs]);
    let bytes = std::fs::read(&theirs).unwrap();
    assert_eq!(&bytes[1 << 20..(1 << 20) + 17], b"MARKER-FROM-GUEST");
    assert!(
        std::fs::read(&base).unwrap() == base_bytes,
        "the base changed"
    );
    assert_qemu_check_clean(&overlay, "overlay after the libvirt guest ran");
    // The XML libvirt kept has the chain cowclone gave it.
    let xml = String::from_utf8_lossy(&virsh(&["dumpxml", &name]).stdout).into_owned();
    assert!(xml.contains(&base.to_string_lossy().into_owned()), "{xml}");
    assert!(xml.contains("<format type='raw'/>"), "{xml}");
    let stopped = cowclone_ok(&[
        &"stop",
        &name,
        &"--home",
        &home,
        &"--driver",
        &"libvirt",
        &"--connect",
        &"qemu:///system",
    ]);
    assert!(stopped.contains("was not running; undefined"), "{stopped}");
    assert!(!virsh(&["domstate", &name]).status.success(), "undefined");
}

/// Issue 12, "any write while a VM runs": a clone booted for real (qemu-system under TCG, the
/// test guest staying up) is held by qemu's locks. Every cowclone write of its disk is refused
/// with qemu's lock error and changes nothing, a read without `-U` is refused as qemu-img
/// refuses it, `-U` reads, and qemu-img agrees about who holds the disk. Once the VM is
/// stopped, the same write goes through and qemu-img judges the disk clean.
#[test]
fn a_booted_vm_holds_its_clone_against_every_cowclone_write() {
    const WRITE_LOCK: &str = "Failed to get \"write\" lock";
    const SHARED_WRITE_LOCK: &str = "Failed to get shared \"write\" lock";
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    registered_base(tmp.path(), &home);
    cowclone_ok(&[&"clone", &"gold", &"held", &"--home", &home]);
    let _guard = StopOnDrop {
        home: home.clone(),
        name: "held".into(),
    };
    // No marker: the guest boots and stays up (it finds no seed to run).
    let started = start_guest(&home, "held", "console=ttyS0 quiet panic=-1", &[]);
    assert!(started.status.success(), "{}", describe(&started));
    let clone_dir = home.join("clones/held");
    let disk = clone_dir.join("disk.qcow2");
    // Wait until the guest has booted far enough to have used its disk.
    let start = Instant::now();
    loop {
        let serial = std::fs::read_to_string(clone_dir.join("serial.log")).unwrap_or_default();
        if serial.contains("GUEST: user-data finished") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "the guest did not come up: {serial}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    assert_eq!(state(&home, "held"), "running");
    let before = std::fs::read(&disk).unwrap();
    let refused = |args: &[&dyn AsRef<std::ffi::OsStr>], message: &str| {
        let output = cowclone(args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains(message),
            "expected {message:?}: {}",
            describe(&output)
        );
    };
    refused(&[&"resize", &disk, &"+1M"], WRITE_LOCK);
    refused(&[&"commit", &disk], WRITE_LOCK);
    refused(&[&"check", &"-r", &"all", &disk], WRITE_LOCK);
    refused(&[&"rebase", &"-u", &"-b", &"", &disk], WRITE_LOCK);
    refused(&[&"info", &disk], SHARED_WRITE_LOCK);
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        before,
        "a refused write changed the disk"
    );
    let shared = cowclone_ok(&[&"info", &"-U", &disk]);
    assert!(shared.contains("file format: qcow2"), "{shared}");
    let qemu = std::process::Command::new("qemu-img")
        .arg("info")
        .arg(&disk)
        .output()
        .expect("qemu-img runs (Debian package qemu-utils)");
    assert!(
        String::from_utf8_lossy(&qemu.stderr).contains(SHARED_WRITE_LOCK),
        "qemu-img does not see the VM's lock either: {}",
        describe(&qemu)
    );
    let stopped = cowclone_ok(&[&"stop", &"held", &"--home", &home, &"--timeout", &"60"]);
    assert_eq!(stopped, "held: powered down\n");
    // Released: the write that was refused now goes through.
    cowclone_ok(&[&"resize", &disk, &"+1M"]);
    assert_qemu_check_clean(&disk, "the clone after its VM stopped");
    let info = qemu_img_ok(&[&"info", &"--output=json", &disk]);
    let info: Value = serde_json::from_str(&info).unwrap();
    assert_eq!(info["virtual-size"], (4 << 20) + (1 << 20), "{info:#}");
}
