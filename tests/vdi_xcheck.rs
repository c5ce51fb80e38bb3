//! The VDI engine cross-checked by independent readers.
//!
//! Base images (dynamic and fixed) are checked by qemu in both directions: qemu reads what we
//! write (`qemu-img check`, `info`, `convert`, `compare`) and we read what `qemu-io` writes.
//! qemu refuses every differencing VDI, so chains of differencing images are checked with the
//! independent Python reader `dissect.hypervisor` (PyPI), installed with pip if missing. Parent
//! finding (same directory, explicit list, mismatches, loops) and a qcow2 overlay on a VDI base
//! read by qemu complete the file.
//!
//! A missing `qemu-img` fails naming the Debian package `qemu-utils`; a `dissect.hypervisor`
//! that cannot be installed fails naming the PyPI package. Nothing skips.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::OnceLock;

use imagefmt::backing::BackingPolicy;
use imagefmt::chain::{self, ChainOptions};
use imagefmt::extent::GuestRead;
use imagefmt::new_file::NewFileMode;
use imagefmt::offsets::GuestOffset;
use imagefmt::vdi::{
    self, BlockEntry, Explicit, ImageType, ParentResolver, SameDirectory, VdiError, VdiHeader,
    VdiImage,
};
use imagefmt::{Error, Qcow2Builder};

use crate::util::{self, command_line, qemu_img, qemu_img_ok, Args};

const MIB: u64 = 1 << 20;

// ---------------------------------------------------------------------------------------------
// Helpers (self-contained: this file runs its own tools).

/// A failed command described for a message: the command line, then what it printed.
fn explain(program: &str, args: &Args, output: &Output) -> String {
    format!(
        "{} → {}",
        command_line(program, args),
        util::describe(output)
    )
}

/// `qemu-io -f vdi -c CMD ... FILE`; qemu-io reports some failures on stdout with status 0.
fn qemu_io_ok(file: &Path, commands: &[&str]) {
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"-f", &"vdi"];
    for c in commands {
        args.push(&"-c");
        args.push(c);
    }
    args.push(&file);
    util::qemu_io_ok(&args);
}

/// Asserts `qemu-img check -f vdi` finds nothing wrong.
fn assert_qemu_check_clean(path: &Path) {
    let output = qemu_img(&[&"check", &"-f", &"vdi", &path]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success() && stdout.contains("No errors were found"),
        "{}",
        explain("qemu-img", &[&"check", &"-f", &"vdi", &path], &output)
    );
}

/// The guest content as qemu reads it (`qemu-img convert -O raw`).
fn qemu_raw(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("qemu-view.raw");
    qemu_img_ok(&[&"convert", &"-f", &"vdi", &"-O", &"raw", &path, &out]);
    let bytes = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    bytes
}

/// `qemu-img compare` of a VDI image with a raw file holding `model`: identical or fail.
fn assert_qemu_compare_identical(path: &Path, model: &[u8], dir: &Path) {
    let raw = dir.join("model.raw");
    std::fs::write(&raw, model).unwrap();
    let args: [&dyn AsRef<OsStr>; 7] = [&"compare", &"-f", &"vdi", &"-F", &"raw", &path, &raw];
    let output = qemu_img(&args);
    assert!(
        output.status.success(),
        "{}",
        explain("qemu-img", &args, &output)
    );
    std::fs::remove_file(&raw).unwrap();
}

/// Opens `path` for reading through the chain walker, its parents proposed by `parents` and
/// followed wherever they are.
fn open_vdi(
    path: &Path,
    parents: &dyn ParentResolver,
) -> imagefmt::Result<VdiImage<std::fs::File>> {
    let follow = BackingPolicy::FollowLocal;
    chain::open_vdi(path, &ChainOptions::new(&follow).with_vdi_parents(parents))
}

/// [`open_vdi`] for reading and writing.
fn open_vdi_rw(
    path: &Path,
    parents: &dyn ParentResolver,
) -> imagefmt::Result<VdiImage<std::fs::File>> {
    let follow = BackingPolicy::FollowLocal;
    chain::open_vdi_rw(
        path,
        &ChainOptions::new(&follow).with_vdi_parents(parents),
        false,
    )
}

/// The guest content as our reader sees it (parents found in the same directory).
fn our_raw(path: &Path) -> Vec<u8> {
    let image = open_vdi(path, &SameDirectory).unwrap();
    read_all(&image)
}

