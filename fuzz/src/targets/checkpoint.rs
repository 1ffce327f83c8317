//! `checkpoint`: a checkpoint file (`vmsnap save`, Xen `xl save` style) as `vmsnap restore`
//! and `vmsnap-inspect vm.ckpt` read it: the header, integrity record and configuration
//! checked on open (`CheckpointInfo::read_from`, the code `Checkpoint::open` runs, here over
//! the bytes in memory), the CRC32 verified, then the stream part analysed as the inspector
//! does. An input whose CRC32 does not match is also resealed with the CRC the error reports
//! (which must then verify) and analysed, so that mutations get past the checksum.

use std::io::Cursor;

use vmsnap::interop::checkpoint::{
    CheckpointError, CheckpointInfo, HEADER_LEN, MAGIC, MAX_CONFIG_LEN, TRAILER_LEN,
};
use vmsnap::migration::analyze::{analyze, AnalyzeOptions};

/// Runs the target on one input.
pub fn run(data: &[u8]) {
    let mut r = Cursor::new(data);
    let info = match CheckpointInfo::read_from(&mut r, "fuzz.ckpt") {
        Ok(info) => info,
        Err(e) => {
            // Typed errors that say what is wrong; a wrong magic only for a wrong magic.
            assert!(!e.to_string().is_empty());
            if let CheckpointError::Magic(_) = e {
                assert!(data.len() < MAGIC.len() || data[..8] != MAGIC);
            }
            return;
        }
    };
    // Accepted: the header describes exactly the input.
    let h = info.header;
    assert!(h.config_len <= MAX_CONFIG_LEN);
    assert_eq!(h.file_len(), data.len() as u64, "{h:?}");
    assert_eq!(info.trailer.covered_len, h.covered_len());
    let start = HEADER_LEN as u64 + u64::from(h.config_len);
    assert_eq!(h.stream_offset(), start);
    assert_eq!(h.covered_len() + TRAILER_LEN as u64, data.len() as u64);
    let mut seen = 0;
    match info.verify(&mut r, "fuzz.ckpt", &mut |n| seen = n) {
        Ok(()) => {
            assert_eq!(seen, h.covered_len());
            inspect(data, start, h.covered_len());
        }
        Err(CheckpointError::Damaged { actual, .. }) => {
            // A fuzzer cannot forge a CRC32: reseal the input with the CRC the error reports,
            // which must then verify, so that what follows the check is fuzzed as well.
            let at = h.covered_len() as usize + 16;
            let mut sealed = data.to_vec();
            sealed[at..at + 4].copy_from_slice(&actual.to_be_bytes());
            let mut r = Cursor::new(&sealed[..]);
            let info = CheckpointInfo::read_from(&mut r, "fuzz.ckpt").expect("resealed reads");
            info.verify(&mut r, "fuzz.ckpt", &mut |_| {})
                .expect("resealed with the reported CRC verifies");
            inspect(&sealed, start, h.covered_len());
        }
        Err(e) => panic!("verifying bytes in memory: {e}"),
    }
}

/// The stream part, analysed as `vmsnap-inspect vm.ckpt` does.
fn inspect(data: &[u8], start: u64, end: u64) {
    let stream = &data[start as usize..end as usize];
    if let Ok(a) = analyze(stream, &AnalyzeOptions::default()) {
        if let Some(e) = &a.error {
            assert!(
                e.offset <= stream.len() as u64,
                "error past the stream: {e}"
            );
        }
    }
}
