//! Any image read through the `Backend` seam: `ImageHeader::read_detected` on a `MemBackend`,
//! then the accessors `info` uses and the backing-name policy.
//!
//! Properties checked (beyond "never panics, never allocates without bound"):
//! 1. Reading never writes: the backend's bytes are unchanged.
//! 2. The format follows the magic: qcow2 magic ⇒ `Qcow2`, VDI signature ⇒ `Vdi`, anything else
//!    ⇒ `Raw { len }` with `raw_fallback` and `UnrecognizedFormat` without it.
//! 3. Differential: reading from the backend gives what the in-memory parsers give on the whole
//!    input (`HeaderCluster::parse(data)`, `VdiHeader::parse(data)`): the same value, or the
//!    same kind of error. The backend reader must read everything the parsers look at.
//! 4. A stored backing name goes through `backing::resolve` without panicking; an empty name
//!    or a protocol name (`json:`, `nbd:`, ...) is refused, any other name resolves against the
//!    image's directory verbatim; the `Deny` policy follows nothing.
//! 5. `ImageInfo::from_header` agrees with the header accessors.
#![no_main]

use std::path::Path;
use std::sync::OnceLock;

use imagefmt::backing::{self, BackingError, BackingPolicy};
use imagefmt::image::ImageHeader;
use imagefmt::ops::info::ImageInfo;
use imagefmt::io::MemBackend;
use imagefmt::qcow2::{HeaderCluster, Qcow2Error};
use imagefmt::vdi::{VdiError, VdiHeader};
use imagefmt::{detect, Error, ImageFormat};
use libfuzzer_sys::{fuzz_target, Corpus};

/// Reading must never grow the backend; keep any accidental write small and visible.
const GROWTH_LIMIT: u64 = 1 << 20;

fn metadata() -> &'static std::fs::Metadata {
    static META: OnceLock<std::fs::Metadata> = OnceLock::new();
    META.get_or_init(|| std::fs::metadata(".").expect("metadata of the working directory"))
}

/// The format error inside a `read_as` failure.
fn qcow2_error(e: Error) -> Qcow2Error {
    match e {
        Error::FormatMismatch { source, .. } => match source.into_inner() {
            Error::Qcow2(e) => e,
            other => panic!("qcow2 read failed with a non-qcow2 error: {other:?}"),
        },
        other => panic!("qcow2 read failed without FormatMismatch: {other:?}"),
    }
}

fn vdi_error(e: Error) -> VdiError {
    match e {
        Error::FormatMismatch { source, .. } => match source.into_inner() {
            Error::Vdi(e) => e,
            other => panic!("VDI read failed with a non-VDI error: {other:?}"),
        },
        other => panic!("VDI read failed without FormatMismatch: {other:?}"),
    }
}

/// Same value when both accept; the same kind of error when both refuse. Error *fields* may
/// differ (a `Truncated` error reports how many bytes the reader had in hand, and the backend
/// reader reads the fixed header first), so only the variant is compared.
fn same_outcome<T: PartialEq + std::fmt::Debug, E: std::fmt::Debug>(
    via_backend: &Result<T, E>,
    direct: &Result<T, E>,
    what: &str,
) {
    match (via_backend, direct) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "{what}: different values"),
        (Err(a), Err(b)) => assert_eq!(
            std::mem::discriminant(a),
            std::mem::discriminant(b),
            "{what}: different errors {a:?} / {b:?}"
        ),
        _ => panic!("{what}: backend read {via_backend:?}, in-memory parse {direct:?}"),
    }
}

