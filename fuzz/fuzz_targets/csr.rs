#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| meshid::fuzzing::csr(data));
