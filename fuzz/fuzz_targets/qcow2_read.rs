#![no_main]
//! libFuzzer wrapper of [`vmsnap_fuzz::targets::qcow2_read`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsnap_fuzz::targets::qcow2_read::run(data));
