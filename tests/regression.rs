//! Regression tests for hostile input: one named test per class of bad header, and one per fuzz
//! find (see `fuzz/README.md`: every find becomes a test here, `#[ignore]`d with a
//! `FUZZ FIND:` reason until the library is fixed).
//!
//! Each qcow2 case starts from a valid image made in memory the way qemu-img makes it
//! ([`qemu_style_qcow2`]) and overwrites one field at its byte offset; each VDI case starts from
//! a VirtualBox-layout header. Every case checks the specific error variant, through the
//! in-memory parser and through the backend reader (`ImageHeader::read_detected`), and where the
//! field is a size, that refusing it allocated no more than one cluster ([`largest_allocation`]).

use std::path::Path;

use imagefmt::backing::{self, BackingError, BackingPolicy};
use imagefmt::image::ImageHeader;
use imagefmt::io::MemBackend;
use imagefmt::qcow2::extensions::{parse_extensions, EXT_FEATURE_TABLE};
use imagefmt::qcow2::{CreateOptions, Header, HeaderCluster, Qcow2Error};
use imagefmt::vdi::{BlockMap, VdiError, VdiHeader, BLOCK_FREE, MAX_BLOCKS_IN_IMAGE};
use imagefmt::{Error, Qcow2Builder};

// ---------------------------------------------------------------------------------------------
// Allocation probe: the largest single allocation made by this thread while a closure runs.

mod alloc_probe {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;

    thread_local! {
        static ARMED: Cell<bool> = const { Cell::new(false) };
        static LARGEST: Cell<usize> = const { Cell::new(0) };
    }

    /// Forwards to [`System`], noting request sizes on threads that armed the probe.
    struct Probe;

    fn note(size: usize) {
        // `try_with`: never panic inside the allocator, even during thread teardown.
        if ARMED.try_with(Cell::get).unwrap_or(false) {
            let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
        }
    }

    // SAFETY: every method forwards its arguments unchanged to `System`, which upholds the
    // `GlobalAlloc` contract; `note` only touches const-initialised thread-locals (no allocation).
    unsafe impl GlobalAlloc for Probe {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: the caller's contract for `alloc` is passed on unchanged.
            unsafe { System.alloc(layout) }
        }
        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            note(layout.size());
            // SAFETY: the caller's contract for `alloc_zeroed` is passed on unchanged.
            unsafe { System.alloc_zeroed(layout) }
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            // SAFETY: `ptr` came from `System` through this allocator, with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            note(new_size);
            // SAFETY: `ptr` came from `System` through this allocator; the contract is passed on.
            unsafe { System.realloc(ptr, layout, new_size) }
        }
    }

    #[global_allocator]
    static GLOBAL: Probe = Probe;

    /// Runs `f` and returns its result with the largest single allocation it made (this thread).
    pub fn largest_allocation<T>(f: impl FnOnce() -> T) -> (T, usize) {
        LARGEST.with(|l| l.set(0));
        ARMED.with(|a| a.set(true));
        let out = f();
        ARMED.with(|a| a.set(false));
        (out, LARGEST.with(Cell::get))
    }
}

use alloc_probe::largest_allocation;

/// Refusing a header may read cluster 0 (64 KiB in these images), nothing larger.
const ALLOCATION_BOUND: usize = 64 << 10;

// ---------------------------------------------------------------------------------------------
// Fixtures and helpers.

/// A 1 GiB qcow2 image with qemu-img's defaults (v3, 64 KiB clusters, feature-name table at
/// byte 112, end marker at 504), made in memory.
fn qemu_style_qcow2() -> Vec<u8> {
    let backend = MemBackend::default();
    Qcow2Builder::new("x")
        .size(1 << 30)
        .create_on(&backend)
        .unwrap();
    backend.into_inner()
}

fn put_be32(bytes: &mut [u8], off: usize, v: u32) {
    bytes[off..off + 4].copy_from_slice(&v.to_be_bytes());
}

fn put_be64(bytes: &mut [u8], off: usize, v: u64) {
    bytes[off..off + 8].copy_from_slice(&v.to_be_bytes());
}

