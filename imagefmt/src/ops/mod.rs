//! Whole-image operations, each a function over a chain and its extents, streaming in bounded
//! memory: `info` (header facts, the backing chain), `map` (extents as qemu-img prints them),
//! `check` (which check, the files around it, repair and recheck), `compare`, `convert` (a
//! reader pipeline; `convert_salvage`: read errors copied as zeros; `convert_bitmaps`: the
//! persistent bitmaps copied too), `commit`, `rebase`, `dd` (a window of an image through convert); and
//! `resize` (a new virtual size; the cluster-level part is `Qcow2Image::resize`); `bitmap`
//! (persistent dirty bitmaps); `snapshot` (internal snapshots of a qcow2 file).
//!
//! ```text
//! chain::open_chain_with ─► Box<dyn GuestRead> (layers nested: top ─► below ─► …)
//!        │
//!        ├─ chain::extents / block_status ─► map, compare, convert's planner, rebase
//!        └─ chain::read_extent ─► data at its host offset (pread / copy_file_range)
//! ```

pub mod bitmap;
pub mod check;
pub mod commit;
pub mod compare;
pub mod convert;
pub mod convert_bitmaps;
pub mod convert_concat;
pub mod convert_into;
pub mod convert_salvage;
pub mod dd;
pub mod info;
pub mod map;
pub mod rebase;
pub mod resize;
pub mod snapshot;

/// Alignment of read buffers: the kernel copies page-cache data into a page-aligned buffer
/// markedly faster than into one at a 16-byte offset (where large heap blocks start).
const PAGE: usize = 4096;

/// Grows `store` to hold a page-aligned window of `len` bytes and returns where that window
/// starts (`store[at..at + len]`).
pub(crate) fn aligned_window(store: &mut Vec<u8>, len: usize) -> usize {
    if store.len() < len + PAGE {
        store.resize(len + PAGE, 0);
    }
    store.as_ptr().align_offset(PAGE).min(PAGE)
}
