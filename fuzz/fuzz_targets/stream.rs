#![no_main]
//! libFuzzer wrapper of [`vmsnap_fuzz::targets::stream`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsnap_fuzz::targets::stream::run(data));
