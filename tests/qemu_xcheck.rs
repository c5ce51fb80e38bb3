//! cowclone cross-checked against qemu-img 7.2, an independent implementation.
//!
//! * Creation matrix: every option combination is created by the library and by `qemu-img
//!   create`; ours must pass `qemu-img check`, report the same `qemu-img info`, and be
//!   byte-identical (trailing zeros aside) wherever qemu lays the image out the way we do.
//!   Combinations qemu-img refuses must be refused by the library too, leaving no file.
//! * Overlays on qcow2, raw and VDI bases made with the CLI, compared with `qemu-img create -b`,
//!   and used for real I/O by `qemu-io`.
//! * Backing names (relative, absolute), sizes differing from the backing file's, `info` in the
//!   reverse direction (our reader on qemu's images, including `--backing-chain`), sparseness,
//!   and the no-overwrite / no-leftover guarantees of `create`.
//!
//! Byte identity: qemu-img and the library place the refcount table in cluster 1 and append
//! refcount blocks after the L1 table. When the refcount blocks an image needs no longer fit
//! one refcount-table cluster, qemu relocates its table and we grow ours in place, so those
//! files differ (both valid). With the sizes below that happens only for 512-byte clusters
//! (one table cluster lists 64 blocks), found empirically on qemu-img 7.2:
//!
//! | refcount_bits | last identical size tried | first relocated size tried |
//! |---:|---:|---:|
//! | 64 | 4G  | 8G  |
//! | 32 | 8G  | 16G |
//! | 16 | 16G | 32G |
//! | 8  | 50G | 100G |
//!
//! Those cases are checked with `qemu-img check` and `qemu-img info` only
//! ([`Expect::CheckAndInfo`]); every other valid case must be byte-identical.

use std::ffi::OsStr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use imagefmt::qcow2::CreateOptions;
use imagefmt::{CreatedImage, Qcow2Builder};
use serde_json::Value;

use crate::util::*;

// ---------------------------------------------------------------------------------------------
// The creation matrix
// ---------------------------------------------------------------------------------------------

/// Sizes every option set is tried with (1000 rounds up to 1024; 10T is sparse and cheap).
const SIZES: &[&str] = &["0", "1000", "1M", "1G", "10T"];
/// Sizes for clusters below 4 KiB: 10T needs a larger L1 table than qemu allows
/// (512-byte clusters top out at 128G), so 10T is in the invalid table instead.
const SMALL_CLUSTER_SIZES: &[&str] = &["0", "1000", "1M", "1G"];

/// Sizes for 4 KiB clusters: they top out at 8T (a 32 MiB L1 table of 2 MiB-covering entries).
const SIZES_4K: &[&str] = &["0", "1000", "1M", "1G", "1T"];

/// What a valid case must satisfy beyond `qemu-img check` and `qemu-img info`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Byte-identical to qemu-img's file, shorter file zero-extended.
    Identical,
    /// qemu relocates its refcount table for this layout: check + info only.
    CheckAndInfo,
}

/// One valid creation: `-o options` (empty: none) and the size argument.
#[derive(Debug, Clone, Copy)]
struct Case {
    options: &'static str,
    size: &'static str,
    expect: Expect,
}

impl Case {
    fn label(&self) -> String {
        let options = if self.options.is_empty() {
            "(defaults)"
        } else {
            self.options
        };
        format!("-o {options} size {}", self.size)
    }
}

/// Every option set crossed with `sizes`, all expected byte-identical.
fn cross(option_sets: &[&'static str], sizes: &[&'static str]) -> Vec<Case> {
    option_sets
        .iter()
        .flat_map(|&options| {
            sizes.iter().map(move |&size| Case {
                options,
                size,
                expect: Expect::Identical,
            })
        })
        .collect()
}

/// Creates `path` with the library, applying `options` through [`CreateOptions::set`] and
/// `size` through the library's size parser, as the CLI does.
fn library_create(path: &Path, options: &str, size: &str) -> Result<CreatedImage, String> {
    let mut opts = CreateOptions::default();
    for item in options.split(',').filter(|s| !s.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("malformed option {item:?} in the test table"))?;
        opts.set(key, value)
            .map_err(|e| format!("set({key}): {e}"))?;
    }
    let size = imagefmt::size::parse_size(size).map_err(|e| e.to_string())?;
    Qcow2Builder::new(path)
        .options(opts)
        .size(size)
        .create()
        .map_err(|e| format!("create: {e}"))
}

/// `qemu-img create -q -f qcow2 [-o options] path size`.
fn qemu_create(path: &Path, options: &str, size: &str) -> std::process::Output {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"create", &"-q", &"-f", &"qcow2"];
    if !options.is_empty() {
        args.push(&"-o");
        args.push(&options);
    }
    args.push(&path);
    args.push(&size);
    qemu_img(&args)
}

