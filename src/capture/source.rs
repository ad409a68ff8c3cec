//! A camera's source, whatever it is: the daemon's camera threads and
//! `nanodetd calibrate` open cameras the same way. What to open comes as a
//! [`SourceSpec`], which the config builds: capture knows nothing of the
//! config file.

use std::path::PathBuf;

use super::{
    BufferLayout, BufferLease, CameraFormat, FolderError, FolderSource, RawBytes, RtspCamera,
    RtspError, RtspRequest, SyntheticError, SyntheticSource, V4l2Camera, V4l2Error, V4l2Request,
    VideoError, VideoFile, to_frame,
};
use crate::frame::{Frame, FrameError};

/// One captured image: decoded, or the camera's raw buffer for a GPU to
/// convert (the CPU conversion of a 1080p YUYV frame costs ~8 ms).
#[derive(Debug, Clone)]
pub enum Captured {
    /// A decoded frame (image files, MJPEG, or a converted buffer).
    Frame(Frame),
    /// A raw V4L2 buffer, checked against its layout.
    Raw {
        /// Its geometry.
        layout: BufferLayout,
        /// Its bytes, exactly the frame's.
        bytes: RawBytes,
        /// Names it in errors.
        origin: String,
    },
}

impl Captured {
    /// Width and height in pixels.
    pub fn size(&self) -> (usize, usize) {
        match self {
            Captured::Frame(frame) => (frame.width(), frame.height()),
            Captured::Raw { layout, .. } => (layout.width, layout.height),
        }
    }

    /// True for a capture buffer lent as it is (USERPTR), not a copy.
    pub fn is_lent(&self) -> bool {
        matches!(
            self,
            Captured::Raw {
                bytes: RawBytes::Leased(_),
                ..
            }
        )
    }

    /// The decoded frame, converting a raw buffer on the CPU.
    pub fn into_frame(self) -> Result<Frame, FrameError> {
        match self {
            Captured::Frame(frame) => Ok(frame),
            Captured::Raw {
                layout,
                bytes,
                origin,
            } => to_frame(&layout, &bytes, &origin),
        }
    }

    /// A raw buffer kept as it is, where `layout` is one a GPU converts
    /// (everything but MJPEG, which is decoded here); checked, so a short
    /// buffer is a broken frame now rather than later.
    pub fn raw(layout: BufferLayout, bytes: &[u8], origin: String) -> Result<Captured, FrameError> {
        if layout.format == CameraFormat::Mjpeg {
            return to_frame(&layout, bytes, &origin).map(Captured::Frame);
        }
        layout.check(bytes.len(), &origin)?;
        Ok(Captured::Raw {
            layout,
            bytes: RawBytes::Copied(bytes[..layout.needed()].to_vec()),
            origin,
        })
    }

    /// [`raw`](Self::raw) for a USERPTR buffer: the same checks, and the
    /// buffer itself instead of a copy (MJPEG is decoded, and the buffer
    /// given back at once).
    pub fn leased(
        layout: BufferLayout,
        lease: BufferLease,
        origin: String,
    ) -> Result<Captured, FrameError> {
        if layout.format == CameraFormat::Mjpeg {
            return to_frame(&layout, lease.bytes(), &origin).map(Captured::Frame);
        }
        layout.check(lease.bytes().len(), &origin)?;
        Ok(Captured::Raw {
            layout,
            bytes: RawBytes::Leased(lease.truncated(layout.needed())),
            origin,
        })
    }
}

/// What to open.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceSpec {
    /// A folder of images, or a glob pattern.
    Folder {
        /// The folder or pattern.
        path: PathBuf,
        /// Start over after the last file.
        looping: bool,
        /// Larger images are refused before they are decoded.
        max_pixels: u64,
    },
    /// A V4L2 device.
    V4l2 {
        /// `/dev/videoN`, or a stable `/dev/v4l/by-id` link.
        path: PathBuf,
        /// The format, size and rate to ask for.
        request: V4l2Request,
    },
    /// One photo as raw camera frames.
    Synthetic {
        /// The photo.
        path: PathBuf,
        /// The raw format to hand out.
        format: CameraFormat,
        /// Scaled to this, when set.
        size: Option<(usize, usize)>,
        /// Larger photos and sizes are refused.
        max_pixels: u64,
        /// Frames the photo shows before as many black ones, if it blinks.
        blink: Option<u32>,
    },
    /// An H.264 file: raw Annex B, or MP4.
    Video {
        /// The file.
        path: PathBuf,
        /// Start over at its end.
        looping: bool,
        /// Larger pictures are broken frames.
        max_pixels: u64,
    },
    /// An IP camera.
    Rtsp(RtspRequest),
}

/// An opened source.
pub enum Source {
    /// A replayed folder or glob of images.
    Folder(FolderSource),
    /// A V4L2 device.
    V4l2(Box<V4l2Camera>),
    /// A photo as raw camera frames.
    Synthetic(Box<SyntheticSource>),
    /// An H.264 file.
    Video(Box<VideoFile>),
    /// An IP camera.
    Rtsp(Box<RtspCamera>),
}

