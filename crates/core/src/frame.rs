//! `Frame`: one packed 8-bit image, the unit every source hands to the
//! detector, and decoding of still-image files (JPEG, PNG) into it.
//!
//! Frames are tightly packed (row stride = width × channels). Whatever the
//! file holds (16-bit samples, alpha, palette) is reduced here, once, so the
//! preprocessing code only ever sees BGR, RGB or GRAY bytes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use image::{DynamicImage, ImageReader};

/// Channel layout of a frame's packed 8-bit pixels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// Three bytes per pixel: blue, green, red (what V4L2 converters emit).
    Bgr8,
    /// Three bytes per pixel: red, green, blue (what image files decode to).
    Rgb8,
    /// One byte per pixel.
    Gray8,
}

impl PixelFormat {
    /// Bytes per pixel.
    pub fn channels(self) -> usize {
        match self {
            PixelFormat::Bgr8 | PixelFormat::Rgb8 => 3,
            PixelFormat::Gray8 => 1,
        }
    }
}

/// A packed 8-bit image. Clones share the pixels: a replay shows one
/// decoded photo many times, and copying megabytes per showing churned
/// glibc's arenas (the soak run's RSS kept growing for 10 minutes).
#[derive(Debug, Clone)]
pub struct Frame {
    width: usize,
    height: usize,
    format: PixelFormat,
    data: Arc<Pixels>,
}

/// Image files, and the frames decoded from them, of at least this many
/// bytes get a memory mapping of their own: glibc's default mmap
/// threshold, which glibc itself raises as soon as a mapped block is
/// freed (to 32 MiB at most), after which every frame would come from its
/// arenas.
const MAPPED_FROM: usize = 128 * 1024;

/// Where a buffer is allocated.
#[derive(Clone, Copy)]
enum Place {
    /// malloc's heap: a camera's stream, whose frames are all one size,
    /// which malloc hands out again frame after frame. Fresh mappings
    /// would cost every frame their page faults: a 1280x720 JPEG file
    /// took 3.04 ms to a frame with the file and the frame in mappings,
    /// where the image crate read and decoded it onto the heap in 2.01 ms
    /// (`benches/pipeline.rs`, docs/PERFORMANCE.md).
    Heap,
    /// A mapping of its own from [`MAPPED_FROM`] bytes: photos, a
    /// different size each.
    OwnMapping,
}

/// Where a frame's bytes (or a file's) live.
///
/// Photos decoded from a folder are 0.1 to tens of MB, of a different
/// size with each photo, and are allocated by up to one capture thread per
/// camera. From malloc's arenas they fragmented them: in the soak run the
/// resident set grew by 6 MiB in 25 minutes while the heap in use stayed
/// flat. A mapping of its own goes back to the system, whole, when its
/// last holder drops it.
enum Pixels {
    /// Buffers under [`MAPPED_FROM`], frames decoded from memory (a
    /// camera's MJPEG, an image a command was given) and frames built
    /// elsewhere (V4L2 converters, tests), whatever their size.
    Heap(Vec<u8>),
    /// An anonymous mapping, used for its first `len` bytes.
    Mapped { map: memmap2::MmapMut, len: usize },
}

/// Bytes of the maps [`Pixels::Mapped`] holds now, for the stats topic:
/// malloc's count of the heap in use does not see them.
static MAPPED_BYTES: AtomicUsize = AtomicUsize::new(0);

/// Bytes of image files and frames in memory maps of their own, alive now
/// (photos read from folders; see [`Frame::from_file_within`]).
pub fn mapped_bytes() -> usize {
    MAPPED_BYTES.load(Ordering::Relaxed)
}

impl Drop for Pixels {
    fn drop(&mut self) {
        if let Pixels::Mapped { map, .. } = self {
            MAPPED_BYTES.fetch_sub(map.len(), Ordering::Relaxed);
        }
    }
}

impl Pixels {
    /// Whether `len` bytes at `place` get a mapping of their own.
    fn maps(len: usize, place: Place) -> bool {
        matches!(place, Place::OwnMapping) && len >= MAPPED_FROM
    }

