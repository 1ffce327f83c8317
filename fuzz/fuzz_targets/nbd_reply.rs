#![no_main]
//! libFuzzer wrapper of [`vmsnap_fuzz::targets::nbd_reply`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsnap_fuzz::targets::nbd_reply::run(data));