fn read_all(image: &dyn GuestRead) -> Vec<u8> {
    let mut buf = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut buf, GuestOffset(0)).unwrap();
    buf
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| ((i / 7) as u8).wrapping_mul(13).wrapping_add(seed) | 0x80)
        .collect()
}

/// Writes with our writer and records the write in `model`.
fn write(path: &Path, model: &mut [u8], offset: u64, len: usize, seed: u8) {
    let mut image = open_vdi_rw(path, &SameDirectory).unwrap();
    let data = pattern(len, seed);
    image.write_at(&data, offset).unwrap();
    image.flush().unwrap();
    model[offset as usize..offset as usize + len].copy_from_slice(&data);
}

fn write_zeroes(path: &Path, model: &mut [u8], offset: u64, len: u64) {
    let mut image = open_vdi_rw(path, &SameDirectory).unwrap();
    image.write_zeroes(offset, len).unwrap();
    model[offset as usize..(offset + len) as usize].fill(0);
}

fn header_of(path: &Path) -> VdiHeader {
    let bytes = std::fs::read(path).unwrap();
    VdiHeader::parse(&bytes[..0x200]).unwrap()
}

fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length differs");
    if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!(
            "{what}: first difference at byte {at} (block {}): got {:#04x}, want {:#04x}",
            at as u64 / MIB,
            got[at],
            want[at]
        );
    }
}

/// Overwrites a UUID field of a VDI file in place with `bytes` as stored on disk (hand-editing
/// for hostile cases).
fn put_uuid(path: &Path, offset: u64, bytes: [u8; 16]) {
    use std::os::unix::fs::FileExt;
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&bytes, offset).unwrap();
}

/// Offset of the linkage UUID in a VDI header.
const LINKAGE_OFFSET: u64 = 0x1A8;

const NEW: NewFileMode = NewFileMode {
    overwrite: false,
    durable: false,
};

// ---------------------------------------------------------------------------------------------
// dissect.hypervisor: the independent VDI reader.

/// PyPI package of the independent reader.
const DISSECT: &str = "dissect.hypervisor";

/// Dumps the guest content of a chain (paths base first) with dissect.hypervisor, one 1 MiB
/// block per read (its reader mishandles reads spanning blocks), and prints the top image's
/// UUIDs (raw on-disk bytes, hex), type and size.
const DISSECT_DUMP: &str = r#"
import sys
from dissect.hypervisor.disk.vdi import VDI
out, paths = sys.argv[1], sys.argv[2:]
files, stream, vdi = [], None, None
for p in paths:
    f = open(p, "rb")
    files.append(f)
    vdi = VDI(f, parent=stream)
    stream = vdi.open()
h = vdi.header
print(bytes(h.uuidCreate).hex(), bytes(h.uuidModify).hex(), bytes(h.uuidLinkage).hex(),
      bytes(h.uuidParentModify).hex(), int(h.u32Type), vdi.size)
size, bs = vdi.size, vdi.block_size
with open(out, "wb") as o:
    off = 0
    while off < size:
        n = min(bs, size - off)
        stream.seek(off)
        data = stream.read(n)
        if len(data) != n:
            raise SystemExit(f"short read at {off}: {len(data)} of {n}")
        o.write(data)
        off += n
"#;

fn python(args: &[&dyn AsRef<OsStr>]) -> Output {
    util::run(
        "python3",
        &format!("python3 (needed for the PyPI package {DISSECT})"),
        None,
        args,
    )
}

/// Makes sure dissect.hypervisor is importable, installing it with pip once if needed.
fn ensure_dissect() {
    static READY: OnceLock<()> = OnceLock::new();
    READY.get_or_init(|| {
        let import: [&dyn AsRef<OsStr>; 2] = [&"-c", &"import dissect.hypervisor.disk.vdi"];
        if python(&import).status.success() {
            return;
        }
        let install: [&dyn AsRef<OsStr>; 5] = [&"-m", &"pip", &"install", &"--quiet", &DISSECT];
        let output = python(&install);
        let again = python(&import);
        assert!(
            again.status.success(),
            "the independent VDI reader, PyPI package `{DISSECT}`, is not installed and \
             `python3 -m pip install {DISSECT}` did not make it importable:\n{}\n{}",
            explain("python3", &install, &output),
            explain("python3", &import, &again)
        );
    });
}

