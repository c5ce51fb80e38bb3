//! Guest reads through qcow2 chains, cross-checked byte for byte against `qemu-img convert -O raw`
//! on images written by qemu-img and qemu-io (Debian package qemu-utils).

use std::path::{Path, PathBuf};
use std::process::Command;

use imagefmt::backing::BackingPolicy;
use imagefmt::chain::open_chain;
use imagefmt::offsets::GuestOffset;

fn run(tool: &str, args: &[&str], dir: &Path) {
    crate::util::tool_ok_in(tool, dir, args);
}

/// qemu's view of the image: its whole guest content as raw bytes.
fn qemu_raw(image: &Path) -> Vec<u8> {
    let dir = image.parent().unwrap();
    let out = dir.join(format!(
        "{}.qemu-raw",
        image.file_name().unwrap().to_string_lossy()
    ));
    run(
        "qemu-img",
        &[
            "convert",
            "-O",
            "raw",
            image.to_str().unwrap(),
            out.to_str().unwrap(),
        ],
        dir,
    );
    std::fs::read(out).unwrap()
}

/// Our view, read in odd-sized pieces so that reads straddle (sub)cluster boundaries.
fn our_raw(image: &Path) -> Vec<u8> {
    let reader = open_chain(image, None, &BackingPolicy::FollowLocal).unwrap();
    let size = reader.virtual_size() as usize;
    let mut data = vec![0xeeu8; size];
    let mut offset = 0;
    let mut step = 0usize;
    while offset < size {
        let len = [4096, 3 * 512 + 7, 65536 + 1000, 100_000][step % 4].min(size - offset);
        reader
            .read_at(&mut data[offset..offset + len], GuestOffset(offset as u64))
            .unwrap();
        offset += len;
        step += 1;
    }
    data
}

fn assert_reads_like_qemu(image: &Path) {
    let ours = our_raw(image);
    let theirs = qemu_raw(image);
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{}: size differs",
        image.display()
    );
    if let Some(i) = ours.iter().zip(&theirs).position(|(a, b)| a != b) {
        panic!(
            "{}: first difference at guest offset {i:#x}: ours {:#04x}, qemu {:#04x}",
            image.display(),
            ours[i],
            theirs[i]
        );
    }
}

/// Writes that exercise every cluster kind on a 4 MiB disk.
const WRITES: &[&str] = &[
    "write -P 0x11 0 64k",
    "write -P 0x22 100k 3k",
    "write -z 1M 64k",
    "write -P 0x33 2M 512",
    "write -z 2M 512",
    "write -P 0x44 3M 128k",
    "discard 3M 64k",
];

fn make(
    dir: &Path,
    name: &str,
    create_opts: &str,
    backing: Option<(&str, &str)>,
    writes: &[&str],
) -> PathBuf {
    let mut args = vec!["create", "-q", "-f", "qcow2"];
    if !create_opts.is_empty() {
        args.extend(["-o", create_opts]);
    }
    if let Some((file, fmt)) = backing {
        args.extend(["-b", file, "-F", fmt]);
    }
    args.extend([name, "4M"]);
    run("qemu-img", &args, dir);
    for w in writes {
        run("qemu-io", &["-f", "qcow2", "-c", w, name], dir);
    }
    dir.join(name)
}

#[test]
fn every_cluster_kind_reads_like_qemu_for_every_layout_option() {
    let dir = tempfile::tempdir().unwrap();
    for (i, opts) in [
        "",
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=1",
        "extended_l2=on",
        "extended_l2=on,cluster_size=16k",
        "lazy_refcounts=on",
    ]
    .iter()
    .enumerate()
    {
        // v2 has no zero flag: qemu-io then writes real zeros, which is still worth reading.
        let image = make(dir.path(), &format!("img{i}.qcow2"), opts, None, WRITES);
        assert_reads_like_qemu(&image);
    }
}

#[test]
fn overlays_fall_through_to_qcow2_and_raw_bases_and_read_zeros_past_a_short_base() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make(d, "base.qcow2", "", None, &["write -P 0xa1 0 4M"]);
    let mid = make(
        d,
        "mid.qcow2",
        "extended_l2=on",
        Some(("base.qcow2", "qcow2")),
        &["write -P 0xb2 60k 8k"],
    );
    assert_reads_like_qemu(&mid);
    let top = make(
        d,
        "top.qcow2",
        "cluster_size=4k",
        Some(("mid.qcow2", "qcow2")),
        WRITES,
    );
    assert_reads_like_qemu(&top);

    std::fs::write(d.join("short.raw"), vec![0x5au8; 1_000_000]).unwrap();
    let over_raw = make(
        d,
        "over-raw.qcow2",
        "",
        Some(("short.raw", "raw")),
        &["write -P 0x77 900k 8k"],
    );
    assert_reads_like_qemu(&over_raw);
}

#[test]
fn compressed_clusters_read_like_qemu_for_deflate_and_zstd() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut pattern = Vec::with_capacity(4 << 20);
    for i in 0..(4u32 << 20) {
        pattern.push(((i / 4096) as u8).wrapping_mul(31) ^ ((i % 251) as u8 & 0x0f));
    }
    std::fs::write(d.join("src.raw"), &pattern).unwrap();
    for (name, opts) in [
        ("deflate.qcow2", "compression_type=zlib"),
        ("zstd.qcow2", "compression_type=zstd"),
        ("small.qcow2", "cluster_size=4k"),
    ] {
        run(
            "qemu-img",
            &["convert", "-c", "-O", "qcow2", "-o", opts, "src.raw", name],
            d,
        );
        assert_eq!(our_raw(&d.join(name)), pattern, "{name}");
        assert_reads_like_qemu(&d.join(name));
    }
}

