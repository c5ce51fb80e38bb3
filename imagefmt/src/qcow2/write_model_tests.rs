//! Model-based tests of the write engine on memory: random write / zero / discard sequences on
//! an overlay over a random base, compared with a plain byte-array model after every step.
//! (The same sequences are checked with `qemu-img check` and `compare` in the integration tests.)

use proptest::prelude::*;

use super::create::{write_new_image, BackingReference, CreateOptions};
use super::header_cluster::HeaderCluster;
use super::image::Qcow2Image;
use super::write::WriteOptions;
use crate::extent::GuestRead;
use crate::io::MemBackend;
use crate::offsets::GuestOffset;
use crate::raw::RawReader;

/// One guest operation.
#[derive(Debug, Clone)]
pub(crate) enum Op {
    Write { offset: u64, len: u64, byte: u8 },
    Zero { offset: u64, len: u64 },
    Discard { offset: u64, len: u64 },
}

pub(crate) fn op(size: u64) -> impl Strategy<Value = Op> {
    let range =
        (0..size).prop_flat_map(move |offset| (Just(offset), 1..=(size - offset).min(300_000)));
    prop_oneof![
        4 => (range.clone(), any::<u8>()).prop_map(|((offset, len), byte)| Op::Write { offset, len, byte }),
        1 => range.clone().prop_map(|(offset, len)| Op::Zero { offset, len }),
        1 => range.prop_map(|(offset, len)| Op::Discard { offset, len }),
    ]
}

/// Applies `op` to the model: what the guest must read afterwards.
pub(crate) fn apply_to_model(model: &mut [u8], base: &[u8], op: &Op, cluster_size: u64, v3: bool) {
    match *op {
        Op::Write { offset, len, byte } => {
            model[offset as usize..(offset + len) as usize].fill(byte)
        }
        Op::Zero { offset, len } => model[offset as usize..(offset + len) as usize].fill(0),
        Op::Discard { offset, len } => {
            let size = model.len() as u64;
            let end = (offset + len).min(size);
            let start = offset.next_multiple_of(cluster_size);
            let whole_end = if end == size {
                end
            } else {
                end - end % cluster_size
            };
            for pos in start..whole_end.max(start) {
                // v3: zeros; v2: the backing file shows through again.
                model[pos as usize] = if v3 {
                    0
                } else {
                    base.get(pos as usize).copied().unwrap_or(0)
                };
            }
        }
    }
}

pub(crate) fn apply(image: &mut Qcow2Image<MemBackend>, op: &Op) {
    match *op {
        Op::Write { offset, len, byte } => {
            image.write_at(&vec![byte; len as usize], offset).unwrap()
        }
        Op::Zero { offset, len } => image.write_zeroes(offset, len).unwrap(),
        Op::Discard { offset, len } => image.discard(offset, len).unwrap(),
    }
}

fn options(index: usize) -> CreateOptions {
    let mut o = CreateOptions::default();
    let pairs: &[(&str, &str)] = match index {
        0 => &[],
        1 => &[("cluster_size", "4k")],
        2 => &[("compat", "0.10"), ("cluster_size", "8k")],
        3 => &[("extended_l2", "on"), ("cluster_size", "32k")],
        4 => &[("cluster_size", "512"), ("refcount_bits", "64")],
        _ => &[("cluster_size", "1k"), ("refcount_bits", "1")],
    };
    for (k, v) in pairs {
        o.set(k, v).unwrap();
    }
    o
}

fn read_all(image: &dyn GuestRead) -> Vec<u8> {
    let mut out = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut out, GuestOffset(0)).unwrap();
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    #[test]
    fn writes_read_back_like_the_model_for_every_layout(
        layout in 0usize..6,
        size_kib in 16u64..1024,
        base_len_kib in 0u64..1024,
        base_seed in any::<u8>(),
        ops in proptest::collection::vec(op(1024 << 10), 1..16),
    ) {
        let size = size_kib << 10;
        let base: Vec<u8> = (0..(base_len_kib << 10)).map(|i| (i as u8).wrapping_mul(7) ^ base_seed).collect();
        let opts = options(layout);
        let overlay = MemBackend::default();
        let backing = BackingReference { name: "base.raw".into(), format: "raw".into() };
        write_new_image(&overlay, size, &opts, Some(&backing)).unwrap();
        let cluster = HeaderCluster::read_from(&overlay).unwrap();
        let below = RawReader::new(MemBackend::new(base.clone())).unwrap();
        let mut image = Qcow2Image::open_rw(overlay, cluster, Some(Box::new(below)), WriteOptions::default()).unwrap();

        let mut model: Vec<u8> = (0..size as usize).map(|i| base.get(i).copied().unwrap_or(0)).collect();
        let v3 = opts.compat == super::create::Compat::V1_1;
        for op in ops.iter().map(|op| clip(op, size)) {
            apply(&mut image, &op);
            apply_to_model(&mut model, &base, &op, opts.cluster_size, v3);
            let got = read_all(&image);
            if let Some(i) = got.iter().zip(&model).position(|(a, b)| a != b) {
                prop_assert!(false, "after {:?}: byte {:#x} reads {:#04x}, model {:#04x}", op, i, got[i], model[i]);
            }
        }
        // Reopening from the bytes alone gives the same content (nothing lives only in caches).
        let bytes = image.backend().to_vec();
        // Refcounts raised run by run (one write per refcount block) match the references.
        let report = super::check::check(&MemBackend::new(bytes.clone()), super::check::Repair::None).unwrap();
        prop_assert!(report.corruptions == 0 && report.leaks == 0 && report.check_errors == 0, "check: {:?}", report.messages);
        let reopened_cluster = HeaderCluster::parse(&bytes[..bytes.len().min(opts.cluster_size as usize)]).unwrap();
        let below = RawReader::new(MemBackend::new(base.clone())).unwrap();
        let reopened = Qcow2Image::open(MemBackend::new(bytes), reopened_cluster, Some(Box::new(below))).unwrap();
        prop_assert!(read_all(&reopened) == model);
    }
}

/// Keeps an operation inside a disk of `size` bytes.
pub(crate) fn clip(op: &Op, size: u64) -> Op {
    let fit = |offset: u64, len: u64| {
        let offset = offset % size;
        (offset, len.min(size - offset).max(1))
    };
    match *op {
        Op::Write { offset, len, byte } => {
            let (offset, len) = fit(offset, len);
            Op::Write { offset, len, byte }
        }
        Op::Zero { offset, len } => {
            let (offset, len) = fit(offset, len);
            Op::Zero { offset, len }
        }
        Op::Discard { offset, len } => {
            let (offset, len) = fit(offset, len);
            Op::Discard { offset, len }
        }
    }
}