fn check_backing_name(name: &str) {
    let resolved = backing::resolve(Path::new("img"), name);
    if name.is_empty() {
        assert_eq!(resolved, Err(BackingError::EmptyName));
    } else if backing::has_protocol_prefix(name) {
        assert!(
            matches!(resolved, Err(BackingError::ProtocolRefused { .. })),
            "protocol name {name:?} not refused: {resolved:?}"
        );
    } else {
        // "img" has no directory part, so every local name resolves to itself.
        let path = resolved.unwrap_or_else(|e| panic!("local name {name:?} refused: {e:?}"));
        assert_eq!(path.as_os_str(), name, "resolve changed the name");
        let nested = backing::resolve(Path::new("dir/img"), name).unwrap();
        if name.starts_with('/') {
            assert_eq!(nested.as_os_str(), name);
        } else {
            assert_eq!(
                nested.as_os_str().as_encoded_bytes(),
                format!("dir/{name}").as_bytes()
            );
        }
    }
    assert!(BackingPolicy::Deny.resolve(Path::new("img"), name).is_err());
}

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() < 8 {
        return Corpus::Reject;
    }
    let backend = MemBackend::new(data.to_vec()).with_limit(GROWTH_LIMIT);
    let path = Path::new("img");
    let probed = detect::probe(data);

    let strict = ImageHeader::read_detected(&backend, path, false);
    let read = ImageHeader::read_detected(&backend, path, true);

    // 1. Reading never writes.
    assert!(backend.to_vec() == data, "reading changed the backend");

    // 2 and 3. Format by magic, and the same answer as the in-memory parsers.
    // A format cowclone recognises but does not read (VMDK, VHD, …) is refused by name, with
    // or without the raw fallback: never read as raw.
    if probed.is_none() {
        // The first 2 KiB, and the last sector of a file of at least two sectors.
        let head = &data[..data.len().min(detect::FOREIGN_HEAD_LEN)];
        let tail = if data.len() >= 2 * detect::FOREIGN_TAIL_LEN {
            &data[data.len() - detect::FOREIGN_TAIL_LEN..]
        } else {
            &[][..]
        };
        if let Some(format) = detect::probe_foreign(head, tail) {
            for outcome in [&strict, &read] {
                assert!(
                    matches!(outcome, Err(Error::ForeignFormat { format: f, .. }) if *f == format),
                    "{format:?} bytes not refused by name: {outcome:?}"
                );
            }
            return Corpus::Keep;
        }
    }

    let header = match probed {
        None => {
            assert!(
                matches!(strict, Err(Error::UnrecognizedFormat { .. })),
                "unrecognised bytes without raw fallback: {strict:?}"
            );
            match read {
                Ok(h @ ImageHeader::Raw { len }) => {
                    assert_eq!(len, data.len() as u64);
                    h
                }
                other => panic!("unrecognised bytes not read as raw: {other:?}"),
            }
        }
        Some(ImageFormat::Qcow2) => {
            let direct = HeaderCluster::parse(data);
            let via_backend = read.map_err(qcow2_error).map(|h| match h {
                ImageHeader::Qcow2(c) => c,
                other => panic!("qcow2 magic read as {other:?}"),
            });
            same_outcome(&via_backend, &direct, "read_from vs HeaderCluster::parse");
            match via_backend {
                Ok(c) => ImageHeader::Qcow2(c),
                Err(_) => return Corpus::Keep,
            }
        }
        Some(ImageFormat::Vdi) => {
            let direct = VdiHeader::parse(data);
            let via_backend = read.map_err(vdi_error).map(|h| match h {
                ImageHeader::Vdi(h) => *h,
                other => panic!("VDI signature read as {other:?}"),
            });
            same_outcome(&via_backend, &direct, "read_as(Vdi) vs VdiHeader::parse");
            match via_backend {
                Ok(h) => ImageHeader::Vdi(Box::new(h)),
                Err(_) => return Corpus::Keep,
            }
        }
        Some(ImageFormat::Raw) => unreachable!("probe never answers raw"),
    };
    if probed.is_some() {
        // With a recognised magic the fallback must not matter.
        assert_eq!(
            strict.ok().as_ref(),
            Some(&header),
            "raw_fallback changed a recognised read"
        );
    }

    // 4. Backing name through the policy layer; backing format as a format name.
    if let Some(name) = header.backing_name() {
        check_backing_name(name);
    }
    if let Some(format) = header.backing_format() {
        let _ = format.parse::<ImageFormat>();
    }

    // 5. info's view of the header.
    let info = ImageInfo::from_header(path, &header, metadata());
    assert_eq!(info.virtual_size, header.virtual_size());
    assert_eq!(info.format, header.format().name());
    assert_eq!(info.backing_filename.as_deref(), header.backing_name());
    assert_eq!(
        info.backing_filename_format.as_deref(),
        header.backing_format()
    );
    Corpus::Keep
});
