//! A configured camera's source, whatever it is: the daemon's camera
//! threads and `nanodetd calibrate` open cameras the same way.

use super::{FolderSource, V4l2Camera, V4l2Error, V4l2Request};
use crate::config::{CameraConfig, SourceConfig};
use crate::frame::{Frame, FrameError};

/// An opened source.
pub enum Source {
    /// A replayed folder or glob of images.
    Folder(FolderSource),
    /// A V4L2 device.
    V4l2(Box<V4l2Camera>),
}

/// Why a source gave no frame.
#[derive(Debug)]
pub enum Miss {
    /// One bad frame: count, skip.
    Broken(FrameError),
    /// The source is gone: re-open.
    Lost(String),
    /// A replay has played every file.
    Finished,
}

impl Source {
    /// Opens the source `camera` describes. The error is one line.
    pub fn open(camera: &CameraConfig) -> Result<Source, String> {
        match &camera.source {
            SourceConfig::Folder(dir) => FolderSource::open(dir, camera.looping)
                .map(Source::Folder)
                .map_err(|e| e.to_string()),
            SourceConfig::V4l2(path) => {
                let request = V4l2Request {
                    format: camera.format,
                    size: camera.size.map(|[w, h]| (w, h)),
                    fps: camera.fps,
                };
                V4l2Camera::open(path, &request)
                    .map(|c| Source::V4l2(Box::new(c)))
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// True for replays, which are paced by the clock rather than a driver.
    pub fn is_replay(&self) -> bool {
        matches!(self, Source::Folder(_))
    }

    /// The next frame (blocking on a live camera).
    pub fn next_frame(&mut self) -> Result<Frame, Miss> {
        match self {
            Source::Folder(folder) => match folder.next_frame() {
                None => Err(Miss::Finished),
                Some((_, frame)) => frame.map_err(Miss::Broken),
            },
            Source::V4l2(camera) => camera.next_frame().map_err(|e| match e {
                V4l2Error::Broken(e) => Miss::Broken(e),
                other => Miss::Lost(other.to_string()),
            }),
        }
    }
}
