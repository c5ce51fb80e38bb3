//! `cowclone bench`: the documented JSON of `bench clone` and `bench io`, the clones it makes
//! checked with qemu-img, the chart, and its refusals. No timing is asserted: only that every
//! figure is there, is consistent, and describes files that really are what they claim.

use std::collections::BTreeSet;
use std::path::Path;

use imagefmt::backing::ChainGuard;
use imagefmt::chain::GuestRead;
use serde_json::Value;

use crate::util::*;

const METHODS: [&str; 6] = [
    "native-qcow2",
    "native-vdi",
    "qemu-img",
    "copy",
    "reflink",
    "vboxmanage",
];
const KEYS: [&str; 7] = [
    "method",
    "median_us",
    "p90_us",
    "apparent_bytes",
    "allocated_bytes",
    "ratio_vs_qemu_img",
    "skipped",
];
const FIGURES: [&str; 5] = [
    "median_us",
    "p90_us",
    "apparent_bytes",
    "allocated_bytes",
    "ratio_vs_qemu_img",
];
const SIZE: u64 = 64 << 20;

fn by_method<'a>(results: &'a [Value], name: &str) -> &'a Value {
    results
        .iter()
        .find(|r| r["method"] == name)
        .unwrap_or_else(|| panic!("no {name} entry in {results:#?}"))
}

fn positive(value: &Value, what: &str) -> f64 {
    let number = value
        .as_f64()
        .unwrap_or_else(|| panic!("{what} is not a number: {value}"));
    assert!(number > 0.0, "{what} = {number}");
    number
}

/// The kept files of one method, in round order.
fn kept(dir: &Path, method: &str, extension: &str) -> Vec<std::path::PathBuf> {
    (0..3)
        .map(|round| dir.join(format!("{method}-{round}.{extension}")))
        .inspect(|p| assert!(p.is_file(), "{} was not kept", p.display()))
        .collect()
}

