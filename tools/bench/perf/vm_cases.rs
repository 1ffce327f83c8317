//! Benchmark cases: vm (see main.rs). Not written yet.

use crate::harness::Harness;

/// Runs the vm cases.
pub fn run(h: &mut Harness) {
    h.info("not measured yet");
}
