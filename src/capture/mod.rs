//! Frame sources: converting the pixel formats V4L2 cameras deliver into
//! [`Frame`](crate::frame::Frame)s, the V4L2 device itself, and the
//! image-folder source. Pacing, re-opening and hand-off to the detector
//! are the daemon's camera task.

mod convert;
mod folder;
mod mmap;
mod source;
mod userptr;
mod v4l2;
mod videodev2;

pub use convert::{BufferLayout, CameraFormat, UnknownFormat, encode, to_frame};
pub use folder::{FolderError, FolderSource};
pub use source::{Captured, Miss, RawBytes, Source, SourceError};
pub use userptr::{BufferLease, BufferPin, CaptureBuffer};
pub use v4l2::{
    CaptureIo, FormatOffer, IfUnsupported, Negotiated, SizeOffer, V4l2Camera, V4l2Error,
    V4l2Request, negotiate, negotiate_or_fall_back,
};