#[test]
fn dirty_images_with_lazy_refcounts_read_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = make(d, "lazy.qcow2", "lazy_refcounts=on", None, &[]);
    // Abort qemu-io after a write so the dirty bit stays set.
    let _ = Command::new("qemu-io")
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x66 0 128k",
            "-c",
            "abort",
            "lazy.qcow2",
        ])
        .current_dir(d)
        .output()
        .expect("qemu-io not found: install the Debian package qemu-utils");
    let info = imagefmt::ops::info::image_info(&image).unwrap();
    assert!(
        info.dirty_flag,
        "qemu-io abort should leave the dirty bit set"
    );
    let ours = our_raw(&image);
    assert!(ours[..128 << 10].iter().all(|&b| b == 0x66));
    assert!(ours[128 << 10..].iter().all(|&b| b == 0));
}

#[test]
fn external_data_files_are_read_only_when_allowed_and_then_like_qemu() {
    use imagefmt::chain::open_chain_allowing_data_files;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, opts) in [
        ("df.qcow2", "data_file=df.data"),
        ("dfraw.qcow2", "data_file=dfraw.data,data_file_raw=on"),
    ] {
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"],
            d,
        );
        for w in [
            "write -P 0x61 64k 64k",
            "write -z 1M 64k",
            "write -P 0x62 3M 5k",
        ] {
            run("qemu-io", &["-f", "qcow2", "-c", w, name], d);
        }
        let image = d.join(name);
        // Refused by default: the header may name any host file.
        let refused = open_chain(&image, None, &BackingPolicy::FollowLocal);
        assert!(
            matches!(
                refused,
                Err(imagefmt::Error::Qcow2(
                    imagefmt::qcow2::Qcow2Error::ExternalDataFileRefused { .. }
                ))
            ),
            "{name}: {:?}",
            refused.err()
        );
        // Confinement applies to data files as to backing files.
        let elsewhere = tempfile::tempdir().unwrap();
        let confined = open_chain_allowing_data_files(
            &image,
            None,
            &BackingPolicy::Confine(elsewhere.path().to_owned()),
        );
        assert!(
            confined.is_err(),
            "{name}: data file outside the confinement was opened"
        );
        // Allowed: reads like qemu.
        let reader =
            open_chain_allowing_data_files(&image, None, &BackingPolicy::FollowLocal).unwrap();
        let mut ours = vec![0u8; reader.virtual_size() as usize];
        reader.read_at(&mut ours, GuestOffset(0)).unwrap();
        assert_eq!(ours, qemu_raw(&image), "{name}");
    }
}

/// Issue 11: with an external data file, guest cluster 0 can sit at host offset 0 (its L2 entry
/// is then COPIED with offset 0); qemu reads that data, and so must we.
#[test]
fn external_data_file_data_at_guest_offset_0_reads_like_qemu() {
    use imagefmt::chain::open_chain_allowing_data_files;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for (name, opts) in [
        ("z.qcow2", "data_file=z.data"),
        ("zraw.qcow2", "data_file=zraw.data,data_file_raw=on"),
        (
            "zx.qcow2",
            "data_file=zx.data,data_file_raw=on,extended_l2=on",
        ),
    ] {
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", "-o", opts, name, "4M"],
            d,
        );
        for w in ["write -P 0x71 0 4k", "write -P 0x72 1M 64k"] {
            run("qemu-io", &["-f", "qcow2", "-c", w, name], d);
        }
        let image = d.join(name);
        let reader =
            open_chain_allowing_data_files(&image, None, &BackingPolicy::FollowLocal).unwrap();
        let mut ours = vec![0u8; reader.virtual_size() as usize];
        reader.read_at(&mut ours, GuestOffset(0)).unwrap();
        assert!(
            ours[..4096].iter().all(|&b| b == 0x71),
            "{name}: guest offset 0 read back as something else"
        );
        assert_eq!(ours, qemu_raw(&image), "{name}");
    }
}

#[test]
fn images_with_internal_snapshots_read_their_active_state_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let image = make(d, "snap.qcow2", "", None, &["write -P 0x10 0 256k"]);
    run("qemu-img", &["snapshot", "-c", "first", "snap.qcow2"], d);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x20 64k 64k", "snap.qcow2"],
        d,
    );
    run("qemu-img", &["snapshot", "-c", "second", "snap.qcow2"], d);
    run(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -z 128k 64k", "snap.qcow2"],
        d,
    );
    assert_reads_like_qemu(&image);
    // Writing copies the clusters the snapshots share (tests/snapshot_xcheck.rs covers it in
    // depth): the written state and the snapshot both read as qemu reads them.
    let mut rw = imagefmt::chain::open_qcow2_rw(
        &image,
        &BackingPolicy::Deny,
        imagefmt::qcow2::write::WriteOptions::default(),
    )
    .unwrap();
    rw.write_at(&[0x30; 4096], 64 << 10).unwrap();
    drop(rw);
    assert_reads_like_qemu(&image);
    run("qemu-img", &["snapshot", "-a", "first", "snap.qcow2"], d);
    assert_reads_like_qemu(&image);
}
