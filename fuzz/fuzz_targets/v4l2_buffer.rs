#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nanodetd::fuzzing::v4l2_buffer(data));
