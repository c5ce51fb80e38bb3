//! The command line as a shell sees it: usage errors and their exit codes, global options
//! before or after the subcommand, `-v` logging, completions and the manual page. Commands that
//! need no real process are called in-process through `cowclone_cli::run`.

use std::path::Path;

use clap::Parser;
use cowclone_cli::args::Cli;

use crate::util::*;

/// Runs one command line in-process; returns its exit code and what it wrote.
pub fn run_in_process(argv: &[&str]) -> (u8, String) {
    let cli = Cli::try_parse_from(std::iter::once("cowclone").chain(argv.iter().copied()))
        .unwrap_or_else(|e| panic!("cowclone {argv:?} did not parse: {e}"));
    let mut out = Vec::new();
    let code = match cowclone_cli::run(cli, &mut out) {
        Ok(code) => code,
        Err((e, code)) => panic!(
            "cowclone {argv:?} failed (exit {code}): {}",
            cowclone_cli::error_line(&e)
        ),
    };
    (code, String::from_utf8(out).expect("output is UTF-8"))
}

/// The exit status of a real `cowclone` process.
fn exit_code(args: &[&str]) -> (i32, String, String) {
    let out = cowclone(&args_of(args));
    (
        out.status.code().expect("exited"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn usage_errors_exit_1_as_qemu_img_does_and_help_exits_0() {
    // qemu-img's own exit code for a usage error, measured here, is the reference.
    let theirs = qemu_img(&args_of(&["info"])).status.code();
    assert_eq!(theirs, Some(1), "qemu-img info without a file");
    for bad in [
        &["info"][..],
        &["--no-such-option", "info", "x"],
        &["check", "-r", "sideways", "x"],
        &["map", "--output", "xml", "x"],
        &["no-such-command"],
        &[],
    ] {
        let (code, stdout, stderr) = exit_code(bad);
        assert_eq!(code, 1, "cowclone {bad:?}: {stderr}");
        assert!(
            stdout.is_empty(),
            "cowclone {bad:?} printed on stdout: {stdout}"
        );
        assert!(!stderr.is_empty(), "cowclone {bad:?} said nothing");
    }
    for ok in [&["--help"][..], &["info", "--help"], &["--version"]] {
        let (code, stdout, _) = exit_code(ok);
        assert_eq!(code, 0, "cowclone {ok:?}");
        assert!(stdout.contains("cowclone"), "cowclone {ok:?}: {stdout}");
    }
}

#[test]
fn home_is_accepted_before_and_after_the_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.qcow2");
    qemu_img_ok(&args_of(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &base.to_string_lossy(),
        "1M",
    ]));
    let before = tmp.path().join("before");
    let after = tmp.path().join("after");
    let (b, a) = (before.to_string_lossy(), after.to_string_lossy());
    let disk = base.to_string_lossy();
    run_in_process(&["--home", &b, "base", "register", "one", &disk]);
    run_in_process(&["base", "register", "two", &disk, "--home", &a]);
    run_in_process(&["--home", &b, "clone", "one", "web-1"]);
    run_in_process(&["clone", "two", "web-2", "--home", &a]);
    let names = |argv: &[&str]| -> Vec<String> {
        let (_, json) = run_in_process(argv);
        let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
        rows.as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        names(&["--home", &b, "ls", "--output", "json"]),
        ["one", "web-1"]
    );
    assert_eq!(
        names(&["ls", "--output=json", "--home", &b]),
        ["one", "web-1"]
    );
    assert_eq!(
        names(&["--home", &a, "ls", "--output=json"]),
        ["two", "web-2"]
    );
    // The clone lies under the home it was made in, whichever side named it.
    assert!(before.join("clones").join("web-1").exists());
    assert!(after.join("clones").join("web-2").exists());
}

#[test]
fn verbose_logs_steps_and_layers_on_stderr_only() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qemu_img_ok(&args_of(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        &dir.join("b.qcow2").to_string_lossy(),
        "1M",
    ]));
    qemu_img_ok(&args_of(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        "b.qcow2",
        "-F",
        "qcow2",
        &dir.join("t.qcow2").to_string_lossy(),
    ]));
    let top = dir.join("t.qcow2");
    let top = top.to_string_lossy();
    let quiet = cowclone(&args_of(&["map", &top]));
    let loud = cowclone(&args_of(&["-vv", "map", &top]));
    assert!(quiet.status.success() && loud.status.success());
    assert_eq!(
        quiet.stdout, loud.stdout,
        "logging must not change the output"
    );
    assert!(quiet.stderr.is_empty(), "{}", describe(&quiet));
    let log = String::from_utf8_lossy(&loud.stderr);
    // One event per layer the chain walker opened, both named.
    for layer in ["t.qcow2", "b.qcow2"] {
        assert!(
            log.lines()
                .any(|l| l.contains("chain layer opened") && l.contains(layer)),
            "{log}"
        );
    }
    assert!(log.contains("command finished"), "{log}");
    // -vv shows every external tool run, here virsh asking a host that does not answer.
    let home = dir.join("home");
    let refused = cowclone(&args_of(&[
        "-vv",
        "--home",
        &home.to_string_lossy(),
        "host",
        "add",
        "nowhere",
        "--connect",
        "qemu+tcp://127.0.0.1:1/system",
    ]));
    assert_eq!(refused.status.code(), Some(1), "{}", describe(&refused));
    let log = String::from_utf8_lossy(&refused.stderr);
    assert!(
        log.lines().any(|l| l.contains("running")
            && l.contains("virsh -q --connect qemu+tcp://127.0.0.1:1/system")),
        "{log}"
    );
    // RUST_LOG takes precedence over -v: here it silences cowclone's own events.
    let out = std::process::Command::new(cowclone_bin())
        .args(["-vv", "map", &top])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(out.stderr.is_empty(), "{}", describe(&out));
}

