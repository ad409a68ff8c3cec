#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nanodetd::fuzzing::video_file(data));
