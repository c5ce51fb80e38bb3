//! The qcow2 internal snapshot table from arbitrary bytes: `snapshot::walk_table`,
//! `snapshot::read_table`, `snapshot::encode_table`.
//!
//! Input: `[count: u16 BE][table bytes...]`, count taken modulo 4096 (larger counts only add
//! all-zero entries read past the input, at a cost that slows the fuzzer tenfold; the unit tests
//! cover 65,536 entries); the table is read at offset 0 and bytes past the input read as zeros
//! (as qemu reads past the end of the file).
//!
//! Properties checked (beyond "never panics, never allocates without bound"):
//! 1. `walk_table` and `read_table` accept the same inputs, measure the same table size, and
//!    the layouts the walker reports are the decoded entries without their variable parts.
//! 2. An accepted table encodes (`encode_table`) and re-decodes to the same entries, normalised
//!    as qemu rewrites them (`Snapshot::as_written`: disk size filled in, 24 known bytes of
//!    extra data plus the unknown ones), and as long as the encoding; encoding is then a fixed
//!    point.
#![no_main]

use imagefmt::qcow2::snapshot::{encode_table, read_table, walk_table, Snapshot};
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
        (Ok(size), Ok(table)) => {
            assert_eq!(size, table.size, "walker and reader measure differently");
            table.entries
        }
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
    assert_eq!(again.size, bytes.len() as u64, "size of the encoded table");
    let again = again.entries;
    let expected: Vec<Snapshot> = entries.iter().map(|sn| sn.as_written(IMAGE_SIZE)).collect();
    assert_eq!(again, expected, "decode(encode(t)) != as_written(t)");
    assert_eq!(
        encode_table(&again, IMAGE_SIZE).ok().as_deref(),
        Some(&bytes[..]),
        "encoding is not a fixed point"
    );
    Corpus::Keep
});
