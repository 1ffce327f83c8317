//! The fuzz targets, one module each, each with `pub fn run(data: &[u8])`.
//!
//! Shared by the libFuzzer wrappers (`fuzz/fuzz_targets/`) and by the main crate's
//! `tests/fuzz_corpus.rs`, which replays `fuzz/corpus/` and `testdata/fuzz/` through them.
//! They use only `vmsnap`'s public API, `std`, and `serde_json` (to read back the replies
//! `qmp` checks).
//!
//! Parsers of untrusted bytes that are not here: the monitor's command line as a whole, whose
//! dispatch needs a running VM (its argument parsers are in [`monitor_args`]), and QMP
//! commands past their envelope and argument accessors (the same reason; [`qmp`] stops where a
//! command would touch the VM). NBD replies are in [`nbd_reply`] through vmsnap's wire layer
//! over an in-memory stream; `tests/nbd_bad_server.rs` still plays a hostile server over a
//! socket.

pub mod checkpoint;
pub mod monitor_args;
pub mod nbd_reply;
pub mod nbd_uri;
pub mod qcow2_read;
pub mod qcow2_write;
pub mod qmp;
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
    ("checkpoint", checkpoint::run),
    ("qmp", qmp::run),
    ("nbd_reply", nbd_reply::run),
];