/// Checks one valid case in its own directory under `root`.
fn check_valid_case(root: &Path, index: usize, case: &Case) {
    let label = case.label();
    let dir = root.join(format!("case{index}"));
    std::fs::create_dir(&dir).unwrap();
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");

    let output = qemu_create(&theirs, case.options, case.size);
    assert!(
        output.status.success(),
        "{label}: the table says valid but qemu-img refuses it: {}",
        describe(&output)
    );
    let created = library_create(&ours, case.options, case.size)
        .unwrap_or_else(|e| panic!("{label}: qemu-img accepts it but the library refuses: {e}"));

    assert_qemu_check_clean(&ours, &label);

    let our_info = qemu_info_json(&ours);
    let their_info = qemu_info_json(&theirs);
    assert_info_keys_equal(&our_info, &their_info, INFO_KEYS, &label);
    assert_eq!(
        Some(created.virtual_size),
        their_info["virtual-size"].as_u64(),
        "{label}: CreatedImage::virtual_size"
    );

    match case.expect {
        Expect::Identical => assert_bytes_equal_zero_extended(&ours, &theirs, &label),
        Expect::CheckAndInfo => eprintln!(
            "{label}: check+info only; files {} (ours {} bytes, qemu-img {} bytes)",
            if bytes_equal_zero_extended(&ours, &theirs) {
                "happen to be identical"
            } else {
                "differ"
            },
            file_len(&ours),
            file_len(&theirs)
        ),
    }

    // Reverse direction: our reader agrees with qemu-img on both files, on every key including
    // the name and the allocation (same file, so actual-size must be equal too).
    for (path, qemu_view) in [(&theirs, &their_info), (&ours, &our_info)] {
        assert_same_file_info(
            &cowclone_info_json(path),
            qemu_view,
            &format!("{label}: cowclone info {}", path.display()),
        );
    }
}

/// Asserts that cowclone's info of a file agrees with qemu-img's info of the same file on
/// [`INFO_KEYS`], `filename` and `actual-size`.
fn assert_same_file_info(cowclone_view: &Value, qemu_view: &Value, context: &str) {
    let mut keys = INFO_KEYS.to_vec();
    keys.extend(["filename", "actual-size"]);
    assert_info_keys_equal(cowclone_view, qemu_view, &keys, context);
}

/// Runs every case, each isolated, and fails once at the end listing every failing case.
fn run_matrix(cases: &[Case]) {
    let root = tempfile::tempdir().unwrap();
    let failures: Vec<String> = cases
        .iter()
        .enumerate()
        .filter_map(|(i, case)| {
            catch_unwind(AssertUnwindSafe(|| check_valid_case(root.path(), i, case)))
                .err()
                .map(|panic| format!("[{}] {}", case.label(), panic_text(&panic)))
        })
        .collect();
    eprintln!("{} matrix cases run", cases.len());
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

fn panic_text(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_owned()))
        .unwrap_or_else(|| "(non-string panic)".to_owned())
}

#[test]
fn matrix_cluster_sizes() {
    let mut cases = cross(
        &[
            "",
            "cluster_size=8k",
            "cluster_size=64k",
            "cluster_size=65536",
            "cluster_size=1M",
            "cluster_size=2M",
        ],
        SIZES,
    );
    cases.extend(cross(
        &["cluster_size=512", "cluster_size=1k", "cluster_size=2k"],
        SMALL_CLUSTER_SIZES,
    ));
    cases.extend(cross(&["cluster_size=4k"], SIZES_4K));
    run_matrix(&cases);
}

#[test]
fn matrix_compat_levels() {
    let mut cases = cross(
        &[
            "compat=0.10",
            "compat=1.1",
            "compat=v2",
            "compat=v3",
            "compat=0.10,cluster_size=2M",
            "compat=0.10,refcount_bits=16,lazy_refcounts=off,compression_type=zlib",
        ],
        SIZES,
    );
    cases.extend(cross(
        &["compat=0.10,cluster_size=512"],
        SMALL_CLUSTER_SIZES,
    ));
    run_matrix(&cases);
}

#[test]
fn matrix_refcount_widths() {
    let mut cases = cross(
        &[
            "refcount_bits=1",
            "refcount_bits=2",
            "refcount_bits=4",
            "refcount_bits=8",
            "refcount_bits=16",
            "refcount_bits=32",
            "refcount_bits=64",
            "cluster_size=2M,refcount_bits=1",
        ],
        SIZES,
    );
    cases.extend(cross(&["cluster_size=4k,refcount_bits=64"], SIZES_4K));
    cases.extend(cross(
        &[
            "cluster_size=512,refcount_bits=1",
            "cluster_size=512,refcount_bits=8",
            "cluster_size=512,refcount_bits=64",
        ],
        SMALL_CLUSTER_SIZES,
    ));
    run_matrix(&cases);
}

#[test]
fn matrix_features() {
    let mut cases = cross(
        &[
            "lazy_refcounts=on",
            "lazy_refcounts=off",
            "extended_l2=on",
            "extended_l2=on,cluster_size=16k",
            "extended_l2=on,cluster_size=2M",
            "compression_type=zstd",
            "compression_type=zlib",
        ],
        SIZES,
    );
    cases.extend(cross(
        &["cluster_size=4k,lazy_refcounts=on,compression_type=zstd"],
        SIZES_4K,
    ));
    run_matrix(&cases);
}

#[test]
fn matrix_combinations() {
    run_matrix(&cross(
        &[
            "cluster_size=16k,extended_l2=on,compression_type=zstd,lazy_refcounts=on,refcount_bits=8",
            "cluster_size=2M,extended_l2=on,compression_type=zstd,refcount_bits=64",
            "cluster_size=32k,extended_l2=on,refcount_bits=2,lazy_refcounts=on",
            "compat=1.1,cluster_size=65536,refcount_bits=16,lazy_refcounts=off,extended_l2=off,compression_type=zlib",
            "compat=0.10,cluster_size=128k",
        ],
        SIZES,
    ));
}