#[test]
fn bench_clone_json_has_every_method_with_figures_or_a_reason_and_real_clones() {
    let tmp = tempfile::tempdir().unwrap();
    let keep = tmp.path().join("kept");
    let chart = tmp.path().join("chart.svg");
    let stdout = cowclone_ok(&[
        &"bench",
        &"clone",
        &"--count",
        &"3",
        &"--size",
        &"64M",
        &"--output",
        &"json",
        &"--keep",
        &keep,
        &"--plot",
        &chart,
    ]);
    let parsed: Value = serde_json::from_str(&stdout)
        .unwrap_or_else(|e| panic!("bench clone --output json printed no JSON ({e}): {stdout}"));
    let results = parsed.as_array().expect("a JSON array").clone();

    let names: Vec<&str> = results
        .iter()
        .map(|r| r["method"].as_str().unwrap())
        .collect();
    assert_eq!(names, METHODS, "one entry per method, in report order");
    for r in &results {
        let keys: BTreeSet<&str> = r.as_object().unwrap().keys().map(String::as_str).collect();
        for key in KEYS {
            assert!(keys.contains(key), "{key} missing from {r}");
        }
        match &r["skipped"] {
            Value::Null => {
                let median = positive(&r["median_us"], "median_us");
                let p90 = positive(&r["p90_us"], "p90_us");
                assert!(p90 >= median, "p90 below the median: {r}");
                positive(&r["apparent_bytes"], "apparent_bytes");
                positive(&r["allocated_bytes"], "allocated_bytes");
                positive(&r["ratio_vs_qemu_img"], "ratio_vs_qemu_img");
                assert_eq!(r["clones"], 3, "{r}");
            }
            Value::String(reason) => {
                assert!(!reason.trim().is_empty(), "empty reason: {r}");
                for key in FIGURES {
                    assert!(r[key].is_null(), "skipped {} has {key}: {r}", r["method"]);
                }
            }
            other => panic!("skipped is neither null nor a reason: {other}"),
        }
    }
    // What must run wherever the tests run (qemu-img is required by the whole suite).
    for name in ["native-qcow2", "native-vdi", "qemu-img", "copy"] {
        let r = by_method(&results, name);
        assert!(r["skipped"].is_null(), "{name} was skipped: {r}");
    }
    assert_eq!(by_method(&results, "qemu-img")["ratio_vs_qemu_img"], 1.0);
    let reflink = by_method(&results, "reflink");
    if let Some(reason) = reflink["skipped"].as_str() {
        assert!(
            reason.contains("reflink"),
            "the reason says what is missing: {reason}"
        );
    }

    // The figures describe the files: a full copy holds the whole base, an overlay does not.
    let base = keep.join("base.qcow2");
    let base_len = file_len(&base);
    let copy = by_method(&results, "copy");
    assert_eq!(copy["apparent_bytes"], base_len, "{copy}");
    assert!(copy["allocated_bytes"].as_u64().unwrap() >= SIZE, "{copy}");
    let native = by_method(&results, "native-qcow2");
    assert!(
        native["allocated_bytes"].as_u64().unwrap() < SIZE / 100,
        "{native}"
    );

    // The base really holds data, and every kept clone reads as the base through qemu-img.
    let map = qemu_img_ok(&[&"map", &"--output=json", &base]);
    assert!(
        !map.contains("\"data\": false"),
        "the base should be fully allocated: {map}"
    );
    for clone in kept(&keep, "native-qcow2", "qcow2")
        .into_iter()
        .chain(kept(&keep, "qemu-img", "qcow2"))
    {
        assert_qemu_check_clean(&clone, "bench clone overlay");
        let info = qemu_info_json(&clone);
        assert_eq!(info["backing-filename"], "base.qcow2", "{info:#}");
        let output = qemu_img(&[&"compare", &clone, &base]);
        assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
    }
    for copy in kept(&keep, "copy", "qcow2") {
        assert_eq!(
            std::fs::read(&copy).unwrap(),
            std::fs::read(&base).unwrap(),
            "{} is a byte-for-byte copy of the base",
            copy.display()
        );
        assert_qemu_check_clean(&copy, "bench clone full copy");
    }
    // The VDI diffs: differencing images of base.vdi that read as base.vdi reads in qemu-img.
    let base_vdi = keep.join("base.vdi");
    let base_raw = tmp.path().join("base-vdi.raw");
    qemu_img_ok(&[
        &"convert", &"-f", &"vdi", &"-O", &"raw", &base_vdi, &base_raw,
    ]);
    let want = std::fs::read(&base_raw).unwrap();
    for diff in kept(&keep, "native-vdi", "vdi") {
        let mut guard = ChainGuard::default();
        let image =
            imagefmt::vdi::open_vdi(&diff, &imagefmt::vdi::SameDirectory, &mut guard).unwrap();
        assert!(image.header().is_differencing(), "{}", diff.display());
        let mut got = vec![0u8; want.len()];
        image.read_at(&mut got, 0).unwrap();
        assert!(got == want, "{} does not read as base.vdi", diff.display());
    }

    // The chart and the JSON written next to it.
    let svg = std::fs::read_to_string(&chart).expect("--plot wrote the chart");
    assert!(
        svg.trim_start().starts_with("<svg"),
        "not an SVG: {svg:.200}"
    );
    assert!(svg.trim_end().ends_with("</svg>"), "truncated SVG");
    for r in &results {
        let name = r["method"].as_str().unwrap();
        assert_eq!(
            svg.contains(name),
            r["skipped"].is_null(),
            "{name}: on the chart exactly when measured"
        );
    }
    let beside: Value =
        serde_json::from_str(&std::fs::read_to_string(chart.with_extension("json")).unwrap())
            .unwrap();
    assert_eq!(
        beside, parsed,
        "the JSON beside the chart is the printed JSON"
    );
}

#[test]
fn bench_clone_csv_and_refusals() {
    let tmp = tempfile::tempdir().unwrap();
    let stdout = cowclone_ok(&[
        &"bench",
        &"clone",
        &"--count",
        &"1",
        &"--size",
        &"1M",
        &"--methods",
        &"qemu-img,native-qcow2",
        &"--output",
        &"csv",
        &"--dir",
        &tmp.path(),
    ]);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines[0],
        "method,median_us,p90_us,apparent_bytes,allocated_bytes,ratio_vs_qemu_img,clones,skipped"
    );
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[1].starts_with("native-qcow2,"), "{stdout}");
    assert!(
        lines[2].starts_with("qemu-img,") && lines[2].contains(",1,1,"),
        "{stdout}"
    );
    assert_eq!(
        dir_entries(tmp.path()),
        Vec::<String>::new(),
        "the temporary bench directory is removed"
    );

    let not_empty = tmp.path().join("full");
    std::fs::create_dir(&not_empty).unwrap();
    std::fs::write(not_empty.join("precious"), b"x").unwrap();
    for (args, message) in [
        (
            vec!["--methods", "native-qcow2,vmware"],
            "unknown method \"vmware\"",
        ),
        (vec!["--count", "0"], "--count must be at least 1"),
        (vec!["--keep", not_empty.to_str().unwrap()], "not empty"),
    ] {
        let mut full: Vec<&dyn AsRef<std::ffi::OsStr>> = vec![&"bench", &"clone", &"--size", &"1M"];
        full.extend(args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>));
        let output = cowclone(&full);
        assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(message), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    }
    assert_eq!(std::fs::read(not_empty.join("precious")).unwrap(), b"x");
}

