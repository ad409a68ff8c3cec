#![no_main]

//! Every target in one binary, picked by NANODETD_FUZZ_TARGET: one binary
//! to carry to a many-core machine instead of seven.

use std::sync::OnceLock;

use nanodetd::fuzzing::{TARGETS, Target};

fn target() -> Target {
    static CHOSEN: OnceLock<Target> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let name = std::env::var("NANODETD_FUZZ_TARGET").unwrap_or_default();
        TARGETS
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| *t)
            .unwrap_or_else(|| panic!("NANODETD_FUZZ_TARGET={name:?} names no target"))
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| target()(data));
