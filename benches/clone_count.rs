//! `clone --count 1000`: per-clone time and allocated bytes of registry clones, against
//! `qemu-img create -b base.qcow2 -F qcow2` per clone, measured in one run on one filesystem.
//!
//! | row                    | what is timed                                                    |
//! |------------------------|------------------------------------------------------------------|
//! | `registry clone x1000` | `Registry::clone_images` with `count = 1000` (what `cowclone clone BASE NAME --count 1000` runs): fingerprint check of the base, 1000 × (mkdir, overlay via O_TMPFILE + linkat, INSERT), one commit; divided by 1000 |
//! | `qemu-img create`      | one `qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 PATH`, spawned and waited |
//!
//! Allocated bytes: `st_blocks × 512` of each clone image; for the registry also per clone its
//! directory and the database growth (database + WAL after the run, minus before, / 1000).
//! Each registry round uses a fresh home (5 rounds, median reported); qemu-img is spawned 200
//! times (median reported).
//!
//! Run: `cargo bench -p cowclone-benches --bench clone_count`. Under `cargo test` (no
//! `--bench` argument) it runs a small smoke version and checks its results.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use cloner::{CloneSpec, Home, RegisterBase, Registry};
use imagefmt::Qcow2Builder;

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values[values.len() / 2]
}

struct RegistryRound {
    per_clone: Duration,
    image_bytes: u64,
    dir_bytes: u64,
    db_bytes: u64,
}

fn registry_round(root: &Path, base: &Path, round: usize, count: u64) -> RegistryRound {
    let home = Home::at(root.join(format!("home-{round}")));
    let mut registry = Registry::open(&home).expect("open registry");
    registry
        .register_base(&RegisterBase::new("base", base))
        .expect("register");
    let db = |suffix: &str| allocated(&root.join(format!("home-{round}/registry.sqlite{suffix}")));
    let db_before = db("") + db("-wal");
    let spec = CloneSpec {
        count: Some(count),
        ..CloneSpec::new("base", "c")
    };
    let started = Instant::now();
    let made = registry.clone_images(&spec).expect("clone --count");
    let elapsed = started.elapsed();
    assert_eq!(made.clones.len() as u64, count);
    let mut image_bytes = 0;
    let mut dir_bytes = 0;
    for clone in &made.clones {
        image_bytes += allocated(&clone.path);
        dir_bytes += allocated(clone.dir.as_ref().expect("clone dir"));
    }
    let db_after = db("") + db("-wal");
    RegistryRound {
        per_clone: elapsed / count as u32,
        image_bytes: image_bytes / count,
        dir_bytes: dir_bytes / count,
        db_bytes: db_after.saturating_sub(db_before) / count,
    }
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let (rounds, count, spawns) = if full { (5, 1000, 200) } else { (1, 10, 3) };
    let root = tempfile::tempdir().expect("temp dir");
    let root = root.path();

    let mut registry_rounds = Vec::new();
    for round in 0..rounds {
        // A fresh base per round: a registered base is read-only and fingerprinted.
        let base = root.join(format!("base-{round}.qcow2"));
        Qcow2Builder::new(&base)
            .size(1 << 30)
            .create()
            .expect("base");
        registry_rounds.push(registry_round(root, &base, round, count));
    }

    let base = root.join("qemu-base.qcow2");
    Qcow2Builder::new(&base)
        .size(1 << 30)
        .create()
        .expect("base");
    let qemu_dir = root.join("qemu");
    std::fs::create_dir(&qemu_dir).unwrap();
    let mut qemu_times = Vec::new();
    let mut qemu_bytes = Vec::new();
    for i in 0..spawns {
        let path = qemu_dir.join(format!("c{i}.qcow2"));
        let started = Instant::now();
        let status = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(&base)
            .args(["-F", "qcow2"])
            .arg(&path)
            .status()
            .unwrap_or_else(|e| panic!("qemu-img (Debian package qemu-utils) is required: {e}"));
        qemu_times.push(started.elapsed().as_secs_f64() * 1e6);
        assert!(status.success(), "qemu-img create failed");
        qemu_bytes.push(allocated(&path) as f64);
    }

    let reg_us = median(
        registry_rounds
            .iter()
            .map(|r| r.per_clone.as_secs_f64() * 1e6)
            .collect(),
    );
    let reg_img = median(
        registry_rounds
            .iter()
            .map(|r| r.image_bytes as f64)
            .collect(),
    );
    let reg_dir = median(registry_rounds.iter().map(|r| r.dir_bytes as f64).collect());
    let reg_db = median(registry_rounds.iter().map(|r| r.db_bytes as f64).collect());
    let q_us = median(qemu_times);
    let q_bytes = median(qemu_bytes);
    println!("clone_count: {rounds} round(s) of clone --count {count}; qemu-img create x{spawns}");
    println!("| what | median per clone | allocated per clone |");
    println!("|---|---|---|");
    println!(
        "| registry clone x{count} (library) | {reg_us:.1} us | image {reg_img:.0} B + dir {reg_dir:.0} B + db {reg_db:.0} B |"
    );
    println!("| qemu-img create (spawn) | {q_us:.1} us | image {q_bytes:.0} B |");
    println!(
        "| ratio | {:.0}x faster | {:.1}x less (image only) |",
        q_us / reg_us,
        q_bytes / reg_img.max(1.0)
    );
    assert!(reg_img > 0.0 && q_bytes > 0.0, "images allocate something");
}
