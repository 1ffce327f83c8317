#![no_main]
//! libFuzzer wrapper of [`vmsnap_fuzz::targets::monitor_args`].

libfuzzer_sys::fuzz_target!(|data: &[u8]| vmsnap_fuzz::targets::monitor_args::run(data));
