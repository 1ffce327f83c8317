//! Benchmark cases: inspect (see main.rs). Not written yet.

use crate::harness::Harness;

/// Runs the inspect cases.
pub fn run(h: &mut Harness) {
    h.info("not measured yet");
}
