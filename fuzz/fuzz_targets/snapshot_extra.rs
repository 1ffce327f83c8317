#![no_main]
//! libFuzzer wrapper of [`vmsnap_fuzz::targets::snapshot_extra`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsnap_fuzz::targets::snapshot_extra::run(data));