/// What dissect.hypervisor reports about the top of a chain (UUIDs as the bytes on disk).
pub(crate) struct DissectView {
    pub content: Vec<u8>,
    pub uuid_create: [u8; 16],
    pub uuid_modify: [u8; 16],
    pub uuid_linkage: [u8; 16],
    pub uuid_parent_modify: [u8; 16],
    pub image_type: u32,
    pub size: u64,
}

pub(crate) fn dissect_read(chain_base_first: &[&Path], dir: &Path) -> DissectView {
    ensure_dissect();
    let out = dir.join("dissect-view.raw");
    let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"-c", &DISSECT_DUMP, &out];
    for p in chain_base_first {
        args.push(p);
    }
    let output = python(&args);
    assert!(
        output.status.success(),
        "{}",
        explain("python3", &args, &output)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let fields: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(fields.len(), 6, "dissect printed {stdout}");
    let uuid = |hex: &str| -> [u8; 16] {
        let bytes: Vec<u8> = (0..16)
            .map(|i| u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap())
            .collect();
        bytes.try_into().unwrap()
    };
    let content = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    DissectView {
        content,
        uuid_create: uuid(fields[0]),
        uuid_modify: uuid(fields[1]),
        uuid_linkage: uuid(fields[2]),
        uuid_parent_modify: uuid(fields[3]),
        image_type: fields[4].parse().unwrap(),
        size: fields[5].parse().unwrap(),
    }
}

// ---------------------------------------------------------------------------------------------
// (a) Base images against qemu, both directions.

/// Our writes, then qemu's, then ours again on one base image; every view must be the model.
fn round_trip_base(path: &Path, dir: &Path, size: u64) {
    let info = qemu_img_ok(&[&"info", &"--output=json", &path]);
    assert!(info.contains("\"format\": \"vdi\""), "{info}");
    assert!(
        info.contains(&format!("\"virtual-size\": {size},")),
        "{info}"
    );
    assert_qemu_check_clean(path);

    let mut model = vec![0u8; size as usize];
    write(path, &mut model, MIB + 4096, 4096, 1);
    write(path, &mut model, 0, 512, 2);
    write(path, &mut model, 3 * MIB - 700, 1400, 3); // straddles blocks 2 and 3
    write(path, &mut model, 4 * MIB, (2 * MIB + 512) as usize, 4); // whole block and beyond
    write(path, &mut model, size - 512, 512, 5); // the last sector
    write(path, &mut model, MIB + 100, 50, 6); // into an allocated block
    write_zeroes(path, &mut model, 4 * MIB + 10, 100); // partial zeros over data
    assert_qemu_check_clean(path);
    assert_same("qemu reading our writes", &qemu_raw(path, dir), &model);
    assert_qemu_compare_identical(path, &model, dir);

    // qemu writes; we read.
    qemu_io_ok(
        path,
        &[
            "write -P 0xab 2M 4k",       // a FREE block
            "write -P 0xcd 1020k 8k",    // straddling blocks 0 and 1
            "write -P 0xef 4194304 512", // into our block
            "write -z 5242880 1048576",  // zeros over our data
        ],
    );
    model[2 * MIB as usize..(2 * MIB + 4096) as usize].fill(0xab);
    model[(1020 << 10) as usize..(1028 << 10) as usize].fill(0xcd);
    model[4 * MIB as usize..(4 * MIB + 512) as usize].fill(0xef);
    model[5 * MIB as usize..6 * MIB as usize].fill(0);
    assert_same("we reading qemu's writes", &our_raw(path), &model);

    // Ours again on top of qemu's, including freeing whole blocks.
    write(path, &mut model, 2 * MIB + 2048, 4096, 7);
    write_zeroes(path, &mut model, 4 * MIB, 2 * MIB);
    {
        let mut image = open_vdi_rw(path, &SameDirectory).unwrap();
        image.discard(0, MIB).unwrap();
        if image.header().image_type != ImageType::Fixed {
            model[..MIB as usize].fill(0);
        }
    }
    assert_qemu_check_clean(path);
    assert_same("qemu after all writes", &qemu_raw(path, dir), &model);
    assert_same("we after all writes", &our_raw(path), &model);
    let view = dissect_read(&[path], dir);
    assert_eq!(view.size, size);
    assert_same("dissect.hypervisor reading the base", &view.content, &model);
}

