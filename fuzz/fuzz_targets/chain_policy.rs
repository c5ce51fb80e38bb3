//! A two-image chain from fuzz input, on real files, opened and listed under every
//! `BackingPolicy` (no locks: reading only).
//!
//! Input: `[flags][top length, u16 LE][top bytes][base bytes]`. The top goes to
//! `inside/top.qcow2`, the base to `inside/base`; `outside.raw` sits next to `inside/`, with
//! symlinks `inside/link-out` → `../outside.raw` and `inside/link-in` → `base`. If the top is a
//! qcow2 image, `flags` may rewrite its backing name (bits 0-2) and backing format (bits 3-4)
//! with the library's own writer, so the fuzzer reaches every kind of name quickly.
//!
//! Properties checked (beyond "never panics, never allocates without bound"):
//! 1. Reading never writes: every file keeps its bytes.
//! 2. `Confine(inside)`: a chain that lists (`info::backing_chain`) has every image inside
//!    `inside/` once symlinks are resolved, so `outside.raw` is never part of it.
//! 3. Confinement refuses only what leaves the directory: compared with the wider
//!    `Confine(root)` (which holds `outside.raw`; `FollowLocal` would let fuzz input name any
//!    host file), a chain `root` lists that stays inside `inside/` lists the same under
//!    `Confine(inside)`, and whatever `Confine(inside)` lists, `Confine(root)` lists the same.
//! 4. A chain that opens (`chain::open_chain`) under `Confine(inside)` also lists, and opens
//!    under `Confine(root)` with the same size and the same guest bytes at four offsets.
//! 5. Lock-free reading (`force_share`, qemu-img's `-U`) under `Confine(inside)` lists and
//!    opens exactly what the locking reader does, with the same guest bytes.
//! 6. `Deny` opens no backing file: a qcow2 top that names one is refused, one that names none
//!    opens exactly as under `Confine`; `Detach` lists the top alone.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use imagefmt::backing::BackingPolicy;
use imagefmt::chain::{open_chain, open_chain_with, ChainOptions};
use imagefmt::extent::GuestRead;
use imagefmt::offsets::GuestOffset;
use imagefmt::ops::info::{backing_chain, backing_chain_with, ImageInfo};
use imagefmt::qcow2::extensions::Extension;
use imagefmt::qcow2::HeaderCluster;
use libfuzzer_sys::{fuzz_target, Corpus};

/// The directory tree the chain lives in, made once per process under `$TMPDIR`.
struct Tree {
    /// The directory holding `inside/` and `outside.raw` (canonical).
    root: PathBuf,
    /// The confinement directory (canonical).
    inside: PathBuf,
    /// `inside/top.qcow2`.
    top: PathBuf,
    /// `inside/base`.
    base: PathBuf,
    /// `outside.raw`, next to `inside/`.
    outside: PathBuf,
}

const OUTSIDE_BYTES: [u8; 4096] = [0xee; 4096];

