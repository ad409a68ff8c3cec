//! A synthetic camera: one photo, decoded and scaled once at open, then
//! handed out as the raw frames a V4L2 camera would give (YUYV, UYVY,
//! NV12, GREY, RGB24, BGR24), at a set rate. Benchmarks measure the
//! detector with it, not JPEG decoding. A GPU detector takes the frames
//! raw, lent from a small ring of capture buffers filled once, so no frame
//! is copied on the host; a CPU detector gets each converted, as from an
//! mmap camera.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, channel};

use super::{BufferLayout, BufferLease, CameraFormat, CaptureBuffer, Captured, encode, to_frame};
use crate::frame::{Frame, FrameError, PixelFormat};

/// Leases in the ring: one waiting on the board, two with the detector
/// (on a GPU, one batch runs while the next uploads), one spare. All of
/// one buffer (and a black one when it blinks): the pictures never
/// change.
const RING: usize = 4;

/// A photo to be scaled may have this many pixels whatever the camera's
/// budget: a folder camera's default (8 Mi, a 4K frame).
const PHOTO_PIXELS: u64 = 8 << 20;

/// Why a synthetic camera cannot open.
#[derive(Debug, thiserror::Error)]
pub enum SyntheticError {
    /// The photo does not decode, or is over the frame budget.
    #[error("synthetic source: {0}")]
    Picture(#[source] FrameError),
    /// MJPEG is compressed, not a raw format.
    #[error(
        "synthetic source: {format:?} is not a raw format (yuyv, uyvy, nv12, grey, rgb24, bgr24)"
    )]
    NotRaw {
        /// The format asked for.
        format: CameraFormat,
    },
    /// The capture buffers cannot be mapped.
    #[error("synthetic source: cannot map a {len}-byte capture buffer: {source}")]
    Buffer {
        /// Its size.
        len: usize,
        /// The OS error.
        source: std::io::Error,
    },
}

/// An opened synthetic camera.
pub struct SyntheticSource {
    path: PathBuf,
    layout: BufferLayout,
    ring: Vec<Arc<CaptureBuffer>>,
    /// With [`blinking`](Self::blinking): a black frame of the same
    /// layout, and how many frames each of it and the photo shows.
    dark: Option<(Arc<CaptureBuffer>, u32)>,
    free: Receiver<usize>,
    give_back: Sender<usize>,
    sequence: u64,
}

impl std::fmt::Debug for SyntheticSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SyntheticSource")
            .field("path", &self.path)
            .field("layout", &self.layout)
            .finish()
    }
}

impl SyntheticSource {
    /// Decodes `path` (refused past `max_pixels`), scales it to `size`
    /// when given, and fills the ring with it in `format`.
    pub fn open(
        path: &Path,
        format: CameraFormat,
        size: Option<(usize, usize)>,
        max_pixels: u64,
    ) -> Result<SyntheticSource, SyntheticError> {
        if format == CameraFormat::Mjpeg {
            return Err(SyntheticError::NotRaw { format });
        }
        // The photo is decoded once and scaled: it may be larger than the
        // camera's frames, up to a folder camera's budget.
        let decode_budget = if size.is_some() {
            max_pixels.max(PHOTO_PIXELS)
        } else {
            max_pixels
        };
        let photo =
            Frame::from_file_within(path, decode_budget).map_err(SyntheticError::Picture)?;
        let frame = match size {
            Some(size) if size != (photo.width(), photo.height()) => {
                let pixels = (size.0 as u64).saturating_mul(size.1 as u64);
                if pixels > max_pixels {
                    return Err(SyntheticError::Picture(FrameError::Geometry {
                        origin: path.display().to_string(),
                        reason: format!(
                            "{}x{} is over the camera's {max_pixels}-pixel budget",
                            size.0, size.1
                        ),
                    }));
                }
                scaled(&photo, size)
            }
            _ => photo,
        };
        let (layout, bytes) = encode(&frame, format, 0).map_err(SyntheticError::Picture)?;
        // One buffer, lent under RING indices: the picture never changes,
        // so the ring costs one copy, and a GPU pins it once.
        let mut buffer =
            CaptureBuffer::new(bytes.len()).map_err(|source| SyntheticError::Buffer {
                len: bytes.len(),
                source,
            })?;
        buffer.as_mut_slice().copy_from_slice(&bytes);
        let buffer = Arc::new(buffer);
        let ring = vec![buffer; RING];
        let (give_back, free) = channel();
        for index in 0..RING {
            // The receiver is alive: it is in `free`, below.
            let _ = give_back.send(index);
        }
        Ok(SyntheticSource {
            path: path.to_owned(),
            layout,
            ring,
            dark: None,
            free,
            give_back,
            sequence: 0,
        })
    }

