//! The part of the kernel's V4L2 interface (`<linux/videodev2.h>`) that
//! nanodetd uses, declared by hand: a dozen structs and ioctls. Generating
//! them with bindgen would need libclang at build time; these are checked
//! instead, at compile time against the LP64 layout (x86_64 and aarch64
//! alike) and, in a test, against the installed header itself.
//!
//! [`VideoDevice`] wraps the descriptor and turns each ioctl into a safe
//! call; every `unsafe` of the V4L2 layer is in this file.

#![allow(non_camel_case_types, missing_docs)]

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::os::raw::{c_int, c_ulong};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "the V4L2 structs are declared for 64-bit Linux (LP64); 32-bit targets need their own layouts"
);

/// `V4L2_BUF_TYPE_VIDEO_CAPTURE`.
pub const BUF_TYPE_VIDEO_CAPTURE: u32 = 1;
/// `V4L2_MEMORY_MMAP`.
pub const MEMORY_MMAP: u32 = 1;
/// `V4L2_MEMORY_USERPTR`.
pub const MEMORY_USERPTR: u32 = 2;
/// `V4L2_FRMSIZE_TYPE_DISCRETE`.
pub const FRMSIZE_TYPE_DISCRETE: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_capability {
    pub driver: [u8; 16],
    pub card: [u8; 32],
    pub bus_info: [u8; 32],
    pub version: u32,
    pub capabilities: u32,
    pub device_caps: u32,
    pub reserved: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_fmtdesc {
    pub index: u32,
    pub type_: u32,
    pub flags: u32,
    pub description: [u8; 32],
    pub pixelformat: u32,
    pub mbus_code: u32,
    pub reserved: [u32; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_frmsize_discrete {
    pub width: u32,
    pub height: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_frmsize_stepwise {
    pub min_width: u32,
    pub max_width: u32,
    pub step_width: u32,
    pub min_height: u32,
    pub max_height: u32,
    pub step_height: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union v4l2_frmsize_union {
    pub discrete: v4l2_frmsize_discrete,
    pub stepwise: v4l2_frmsize_stepwise,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_frmsizeenum {
    pub index: u32,
    pub pixel_format: u32,
    pub type_: u32,
    pub size: v4l2_frmsize_union,
    pub reserved: [u32; 2],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_pix_format {
    pub width: u32,
    pub height: u32,
    pub pixelformat: u32,
    pub field: u32,
    pub bytesperline: u32,
    pub sizeimage: u32,
    pub colorspace: u32,
    pub priv_: u32,
    pub flags: u32,
    pub ycbcr_enc: u32,
    pub quantization: u32,
    pub xfer_func: u32,
}

/// The format union: 200 bytes, 8-aligned on LP64 because some of its
/// members (`v4l2_window`) hold pointers.
#[repr(C)]
#[derive(Clone, Copy)]
pub union v4l2_format_union {
    pub pix: v4l2_pix_format,
    pub raw_data: [u64; 25],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_format {
    pub type_: u32,
    pub fmt: v4l2_format_union,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_fract {
    pub numerator: u32,
    pub denominator: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_captureparm {
    pub capability: u32,
    pub capturemode: u32,
    pub timeperframe: v4l2_fract,
    pub extendedmode: u32,
    pub readbuffers: u32,
    pub reserved: [u32; 4],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union v4l2_streamparm_union {
    pub capture: v4l2_captureparm,
    pub raw_data: [u8; 200],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_streamparm {
    pub type_: u32,
    pub parm: v4l2_streamparm_union,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_requestbuffers {
    pub count: u32,
    pub type_: u32,
    pub memory: u32,
    pub capabilities: u32,
    pub flags: u8,
    pub reserved: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_timecode {
    pub type_: u32,
    pub flags: u32,
    pub frames: u8,
    pub seconds: u8,
    pub minutes: u8,
    pub hours: u8,
    pub userbits: [u8; 4],
}

/// `struct timeval` as the 64-bit kernel ABI has it.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct timeval {
    pub tv_sec: i64,
    pub tv_usec: i64,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub union v4l2_buffer_m {
    pub offset: u32,
    pub userptr: c_ulong,
    pub fd: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct v4l2_buffer {
    pub index: u32,
    pub type_: u32,
    pub bytesused: u32,
    pub flags: u32,
    pub field: u32,
    pub timestamp: timeval,
    pub timecode: v4l2_timecode,
    pub sequence: u32,
    pub memory: u32,
    pub m: v4l2_buffer_m,
    pub length: u32,
    pub reserved2: u32,
    pub request_fd: i32,
}

/// The header's sizes on LP64 (x86_64 and aarch64 alike); a wrong field
/// fails the build on either.
const _: () = {
    use std::mem::{offset_of, size_of};
    assert!(size_of::<v4l2_capability>() == 104);
    assert!(size_of::<v4l2_fmtdesc>() == 64);
    assert!(offset_of!(v4l2_fmtdesc, pixelformat) == 44);
    assert!(size_of::<v4l2_frmsizeenum>() == 44);
    assert!(offset_of!(v4l2_frmsizeenum, size) == 12);
    assert!(size_of::<v4l2_pix_format>() == 48);
    assert!(size_of::<v4l2_format>() == 208);
    assert!(offset_of!(v4l2_format, fmt) == 8);
    assert!(size_of::<v4l2_streamparm>() == 204);
    assert!(size_of::<v4l2_requestbuffers>() == 20);
    assert!(size_of::<v4l2_buffer>() == 88);
    assert!(offset_of!(v4l2_buffer, timestamp) == 24);
    assert!(offset_of!(v4l2_buffer, sequence) == 56);
    assert!(offset_of!(v4l2_buffer, m) == 64);
    assert!(offset_of!(v4l2_buffer, length) == 72);
    assert!(offset_of!(v4l2_buffer, request_fd) == 80);
};

/// The ioctls, as `<linux/videodev2.h>` numbers them (type 'V').
#[allow(unsafe_code)]
mod ioctls {
    use super::*;
    nix::ioctl_read!(querycap, b'V', 0, v4l2_capability);
    nix::ioctl_readwrite!(enum_fmt, b'V', 2, v4l2_fmtdesc);
    nix::ioctl_readwrite!(g_fmt, b'V', 4, v4l2_format);
    nix::ioctl_readwrite!(s_fmt, b'V', 5, v4l2_format);
    nix::ioctl_readwrite!(reqbufs, b'V', 8, v4l2_requestbuffers);
    nix::ioctl_readwrite!(querybuf, b'V', 9, v4l2_buffer);
    nix::ioctl_readwrite!(qbuf, b'V', 15, v4l2_buffer);
    nix::ioctl_readwrite!(dqbuf, b'V', 17, v4l2_buffer);
    nix::ioctl_write_ptr!(streamon, b'V', 18, c_int);
    nix::ioctl_write_ptr!(streamoff, b'V', 19, c_int);
    nix::ioctl_readwrite!(g_parm, b'V', 21, v4l2_streamparm);
    nix::ioctl_readwrite!(s_parm, b'V', 22, v4l2_streamparm);
    nix::ioctl_readwrite!(enum_framesizes, b'V', 74, v4l2_frmsizeenum);
}

/// Implements `zeroed()` for the plain-data structs above.
macro_rules! zeroable {
    ($($t:ty),*) => {$(
        impl $t {
            /// All fields zero: the empty value V4L2 expects before the
            /// caller fills in what it asks for.
            #[allow(unsafe_code)]
            pub fn zeroed() -> Self {
                // SAFETY: plain old data (integers, arrays and unions of
                // them); all-zero is a valid value of each.
                unsafe { std::mem::zeroed() }
            }
        }
    )*};
}
zeroable!(
    v4l2_capability,
    v4l2_fmtdesc,
    v4l2_frmsizeenum,
    v4l2_format,
    v4l2_streamparm,
    v4l2_requestbuffers,
    v4l2_buffer
);

impl v4l2_format {
    /// The single-planar pixel format (the member of the union a
    /// `VIDEO_CAPTURE` format uses).
    #[allow(unsafe_code)]
    pub fn pix(&self) -> v4l2_pix_format {
        // SAFETY: every bit pattern is a valid v4l2_pix_format.
        unsafe { self.fmt.pix }
    }
}

impl v4l2_buffer {
    /// Where an mmap buffer lies in the device's address space (the
    /// member of `m` that VIDIOC_QUERYBUF fills for [`MEMORY_MMAP`]).
    #[allow(unsafe_code)]
    pub fn mmap_offset(&self) -> u32 {
        // SAFETY: every bit pattern is a valid u32.
        unsafe { self.m.offset }
    }
}

impl v4l2_streamparm {
    /// The capture parameters (the member a `VIDEO_CAPTURE` stream uses).
    #[allow(unsafe_code)]
    pub fn capture(&self) -> v4l2_captureparm {
        // SAFETY: every bit pattern is a valid v4l2_captureparm.
        unsafe { self.parm.capture }
    }
}

/// One frame size a device offers for a format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameSize {
    /// Exactly this width and height.
    Discrete(u32, u32),
    /// Any size from `min` to `max` (stepwise or continuous).
    Range {
        /// Smallest (width, height).
        min: (u32, u32),
        /// Largest (width, height).
        max: (u32, u32),
    },
}

impl std::fmt::Display for FrameSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FrameSize::Discrete(w, h) => write!(f, "{w}x{h}"),
            FrameSize::Range { min, max } => {
                write!(f, "{}x{} to {}x{}", min.0, min.1, max.0, max.1)
            }
        }
    }
}

/// A pixel format a device lists.
#[derive(Debug, Clone)]
pub struct FormatDescription {
    /// Its fourcc.
    pub fourcc: [u8; 4],
    /// The driver's name for it.
    pub description: String,
}

/// The driver's identity, from VIDIOC_QUERYCAP.
#[derive(Debug, Clone)]
pub struct Capabilities {
    /// The driver's name.
    pub driver: String,
    /// The device's name.
    pub card: String,
    /// Where it sits (e.g. `usb-0000:00:14.0-1`).
    pub bus: String,
    /// The driver's version, major.minor.patch.
    pub version: (u32, u32, u32),
    /// Its capability flags.
    pub capabilities: u32,
}

/// Turns a NUL-padded name from the kernel into text.
fn c_text(bytes: &[u8]) -> String {
    let end = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
    String::from_utf8_lossy(&bytes[..end]).into_owned()
}

/// Retries an ioctl interrupted by a signal, and turns errno into
/// `io::Error`.
fn retry(mut call: impl FnMut() -> nix::Result<c_int>) -> io::Result<()> {
    loop {
        match call() {
            Ok(_) => return Ok(()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(e) => return Err(io::Error::from(e)),
        }
    }
}

/// An open V4L2 device node. Every ioctl nanodetd issues goes through
/// one of its methods.
#[derive(Debug)]
pub struct VideoDevice {
    file: File,
}

/// Runs one ioctl from [`ioctls`] on `$fd` with `$arg`.
macro_rules! ioctl {
    ($name:ident, $fd:expr, $arg:expr) => {{
        let fd = $fd;
        let arg = $arg;
        #[allow(unsafe_code)]
        // SAFETY: each ioctl in `ioctls` is declared with the argument
        // type the kernel reads and writes for it, `arg` is a live
        // exclusive reference to that type, and `fd` is open for as long
        // as the borrow it came from.
        retry(|| unsafe { ioctls::$name(fd, arg) })
    }};
}

impl VideoDevice {
    /// Opens `path` read-write and non-blocking: frames are waited for
    /// with poll(2) and a timeout, so a silent device never hangs a
    /// dequeue.
    pub fn open(path: &Path) -> io::Result<VideoDevice> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)?;
        Ok(VideoDevice { file })
    }

    fn fd(&self) -> c_int {
        self.file.as_raw_fd()
    }

    /// The driver, card and capabilities.
    pub fn query_caps(&self) -> io::Result<Capabilities> {
        let mut caps = v4l2_capability::zeroed();
        ioctl!(querycap, self.fd(), &mut caps)?;
        Ok(Capabilities {
            driver: c_text(&caps.driver),
            card: c_text(&caps.card),
            bus: c_text(&caps.bus_info),
            version: (
                (caps.version >> 16) & 0xff,
                (caps.version >> 8) & 0xff,
                caps.version & 0xff,
            ),
            capabilities: caps.capabilities,
        })
    }

    /// Every capture format the driver lists.
    pub fn enum_formats(&self) -> io::Result<Vec<FormatDescription>> {
        let mut formats = Vec::new();
        // A driver lists a handful; the bound stops one that never says
        // EINVAL.
        for index in 0..256 {
            let mut desc = v4l2_fmtdesc::zeroed();
            desc.index = index;
            desc.type_ = BUF_TYPE_VIDEO_CAPTURE;
            match ioctl!(enum_fmt, self.fd(), &mut desc) {
                Ok(()) => formats.push(FormatDescription {
                    fourcc: desc.pixelformat.to_le_bytes(),
                    description: c_text(&desc.description),
                }),
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(formats)
    }

    /// The frame sizes the driver offers for `fourcc`. A driver without
    /// VIDIOC_ENUM_FRAMESIZES gives an empty list.
    pub fn enum_framesizes(&self, fourcc: [u8; 4]) -> io::Result<Vec<FrameSize>> {
        let mut sizes = Vec::new();
        for index in 0..256 {
            let mut size = v4l2_frmsizeenum::zeroed();
            size.index = index;
            size.pixel_format = u32::from_le_bytes(fourcc);
            match ioctl!(enum_framesizes, self.fd(), &mut size) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => break,
                Err(e) if e.raw_os_error() == Some(nix::libc::ENOTTY) => break,
                Err(e) => return Err(e),
            }
            #[allow(unsafe_code)]
            // SAFETY: the driver filled the member `type_` names; both
            // members are plain integers.
            let offered = unsafe {
                if size.type_ == FRMSIZE_TYPE_DISCRETE {
                    FrameSize::Discrete(size.size.discrete.width, size.size.discrete.height)
                } else {
                    let s = size.size.stepwise;
                    FrameSize::Range {
                        min: (s.min_width, s.min_height),
                        max: (s.max_width, s.max_height),
                    }
                }
            };
            sizes.push(offered);
            if !matches!(offered, FrameSize::Discrete(..)) {
                // Stepwise and continuous sizes are one entry, index 0.
                break;
            }
        }
        Ok(sizes)
    }

    /// The current capture format.
    pub fn format(&self) -> io::Result<v4l2_format> {
        let mut format = v4l2_format::zeroed();
        format.type_ = BUF_TYPE_VIDEO_CAPTURE;
        ioctl!(g_fmt, self.fd(), &mut format)?;
        Ok(format)
    }

    /// Asks for `pix`; returns what the driver set, which may differ.
    pub fn set_format(&self, pix: v4l2_pix_format) -> io::Result<v4l2_pix_format> {
        let mut format = v4l2_format::zeroed();
        format.type_ = BUF_TYPE_VIDEO_CAPTURE;
        format.fmt.pix = pix;
        ioctl!(s_fmt, self.fd(), &mut format)?;
        Ok(format.pix())
    }

    /// The capture parameters (frame interval).
    pub fn params(&self) -> io::Result<v4l2_captureparm> {
        let mut parm = v4l2_streamparm::zeroed();
        parm.type_ = BUF_TYPE_VIDEO_CAPTURE;
        ioctl!(g_parm, self.fd(), &mut parm)?;
        Ok(parm.capture())
    }

    /// Asks for a frame interval of `interval` seconds; returns the one
    /// the driver set.
    pub fn set_interval(&self, interval: v4l2_fract) -> io::Result<v4l2_fract> {
        let mut parm = v4l2_streamparm::zeroed();
        parm.type_ = BUF_TYPE_VIDEO_CAPTURE;
        parm.parm.capture = v4l2_captureparm {
            timeperframe: interval,
            ..parm.capture()
        };
        ioctl!(s_parm, self.fd(), &mut parm)?;
        Ok(parm.capture().timeperframe)
    }

    /// VIDIOC_REQBUFS for `count` capture buffers of `memory`
    /// ([`MEMORY_MMAP`] or [`MEMORY_USERPTR`]); returns how many the
    /// driver granted. 0 frees them.
    pub fn request_buffers(&self, memory: u32, count: u32) -> io::Result<u32> {
        let mut request = v4l2_requestbuffers::zeroed();
        request.count = count;
        request.type_ = BUF_TYPE_VIDEO_CAPTURE;
        request.memory = memory;
        ioctl!(reqbufs, self.fd(), &mut request)?;
        Ok(request.count)
    }

    /// A fresh buffer descriptor for `memory`, index 0.
    pub fn buffer(memory: u32) -> v4l2_buffer {
        let mut buffer = v4l2_buffer::zeroed();
        buffer.type_ = BUF_TYPE_VIDEO_CAPTURE;
        buffer.memory = memory;
        buffer
    }

    /// VIDIOC_QUERYBUF: where mmap buffer `index` lies, and its length.
    pub fn query_buffer(&self, index: u32) -> io::Result<v4l2_buffer> {
        let mut buffer = Self::buffer(MEMORY_MMAP);
        buffer.index = index;
        ioctl!(querybuf, self.fd(), &mut buffer)?;
        Ok(buffer)
    }

    /// VIDIOC_QBUF: hands `buffer` to the driver to fill. For USERPTR,
    /// the memory it points to must stay mapped until it is dequeued or
    /// streaming stops.
    pub fn queue(&self, buffer: &mut v4l2_buffer) -> io::Result<()> {
        ioctl!(qbuf, self.fd(), buffer)
    }

    /// VIDIOC_DQBUF after waiting up to `timeout` for a filled buffer.
    pub fn dequeue(&self, memory: u32, timeout: Duration) -> io::Result<v4l2_buffer> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if !self.poll_readable(left)? {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no frame within the timeout",
                ));
            }
            let mut buffer = Self::buffer(memory);
            match ioctl!(dqbuf, self.fd(), &mut buffer) {
                // Readable but nothing to take (another reader, or a
                // spurious wake-up): wait again, within the deadline.
                Err(e) if e.raw_os_error() == Some(nix::libc::EAGAIN) && !left.is_zero() => {}
                other => return other.map(|()| buffer),
            }
        }
    }

    /// VIDIOC_STREAMON / VIDIOC_STREAMOFF for capture.
    pub fn stream(&self, on: bool) -> io::Result<()> {
        let kind = BUF_TYPE_VIDEO_CAPTURE as c_int;
        if on {
            ioctl!(streamon, self.fd(), &kind)
        } else {
            ioctl!(streamoff, self.fd(), &kind)
        }
    }

    fn poll_readable(&self, timeout: Duration) -> io::Result<bool> {
        use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
        let ms = u16::try_from(timeout.as_millis()).unwrap_or(u16::MAX);
        let mut fds = [PollFd::new(self.file.as_fd(), PollFlags::POLLIN)];
        loop {
            match poll(&mut fds, PollTimeout::from(ms)) {
                Ok(n) => return Ok(n > 0),
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// The file, for mapping buffers.
    pub fn file(&self) -> &File {
        &self.file
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    /// Every size, offset and ioctl number declared above, compared with
    /// what a C compiler makes of the installed `<linux/videodev2.h>`.
    #[test]
    fn declarations_match_the_installed_kernel_header() {
        let header = Path::new("/usr/include/linux/videodev2.h");
        if !header.is_file() {
            let why = "/usr/include/linux/videodev2.h is missing (Debian: linux-libc-dev)";
            assert!(std::env::var_os("CI").is_none(), "{why}");
            eprintln!("SKIPPED: {why}");
            return;
        }
        let rust: Vec<(&str, u64)> = vec![
            (
                "sizeof(struct v4l2_capability)",
                size_of::<v4l2_capability>() as u64,
            ),
            (
                "offsetof(struct v4l2_capability, capabilities)",
                offset_of!(v4l2_capability, capabilities) as u64,
            ),
            (
                "sizeof(struct v4l2_fmtdesc)",
                size_of::<v4l2_fmtdesc>() as u64,
            ),
            (
                "offsetof(struct v4l2_fmtdesc, description)",
                offset_of!(v4l2_fmtdesc, description) as u64,
            ),
            (
                "offsetof(struct v4l2_fmtdesc, pixelformat)",
                offset_of!(v4l2_fmtdesc, pixelformat) as u64,
            ),
            (
                "sizeof(struct v4l2_frmsizeenum)",
                size_of::<v4l2_frmsizeenum>() as u64,
            ),
            (
                "offsetof(struct v4l2_frmsizeenum, type)",
                offset_of!(v4l2_frmsizeenum, type_) as u64,
            ),
            (
                "offsetof(struct v4l2_frmsizeenum, discrete)",
                offset_of!(v4l2_frmsizeenum, size) as u64,
            ),
            (
                "sizeof(struct v4l2_frmsize_stepwise)",
                size_of::<v4l2_frmsize_stepwise>() as u64,
            ),
            (
                "offsetof(struct v4l2_frmsize_stepwise, max_height)",
                offset_of!(v4l2_frmsize_stepwise, max_height) as u64,
            ),
            (
                "sizeof(struct v4l2_pix_format)",
                size_of::<v4l2_pix_format>() as u64,
            ),
            (
                "offsetof(struct v4l2_pix_format, bytesperline)",
                offset_of!(v4l2_pix_format, bytesperline) as u64,
            ),
            (
                "offsetof(struct v4l2_pix_format, sizeimage)",
                offset_of!(v4l2_pix_format, sizeimage) as u64,
            ),
            (
                "offsetof(struct v4l2_pix_format, xfer_func)",
                offset_of!(v4l2_pix_format, xfer_func) as u64,
            ),
            (
                "sizeof(struct v4l2_format)",
                size_of::<v4l2_format>() as u64,
            ),
            (
                "offsetof(struct v4l2_format, fmt)",
                offset_of!(v4l2_format, fmt) as u64,
            ),
            (
                "sizeof(((struct v4l2_format *)0)->fmt)",
                size_of::<v4l2_format_union>() as u64,
            ),
            (
                "sizeof(struct v4l2_captureparm)",
                size_of::<v4l2_captureparm>() as u64,
            ),
            (
                "offsetof(struct v4l2_captureparm, timeperframe)",
                offset_of!(v4l2_captureparm, timeperframe) as u64,
            ),
            (
                "sizeof(struct v4l2_streamparm)",
                size_of::<v4l2_streamparm>() as u64,
            ),
            (
                "offsetof(struct v4l2_streamparm, parm)",
                offset_of!(v4l2_streamparm, parm) as u64,
            ),
            (
                "sizeof(struct v4l2_requestbuffers)",
                size_of::<v4l2_requestbuffers>() as u64,
            ),
            (
                "offsetof(struct v4l2_requestbuffers, memory)",
                offset_of!(v4l2_requestbuffers, memory) as u64,
            ),
            (
                "sizeof(struct v4l2_buffer)",
                size_of::<v4l2_buffer>() as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, bytesused)",
                offset_of!(v4l2_buffer, bytesused) as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, field)",
                offset_of!(v4l2_buffer, field) as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, timestamp)",
                offset_of!(v4l2_buffer, timestamp) as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, timecode)",
                offset_of!(v4l2_buffer, timecode) as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, sequence)",
                offset_of!(v4l2_buffer, sequence) as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, memory)",
                offset_of!(v4l2_buffer, memory) as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, m)",
                offset_of!(v4l2_buffer, m) as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, length)",
                offset_of!(v4l2_buffer, length) as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, reserved2)",
                offset_of!(v4l2_buffer, reserved2) as u64,
            ),
            (
                "offsetof(struct v4l2_buffer, request_fd)",
                offset_of!(v4l2_buffer, request_fd) as u64,
            ),
            (
                "sizeof(((struct v4l2_buffer *)0)->m)",
                size_of::<v4l2_buffer_m>() as u64,
            ),
            (
                "sizeof(struct v4l2_timecode)",
                size_of::<v4l2_timecode>() as u64,
            ),
            (
                "V4L2_BUF_TYPE_VIDEO_CAPTURE",
                u64::from(BUF_TYPE_VIDEO_CAPTURE),
            ),
            ("V4L2_MEMORY_MMAP", u64::from(MEMORY_MMAP)),
            ("V4L2_MEMORY_USERPTR", u64::from(MEMORY_USERPTR)),
            (
                "V4L2_FRMSIZE_TYPE_DISCRETE",
                u64::from(FRMSIZE_TYPE_DISCRETE),
            ),
            (
                "VIDIOC_QUERYCAP",
                nix::request_code_read!(b'V', 0, size_of::<v4l2_capability>()) as u64,
            ),
            (
                "VIDIOC_ENUM_FMT",
                nix::request_code_readwrite!(b'V', 2, size_of::<v4l2_fmtdesc>()) as u64,
            ),
            (
                "VIDIOC_G_FMT",
                nix::request_code_readwrite!(b'V', 4, size_of::<v4l2_format>()) as u64,
            ),
            (
                "VIDIOC_S_FMT",
                nix::request_code_readwrite!(b'V', 5, size_of::<v4l2_format>()) as u64,
            ),
            (
                "VIDIOC_REQBUFS",
                nix::request_code_readwrite!(b'V', 8, size_of::<v4l2_requestbuffers>()) as u64,
            ),
            (
                "VIDIOC_QUERYBUF",
                nix::request_code_readwrite!(b'V', 9, size_of::<v4l2_buffer>()) as u64,
            ),
            (
                "VIDIOC_QBUF",
                nix::request_code_readwrite!(b'V', 15, size_of::<v4l2_buffer>()) as u64,
            ),
            (
                "VIDIOC_DQBUF",
                nix::request_code_readwrite!(b'V', 17, size_of::<v4l2_buffer>()) as u64,
            ),
            (
                "VIDIOC_STREAMON",
                nix::request_code_write!(b'V', 18, size_of::<c_int>()) as u64,
            ),
            (
                "VIDIOC_STREAMOFF",
                nix::request_code_write!(b'V', 19, size_of::<c_int>()) as u64,
            ),
            (
                "VIDIOC_G_PARM",
                nix::request_code_readwrite!(b'V', 21, size_of::<v4l2_streamparm>()) as u64,
            ),
            (
                "VIDIOC_S_PARM",
                nix::request_code_readwrite!(b'V', 22, size_of::<v4l2_streamparm>()) as u64,
            ),
            (
                "VIDIOC_ENUM_FRAMESIZES",
                nix::request_code_readwrite!(b'V', 74, size_of::<v4l2_frmsizeenum>()) as u64,
            ),
        ];
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("layout.c");
        let mut program = String::from(
            "#include <stddef.h>\n#include <stdio.h>\n#include <linux/videodev2.h>\nint main(void) {\n",
        );
        for (expr, _) in &rust {
            program += &format!("  printf(\"%llu\\n\", (unsigned long long)({expr}));\n");
        }
        program += "  return 0;\n}\n";
        std::fs::write(&source, program).unwrap();
        let binary = dir.path().join("layout");
        let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
        let built = std::process::Command::new(&cc)
            .arg(&source)
            .arg("-o")
            .arg(&binary)
            .output()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
        assert!(
            built.status.success(),
            "{cc} failed: {}",
            String::from_utf8_lossy(&built.stderr)
        );
        let out = std::process::Command::new(&binary).output().unwrap();
        let c: Vec<u64> = String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(|l| l.parse().unwrap())
            .collect();
        assert_eq!(c.len(), rust.len());
        let mismatches: Vec<String> = rust
            .iter()
            .zip(&c)
            .filter(|((_, r), c)| r != *c)
            .map(|((expr, r), c)| format!("{expr}: Rust {r}, C {c}"))
            .collect();
        assert!(mismatches.is_empty(), "{mismatches:#?}");
    }

    #[test]
    fn driver_names_stop_at_the_first_nul() {
        assert_eq!(c_text(b"vivid\0\0\0junk"), "vivid");
        assert_eq!(c_text(b"full"), "full");
    }
}
