//! Frame sources: the V4L2 device itself and the image-folder source. The
//! pixel formats they deliver are converted into
//! [`Frame`](crate::frame::Frame)s by the core ([`crate::pixels`]), and
//! USERPTR capture buffers are the core's too ([`crate::buffer`]), since
//! the detector reads them. Pacing, re-opening and hand-off to the detector
//! are the daemon's camera task.

mod folder;
mod mmap;
mod source;
mod synthetic;
mod userptr;
mod v4l2;
mod videodev2;

pub use crate::buffer::{BufferLease, BufferPin, CaptureBuffer, RawBytes};
pub use crate::pixels::{BufferLayout, CameraFormat, UnknownFormat, encode, to_frame};
pub use folder::{FolderError, FolderSource};
pub use source::{Captured, Miss, Source, SourceError, SourceSpec};
pub use synthetic::{STARVED_AFTER, SyntheticError, SyntheticSource};
pub use v4l2::{
    CaptureIo, FormatOffer, IfUnsupported, Negotiated, SizeOffer, V4l2Camera, V4l2Error,
    V4l2Request, negotiate, negotiate_or_fall_back,
};
