//! V4L2 mmap streaming: the driver's own buffers, mapped read-only into
//! nanodetd. A dequeued buffer is read in place and queued again at the
//! next dequeue, so a frame leaves this module as a borrow, and whoever
//! keeps it copies it.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use super::videodev2::{MEMORY_MMAP, VideoDevice};

/// mmap streaming on one device.
pub struct MmapStream {
    device: Arc<VideoDevice>,
    buffers: Vec<memmap2::Mmap>,
    /// The buffer handed out by the last `next`, queued again at the next.
    dequeued: Option<u32>,
    streaming: bool,
    timeout: Duration,
}

impl MmapStream {
    /// Asks for `count` driver buffers, maps and queues them all, and
    /// starts streaming. Errors name the ioctl that failed.
    pub fn start(
        device: &Arc<VideoDevice>,
        count: u32,
        timeout: Duration,
    ) -> Result<MmapStream, (&'static str, io::Error)> {
        let granted = device
            .request_buffers(MEMORY_MMAP, count)
            .map_err(|e| ("VIDIOC_REQBUFS", e))?;
        if granted == 0 {
            return Err((
                "VIDIOC_REQBUFS",
                io::Error::other("the driver granted no mmap buffers"),
            ));
        }
        let mut stream = MmapStream {
            device: Arc::clone(device),
            buffers: Vec::new(),
            dequeued: None,
            streaming: false,
            timeout,
        };
        for index in 0..granted {
            let desc = device
                .query_buffer(index)
                .map_err(|e| ("VIDIOC_QUERYBUF", e))?;
            #[allow(unsafe_code)]
            // SAFETY: the range is the one VIDIOC_QUERYBUF gave for this
            // buffer. The driver writes it only while it is queued, and
            // `next` hands out a borrow only of a dequeued buffer; the
            // kernel keeps the pages alive while mapped, also after the
            // device goes.
            let map = unsafe {
                memmap2::MmapOptions::new()
                    .offset(u64::from(desc.mmap_offset()))
                    .len(desc.length as usize)
                    .map(device.file())
            }
            .map_err(|e| ("mmap", e))?;
            stream.buffers.push(map);
        }
        for index in 0..granted {
            stream.queue(index).map_err(|e| ("VIDIOC_QBUF", e))?;
        }
        device.stream(true).map_err(|e| ("VIDIOC_STREAMON", e))?;
        stream.streaming = true;
        Ok(stream)
    }

    /// The next filled buffer's bytes, with the driver's frame counter.
    /// The previous buffer goes back to the driver first.
    pub fn next(&mut self) -> Result<(&[u8], u32), (&'static str, io::Error)> {
        if let Some(index) = self.dequeued.take() {
            self.queue(index).map_err(|e| ("VIDIOC_QBUF", e))?;
        }
        let desc = self
            .device
            .dequeue(MEMORY_MMAP, self.timeout)
            .map_err(|e| ("VIDIOC_DQBUF", e))?;
        let Some(map) = self.buffers.get(desc.index as usize) else {
            return Err((
                "VIDIOC_DQBUF",
                io::Error::other(format!(
                    "the driver returned buffer {}, not one of its {}",
                    desc.index,
                    self.buffers.len()
                )),
            ));
        };
        self.dequeued = Some(desc.index);
        let used = (desc.bytesused as usize).min(map.len());
        Ok((&map[..used], desc.sequence))
    }

    fn queue(&self, index: u32) -> io::Result<()> {
        let mut desc = VideoDevice::buffer(MEMORY_MMAP);
        desc.index = index;
        self.device.queue(&mut desc)
    }

    /// STREAMOFF, unmaps the buffers and frees them (REQBUFS 0). Each step
    /// runs whatever the one before it answered: a device that went
    /// (ENODEV) or failed (EIO on a USB unplug) must still be let go of,
    /// since a held descriptor pins the driver.
    pub fn stop(&mut self) -> io::Result<()> {
        let off = if std::mem::take(&mut self.streaming) {
            self.device.stream(false)
        } else {
            Ok(())
        };
        self.buffers.clear();
        self.dequeued = None;
        let freed = self.device.request_buffers(MEMORY_MMAP, 0).map(|_| ());
        off.and(freed)
    }
}

impl Drop for MmapStream {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            log::debug!("stopping mmap streaming: {e}");
        }
    }
}