#[test]
fn dynamic_base_round_trips_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dyn.vdi");
    let size = 7 * MIB + 64 * 1024; // a partial last block
    let header = vdi::create_dynamic(&path, size, NEW).unwrap();
    assert_eq!(header.image_type, ImageType::Normal);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        u64::from(header.offset_data)
    );
    round_trip_base(&path, dir.path(), size);
    // Freed blocks were given back: the file holds exactly the allocated blocks.
    let h = header_of(&path);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), h.allocated_end());
    assert!(h.blocks_allocated < h.blocks_in_image);
}

#[test]
fn fixed_base_round_trips_with_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("fixed.vdi");
    let size = 8 * MIB;
    let header = vdi::create_fixed(&path, size, NEW).unwrap();
    assert_eq!(header.image_type, ImageType::Fixed);
    let len = std::fs::metadata(&path).unwrap().len();
    assert_eq!(len, u64::from(header.offset_data) + 8 * MIB);
    round_trip_base(&path, dir.path(), size);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), len);
    let h = header_of(&path);
    assert_eq!(h.blocks_allocated, 8);
}

#[test]
fn qemu_created_images_are_read_and_written_natively() {
    let dir = tempfile::tempdir().unwrap();
    for (name, opts) in [("q.vdi", None), ("qs.vdi", Some("static=on"))] {
        let path = dir.path().join(name);
        let mut args: Vec<&dyn AsRef<OsStr>> = vec![&"create", &"-q", &"-f", &"vdi"];
        if let Some(o) = &opts {
            args.push(&"-o");
            args.push(o);
        }
        args.push(&path);
        args.push(&"6M");
        qemu_img_ok(&args);
        qemu_io_ok(
            &path,
            &["write -P 0x11 1M 64k", "write -P 0x22 3145216 1024"],
        );
        let mut model = vec![0u8; 6 * MIB as usize];
        model[MIB as usize..(MIB + 65536) as usize].fill(0x11);
        model[3145216..3146240].fill(0x22);
        assert_same(name, &our_raw(&path), &model);
        write(&path, &mut model, 5 * MIB - 10, 20, 8);
        write(&path, &mut model, MIB + 60000, 10000, 9);
        write_zeroes(&path, &mut model, 3 * MIB, MIB);
        assert_qemu_check_clean(&path);
        assert_qemu_compare_identical(&path, &model, dir.path());
        let view = dissect_read(&[&path], dir.path());
        assert_same("dissect.hypervisor on a qemu image", &view.content, &model);
    }
}

// ---------------------------------------------------------------------------------------------
// (b) Differencing chains against dissect.hypervisor.

