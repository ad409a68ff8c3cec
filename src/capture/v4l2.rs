//! V4L2 capture: format negotiation (pure, tested on recorded capability
//! lists) and the thin device layer over [`super::videodev2`]: mmap
//! streaming, or USERPTR streaming into nanodetd's own buffers
//! ([`super::userptr`]) when a GPU takes raw buffers.
//! Frames are converted by [`to_frame`](super::to_frame); a device error
//! is returned as [`V4l2Error::Lost`] for the camera task to re-open.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::Captured;
use super::mmap::MmapStream;
use super::userptr::UserptrStream;
use super::videodev2::{FrameSize, VideoDevice, v4l2_fract};
use crate::frame::{Frame, FrameError};
use crate::pixels::{BufferLayout, CameraFormat, to_frame};

/// Buffers in the mmap ring: enough to ride out a slow frame, few enough
/// that the newest frame is never far behind.
const BUFFERS: u32 = 4;

/// Buffers in the USERPTR ring: two more, since up to four are out at
/// once (the camera thread's, the newest-frame slot's, and the detector's
/// two: on a GPU one batch runs while the next uploads).
const USERPTR_BUFFERS: u32 = 6;

/// A camera that stops sending without an error is as good as gone.
const FRAME_TIMEOUT: Duration = Duration::from_secs(5);

/// errno of an ioctl on a device whose driver has gone (Linux, every
/// architecture).
const ENODEV: i32 = 19;

/// errno of VIDIOC_REQBUFS for a memory type the driver lacks.
const EINVAL: i32 = 22;

/// With no size configured, the smallest size at least this wide is chosen:
/// NanoDet sees 320 to 416 pixels, so more only costs USB bandwidth and
/// conversion time.
const PREFERRED_MIN_WIDTH: u32 = 640;

/// Why a V4L2 camera failed.
#[derive(Debug, thiserror::Error)]
pub enum V4l2Error {
    /// The device cannot be opened or queried (missing, unplugged, busy).
    #[error("{path}: {what}: {source}")]
    Lost {
        /// The device node.
        path: PathBuf,
        /// What was being done.
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// The device offers nothing nanodetd can use, or not what was asked.
    #[error("{}: no usable format", path.display())]
    NoMatch {
        /// The device node.
        path: PathBuf,
        /// What is missing, with what the device offers.
        #[source]
        reason: NoMatch,
    },
    /// The driver set another format than the one negotiated.
    #[error("{}: asked for {asked:?}, the driver set {set}", path.display())]
    FormatRefused {
        /// The device node.
        path: PathBuf,
        /// The negotiated format.
        asked: CameraFormat,
        /// The driver's fourcc.
        set: String,
    },
    /// `io = "userptr"` on a driver that does not stream into user memory.
    #[error("{}: the driver does not stream into user memory (USERPTR); io = \"mmap\" or \"auto\" streams from its own buffers", path.display())]
    NoUserptr {
        /// The device node.
        path: PathBuf,
        /// VIDIOC_REQBUFS's error.
        source: io::Error,
    },
    /// The negotiated format is over the camera's frame budget.
    #[error("{}: {width}x{height} is over the camera's frame budget of {max_pixels} pixels; set size, or raise max_pixels", path.display())]
    OverBudget {
        /// The device node.
        path: PathBuf,
        /// The format's width.
        width: u32,
        /// Its height.
        height: u32,
        /// The budget.
        max_pixels: u64,
    },
    /// One frame was short or corrupt; the stream goes on.
    #[error(transparent)]
    Broken(#[from] FrameError),
}

/// The sizes a device offers for one format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SizeOffer {
    /// A list of sizes.
    Discrete(Vec<(u32, u32)>),
    /// Any size in a range (step ignored: drivers round).
    Range {
        /// Smallest (width, height).
        min: (u32, u32),
        /// Largest (width, height).
        max: (u32, u32),
    },
}

/// One pixel format a device offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FormatOffer {
    /// The format.
    pub format: CameraFormat,
    /// Its sizes.
    pub sizes: SizeOffer,
}

