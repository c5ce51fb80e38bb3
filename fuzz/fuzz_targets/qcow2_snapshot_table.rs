//! The qcow2 internal snapshot table from arbitrary bytes: `snapshot::walk_table`,
//! `snapshot::read_table`, `snapshot::encode_table`.
//!
//! Input: `[count: u16 BE][table bytes...]`, count taken modulo 4096 (larger counts only add
//! all-zero entries read past the input, at a cost that slows the fuzzer tenfold; the unit tests
//! cover 65,536 entries); the table is read at offset 0 and bytes past the input read as zeros
//! (as qemu reads past the end of the file).
//!
//! Properties checked (beyond "never panics, never allocates without bound"):
//! 1. `walk_table` and `read_table` accept the same inputs, and the layouts the walker reports
//!    are the decoded entries without their variable parts.
//! 2. An accepted table encodes (`encode_table`) and re-decodes to the same entries, normalised
//!    as qemu rewrites them (disk size filled in, 24 known bytes of extra data plus the unknown
//!    ones); encoding is then a fixed point.
#![no_main]

use imagefmt::qcow2::snapshot::{encode_table, read_table, walk_table, Snapshot, KNOWN_EXTRA_DATA};
use libfuzzer_sys::{fuzz_target, Corpus};

/// The image size a missing disk size stands for.
const IMAGE_SIZE: u64 = 1 << 30;

fn reader(table: &[u8]) -> impl FnMut(&mut [u8], u64) -> imagefmt::Result<()> + '_ {
    move |buf: &mut [u8], at: u64| {
        let start = usize::try_from(at).unwrap_or(usize::MAX).min(table.len());
        let n = (table.len() - start).min(buf.len());
        buf[..n].copy_from_slice(&table[start..start + n]);
        buf[n..].fill(0);
        Ok(())
    }
}

/// `sn` as qemu writes it back.
fn normalised(sn: &Snapshot) -> Snapshot {
    let mut sn = sn.clone();
    sn.disk_size = Some(sn.disk_size.unwrap_or(IMAGE_SIZE));
    sn.extra_data_size = KNOWN_EXTRA_DATA + sn.unknown_extra.len() as u32;
    sn
}

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() < 2 {
        return Corpus::Reject;
    }
    let count = u32::from(u16::from_be_bytes([data[0], data[1]])) % 4096;
    let table = &data[2..];

    // 1. Walker and reader agree.
    let mut layouts = Vec::new();
    let walked = walk_table(reader(table), 0, count, |layout| {
        layouts.push(layout.clone());
        Ok(())
    });
    let read = read_table(reader(table), 0, count);
    let entries = match (walked, read) {
        (Ok(_), Ok(entries)) => entries,
        (Err(a), Err(b)) => {
            assert_eq!(
                a.to_string(),
                b.to_string(),
                "walker and reader fail differently"
            );
            return Corpus::Keep;
        }
        (a, b) => panic!("walker {:?} vs reader {:?}", a.map(|_| ()), b.map(|_| ())),
    };
    assert_eq!(entries.len(), count as usize);
    for (layout, sn) in layouts.iter().zip(&entries) {
        let mut bare = sn.clone();
        bare.id.clear();
        bare.name.clear();
        bare.unknown_extra.clear();
        assert_eq!(layout.fields, bare, "layout of entry {}", layout.index);
        assert_eq!(usize::from(layout.id.1), sn.id.len());
        assert_eq!(usize::from(layout.name.1), sn.name.len());
    }

    // 2. Encode, decode, fixed point.
    let bytes = encode_table(&entries, IMAGE_SIZE)
        .unwrap_or_else(|e| panic!("an accepted table does not encode: {e}"));
    let again = read_table(reader(&bytes), 0, count)
        .unwrap_or_else(|e| panic!("an encoded table does not decode: {e}"));
    let expected: Vec<Snapshot> = entries.iter().map(normalised).collect();
    assert_eq!(again, expected, "decode(encode(t)) != normalised(t)");
    assert_eq!(
        encode_table(&again, IMAGE_SIZE).ok().as_deref(),
        Some(&bytes[..]),
        "encoding is not a fixed point"
    );
    Corpus::Keep
});
