//! V4L2 USERPTR streaming: the driver fills buffers nanodetd allocated, so
//! a filled buffer can leave the camera thread as it is. A GPU session
//! page-locks it once (CUDA host registration) and uploads straight from
//! it: no copy on the host between the driver and the device. The mmap
//! ring cannot do that, because its buffers belong to the driver and must
//! be copied out before they are queued again.
//!
//! A dequeued buffer goes out as a [`BufferLease`]; dropping the lease
//! hands its index back, and the stream queues it again before its next
//! dequeue. The buffers are anonymous memory maps, unmapped on drop, so a
//! driver that still holds pages of one after a failed STREAMOFF writes
//! into pages nobody else is given.

use std::io;
use std::os::raw::c_ulong;
use std::ptr::NonNull;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::videodev2::{MEMORY_USERPTR, VideoDevice};

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

/// USERPTR streaming on one device.
pub struct UserptrStream {
    device: Arc<VideoDevice>,
    buffers: Vec<Arc<CaptureBuffer>>,
    give_back: Sender<usize>,
    returned: Receiver<usize>,
    queued: usize,
    streaming: bool,
    timeout: Duration,
}

impl UserptrStream {
    /// Asks `device` for `count` USERPTR buffers of `size` bytes (the
    /// format's image size), queues them all and starts streaming. A
    /// driver without USERPTR support fails VIDIOC_REQBUFS (EINVAL).
    pub fn start(
        device: &Arc<VideoDevice>,
        count: u32,
        size: usize,
        timeout: Duration,
    ) -> Result<UserptrStream, (&'static str, io::Error)> {
        if size == 0 {
            return Err((
                "VIDIOC_G_FMT",
                io::Error::other("the driver reports a zero image size"),
            ));
        }
        let granted = device
            .request_buffers(MEMORY_USERPTR, count)
            .map_err(|e| ("VIDIOC_REQBUFS", e))?;
        if granted == 0 {
            return Err((
                "VIDIOC_REQBUFS",
                io::Error::other("the driver granted no USERPTR buffers"),
            ));
        }
        let buffers = (0..granted)
            .map(|_| CaptureBuffer::new(size).map(Arc::new))
            .collect::<io::Result<Vec<_>>>()
            .map_err(|e| ("allocating capture buffers", e))?;
        let (give_back, returned) = channel();
        let mut stream = UserptrStream {
            device: Arc::clone(device),
            buffers,
            give_back,
            returned,
            queued: 0,
            streaming: false,
            timeout,
        };
        for index in 0..stream.buffers.len() {
            stream.queue(index).map_err(|e| ("VIDIOC_QBUF", e))?;
        }
        stream
            .stream_switch(true)
            .map_err(|e| ("VIDIOC_STREAMON", e))?;
        Ok(stream)
    }

    /// Buffers in the ring.
    pub fn buffer_count(&self) -> usize {
        self.buffers.len()
    }

    /// The next filled buffer, with the driver's frame counter. Buffers
    /// given back since the last call are queued first; when every buffer
    /// is out (held downstream), this waits for one to come back. Errors
    /// name the ioctl that failed.
    pub fn next(&mut self) -> Result<(BufferLease, u32), (&'static str, io::Error)> {
        let returned: Vec<usize> = self.returned.try_iter().collect();
        for index in returned {
            self.queue(index).map_err(|e| ("VIDIOC_QBUF", e))?;
        }
        if self.queued == 0 {
            match self.returned.recv_timeout(self.timeout) {
                Ok(index) => self.queue(index).map_err(|e| ("VIDIOC_QBUF", e))?,
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => {
                    return Err((
                        "waiting for a capture buffer",
                        io::Error::new(
                            io::ErrorKind::TimedOut,
                            format!(
                                "all {} buffers held downstream for {:?}",
                                self.buffers.len(),
                                self.timeout
                            ),
                        ),
                    ));
                }
            }
        }
        let raw = self
            .device
            .dequeue(MEMORY_USERPTR, self.timeout)
            .map_err(|e| ("VIDIOC_DQBUF", e))?;
        self.queued = self.queued.saturating_sub(1);
        let index = raw.index as usize;
        let Some(buffer) = self.buffers.get(index) else {
            return Err((
                "VIDIOC_DQBUF",
                io::Error::other(format!(
                    "the driver returned buffer {index}, not one of ours"
                )),
            ));
        };
        let lease = BufferLease::lend(
            Arc::clone(buffer),
            index,
            raw.bytesused as usize,
            self.give_back.clone(),
        );
        Ok((lease, raw.sequence))
    }

    /// STREAMOFF, then frees the driver's hold on the buffers (REQBUFS 0),
    /// whatever STREAMOFF answered. The buffers themselves stay mapped
    /// while a lease holds them.
    pub fn stop(&mut self) -> io::Result<()> {
        let off = if self.streaming {
            self.stream_switch(false)
        } else {
            Ok(())
        };
        let freed = self.device.request_buffers(MEMORY_USERPTR, 0).map(|_| ());
        off.and(freed)
    }

    fn queue(&mut self, index: usize) -> io::Result<()> {
        let Some(buffer) = self.buffers.get(index) else {
            return Err(io::Error::other(format!("no buffer {index}")));
        };
        let mut raw = VideoDevice::buffer(MEMORY_USERPTR);
        raw.index = u32::try_from(index).map_err(io::Error::other)?;
        raw.m.userptr = buffer.as_ptr() as c_ulong;
        raw.length = u32::try_from(buffer.len()).map_err(io::Error::other)?;
        self.device.queue(&mut raw)?;
        self.queued += 1;
        Ok(())
    }

    fn stream_switch(&mut self, on: bool) -> io::Result<()> {
        let switched = self.device.stream(on);
        if !on {
            // STREAMOFF takes every queued buffer back from the driver;
            // after a failed one the stream is not used again.
            self.streaming = false;
            self.queued = 0;
        } else if switched.is_ok() {
            self.streaming = true;
        }
        switched
    }
}

impl Drop for UserptrStream {
    fn drop(&mut self) {
        // ENODEV (the device went) and other failures alike: the buffers
        // are unmapped when the last lease goes, and pages a driver still
        // holds are never handed out again, so there is nothing to leak.
        if let Err(e) = self.stop() {
            log::debug!("stopping USERPTR streaming: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
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