/// What to do when a device does not offer the configured format or size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum IfUnsupported {
    /// Stream what the device does offer, chosen as if unset, and say so.
    #[default]
    Negotiate,
    /// Fail, listing what the device offers (and keep retrying).
    Refuse,
}

/// How frames come out of the driver.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CaptureIo {
    /// USERPTR while the detector takes raw buffers on a GPU (no host
    /// copy), where the driver supports it; mmap otherwise.
    #[default]
    Auto,
    /// The driver's own buffers, copied out for a GPU.
    Mmap,
    /// nanodetd's buffers, page-locked for a GPU; an error where the
    /// driver lacks USERPTR.
    Userptr,
}

/// What the configuration asks of a camera; `None` lets nanodetd choose.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct V4l2Request {
    /// Pixel format.
    pub format: Option<CameraFormat>,
    /// Width and height.
    pub size: Option<(u32, u32)>,
    /// Frames per second.
    pub fps: Option<f32>,
    /// When `format` or `size` is not offered.
    pub if_unsupported: IfUnsupported,
    /// Streaming I/O.
    pub io: CaptureIo,
    /// The most pixels a frame may have (the camera's frame budget): a
    /// larger format is refused before it streams.
    pub max_pixels: u64,
}

impl Default for V4l2Request {
    fn default() -> Self {
        V4l2Request {
            format: None,
            size: None,
            fps: None,
            if_unsupported: IfUnsupported::default(),
            io: CaptureIo::default(),
            max_pixels: crate::frame::MAX_PIXELS,
        }
    }
}

/// The fourcc of each supported format.
fn fourcc(format: CameraFormat) -> [u8; 4] {
    *match format {
        CameraFormat::Mjpeg => b"MJPG",
        CameraFormat::Yuyv => b"YUYV",
        CameraFormat::Uyvy => b"UYVY",
        CameraFormat::Nv12 => b"NV12",
        CameraFormat::Grey => b"GREY",
        CameraFormat::Rgb24 => b"RGB3",
        CameraFormat::Bgr24 => b"BGR3",
    }
}

fn from_fourcc(code: [u8; 4]) -> Option<CameraFormat> {
    Some(match &code {
        b"MJPG" | b"JPEG" => CameraFormat::Mjpeg,
        b"YUYV" => CameraFormat::Yuyv,
        b"UYVY" => CameraFormat::Uyvy,
        b"NV12" => CameraFormat::Nv12,
        b"GREY" => CameraFormat::Grey,
        b"RGB3" => CameraFormat::Rgb24,
        b"BGR3" => CameraFormat::Bgr24,
        _ => return None,
    })
}

/// A fourcc as text, for logs.
fn fourcc_text(code: [u8; 4]) -> String {
    code.iter()
        .map(|&b| if b.is_ascii_graphic() { b as char } else { '?' })
        .collect()
}

/// Cheapest conversion first: YUYV and NV12 convert in one pass, MJPEG
/// needs a decode, packed RGB costs bandwidth, grey loses colour.
const FORMAT_PREFERENCE: [CameraFormat; 7] = [
    CameraFormat::Yuyv,
    CameraFormat::Uyvy,
    CameraFormat::Nv12,
    CameraFormat::Mjpeg,
    CameraFormat::Bgr24,
    CameraFormat::Rgb24,
    CameraFormat::Grey,
];

fn offers_size(sizes: &SizeOffer, (w, h): (u32, u32)) -> bool {
    match sizes {
        SizeOffer::Discrete(list) => list.contains(&(w, h)),
        SizeOffer::Range { min, max } => {
            (min.0..=max.0).contains(&w) && (min.1..=max.1).contains(&h)
        }
    }
}