#[test]
fn differencing_chains_match_dissect() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vdi");
    let diff1 = dir.path().join("diff1.vdi");
    let diff2 = dir.path().join("diff2.vdi");
    let size = 6 * MIB + MIB / 2;

    let base_header = vdi::create_dynamic(&base, size, NEW).unwrap();
    let mut base_model = vec![0u8; size as usize];
    write(&base, &mut base_model, 0, 3 * MIB as usize, 1);
    write(&base, &mut base_model, 5 * MIB, MIB as usize, 2);
    let base_header_now = header_of(&base);
    assert_eq!(base_header_now.uuid_create, base_header.uuid_create);

    let d1 = vdi::create_differencing(&base, &diff1, NEW).unwrap();
    assert_eq!(d1.image_type, ImageType::Diff);
    assert_eq!(d1.uuid_linkage, base_header_now.uuid_create);
    assert_eq!(d1.uuid_parent_modify, base_header_now.uuid_modify);
    assert_eq!(d1.disk_size, size);
    let mut model1 = base_model.clone();
    write(&diff1, &mut model1, MIB - 1000, 2000, 3); // straddles blocks 0 and 1, CoW both
    write(&diff1, &mut model1, 3 * MIB + 512, 512, 4); // FREE in the base too
    write(&diff1, &mut model1, 5 * MIB, MIB as usize, 5); // whole block over base data
    write_zeroes(&diff1, &mut model1, 2 * MIB, MIB); // whole-block zeros hide the parent
    write_zeroes(&diff1, &mut model1, 100, 300); // partial zeros in an allocated block
    write(&diff1, &mut model1, size - 4096, 4096, 6); // the partial last block

    let d2 = vdi::create_differencing(&diff1, &diff2, NEW).unwrap();
    assert_eq!(d2.uuid_linkage, d1.uuid_create);
    let mut model2 = model1.clone();
    write(&diff2, &mut model2, 2 * MIB + 4096, 4096, 7); // into a ZERO block of diff1
    write(&diff2, &mut model2, 4 * MIB - 300, 600, 8); // straddling
    write_zeroes(&diff2, &mut model2, 1, 2 * MIB); // partial, whole, partial
    write(&diff2, &mut model2, 0, 1, 9);
    {
        let mut image = open_vdi_rw(&diff2, &SameDirectory).unwrap();
        image.discard(5 * MIB, MIB).unwrap();
        model2[5 * MIB as usize..6 * MIB as usize].fill(0);
        // diff2 holds its own blocks, the rest falls through.
        assert_eq!(image.block_map().get(6), Some(BlockEntry::Free));
        assert_eq!(image.block_map().get(1), Some(BlockEntry::Zero));
    }

    for (what, chain, model) in [
        ("base", vec![base.as_path()], &base_model),
        ("diff1", vec![base.as_path(), diff1.as_path()], &model1),
        (
            "diff2",
            vec![base.as_path(), diff1.as_path(), diff2.as_path()],
            &model2,
        ),
    ] {
        let top = *chain.last().unwrap();
        assert_same(&format!("our reader, {what}"), &our_raw(top), model);
        let view = dissect_read(&chain, dir.path());
        let ours = header_of(top);
        assert_eq!(view.size, size, "{what}");
        assert_eq!(view.uuid_create, ours.uuid_create.to_bytes_le(), "{what}");
        assert_eq!(view.uuid_modify, ours.uuid_modify.to_bytes_le(), "{what}");
        assert_eq!(view.uuid_linkage, ours.uuid_linkage.to_bytes_le(), "{what}");
        assert_eq!(
            view.uuid_parent_modify,
            ours.uuid_parent_modify.to_bytes_le(),
            "{what}"
        );
        assert_eq!(
            view.image_type,
            if what == "base" { 1 } else { 4 },
            "{what}"
        );
        assert_same(
            &format!("dissect.hypervisor reading {what}"),
            &view.content,
            model,
        );
    }
    // dissect sees the linkage we wrote: each diff links to its parent's creation UUID.
    let link = dissect_read(&[&base, &diff1], dir.path()).uuid_linkage;
    assert_eq!(link, header_of(&base).uuid_create.to_bytes_le());
    // Our opener found and verified both links. Each parent was last written before its child
    // was made, so both still carry the modification UUID their child recorded.
    let image = open_vdi(&diff2, &SameDirectory).unwrap();
    let links = image.parent_links();
    assert_eq!(links.len(), 2);
    assert_eq!(links[0].parent, diff1);
    assert_eq!(links[1].parent, base);
    assert!(links.iter().all(|l| l.modification_matches()));
}

// ---------------------------------------------------------------------------------------------
// (c) Finding parents.

/// A base with data and a diff on it in `dir`; returns (base, diff, model of the diff).
fn base_and_diff(dir: &Path, base_name: &str, diff_name: &str) -> (PathBuf, PathBuf, Vec<u8>) {
    let base = dir.join(base_name);
    let diff = dir.join(diff_name);
    vdi::create_dynamic(&base, 4 * MIB, NEW).unwrap();
    let mut model = vec![0u8; 4 * MIB as usize];
    write(&base, &mut model, MIB, 8192, 0x30);
    vdi::create_differencing(&base, &diff, NEW).unwrap();
    write(&diff, &mut model, MIB + 4096, 100, 0x31);
    (base, diff, model)
}

