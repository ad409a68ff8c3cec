#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| nanodetd::fuzzing::h264_stream(data));
