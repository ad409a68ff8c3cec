//! Frame sources: the V4L2 device itself, IP cameras over RTSP, H.264
//! video files and the image-folder source. The
//! pixel formats they deliver are converted into
//! [`Frame`](crate::frame::Frame)s by the core ([`crate::pixels`]), and
//! USERPTR capture buffers are the core's too ([`crate::buffer`]), since
//! the detector reads them. Pacing, re-opening and hand-off to the detector
//! are the daemon's camera task.

mod folder;
pub mod h264;
mod mmap;
mod rtsp;
mod source;
mod synthetic;
mod userptr;
mod v4l2;
mod video;
mod videodev2;

pub use crate::buffer::{BufferLease, BufferPin, CaptureBuffer, RawBytes};
pub use crate::pixels::{BufferLayout, CameraFormat, UnknownFormat, encode, to_frame};
pub use folder::{FolderError, FolderSource};
pub use rtsp::{
    OPEN_TIMEOUT, QUEUE, RtspCamera, RtspError, RtspRequest, RtspTransport, STALL_TIMEOUT,
    check_url, hide_credentials,
};
pub use source::{Captured, Miss, Source, SourceError, SourceSpec};
pub use synthetic::{STARVED_AFTER, SyntheticError, SyntheticSource};
pub use v4l2::{
    CaptureIo, FormatOffer, IfUnsupported, Negotiated, SizeOffer, V4l2Camera, V4l2Error,
    V4l2Request, negotiate, negotiate_or_fall_back,
};
pub use video::{ANNEX_B_FPS, MAX_MP4_INDEX, MAX_MP4_SAMPLES, VideoError, VideoFile};