/// 512-byte clusters at sizes where the refcount blocks outgrow one refcount-table cluster
/// (see the module docs), the last sizes before that, and the largest sizes qemu allows.
#[test]
fn matrix_refcount_table_relocation_and_size_limits() {
    let case = |options, size, expect| Case {
        options,
        size,
        expect,
    };
    use Expect::*;
    run_matrix(&[
        case("cluster_size=512,refcount_bits=64", "4G", Identical),
        case("cluster_size=512,refcount_bits=64", "8G", CheckAndInfo),
        case("cluster_size=512,refcount_bits=64", "10G", CheckAndInfo),
        case("cluster_size=512,refcount_bits=32", "8G", Identical),
        case("cluster_size=512,refcount_bits=32", "16G", CheckAndInfo),
        case("cluster_size=512,refcount_bits=1", "10G", Identical),
        case("cluster_size=512", "10G", Identical),
        // The largest sizes qemu-img accepts (a 32 MiB L1 table): 8T with 4 KiB clusters, 2P
        // with 64 KiB clusters, 2E with 2 MiB clusters.
        case("cluster_size=4k", "8T", Identical),
        case("", "2251799813685248", Identical),
        case("cluster_size=2M", "2305843009213693952", Identical),
    ]);
}

/// Option combinations and sizes qemu-img 7.2 refuses (error texts in the comments).
const INVALID: &[(&str, &str)] = &[
    // "Different refcount widths than 16 bits require compatibility level 1.1 or above"
    ("compat=0.10,refcount_bits=8", "1G"),
    ("compat=0.10,refcount_bits=1", "1G"),
    ("compat=0.10,refcount_bits=64", "1G"),
    // "Lazy refcounts only supported with compatibility level 1.1 and above"
    ("compat=0.10,lazy_refcounts=on", "1G"),
    // "Extended L2 entries are only supported with compatibility level 1.1 and above"
    ("compat=0.10,extended_l2=on", "1G"),
    // "Non-zlib compression type is only supported with compatibility level 1.1 and above"
    ("compat=0.10,compression_type=zstd", "1G"),
    // "Extended L2 entries are only supported with cluster sizes of at least 16384 bytes"
    ("cluster_size=4k,extended_l2=on", "1G"),
    ("cluster_size=8k,extended_l2=on", "1G"),
    ("cluster_size=512,extended_l2=on", "1M"),
    // "Cluster size must be a power of two between 512 and 2048k"
    ("cluster_size=3000", "1G"),
    ("cluster_size=256", "1G"),
    ("cluster_size=0", "1G"),
    ("cluster_size=4M", "1G"),
    ("cluster_size=1.5k", "1G"),
    // "Parameter 'cluster_size' expects a non-negative number below 2^64"
    ("cluster_size=abc", "1G"),
    // "Refcount width must be a power of two and may not exceed 64 bits"
    ("refcount_bits=3", "1G"),
    ("refcount_bits=0", "1G"),
    ("refcount_bits=128", "1G"),
    // "Parameter 'refcount_bits' expects a number"
    ("refcount_bits=16k", "1G"),
    // Values outside the option's enumeration
    ("compression_type=lz4", "1G"),
    ("lazy_refcounts=maybe", "1G"),
    ("compat=2.0", "1G"),
    ("compat=1.10", "1G"),
    // "Invalid parameter 'nonsense'"
    ("nonsense=1", "1G"),
    // "The image size is too large for file format 'qcow2' (try using a larger cluster size)"
    ("cluster_size=512", "10T"),
    ("cluster_size=512", "64T"),
    ("cluster_size=512", "137438953984"), // 128G + 512: one L1 entry past the 32 MiB limit
    ("cluster_size=1k", "10T"),
    ("cluster_size=4k", "10T"),
    ("cluster_size=4k", "8796093022720"), // 8T + 512
    ("cluster_size=4k", "16P"),
    ("", "2251799813685760"), // 2P + 512 with 64 KiB clusters
    ("extended_l2=on", "2P"),
    ("cluster_size=2M", "2305843009213694464"), // 2E + 512
    ("cluster_size=2M", "7E"),
    // "Invalid image size specified"
    ("", "8E"),
    ("", "12X"),
    ("", "-1"),
];

