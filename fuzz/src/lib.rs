//! Fuzz targets of vmsnap: one function per target, `fn run(data: &[u8])`, that feeds
//! arbitrary bytes to the library's parsers of untrusted input and asserts what must hold.
//!
//! The functions live in [`targets`], a directory the main crate's `tests/fuzz_corpus.rs`
//! includes as well, so that `cargo test` replays the corpus and every regression input in
//! `testdata/fuzz/` through the same code without building this crate or libFuzzer.
//! `fuzz_targets/*.rs` wrap them for libFuzzer; see README.md for the engine choice.

#[path = "targets/mod.rs"]
pub mod targets;