    /// The same camera, showing its photo for `frames` frames, then a
    /// black frame as many, over and over; `None`: the photo, always. A
    /// black frame that cannot be made (no memory) leaves the photo
    /// always, and says so.
    pub fn blinking(mut self, frames: Option<u32>) -> SyntheticSource {
        self.dark = frames.and_then(|frames| match black(self.layout) {
            Ok(buffer) => Some((Arc::new(buffer), frames.max(1))),
            Err(e) => {
                log::warn!(
                    "{}: no black frame, so no blinking: {e}",
                    self.path.display()
                );
                None
            }
        });
        self
    }

    /// The geometry of every frame.
    pub fn layout(&self) -> BufferLayout {
        self.layout
    }

    /// The next frame: with `raw`, a ring buffer lent as it is;
    /// otherwise converted on the CPU. When the detector holds every
    /// buffer, waits up to [`STARVED_AFTER`] for one, as a V4L2 camera
    /// waits for a queued buffer, then gives a broken frame.
    pub fn next_capture(&mut self, raw: bool) -> Result<Captured, FrameError> {
        self.sequence = self.sequence.wrapping_add(1);
        let origin = format!("{} frame {}", self.path.display(), self.sequence);
        let index = match self.free.try_recv() {
            Ok(index) => index,
            Err(_) => self
                .free
                .recv_timeout(STARVED_AFTER)
                .map_err(|_| FrameError::Geometry {
                    origin: origin.clone(),
                    reason: format!("all {RING} capture buffers are held by the detector"),
                })?,
        };
        let buffer = match &self.dark {
            Some((dark, frames)) if shows_black(self.sequence, *frames) => dark.clone(),
            _ => self.ring[index].clone(),
        };
        let lease = BufferLease::lend(buffer, index, self.layout.needed(), self.give_back.clone());
        if raw {
            Captured::leased(self.layout, lease, origin)
        } else {
            to_frame(&self.layout, lease.bytes(), &origin).map(Captured::Frame)
        }
    }
}

/// Whether frame `sequence` (from 1) of a camera blinking every `frames`
/// frames is black: frames 1 to `frames` show the photo, the next
/// `frames` are black, and so on.
fn shows_black(sequence: u64, frames: u32) -> bool {
    (sequence.saturating_sub(1) / u64::from(frames.max(1))) % 2 == 1
}

/// A capture buffer holding one black frame of `layout`, encoded as the
/// photo was.
fn black(layout: BufferLayout) -> Result<CaptureBuffer, String> {
    let pixels = layout.width.saturating_mul(layout.height);
    let frame = Frame::from_packed(
        layout.width,
        layout.height,
        PixelFormat::Rgb8,
        vec![0; pixels.saturating_mul(3)],
        "black",
    )
    .map_err(|e| e.to_string())?;
    let (_, bytes) = encode(&frame, layout.format, 0).map_err(|e| e.to_string())?;
    let mut buffer = CaptureBuffer::new(bytes.len()).map_err(|e| e.to_string())?;
    buffer.as_mut_slice().copy_from_slice(&bytes);
    Ok(buffer)
}

/// How long a frame waits for a capture buffer to come back.
pub const STARVED_AFTER: std::time::Duration = std::time::Duration::from_secs(1);

