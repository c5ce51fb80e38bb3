//! convert, commit, rebase and resize through the CLI, each checked by qemu-img (Debian package
//! qemu-utils): the guest content must be what qemu-img's own operation gives, and every image we
//! wrote must pass `qemu-img check`.

use std::path::Path;
use std::process::Output;

use crate::util::cowclone_in;

fn cowclone(args: &[&str], dir: &Path) -> Output {
    let args: Vec<&dyn AsRef<std::ffi::OsStr>> = args
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    cowclone_in(dir, &args)
}

fn tool(name: &str, args: &[&str], dir: &Path) -> Output {
    crate::util::tool_in(name, dir, args)
}

fn ok(name: &str, args: &[&str], dir: &Path) {
    crate::util::tool_ok_in(name, dir, args);
}

fn ours(args: &[&str], dir: &Path) {
    let out = cowclone(args, dir);
    assert!(
        out.status.success(),
        "cowclone {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_identical(a: &str, b: &str, dir: &Path) {
    let out = tool("qemu-img", &["compare", a, b], dir);
    assert!(
        out.status.success(),
        "qemu-img compare {a} {b}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_clean(image: &str, dir: &Path) {
    let out = tool("qemu-img", &["check", "--output=json", image], dir);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "qemu-img check {image}: {e}: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    for key in ["corruptions", "leaks", "check-errors"] {
        assert_eq!(
            json.get(key).and_then(|v| v.as_u64()).unwrap_or(0),
            0,
            "{image}: {json}"
        );
    }
}

fn allocated(path: &Path) -> u64 {
    crate::util::allocated_bytes(path)
}

/// A 4 MiB image with data, zero, compressed-looking and unallocated regions, made by qemu-io.
fn patterned(dir: &Path, name: &str, backing: Option<&str>) {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if let Some(b) = backing {
        args.extend(["-b", b, "-F", "qcow2"]);
    }
    args.extend([name, "4M"]);
    ok("qemu-img", &args, dir);
    for w in [
        "write -P 0x11 0 64k",
        "write -P 0x22 100k 3k",
        "write -z 1M 64k",
        "write -P 0x44 3M 128k",
    ] {
        ok("qemu-io", &["-f", "qcow2", "-c", w, name], dir);
    }
}

#[test]
fn convert_to_raw_and_qcow2_matches_the_source_and_is_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned(d, "src.qcow2", None);
    ours(&["convert", "-O", "raw", "src.qcow2", "out.raw"], d);
    assert_identical("src.qcow2", "out.raw", d);
    assert!(
        allocated(&d.join("out.raw")) < 1 << 20,
        "raw output is not sparse"
    );
    for (name, opts) in [
        ("plain.qcow2", "cluster_size=64k"),
        ("small.qcow2", "cluster_size=4k,refcount_bits=1"),
        ("v2.qcow2", "compat=0.10"),
        ("ext.qcow2", "extended_l2=on"),
    ] {
        ours(
            &[
                "convert",
                "-p",
                "-O",
                "qcow2",
                "-o",
                opts,
                "src.qcow2",
                name,
            ],
            d,
        );
        assert_identical("src.qcow2", name, d);
        assert_clean(name, d);
    }
}

/// A raw source whose data starts and ends inside clusters (4 KiB blocks, holes between):
/// converted to qcow2 through mappings of the source (the default) and with `pread` (`-U`),
/// which must write the same bytes; qemu-img judges the result identical to the source and
/// clean. Covers the mapped path's partial first and last clusters, one across a cluster
/// boundary, and the disk's partial last cluster.
#[test]
fn convert_of_raw_data_ending_inside_clusters_maps_and_reads_alike() {
    use std::os::unix::fs::FileExt;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let file = std::fs::File::create(d.join("src.raw")).unwrap();
    let size = (1u64 << 20) + 12 * 1024;
    file.set_len(size).unwrap();
    // Each run its own request (a whole empty cluster between them): inside one cluster;
    // across a cluster boundary; partial first and last clusters with whole ones between; in
    // the disk's partial last cluster.
    for (at, len, byte) in [
        (4u64 << 10, 8u64 << 10, 0x5au8),
        (196 << 10, 72 << 10, 0x6b),
        (400 << 10, 200 << 10, 0x7c),
        ((1 << 20) + (4 << 10), 8 << 10, 0x9e),
    ] {
        file.write_all_at(&vec![byte; len as usize], at).unwrap();
    }
    drop(file);
    for (name, extra) in [("mapped.qcow2", None), ("pread.qcow2", Some("-U"))] {
        let mut args = vec!["convert"];
        args.extend(extra);
        args.extend(["-f", "raw", "-O", "qcow2", "src.raw", name]);
        ours(&args, d);
        assert_identical("src.raw", name, d);
        assert_clean(name, d);
    }
    assert!(
        std::fs::read(d.join("mapped.qcow2")).unwrap()
            == std::fs::read(d.join("pread.qcow2")).unwrap(),
        "mapped and pread conversions wrote different files"
    );
}