#[test]
fn invalid_combinations_are_refused_by_qemu_img_and_by_the_library() {
    let root = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, &(options, size)) in INVALID.iter().enumerate() {
        let label = format!("-o {options} size {size}");
        let their_dir = root.path().join(format!("theirs{i}"));
        let our_dir = root.path().join(format!("ours{i}"));
        std::fs::create_dir(&their_dir).unwrap();
        std::fs::create_dir(&our_dir).unwrap();

        let output = qemu_create(&their_dir.join("x.qcow2"), options, size);
        if output.status.success() {
            failures.push(format!(
                "[{label}] qemu-img accepts it (the table is wrong)"
            ));
        }
        match library_create(&our_dir.join("x.qcow2"), options, size) {
            Ok(created) => failures.push(format!(
                "[{label}] the library accepts what qemu-img refuses: {created:?}"
            )),
            Err(e) => eprintln!("[{label}] refused: {e}"),
        }
        let left = dir_entries(&our_dir);
        if !left.is_empty() {
            failures.push(format!(
                "[{label}] files left behind by the library: {left:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} invalid cases failed:\n{}",
        failures.len(),
        INVALID.len(),
        failures.join("\n")
    );
}

/// Option values both tools accept with the same meaning, beyond the plain spellings.
#[test]
fn option_value_spellings_mean_what_they_mean_to_qemu_img() {
    run_matrix(&cross(
        &[
            "lazy_refcounts=true",
            "lazy_refcounts=yes",
            "lazy_refcounts=false",
            "extended_l2=yes",
            "cluster_size=64K",
            "cluster_size=0.5k",
            "cluster_size=2048k",
            "refcount_bits=+16",
        ],
        &["1G"],
    ));
}

/// Option values where the library's reading differs from qemu-img's (`qemu-img create -o`
/// parses numbers with `strtoull(..., 0)`, and booleans as on/yes/true/y and off/no/false/n).
#[test]
fn option_values_are_read_as_qemu_img_reads_them() {
    let root = tempfile::tempdir().unwrap();
    let mut failures = Vec::new();
    for (i, options) in [
        "refcount_bits=016",
        "lazy_refcounts=y",
        "lazy_refcounts=n",
        "refcount_bits= 16",
        "refcount_bits=0x10",
    ]
    .iter()
    .enumerate()
    {
        let theirs = qemu_create(&root.path().join(format!("t{i}")), options, "1G")
            .status
            .success();
        let ours = library_create(&root.path().join(format!("o{i}")), options, "1G").is_ok();
        if ours != theirs {
            failures.push(format!(
                "-o {options:?}: qemu-img {}, library {}",
                accepts(theirs),
                accepts(ours)
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

fn accepts(ok: bool) -> &'static str {
    if ok {
        "accepts"
    } else {
        "refuses"
    }
}

// ---------------------------------------------------------------------------------------------
// Overlays
// ---------------------------------------------------------------------------------------------

/// Size of the bases: past the patterns qemu-io writes at 0 and 1M, and for raw not a multiple
/// of 512 (qemu rounds a raw file's size up to whole sectors).
const BASE_SIZE: u64 = (2 << 20) + 1000;

/// Makes `dir/name` in `format` with data: a position-dependent pattern for raw, then qemu-io
/// patterns `0xab` at 0..64k and `0x17` at 1M..1M+4k in every format.
fn make_base(dir: &Path, name: &str, format: &str) -> PathBuf {
    let path = dir.join(name);
    match format {
        "raw" => write_pattern_file(&path, BASE_SIZE as usize),
        _ => {
            qemu_img_ok(&[&"create", &"-q", &"-f", &format, &path, &"2M"]);
        }
    }
    qemu_io_ok(&[
        &"-f",
        &format,
        &"-c",
        &"write -P 0xab 0 64k",
        &"-c",
        &"write -P 0x17 1M 4k",
        &path,
    ]);
    path
}

/// `qemu-img compare -f qcow2 -F fmt a b`: the exit code (0 identical, 1 different).
fn qemu_compare(dir: &Path, a: &str, a_format: &str, b: &str, b_format: &str) -> i32 {
    let output = qemu_img_in(
        dir,
        &[&"compare", &"-f", &a_format, &"-F", &b_format, &a, &b],
    );
    let code = output
        .status
        .code()
        .expect("qemu-img compare was not killed");
    assert!(
        code == 0 || code == 1,
        "qemu-img compare {a} {b} failed: {}",
        describe(&output)
    );
    code
}

/// Overlay checks shared by the three base formats. Runs everything in `dir` with relative
/// names, as a user would.
fn check_overlays_on(format: &str, base_name: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_base(dir, base_name, format);

    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-b",
        &base_name,
        &"-F",
        &format,
        &dir.join("theirs.qcow2"),
    ]);
    let their_info = qemu_info_json(&dir.join("theirs.qcow2"));

    let mut overlays = vec!["ours-F.qcow2"];
    let output = cowclone_in(
        dir,
        &[
            &"create",
            &"-q",
            &"-b",
            &base_name,
            &"-F",
            &format,
            &"ours-F.qcow2",
        ],
    );
    assert!(
        output.status.success(),
        "create -F {format}: {}",
        describe(&output)
    );

    let output = cowclone_in(
        dir,
        &[&"create", &"-q", &"-b", &base_name, &"ours-magic.qcow2"],
    );
    if format == "raw" {
        // Raw has no magic: guessing it would let a guest-written header redirect the overlay.
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success(),
            "raw base accepted without -F: {}",
            describe(&output)
        );
        assert_eq!(stderr.lines().count(), 1, "one error line: {stderr}");
        assert!(stderr.starts_with("cowclone:"), "{stderr}");
        assert!(!dir.join("ours-magic.qcow2").exists(), "a file was created");
        assert_no_temp_files(dir, "raw without -F");
    } else {
        assert!(
            output.status.success(),
            "create without -F on {format}: {}",
            describe(&output)
        );
        overlays.push("ours-magic.qcow2");
    }

    let theirs = dir.join("theirs.qcow2");
    for name in &overlays {
        let label = format!("{format} base, {name}");
        let ours = dir.join(name);
        assert_bytes_equal_zero_extended(&ours, &theirs, &label);
        assert_eq!(
            mode(&ours),
            mode(&theirs),
            "{label}: permissions differ from qemu-img's"
        );
        let our_info = qemu_info_json(&ours);
        assert_info_keys_equal(&our_info, &their_info, INFO_KEYS, &label);
        assert_qemu_check_clean(&ours, &label);
        assert_eq!(
            qemu_compare(dir, name, "qcow2", base_name, format),
            0,
            "{label}: qemu-img compare with the base"
        );
        // Our reader on our overlay and on qemu's, against qemu-img on the same files.
        for (path, qemu_view) in [(&ours, &our_info), (&theirs, &their_info)] {
            assert_same_file_info(&cowclone_info_json(path), qemu_view, &label);
        }
    }

    // Real I/O through our overlay: the same write into ours and theirs.
    for name in overlays.iter().chain(["theirs.qcow2"].iter()) {
        qemu_io_ok(&[
            &"-f",
            &"qcow2",
            &"-c",
            &"write -P 0x5a 4k 4k",
            &dir.join(name),
        ]);
    }
    for name in &overlays {
        let label = format!("{format} base, {name} after a write");
        assert_qemu_check_clean(&dir.join(name), &label);
        assert_eq!(
            qemu_compare(dir, name, "qcow2", "theirs.qcow2", "qcow2"),
            0,
            "{label}: differs from qemu-img's overlay given the same write"
        );
        assert_eq!(
            qemu_compare(dir, name, "qcow2", base_name, format),
            1,
            "{label}: the write is not visible (still equal to the base)"
        );
        let read = qemu_io_ok(&[
            &"-f",
            &"qcow2",
            &"-c",
            &"read -P 0x5a 4k 4k",
            &"-c",
            &"read -P 0xab 8k 56k",
            &"-c",
            &"read -P 0x17 1M 4k",
            &dir.join(name),
        ]);
        assert!(
            !read.contains("Pattern verification failed"),
            "{label}: {read}"
        );
    }
}

/// A file's permission bits.
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn overlay_on_qcow2_base_matches_qemu_img() {
    check_overlays_on("qcow2", "base.qcow2");
}

#[test]
fn overlay_on_raw_base_matches_qemu_img() {
    check_overlays_on("raw", "base.img");
}

#[test]
fn overlay_on_vdi_base_matches_qemu_img() {
    check_overlays_on("vdi", "base.vdi");
}

// ---------------------------------------------------------------------------------------------
// Backing names and sizes
// ---------------------------------------------------------------------------------------------

#[test]
fn relative_backing_name_resolves_as_qemu_resolves_it() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_base(dir, "base.qcow2", "qcow2");
    std::fs::create_dir(dir.join("sub")).unwrap();

    for (name, with_format) in [("sub/ov.qcow2", true), ("sub/ov-magic.qcow2", false)] {
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"create", &"-q", &"-b", &"../base.qcow2"];
        if with_format {
            args.extend([&"-F" as &dyn AsRef<OsStr>, &"qcow2"]);
        }
        args.push(&name);
        let output = cowclone_in(dir, &args);
        assert!(output.status.success(), "{name}: {}", describe(&output));
    }
    let output = qemu_img_in(
        dir,
        &[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &"-b",
            &"../base.qcow2",
            &"-F",
            &"qcow2",
            &"sub/theirs.qcow2",
        ],
    );
    assert!(output.status.success(), "{}", describe(&output));

    let qemu_info_in = |name: &str| -> Value {
        let output = qemu_img_in(dir, &[&"info", &"--output=json", &name]);
        assert!(output.status.success(), "{}", describe(&output));
        serde_json::from_slice(&output.stdout).unwrap()
    };
    let their_info = qemu_info_in("sub/theirs.qcow2");
    assert_eq!(their_info["full-backing-filename"], "sub/../base.qcow2");
    for name in ["sub/ov.qcow2", "sub/ov-magic.qcow2"] {
        let qemu_view = qemu_info_in(name);
        let output = cowclone_in(dir, &[&"info", &"--output", &"json", &name]);
        assert!(output.status.success(), "{}", describe(&output));
        let our_view: Value = serde_json::from_slice(&output.stdout).unwrap();
        assert_eq!(
            our_view["full-backing-filename"], qemu_view["full-backing-filename"],
            "{name}: cowclone info vs qemu-img info"
        );
        assert_same_file_info(&our_view, &qemu_view, name);
        assert_info_keys_equal(&qemu_view, &their_info, INFO_KEYS, name);
        assert_bytes_equal_zero_extended(&dir.join(name), &dir.join("sub/theirs.qcow2"), name);
        assert_qemu_check_clean(&dir.join(name), name);
        assert_eq!(
            qemu_compare(dir, name, "qcow2", "base.qcow2", "qcow2"),
            0,
            "{name}"
        );
    }
}

#[test]
fn absolute_backing_name_matches_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = make_base(dir, "base.qcow2", "qcow2");
    std::fs::create_dir(dir.join("elsewhere")).unwrap();
    let ours = dir.join("elsewhere/ours.qcow2");
    let theirs = dir.join("elsewhere/theirs.qcow2");
    cowclone_ok(&[&"create", &"-q", &"-b", &base, &"-F", &"qcow2", &ours]);
    qemu_img_ok(&[
        &"create", &"-q", &"-f", &"qcow2", &"-b", &base, &"-F", &"qcow2", &theirs,
    ]);
    let our_info = qemu_info_json(&ours);
    assert_eq!(our_info["full-backing-filename"], base.to_str().unwrap());
    assert_info_keys_equal(&our_info, &qemu_info_json(&theirs), INFO_KEYS, "absolute");
    assert_eq!(
        cowclone_info_json(&ours)["full-backing-filename"],
        our_info["full-backing-filename"]
    );
    assert_bytes_equal_zero_extended(&ours, &theirs, "absolute");
    assert_qemu_check_clean(&ours, "absolute");
    // From an unrelated directory: the absolute name does not depend on where we stand.
    let elsewhere = tempfile::tempdir().unwrap();
    let output = qemu_img_in(
        elsewhere.path(),
        &[&"compare", &"-f", &"qcow2", &"-F", &"qcow2", &ours, &base],
    );
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
}

