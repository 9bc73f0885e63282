#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| qmh_fuzz::run("mapped_ram", data));
