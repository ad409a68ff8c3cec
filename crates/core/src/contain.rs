//! Panics in third-party decoders, contained to the input that caused them.
//!
//! The image decoders the daemon uses are fuzzed upstream and still panic
//! on some hostile inputs: our own `uvc_mjpeg` fuzz target found an
//! `unwrap()` on `None` in zune-jpeg 0.5.15's AVX2 IDCT, and its tracker
//! lists more of the kind. A corrupt MJPEG frame from a flaky USB link, or
//! a broken photo in a replay folder, is an everyday input, and a panic
//! there must cost that frame, not the daemon.
//!
//! So the binary is built with `panic = "unwind"`, and [`install_hook`]
//! makes every panic outside [`contain`] abort exactly as `panic = "abort"`
//! did: a bug in our own code still stops the daemon, and systemd restarts
//! it, rather than leaving a task silently dead. Only a panic inside
//! [`contain`] unwinds, back to its caller, as an error. The decoders run
//! on inputs they own and keep no global state, so nothing they leave
//! half-done outlives the unwind.

use std::cell::{Cell, RefCell};
use std::panic::{AssertUnwindSafe, PanicHookInfo};

#[cfg(panic = "abort")]
compile_error!(
    "nanodetd needs panic = \"unwind\": src/contain.rs turns decoder panics into errors, and its hook aborts on every other panic"
);

thread_local! {
    /// How many [`contain`] calls this thread is inside.
    static DEPTH: Cell<u32> = const { Cell::new(0) };
    /// What the last contained panic said, for its caller's error.
    static LAST: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A panic that [`contain`] caught.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("panicked: {what}")]
pub struct ContainedPanic {
    /// The panic's message and where it was raised.
    pub what: String,
}

/// Runs `f`; a panic inside it becomes a [`ContainedPanic`]. For calls into
/// third-party code on outside input only: our own code's invariants are
/// not meant to survive a panic.
pub fn contain<T>(f: impl FnOnce() -> T) -> Result<T, ContainedPanic> {
    DEPTH.set(DEPTH.get() + 1);
    let result = std::panic::catch_unwind(AssertUnwindSafe(f));
    DEPTH.set(DEPTH.get() - 1);
    result.map_err(|payload| ContainedPanic {
        what: LAST
            .take()
            .unwrap_or_else(|| payload_message(payload.as_ref())),
    })
}

/// What to do with a panic outside [`contain`], once the previous hook
/// (the default one prints it) has run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Uncontained {
    /// Abort the process: the daemon's choice, as `panic = "abort"` would.
    Abort,
    /// Leave it to the previous hook (a test harness's, a fuzzer's).
    PreviousHook,
}

/// Installs the process's panic hook: a panic inside [`contain`] is kept
/// quiet and recorded for its caller; any other goes to the hook installed
/// before, then, with [`Uncontained::Abort`], aborts.
pub fn install_hook(uncontained: Uncontained) {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info: &PanicHookInfo<'_>| {
        if DEPTH.get() > 0 {
            LAST.set(Some(describe(info)));
            return;
        }
        previous(info);
        if uncontained == Uncontained::Abort {
            std::process::abort();
        }
    }));
}

fn describe(info: &PanicHookInfo<'_>) -> String {
    let message = payload_message(info.payload());
    match info.location() {
        Some(at) => format!("{message} at {}:{}", at.file(), at.line()),
        None => message,
    }
}

fn payload_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_is_an_error_and_the_thread_goes_on() {
        assert_eq!(contain(|| 7), Ok(7));
        let caught = contain(|| -> u8 { panic!("decoder bug {}", 42) }).unwrap_err();
        assert!(caught.what.contains("decoder bug 42"), "{caught}");
        // Nested: the inner panic is the inner call's, the outer goes on.
        let outer = contain(|| contain(|| -> u8 { panic!("inner") }).is_err());
        assert_eq!(outer, Ok(true));
        assert_eq!(DEPTH.get(), 0);
    }
}
