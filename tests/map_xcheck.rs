//! Chain block status (`imagefmt::map`, on `imagefmt::chain::block_status`) cross-checked against
//! `qemu-img map --output=json` (qemu 10, Debian package qemu-utils) over random chains: a raw,
//! VDI or qcow2 base under up to two qcow2 overlays of random sizes, cluster sizes and extended-L2
//! settings, each written by qemu-io with data, zero writes, discards and compressed clusters.
//! `convert`, which copies only what the extents call data, is judged on the same chains by
//! `qemu-img compare` and `qemu-img check`.

use std::path::Path;

use imagefmt::backing::BackingPolicy;
use proptest::prelude::*;
use serde_json::Value;

use crate::util::tool_ok_in;

/// The disk of every layer is this many 512-byte sectors at most (4 MiB).
const MAX_SECTORS: u64 = 8192;

#[derive(Debug, Clone, Copy)]
enum Format {
    Raw,
    Vdi,
    /// qcow2 with this cluster size (KiB) and extended L2 entries or not.
    Qcow2 {
        cluster_kib: u64,
        extended: bool,
    },
}

#[derive(Debug, Clone)]
enum Op {
    /// `write -P pattern` of `len` sectors at sector `at`.
    Write { at: u64, len: u64, pattern: u8 },
    /// `write -z`.
    Zero { at: u64, len: u64 },
    /// `discard`.
    Discard { at: u64, len: u64 },
    /// `write -c` of whole clusters: `count` clusters from cluster `cluster` (qcow2 only).
    Compressed { cluster: u64, count: u64 },
}

#[derive(Debug, Clone)]
struct Layer {
    format: Format,
    /// Virtual size in MiB.
    size_mib: u64,
    ops: Vec<Op>,
}

