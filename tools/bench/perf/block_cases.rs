//! Benchmark cases: block (see main.rs). Not written yet.

use crate::harness::Harness;

/// Runs the block cases.
pub fn run(h: &mut Harness) {
    h.info("not measured yet");
}