#[test]
fn explicit_size_differing_from_the_backing_size_matches_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_base(dir, "base.qcow2", "qcow2"); // 2 MiB
    make_base(dir, "base.img", "raw"); // 2 MiB + 1000 bytes
    for (base, format) in [("base.qcow2", "qcow2"), ("base.img", "raw")] {
        for size in ["8M", "1M", "1000", "3000k"] {
            let label = format!("{format} base, size {size}");
            let ours = format!("ours-{format}-{size}.qcow2");
            let theirs = format!("theirs-{format}-{size}.qcow2");
            let output = cowclone_in(
                dir,
                &[&"create", &"-q", &"-b", &base, &"-F", &format, &ours, &size],
            );
            assert!(output.status.success(), "{label}: {}", describe(&output));
            let output = qemu_img_in(
                dir,
                &[
                    &"create", &"-q", &"-f", &"qcow2", &"-b", &base, &"-F", &format, &theirs, &size,
                ],
            );
            assert!(output.status.success(), "{label}: {}", describe(&output));
            let (ours, theirs) = (dir.join(ours), dir.join(theirs));
            let our_info = qemu_info_json(&ours);
            assert_info_keys_equal(&our_info, &qemu_info_json(&theirs), INFO_KEYS, &label);
            assert_bytes_equal_zero_extended(&ours, &theirs, &label);
            assert_qemu_check_clean(&ours, &label);
        }
    }
    // Larger than the base: the extra area reads as zeros, so compare still says identical.
    let output = qemu_img_in(
        dir,
        &[
            &"compare",
            &"-f",
            &"qcow2",
            &"-F",
            &"qcow2",
            &"ours-qcow2-8M.qcow2",
            &"base.qcow2",
        ],
    );
    assert_eq!(output.status.code(), Some(0), "{}", describe(&output));
}

