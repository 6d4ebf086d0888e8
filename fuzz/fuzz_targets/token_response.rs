#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokenwarden_fuzz::token_response(data));