/// `frame` scaled to `size` (Triangle filter), as RGB.
fn scaled(frame: &Frame, (width, height): (usize, usize)) -> Frame {
    let rgb: Vec<u8> = match frame.format() {
        PixelFormat::Rgb8 => frame.data().to_vec(),
        PixelFormat::Bgr8 => frame
            .data()
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect(),
        PixelFormat::Gray8 => frame.data().iter().flat_map(|&g| [g, g, g]).collect(),
    };
    let side = |v: usize| u32::try_from(v).unwrap_or(u32::MAX);
    let picture = image::RgbImage::from_raw(side(frame.width()), side(frame.height()), rgb)
        .unwrap_or_else(|| image::RgbImage::new(1, 1));
    let picture = image::imageops::resize(
        &picture,
        side(width),
        side(height),
        image::imageops::FilterType::Triangle,
    );
    let (w, h) = (picture.width() as usize, picture.height() as usize);
    Frame::from_packed(w, h, PixelFormat::Rgb8, picture.into_raw(), "synthetic")
        .unwrap_or_else(|_| frame.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn photo(dir: &Path) -> PathBuf {
        let path = dir.join("photo.png");
        let picture = image::RgbImage::from_fn(64, 48, |x, y| {
            image::Rgb([(x * 4) as u8, (y * 5) as u8, ((x + y) * 2) as u8])
        });
        picture.save(&path).unwrap();
        path
    }

    /// The frames are the photo in the asked format and size: raw and
    /// lent (no copy) from the ring, a broken frame when the detector
    /// holds every buffer; converted for the CPU.
    #[test]
    fn hands_out_the_photo_raw_lent_from_its_ring_or_converted() {
        let dir = tempfile::tempdir().unwrap();
        let path = photo(dir.path());
        let mut source =
            SyntheticSource::open(&path, CameraFormat::Yuyv, Some((128, 96)), 1 << 20).unwrap();
        let layout = source.layout();
        assert_eq!(
            (layout.width, layout.height, layout.format),
            (128, 96, CameraFormat::Yuyv)
        );
        let held: Vec<Captured> = (0..RING)
            .map(|_| source.next_capture(true).unwrap())
            .collect();
        assert!(held.iter().all(Captured::is_lent));
        let starved = source.next_capture(true).unwrap_err().to_string();
        assert!(starved.contains("held by the detector"), "{starved}");
        let frame = held[0].clone().into_frame().unwrap();
        assert_eq!((frame.width(), frame.height()), (128, 96));
        drop(held);
        assert!(
            source.next_capture(true).unwrap().is_lent(),
            "buffers came back"
        );
        let converted = source.next_capture(false).unwrap().into_frame().unwrap();
        assert_eq!(converted.data(), frame.data());
        // A photo larger than the frames, scaled down within their budget.
        let down =
            SyntheticSource::open(&path, CameraFormat::Grey, Some((32, 24)), 32 * 24).unwrap();
        assert_eq!((down.layout().width, down.layout().height), (32, 24));
        // Unscaled: the photo's own size.
        let same = SyntheticSource::open(&path, CameraFormat::Nv12, None, 1 << 20).unwrap();
        assert_eq!((same.layout().width, same.layout().height), (64, 48));
    }

    /// Issue 21: a blinking camera shows its photo for `blink` frames,
    /// then as many black frames, in every raw format.
    #[test]
    fn a_blinking_camera_alternates_its_photo_with_black_frames_issue_21() {
        assert_eq!(
            (1..=9).map(|n| shows_black(n, 2)).collect::<Vec<_>>(),
            [false, false, true, true, false, false, true, true, false]
        );
        assert!(!shows_black(0, 0) && !shows_black(1, 1) && shows_black(2, 1));
        let dir = tempfile::tempdir().unwrap();
        let path = photo(dir.path());
        for format in CameraFormat::RAW {
            let mut source = SyntheticSource::open(&path, format, None, 1 << 20)
                .unwrap()
                .blinking(Some(2));
            let frames: Vec<Frame> = (0..5)
                .map(|_| source.next_capture(true).unwrap().into_frame().unwrap())
                .collect();
            let brightest = |f: &Frame| f.data().iter().copied().max().unwrap_or(0);
            assert!(brightest(&frames[0]) > 100, "{format:?}: the photo first");
            assert_eq!(frames[1].data(), frames[0].data(), "{format:?}");
            for dark in &frames[2..4] {
                assert_eq!(
                    (dark.width(), dark.height()),
                    (64, 48),
                    "{format:?}: black frames keep the size"
                );
                // GREY hands out luma as it is: video black is 16.
                assert!(brightest(dark) <= 16, "{format:?}: black");
            }
            assert_eq!(frames[4].data(), frames[0].data(), "{format:?}: back");
        }
    }

    #[test]
    fn refuses_mjpeg_a_size_over_budget_and_a_missing_photo() {
        let dir = tempfile::tempdir().unwrap();
        let path = photo(dir.path());
        let mjpeg = SyntheticSource::open(&path, CameraFormat::Mjpeg, None, 1 << 20);
        assert!(matches!(mjpeg, Err(SyntheticError::NotRaw { .. })));
        let big = SyntheticSource::open(&path, CameraFormat::Yuyv, Some((4096, 4096)), 1 << 20);
        assert!(big.unwrap_err().to_string().contains("budget"));
        let gone = SyntheticSource::open(
            &dir.path().join("no.png"),
            CameraFormat::Yuyv,
            None,
            1 << 20,
        );
        assert!(matches!(gone, Err(SyntheticError::Picture(_))));
    }
}