fn qcow2_format() -> impl Strategy<Value = Format> {
    prop_oneof![
        Just(Format::Qcow2 {
            cluster_kib: 64,
            extended: false
        }),
        Just(Format::Qcow2 {
            cluster_kib: 4,
            extended: false
        }),
        Just(Format::Qcow2 {
            cluster_kib: 64,
            extended: true
        }),
        Just(Format::Qcow2 {
            cluster_kib: 16,
            extended: true
        }),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let range = (0..MAX_SECTORS, 1u64..512);
    prop_oneof![
        4 => (range.clone(), 1u8..=255).prop_map(|((at, len), pattern)| Op::Write { at, len, pattern }),
        2 => range.clone().prop_map(|(at, len)| Op::Zero { at, len }),
        2 => range.prop_map(|(at, len)| Op::Discard { at, len }),
        1 => (0u64..64, 1u64..4).prop_map(|(cluster, count)| Op::Compressed { cluster, count }),
    ]
}

fn layer(format: impl Strategy<Value = Format>) -> impl Strategy<Value = Layer> {
    (format, 1u64..=4, proptest::collection::vec(op(), 0..8)).prop_map(|(format, size_mib, ops)| {
        Layer {
            format,
            size_mib,
            ops,
        }
    })
}

fn chain() -> impl Strategy<Value = Vec<Layer>> {
    let base = layer(prop_oneof![
        Just(Format::Raw),
        Just(Format::Vdi),
        qcow2_format(),
        qcow2_format(),
    ]);
    (base, proptest::collection::vec(layer(qcow2_format()), 0..3)).prop_map(|(base, above)| {
        let mut layers = vec![base];
        layers.extend(above);
        layers
    })
}

/// The qemu-io commands for `layer`, clipped to its size. Compressed writes (qcow2 only) come
/// first, one per distinct cluster: qemu writes compressed clusters only where nothing is
/// allocated yet.
fn commands(layer: &Layer) -> Vec<String> {
    let size = layer.size_mib << 20;
    let clip = |at: u64, len: u64| {
        let start = (at * 512).min(size - 512);
        (start, (len * 512).min(size - start))
    };
    let mut out: Vec<String> = Vec::new();
    if let Format::Qcow2 { cluster_kib, .. } = layer.format {
        let cluster_size = cluster_kib << 10;
        let mut seen = std::collections::BTreeSet::new();
        for op in &layer.ops {
            if let Op::Compressed { cluster, count } = *op {
                for c in cluster..cluster + count {
                    let at = (c * cluster_size) % size;
                    if seen.insert(at) {
                        out.push(format!("write -c -P 0x5c {at} {cluster_size}"));
                    }
                }
            }
        }
    }
    out.extend(layer.ops.iter().filter_map(|op| match *op {
        Op::Write { at, len, pattern } => {
            let (at, len) = clip(at, len);
            Some(format!("write -P {pattern} {at} {len}"))
        }
        Op::Zero { at, len } => {
            let (at, len) = clip(at, len);
            // On raw files, `write -z` without `-u` leaves unwritten extents (ext4's
            // ZERO_RANGE), and SEEK_DATA reports those as data once any of their pages is in the
            // page cache: block status then depends on what read the file last, for qemu-img
            // as for us. Punching holes (`-u`) gives every reader the same answer.
            let unmap = if matches!(layer.format, Format::Raw) {
                " -u"
            } else {
                ""
            };
            Some(format!("write -z{unmap} {at} {len}"))
        }
        Op::Discard { at, len } => {
            let (at, len) = clip(at, len);
            Some(format!("discard {at} {len}"))
        }
        Op::Compressed { .. } => None,
    }));
    out
}

/// Builds the chain in `dir` with qemu-img and qemu-io; returns the top image's name.
fn build(dir: &Path, layers: &[Layer]) -> String {
    let mut below: Option<(String, &'static str)> = None;
    for (i, layer) in layers.iter().enumerate() {
        let (name, format, options) = match layer.format {
            Format::Raw => (format!("l{i}.raw"), "raw", String::new()),
            Format::Vdi => (format!("l{i}.vdi"), "vdi", String::new()),
            Format::Qcow2 {
                cluster_kib,
                extended,
            } => (
                format!("l{i}.qcow2"),
                "qcow2",
                format!(
                    "cluster_size={}k,extended_l2={}",
                    cluster_kib,
                    if extended { "on" } else { "off" }
                ),
            ),
        };
        let size = format!("{}M", layer.size_mib);
        let mut args = vec!["create", "-q", "-f", format];
        if !options.is_empty() {
            args.extend(["-o", &options]);
        }
        if let Some((backing, backing_format)) = &below {
            args.extend(["-b", backing, "-F", backing_format]);
        }
        args.extend([name.as_str(), size.as_str()]);
        tool_ok_in("qemu-img", dir, &args);
        let commands = commands(layer);
        if !commands.is_empty() {
            let mut io = vec!["-f", format];
            for c in &commands {
                io.extend(["-c", c]);
            }
            io.push(&name);
            let out = tool_ok_in("qemu-io", dir, &io);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert!(!stdout.contains("failed"), "qemu-io {io:?}: {stdout}");
        }
        below = Some((name, format));
    }
    below.expect("at least one layer").0
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn map_xcheck_random_chains_match_qemu_img_map(layers in chain()) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let top = build(d, &layers);
        assert_map_matches(d, &top, &layers);
    }
}

/// Compares cowclone's map of the top of `layers` with qemu-img's.
fn assert_map_matches(d: &Path, top: &str, layers: &[Layer]) {
    let out = tool_ok_in("qemu-img", d, &["map", "--output=json", top]);
    let theirs: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    let ours = imagefmt::ops::map::map(&d.join(top), None, &BackingPolicy::FollowLocal)
        .unwrap_or_else(|e| panic!("map of {layers:?} failed: {e}"));
    let ours: Vec<Value> = ours
        .iter()
        .map(|e| serde_json::to_value(e).unwrap())
        .collect();
    assert_eq!(ours, theirs, "chain {layers:?}");
}

/// The proptest's find (CI, stop 15): a 1 MiB raw base with `write -z` of 160 sectors at sector
/// 1881, ending 512 bytes into the last 4 KiB block. Both tools ask SEEK_DATA/SEEK_HOLE; the
/// zeroed range is an unwritten extent, which the kernel reports as data once its pages are
/// cached. The map must match qemu-img's with the range punched (`-u`, what the proptest now
/// does) and with the unwritten extent read into the page cache (then both say data).
#[test]
fn map_xcheck_raw_zero_write_ending_in_the_last_block() {
    let layers = [Layer {
        format: Format::Raw,
        size_mib: 1,
        ops: vec![Op::Zero { at: 1881, len: 160 }],
    }];
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let top = build(d, &layers);
    assert_map_matches(d, &top, &layers);

    let unwritten = d.join("unwritten.raw");
    let path = unwritten.to_str().unwrap();
    tool_ok_in("qemu-img", d, &["create", "-q", "-f", "raw", path, "1M"]);
    tool_ok_in(
        "qemu-io",
        d,
        &["-f", "raw", "-c", "write -z 963072 81920", path],
    );
    std::fs::read(&unwritten).unwrap();
    assert_map_matches(d, "unwritten.raw", &layers);
}

/// Runs the cowclone binary in `dir`, asserting success.
fn cowclone_ok_in(dir: &Path, args: &[&str]) {
    let os: Vec<&dyn AsRef<std::ffi::OsStr>> = args
        .iter()
        .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
        .collect();
    let out = crate::util::cowclone_in(dir, &os);
    assert!(
        out.status.success(),
        "cowclone {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn convert_xcheck_random_chains_are_identical_for_qemu_img(
        layers in chain(),
        output in prop_oneof![Just("raw"), Just("qcow2"), Just("vdi")],
        parallel in prop_oneof![Just("1"), Just("3"), Just("8")],
        out_of_order in any::<bool>(),
        compress in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let top = build(d, &layers);
        let out_name = format!("out.{output}");
        let mut args = vec!["convert", "-O", output, "-m", parallel];
        if out_of_order {
            args.push("-W");
        }
        if compress && output == "qcow2" {
            args.push("-c");
        }
        args.extend([top.as_str(), out_name.as_str()]);
        cowclone_ok_in(d, &args);
        let compare = crate::util::tool_in("qemu-img", d, &["compare", &top, &out_name]);
        prop_assert!(
            compare.status.success(),
            "qemu-img compare {} {}: {}{}",
            top,
            out_name,
            String::from_utf8_lossy(&compare.stdout),
            String::from_utf8_lossy(&compare.stderr)
        );
        if output != "raw" {
            tool_ok_in("qemu-img", d, &["check", &out_name]);
        }
    }
}

/// Issue 12: an error reading the source names the source, not the destination.
#[test]
fn convert_errors_name_the_source_when_the_source_is_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok_in(
        "qemu-img",
        d,
        &["create", "-q", "-f", "qcow2", "bad.qcow2", "4M"],
    );
    tool_ok_in(
        "qemu-io",
        d,
        &["-f", "qcow2", "-c", "write -P 1 0 64k", "bad.qcow2"],
    );
    // Make the first L2 entry point at an unaligned host offset: qemu calls that corruption.
    let path = d.join("bad.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    let l1_offset = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    let l2_offset = (u64::from_be_bytes(bytes[l1_offset..l1_offset + 8].try_into().unwrap())
        & 0x00ff_ffff_ffff_fe00) as usize;
    let entry = u64::from_be_bytes(bytes[l2_offset..l2_offset + 8].try_into().unwrap());
    bytes[l2_offset..l2_offset + 8].copy_from_slice(&(entry | 0x200).to_be_bytes());
    std::fs::write(&path, bytes).unwrap();
    let theirs = crate::util::tool_in(
        "qemu-img",
        d,
        &["convert", "-O", "raw", "bad.qcow2", "q.raw"],
    );
    assert!(
        !theirs.status.success(),
        "qemu-img converted a corrupt image"
    );
    for output in ["raw", "qcow2", "vdi"] {
        let dest = format!("out.{output}");
        let args = ["convert", "-O", output, "bad.qcow2", dest.as_str()];
        let os: Vec<&dyn AsRef<std::ffi::OsStr>> = args
            .iter()
            .map(|a| a as &dyn AsRef<std::ffi::OsStr>)
            .collect();
        let out = crate::util::cowclone_in(d, &os);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{output}: converted a corrupt image");
        assert!(
            stderr.contains("source image") && stderr.contains("bad.qcow2"),
            "{output}: the error does not name the source: {stderr}"
        );
        assert!(
            !stderr.contains(&dest),
            "{output}: the error blames the destination: {stderr}"
        );
        assert!(
            !d.join(&dest).exists(),
            "{output}: a partial destination was left behind"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, failure_persistence: None, ..ProptestConfig::default() })]

    /// `compare` (which skips ranges both sides report as zeros) agrees with `qemu-img compare`
    /// on two random chains, and on a chain and its converted copy.
    #[test]
    fn compare_xcheck_random_chains_agree_with_qemu_img(a in chain(), b in chain()) {
        let dir = tempfile::tempdir().unwrap();
        let (da, db) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&da).unwrap();
        std::fs::create_dir_all(&db).unwrap();
        let top_a = da.join(build(&da, &a));
        let top_b = db.join(build(&db, &b));
        let copy = dir.path().join("copy.qcow2");
        let (ta, tb, tc) = (top_a.to_str().unwrap(), top_b.to_str().unwrap(), copy.to_str().unwrap());
        cowclone_ok_in(dir.path(), &["convert", "-O", "qcow2", ta, tc]);
        for (x, y) in [(ta, tb), (ta, tc), (tb, ta)] {
            let theirs = crate::util::tool_in("qemu-img", dir.path(), &["compare", x, y]);
            let args = ["compare", x, y];
            let os: Vec<&dyn AsRef<std::ffi::OsStr>> =
                args.iter().map(|a| a as &dyn AsRef<std::ffi::OsStr>).collect();
            let ours = crate::util::cowclone_in(dir.path(), &os);
            prop_assert_eq!(ours.status.code(), theirs.status.code(), "{} vs {}", x, y);
            prop_assert_eq!(
                String::from_utf8_lossy(&ours.stdout),
                String::from_utf8_lossy(&theirs.stdout),
                "{} vs {}", x, y
            );
        }
    }
}

