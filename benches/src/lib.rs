//! cowclone-benches: the `cowclone bench` harness and the criterion benches' shared home.
//!
//! The harness measures, on the user's own machine and in one run, what the published tables
//! of cloning methods measure elsewhere:
//!
//! ```text
//! clone_methods ─► one base (qcow2, VDI) ─► N rounds × every method, interleaved ─► stats
//! io            ─► reads/writes through imagefmt's chain  ┐
//!                  `qemu-img bench` on the same image      ┴─► stats
//! ops           ─► workload from a real tree ─► convert/compare/commit/map/check/info/measure/
//!                  create/dd/rebase/resize/snapshot/amend/bitmap by the `cowclone` binary and
//!                  by qemu-img, interleaved, judged by qemu-img ─► stats
//! report (human / JSON / CSV)    plot (SVG bar chart via plotters)
//! ```
//!
//! The CLI (`cowclone bench clone|io|ops`) only parses arguments and calls
//! [`clone_methods::run`], [`io::run`] and [`ops::run`]; all measuring lives here so that it can be reused and tested.
#![forbid(unsafe_code)]

pub mod clone_methods;
pub mod data;
pub mod error;
pub mod extents;
pub mod fs_facts;
pub mod io;
pub mod ops;
pub mod plot;
pub mod report;
pub mod stats;
pub mod tools;

pub use error::{BenchError, Result};
