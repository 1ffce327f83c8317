#![no_main]
//! libFuzzer wrapper of [`vmsnap_fuzz::targets::nbd_uri`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsnap_fuzz::targets::nbd_uri::run(data));
