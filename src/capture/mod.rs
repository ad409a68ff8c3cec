//! Frame sources. So far: converting the pixel formats V4L2 cameras
//! deliver into [`Frame`](crate::frame::Frame)s. The V4L2 device code and
//! the image-folder source of the daemon build on this.

mod convert;

pub use convert::{BufferLayout, CameraFormat, to_frame};
