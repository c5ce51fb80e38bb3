//! The write engine cross-checked by qemu: random write / zero / discard sequences on overlays of
//! every layout, then `qemu-img check` must find no errors and no leaks, and `qemu-img compare`
//! must find the image equal to the model. Tools: Debian package qemu-utils.

use std::path::Path;

use imagefmt::backing::BackingPolicy;
use imagefmt::chain::open_qcow2_rw;
use imagefmt::qcow2::write::WriteOptions;
use imagefmt::qcow2::CreateOptions;
use imagefmt::{ImageFormat, Qcow2Builder};
use proptest::prelude::*;

fn qemu_img(args: &[&str], dir: &Path) -> std::process::Output {
    crate::util::tool_in("qemu-img", dir, args)
}

/// (corruptions, leaks, check-errors) from `qemu-img check --output=json`.
fn qemu_check(image: &str, dir: &Path) -> (u64, u64, u64, String) {
    let out = qemu_img(&["check", "--output=json", image], dir);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "qemu-img check gave no JSON ({e}): {text} {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    let n = |k: &str| json.get(k).and_then(|v| v.as_u64()).unwrap_or(0);
    (n("corruptions"), n("leaks"), n("check-errors"), text)
}

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: u64, byte: u8 },
    Zero { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

fn op(size: u64) -> impl Strategy<Value = Op> {
    let range = (0..size).prop_flat_map(move |o| (Just(o), 1..=(size - o).min(200_000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((offset, len), byte)| Op::Write { offset, len, byte }),
        1 => range.clone().prop_map(|(offset, len)| Op::Zero { offset, len }),
        1 => range.prop_map(|(offset, len)| Op::Discard { offset, len }),
    ]
}

const LAYOUTS: &[&str] = &[
    "",
    "cluster_size=4k",
    "compat=0.10,cluster_size=8k",
    "extended_l2=on,cluster_size=32k",
    "cluster_size=512,refcount_bits=64",
    "cluster_size=1k,refcount_bits=1",
    "lazy_refcounts=on,refcount_bits=8",
];

fn options(spec: &str) -> CreateOptions {
    let mut o = CreateOptions::default();
    for pair in spec.split(',').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap();
        o.set(k, v).unwrap();
    }
    o
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 14, ..ProptestConfig::default() })]

    #[test]
    fn random_writes_leave_images_qemu_finds_clean_and_equal_to_the_model(
        layout in 0..LAYOUTS.len(),
        size_kib in 64u64..1536,
        base_len_kib in 0u64..1536,
        seed in any::<u8>(),
        ops in proptest::collection::vec(op(1536 << 10), 1..20),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let size = size_kib << 10;
        let base: Vec<u8> = (0..(base_len_kib << 10)).map(|i| (i as u8).wrapping_mul(13) ^ seed).collect();
        std::fs::write(d.join("base.raw"), &base).unwrap();
        let opts = options(LAYOUTS[layout]);
        Qcow2Builder::new(d.join("ov.qcow2"))
            .size(size)
            .options(opts.clone())
            .backing("base.raw")
            .backing_format(ImageFormat::Raw)
            .create()
            .unwrap();
        let mut model: Vec<u8> = (0..size as usize).map(|i| base.get(i).copied().unwrap_or(0)).collect();
        {
            let mut image = open_qcow2_rw(&d.join("ov.qcow2"), &BackingPolicy::FollowLocal, WriteOptions::default()).unwrap();
            let cs = opts.cluster_size;
            for op in &ops {
                match *op {
                    Op::Write { offset, len, byte } => {
                        let (o, l) = (offset % size, len.min(size - offset % size));
                        image.write_at(&vec![byte; l as usize], o).unwrap();
                        model[o as usize..(o + l) as usize].fill(byte);
                    }
                    Op::Zero { offset, len } => {
                        let (o, l) = (offset % size, len.min(size - offset % size));
                        image.write_zeroes(o, l).unwrap();
                        model[o as usize..(o + l) as usize].fill(0);
                    }
                    Op::Discard { offset, len } => {
                        let (o, l) = (offset % size, len.min(size - offset % size));
                        image.discard(o, l).unwrap();
                        let end = o + l;
                        let start = o.next_multiple_of(cs);
                        let whole_end = if end == size { end } else { end - end % cs };
                        for p in start..whole_end.max(start) {
                            model[p as usize] = if opts.compat == imagefmt::qcow2::Compat::V1_1 { 0 } else { base.get(p as usize).copied().unwrap_or(0) };
                        }
                    }
                }
            }
            image.flush().unwrap();
        }
        let (corruptions, leaks, errors, text) = qemu_check("ov.qcow2", d);
        prop_assert_eq!((corruptions, leaks, errors), (0, 0, 0), "layout {} ops {:?}: {}", LAYOUTS[layout], ops, text);
        std::fs::write(d.join("model.raw"), &model).unwrap();
        let out = qemu_img(&["compare", "-f", "qcow2", "-F", "raw", "ov.qcow2", "model.raw"], d);
        prop_assert!(out.status.success(), "layout {} ops {:?}: {}", LAYOUTS[layout], ops, String::from_utf8_lossy(&out.stdout));
    }
}