fn put_le32(bytes: &mut [u8], off: usize, v: u32) {
    bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Reads `bytes` as an image file would be read (format by magic, no raw fallback) and returns
/// the format error, with the largest allocation made while reading.
fn read_error(bytes: Vec<u8>) -> (Error, usize) {
    let backend = MemBackend::new(bytes).with_limit(1 << 20);
    let (result, largest) =
        largest_allocation(|| ImageHeader::read_detected(&backend, Path::new("x"), false));
    match result {
        Ok(h) => panic!("hostile image accepted: {h:?}"),
        Err(Error::FormatMismatch { source, .. }) => (source.into_inner(), largest),
        Err(e) => panic!("expected FormatMismatch, got {e:?}"),
    }
}

fn read_qcow2_error(bytes: Vec<u8>) -> Qcow2Error {
    match read_error(bytes) {
        (Error::Qcow2(e), largest) => {
            assert!(largest <= ALLOCATION_BOUND, "allocated {largest} bytes");
            e
        }
        (e, _) => panic!("expected a qcow2 error, got {e:?}"),
    }
}

fn read_vdi_error(bytes: Vec<u8>) -> VdiError {
    match read_error(bytes) {
        (Error::Vdi(e), largest) => {
            assert!(largest <= ALLOCATION_BOUND, "allocated {largest} bytes");
            e
        }
        (e, _) => panic!("expected a VDI error, got {e:?}"),
    }
}

/// Cluster 0 of `image` parsed in memory, with the largest allocation made.
fn parse_cluster0(image: &[u8]) -> (Result<HeaderCluster, Qcow2Error>, usize) {
    largest_allocation(|| HeaderCluster::parse(&image[..64 << 10]))
}

/// Asserts that the in-memory parser and the backend reader both refuse `image` with the error
/// `expected` builds (`Qcow2Error` is not `Clone`), allocating at most one cluster doing so.
fn assert_qcow2_refused(image: Vec<u8>, expected: impl Fn() -> Qcow2Error) {
    let (parsed, largest) = parse_cluster0(&image);
    assert_eq!(parsed, Err(expected()));
    assert!(
        largest <= ALLOCATION_BOUND,
        "parse allocated {largest} bytes"
    );
    assert_eq!(read_qcow2_error(image), expected());
}

// ---------------------------------------------------------------------------------------------
// qcow2: hostile header fields.

#[test]
fn allocation_probe_sees_a_large_allocation() {
    let (v, largest) = largest_allocation(|| vec![0u8; 1 << 20]);
    assert_eq!(v.len(), 1 << 20);
    assert!(largest >= 1 << 20, "probe saw only {largest} bytes");
    let ((), largest) = largest_allocation(|| ());
    assert_eq!(largest, 0);
}

#[test]
fn fixture_is_a_valid_qemu_style_image() {
    let image = qemu_style_qcow2();
    let (cluster, _) = parse_cluster0(&image);
    let cluster = cluster.unwrap();
    assert_eq!(cluster.header.header_length, 112);
    assert_eq!(cluster.header.cluster_bits, 16);
    let (extensions, after_end_marker) = parse_extensions(&image, &cluster.header).unwrap();
    assert_eq!(extensions[0].kind(), EXT_FEATURE_TABLE);
    assert_eq!(after_end_marker, 512);
    let backend = MemBackend::new(image);
    let header = ImageHeader::read_detected(&backend, Path::new("x"), false).unwrap();
    assert_eq!(header, ImageHeader::Qcow2(cluster));
}

#[test]
fn qcow2_l1_size_0xffffffff_is_refused_before_any_table_is_allocated() {
    let mut image = qemu_style_qcow2();
    put_be32(&mut image, 36, u32::MAX); // l1_size: 32 GiB of L1 entries
    assert_qcow2_refused(image, || Qcow2Error::L1TableTooLarge {
        entries: 0xFFFF_FFFF,
    });
}

#[test]
fn qcow2_refcount_table_clusters_0xffffffff_is_refused() {
    let mut image = qemu_style_qcow2();
    put_be32(&mut image, 56, u32::MAX); // refcount_table_clusters: 256 TiB of refcount table
    assert_qcow2_refused(image, || Qcow2Error::RefcountTableTooLarge {
        clusters: u32::MAX,
    });
}

#[test]
fn qcow2_backing_file_size_0xffffffff_is_refused_not_read() {
    let mut image = qemu_style_qcow2();
    put_be64(&mut image, 8, 512); // backing_file_offset: right after the end marker
    put_be32(&mut image, 16, u32::MAX); // backing_file_size
    assert_qcow2_refused(image, || Qcow2Error::BackingFileNameTooLong {
        size: u32::MAX,
        max: 1023,
    });
}

#[test]
fn qcow2_backing_file_size_without_a_backing_offset_is_ignored_and_not_read() {
    // qemu ignores backing_file_size when backing_file_offset is 0; so must we, without
    // sizing any read by it.
    let mut image = qemu_style_qcow2();
    put_be32(&mut image, 16, u32::MAX);
    let (parsed, largest) = parse_cluster0(&image);
    assert_eq!(parsed.unwrap().backing_file, None);
    assert!(
        largest <= ALLOCATION_BOUND,
        "parse allocated {largest} bytes"
    );
    let backend = MemBackend::new(image);
    let (read, largest) =
        largest_allocation(|| ImageHeader::read_detected(&backend, Path::new("x"), false));
    assert_eq!(read.unwrap().backing_name(), None);
    assert!(
        largest <= ALLOCATION_BOUND,
        "read allocated {largest} bytes"
    );
}

#[test]
fn qcow2_header_length_above_the_cluster_size_is_refused() {
    let mut image = qemu_style_qcow2();
    put_be32(&mut image, 100, (64 << 10) + 8); // header_length
    assert_qcow2_refused(image, || Qcow2Error::HeaderLengthTooLarge {
        found: (64 << 10) + 8,
        cluster_size: 64 << 10,
    });
}

#[test]
fn qcow2_header_extension_length_0xffffffff_is_refused() {
    let mut image = qemu_style_qcow2();
    assert_eq!(&image[112..116], &EXT_FEATURE_TABLE.to_be_bytes());
    put_be32(&mut image, 116, u32::MAX); // the feature table's length
    assert_qcow2_refused(image, || Qcow2Error::ExtensionTooLarge {
        kind: EXT_FEATURE_TABLE,
        offset: 112,
        end: 64 << 10,
    });
}

#[test]
fn qcow2_unknown_incompatible_feature_bit_5_is_refused() {
    let mut image = qemu_style_qcow2();
    image[79] |= 1 << 5; // incompatible_features, bytes 72-79 big-endian: bit 5
    assert_qcow2_refused(image, || Qcow2Error::UnsupportedIncompatibleFeatures {
        bits: 32,
        names: Vec::new(),
        unnamed: 32,
    });
}

#[test]
fn qcow2_cluster_bits_30_is_refused_before_a_cluster_is_read() {
    let mut image = qemu_style_qcow2();
    put_be32(&mut image, 20, 30); // cluster_bits: 1 GiB clusters
    assert_qcow2_refused(image, || Qcow2Error::InvalidClusterBits { found: 30 });
}

#[test]
fn qcow2_json_backing_name_parses_but_is_never_resolved() {
    let name = r#"json:{"file.driver":"file","file.filename":"/etc/shadow"}"#;
    let mut image = qemu_style_qcow2();
    // Where qemu puts a backing name: right after the extension end marker.
    let header = Header::parse(&image).unwrap();
    let (_, name_offset) = parse_extensions(&image, &header).unwrap();
    let at = name_offset as usize;
    image[at..at + name.len()].copy_from_slice(name.as_bytes());
    put_be64(&mut image, 8, name_offset);
    put_be32(&mut image, 16, name.len() as u32);

    // The name is data: it parses and is reported verbatim ...
    let (cluster, _) = parse_cluster0(&image);
    assert_eq!(cluster.unwrap().backing_file.as_deref(), Some(name));
    let backend = MemBackend::new(image.clone());
    let header = ImageHeader::read_detected(&backend, Path::new("x"), false).unwrap();
    assert_eq!(header.backing_name(), Some(name));

    // ... but never turned into a path, under any policy.
    let refused = BackingError::ProtocolRefused {
        name: name.to_owned(),
    };
    assert_eq!(backing::resolve(Path::new("x"), name), Err(refused));
    assert!(matches!(
        BackingPolicy::FollowLocal.resolve(Path::new("x"), name),
        Err(BackingError::ProtocolRefused { .. })
    ));

    // info reports it without a full (resolved) name, and the chain walk refuses it.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("overlay.qcow2");
    std::fs::write(&path, &image).unwrap();
    let info = imagefmt::ops::info::image_info(&path).unwrap();
    assert_eq!(info.backing_filename.as_deref(), Some(name));
    assert_eq!(info.full_backing_filename, None);
    match imagefmt::ops::info::backing_chain(&path, &BackingPolicy::FollowLocal) {
        Err(Error::Backing(BackingError::ProtocolRefused { name: refused })) => {
            assert_eq!(refused, name)
        }
        other => panic!("json: backing name followed: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// VDI: hostile header fields and block maps.

/// A 1 GiB dynamic VDI header as VirtualBox lays it out (0x200 bytes).
fn vbox_style_vdi() -> Vec<u8> {
    VdiHeader::new_dynamic(1 << 30).unwrap().to_bytes().to_vec()
}

#[test]
fn vdi_blocks_in_image_0xffffffff_is_refused_without_allocating_a_block_map() {
    let mut bytes = vbox_style_vdi();
    put_le32(&mut bytes, 0x180, u32::MAX); // blocks_in_image: a 16 GiB block map
    let expected = VdiError::TooManyBlocks {
        blocks: u32::MAX,
        max: MAX_BLOCKS_IN_IMAGE,
    };
    let (parsed, largest) = largest_allocation(|| VdiHeader::parse(&bytes));
    assert_eq!(parsed, Err(expected));
    assert!(
        largest <= ALLOCATION_BOUND,
        "parse allocated {largest} bytes"
    );
    assert_eq!(
        read_vdi_error(bytes),
        VdiError::TooManyBlocks {
            blocks: u32::MAX,
            max: MAX_BLOCKS_IN_IMAGE
        }
    );

    // A header that skipped validation still cannot make the block map parser allocate: the
    // length check comes first, and allocated > blocks is refused before the "seen" bitmap.
    let mut header = VdiHeader::new_dynamic(1 << 30).unwrap();
    header.blocks_in_image = u32::MAX;
    let (map, largest) = largest_allocation(|| BlockMap::parse(&[0xFF; 4096], &header));
    assert_eq!(
        map,
        Err(VdiError::BlockMapLengthMismatch {
            len: 4096,
            expected: 4 * u64::from(u32::MAX)
        })
    );
    assert!(
        largest <= ALLOCATION_BOUND,
        "block map allocated {largest} bytes"
    );
    let mut header = VdiHeader::new_dynamic(1 << 30).unwrap();
    header.blocks_allocated = u32::MAX;
    let (map, largest) = largest_allocation(|| BlockMap::parse(&[0xFF; 4096], &header));
    assert_eq!(
        map,
        Err(VdiError::AllocatedExceedsBlocks {
            allocated: u32::MAX,
            blocks: 1024
        })
    );
    assert!(
        largest <= ALLOCATION_BOUND,
        "block map allocated {largest} bytes"
    );
}

#[test]
fn vdi_block_map_with_a_duplicate_index_is_refused() {
    let mut bytes = VdiHeader::new_dynamic(4 << 20).unwrap().to_bytes().to_vec();
    put_le32(&mut bytes, 0x184, 2); // blocks_allocated
    let header = VdiHeader::parse(&bytes).unwrap();
    assert_eq!(header.blocks_in_image, 4);
    // Virtual blocks 0 and 2 both claim data block 0.
    let map: Vec<u8> = [0, 1, 0, BLOCK_FREE]
        .iter()
        .flat_map(|e: &u32| e.to_le_bytes())
        .collect();
    assert_eq!(
        BlockMap::parse(&map, &header),
        Err(VdiError::DuplicateBlockIndex {
            index: 0,
            first_block: 0,
            second_block: 2
        })
    );
}

// ---------------------------------------------------------------------------------------------
// Fuzz and review finds (fuzz/README.md). A find stays `#[ignore]`d until the library is fixed;
// then the `ignore` goes and the test guards the fix.

/// Found by `fuzz/qcow2_read` (differential against `HeaderCluster::parse`). Minimal input, 128
/// bytes: the start of `qemu-img create -f qcow2 -o cluster_size=512 x 1G` with header_length
/// (bytes 100-103) raised from 112 to 120; the 8 extra header bytes are zero and the extension
/// end marker follows at 120. qemu opens such an image (it keeps unknown header fields).
/// `read_from` read only 112 bytes before `Header::parse` and refused it as
/// `Truncated { len: 112, needed: 120 }`; fixed in the working tree the same day (it now reads
/// header_length bytes); this test guards the fix.
#[test]
fn qcow2_read_from_accepts_a_v3_header_longer_than_112_bytes() {
    let backend = MemBackend::default();
    Qcow2Builder::new("x")
        .size(1 << 30)
        .options(CreateOptions {
            cluster_size: 512,
            ..CreateOptions::default()
        })
        .create_on(&backend)
        .unwrap();
    let mut image = backend.into_inner();
    assert_eq!(&image[112..120], &[0; 8], "end marker at 112");
    put_be32(&mut image, 100, 120); // header_length
    let parsed = HeaderCluster::parse(&image[..512]).expect("parses in memory");
    assert_eq!(parsed.header.header_length, 120);

    let read = ImageHeader::read_detected(&MemBackend::new(image), Path::new("x"), false);
    match read {
        Ok(ImageHeader::Qcow2(cluster)) => assert_eq!(cluster, parsed),
        other => panic!("a valid image with header_length 120 is refused: {other:?}"),
    }
}

/// Found by `fuzz/qcow2_read` (differential against `HeaderCluster::parse`). Minimal input, 72
/// bytes: a v2 header (64 KiB clusters, size 0, refcount table at 0x10000) whose
/// backing_file_offset is 2 with backing_file_size 0. `read_from` sizes its read as
/// `max(extension area end, backing name end)` = 2 bytes, less than the header itself, and
/// fails with `Truncated { len: 2, needed: 72 }`; the in-memory parser accepts it, and so does
/// `qemu-img info`. Either outcome is acceptable as long as both readers agree. Fixed in the
/// working tree the same day (the read now covers at least the header); this test guards it.
#[test]
fn qcow2_read_from_reads_the_whole_header_when_the_backing_offset_points_into_it() {
    let mut image = qemu_style_qcow2();
    put_be64(&mut image, 8, 2); // backing_file_offset, backing_file_size stays 0
    let parsed = HeaderCluster::parse(&image[..64 << 10]);
    let read = ImageHeader::read_detected(&MemBackend::new(image), Path::new("x"), false);
    match (read, parsed) {
        (Ok(ImageHeader::Qcow2(read)), Ok(parsed)) => assert_eq!(read, parsed),
        (Err(Error::FormatMismatch { source, .. }), Err(parsed)) => match source.into_inner() {
            Error::Qcow2(read) => assert_eq!(read, parsed),
            other => panic!("unexpected read error {other:?}"),
        },
        (read, parsed) => panic!("backend read {read:?}, in-memory parse {parsed:?}"),
    }
}

/// `parse_size` computed `whole × 10^digits + fraction` with an unchecked `+`, which overflowed
/// u128 (a panic in debug builds, a wrong value in release) for 38-digit numbers. Spotted while
/// writing `fuzz/size` and reproduced with its binary; already fixed in the working tree
/// (`checked_add`) before the fuzzer reached it, so this test guards the fix. Each input must
/// give a value in range or an error, never a panic.
#[test]
fn size_with_38_digit_decimals_is_a_value_or_an_error_not_a_panic() {
    for (input, low, high) in [
        // 3.999… KiB: whole × 10^38 + fraction is above u128::MAX.
        (
            "3.99999999999999999999999999999999999999k",
            3 << 10,
            4 << 10,
        ),
        // 38-digit whole part: × 10 + 9 is above u128::MAX.
        ("34028236692093846346337460743176821145.9k", 0, u64::MAX),
        // No suffix: a fractional byte count.
        ("3.99999999999999999999999999999999999999", 3, 4),
    ] {
        let result = std::panic::catch_unwind(|| imagefmt::size::parse_size(input));
        match result {
            Ok(Ok(value)) => assert!(
                (low..high).contains(&value),
                "{input:?} parsed to {value}, outside [{low}, {high})"
            ),
            Ok(Err(e)) => assert_eq!(e.input, input),
            Err(_) => panic!("parse_size({input:?}) panicked"),
        }
    }
}

/// qemu-img reads `0x1e` as 30 bytes and `0x1b` as 27 (hex digits, `qemu-img create -f raw f
/// 0x1e` makes a 512-byte file); `parse_size` takes the trailing `e`/`b` for the EiB/byte
/// suffix and returns 1 EiB and 1. Found by review against qemu-img 7.2, not by the fuzzer.
#[test]
fn size_hex_ending_in_b_or_e_is_read_as_hex_digits_like_qemu_img() {
    assert_eq!(imagefmt::size::parse_size("0x1e"), Ok(0x1e));
    assert_eq!(imagefmt::size::parse_size("0x1E"), Ok(0x1e));
    assert_eq!(imagefmt::size::parse_size("0x1b"), Ok(0x1b));
}

/// Fuzz find (qcow2_guest, 2026-11-22): an L2 entry pointing at a metadata cluster made an
/// in-place guest write overwrite the L1 table. Writes into metadata clusters are now refused
/// (qemu's metadata overlap check), and the metadata is left intact.
#[test]
fn qcow2_guest_write_through_an_l2_entry_pointing_at_metadata_is_refused() {
    use imagefmt::extent::GuestRead;
    use imagefmt::io::{Backend, MemBackend};
    use imagefmt::offsets::GuestOffset;
    use imagefmt::qcow2::image::Qcow2Image;
    use imagefmt::qcow2::write::WriteOptions;
    use imagefmt::qcow2::HeaderCluster;

    // A 1 MiB image with one data cluster: L1 at 0x30000, L2 at 0x40000, data at 0x50000.
    let mem = MemBackend::default();
    imagefmt::Qcow2Builder::new("x")
        .size(1 << 20)
        .create_on(&mem)
        .unwrap();
    let cluster = HeaderCluster::read_from(&mem).unwrap();
    let mut image = Qcow2Image::open_rw(mem, cluster, None, WriteOptions::default()).unwrap();
    image.write_at(&[1u8; 4096], 0).unwrap();
    let mut bytes = image.backend().to_vec();
    let l1_before = bytes[0x30000..0x30010].to_vec();
    // Hostile edit: L2 entry 1 (guest cluster 1) says its data lives in the L1 table's cluster.
    bytes[0x40008..0x40010].copy_from_slice(&0x8000_0000_0003_0000u64.to_be_bytes());

    let mem = MemBackend::new(bytes);
    let cluster = HeaderCluster::read_from(&mem).unwrap();
    let mut image = Qcow2Image::open_rw(mem, cluster, None, WriteOptions::default()).unwrap();
    let err = image.write_at(&[0x5a; 4096], 0x10000).unwrap_err();
    assert!(err.to_string().contains("overlaps metadata"), "{err}");
    let mut l1_after = vec![0u8; 16];
    image
        .backend()
        .read_exact_at(&mut l1_after, 0x30000)
        .unwrap();
    assert_eq!(l1_after, l1_before, "the L1 table was overwritten");
    let mut first = [0u8; 4096];
    image.read_at(&mut first, GuestOffset(0)).unwrap();
    assert_eq!(first, [1u8; 4096]);
}

/// Two metadata structures in one cluster (an L1 entry naming the refcount table as its L2
/// table): the image cannot be written safely, so opening it for writing is refused.
#[test]
fn qcow2_with_overlapping_metadata_is_not_opened_for_writing() {
    use imagefmt::io::MemBackend;
    use imagefmt::qcow2::image::Qcow2Image;
    use imagefmt::qcow2::write::WriteOptions;
    use imagefmt::qcow2::HeaderCluster;

    let mem = MemBackend::default();
    imagefmt::Qcow2Builder::new("x")
        .size(1 << 20)
        .create_on(&mem)
        .unwrap();
    let mut bytes = mem.to_vec();
    bytes[0x30000..0x30008].copy_from_slice(&0x8000_0000_0001_0000u64.to_be_bytes());
    let mem = MemBackend::new(bytes);
    let cluster = HeaderCluster::read_from(&mem).unwrap();
    let refused = Qcow2Image::open_rw(mem, cluster, None, WriteOptions::default());
    assert!(
        refused.is_err(),
        "an image whose L2 table is its refcount table was opened for writing"
    );
}

/// Fuzz find (qcow2_guest, 2026-11-22): a data cluster referenced with COPIED but counted as
/// free was written in place and then handed out again (as a refcount block), losing the write.
/// In-place writes now require the refcount the COPIED flag promises.
#[test]
fn qcow2_in_place_write_into_a_cluster_counted_as_free_is_refused() {
    use imagefmt::io::MemBackend;
    use imagefmt::qcow2::image::Qcow2Image;
    use imagefmt::qcow2::write::WriteOptions;
    use imagefmt::qcow2::HeaderCluster;

    let mem = MemBackend::default();
    imagefmt::Qcow2Builder::new("x")
        .size(1 << 20)
        .create_on(&mem)
        .unwrap();
    let cluster = HeaderCluster::read_from(&mem).unwrap();
    let mut image = Qcow2Image::open_rw(mem, cluster, None, WriteOptions::default()).unwrap();
    image.write_at(&[1u8; 4096], 0).unwrap(); // L2 at cluster 4, data at cluster 5
    let mut bytes = image.backend().to_vec();
    bytes[0x2000a..0x2000c].copy_from_slice(&[0, 0]); // refcount of cluster 5 := 0 (16-bit entries)

    let mem = MemBackend::new(bytes);
    let cluster = HeaderCluster::read_from(&mem).unwrap();
    let mut image = Qcow2Image::open_rw(mem, cluster, None, WriteOptions::default()).unwrap();
    let err = image.write_at(&[2u8; 512], 0).unwrap_err();
    assert!(err.to_string().contains("refcount is not 1"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Fuzz finds of 2026-12-01 (.ci/fuzz): both were wrong properties in the targets; the inputs
// stay here so the library keeps reading them as qemu does.

/// Fuzz find (`qcow2_header`, within 5,000 runs): `backing_file_offset` 65 with
/// `backing_file_size` 0. The parser reads no backing file; the target insisted that a header
/// without a name has offset 0. qemu reads `backing_file_size` bytes at the offset, gets an
/// empty name, and an empty name is no backing file: `qemu-img info` shows none, `qemu-img
/// check` is clean and qemu-io reads the image. So the parser was right and the target's
/// property was fixed; this test holds the parser to qemu's reading.
#[test]
fn qcow2_backing_offset_65_with_size_0_is_no_backing_file_as_in_qemu() {
    let mut image = qemu_style_qcow2();
    put_be64(&mut image, 8, 65); // backing_file_offset: inside the fixed header
    put_be32(&mut image, 16, 0); // backing_file_size
    let (parsed, _) = parse_cluster0(&image);
    let parsed = parsed.expect("qemu opens this header, so must we");
    assert_eq!(parsed.backing_file, None);
    assert_eq!(
        (
            parsed.header.backing_file_offset,
            parsed.header.backing_file_size
        ),
        (65, 0)
    );

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("offset65.qcow2");
    std::fs::write(&path, &image).unwrap();
    let theirs = crate::util::qemu_info_json(&path);
    assert_eq!(theirs["format"], "qcow2", "qemu-img info: {theirs}");
    assert!(
        theirs.get("backing-filename").is_none(),
        "qemu-img info reports a backing file: {theirs}"
    );
    crate::util::assert_qemu_check_clean(&path, "offset 65, size 0");

    let ours = imagefmt::ops::info::image_info(&path).unwrap();
    assert_eq!(ours.backing_filename, None);
    assert_eq!(ours.virtual_size, theirs["virtual-size"].as_u64().unwrap());
    // And the chain is this image alone, under the strictest following policy too.
    let chain =
        imagefmt::ops::info::backing_chain(&path, &BackingPolicy::Confine(dir.path().into()))
            .expect("an image without a backing file opens under confinement");
    assert_eq!(chain.len(), 1);
}

/// Fuzz find (`size`, within 15,000 runs): `0XD`. `parse_size` reads 13; the target took the
/// trailing `D` for an (unknown) suffix and expected a refusal. qemu reads hex as strtoull
/// does, every hex digit part of the number (`qemu-io -c 'read 0 0XD'` reads 13 bytes), so the
/// target's property was fixed; this test holds the parser to qemu-io's reading.
#[test]
fn size_0xd_is_13_bytes_as_qemu_io_reads_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("4k.raw");
    std::fs::write(&path, [0u8; 4096]).unwrap();
    for (input, value) in [("0XD", 13u64), ("0xd", 13), ("0x1e", 30), ("0x10b", 0x10b)] {
        assert_eq!(imagefmt::size::parse_size(input), Ok(value), "{input}");
        let command = format!("read 0 {input}");
        let stdout =
            crate::util::qemu_io_ok(&[&"-f", &"raw", &"-c", &command.as_str(), &path.as_path()]);
        assert!(
            stdout.contains(&format!("read {value}/{value} bytes at offset 0")),
            "qemu-io reads {input} differently: {stdout}"
        );
    }
}

/// Fuzz find (`qcow2_read`, CI run of 2026-12-02): 427 bytes starting with `conectix`, the VHD
/// (vpc) magic, followed by what looks like a qcow header. Since foreign formats are recognised,
/// such a file is refused by name rather than read as raw; the target's property still expected
/// the raw fallback and was fixed. qemu-img recognises the file as vpc too (and refuses its
/// checksum); cowclone must neither read it as raw nor as qcow2.
#[test]
fn fuzz_qcow2_read_conectix_bytes_are_a_vhd_refused_by_name() {
    let hex = "636f6e656374697851460002000049fb00000000000000600000001200000009000000004000000000000000000080000000500000000600000000000000020000000001000000000000000000000000e2792aca0000000571636f77310000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000002e2e2f78000100010001000100010001000100010001000100010001000100010001000100010001000100010001000100010001000100010001514649fb0000000300000000fbfffdef0000000d00000010000000004000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000000";
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    assert_eq!(bytes.len(), 427);
    let backend = MemBackend::new(bytes.clone());
    for raw_fallback in [false, true] {
        let read = ImageHeader::read_detected(&backend, Path::new("img"), raw_fallback);
        assert!(
            matches!(read, Err(Error::ForeignFormat { .. })),
            "raw_fallback {raw_fallback}: {read:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("img");
    std::fs::write(&path, &bytes).unwrap();
    let ours = crate::util::cowclone(&[&"info", &path]);
    let stderr = String::from_utf8_lossy(&ours.stderr);
    assert!(
        !ours.status.success() && stderr.contains("is a VHD (vpc) image"),
        "{}",
        crate::util::describe(&ours)
    );
    // qemu-img's probe takes it for vpc as well (and then rejects the header checksum).
    let theirs = crate::util::qemu_img(&[&"info", &"--output=json", &path]);
    assert!(
        String::from_utf8_lossy(&theirs.stderr).contains("header checksum"),
        "{}",
        crate::util::describe(&theirs)
    );
}

/// Fuzz find (`qcow2_bitmap_dir`, 2026-12-02): a bitmap directory entry with granularity_bits
/// 144 overflowed the shift that checks whether the table covers the disk, before the
/// granularity bound (9..=31) was checked. qemu-img refuses such an image ("Bitmap 'b1' doesn't
/// satisfy the constraints"); so does cowclone, with the same message and no panic.
#[test]
fn qcow2_bitmap_granularity_bits_144_is_refused_not_an_overflow() {
    use imagefmt::qcow2::bitmap::{parse_directory, BitmapError};
    // The fuzzer's input: 64 KiB clusters, 1 bitmap, 64 KiB disk, then the entry.
    let mut entry = Vec::new();
    entry.extend_from_slice(&0x2_0000u64.to_be_bytes()); // bitmap_table_offset
    entry.extend_from_slice(&1u32.to_be_bytes()); //         bitmap_table_size
    entry.extend_from_slice(&2u32.to_be_bytes()); //         flags: auto
    entry.push(1); //                                        type: dirty tracking
    entry.push(144); //                                      granularity_bits (bad)
    entry.extend_from_slice(&2u16.to_be_bytes()); //         name_size
    entry.extend_from_slice(&0u32.to_be_bytes()); //         extra_data_size
    entry.extend_from_slice(b"b1\0\0\0\0\0\0"); //            name, padding
    assert_eq!(
        parse_directory(&entry, 32, 1, 65536, 65536),
        Err(BitmapError::Constraints { name: "b1".into() })
    );
    // The same entry in a real image, judged by qemu-img.
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("g.qcow2");
    crate::util::qemu_img_ok(&[&"create", &"-f", &"qcow2", &image, &"16M"]);
    crate::util::qemu_img_ok(&[&"bitmap", &"--add", &image, &"b1"]);
    let backend = std::fs::read(&image).unwrap();
    let cluster = HeaderCluster::parse(&backend[..4096]).unwrap();
    let ext = imagefmt::qcow2::bitmap::extension(&cluster).expect("bitmaps extension");
    let mut bytes = backend;
    bytes[ext.directory_offset as usize + 17] = 144;
    std::fs::write(&image, &bytes).unwrap();
    let theirs = crate::util::qemu_img(&[&"info", &image]);
    let ours = crate::util::cowclone(&[&"info", &image]);
    assert_eq!(theirs.status.code(), Some(1));
    assert_eq!(
        ours.status.code(),
        Some(1),
        "{}",
        crate::util::describe(&ours)
    );
    let message = "Bitmap 'b1' doesn't satisfy the constraints";
    assert!(String::from_utf8_lossy(&theirs.stderr).contains(message));
    assert!(
        String::from_utf8_lossy(&ours.stderr).contains(message),
        "{}",
        crate::util::describe(&ours)
    );
}

/// Fuzz find (`chain_policy`, CI of 2026-12-02): a qcow2 image whose snapshot table declares
/// 65,537 bytes of extra data in an entry opened for reading (the reader never looked at the
/// snapshot table) while `info` refused it, so an image opened that did not list. qemu reads
/// the table when it opens an image and refuses this one; so does cowclone now, for reading,
/// for `info` and for `map`, and qemu-img agrees.
#[test]
fn qcow2_snapshot_extra_data_65537_refuses_opening_as_qemu_does() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("s.qcow2");
    crate::util::qemu_img_ok(&[&"create", &"-q", &"-f", &"qcow2", &image, &"16M"]);
    crate::util::qemu_img_ok(&[&"snapshot", &"-c", &"s1", &image]);
    let mut bytes = std::fs::read(&image).unwrap();
    let header = Header::parse(&bytes).unwrap();
    assert_eq!(header.nb_snapshots, 1);
    // The entry's extra_data_size field (bytes 36..40 of the entry).
    let at = header.snapshots_offset as usize + 36;
    bytes[at..at + 4].copy_from_slice(&65_537u32.to_be_bytes());
    std::fs::write(&image, &bytes).unwrap();

    let opened = imagefmt::chain::open_chain(&image, None, &BackingPolicy::FollowLocal);
    assert!(opened.is_err(), "a snapshot table qemu refuses opened");
    assert!(imagefmt::ops::info::backing_chain(&image, &BackingPolicy::FollowLocal).is_err());
    for command in ["info", "map"] {
        let theirs = crate::util::qemu_img(&[&command, &image]);
        let ours = crate::util::cowclone(&[&command, &image]);
        assert_eq!(
            theirs.status.code(),
            Some(1),
            "{}",
            crate::util::describe(&theirs)
        );
        assert_eq!(
            ours.status.code(),
            Some(1),
            "{}",
            crate::util::describe(&ours)
        );
    }
}

/// Fuzz find (`qcow2_guest`, fresh-clone CI of 2026-12-02, libFuzzer out-of-memory at its
/// 512 MB RSS limit): `check -r all` of this 6,044-byte image rebuilds its refcount structure
/// far into the file, growing the in-memory file to tens of MiB. That growth is bounded by the
/// backend's limit (the target ran several 64 MiB files per input under ASan; it now gives
/// each 16 MiB). The repair must stay within the limit it is given, whatever the header says:
/// it either succeeds inside it or fails with an error, never panics.
#[test]
fn fuzz_qcow2_guest_repair_stays_inside_the_backend_limit() {
    let bytes = include_bytes!("fuzz-finds/qcow2_guest-oom-c39d3d7");
    for limit in [16u64 << 20, 64 << 20] {
        let backend = MemBackend::new(bytes.to_vec()).with_limit(limit);
        let _ = imagefmt::qcow2::check::check(&backend, imagefmt::qcow2::check::Repair::All);
        let len = imagefmt::io::Backend::len(&backend).unwrap();
        assert!(
            len <= limit,
            "repair grew the file to {len} bytes, limit {limit}"
        );
    }
}