    /// `len` zero bytes, allocated at `place`.
    fn zeroed(len: usize, place: Place) -> std::io::Result<Pixels> {
        if !Pixels::maps(len, place) {
            return Ok(Pixels::Heap(vec![0; len]));
        }
        let map = memmap2::MmapMut::map_anon(len)?;
        MAPPED_BYTES.fetch_add(map.len(), Ordering::Relaxed);
        Ok(Pixels::Mapped { map, len })
    }

    /// `bytes`, moved to a mapping where `place` asks for one, else kept.
    fn from_vec(bytes: Vec<u8>, place: Place) -> std::io::Result<Pixels> {
        if !Pixels::maps(bytes.len(), place) {
            return Ok(Pixels::Heap(bytes));
        }
        let mut pixels = Pixels::zeroed(bytes.len(), place)?;
        pixels.copy_from_slice(&bytes);
        Ok(pixels)
    }

    /// The first `len` bytes only (a file that turned out shorter).
    fn truncate(&mut self, to: usize) {
        match self {
            Pixels::Heap(bytes) => bytes.truncate(to),
            Pixels::Mapped { len, .. } => *len = to.min(*len),
        }
    }
}

impl std::ops::Deref for Pixels {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Pixels::Heap(bytes) => bytes,
            Pixels::Mapped { map, len } => &map[..*len],
        }
    }
}

impl std::ops::DerefMut for Pixels {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            Pixels::Heap(bytes) => bytes,
            Pixels::Mapped { map, len } => &mut map[..*len],
        }
    }
}

impl std::fmt::Debug for Pixels {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let place = match self {
            Pixels::Heap(_) => "heap",
            Pixels::Mapped { .. } => "mapped",
        };
        write!(f, "{} bytes ({place})", self.len())
    }
}

/// Why a frame could not be built or decoded.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The file could not be read at all.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file or buffer holds no bytes.
    #[error("{origin}: empty file (0 bytes)")]
    Empty {
        /// File name or frame label.
        origin: String,
    },
    /// The bytes are not a supported, intact image.
    #[error("{origin}: cannot decode image: {reason}")]
    Decode {
        /// File name or frame label.
        origin: String,
        /// What the decoder said.
        reason: String,
    },
    /// The image is larger than its camera's pixel budget; refused before
    /// it is decoded.
    #[error("{origin}: {width}x{height} is over the frame budget of {max_pixels} pixels")]
    TooLarge {
        /// File name or frame label.
        origin: String,
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The budget.
        max_pixels: u64,
    },
    /// The file is larger than any image within the budget could be.
    #[error("{path}: {size} bytes is more than an image of at most {max_pixels} pixels takes")]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The budget.
        max_pixels: u64,
    },
    /// No memory could be mapped for the image's pixels.
    #[error("{origin}: cannot map {bytes} bytes for its pixels: {source}")]
    Memory {
        /// File name or frame label.
        origin: String,
        /// How many bytes.
        bytes: usize,
        /// The OS error.
        source: std::io::Error,
    },
    /// The image decoder panicked on these bytes (a decoder bug that a
    /// hostile or corrupt image reaches); contained, so only this image
    /// is lost.
    #[error("{origin}: the image decoder failed on it ({source})")]
    DecoderPanicked {
        /// File name or frame label.
        origin: String,
        /// The panic.
        #[source]
        source: crate::contain::ContainedPanic,
    },
    /// Width or height is zero, or the buffer does not match them.
    #[error("{origin}: bad frame geometry: {reason}")]
    Geometry {
        /// File name or frame label.
        origin: String,
        /// What does not add up.
        reason: String,
    },
}

/// The most pixels a frame may have where no smaller budget is set:
/// 16384 × 16384, the largest V4L2 size the config takes.
pub const MAX_PIXELS: u64 = 16_384 * 16_384;

/// The largest file that can hold an image of `max_pixels` pixels: 8 bytes
/// a pixel (16-bit RGBA stored uncompressed), plus 1 MiB for metadata.
fn max_file_bytes(max_pixels: u64) -> u64 {
    max_pixels.saturating_mul(8).saturating_add(1 << 20)
}

