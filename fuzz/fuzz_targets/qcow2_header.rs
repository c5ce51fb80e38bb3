//! qcow2 cluster 0 from arbitrary bytes: `Header::parse` and `HeaderCluster::parse`.
//!
//! Properties checked (beyond "never panics, never allocates without bound"):
//! 1. `Header::parse` accepts ⇒ `Header::to_bytes` reproduces the input's first
//!    `encoded_len()` bytes exactly, and re-parses to an equal `Header`.
//! 2. `HeaderCluster::parse` accepts ⇒ `Header::parse` accepts the same bytes with the same
//!    header, and the backing name is exactly the bytes the header points at; no name means
//!    offset 0 or size 0 (an empty name is no backing file, as qemu reads it).
//! 3. `HeaderCluster::to_bytes` of an accepted cluster either fails for one of the two
//!    writer-only reasons (`HeaderLengthUnaligned`, `HeaderClusterOverflow`) or yields at most
//!    one cluster of bytes that re-parse to an equal cluster (modulo `backing_file_offset` /
//!    `backing_file_size`, which `to_bytes` recomputes), and encoding is then a fixed point:
//!    `to_bytes(parse(to_bytes(c))) == to_bytes(c)`.
#![no_main]

use imagefmt::qcow2::header::V2_HEADER_LEN;
use imagefmt::qcow2::{Header, HeaderCluster, Qcow2Error};
use libfuzzer_sys::{fuzz_target, Corpus};

/// The cluster with the two fields `to_bytes` recomputes cleared.
fn normalised(cluster: &HeaderCluster) -> HeaderCluster {
    let mut c = cluster.clone();
    c.header.backing_file_offset = 0;
    c.header.backing_file_size = 0;
    c
}

fuzz_target!(|data: &[u8]| -> Corpus {
    // Shorter than a v2 header: parse can only say Truncated, which unit tests cover.
    if data.len() < V2_HEADER_LEN as usize {
        let _ = HeaderCluster::parse(data);
        return Corpus::Reject;
    }

    // 1. The fixed header re-encodes byte for byte.
    let header = Header::parse(data);
    if let Ok(h) = &header {
        let bytes = h.to_bytes();
        assert_eq!(bytes.len(), h.encoded_len(), "Header::to_bytes length");
        assert_eq!(
            &bytes[..],
            &data[..bytes.len()],
            "Header::to_bytes does not reproduce the parsed bytes"
        );
        assert_eq!(Header::parse(&bytes).as_ref(), Ok(h), "Header re-parse");
    }

    let Ok(cluster) = HeaderCluster::parse(data) else {
        return Corpus::Keep;
    };

    // 2. Consistent with the fixed-header parser and with the bytes.
    assert_eq!(
        header.as_ref(),
        Ok(&cluster.header),
        "HeaderCluster vs Header"
    );
    let h = &cluster.header;
    match &cluster.backing_file {
        // qemu reads `backing_file_size` bytes at a non-zero offset; zero bytes is an empty
        // name, which means no backing file (qcow2_do_open, then bdrv_open_backing_file).
        None => assert!(
            h.backing_file_offset == 0 || h.backing_file_size == 0,
            "a {}-byte backing name at offset {} was dropped",
            h.backing_file_size,
            h.backing_file_offset
        ),
        Some(name) => {
            let start = h.backing_file_offset as usize;
            let end = start + h.backing_file_size as usize;
            assert!(h.backing_file_offset != 0, "name without a backing offset");
            assert!(!name.is_empty(), "an empty name is no backing file");
            assert!(
                end as u64 <= h.cluster_size(),
                "backing name outside cluster 0"
            );
            assert_eq!(name.as_bytes(), &data[start..end], "backing name bytes");
        }
    }
    // Accessors must not panic.
    let _ = cluster.backing_format();
    let _ = cluster.data_file();
    let _ = (h.l2_entries(), h.refcount_bits(), h.extended_l2());

    // 3. Round trip through the writer.
    match cluster.to_bytes() {
        Ok(bytes) => {
            assert!(
                bytes.len() as u64 <= h.cluster_size(),
                "to_bytes wrote {} bytes, more than one {}-byte cluster",
                bytes.len(),
                h.cluster_size()
            );
            let again = HeaderCluster::parse(&bytes)
                .unwrap_or_else(|e| panic!("to_bytes output does not re-parse: {e:?}"));
            assert_eq!(normalised(&again), normalised(&cluster), "round trip");
            assert_eq!(
                again.to_bytes().as_deref(),
                Ok(&bytes[..]),
                "to_bytes is not a fixed point after one normalising pass"
            );
        }
        Err(
            Qcow2Error::HeaderLengthUnaligned { .. } | Qcow2Error::HeaderClusterOverflow { .. },
        ) => {}
        Err(e) => panic!("to_bytes refused a cluster that parsed: {e:?}"),
    }
    Corpus::Keep
});
