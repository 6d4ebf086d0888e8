#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| tokenwarden_fuzz::connector_definition(data));