/// Whether a JPEG ends with its end-of-image marker (FF D9). UVC cameras
/// may pad a frame after the marker, with zeros or 0xFF fill bytes.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let tail = bytes.len().saturating_sub(4096);
    bytes[tail..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decodes `bytes` with the image crate, within `max_pixels`: width,
/// height, the packed format and its pixels.
fn decode_image(
    bytes: &[u8],
    origin: &str,
    max_pixels: u64,
    place: Place,
) -> Result<(usize, usize, PixelFormat, Pixels), FrameError> {
    use image::{ColorType, ImageDecoder};
    let decode_error = |e: image::ImageError| FrameError::Decode {
        origin: origin.to_owned(),
        reason: e.to_string(),
    };
    let reader = || {
        ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| FrameError::Decode {
                origin: origin.to_owned(),
                reason: e.to_string(),
            })
    };
    let (width, height) = reader()?.into_dimensions().map_err(decode_error)?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(FrameError::TooLarge {
            origin: origin.to_owned(),
            width,
            height,
            max_pixels,
        });
    }
    // The decoder's own allocations, bounded too: 16-bit RGBA is 8
    // bytes a pixel. Its output counts against them, as in
    // `ImageReader::decode`.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    let mut reader = reader()?;
    reader.limits(limits.clone());
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    limits
        .reserve(decoder.total_bytes())
        .map_err(decode_error)?;
    decoder.set_limits(limits).map_err(decode_error)?;
    let (width, height) = decoder.dimensions();
    let (width, height) = (width as usize, height as usize);
    let format = match decoder.color_type() {
        ColorType::L8 => PixelFormat::Gray8,
        ColorType::Rgb8 => PixelFormat::Rgb8,
        _ => {
            // 16 bits, alpha: reduced through a DynamicImage, then moved
            // to where frames live (copied only into a mapping). Rare in
            // cameras and photo folders.
            let image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
            let (format, packed) = match image {
                DynamicImage::ImageLuma16(_)
                | DynamicImage::ImageLumaA8(_)
                | DynamicImage::ImageLumaA16(_) => {
                    (PixelFormat::Gray8, image.to_luma8().into_raw())
                }
                other => (PixelFormat::Rgb8, other.to_rgb8().into_raw()),
            };
            let bytes = packed.len();
            let pixels = Pixels::from_vec(packed, place).map_err(no_memory(origin, bytes))?;
            return Ok((width, height, format, pixels));
        }
    };
    // Within the budget checked above, so no overflow.
    let mut pixels = zeroed_pixels(width * height * format.channels(), place, origin)?;
    decoder.read_image(&mut pixels).map_err(decode_error)?;
    Ok((width, height, format, pixels))
}

/// [`Pixels::zeroed`], its failure this image's error.
fn zeroed_pixels(bytes: usize, place: Place, origin: &str) -> Result<Pixels, FrameError> {
    Pixels::zeroed(bytes, place).map_err(no_memory(origin, bytes))
}

/// A failed mapping of `bytes` bytes, as this image's error.
fn no_memory(origin: &str, bytes: usize) -> impl FnOnce(std::io::Error) -> FrameError + '_ {
    move |source| FrameError::Memory {
        origin: origin.to_owned(),
        bytes,
        source,
    }
}

