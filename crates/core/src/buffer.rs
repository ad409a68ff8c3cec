//! Capture buffers that leave the camera thread as they are: page-aligned
//! memory a driver fills (V4L2 USERPTR), lent out as a [`BufferLease`] that
//! gives the buffer back when dropped, and [`RawBytes`], a raw frame's
//! bytes, copied or lent. They live in the core because the detector and
//! the GPU preprocessing read them; the streams that fill them are the
//! capture layer's.
//!
//! The buffers are anonymous memory maps, unmapped on drop, so a driver
//! that still holds pages of one after a failed STREAMOFF writes into
//! pages nobody else is given.

use std::io;
use std::ptr::NonNull;
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};

/// A registration another part attached to a buffer (CUDA's page-locking),
/// released before the buffer's memory is unmapped.
pub type BufferPin = Box<dyn Send + Sync>;

/// One capture buffer: page-aligned, zeroed, anonymous memory.
pub struct CaptureBuffer {
    // Dropped explicitly before `map` (see Drop): a registration must
    // end while its memory is still mapped.
    pin: OnceLock<BufferPin>,
    start: NonNull<u8>,
    len: usize,
    // Owns the mapping `start` points into; never read through.
    _map: memmap2::MmapMut,
}

// SAFETY: the buffer is plain memory. It is written by the driver only
// while queued, and read through a lease only while dequeued; the stream
// never queues a leased index (see UserptrStream::next).
#[allow(unsafe_code)]
unsafe impl Send for CaptureBuffer {}
// SAFETY: as for Send: shared references only read, and only while the
// buffer is dequeued.
#[allow(unsafe_code)]
unsafe impl Sync for CaptureBuffer {}

impl CaptureBuffer {
    /// `len` bytes of fresh memory.
    pub fn new(len: usize) -> io::Result<CaptureBuffer> {
        let mut map = memmap2::MmapMut::map_anon(len.max(1))?;
        let start = NonNull::new(map.as_mut_ptr())
            .ok_or_else(|| io::Error::other("anonymous mapping at address 0"))?;
        Ok(CaptureBuffer {
            pin: OnceLock::new(),
            start,
            len,
            _map: map,
        })
    }

    /// Its size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a zero-byte buffer.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Where it starts: for registering it with a device driver.
    pub fn as_ptr(&self) -> *const u8 {
        self.start.as_ptr()
    }

    /// Its bytes, writable while nothing else holds the buffer (for a
    /// source that fills buffers itself, or a test).
    #[allow(unsafe_code)]
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: `&mut self` proves no lease or stream holds it; `len`
        // bytes from `start` are mapped.
        unsafe { std::slice::from_raw_parts_mut(self.start.as_ptr(), self.len) }
    }

    /// Whether a registration is attached.
    pub fn is_pinned(&self) -> bool {
        self.pin.get().is_some()
    }

    /// Attaches `pin`, kept until the buffer goes. False (and `pin`
    /// dropped) when one is attached already.
    pub fn attach_pin(&self, pin: BufferPin) -> bool {
        self.pin.set(pin).is_ok()
    }
}

impl Drop for CaptureBuffer {
    fn drop(&mut self) {
        drop(self.pin.take());
    }
}

impl std::fmt::Debug for CaptureBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CaptureBuffer")
            .field("len", &self.len)
            .field("pinned", &self.is_pinned())
            .finish()
    }
}

/// A filled buffer out of the stream. Dropping it gives the buffer back
/// for the driver to fill again.
pub struct BufferLease {
    buffer: Arc<CaptureBuffer>,
    index: usize,
    used: usize,
    give_back: Sender<usize>,
}

impl BufferLease {
    /// Lends `buffer`, filled with `used` bytes; dropping the lease sends
    /// `index` to `give_back`. The stream lends this way; so may any
    /// source that fills capture buffers itself.
    pub fn lend(
        buffer: Arc<CaptureBuffer>,
        index: usize,
        used: usize,
        give_back: Sender<usize>,
    ) -> BufferLease {
        let used = used.min(buffer.len());
        BufferLease {
            buffer,
            index,
            used,
            give_back,
        }
    }

    /// The bytes the driver filled.
    #[allow(unsafe_code)]
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `used` <= len (clamped in next()); the driver does not
        // write a dequeued buffer, and nothing else writes it.
        unsafe { std::slice::from_raw_parts(self.buffer.as_ptr(), self.used) }
    }

    /// The same lease, showing only the first `len` bytes (a frame's
    /// exact size when the driver reports more).
    pub fn truncated(mut self, len: usize) -> BufferLease {
        self.used = self.used.min(len);
        self
    }

    /// The buffer, for attaching a registration.
    pub fn buffer(&self) -> &CaptureBuffer {
        &self.buffer
    }
}

impl Drop for BufferLease {
    fn drop(&mut self) {
        // The stream may be gone (camera re-opened): nothing to give back.
        let _ = self.give_back.send(self.index);
    }
}

impl std::fmt::Debug for BufferLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BufferLease")
            .field("index", &self.index)
            .field("used", &self.used)
            .field("buffer", &self.buffer)
            .finish()
    }
}

/// A raw buffer's bytes: copied out of the driver's mmap ring, or the
/// USERPTR buffer the driver filled, lent until dropped.
#[derive(Debug)]
pub enum RawBytes {
    /// A copy that owes nothing to the camera.
    Copied(Vec<u8>),
    /// The capture buffer itself (exactly the frame's bytes).
    Leased(BufferLease),
}

impl std::ops::Deref for RawBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            RawBytes::Copied(bytes) => bytes,
            RawBytes::Leased(lease) => lease.bytes(),
        }
    }
}

impl Clone for RawBytes {
    /// A copy: a lease is one buffer of a small ring and cannot be shared.
    fn clone(&self) -> RawBytes {
        RawBytes::Copied(self.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc::channel;

    use super::*;

    #[test]
    fn a_dropped_lease_gives_its_index_back_and_a_pin_goes_before_the_memory() {
        let mut buffer = CaptureBuffer::new(10_000).unwrap();
        assert_eq!(buffer.as_ptr() as usize % 4096, 0, "page-aligned");
        assert!(buffer.as_mut_slice().iter().all(|&b| b == 0), "zeroed");
        buffer.as_mut_slice()[..3].copy_from_slice(b"abc");
        let buffer = Arc::new(buffer);
        let (give_back, returned) = channel();
        let whole = BufferLease::lend(Arc::clone(&buffer), 2, 20_000, give_back.clone());
        assert_eq!(whole.bytes().len(), 10_000, "clamped to the buffer");
        drop(whole);
        let lease = BufferLease::lend(Arc::clone(&buffer), 3, 500, give_back).truncated(64);
        assert_eq!(lease.bytes().len(), 64);
        assert_eq!(&lease.bytes()[..4], b"abc\0");
        assert_eq!(returned.try_recv(), Ok(2));
        assert!(returned.try_recv().is_err());
        drop(lease);
        assert_eq!(returned.try_recv(), Ok(3));

        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
        assert!(buffer.attach_pin(Box::new(Flag(Arc::clone(&released)))));
        assert!(!buffer.attach_pin(Box::new(())), "one pin per buffer");
        assert!(buffer.is_pinned());
        drop(buffer);
        assert!(released.load(std::sync::atomic::Ordering::SeqCst));
    }
}