#[test]
fn growing_the_refcount_table_and_the_l1_table_stays_clean() {
    // 512-byte clusters with 64-bit refcounts: one refcount-table cluster lists 64 blocks of
    // 64 clusters = 2 MiB of file, so 3 MiB of writes must relocate the table; a resize from
    // 1 MiB to 64 MiB must relocate the L1 table.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    Qcow2Builder::new(d.join("t.qcow2"))
        .size(1 << 20)
        .options(options("cluster_size=512,refcount_bits=64"))
        .create()
        .unwrap();
    let mut image = open_qcow2_rw(
        &d.join("t.qcow2"),
        &BackingPolicy::Deny,
        WriteOptions::default(),
    )
    .unwrap();
    image.resize(64 << 20, false).unwrap();
    let mut model = vec![0u8; 64 << 20];
    for i in 0..48u64 {
        let offset = i * (1 << 20) + 4096;
        let data = vec![i as u8 + 1; 65536];
        image.write_at(&data, offset).unwrap();
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    drop(image);
    let (corruptions, leaks, errors, text) = qemu_check("t.qcow2", d);
    assert_eq!((corruptions, leaks, errors), (0, 0, 0), "{text}");
    let info = imagefmt::ops::info::image_info(&d.join("t.qcow2")).unwrap();
    assert_eq!(info.virtual_size, 64 << 20);
    let header = std::fs::read(d.join("t.qcow2")).unwrap();
    let table_clusters = u32::from_be_bytes(header[56..60].try_into().unwrap());
    assert!(table_clusters > 1, "the refcount table should have grown");
    std::fs::write(d.join("model.raw"), &model).unwrap();
    let out = qemu_img(
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "t.qcow2",
            "model.raw",
        ],
        d,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn shrinking_refuses_to_drop_allocated_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    Qcow2Builder::new(d.join("s.qcow2"))
        .size(4 << 20)
        .create()
        .unwrap();
    let mut image = open_qcow2_rw(
        &d.join("s.qcow2"),
        &BackingPolicy::Deny,
        WriteOptions { durable: true },
    )
    .unwrap();
    image.write_at(&[1; 512], 3 << 20).unwrap();
    assert!(
        image.resize(2 << 20, false).is_err(),
        "shrinking without permission"
    );
    assert!(
        image.resize(2 << 20, true).is_err(),
        "data at 3 MiB would be lost"
    );
    image.write_zeroes(3 << 20, 64 << 10).unwrap();
    image.resize(2 << 20, true).unwrap();
    drop(image);
    let (corruptions, leaks, errors, text) = qemu_check("s.qcow2", d);
    assert_eq!((corruptions, leaks, errors), (0, 0, 0), "{text}");
    assert_eq!(
        imagefmt::ops::info::image_info(&d.join("s.qcow2"))
            .unwrap()
            .virtual_size,
        2 << 20
    );
}
