//! make-seeds FIXTURE_DIR OUT_DIR (see `qmh_fuzz::make_seeds`). Built like the targets, as
//! a libFuzzer binary whose init does the work: the instrumented library needs libFuzzer's
//! runtime to link.
#![no_main]
// make_seeds() never returns, so the macro's code after the init is unreachable.
#![allow(unreachable_code)]
libfuzzer_sys::fuzz_target!(init: qmh_fuzz::make_seeds(), |_data: &[u8]| {});