#[test]
fn compressed_convert_is_read_by_qemu_and_smaller() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let text: Vec<u8> = (0..(4u32 << 20))
        .map(|i| b"cowclone compresses "[(i % 20) as usize])
        .collect();
    std::fs::write(d.join("text.raw"), &text).unwrap();
    for (name, opts) in [
        ("deflate.qcow2", "compression_type=zlib"),
        ("zstd.qcow2", "compression_type=zstd"),
    ] {
        ours(
            &[
                "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, "text.raw", name,
            ],
            d,
        );
        assert_identical("text.raw", name, d);
        assert_clean(name, d);
        assert!(
            allocated(&d.join(name)) < 1 << 20,
            "{name} is not compressed"
        );
        // qemu-img map reports compressed clusters as data without an offset.
        let map = tool("qemu-img", &["map", "--output=json", name], d);
        assert!(
            !String::from_utf8_lossy(&map.stdout).contains("\"offset\""),
            "{name}: clusters not compressed"
        );
    }
}

#[test]
fn convert_with_a_backing_file_writes_only_what_differs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned(d, "base.qcow2", None);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        d,
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x99 2M 64k",
            "-c",
            "write -z 0 64k",
            "top.qcow2",
        ],
        d,
    );
    ours(
        &[
            "convert",
            "-O",
            "qcow2",
            "-B",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "delta.qcow2",
        ],
        d,
    );
    assert_identical("top.qcow2", "delta.qcow2", d);
    assert_clean("delta.qcow2", d);
    let map = tool("qemu-img", &["map", "--output=json", "delta.qcow2"], d);
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout).unwrap();
    let own_bytes: u64 = entries
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(
        own_bytes,
        128 << 10,
        "only the two changed clusters belong to the delta: {entries:?}"
    );
}

#[test]
fn commit_folds_the_overlay_into_its_base_like_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for prefix in ["ours", "theirs"] {
        patterned(d, &format!("{prefix}-base.qcow2"), None);
        let base = format!("{prefix}-base.qcow2");
        let top = format!("{prefix}-top.qcow2");
        ok(
            "qemu-img",
            &[
                "create", "-q", "-f", "qcow2", "-b", &base, "-F", "qcow2", &top,
            ],
            d,
        );
        ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                "write -P 0x77 64k 200k",
                "-c",
                "write -z 3M 64k",
                &top,
            ],
            d,
        );
    }
    ok(
        "qemu-img",
        &["convert", "-O", "raw", "ours-top.qcow2", "expected.raw"],
        d,
    );
    ours(&["commit", "ours-top.qcow2"], d);
    ok("qemu-img", &["commit", "-q", "theirs-top.qcow2"], d);
    assert_identical("ours-base.qcow2", "expected.raw", d);
    assert_identical("ours-base.qcow2", "theirs-base.qcow2", d);
    assert_identical("ours-top.qcow2", "expected.raw", d);
    assert_clean("ours-base.qcow2", d);
    assert_clean("ours-top.qcow2", d);
    let map = tool("qemu-img", &["map", "--output=json", "ours-top.qcow2"], d);
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout).unwrap();
    assert!(
        entries
            .iter()
            .all(|e| e["depth"] != 0 || e["present"] == false),
        "overlay not emptied: {entries:?}"
    );
    // Issue 11: the emptied overlay is shrunk as qemu shrinks it, and a zero run of the
    // overlay becomes a zero cluster in the base, never allocated data.
    let (ours_len, theirs_len) = (
        crate::util::file_len(&d.join("ours-top.qcow2")),
        crate::util::file_len(&d.join("theirs-top.qcow2")),
    );
    assert!(
        ours_len <= theirs_len,
        "emptied overlay is {ours_len} bytes, qemu-img leaves {theirs_len}"
    );
    for base in ["ours-base.qcow2", "theirs-base.qcow2"] {
        let map = tool("qemu-img", &["map", "--output=json", base], d);
        let entries: Vec<serde_json::Value> = serde_json::from_slice(&map.stdout).unwrap();
        let at_3m = entries
            .iter()
            .find(|e| {
                e["start"].as_u64() <= Some(3 << 20)
                    && e["start"].as_u64().unwrap() + e["length"].as_u64().unwrap() > 3 << 20
            })
            .unwrap();
        assert_eq!(
            (&at_3m["zero"], &at_3m["data"]),
            (
                &serde_json::Value::Bool(true),
                &serde_json::Value::Bool(false)
            ),
            "{base}: the committed zero run is not a zero cluster: {entries:?}"
        );
    }
}