#[test]
fn bench_io_reports_both_sides_and_never_modifies_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("disk.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &image, &"8M"]);
    qemu_io_ok(&[&"-c", &"write -P 0x5a 0 8M", &image]);
    let before = std::fs::read(&image).unwrap();

    for (rw, pattern) in [("read", "rand"), ("write", "seq")] {
        let chart = tmp.path().join(format!("io-{rw}.svg"));
        let stdout = cowclone_ok(&[
            &"bench",
            &"io",
            &image,
            &"--rw",
            &rw,
            &"--pattern",
            &pattern,
            &"--block-size",
            &"4K",
            &"--count",
            &"300",
            &"--depth",
            &"2",
            &"--output",
            &"json",
            &"--plot",
            &chart,
            &"--scratch-dir",
            &tmp.path(),
        ]);
        let report: Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("bench io printed no JSON ({e}): {stdout}"));
        assert_eq!(report["format"], "qcow2");
        assert_eq!(report["virtual_size"], 8 << 20);
        let sides = report["results"].as_array().unwrap();
        let tools: Vec<&str> = sides.iter().map(|s| s["tool"].as_str().unwrap()).collect();
        assert_eq!(tools, ["cowclone", "qemu-img"], "{report:#}");
        for side in sides {
            assert!(side["skipped"].is_null(), "{side}");
            assert_eq!(side["requests"], 300, "{side}");
            positive(&side["mb_per_s"], "mb_per_s");
            positive(&side["mean_latency_us"], "mean_latency_us");
        }
        let (ours, theirs) = (&sides[0], &sides[1]);
        positive(&ours["median_latency_us"], "our median latency");
        assert!(
            theirs["median_latency_us"].is_null(),
            "qemu-img reports no median"
        );
        assert_eq!(ours["pattern"], pattern);
        assert_eq!(
            theirs["pattern"], "seq",
            "qemu-img bench has no random offsets"
        );
        assert_eq!(ours["depth_used"], if rw == "read" { 2 } else { 1 });
        assert_eq!(theirs["depth_used"], 2);
        let command = theirs["command"].as_str().unwrap();
        assert!(
            command.starts_with("qemu-img bench -c 300 -d 2 -s 4096"),
            "{command}"
        );
        let svg = std::fs::read_to_string(&chart).unwrap();
        assert!(svg.contains("<svg") && svg.contains("cowclone") && svg.contains("qemu-img"));
    }
    assert!(
        std::fs::read(&image).unwrap() == before,
        "bench io changed the image"
    );
    assert_qemu_check_clean(&image, "image after bench io");
    let names = dir_entries(tmp.path());
    assert!(
        !names.iter().any(|n| n.starts_with("cowclone-bench-io.")),
        "scratch directories are removed: {names:?}"
    );

    // A block size that does not divide the disk is refused in one line.
    let output = cowclone(&[&"bench", &"io", &image, &"--block-size", &"3000"]);
    assert_eq!(output.status.code(), Some(1), "{}", describe(&output));
    assert!(String::from_utf8_lossy(&output.stderr).contains("must divide the virtual size"));
}

/// A chain qemu cannot open (a VDI differencing image) is measured on our side; qemu-img's side
/// is listed as skipped with qemu's reason, not dropped and not an error.
#[test]
fn bench_io_on_a_vdi_diff_lists_qemu_as_skipped_with_its_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().join("base.vdi");
    let diff = tmp.path().join("diff.vdi");
    cowclone_ok(&[&"create", &"-q", &"-f", &"vdi", &base, &"4M"]);
    qemu_io_ok(&[&"-f", &"vdi", &"-c", &"write -P 0x5a 0 4M", &base]);
    cowclone_ok(&[&"create", &"-q", &"-f", &"vdi", &"-b", &base, &diff]);
    let stdout = cowclone_ok(&[
        &"bench",
        &"io",
        &diff,
        &"--count",
        &"50",
        &"--output",
        &"json",
        &"--scratch-dir",
        &tmp.path(),
    ]);
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["format"], "vdi");
    let sides = report["results"].as_array().unwrap();
    assert!(sides[0]["skipped"].is_null(), "{report:#}");
    positive(
        &sides[0]["mb_per_s"],
        "our throughput through the VDI chain",
    );
    let reason = sides[1]["skipped"].as_str().unwrap_or_default();
    assert!(reason.contains("link UUID"), "{report:#}");
}