/// Why a source cannot go on: it is opened again, with back-off.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The image folder cannot be opened.
    #[error(transparent)]
    Folder(#[from] FolderError),
    /// The camera cannot be opened, or failed while streaming.
    #[error(transparent)]
    V4l2(#[from] V4l2Error),
    /// The synthetic camera's photo cannot be made into frames.
    #[error(transparent)]
    Synthetic(#[from] SyntheticError),
    /// The video file cannot be played.
    #[error(transparent)]
    Video(#[from] VideoError),
    /// The IP camera cannot be reached, refused us, or stopped streaming.
    #[error(transparent)]
    Rtsp(#[from] RtspError),
    /// A replay file vanished: the folder is listed again.
    #[error("{}: gone; listing the folder again", path.display())]
    Vanished {
        /// The file.
        path: PathBuf,
    },
    /// A whole pass of a replay folder was unreadable.
    #[error("all {in_a_row} files in a row were unreadable or broken; listing the folder again")]
    AllBroken {
        /// How many.
        in_a_row: usize,
    },
}

/// Why a source gave no frame.
#[derive(Debug)]
pub enum Miss {
    /// One bad frame: count, skip.
    Broken(FrameError),
    /// The source is gone: re-open.
    Lost(SourceError),
    /// A replay has played every file.
    Finished,
    /// No frame yet (an IP camera between frames): ask again. The source
    /// tells a stall from a pause itself, and answers [`Miss::Lost`].
    Idle,
}

impl Source {
    /// Opens the source `spec` names.
    pub fn open(spec: &SourceSpec) -> Result<Source, SourceError> {
        match spec {
            SourceSpec::Folder {
                path,
                looping,
                max_pixels,
            } => Ok(FolderSource::open(path, *looping)
                .map(|f| Source::Folder(f.with_max_pixels(*max_pixels)))?),
            SourceSpec::V4l2 { path, request } => {
                Ok(V4l2Camera::open(path, request).map(|c| Source::V4l2(Box::new(c)))?)
            }
            SourceSpec::Synthetic {
                path,
                format,
                size,
                max_pixels,
                blink,
            } => Ok(SyntheticSource::open(path, *format, *size, *max_pixels)
                .map(|s| Source::Synthetic(Box::new(s.blinking(*blink))))?),
            SourceSpec::Video {
                path,
                looping,
                max_pixels,
            } => {
                Ok(VideoFile::open(path, *looping, *max_pixels)
                    .map(|v| Source::Video(Box::new(v)))?)
            }
            SourceSpec::Rtsp(request) => {
                Ok(RtspCamera::open(request).map(|c| Source::Rtsp(Box::new(c)))?)
            }
        }
    }

    /// True for replays of image files, which show each image `repeat`
    /// times and may wait for the detector.
    pub fn is_replay(&self) -> bool {
        matches!(self, Source::Folder(_))
    }

    /// True for sources paced by the clock rather than a driver or a
    /// network: replays, video files and synthetic cameras.
    pub fn paced_by_clock(&self) -> bool {
        matches!(
            self,
            Source::Folder(_) | Source::Synthetic(_) | Source::Video(_)
        )
    }

    /// The rate a source runs at when the config sets none: a synthetic
    /// camera's 30 fps, as a live camera's driver would set one, and a
    /// video file's own.
    pub fn default_fps(&self) -> Option<f64> {
        match self {
            Source::Synthetic(_) => Some(30.0),
            Source::Video(video) => Some(video.frame_rate()),
            _ => None,
        }
    }

    /// After a broken frame, the `in_a_row`th without a good one between:
    /// why to give the source up and open it again, if it should be. A
    /// replay folder reads its files without waiting, so one whose files
    /// are gone or all broken would otherwise spin a core for good; opening
    /// it again lists the folder anew, with the caller's back-off. A live
    /// camera waits on its driver for each frame, so it carries on.
    pub fn give_up_after_broken(&self, in_a_row: usize, error: &FrameError) -> Option<SourceError> {
        let Source::Folder(folder) = self else {
            return None;
        };
        if let FrameError::Read { path, source } = error
            && source.kind() == std::io::ErrorKind::NotFound
        {
            return Some(SourceError::Vanished { path: path.clone() });
        }
        (in_a_row >= folder.files().len()).then_some(SourceError::AllBroken { in_a_row })
    }

    /// The next frame (blocking on a live camera).
    pub fn next_frame(&mut self) -> Result<Frame, Miss> {
        self.next_capture(false)
            .and_then(|c| c.into_frame().map_err(Miss::Broken))
    }

    /// The next image; with `raw`, a live camera's buffer as it came
    /// (image files are always decoded).
    pub fn next_capture(&mut self, raw: bool) -> Result<Captured, Miss> {
        match self {
            Source::Folder(folder) => match folder.next_frame() {
                None => Err(Miss::Finished),
                Some((_, frame)) => frame.map(Captured::Frame).map_err(Miss::Broken),
            },
            Source::V4l2(camera) => camera.next_capture(raw).map_err(|e| match e {
                V4l2Error::Broken(e) => Miss::Broken(e),
                other => Miss::Lost(other.into()),
            }),
            Source::Synthetic(camera) => camera.next_capture(raw).map_err(Miss::Broken),
            // Decoded pictures stay NV12 buffers whether or not `raw` is
            // asked for: converting is left to the detector, for the
            // frames it takes.
            Source::Video(video) => video.next_capture(),
            Source::Rtsp(camera) => camera.next_capture(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capture::encode;
    use crate::frame::PixelFormat;

    /// Issue 17: a looping folder of broken files, or one removed under
    /// its camera, spun a core at 100% and was never listed again.
    #[test]
    fn a_folder_is_given_up_after_a_pass_of_broken_files_or_a_vanished_one_issue_17() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a.jpg", "b.png"] {
            std::fs::write(dir.path().join(name), b"not an image").unwrap();
        }
        let source = Source::Folder(crate::capture::FolderSource::open(dir.path(), true).unwrap());
        let broken = Frame::decode(b"not an image", "a.jpg").unwrap_err();
        assert!(source.give_up_after_broken(1, &broken).is_none());
        let why = source.give_up_after_broken(2, &broken).unwrap();
        assert!(
            matches!(why, SourceError::AllBroken { in_a_row: 2 }),
            "{why}"
        );
        let gone = FrameError::Read {
            path: dir.path().join("a.jpg"),
            source: std::io::ErrorKind::NotFound.into(),
        };
        let why = source.give_up_after_broken(1, &gone).unwrap().to_string();
        assert!(
            why.ends_with("a.jpg: gone; listing the folder again"),
            "{why}"
        );
    }

    fn photo() -> Frame {
        let pixels: Vec<u8> = (0..64 * 48 * 3).map(|i| (i * 37 % 251) as u8).collect();
        Frame::from_packed(64, 48, PixelFormat::Rgb8, pixels, "test").unwrap()
    }

    #[test]
    fn a_raw_capture_keeps_the_buffer_and_converts_as_the_camera_thread_would() {
        for format in [CameraFormat::Yuyv, CameraFormat::Nv12, CameraFormat::Grey] {
            let (layout, mut bytes) = encode(&photo(), format, 8).unwrap();
            let want = to_frame(&layout, &bytes, "want").unwrap();
            // Drivers may report more bytes than the frame needs.
            bytes.extend_from_slice(&[0; 16]);
            let raw = Captured::raw(layout, &bytes, "cam frame 1".into()).unwrap();
            assert_eq!(raw.size(), (64, 48));
            let Captured::Raw { bytes: kept, .. } = &raw else {
                panic!("{format:?} was not kept raw");
            };
            assert_eq!(kept.len(), layout.needed(), "{format:?}");
            assert!(!raw.is_lent());
            assert_eq!(raw.into_frame().unwrap().data(), want.data(), "{format:?}");
        }
    }

    #[test]
    fn a_lent_buffer_converts_like_a_copy_and_a_clone_of_it_is_a_copy() {
        use crate::capture::{BufferLease, CaptureBuffer};
        use std::sync::Arc;

        let (layout, bytes) = encode(&photo(), CameraFormat::Yuyv, 4).unwrap();
        let mut buffer = CaptureBuffer::new(bytes.len() + 100).unwrap();
        buffer.as_mut_slice()[..bytes.len()].copy_from_slice(&bytes);
        let (give_back, returned) = std::sync::mpsc::channel();
        let lease = BufferLease::lend(Arc::new(buffer), 1, bytes.len() + 100, give_back);
        let lent = Captured::leased(layout, lease, "cam frame 2".into()).unwrap();
        assert!(lent.is_lent());
        let copy = lent.clone();
        assert!(!copy.is_lent());
        let want = to_frame(&layout, &bytes, "want").unwrap();
        assert_eq!(lent.into_frame().unwrap().data(), want.data());
        assert_eq!(
            returned.try_recv(),
            Ok(1),
            "converting gave the buffer back"
        );
        assert_eq!(copy.into_frame().unwrap().data(), want.data());
    }

    #[test]
    fn a_short_raw_buffer_is_a_broken_frame_and_mjpeg_is_decoded_at_once() {
        let (layout, bytes) = encode(&photo(), CameraFormat::Yuyv, 0).unwrap();
        let err = Captured::raw(layout, &bytes[..bytes.len() / 2], "cam frame 7".into())
            .unwrap_err()
            .to_string();
        assert!(err.contains("cam frame 7"), "{err}");
        let jpeg = photo().to_jpeg(90).unwrap();
        let layout = BufferLayout {
            format: CameraFormat::Mjpeg,
            width: 64,
            height: 48,
            bytes_per_line: 0,
        };
        assert!(matches!(
            Captured::raw(layout, &jpeg, "cam frame 8".into()).unwrap(),
            Captured::Frame(_)
        ));
    }
}
