//! Benchmark cases: migrate (see main.rs). Not written yet.

use crate::harness::Harness;

/// Runs the migrate cases.
pub fn run(h: &mut Harness) {
    h.info("not measured yet");
}