/// The size nanodetd picks from an offer: the smallest at least
/// [`PREFERRED_MIN_WIDTH`] wide, else the largest.
fn preferred_size(sizes: &SizeOffer) -> Option<(u32, u32)> {
    let candidates: Vec<(u32, u32)> = match sizes {
        SizeOffer::Discrete(list) => list.clone(),
        SizeOffer::Range { min, max } => {
            let w = PREFERRED_MIN_WIDTH.clamp(min.0, max.0);
            let h = (w * 3 / 4).clamp(min.1, max.1);
            vec![(w, h)]
        }
    };
    let area = |&(w, h): &(u32, u32)| u64::from(w) * u64::from(h);
    candidates
        .iter()
        .filter(|s| s.0 >= PREFERRED_MIN_WIDTH)
        .min_by_key(|s| area(s))
        .or_else(|| candidates.iter().max_by_key(|s| area(s)))
        .copied()
}

/// No format and size the device offers matches what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct NoMatch {
    /// The format asked for.
    pub format: Option<CameraFormat>,
    /// The size asked for.
    pub size: Option<(u32, u32)>,
    /// What the device offers, in formats nanodetd converts.
    pub offered: Vec<FormatOffer>,
    /// Set when `if_unsupported = "refuse"` made this an error rather than
    /// a fallback.
    pub refused: bool,
}

impl std::fmt::Display for NoMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "no offered format matches format={:?} size={:?}; the device offers: ",
            self.format, self.size
        )?;
        if self.offered.is_empty() {
            f.write_str("nothing nanodetd can convert")?;
        }
        for (i, offer) in self.offered.iter().enumerate() {
            let separator = if i == 0 { "" } else { "; " };
            write!(f, "{separator}{:?} {:?}", offer.format, offer.sizes)?;
        }
        if self.refused {
            f.write_str(" (if_unsupported = \"refuse\")")?;
        }
        Ok(())
    }
}

/// Picks format and size from what a device offers. Asked-for values must
/// be offered; unset ones are chosen by [`FORMAT_PREFERENCE`] and
/// [`preferred_size`].
pub fn negotiate(
    offers: &[FormatOffer],
    request: &V4l2Request,
) -> Result<(CameraFormat, (u32, u32)), NoMatch> {
    let usable = |o: &&FormatOffer| {
        request.format.is_none_or(|f| f == o.format)
            && request.size.is_none_or(|s| offers_size(&o.sizes, s))
    };
    let mut matching: Vec<&FormatOffer> = offers.iter().filter(usable).collect();
    matching.sort_by_key(|o| FORMAT_PREFERENCE.iter().position(|f| *f == o.format));
    for offer in matching {
        if let Some(size) = request.size.or_else(|| preferred_size(&offer.sizes)) {
            return Ok((offer.format, size));
        }
    }
    Err(NoMatch {
        format: request.format,
        size: request.size,
        offered: offers.to_vec(),
        refused: false,
    })
}

/// [`negotiate`] under the request's [`IfUnsupported`] policy: when the
/// asked format or size is not offered, `Negotiate` drops the format
/// first (a camera's sizes matter more to zones and masks), then both,
/// and returns the warning to log beside the choice.
pub fn negotiate_or_fall_back(
    offers: &[FormatOffer],
    request: &V4l2Request,
) -> Result<Negotiated, NoMatch> {
    let refusal = match negotiate(offers, request) {
        Ok((format, size)) => {
            return Ok(Negotiated {
                format,
                size,
                warning: None,
            });
        }
        Err(refusal) => refusal,
    };
    if request.if_unsupported == IfUnsupported::Refuse {
        return Err(NoMatch {
            refused: true,
            ..refusal
        });
    }
    let any_format = V4l2Request {
        format: None,
        ..*request
    };
    let anything = V4l2Request {
        size: None,
        ..any_format
    };
    let (format, size) =
        negotiate(offers, &any_format).or_else(|_| negotiate(offers, &anything))?;
    let warning = format!(
        "{refusal}; streaming {format:?} {}x{} instead (if_unsupported = \"refuse\" makes this an error)",
        size.0, size.1
    );
    Ok(Negotiated {
        format,
        size,
        warning: Some(warning),
    })
}

/// What [`negotiate_or_fall_back`] settled on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Negotiated {
    /// Pixel format.
    pub format: CameraFormat,
    /// Width and height.
    pub size: (u32, u32),
    /// Why it is not what was asked for, when it is not.
    pub warning: Option<String>,
}

