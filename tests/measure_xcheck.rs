//! `cowclone measure` against `qemu-img measure` (Debian package qemu-utils, 10.0): the same
//! numbers, human and JSON, for `--size` over sizes and `-o` options, and for images (qcow2 with
//! and without a backing file, raw with holes, VDI) measured as qcow2 and raw.

use std::path::Path;

use proptest::prelude::*;

use crate::util::{args_of, cowclone, describe, qemu_img, qemu_img_ok, qemu_io_ok};

/// Runs `measure ARGS` with both tools and asserts the same exit status and stdout; returns
/// whether qemu-img succeeded.
fn assert_same_measure(args: &[String]) -> bool {
    let theirs = qemu_img(&args_of(
        &std::iter::once("measure".to_owned())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>(),
    ));
    let mut ours_args = vec!["measure".to_owned()];
    ours_args.extend(args.iter().cloned());
    let ours = cowclone(&args_of(&ours_args));
    assert_eq!(
        ours.status.success(),
        theirs.status.success(),
        "measure {args:?}: qemu-img {}\ncowclone {}",
        describe(&theirs),
        describe(&ours)
    );
    assert_eq!(
        String::from_utf8_lossy(&ours.stdout),
        String::from_utf8_lossy(&theirs.stdout),
        "measure {args:?}"
    );
    theirs.status.success()
}

fn strings(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

/// qcow2 `-o` option sets qemu accepts, with the layouts that change the numbers.
fn qcow2_options() -> impl Strategy<Value = String> {
    (
        prop::sample::select(vec!["512", "4k", "16k", "64k", "256k", "2M"]),
        prop::sample::select(vec!["1", "2", "8", "16", "64"]),
        any::<bool>(),
        prop::sample::select(vec!["off", "metadata", "falloc", "full"]),
        any::<bool>(),
    )
        .prop_map(|(cluster, refcount, extended, prealloc, v2)| {
            let extended = extended && !v2 && cluster != "512" && cluster != "4k";
            let refcount = if v2 { "16" } else { refcount };
            let compat = if v2 { "0.10" } else { "1.1" };
            format!(
                "cluster_size={cluster},refcount_bits={refcount},extended_l2={},\
                 preallocation={prealloc},compat={compat}",
                if extended { "on" } else { "off" }
            )
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn measure_size_matches_qemu_img(
        size in prop_oneof![0u64..(1 << 20), 0u64..(1 << 44)],
        options in qcow2_options(),
        json in any::<bool>(),
    ) {
        let mut args = strings(&["-O", "qcow2", "-o", &options, "--size", &size.to_string()]);
        if json {
            args.push("--output=json".into());
        }
        assert_same_measure(&args);
        let raw = strings(&["-O", "raw", "--size", &size.to_string()]);
        prop_assert!(assert_same_measure(&raw));
    }
}

/// A qcow2 image with data, zeros and holes; an overlay on it; a raw file with holes; a VDI.
fn make_sources(dir: &Path) -> Vec<String> {
    let base = dir.join("base.qcow2");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &base, &"64M"]);
    qemu_io_ok(&[
        &"-c",
        &"write -P 1 0 1M",
        &"-c",
        &"write -P 2 3M 100",
        &"-c",
        &"write -z 8M 2M",
        &"-c",
        &"write -P 3 63M 1M",
        &base,
    ]);
    let overlay = dir.join("overlay.qcow2");
    qemu_img_ok(&[
        &"create", &"-q", &"-f", &"qcow2", &"-b", &base, &"-F", &"qcow2", &overlay,
    ]);
    qemu_io_ok(&[
        &"-c",
        &"write -P 4 10M 70k",
        &"-c",
        &"write -z 0 64k",
        &overlay,
    ]);
    let small = dir.join("small.qcow2");
    qemu_img_ok(&[
        &"create",
        &"-q",
        &"-f",
        &"qcow2",
        &"-o",
        &"cluster_size=4k,compat=0.10",
        &small,
        &"3M",
    ]);
    qemu_io_ok(&[&"-c", &"write -P 5 4097 5000", &small]);
    let raw = dir.join("disk.raw");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"raw", &raw, &"20M"]);
    qemu_io_ok(&[
        &"-f",
        &"raw",
        &"-c",
        &"write -P 6 1M 300k",
        &"-c",
        &"write -P 7 19M 4k",
        &raw,
    ]);
    let odd = dir.join("odd.raw");
    std::fs::write(&odd, vec![9u8; 1000]).unwrap();
    let vdi = dir.join("disk.vdi");
    qemu_img_ok(&[&"create", &"-q", &"-f", &"vdi", &vdi, &"16M"]);
    qemu_io_ok(&[&"-c", &"write -P 8 2M 1M", &"-c", &"write -P 9 9M 10", &vdi]);
    [base, overlay, small, raw, odd, vdi]
        .iter()
        .map(|p| p.to_string_lossy().into_owned())
        .collect()
}

#[test]
fn measure_images_matches_qemu_img() {
    let dir = tempfile::tempdir().unwrap();
    for source in make_sources(dir.path()) {
        for options in [
            "",
            "cluster_size=4k",
            "cluster_size=2M,refcount_bits=64",
            "cluster_size=16k,extended_l2=on",
            "compat=0.10",
            "preallocation=falloc",
            "backing_file=elsewhere.qcow2",
        ] {
            for json in [false, true] {
                let mut args = strings(&["-O", "qcow2"]);
                if !options.is_empty() {
                    args.extend(strings(&["-o", options]));
                }
                if json {
                    args.push("--output=json".into());
                }
                args.push(source.clone());
                assert!(
                    assert_same_measure(&args),
                    "qemu-img measure {args:?} failed"
                );
            }
        }
        assert!(assert_same_measure(&strings(&[&source])));
        assert!(assert_same_measure(&strings(&[
            "-O",
            "raw",
            "--output=json",
            &source
        ])));
    }
}

#[test]
fn measure_usage_errors_match_qemu_img() {
    for args in [
        vec![],
        strings(&["--size", "1G", "x.img"]),
        strings(&["-O", "vdi", "--size", "1G"]),
        strings(&[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4k,extended_l2=on",
            "--size",
            "1G",
        ]),
        strings(&[
            "-O",
            "qcow2",
            "-o",
            "compat=0.10,refcount_bits=8",
            "--size",
            "1G",
        ]),
        strings(&["-O", "qcow2", "--size", "4P"]),
    ] {
        assert!(
            !assert_same_measure(&args),
            "qemu-img measure {args:?} succeeded"
        );
        let ours = cowclone(&args_of(
            &std::iter::once("measure".to_owned())
                .chain(args.iter().cloned())
                .collect::<Vec<_>>(),
        ));
        assert_eq!(
            ours.status.code(),
            Some(1),
            "measure {args:?}: {}",
            describe(&ours)
        );
    }
}