/// Issue 11: an image whose 8,192 L1 entries all point at one L2 table (that points at one
/// cluster) is mapped in bounded memory, with the same answer as qemu-img.
#[test]
fn map_of_an_image_with_one_shared_l2_table_stays_small_and_matches_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    tool_ok_in(
        "qemu-img",
        d,
        &["create", "-q", "-f", "qcow2", "shared.qcow2", "4T"],
    );
    tool_ok_in(
        "qemu-io",
        d,
        &["-f", "qcow2", "-c", "write -P 7 0 64k", "shared.qcow2"],
    );
    let path = d.join("shared.qcow2");
    let mut bytes = std::fs::read(&path).unwrap();
    let l1_size = u32::from_be_bytes(bytes[36..40].try_into().unwrap()) as usize;
    let l1_offset = u64::from_be_bytes(bytes[40..48].try_into().unwrap()) as usize;
    assert_eq!(l1_size, 8192);
    let first: [u8; 8] = bytes[l1_offset..l1_offset + 8].try_into().unwrap();
    for i in 1..l1_size {
        bytes[l1_offset + i * 8..l1_offset + i * 8 + 8].copy_from_slice(&first);
    }
    std::fs::write(&path, &bytes).unwrap();
    assert!(
        bytes.len() < 512 << 10,
        "the image is {} bytes",
        bytes.len()
    );
    let theirs = tool_ok_in("qemu-img", d, &["map", "--output=json", "shared.qcow2"]);
    let image = d.join("shared.qcow2");
    let (code, ours, peak_kib) = crate::util::run_with_peak_rss(
        &crate::util::cowclone_bin(),
        &[&"map", &"--output", &"json", &image],
    );
    assert_eq!(code, 0, "cowclone map failed");
    assert_eq!(ours, String::from_utf8_lossy(&theirs.stdout));
    assert!(peak_kib < 64 << 10, "map peaked at {peak_kib} KiB");
}
