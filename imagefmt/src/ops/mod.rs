//! Whole-image operations, each a function over a chain and its extents, streaming in bounded
//! memory: `info` (header facts, the backing chain), `map` (extents as qemu-img prints them),
//! `compare`, `convert` (a reader pipeline), `commit`, `rebase`.
//!
//! ```text
//! chain::open_chain_with ─► Box<dyn GuestRead> (layers nested: top ─► below ─► …)
//!        │
//!        ├─ chain::extents / block_status ─► map, compare, convert's planner, rebase
//!        └─ chain::read_extent ─► data at its host offset (pread / copy_file_range)
//! ```

pub mod commit;
pub mod compare;
pub mod convert;
pub mod info;
pub mod map;
pub mod rebase;
