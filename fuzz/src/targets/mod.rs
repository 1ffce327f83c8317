//! The fuzz targets, one module each, each with `pub fn run(data: &[u8])`.
//!
//! Shared by the libFuzzer wrappers (`fuzz/fuzz_targets/`) and by the main crate's
//! `tests/fuzz_corpus.rs`, which replays `fuzz/corpus/` and `testdata/fuzz/` through them.
//! They use only `vmsnap`'s public API and `std`.
//!
//! Parsers of untrusted bytes that are not here yet: checkpoint files and QMP input (being
//! built in parallel; their targets go here as `checkpoint.rs` and `qmp.rs`), NBD replies
//! (parsed by the `nbd` crate behind a socket; `tests/nbd_bad_server.rs` plays a hostile
//! server instead), and the monitor's command line, whose dispatch needs a running VM (its
//! argument parsers are in [`monitor_args`]).

pub mod monitor_args;
pub mod nbd_uri;
pub mod qcow2_read;
pub mod qcow2_write;
pub mod snapshot_extra;
pub mod stream;
pub mod vmdesc;

/// A target's entry point.
pub type Target = fn(&[u8]);

/// Every target by name, for the corpus replay.
pub const ALL: &[(&str, Target)] = &[
    ("qcow2_read", qcow2_read::run),
    ("qcow2_write", qcow2_write::run),
    ("stream", stream::run),
    ("vmdesc", vmdesc::run),
    ("nbd_uri", nbd_uri::run),
    ("monitor_args", monitor_args::run),
    ("snapshot_extra", snapshot_extra::run),
];