fn tree() -> &'static Tree {
    static TREE: OnceLock<Tree> = OnceLock::new();
    TREE.get_or_init(|| {
        let root = std::env::temp_dir().join(format!("cowclone-fuzz-chain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("inside/sub")).unwrap();
        let root = root.canonicalize().unwrap();
        let inside = root.join("inside");
        let outside = root.join("outside.raw");
        std::fs::write(&outside, OUTSIDE_BYTES).unwrap();
        std::os::unix::fs::symlink("../outside.raw", inside.join("link-out")).unwrap();
        std::os::unix::fs::symlink("base", inside.join("link-in")).unwrap();
        Tree {
            top: inside.join("top.qcow2"),
            base: inside.join("base"),
            inside,
            outside,
            root,
        }
    })
}

/// The backing name `flags` bits 0-2 choose (`None`: keep the input's).
fn backing_name(flags: u8, tree: &Tree) -> Option<String> {
    Some(match flags & 7 {
        0 => return None,
        1 => "base".into(),
        2 => "../outside.raw".into(),
        3 => "link-out".into(),
        4 => "link-in".into(),
        5 => tree.base.to_str()?.to_owned(),
        6 => "top.qcow2".into(),
        _ => "sub/../base".into(),
    })
}

/// The top image: the input's bytes, with the backing name and format `flags` ask for.
fn top_image(flags: u8, input: &[u8], tree: &Tree) -> Vec<u8> {
    let mut top = input.to_vec();
    let name = backing_name(flags, tree);
    let format = (flags >> 3) & 3;
    if name.is_none() && format == 0 {
        return top;
    }
    let Ok(mut cluster) = HeaderCluster::parse(input) else {
        return top;
    };
    if name.is_some() {
        cluster.backing_file = name;
    }
    if format != 0 {
        cluster
            .extensions
            .retain(|e| !matches!(e, Extension::BackingFormat(_)));
        match format {
            1 => cluster
                .extensions
                .insert(0, Extension::BackingFormat("raw".into())),
            2 => cluster
                .extensions
                .insert(0, Extension::BackingFormat("qcow2".into())),
            _ => {}
        }
    }
    if let Ok(bytes) = cluster.to_bytes() {
        if top.len() < bytes.len() {
            top.resize(bytes.len(), 0);
        }
        top[..bytes.len()].copy_from_slice(&bytes);
    }
    top
}

/// The chain's files, canonical, top first.
fn files(chain: &[ImageInfo]) -> Vec<PathBuf> {
    chain
        .iter()
        .map(|i| {
            Path::new(&i.filename)
                .canonicalize()
                .expect("a listed image exists")
        })
        .collect()
}

/// Guest bytes at four offsets (4 KiB each, clipped to the disk); `None` where a read fails.
fn sample(image: &dyn GuestRead) -> Vec<Option<Vec<u8>>> {
    let size = image.virtual_size();
    [0, 4096, size / 2, size.saturating_sub(4096)]
        .into_iter()
        .map(|offset| {
            let mut buf = vec![0u8; size.saturating_sub(offset).min(4096) as usize];
            image.read_at(&mut buf, GuestOffset(offset)).ok().map(|()| buf)
        })
        .collect()
}

fuzz_target!(|data: &[u8]| -> Corpus {
    if data.len() < 3 + 72 {
        return Corpus::Reject;
    }
    let flags = data[0];
    let split = usize::from(u16::from_le_bytes([data[1], data[2]])).min(data.len() - 3);
    let (top_input, base_input) = data[3..].split_at(split);
    let tree = tree();
    let top = top_image(flags, top_input, tree);
    std::fs::write(&tree.top, &top).unwrap();
    std::fs::write(&tree.base, base_input).unwrap();

    let confine = BackingPolicy::Confine(tree.inside.clone());
    let wider = BackingPolicy::Confine(tree.root.clone());

    // 2. and 3.: listing.
    let listed = backing_chain(&tree.top, &confine);
    let widely = backing_chain(&tree.top, &wider);
    if let Ok(chain) = &listed {
        let files = files(chain);
        for file in &files {
            assert!(
                file.starts_with(&tree.inside),
                "confined chain left {}: {files:?}",
                tree.inside.display()
            );
        }
        assert!(!files.contains(&tree.outside), "outside.raw in {files:?}");
        match &widely {
            Ok(other) => assert_eq!(chain, other, "the two confinements list differently"),
            Err(e) => panic!("Confine(root) refused what Confine(inside) lists: {e}"),
        }
    }
    if let Ok(chain) = &widely {
        if files(chain).iter().all(|f| f.starts_with(&tree.inside)) {
            if let Err(e) = &listed {
                panic!("Confine refused a chain inside its directory: {e}; {chain:?}");
            }
        }
    }

    // 4.: opening and reading.
    let opened = open_chain(&tree.top, None, &confine);
    if let Ok(image) = &opened {
        assert!(
            listed.is_ok(),
            "opens but does not list: {:?}",
            listed.err()
        );
        let other = open_chain(&tree.top, None, &wider)
            .unwrap_or_else(|e| panic!("opens under Confine(inside), not Confine(root): {e}"));
        assert_eq!(image.virtual_size(), other.virtual_size());
        assert_eq!(
            sample(image.as_ref()),
            sample(other.as_ref()),
            "guest bytes"
        );
    }

    // 5.: lock-free reads (nobody else holds a lock here, so they agree with locked reads).
    let shared = ChainOptions {
        force_share: true,
        ..ChainOptions::new(&confine)
    };
    assert_eq!(
        backing_chain_with(&tree.top, &shared).ok(),
        listed.as_ref().ok().cloned(),
        "force_share lists differently"
    );
    match (open_chain_with(&tree.top, None, &shared), &opened) {
        (Ok(a), Ok(b)) => assert_eq!(sample(a.as_ref()), sample(b.as_ref()), "force_share bytes"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "force_share and locked opens differ: {:?} / {:?}",
            a.err(),
            b.as_ref().err()
        ),
    }

    // 6.: Deny and Detach.
    if let Ok(cluster) = HeaderCluster::parse(&top) {
        let denied = open_chain(&tree.top, None, &BackingPolicy::Deny);
        if cluster.backing_file.is_some() {
            assert!(denied.is_err(), "Deny opened a backing file");
        } else {
            match (&denied, &opened) {
                (Ok(a), Ok(b)) => assert_eq!(sample(a.as_ref()), sample(b.as_ref())),
                (Err(_), Err(_)) => {}
                (a, b) => panic!(
                    "no backing name, yet Deny and Confine differ: {:?} / {:?}",
                    a.as_ref().err(),
                    b.as_ref().err()
                ),
            }
        }
    }
    if let Ok(chain) = backing_chain(&tree.top, &BackingPolicy::Detach) {
        assert_eq!(chain.len(), 1, "Detach listed more than the top");
    }
    if let Ok(image) = open_chain(&tree.top, None, &BackingPolicy::Detach) {
        let _ = sample(image.as_ref());
    }

    // 1.: nothing was written.
    assert_eq!(std::fs::read(&tree.top).unwrap(), top, "top.qcow2 changed");
    assert_eq!(
        std::fs::read(&tree.base).unwrap(),
        base_input,
        "base changed"
    );
    assert_eq!(std::fs::read(&tree.outside).unwrap(), OUTSIDE_BYTES);
    Corpus::Keep
});