/// The running stream, of either kind.
enum Streaming {
    Mmap(MmapStream),
    Userptr(UserptrStream),
}

/// A streaming V4L2 capture device.
pub struct V4l2Camera {
    path: PathBuf,
    // Declared before `device` so it is dropped first.
    stream: Option<Streaming>,
    device: Arc<VideoDevice>,
    layout: BufferLayout,
    /// The driver's image size, which USERPTR buffers must hold.
    image_size: usize,
    frame_rate: Option<f32>,
    sequence: u64,
    io: CaptureIo,
    /// Set once the driver refused USERPTR under `io = "auto"`.
    userptr_refused: bool,
}

impl V4l2Camera {
    /// Opens `path`, negotiates the format, and starts mmap streaming.
    /// Logs what the device is and offers.
    pub fn open(path: &Path, request: &V4l2Request) -> Result<V4l2Camera, V4l2Error> {
        let lost = |what| {
            let path = path.to_owned();
            move |source| V4l2Error::Lost { path, what, source }
        };
        let device = Arc::new(VideoDevice::open(path).map_err(lost("cannot open"))?);
        let caps = device.query_caps().map_err(lost("VIDIOC_QUERYCAP"))?;
        log::info!(
            "{}: {} ({}, driver {} {}.{}.{}), capabilities {:#010x}",
            path.display(),
            caps.card,
            caps.bus,
            caps.driver,
            caps.version.0,
            caps.version.1,
            caps.version.2,
            caps.capabilities
        );
        let mut offers = Vec::new();
        for description in device.enum_formats().map_err(lost("VIDIOC_ENUM_FMT"))? {
            let sizes = device
                .enum_framesizes(description.fourcc)
                .map_err(lost("VIDIOC_ENUM_FRAMESIZES"))?;
            log::info!(
                "{}: offers {} ({}) at {}",
                path.display(),
                fourcc_text(description.fourcc),
                description.description,
                sizes
                    .iter()
                    .map(FrameSize::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let Some(format) = from_fourcc(description.fourcc) else {
                continue;
            };
            offers.push(FormatOffer {
                format,
                sizes: size_offer(sizes),
            });
        }
        let Negotiated {
            format,
            size: (width, height),
            warning,
        } = negotiate_or_fall_back(&offers, request).map_err(|reason| V4l2Error::NoMatch {
            path: path.to_owned(),
            reason,
        })?;
        if let Some(warning) = warning {
            log::warn!("{}: {warning}", path.display());
        }

        let mut wanted = device.format().map_err(lost("VIDIOC_G_FMT"))?.pix();
        wanted.width = width;
        wanted.height = height;
        wanted.pixelformat = u32::from_le_bytes(fourcc(format));
        // G_FMT returned the previous format's row pitch and image size;
        // passed on, a driver may honour them as padding (vivid does).
        // Zero lets it choose for the new format.
        wanted.bytesperline = 0;
        wanted.sizeimage = 0;
        let actual = device.set_format(wanted).map_err(lost("VIDIOC_S_FMT"))?;
        let actual_fourcc = actual.pixelformat.to_le_bytes();
        if from_fourcc(actual_fourcc) != Some(format) {
            return Err(V4l2Error::FormatRefused {
                path: path.to_owned(),
                asked: format,
                set: fourcc_text(actual_fourcc),
            });
        }
        if let Some(fps) = request.fps {
            // V4L2 takes a frame interval; millisecond resolution covers
            // fractional rates such as 7.5 fps.
            let interval = v4l2_fract {
                numerator: 1000,
                denominator: (fps * 1000.0).round() as u32,
            };
            match device.set_interval(interval) {
                Ok(i) => log::info!(
                    "{}: frame interval {}/{}",
                    path.display(),
                    i.numerator,
                    i.denominator
                ),
                Err(e) => log::warn!("{}: cannot set {fps} fps: {e}", path.display()),
            }
        }
        let pixels = u64::from(actual.width) * u64::from(actual.height);
        if pixels > request.max_pixels {
            return Err(V4l2Error::OverBudget {
                path: path.to_owned(),
                width: actual.width,
                height: actual.height,
                max_pixels: request.max_pixels,
            });
        }
        let layout = BufferLayout {
            format,
            width: actual.width as usize,
            height: actual.height as usize,
            bytes_per_line: (actual.bytesperline as usize).max(1),
        };
        // Drivers without VIDIOC_G_PARM (or a zero interval) leave the rate
        // unknown; it is only reported.
        let frame_rate = device
            .params()
            .ok()
            .map(|p| p.timeperframe)
            .filter(|i| i.numerator > 0 && i.denominator > 0)
            .map(|i| i.denominator as f32 / i.numerator as f32);
        log::info!(
            "{}: streaming {:?} {}x{}, {} bytes per line, {} fps",
            path.display(),
            format,
            layout.width,
            layout.height,
            layout.bytes_per_line,
            frame_rate.map_or_else(|| "unknown".to_owned(), |r| format!("{r:.2}"))
        );
        let mut camera = V4l2Camera {
            path: path.to_owned(),
            stream: None,
            device,
            layout,
            image_size: (actual.sizeimage as usize).max(layout.needed()),
            frame_rate,
            sequence: 0,
            io: request.io,
            userptr_refused: false,
        };
        camera.start_streaming(request.io == CaptureIo::Userptr)?;
        Ok(camera)
    }

    /// Starts USERPTR or mmap streaming. Under `io = "auto"` a device on
    /// which USERPTR fails gets mmap, for as long as it stays open, with
    /// a warning.
    fn start_streaming(&mut self, userptr: bool) -> Result<(), V4l2Error> {
        let path = self.path.display();
        if userptr && !self.userptr_refused {
            match UserptrStream::start(
                &self.device,
                USERPTR_BUFFERS,
                self.image_size,
                FRAME_TIMEOUT,
            ) {
                Ok(stream) => {
                    log::info!(
                        "{path}: USERPTR streaming into {} buffers of {} bytes",
                        stream.buffer_count(),
                        self.image_size
                    );
                    self.stream = Some(Streaming::Userptr(stream));
                    return Ok(());
                }
                Err(("VIDIOC_REQBUFS", e))
                    if e.raw_os_error() == Some(EINVAL) && self.io == CaptureIo::Userptr =>
                {
                    return Err(V4l2Error::NoUserptr {
                        path: self.path.clone(),
                        source: e,
                    });
                }
                // Under auto, whatever USERPTR trips on (no support, or a
                // driver that takes only memory of its own kind and fails
                // QBUF) leaves mmap, which this device streams; only a
                // device that went is lost.
                Err((what, e))
                    if self.io == CaptureIo::Auto && e.raw_os_error() != Some(ENODEV) =>
                {
                    log::warn!(
                        "{path}: USERPTR streaming failed ({what}: {e}); raw frames are copied out of mmap buffers instead"
                    );
                    self.userptr_refused = true;
                }
                Err((what, source)) => {
                    return Err(V4l2Error::Lost {
                        path: self.path.clone(),
                        what,
                        source,
                    });
                }
            }
        }
        let stream =
            MmapStream::start(&self.device, BUFFERS, FRAME_TIMEOUT).map_err(|(what, source)| {
                V4l2Error::Lost {
                    path: self.path.clone(),
                    what,
                    source,
                }
            })?;
        self.stream = Some(Streaming::Mmap(stream));
        Ok(())
    }

    /// How the camera streams now: "userptr" or "mmap".
    pub fn io(&self) -> &'static str {
        match self.stream {
            Some(Streaming::Userptr(_)) => "userptr",
            _ => "mmap",
        }
    }

    /// The negotiated format and geometry.
    pub fn layout(&self) -> BufferLayout {
        self.layout
    }

    /// The frame rate the driver settled on, when it says.
    pub fn frame_rate(&self) -> Option<f32> {
        self.frame_rate
    }

    /// The next frame. [`V4l2Error::Broken`] is one bad frame; anything
    /// else means the device must be re-opened.
    pub fn next_frame(&mut self) -> Result<Frame, V4l2Error> {
        self.next_capture(false)?
            .into_frame()
            .map_err(V4l2Error::Broken)
    }

    /// The next image: with `raw`, the buffer as the driver filled it, for
    /// a GPU to convert: lent as it is when streaming USERPTR, else one
    /// copy out of the mmap ring. Under `io = "auto"` the stream follows
    /// `raw`: USERPTR while raw buffers are wanted.
    pub fn next_capture(&mut self, raw: bool) -> Result<Captured, V4l2Error> {
        let userptr_now = matches!(self.stream, Some(Streaming::Userptr(_)));
        if self.io == CaptureIo::Auto && !self.userptr_refused && raw != userptr_now {
            self.stop_streaming();
            self.start_streaming(raw)?;
        }
        let captured = match self.stream.as_mut() {
            None => {
                return Err(self.gone("stream already failed", io::ErrorKind::NotConnected.into()));
            }
            Some(Streaming::Mmap(stream)) => match stream.next() {
                Err((what, source)) => return Err(self.gone(what, source)),
                Ok((bytes, sequence)) => {
                    let origin = format!("{} frame {sequence}", self.path.display());
                    if raw {
                        Captured::raw(self.layout, bytes, origin)
                    } else {
                        to_frame(&self.layout, bytes, &origin).map(Captured::Frame)
                    }
                }
            },
            Some(Streaming::Userptr(stream)) => match stream.next() {
                Err((what, source)) => return Err(self.gone(what, source)),
                Ok((lease, sequence)) => {
                    let origin = format!("{} frame {sequence}", self.path.display());
                    if raw {
                        Captured::leased(self.layout, lease, origin)
                    } else {
                        // Converted straight from the buffer, given back
                        // when the lease drops here.
                        to_frame(&self.layout, lease.bytes(), &origin).map(Captured::Frame)
                    }
                }
            },
        };
        self.sequence += 1;
        Ok(captured?)
    }

    fn gone(&mut self, what: &'static str, source: io::Error) -> V4l2Error {
        self.stop_streaming();
        V4l2Error::Lost {
            path: self.path.clone(),
            what,
            source,
        }
    }

    /// Stops either kind of stream. Both let go of the driver's buffers
    /// whatever STREAMOFF answers (ENODEV when the device went, EIO on
    /// some USB unplugs): a held buffer or descriptor pins the driver, and
    /// rmmod refuses.
    fn stop_streaming(&mut self) {
        let stopped = match self.stream.take() {
            None => Ok(()),
            Some(Streaming::Mmap(mut stream)) => stream.stop(),
            Some(Streaming::Userptr(mut stream)) => stream.stop(),
        };
        match stopped {
            Err(e) if e.raw_os_error() != Some(ENODEV) => {
                log::warn!("{}: stopping the stream: {e}", self.path.display());
            }
            _ => {}
        }
    }
}

impl Drop for V4l2Camera {
    fn drop(&mut self) {
        self.stop_streaming();
    }
}

fn size_offer(sizes: Vec<FrameSize>) -> SizeOffer {
    let mut discrete = Vec::new();
    for size in sizes {
        match size {
            FrameSize::Discrete(width, height) => discrete.push((width, height)),
            FrameSize::Range { min, max } => return SizeOffer::Range { min, max },
        }
    }
    SizeOffer::Discrete(discrete)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a Logitech C920 reports (v4l2-ctl --list-formats-ext), trimmed.
    fn c920() -> Vec<FormatOffer> {
        vec![
            FormatOffer {
                format: CameraFormat::Yuyv,
                sizes: SizeOffer::Discrete(vec![(640, 480), (160, 90), (1920, 1080), (800, 600)]),
            },
            FormatOffer {
                format: CameraFormat::Mjpeg,
                sizes: SizeOffer::Discrete(vec![(640, 480), (1280, 720), (1920, 1080)]),
            },
        ]
    }

    #[test]
    fn unset_values_pick_a_cheap_format_at_a_modest_size() {
        assert_eq!(
            negotiate(&c920(), &V4l2Request::default()),
            Ok((CameraFormat::Yuyv, (640, 480)))
        );
    }

    #[test]
    fn asked_values_are_honoured_or_refused_with_the_offer() {
        let mjpeg_720 = V4l2Request {
            format: Some(CameraFormat::Mjpeg),
            size: Some((1280, 720)),
            ..V4l2Request::default()
        };
        assert_eq!(
            negotiate(&c920(), &mjpeg_720),
            Ok((CameraFormat::Mjpeg, (1280, 720)))
        );
        // 1280x720 only in MJPEG: the format follows the size.
        let size_only = V4l2Request {
            size: Some((1280, 720)),
            ..V4l2Request::default()
        };
        assert_eq!(
            negotiate(&c920(), &size_only).unwrap().0,
            CameraFormat::Mjpeg
        );
        let nv12 = V4l2Request {
            format: Some(CameraFormat::Nv12),
            ..V4l2Request::default()
        };
        let err = negotiate(&c920(), &nv12).unwrap_err().to_string();
        assert!(err.contains("the device offers: Yuyv"), "{err}");
        assert!(
            negotiate(&[], &V4l2Request::default())
                .unwrap_err()
                .to_string()
                .contains("nothing nanodetd can convert")
        );
    }

    #[test]
    fn an_unoffered_format_is_negotiated_away_or_refused_as_configured() {
        let mjpeg = V4l2Request {
            format: Some(CameraFormat::Mjpeg),
            size: Some((640, 480)),
            ..V4l2Request::default()
        };
        let yuyv_only = &c920()[..1];
        let chosen = negotiate_or_fall_back(yuyv_only, &mjpeg).unwrap();
        assert_eq!(
            (chosen.format, chosen.size),
            (CameraFormat::Yuyv, (640, 480))
        );
        let warning = chosen.warning.unwrap();
        assert!(
            warning.contains("format=Some(Mjpeg)") && warning.contains("streaming Yuyv 640x480"),
            "{warning}"
        );
        // A size nothing offers goes too, as a last resort.
        let odd = V4l2Request {
            size: Some((333, 222)),
            ..mjpeg
        };
        let chosen = negotiate_or_fall_back(yuyv_only, &odd).unwrap();
        assert_eq!(
            (chosen.format, chosen.size),
            (CameraFormat::Yuyv, (640, 480))
        );
        let refuse = V4l2Request {
            if_unsupported: IfUnsupported::Refuse,
            ..mjpeg
        };
        let err = negotiate_or_fall_back(yuyv_only, &refuse)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("the device offers: Yuyv")
                && err.ends_with("(if_unsupported = \"refuse\")"),
            "{err}"
        );
        // What is offered is taken without a word.
        assert_eq!(
            negotiate_or_fall_back(&c920(), &mjpeg).unwrap().warning,
            None
        );
    }

    #[test]
    fn stepwise_sizes_and_fourcc_names() {
        let vivid_like = [FormatOffer {
            format: CameraFormat::Nv12,
            sizes: SizeOffer::Range {
                min: (16, 16),
                max: (4096, 2160),
            },
        }];
        assert_eq!(
            negotiate(&vivid_like, &V4l2Request::default()),
            Ok((CameraFormat::Nv12, (640, 480)))
        );
        for f in FORMAT_PREFERENCE {
            assert_eq!(from_fourcc(fourcc(f)), Some(f));
        }
        assert_eq!(from_fourcc(*b"YVYU"), None);
        assert_eq!(fourcc_text(*b"YU\x001"), "YU?1");
    }

    #[test]
    fn a_missing_device_is_lost_not_a_panic() {
        let err = V4l2Camera::open(
            Path::new("/dev/video-nanodetd-test"),
            &V4l2Request::default(),
        )
        .err()
        .unwrap();
        assert!(matches!(err, V4l2Error::Lost { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("/dev/video-nanodetd-test: cannot open")
        );
    }
}
