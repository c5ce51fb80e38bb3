//! The persistent-bitmap codec (`qcow2::bitmap`) on arbitrary bytes, two ways:
//!
//! * input starting with the qcow2 magic: a whole image on memory; `bitmap::read_directory`
//!   through its bitmaps extension, then `for_each_dirty_run` over every bitmap;
//! * any other input: `parse_directory` directly, its parameters from the first 13 bytes
//!   (cluster bits, bitmap count, disk size), the rest the directory.
//!
//! Properties (beyond "never panics, never allocates without bound"): an accepted directory
//! has exactly the promised number of entries, each within qemu's bounds
//! (`satisfies_constraints`); `encode_directory` of it has exactly the directory's size and
//! re-parses to equal entries; dirty runs are non-empty, in order, and inside the bitmap.
#![no_main]

use imagefmt::io::MemBackend;
use imagefmt::qcow2::bitmap::{self, BitmapEntry};
use imagefmt::qcow2::{HeaderCluster, MAGIC};
use libfuzzer_sys::{fuzz_target, Corpus};

fn round_trip(entries: &[BitmapEntry], size: u64, nb: u32, cluster_size: u64, disk_size: u64) {
    assert_eq!(entries.len() as u64, u64::from(nb), "entry count");
    for e in entries {
        assert!(e.satisfies_constraints(cluster_size, disk_size), "{e:?}");
    }
    let bytes = bitmap::encode_directory(entries);
    assert_eq!(bytes.len() as u64, size, "encoded size");
    let again = bitmap::parse_directory(&bytes, size, nb, cluster_size, disk_size)
        .unwrap_or_else(|e| panic!("encoded directory does not re-parse: {e:?}"));
    assert_eq!(again, entries, "round trip");
}

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.starts_with(&MAGIC.to_be_bytes()) {
        let backend = MemBackend::new(data.to_vec()).with_limit(64 << 20);
        let Ok(cluster) = HeaderCluster::read_from(&backend) else {
            return Corpus::Keep;
        };
        let Ok(entries) = bitmap::read_directory(&backend, &cluster) else {
            return Corpus::Keep;
        };
        let h = &cluster.header;
        if let Some(ext) = bitmap::extension(&cluster).filter(|e| e.nb_bitmaps > 0) {
            round_trip(&entries, ext.directory_size, ext.nb_bitmaps, h.cluster_size(), h.size);
        }
        for entry in &entries {
            let bits = bitmap::bit_count(h.size, entry.granularity_bits);
            let mut last = 0;
            let _ = bitmap::for_each_dirty_run(&backend, entry, h.cluster_size(), h.size, |s, e| {
                assert!(s < e && s >= last && e <= bits, "run {s}..{e} after {last} of {bits}");
                last = e;
                Ok(())
            });
        }
        return Corpus::Keep;
    }
    if data.len() < 13 + bitmap::DIR_ENTRY_LEN {
        return Corpus::Reject;
    }
    let cluster_bits = 9 + u32::from(data[0]) % 13;
    let nb = u32::from_be_bytes(data[1..5].try_into().unwrap());
    let disk_size = u64::from_be_bytes(data[5..13].try_into().unwrap());
    let dir = &data[13..];
    let cluster_size = 1u64 << cluster_bits;
    let size = dir.len() as u64;
    match bitmap::parse_directory(dir, size, nb, cluster_size, disk_size) {
        Ok(entries) => round_trip(&entries, size, nb, cluster_size, disk_size),
        Err(_) => return Corpus::Keep,
    }
    Corpus::Keep
});
