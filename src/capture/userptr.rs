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
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, channel};
use std::time::Duration;

use super::videodev2::{MEMORY_USERPTR, VideoDevice};
use crate::buffer::{BufferLease, CaptureBuffer};

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
