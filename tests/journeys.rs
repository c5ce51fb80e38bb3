//! CLI journeys, called in-process, with both human and JSON output snapshotted (insta; the
//! snapshots are in `tests/snapshots/`, temporary paths and dates redacted). Where qemu-img has
//! the same command, its output for the same files is the reference the snapshot must equal.

use std::path::Path;

use crate::cli_shell::run_in_process;
use crate::util::*;

/// Runs `cowclone ARGS` in-process with snapshot filters for `dir` and dates; returns the exit
/// code and the output.
fn run(dir: &Path, args: &[&str]) -> (u8, String) {
    let (code, out) = run_in_process(args);
    (code, redact(dir, &out))
}

/// The output with `dir` written as `[DIR]`, the digits of RFC 3339 times as `0` (the same
/// width, so tables stay aligned) and a fingerprint's mtime and checksum (they change with the
/// file's timestamps) as `[REDACTED]`.
fn redact(dir: &Path, text: &str) -> String {
    let text = text.replace(&*dir.to_string_lossy(), "[DIR]");
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while let Some(c) = rest.chars().next() {
        let bytes = rest.as_bytes();
        // 2026-12-02T03:39:18.641Z (fraction optional)
        let is_time = bytes.len() >= 20
            && bytes[..4].iter().all(u8::is_ascii_digit)
            && bytes[4] == b'-'
            && bytes[7] == b'-'
            && bytes[10] == b'T'
            && bytes[13] == b':';
        if is_time {
            let end = bytes
                .iter()
                .position(|&b| b == b'Z')
                .map_or(bytes.len(), |z| z + 1);
            out.extend(
                rest[..end]
                    .chars()
                    .map(|c| if c.is_ascii_digit() { '0' } else { c }),
            );
            rest = &rest[end..];
        } else if let Some((key, after)) = ["\"mtime-ns\": ", "\"metadata-crc32\": "]
            .iter()
            .find_map(|key| Some((key, rest.strip_prefix(key)?)))
        {
            out.push_str(key);
            out.push_str("[REDACTED]");
            rest = after.trim_start_matches(|c: char| c.is_ascii_digit());
        } else {
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// qemu-img's stdout for `args`, with `dir` redacted.
fn qemu(dir: &Path, args: &[&str]) -> String {
    let out = qemu_img(&args_of(args));
    redact(dir, &String::from_utf8_lossy(&out.stdout))
}

#[test]
fn image_journey_create_info_map_check_convert_compare() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let path = |name: &str| dir.join(name).to_string_lossy().into_owned();
    let (base, top, flat) = (path("base.qcow2"), path("top.qcow2"), path("flat.qcow2"));

    let (_, created) = run(dir, &["create", "-f", "qcow2", &base, "4M"]);
    insta::assert_snapshot!("create_base", created);
    qemu_io_ok(&args_of(&[
        "-f",
        "qcow2",
        "-c",
        "write -P 0x11 0 192k",
        &base,
    ]));
    let (_, created) = run(dir, &["create", "-b", "base.qcow2", "-F", "qcow2", &top]);
    insta::assert_snapshot!("create_overlay", created);
    for c in [
        "write -P 0x22 64k 64k",
        "write -z 1M 128k",
        "write -P 0x33 3M 4k",
    ] {
        qemu_io_ok(&args_of(&["-f", "qcow2", "-c", c, &top]));
    }

    let (_, info) = run(dir, &["info", &top]);
    insta::assert_snapshot!("info_human", info);
    let (_, info) = run(dir, &["info", "--output=json", "--backing-chain", &top]);
    insta::assert_snapshot!("info_chain_json", info);

    // map and check print what qemu-img prints, byte for byte.
    for output in ["human", "json"] {
        let (_, map) = run(dir, &["map", "--output", output, &top]);
        assert_eq!(
            map,
            qemu(dir, &["map", "--output", output, &top]),
            "map {output}"
        );
        insta::assert_snapshot!(format!("map_{output}"), map);
        let (code, check) = run(dir, &["check", "--output", output, &top]);
        assert_eq!(code, 0);
        assert_eq!(
            check,
            qemu(dir, &["check", "--output", output, &top]),
            "check {output}"
        );
        insta::assert_snapshot!(format!("check_{output}"), check);
    }

    let (_, converted) = run(dir, &["convert", "-O", "qcow2", &top, &flat]);
    insta::assert_snapshot!("convert", converted);
    assert_qemu_check_clean(Path::new(&flat), "converted image");
    let (code, compared) = run(dir, &["compare", &top, &flat]);
    assert_eq!(code, 0);
    assert_eq!(compared, qemu(dir, &["compare", &top, &flat]));
    insta::assert_snapshot!("compare_same", compared);
    let (code, compared) = run(dir, &["compare", &base, &top]);
    assert_eq!(code, 1);
    assert_eq!(compared, qemu(dir, &["compare", &base, &top]));
    insta::assert_snapshot!("compare_differ", compared);
}

#[test]
fn registry_journey_register_clone_ls_rm() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let home = dir.join("home");
    let home = home.to_string_lossy();
    let disk = dir.join("gold.qcow2");
    run(dir, &["create", "-q", &disk.to_string_lossy(), "64M"]);
    let (_, registered) = run(
        dir,
        &[
            "--home",
            &home,
            "base",
            "register",
            "gold",
            &disk.to_string_lossy(),
            "--memory",
            "1G",
        ],
    );
    insta::assert_snapshot!("base_register", registered);
    let (_, cloned) = run(
        dir,
        &["clone", "gold", "web", "--count", "10", "--home", &home],
    );
    // The timing line is the machine's; the clones listed are not.
    let cloned: Vec<&str> = cloned.lines().filter(|l| !l.contains(" us ")).collect();
    insta::assert_snapshot!("clone_count", cloned.join("\n"));
    let long = "a".repeat(60) + "-x-1";
    assert_eq!(long.len(), 64);
    run(dir, &["--home", &home, "clone", "web-3", &long]);

    let (_, ls) = run(dir, &["ls", "--home", &home]);
    insta::assert_snapshot!("ls_human", ls);
    // The 64-character name is whole, and every row's columns line up with the header's.
    let header = ls.lines().next().unwrap();
    let path_column = header.find("PATH").unwrap();
    for line in ls.lines().skip(1) {
        assert_eq!(line.find("[DIR]"), Some(path_column), "{line}");
    }
    assert!(ls.contains(&long), "{ls}");
    let (_, json) = run_in_process(&["--home", &home, "ls", "--output=json"]);
    insta::assert_snapshot!("ls_json", redact(dir, &json));
    let rows: serde_json::Value = serde_json::from_str(&json).unwrap();
    let names: Vec<&str> = rows
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    let mut expected = vec![long.clone(), "gold".to_owned()];
    expected.extend((1..=10).map(|i| format!("web-{i}")));
    assert_eq!(names, expected, "natural order");

    // A clone whose file went away is flagged, not hidden.
    std::fs::remove_file(dir.join("home/clones/web-7/disk.qcow2")).unwrap();
    let (_, rm) = run(dir, &["rm", &long, "web-2", "--home", &home]);
    insta::assert_snapshot!("rm", rm);
    let (_, ls) = run(dir, &["--home", &home, "ls"]);
    insta::assert_snapshot!("ls_after_rm", ls);
    assert!(
        ls.lines()
            .any(|l| l.starts_with("web-7 ") && l.contains(" missing ")),
        "{ls}"
    );
    let (_, gc) = run(
        dir,
        &["--home", &home, "gc", "--dry-run", "--output", "json"],
    );
    insta::assert_snapshot!("gc_dry_run_json", gc);
    let (_, log) = run(dir, &["--home", &home, "log"]);
    insta::assert_snapshot!("log_human", log);
}