#[test]
fn same_directory_finds_the_parent_among_several() {
    let dir = tempfile::tempdir().unwrap();
    for other in ["a-other.vdi", "z-other.vdi"] {
        vdi::create_dynamic(&dir.path().join(other), 4 * MIB, NEW).unwrap();
    }
    // Files named .vdi that are not VDI images, and a directory, are skipped.
    std::fs::write(dir.path().join("junk.vdi"), b"not an image").unwrap();
    std::fs::create_dir(dir.path().join("sub.vdi")).unwrap();
    Qcow2Builder::new(dir.path().join("q.vdi"))
        .size(4 * MIB)
        .create()
        .unwrap();
    let (base, diff, model) = base_and_diff(dir.path(), "m-base.vdi", "diff.vdi");
    let image = open_vdi(&diff, &SameDirectory).unwrap();
    assert_eq!(image.parent_links().len(), 1);
    assert_eq!(image.parent_links()[0].parent, base);
    assert_same("chain found by UUID", &read_all(&image), &model);

    // On a file already open: under a policy that follows nothing, refused.
    let file = std::fs::File::open(&diff).unwrap();
    let deny = BackingPolicy::Deny;
    let options = ChainOptions::new(&deny).with_vdi_parents(&SameDirectory);
    let e = chain::vdi_from_file(file, header_of(&diff), &diff, &options)
        .err()
        .unwrap();
    assert!(e.to_string().contains("not followed"), "{e}");

    // A copy of the parent (same UUID under another name) is ambiguous, not guessed.
    std::fs::copy(&base, dir.path().join("copy-of-base.vdi")).unwrap();
    let e = open_vdi(&diff, &SameDirectory).unwrap_err();
    assert!(
        matches!(e, Error::Vdi(VdiError::AmbiguousParent { .. })),
        "{e}"
    );
    // Naming it explicitly resolves that.
    let image = open_vdi(&diff, &Explicit(vec![base.clone()])).unwrap();
    assert_same("explicit parent", &read_all(&image), &model);
}

#[test]
fn explicit_parents_are_verified_by_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let (base, diff, model) = base_and_diff(dir.path(), "base.vdi", "diff.vdi");
    let stranger = dir.path().join("stranger.vdi");
    let s = vdi::create_dynamic(&stranger, 4 * MIB, NEW).unwrap();
    let linkage = header_of(&diff).uuid_linkage;
    let e = open_vdi(&diff, &Explicit(vec![stranger.clone()])).unwrap_err();
    match &e {
        Error::Vdi(VdiError::ParentMismatch {
            expected,
            found,
            parent,
        }) => {
            assert_eq!(*expected, linkage);
            assert_eq!(*found, s.uuid_create);
            assert_eq!(parent, &stranger);
        }
        other => panic!("expected a parent mismatch, got {other}"),
    }
    let message = e.to_string();
    assert!(message.contains(&linkage.to_string()), "{message}");
    assert!(message.contains(&s.uuid_create.to_string()), "{message}");
    assert!(message.contains("stranger.vdi"), "{message}");

    // Nearest first: diff2's parent, then diff's parent.
    let diff2 = dir.path().join("diff2.vdi");
    vdi::create_differencing(&diff, &diff2, NEW).unwrap();
    let image = open_vdi(&diff2, &Explicit(vec![diff.clone(), base.clone()])).unwrap();
    assert_same("explicit two-level chain", &read_all(&image), &model);
    // In the wrong order, refused.
    let e = open_vdi(&diff2, &Explicit(vec![base.clone(), diff.clone()])).unwrap_err();
    assert!(
        matches!(e, Error::Vdi(VdiError::ParentMismatch { .. })),
        "{e}"
    );
    // Too short a list: the grandparent is not found.
    let e = open_vdi(&diff2, &Explicit(vec![diff.clone()])).unwrap_err();
    assert!(
        matches!(e, Error::Vdi(VdiError::ParentNotFound { .. })),
        "{e}"
    );
}

#[test]
fn a_diff_without_its_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, diff, _) = base_and_diff(dir.path(), "base.vdi", "diff.vdi");
    let alone = tempfile::tempdir().unwrap();
    let moved = alone.path().join("diff.vdi");
    std::fs::copy(&diff, &moved).unwrap();
    let linkage = header_of(&moved).uuid_linkage;
    let e = open_vdi(&moved, &SameDirectory).unwrap_err();
    match &e {
        Error::Vdi(VdiError::ParentNotFound { linkage: l, .. }) => assert_eq!(*l, linkage),
        other => panic!("expected parent not found, got {other}"),
    }
    assert!(e.to_string().contains(&linkage.to_string()), "{e}");
    assert!(open_vdi_rw(&moved, &SameDirectory).is_err());

    // A type-4 image with a null linkage: a differencing image at the bottom of a chain.
    put_uuid(&moved, LINKAGE_OFFSET, [0; 16]);
    let e = open_vdi(&moved, &SameDirectory).unwrap_err();
    assert!(
        matches!(e, Error::Vdi(VdiError::DiffWithoutParent { .. })),
        "{e}"
    );
}