/// The same overlay requested in the other spellings `qemu-img create` accepts: `-u` (backing
/// file not opened), `-o backing_file=...,backing_fmt=...,size=...`, and a backing format that
/// differs from the file's content (`-F raw` on a qcow2 file is a valid request: use it as raw).
#[test]
fn backing_option_spellings_match_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_base(dir, "base.qcow2", "qcow2");
    let cases: [&[&str]; 6] = [
        &["-u", "-b", "missing.qcow2", "-F", "qcow2", "FILE", "1G"],
        &["-u", "-b", "base.qcow2", "-F", "qcow2", "FILE", "3M"],
        &["-o", "backing_file=base.qcow2,backing_fmt=qcow2", "FILE"],
        &[
            "-o",
            "backing_file=base.qcow2,backing_fmt=qcow2,size=5M",
            "FILE",
        ],
        &["-o", "backing_fmt=qcow2", "-b", "base.qcow2", "FILE"],
        &["-b", "base.qcow2", "-F", "raw", "FILE"],
    ];
    for (i, case) in cases.iter().enumerate() {
        let (ours, theirs) = (format!("ours{i}.qcow2"), format!("theirs{i}.qcow2"));
        let with = |name: &str, prefix: &[&str]| -> Vec<String> {
            prefix
                .iter()
                .chain(case.iter())
                .map(|a| {
                    if *a == "FILE" {
                        name.to_owned()
                    } else {
                        (*a).to_owned()
                    }
                })
                .collect()
        };
        let our_args = with(&ours, &["create", "-q"]);
        let their_args = with(&theirs, &["create", "-q", "-f", "qcow2"]);
        let our_refs = args_of(&our_args);
        let their_refs = args_of(&their_args);
        let output = qemu_img_in(dir, &their_refs);
        assert!(
            output.status.success(),
            "{case:?}: qemu-img: {}",
            describe(&output)
        );
        let output = cowclone_in(dir, &our_refs);
        assert!(
            output.status.success(),
            "{case:?}: cowclone: {}",
            describe(&output)
        );
        let label = format!("{case:?}");
        let (ours, theirs) = (dir.join(ours), dir.join(theirs));
        assert_bytes_equal_zero_extended(&ours, &theirs, &label);
        assert_info_keys_equal(
            &qemu_info_json(&ours),
            &qemu_info_json(&theirs),
            INFO_KEYS,
            &label,
        );
    }
}

/// `qemu-img create` lets `-b`/`-F` override `-o backing_file=`/`backing_fmt=`, and refuses a
/// size given both as `-o size=` and as the SIZE argument.
#[test]
fn conflicting_backing_and_size_options_resolve_like_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_base(dir, "base.qcow2", "qcow2");
    make_base(dir, "base.img", "raw");
    let backing = "backing_file=base.img,backing_fmt=raw";
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-b",
        &"base.qcow2",
        &"-F",
        &"qcow2",
        &"-o",
        &backing,
        &dir.join("theirs.qcow2"),
    ]);
    let output = cowclone_in(
        dir,
        &[
            &"create",
            &"-q",
            &"-b",
            &"base.qcow2",
            &"-F",
            &"qcow2",
            &"-o",
            &backing,
            &"ours.qcow2",
        ],
    );
    assert!(output.status.success(), "{}", describe(&output));
    assert_info_keys_equal(
        &qemu_info_json(&dir.join("ours.qcow2")),
        &qemu_info_json(&dir.join("theirs.qcow2")),
        INFO_KEYS,
        "-b with -o backing_file",
    );

    let theirs = qemu_img_in(
        dir,
        &[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &"-o",
            &"size=1M",
            &"t2.qcow2",
            &"5M",
        ],
    );
    assert!(!theirs.status.success(), "qemu-img accepts two sizes");
    let ours = cowclone_in(
        dir,
        &[&"create", &"-q", &"-o", &"size=1M", &"o2.qcow2", &"5M"],
    );
    assert!(!ours.status.success(), "cowclone accepts two sizes");
    assert!(!dir.join("o2.qcow2").exists());
}

