#![no_main]
//! libFuzzer wrapper of [`vmsnap_fuzz::targets::checkpoint`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsnap_fuzz::targets::checkpoint::run(data));
