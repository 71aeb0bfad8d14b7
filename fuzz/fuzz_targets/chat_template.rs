#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| zeroshard_fuzz_targets::chat_template(data));