// ---------------------------------------------------------------------------------------------
// Reverse direction: our reader on qemu-img's images
// ---------------------------------------------------------------------------------------------

/// `info --backing-chain` of both tools, run in `dir` on the relative name `top`.
fn both_chains(dir: &Path, top: &str) -> (Vec<Value>, Vec<Value>) {
    let output = qemu_img_in(dir, &[&"info", &"--backing-chain", &"--output=json", &top]);
    assert!(output.status.success(), "{}", describe(&output));
    let theirs: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    let output = cowclone_in(
        dir,
        &[&"info", &"--backing-chain", &"--output", &"json", &top],
    );
    assert!(output.status.success(), "{}", describe(&output));
    let ours: Vec<Value> = serde_json::from_slice(&output.stdout).unwrap();
    (ours, theirs)
}

#[test]
fn backing_chain_of_three_matches_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    std::fs::create_dir_all(dir.join("a/b")).unwrap();
    // base ← mid ← top, each in a deeper directory, so every name resolves relative to the one
    // before: a/b/top.qcow2 → a/b/../mid.qcow2 → a/b/../../base.qcow2 (no normalising).
    for args in [
        vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4k",
            "base.qcow2",
            "3M",
        ],
        vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../base.qcow2",
            "-F",
            "qcow2",
            "-o",
            "lazy_refcounts=on,refcount_bits=8",
            "a/mid.qcow2",
        ],
        vec![
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../mid.qcow2",
            "-F",
            "qcow2",
            "-o",
            "compat=0.10",
            "a/b/top.qcow2",
            "5M",
        ],
    ] {
        let args = args_of(&args);
        let output = qemu_img_in(dir, &args);
        assert!(output.status.success(), "{}", describe(&output));
    }
    let (ours, theirs) = both_chains(dir, "a/b/top.qcow2");
    assert_eq!(ours.len(), 3, "{ours:#?}");
    assert_eq!(
        ours.len(),
        theirs.len(),
        "chain lengths\n{ours:#?}\n{theirs:#?}"
    );
    for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
        assert_same_file_info(o, t, &format!("chain element {i}"));
    }
}

#[test]
fn info_of_a_v2_image_reports_compression_type_like_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("v2.qcow2");
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-o",
        &"compat=0.10",
        &image,
        &"1G",
    ]);
    let qemu_view = qemu_info_json(&image);
    assert_eq!(qemu_view["format-specific"]["data"]["compat"], "0.10");
    assert_eq!(
        cowclone_info_json(&image)["format-specific"],
        qemu_view["format-specific"]
    );
}

#[test]
fn backing_chain_over_vdi_and_raw_bases_matches_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    make_base(dir, "base.vdi", "vdi");
    write_pattern_file(&dir.join("base.img"), 1 << 20);
    for (base, format, top) in [
        ("base.vdi", "vdi", "on-vdi.qcow2"),
        ("base.img", "raw", "on-raw.qcow2"),
    ] {
        qemu_img_ok(&[
            &"create",
            &"-q",
            &"-f",
            &"qcow2",
            &"-b",
            &base,
            &"-F",
            &format,
            &dir.join(top),
        ]);
        let (ours, theirs) = both_chains(dir, top);
        assert_eq!(ours.len(), 2, "{ours:#?}");
        assert_eq!(ours.len(), theirs.len(), "{ours:#?}\n{theirs:#?}");
        let mut keys = INFO_KEYS.to_vec();
        keys.extend(["filename", "actual-size"]);
        assert_info_keys_equal(&ours[0], &theirs[0], &keys, top);
        // qemu-img prints no format-specific facts for VDI; cowclone adds its UUIDs (a
        // documented extension), so that one key is compared only for raw.
        keys.retain(|k| format == "raw" || *k != "format-specific");
        assert_info_keys_equal(&ours[1], &theirs[1], &keys, base);
    }
}

/// qemu-img rounds a raw file's size up to whole sectors (a 1000-byte file is a 1024-byte disk:
/// what a guest sees and what an overlay on it gets); `info` should report the same.
#[test]
fn raw_virtual_size_is_rounded_to_sectors_like_qemu_img() {
    let tmp = tempfile::tempdir().unwrap();
    let raw = tmp.path().join("small.img");
    write_pattern_file(&raw, 1000);
    let keys = [
        "virtual-size",
        "format",
        "filename",
        "actual-size",
        "dirty-flag",
    ];
    assert_info_keys_equal(
        &cowclone_info_json(&raw),
        &qemu_info_json(&raw),
        &keys,
        "1000-byte raw",
    );
}

// ---------------------------------------------------------------------------------------------
// Sparseness
// ---------------------------------------------------------------------------------------------

