//! `stream`: a migration stream (or a snapshot's VM state) as the inspector reads it:
//! `analyze` (with page contents collected on every other input length, as `-m` does), the
//! `--dump state`/`--dump desc` JSON, and the whole-stream model that savevm/loadvm tests and
//! conversions use, encoded back.

use vmsnap::migration::analyze::{analyze, AnalyzeOptions};
use vmsnap::migration::stream::StreamModel;
use vmsnap::migration::vmdesc::to_python_json;

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let opts = AnalyzeOptions {
        memory: data.len() % 2 == 1,
        ..Default::default()
    };
    if let Ok(a) = analyze(data, &opts) {
        let _ = to_python_json(&a.state);
        if let Some(desc) = &a.desc {
            let _ = to_python_json(desc);
        }
        if let Some(e) = &a.error {
            assert!(e.offset <= data.len() as u64, "error past the input: {e}");
        }
    }
    if let Ok(model) = StreamModel::decode(data) {
        // Encoding may refuse (a typed error) what a hostile vmdesc let the decoder accept:
        // testdata/fuzz/stream/decoded-value-does-not-encode, open in formats/fuzzing.md.
        let _ = model.encode(Vec::new());
    }
}
