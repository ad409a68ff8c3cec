//! Frame sources: converting the pixel formats V4L2 cameras deliver into
//! [`Frame`](crate::frame::Frame)s, and the image-folder source. The V4L2
//! device code of the daemon builds on the conversions.

mod convert;
mod folder;

pub use convert::{BufferLayout, CameraFormat, to_frame};
pub use folder::{FolderError, FolderSource};
