//! How the daemon asks glibc's malloc to keep its memory.
//!
//! glibc gives threads that allocate at the same time arenas of their own,
//! up to eight per core, and an arena never returns the high-water mark of
//! its heap. With a capture thread per camera, each decoding frames of a
//! megabyte or more, the soak run (benches/soak.sh, 16 cameras) held about
//! 70 MiB more with the default than with two arenas, and its RSS kept
//! creeping for ten minutes. Two arenas ran the cameras at the same rate.

/// How often the daemon hands free heap memory back to the system.
pub const TRIM_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

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

/// Hands the free pages of every arena back to the system (glibc's
/// `malloc_trim`). Without it, free memory in the middle of a heap stays
/// resident: decoded frames and tract's intermediates are megabytes each
/// and change size with every photo, so the resident size crept up in
/// steps in the soak run (96 to 129 MiB at its low points, 30 minutes)
/// while nothing was kept. The daemon calls it every [`TRIM_EVERY`]; a
/// call walks the free lists and takes a millisecond or so. True when
/// memory was returned; false where malloc is not glibc's.
pub fn return_free_memory() -> bool {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim takes a byte count and only releases free
        // pages, under malloc's own locks.
        #[allow(unsafe_code)]
        let released = unsafe { nix::libc::malloc_trim(0) };
        released == 1
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        false
    }
}

/// What the process holds, for the stats topic: what the system counts
/// against it, and how much of the heap is in use, so that growth can be
/// told from memory freed but still resident.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct MemoryUse {
    /// Resident set size (`VmRSS`).
    pub rss_bytes: u64,
    /// Bytes malloc has handed out and not had back, every arena and
    /// mapped chunk included (glibc's `mallinfo`; it counts in 32 bits, so
    /// past 4 GiB this wraps). Absent where malloc is not glibc's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heap_in_use_bytes: Option<u64>,
    /// Photos read from folders, and their frames, in memory maps of
    /// their own: not on the heap, but in the resident set.
    pub frames_mapped_bytes: u64,
}

/// This process's memory now; None when `/proc` cannot be read.
pub fn memory_use() -> Option<MemoryUse> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    Some(MemoryUse {
        rss_bytes: vm_rss(&status)?,
        heap_in_use_bytes: heap_in_use(),
        frames_mapped_bytes: crate::frame::mapped_bytes() as u64,
    })
}

/// `VmRSS` from the text of `/proc/<pid>/status`, in bytes.
fn vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line
        .trim_start_matches("VmRSS:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

fn heap_in_use() -> Option<u64> {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // mallinfo2 would count in 64 bits, but needs glibc 2.33; the
        // packages run on 2.31 (JetPack 5).
        // SAFETY: mallinfo only reads malloc's counters, under its locks.
        #[allow(unsafe_code, deprecated)]
        let info = unsafe { nix::libc::mallinfo() };
        // The counters are C ints that wrap; read them as the unsigned
        // 32-bit values they are.
        let unsigned = |v: nix::libc::c_int| u64::from(v as u32);
        Some(unsigned(info.uordblks) + unsigned(info.hblkhd))
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    {
        None
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

    #[test]
    fn vm_rss_is_read_from_proc_status() {
        let status = "Name:\tnanodetd\nVmPeak:\t  200 kB\nVmRSS:\t  123456 kB\nThreads:\t3\n";
        assert_eq!(vm_rss(status), Some(123_456 * 1024));
        assert_eq!(vm_rss("Name:\tx\n"), None);
        assert_eq!(vm_rss("VmRSS:\tlots kB\n"), None);
        assert_eq!(vm_rss("VmRSS:\t99999999999999999999 kB\n"), None);
        let now = memory_use().unwrap();
        assert!(now.rss_bytes > 1 << 20, "{now:?}");
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn heap_in_use_follows_what_is_allocated() {
        // Other tests allocate and free tens of MiB meanwhile (CI once saw
        // 50 MiB show as 39): the block is far larger than anything they
        // hold. Zeroed, so calloc maps it untouched and it costs no RSS.
        let before = heap_in_use().unwrap();
        let block = vec![0u8; 1 << 30];
        let during = heap_in_use().unwrap();
        assert_eq!(block[block.len() - 1], 0);
        drop(block);
        assert!(during >= before + (900 << 20), "{before} -> {during}");
    }

    /// Freed pages in the middle of the heap become non-resident: a block
    /// kept past the end pins the heap's top, so only trimming returns
    /// the freed ones below it. Measured on the freed blocks' own pages
    /// (mincore), not on the process's RSS, which tests running beside
    /// this one move by tens of MB.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn freed_memory_below_a_live_block_is_returned() {
        const PAGE: usize = 4096;
        /// How many of the whole pages inside `[start, start + len)` are
        /// resident.
        fn resident_pages(start: usize, len: usize) -> usize {
            let first = start.div_ceil(PAGE) * PAGE;
            let end = (start + len) / PAGE * PAGE;
            if end <= first {
                return 0;
            }
            let mut flags = vec![0u8; (end - first) / PAGE];
            // SAFETY: mincore only reads the page tables of the range and
            // writes one byte per page into `flags`, which has that many;
            // the range lies in this process's heap.
            #[allow(unsafe_code)]
            let rc =
                unsafe { nix::libc::mincore(first as *mut _, end - first, flags.as_mut_ptr()) };
            if rc != 0 {
                // Unmapped (the heap shrank past it): nothing resident.
                return 0;
            }
            flags.iter().filter(|&&f| f & 1 == 1).count()
        }
        // Below glibc's mmap threshold, so on the heap; touched, so resident.
        let blocks: Vec<Vec<u8>> = (0..400).map(|i| vec![i as u8; 100_000]).collect();
        let pin = vec![1u8; 1000];
        let ranges: Vec<(usize, usize)> = blocks
            .iter()
            .map(|b| (b.as_ptr() as usize, b.len()))
            .collect();
        let pages = |ranges: &[(usize, usize)]| -> usize {
            ranges.iter().map(|&(s, l)| resident_pages(s, l)).sum()
        };
        let touched = pages(&ranges);
        drop(blocks);
        return_free_memory();
        let after = pages(&ranges);
        assert!(pin[0] == 1);
        // 400 blocks of 24 whole pages; other threads may reuse a few.
        assert!(touched >= 9000, "{touched} pages resident before");
        assert!(
            after * 4 < touched,
            "{after} of {touched} freed pages still resident after the trim"
        );
    }
}