/// Reads the image file at `path`, of at most `max_file_bytes(max_pixels)`
/// bytes. A regular file of [`MAPPED_FROM`] bytes or more is read into a
/// mapping of its own (see [`Pixels`]), as many bytes as it had when
/// opened.
fn read_file_within(path: &Path, max_pixels: u64) -> Result<Pixels, FrameError> {
    use std::io::Read;
    let limit = max_file_bytes(max_pixels);
    let read_error = |source| FrameError::Read {
        path: path.to_owned(),
        source,
    };
    let too_large = |size| FrameError::FileTooLarge {
        path: path.to_owned(),
        size,
        max_pixels,
    };
    let mut file = std::fs::File::open(path).map_err(read_error)?;
    let metadata = file.metadata().map_err(read_error)?;
    if metadata.is_file() {
        let size = metadata.len();
        if size > limit {
            return Err(too_large(size));
        }
        let size = usize::try_from(size).map_err(|_| too_large(size))?;
        if size >= MAPPED_FROM {
            let mut bytes = zeroed_pixels(size, Place::OwnMapping, &path.display().to_string())?;
            let mut filled = 0;
            // A file cut short while read gives what it had; one that grew
            // gives what it had when opened.
            while filled < size {
                match file.read(&mut bytes[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(read_error(e)),
                }
            }
            bytes.truncate(filled);
            return Ok(bytes);
        }
    }
    // Small files, and FIFOs (whose size is not known until read).
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(read_error)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(Pixels::Heap(bytes))
}

impl Frame {
    /// Wraps packed pixels, checking that the buffer matches the geometry.
    pub fn from_packed(
        width: usize,
        height: usize,
        format: PixelFormat,
        data: Vec<u8>,
        origin: &str,
    ) -> Result<Frame, FrameError> {
        Frame::from_pixels(width, height, format, Pixels::Heap(data), origin)
    }

    fn from_pixels(
        width: usize,
        height: usize,
        format: PixelFormat,
        data: Pixels,
        origin: &str,
    ) -> Result<Frame, FrameError> {
        if width == 0 || height == 0 {
            return Err(FrameError::Geometry {
                origin: origin.to_owned(),
                reason: format!("{width}x{height} has no pixels"),
            });
        }
        let expected = width
            .checked_mul(height)
            .and_then(|p| p.checked_mul(format.channels()));
        if expected != Some(data.len()) {
            return Err(FrameError::Geometry {
                origin: origin.to_owned(),
                reason: format!(
                    "{width}x{height} {format:?} needs {} bytes, buffer has {}",
                    expected.map_or_else(|| "too many".to_owned(), |n| n.to_string()),
                    data.len()
                ),
            });
        }
        Ok(Frame {
            width,
            height,
            format,
            data: Arc::new(data),
        })
    }

    /// Reads and decodes an image file of at most [`MAX_PIXELS`].
    pub fn from_file(path: &Path) -> Result<Frame, FrameError> {
        Frame::from_file_within(path, MAX_PIXELS)
    }

    /// Reads and decodes an image file of at most `max_pixels` pixels. A
    /// file larger than such an image could be is not read at all. From
    /// 128 KiB, the file and the frame get memory maps of their own,
    /// returned whole when the frame is dropped.
    pub fn from_file_within(path: &Path, max_pixels: u64) -> Result<Frame, FrameError> {
        let bytes = read_file_within(path, max_pixels)?;
        let origin = path.display().to_string();
        Frame::decode_at(&bytes, &origin, max_pixels, Place::OwnMapping)
    }

    /// Decodes an encoded image of at most [`MAX_PIXELS`].
    pub fn decode(bytes: &[u8], origin: &str) -> Result<Frame, FrameError> {
        Frame::decode_within(bytes, origin, MAX_PIXELS)
    }

    /// Decodes an encoded image (JPEG or PNG, sniffed from the bytes) of at
    /// most `max_pixels` pixels, checked from its header before anything
    /// is decoded: a small file can declare a huge image.
    ///
    /// 16-bit samples are scaled to 8 bits and alpha is dropped: NanoDet was
    /// trained on opaque 8-bit photos, and a transparent pixel's colour is
    /// what the camera would have seen.
    ///
    /// The pixels come from malloc: this is a camera's MJPEG frame, or an
    /// image a command was given.
    pub fn decode_within(bytes: &[u8], origin: &str, max_pixels: u64) -> Result<Frame, FrameError> {
        Frame::decode_at(bytes, origin, max_pixels, Place::Heap)
    }

    fn decode_at(
        bytes: &[u8],
        origin: &str,
        max_pixels: u64,
        place: Place,
    ) -> Result<Frame, FrameError> {
        if bytes.is_empty() {
            return Err(FrameError::Empty {
                origin: origin.to_owned(),
            });
        }
        if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_is_complete(bytes) {
            // zune-jpeg fills a cut-off scan with grey and succeeds; a
            // camera frame cut short by USB trouble would then be detected
            // on. Refuse it instead.
            return Err(FrameError::Decode {
                origin: origin.to_owned(),
                reason: "truncated JPEG: no end-of-image marker".into(),
            });
        }
        // Both the header read and the decode run third-party code on
        // outside bytes: a panic there is this image's error.
        let (width, height, format, data) =
            crate::contain::contain(|| decode_image(bytes, origin, max_pixels, place)).map_err(
                |source| FrameError::DecoderPanicked {
                    origin: origin.to_owned(),
                    source,
                },
            )??;
        Frame::from_pixels(width, height, format, data, origin)
    }

    /// This frame in the top-left corner of a black frame at least as
    /// large (each side is the larger of the two).
    pub fn padded_with_black(&self, width: usize, height: usize) -> Frame {
        let (width, height) = (width.max(self.width), height.max(self.height));
        let c = self.format.channels();
        let mut data = vec![0u8; width * height * c];
        for (dst, src) in data
            .chunks_exact_mut(width * c)
            .zip(self.data.chunks_exact(self.width * c))
        {
            dst[..src.len()].copy_from_slice(src);
        }
        Frame {
            width,
            height,
            format: self.format,
            data: Arc::new(Pixels::Heap(data)),
        }
    }

    /// Width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// Channel layout.
    pub fn format(&self) -> PixelFormat {
        self.format
    }

    /// Packed pixel bytes, row after row.
    pub fn data(&self) -> &[u8] {
        &self.data
    }

    /// Encodes the frame as a JPEG of the given quality (1..=100).
    pub fn to_jpeg(&self, quality: u8) -> Result<Vec<u8>, FrameError> {
        let (bytes, color): (std::borrow::Cow<[u8]>, _) = match self.format {
            PixelFormat::Rgb8 => (self.data().into(), image::ExtendedColorType::Rgb8),
            PixelFormat::Bgr8 => (
                self.data
                    .chunks_exact(3)
                    .flat_map(|p| [p[2], p[1], p[0]])
                    .collect::<Vec<u8>>()
                    .into(),
                image::ExtendedColorType::Rgb8,
            ),
            PixelFormat::Gray8 => (self.data().into(), image::ExtendedColorType::L8),
        };
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality.clamp(1, 100))
            .encode(&bytes, self.width as u32, self.height as u32, color)
            .map_err(|e| FrameError::Decode {
                origin: format!("{}x{} frame", self.width, self.height),
                reason: format!("cannot encode as JPEG: {e}"),
            })?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey_png(width: u32, height: u32) -> Vec<u8> {
        let mut png = Vec::new();
        image::GrayImage::new(width, height)
            .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
            .unwrap();
        png
    }

    #[test]
    fn a_clone_shares_the_pixels_instead_of_copying_them() {
        let frame = Frame::from_packed(2, 1, PixelFormat::Gray8, vec![3, 4], "t").unwrap();
        let shown_again = frame.clone();
        assert_eq!(shown_again.data().as_ptr(), frame.data().as_ptr());
        assert_eq!(shown_again.data(), &[3, 4]);
    }

    /// Issue 17 (the soak run's RSS growth): an image file of
    /// `MAPPED_FROM` bytes or more, and the frame decoded from it, live in
    /// mappings of their own, not in malloc's arenas; the same bytes
    /// decoded from memory (a camera's MJPEG) stay on the heap. The pixels
    /// are the image crate's own decode, whichever path they took
    /// (straight into the buffer, or reduced from 16 bits or alpha first).
    #[test]
    fn large_images_and_files_get_mappings_of_their_own_with_the_same_pixels_issue_17() {
        let rgb = image::RgbImage::from_fn(400, 400, |x, y| {
            image::Rgb([
                (x * 7 % 256) as u8,
                (y * 3 % 256) as u8,
                ((x ^ y) % 256) as u8,
            ])
        });
        let encode = |image: DynamicImage, format| {
            let mut bytes = Vec::new();
            image
                .write_to(&mut std::io::Cursor::new(&mut bytes), format)
                .unwrap();
            bytes
        };
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "rgb.png",
                DynamicImage::ImageRgb8(rgb.clone()),
                image::ImageFormat::Png,
            ),
            (
                "rgb.jpg",
                DynamicImage::ImageRgb8(rgb.clone()),
                image::ImageFormat::Jpeg,
            ),
            (
                "rgba.png",
                DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(rgb.clone()).to_rgba8()),
                image::ImageFormat::Png,
            ),
            (
                "grey16.png",
                DynamicImage::ImageLuma16(DynamicImage::ImageRgb8(rgb.clone()).to_luma16()),
                image::ImageFormat::Png,
            ),
        ];
        for (name, image, format) in cases {
            let bytes = encode(image, format);
            let expected = image::load_from_memory(&bytes).unwrap();
            let (expected_format, expected) = match expected {
                DynamicImage::ImageLuma16(_) => {
                    (PixelFormat::Gray8, expected.to_luma8().into_raw())
                }
                other => (PixelFormat::Rgb8, other.to_rgb8().into_raw()),
            };
            let path = dir.path().join(name);
            std::fs::write(&path, &bytes).unwrap();
            let from_file = Frame::from_file(&path).unwrap();
            let from_memory = Frame::decode(&bytes, name).unwrap();
            assert!(mapped_bytes() >= from_file.data().len(), "{name}: counted");
            for (frame, mapped) in [(&from_file, true), (&from_memory, false)] {
                assert!(frame.data().len() >= MAPPED_FROM, "{name}");
                assert_eq!(
                    matches!(*frame.data, Pixels::Mapped { .. }),
                    mapped,
                    "{name}: {:?}",
                    frame.data
                );
                assert_eq!(frame.format(), expected_format, "{name}");
                assert!(frame.data() == expected.as_slice(), "{name}: pixels differ");
            }

            // The file: read whole into a mapping when large enough.
            let padded: Vec<u8> = bytes
                .iter()
                .copied()
                .chain(std::iter::repeat_n(0, MAPPED_FROM))
                .collect();
            std::fs::write(&path, &padded).unwrap();
            let read = read_file_within(&path, MAX_PIXELS).unwrap();
            assert!(matches!(read, Pixels::Mapped { .. }), "{name}");
            assert!(*read == *padded, "{name}: file bytes differ");
            std::fs::write(&path, &bytes).unwrap();
            let read = read_file_within(&path, MAX_PIXELS).unwrap();
            assert_eq!(*read, *bytes, "{name}");
        }
        // Small frames stay on the heap: a page each would waste memory.
        let small = Frame::decode(&grey_png(10, 10), "small.png").unwrap();
        assert!(matches!(*small.data, Pixels::Heap(_)), "{:?}", small.data);
    }

    /// Issue 17: a 470 KB PNG declaring 11000x11000 RGBA decoded to
    /// 480 MB per camera. The budget is checked from the header, before
    /// anything is decoded, and bounds the file read too.
    #[test]
    fn an_image_over_the_pixel_budget_is_refused_before_decoding_issue_17() {
        let png = grey_png(2000, 1000);
        assert!(png.len() < 20_000, "{} bytes", png.len());
        let e = Frame::decode_within(&png, "big.png", 1_999_999).unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::TooLarge {
                    width: 2000,
                    height: 1000,
                    max_pixels: 1_999_999,
                    ..
                }
            ),
            "{e}"
        );
        assert_eq!(
            e.to_string(),
            "big.png: 2000x1000 is over the frame budget of 1999999 pixels"
        );
        let frame = Frame::decode_within(&png, "big.png", 2_000_000).unwrap();
        assert_eq!((frame.width(), frame.height()), (2000, 1000));

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.png");
        std::fs::write(&path, vec![0u8; (max_file_bytes(1000) + 1) as usize]).unwrap();
        let e = Frame::from_file_within(&path, 1000).unwrap_err();
        assert!(
            matches!(
                e,
                FrameError::FileTooLarge {
                    max_pixels: 1000,
                    ..
                }
            ),
            "{e}"
        );
        std::fs::write(&path, grey_png(40, 25)).unwrap();
        assert!(Frame::from_file_within(&path, 1000).is_ok());
        assert!(matches!(
            Frame::from_file_within(&path, 999).unwrap_err(),
            FrameError::TooLarge { .. }
        ));
    }

    #[test]
    fn rejects_buffer_that_does_not_match_geometry() {
        let err = Frame::from_packed(4, 4, PixelFormat::Rgb8, vec![0; 47], "cam0 frame 7")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cam0 frame 7"), "{err}");
        assert!(err.contains("needs 48 bytes, buffer has 47"), "{err}");
    }

    #[test]
    fn padding_keeps_pixels_top_left_and_adds_black() {
        let f = Frame::from_packed(1, 2, PixelFormat::Gray8, vec![7, 9], "x").unwrap();
        let p = f.padded_with_black(2, 2);
        assert_eq!((p.width(), p.height(), p.data()), (2, 2, &[7, 0, 9, 0][..]));
    }

    /// Issue 17: the uvc_mjpeg fuzzer found a JPEG on which zune-jpeg
    /// 0.5.15's AVX2 IDCT unwraps `None`; in a release build that aborted
    /// the daemon. It is now this frame's error, and the next frame
    /// decodes. (The scalar IDCT, on a machine without AVX2, refuses the
    /// same bytes without a panic.)
    #[test]
    fn a_jpeg_that_panics_the_decoder_is_that_frames_error_issue_17() {
        let input = std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/seeds/uvc_mjpeg/zune-jpeg-avx2-idct-unwrap-none"
        ))
        .unwrap();
        // The fuzz input is 4 bytes of frame size, then the JPEG.
        let err = Frame::decode(&input[4..], "cam0 frame 9").unwrap_err();
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2") {
            match &err {
                FrameError::DecoderPanicked { origin, source } => {
                    assert_eq!(origin, "cam0 frame 9");
                    assert!(source.what.contains("unwrap()` on a `None`"), "{source}");
                }
                other => panic!("expected the decoder's panic, got {other}"),
            }
        }
        assert!(err.to_string().starts_with("cam0 frame 9: "), "{err}");
        let mut good = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut good)
            .encode(&[200u8; 16 * 8 * 3], 16, 8, image::ExtendedColorType::Rgb8)
            .unwrap();
        assert_eq!(Frame::decode(&good, "cam0 frame 10").unwrap().width(), 16);
    }

    #[test]
    fn a_cut_off_jpeg_is_an_error_and_padding_after_the_end_is_fine() {
        let mut jpeg = Vec::new();
        image::RgbImage::from_fn(64, 48, |x, y| image::Rgb([x as u8 * 4, y as u8 * 5, 90]))
            .write_to(
                &mut std::io::Cursor::new(&mut jpeg),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        assert!(Frame::decode(&jpeg, "cam0 frame 1").is_ok());
        let err = Frame::decode(&jpeg[..jpeg.len() / 2], "cam0 frame 2")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("cam0 frame 2") && err.contains("truncated JPEG"),
            "{err}"
        );
        jpeg.extend_from_slice(&[0; 300]);
        assert!(Frame::decode(&jpeg, "cam0 frame 3").is_ok());
    }

    #[test]
    fn rejects_zero_sized_frame() {
        assert!(Frame::from_packed(0, 4, PixelFormat::Gray8, vec![], "x").is_err());
    }

    #[test]
    fn empty_and_garbage_bytes_are_clear_errors() {
        let empty = Frame::decode(&[], "a.jpg").unwrap_err().to_string();
        assert_eq!(empty, "a.jpg: empty file (0 bytes)");
        let garbage = Frame::decode(b"not an image at all", "b.png")
            .unwrap_err()
            .to_string();
        assert!(
            garbage.starts_with("b.png: cannot decode image"),
            "{garbage}"
        );
    }
}