#[test]
fn completions_and_man_pages_cover_every_subcommand() {
    let (_, bash) = run_in_process(&["completions", "bash"]);
    let (_, zsh) = run_in_process(&["completions", "zsh"]);
    let (_, man) = run_in_process(&["man"]);
    assert!(bash.contains("complete -F _cowclone"), "{bash}");
    assert!(zsh.starts_with("#compdef cowclone"), "{zsh}");
    assert!(man.contains(".TH cowclone 1"), "{man}");
    for sub in [
        "info",
        "check",
        "map",
        "convert",
        "clone",
        "ls",
        "completions",
    ] {
        assert!(
            bash.contains(&format!("cowclone__subcmd__{sub}")),
            "bash lacks {sub}"
        );
        assert!(
            man.contains(&format!("cowclone\\-{sub}(1)")),
            "man lacks {sub}"
        );
    }
    // bash itself accepts the script.
    let tmp = tempfile::tempdir().unwrap();
    let script = tmp.path().join("cowclone.bash");
    std::fs::write(&script, &bash).unwrap();
    let out = std::process::Command::new("bash")
        .arg("-n")
        .arg(&script)
        .output()
        .expect("bash (package bash) is needed");
    assert!(out.status.success(), "{}", describe(&out));
    // `man --dir` writes one page per subcommand that man(1) can render.
    let pages = tmp.path().join("man");
    run_in_process(&["man", "--dir", &pages.to_string_lossy()]);
    assert!(pages.join("cowclone.1").is_file());
    assert!(pages.join("cowclone-info.1").is_file());
    assert!(pages.join("cowclone-base-register.1").is_file());
    man_renders(&pages.join("cowclone-info.1"));
}

/// man(1) renders the page without warnings (package man-db).
fn man_renders(page: &Path) {
    let out = std::process::Command::new("man")
        .args(["--warnings", "-l", "-P", "cat"])
        .arg(page)
        .env("MANWIDTH", "100")
        .output()
        .expect("man (package man-db) is needed to render the manual pages");
    assert!(out.status.success(), "{}", describe(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("--output"), "{text}");
}

#[test]
fn check_cache_mode_and_info_format_are_accepted_as_qemu_img_accepts_them() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("i.qcow2");
    let path = image.to_string_lossy();
    qemu_img_ok(&args_of(&["create", "-q", "-f", "qcow2", &path, "1M"]));
    qemu_io_ok(&args_of(&["-f", "qcow2", "-c", "write -P 1 0 64k", &path]));
    for args in [
        &["check", "-T", "none", &path][..],
        &[
            "check",
            "-T",
            "writeback",
            "-f",
            "qcow2",
            "--output=json",
            &path,
        ],
        &["info", "-f", "raw", "--output=json", &path],
        &["info", "-f", "qcow2", &path],
    ] {
        let theirs = qemu_img(&args_of(args));
        let ours = cowclone(&args_of(args));
        assert_eq!(ours.status.code(), theirs.status.code(), "{args:?}");
        let (ours, theirs) = (
            String::from_utf8_lossy(&ours.stdout),
            String::from_utf8_lossy(&theirs.stdout),
        );
        if args[0] == "info" {
            // The facts both print; qemu-img has keys cowclone does not (children, ...).
            let top_level = |l: &&str| !l.starts_with("     ");
            for line in theirs.lines().filter(top_level).filter(|l| {
                [
                    "format",
                    "virtual-size",
                    "file format",
                    "virtual size",
                    "cluster_size",
                ]
                .iter()
                .any(|k| l.trim_start().trim_start_matches('"').starts_with(k))
            }) {
                assert!(
                    ours.lines().any(|o| o == line),
                    "{args:?}: {line:?} missing in\n{ours}"
                );
            }
        } else {
            assert_eq!(ours, theirs, "{args:?}");
        }
    }
    // A format the file is not in is refused by both; so is an unknown cache mode.
    for args in [
        &["info", "-f", "vdi", &path][..],
        &["check", "-T", "bogus", &path],
    ] {
        assert_eq!(
            qemu_img(&args_of(args)).status.code(),
            Some(1),
            "qemu-img {args:?}"
        );
        assert_eq!(
            cowclone(&args_of(args)).status.code(),
            Some(1),
            "cowclone {args:?}"
        );
    }
}