#[test]
fn overlay_of_a_1g_base_is_sparse() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let base = dir.join("base.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &base, &"1G"]);
    let ours = dir.join("ours.qcow2");
    let theirs = dir.join("theirs.qcow2");
    cowclone_ok(&[&"create", &"-q", &"-b", &base, &"-F", &"qcow2", &ours]);
    qemu_img_ok(&[
        &"create", &"-q", &"-f", &"qcow2", &"-b", &base, &"-F", &"qcow2", &theirs,
    ]);
    let (our_alloc, their_alloc) = (allocated_bytes(&ours), allocated_bytes(&theirs));
    eprintln!(
        "overlay of a 1 GiB base: {} bytes long; allocated: cowclone {our_alloc} bytes, qemu-img {their_alloc} bytes",
        file_len(&ours)
    );
    assert!(
        our_alloc <= 16384,
        "our overlay allocates {our_alloc} bytes"
    );
    assert!(
        our_alloc > 0,
        "nothing allocated: the header was not written"
    );
    assert_bytes_equal_zero_extended(&ours, &theirs, "1 GiB overlay");
    assert_qemu_check_clean(&ours, "1 GiB overlay");
}

// ---------------------------------------------------------------------------------------------
// No overwrite, no leftovers
// ---------------------------------------------------------------------------------------------

/// Asserts a failed CLI run: non-zero exit, exactly one error line.
fn assert_failed_one_line(output: &std::process::Output, context: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        !output.status.success(),
        "{context}: succeeded: {}",
        describe(output)
    );
    assert_eq!(
        stderr.lines().count(),
        1,
        "{context}: not one line: {stderr}"
    );
    assert!(stderr.starts_with("cowclone:"), "{context}: {stderr}");
}

#[test]
fn create_never_replaces_an_existing_file_unless_asked() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let target = dir.join("disk.qcow2");
    let original = b"precious data, not an image".repeat(100);
    std::fs::write(&target, &original).unwrap();

    let output = cowclone(&[&"create", &"-q", &target, &"1G"]);
    assert_failed_one_line(&output, "create onto an existing file");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        original,
        "the existing file changed"
    );

    // --overwrite with a create that fails half-way (the size is refused while laying out the
    // image, after the temporary file exists): the old file must survive intact.
    let output = cowclone(&[
        &"create",
        &"-q",
        &"--overwrite",
        &"-o",
        &"cluster_size=512",
        &target,
        &"10T",
    ]);
    assert_failed_one_line(&output, "failed --overwrite");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        original,
        "a failed overwrite changed it"
    );
    assert_no_temp_files(dir, "failed --overwrite");

    // An image cannot replace itself as its own backing file, even with --overwrite.
    let output = cowclone_in(
        dir,
        &[
            &"create",
            &"-q",
            &"--overwrite",
            &"-b",
            &"disk.qcow2",
            &"-F",
            &"raw",
            &"disk.qcow2",
        ],
    );
    assert_failed_one_line(&output, "--overwrite of its own backing file");
    assert_eq!(
        std::fs::read(&target).unwrap(),
        original,
        "replaced its own backing file"
    );
    assert_no_temp_files(dir, "--overwrite of its own backing file");

    cowclone_ok(&[&"create", &"-q", &"--overwrite", &target, &"1G"]);
    let theirs = dir.join("theirs.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &theirs, &"1G"]);
    assert_bytes_equal_zero_extended(&target, &theirs, "--overwrite");
    assert_qemu_check_clean(&target, "--overwrite");
    assert_eq!(dir_entries(dir), ["disk.qcow2", "theirs.qcow2"]);
}

#[test]
fn failed_creates_leave_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &dir.join("base.qcow2"),
        &"1M",
    ]);
    let long_name = "n".repeat(1024); // qemu's limit is 1023 bytes
    let cases: Vec<(&str, Vec<&str>)> = vec![
        (
            "bad option",
            vec!["-o", "cluster_size=3000", "new.qcow2", "1G"],
        ),
        (
            "unknown option",
            vec!["-o", "nonsense=1", "new.qcow2", "1G"],
        ),
        (
            "missing backing file",
            vec!["-b", "missing.qcow2", "-F", "qcow2", "new.qcow2"],
        ),
        (
            "size too large (fails after the temporary file exists)",
            vec!["-o", "cluster_size=512", "new.qcow2", "10T"],
        ),
        (
            "backing name too long (fails after the temporary file exists)",
            vec!["-u", "-b", &long_name, "-F", "qcow2", "new.qcow2", "1G"],
        ),
        ("bad size", vec!["new.qcow2", "12X"]),
        ("missing directory", vec!["no/such/dir/new.qcow2", "1G"]),
    ];
    for (what, args) in &cases {
        let mut full: Vec<&dyn AsRef<OsStr>> = vec![&"create", &"-q"];
        full.extend(args_of(args));
        let output = cowclone_in(dir, &full);
        assert_failed_one_line(&output, what);
        assert_eq!(
            dir_entries(dir),
            ["base.qcow2"],
            "{what}: files left behind"
        );
        assert_no_temp_files(dir, what);
    }
    // qemu-img refuses the same requests (its -u without opening also checks the name length).
    for (what, args) in &cases[..5] {
        let mut full: Vec<&dyn AsRef<OsStr>> = vec![&"create", &"-q", &"-f", &"qcow2"];
        full.extend(args_of(args));
        let output = qemu_img_in(dir, &full);
        assert!(!output.status.success(), "{what}: qemu-img accepts it");
    }
}