#[test]
fn commit_into_a_raw_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("base.raw"), vec![0x3cu8; 2 << 20]).unwrap();
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
        d,
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5d 1000 70000", "top.qcow2"],
        d,
    );
    ok(
        "qemu-img",
        &["convert", "-O", "raw", "top.qcow2", "expected.raw"],
        d,
    );
    ours(&["commit", "top.qcow2"], d);
    assert_identical("base.raw", "expected.raw", d);
    assert_clean("top.qcow2", d);
}

#[test]
fn safe_rebase_keeps_guest_data_and_matches_qemu_img_rebase() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned(d, "old.qcow2", None);
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "new.qcow2", "4M"],
        d,
    );
    ok(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 64k",
            "-c",
            "write -P 0xee 2M 1M",
            "new.qcow2",
        ],
        d,
    );
    for prefix in ["ours", "theirs"] {
        let top = format!("{prefix}.qcow2");
        ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-b",
                "old.qcow2",
                "-F",
                "qcow2",
                &top,
            ],
            d,
        );
        ok(
            "qemu-io",
            &["-f", "qcow2", "-c", "write -P 0x42 3M 4k", &top],
            d,
        );
    }
    ok(
        "qemu-img",
        &["convert", "-O", "raw", "ours.qcow2", "expected.raw"],
        d,
    );
    ours(
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "ours.qcow2"],
        d,
    );
    ok(
        "qemu-img",
        &["rebase", "-b", "new.qcow2", "-F", "qcow2", "theirs.qcow2"],
        d,
    );
    assert_identical("ours.qcow2", "expected.raw", d);
    assert_identical("ours.qcow2", "theirs.qcow2", d);
    assert_clean("ours.qcow2", d);
    let info = tool("qemu-img", &["info", "--output=json", "ours.qcow2"], d);
    let json: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(json["backing-filename"], "new.qcow2");
    assert_eq!(json["backing-filename-format"], "qcow2");
    // Where the old chain reads zeros and the new one has data (2M..3M), qemu-img writes the
    // zeros as data: the allocation must be qemu-img's, host offsets included.
    let map = |name: &str| {
        let out = tool("qemu-img", &["map", "--output=json", name], d);
        String::from_utf8(out.stdout).unwrap()
    };
    let (our_map, their_map) = (map("ours.qcow2"), map("theirs.qcow2"));
    assert_eq!(our_map, their_map, "qemu-img map of the rebased overlays");
    assert!(
        our_map.contains(r#"{ "start": 2097152, "length": 1048576, "depth": 0, "present": true, "zero": false, "data": true"#),
        "{our_map}"
    );

    // Removing the backing file copies everything in.
    ours(&["rebase", "-b", "", "ours.qcow2"], d);
    assert_identical("ours.qcow2", "expected.raw", d);
    let info = tool("qemu-img", &["info", "--output=json", "ours.qcow2"], d);
    let json: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(json.get("backing-filename").is_none(), "{json}");
}

