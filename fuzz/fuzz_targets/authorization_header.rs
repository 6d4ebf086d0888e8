#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokenwarden_fuzz::authorization_header(data));