#[test]
fn parent_loops_are_refused_not_followed() {
    let dir = tempfile::tempdir().unwrap();
    let (base, diff, _) = base_and_diff(dir.path(), "base.vdi", "diff.vdi");
    // The diff links to itself.
    let own = header_of(&diff).uuid_create;
    put_uuid(&diff, LINKAGE_OFFSET, own.to_bytes_le());
    let e = open_vdi(&diff, &SameDirectory).unwrap_err();
    assert!(e.to_string().contains("loops"), "{e}");
    // Two images linking to each other: base (made a diff by hand) → diff → base.
    put_uuid(
        &diff,
        LINKAGE_OFFSET,
        header_of(&base).uuid_create.to_bytes_le(),
    );
    put_uuid(&base, LINKAGE_OFFSET, own.to_bytes_le());
    let e = open_vdi(&diff, &SameDirectory).unwrap_err();
    assert!(e.to_string().contains("loops"), "{e}");
    assert!(open_vdi_rw(&base, &SameDirectory).is_err());
}

#[test]
fn a_modified_parent_is_reported_not_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, diff, mut model) = base_and_diff(dir.path(), "base.vdi", "diff.vdi");
    let image = open_vdi(&diff, &SameDirectory).unwrap();
    assert!(image.parent_links()[0].modification_matches());
    // Let go of the chain (and its read lock on the base) before writing the base.
    drop(image);
    // Writing the base gives it a new modification UUID (as VirtualBox does).
    write(&base, &mut model, 3 * MIB, 10, 0x40);
    let image = open_vdi(&diff, &SameDirectory).unwrap();
    let link = &image.parent_links()[0];
    assert!(!link.modification_matches());
    assert_eq!(link.parent_modify, header_of(&base).uuid_modify);
    assert_same("chain over a modified parent", &read_all(&image), &model);
}

#[test]
fn creating_a_diff_on_a_non_vdi_parent_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let q = dir.path().join("base.qcow2");
    Qcow2Builder::new(&q).size(4 * MIB).create().unwrap();
    let target = dir.path().join("diff.vdi");
    let e = vdi::create_differencing(&q, &target, NEW).unwrap_err();
    assert!(e.to_string().contains("base.qcow2"), "{e}");
    assert!(e.to_string().contains("qcow2"), "{e}");
    assert!(!target.exists());
}

// ---------------------------------------------------------------------------------------------
// (d) The format-neutral chain: a qcow2 overlay on a VDI base, read by qemu.

#[test]
fn qemu_reads_a_qcow2_overlay_over_our_vdi_base() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vdi");
    let ov = dir.path().join("ov.qcow2");
    vdi::create_dynamic(&base, 6 * MIB, NEW).unwrap();
    let mut model = vec![0u8; 6 * MIB as usize];
    write(&base, &mut model, 0, 4096, 0x50);
    let created = Qcow2Builder::new(&ov).backing("base.vdi").create().unwrap();
    assert_eq!(created.virtual_size, 6 * MIB);
    // Written into the base after the overlay was made: the overlay shows it.
    write(&base, &mut model, 2 * MIB - 2048, 4096, 0x51);
    write(&base, &mut model, 5 * MIB, MIB as usize, 0x52);
    let args: [&dyn AsRef<OsStr>; 3] = [&"compare", &ov, &base];
    let output = qemu_img(&args);
    assert!(
        output.status.success() && String::from_utf8_lossy(&output.stdout).contains("identical"),
        "{}",
        explain("qemu-img", &args, &output)
    );
    let info = qemu_img_ok(&[&"info", &"--output=json", &ov]);
    assert!(
        info.contains("\"backing-filename-format\": \"vdi\""),
        "{info}"
    );
    assert_same(
        "qemu reading the overlay",
        &{
            let out = dir.path().join("ov.raw");
            qemu_img_ok(&[&"convert", &"-O", &"raw", &ov, &out]);
            std::fs::read(&out).unwrap()
        },
        &model,
    );
}
