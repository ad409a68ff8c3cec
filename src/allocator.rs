//! How the daemon asks glibc's malloc to keep its memory.
//!
//! glibc gives threads that allocate at the same time arenas of their own,
//! up to eight per core, and an arena never returns the high-water mark of
//! its heap. With a capture thread per camera, each decoding frames of a
//! megabyte or more, the soak run (benches/soak.sh, 16 cameras) held about
//! 70 MiB more with the default than with two arenas, and its RSS kept
//! creeping for ten minutes. Two arenas ran the cameras at the same rate.

/// The arena limit the daemon sets unless the operator chose one.
pub const DAEMON_ARENAS: i32 = 2;

/// What to ask of malloc, given the value of `MALLOC_ARENA_MAX` in the
/// environment. glibc reads that variable itself at start, so an operator's
/// value (any value, even one glibc ignores) is left alone.
pub fn arena_limit(environment: Option<&std::ffi::OsStr>) -> Option<i32> {
    match environment {
        Some(_) => None,
        None => Some(DAEMON_ARENAS),
    }
}

/// Limits malloc to `arenas` arenas, for threads started from now on.
/// False where malloc refused, or is not glibc's (musl has no arenas).
pub fn limit_arenas(arenas: i32) -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt takes two integers and only changes malloc's
        // parameters; glibc guards them with its own lock.
        #[allow(unsafe_code)]
        let accepted = unsafe { nix::libc::mallopt(nix::libc::M_ARENA_MAX, arenas) };
        accepted == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        let _ = arenas;
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_daemon_limits_arenas_unless_the_environment_chose() {
        assert_eq!(arena_limit(None), Some(DAEMON_ARENAS));
        assert_eq!(arena_limit(Some("8".as_ref())), None);
        assert_eq!(arena_limit(Some("".as_ref())), None);
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_accepts_the_limit() {
        assert!(limit_arenas(DAEMON_ARENAS));
    }
}