#[test]
fn unsafe_rebase_rewrites_only_the_header() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "a.qcow2", "1M"],
        d,
    );
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        d,
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x42 0 4k", "top.qcow2"],
        d,
    );
    std::fs::write(
        d.join("other-name-for-a-much-longer-backing-file.raw"),
        vec![0u8; 1 << 20],
    )
    .unwrap();
    ours(
        &[
            "rebase",
            "-u",
            "-b",
            "other-name-for-a-much-longer-backing-file.raw",
            "-F",
            "raw",
            "top.qcow2",
        ],
        d,
    );
    let info = tool("qemu-img", &["info", "--output=json", "top.qcow2"], d);
    let json: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(
        json["backing-filename"],
        "other-name-for-a-much-longer-backing-file.raw"
    );
    assert_eq!(json["backing-filename-format"], "raw");
    assert_clean("top.qcow2", d);
    let out = tool(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x42 0 4k", "top.qcow2"],
        d,
    );
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
}

#[test]
fn resize_grows_like_qemu_img_and_refuses_to_lose_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned(d, "r.qcow2", None);
    ours(&["resize", "r.qcow2", "+1G"], d);
    let info = tool("qemu-img", &["info", "--output=json", "r.qcow2"], d);
    let json: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(json["virtual-size"], (4u64 << 20) + (1 << 30));
    assert_clean("r.qcow2", d);
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "read -P 0x44 3M 128k", "r.qcow2"],
        d,
    );
    assert!(
        !cowclone(&["resize", "r.qcow2", "1M"], d).status.success(),
        "shrink without --shrink"
    );
    assert!(
        !cowclone(&["resize", "--shrink", "r.qcow2", "1M"], d)
            .status
            .success(),
        "shrink over data"
    );
    ours(&["resize", "--shrink", "r.qcow2", "3584K"], d);
    assert_clean("r.qcow2", d);
}

#[test]
fn no_backing_reads_the_overlay_alone_like_qemu_with_a_null_backing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    patterned(d, "base.qcow2", None);
    ok(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
        d,
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x99 2M 64k", "top.qcow2"],
        d,
    );
    ours(
        &[
            "convert",
            "--no-backing",
            "-O",
            "raw",
            "top.qcow2",
            "alone.raw",
        ],
        d,
    );
    // qemu's view of the overlay alone: a null backing.
    ok(
        "qemu-img",
        &[
            "convert",
            r#"json:{"driver":"qcow2","file":{"driver":"file","filename":"top.qcow2"},"backing":null}"#,
            "-O",
            "raw",
            "theirs.raw",
        ],
        d,
    );
    assert_identical("alone.raw", "theirs.raw", d);
    let differ = cowclone(&["compare", "--no-backing", "top.qcow2", "base.qcow2"], d);
    assert_eq!(
        differ.status.code(),
        Some(1),
        "without its base the overlay differs from it"
    );
}

#[test]
fn check_cli_exit_codes_and_leak_repair_agree_with_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ok(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "leak.qcow2", "1M"],
        d,
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write 0 4k", "leak.qcow2"],
        d,
    );
    // Clusters 0-5 are in use; add cluster 6 to the file and count it: a leak.
    let path = d.join("leak.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.resize(7 << 16, 0);
    bytes[0x2000c..0x2000e].copy_from_slice(&1u16.to_be_bytes());
    std::fs::write(&path, &bytes).unwrap();
    let qemu = tool("qemu-img", &["check", "leak.qcow2"], d);
    let ours = cowclone(&["check", "leak.qcow2"], d);
    assert_eq!(qemu.status.code(), Some(3), "qemu sees a leak");
    assert_eq!(ours.status.code(), qemu.status.code());
    let json = cowclone(&["check", "--output", "json", "leak.qcow2"], d);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(report["leaks"], 1, "{report}");
    let repaired = cowclone(&["check", "-r", "leaks", "leak.qcow2"], d);
    assert_eq!(
        repaired.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&repaired.stdout)
    );
    assert_clean("leak.qcow2", d);
}
