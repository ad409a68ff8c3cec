//! `Frame`: one packed 8-bit image, the unit every source hands to the
//! detector, and decoding of still-image files (JPEG, PNG) into it.
//!
//! Frames are tightly packed (row stride = width × channels). Whatever the
//! file holds (16-bit samples, alpha, palette) is reduced here, once, so the
//! preprocessing code only ever sees BGR, RGB or GRAY bytes.

use std::path::{Path, PathBuf};

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

/// A packed 8-bit image.
#[derive(Debug, Clone)]
pub struct Frame {
    width: usize,
    height: usize,
    format: PixelFormat,
    data: Vec<u8>,
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
    /// Width or height is zero, or the buffer does not match them.
    #[error("{origin}: bad frame geometry: {reason}")]
    Geometry {
        /// File name or frame label.
        origin: String,
        /// What does not add up.
        reason: String,
    },
}

/// Whether a JPEG ends with its end-of-image marker (FF D9). UVC cameras
/// may pad a frame after the marker, with zeros or 0xFF fill bytes.
fn jpeg_is_complete(bytes: &[u8]) -> bool {
    let tail = bytes.len().saturating_sub(4096);
    bytes[tail..].windows(2).any(|w| w == [0xFF, 0xD9])
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
            data,
        })
    }

    /// Reads and decodes an image file.
    pub fn from_file(path: &Path) -> Result<Frame, FrameError> {
        let bytes = std::fs::read(path).map_err(|source| FrameError::Read {
            path: path.to_owned(),
            source,
        })?;
        Frame::decode(&bytes, &path.display().to_string())
    }

    /// Decodes an encoded image (JPEG or PNG, sniffed from the bytes).
    ///
    /// 16-bit samples are scaled to 8 bits and alpha is dropped: NanoDet was
    /// trained on opaque 8-bit photos, and a transparent pixel's colour is
    /// what the camera would have seen.
    pub fn decode(bytes: &[u8], origin: &str) -> Result<Frame, FrameError> {
        if bytes.is_empty() {
            return Err(FrameError::Empty {
                origin: origin.to_owned(),
            });
        }
        let decode_error = |e: image::ImageError| FrameError::Decode {
            origin: origin.to_owned(),
            reason: e.to_string(),
        };
        if bytes.starts_with(&[0xFF, 0xD8]) && !jpeg_is_complete(bytes) {
            // zune-jpeg fills a cut-off scan with grey and succeeds; a
            // camera frame cut short by USB trouble would then be detected
            // on. Refuse it instead.
            return Err(FrameError::Decode {
                origin: origin.to_owned(),
                reason: "truncated JPEG: no end-of-image marker".into(),
            });
        }
        let image = ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| FrameError::Decode {
                origin: origin.to_owned(),
                reason: e.to_string(),
            })?
            .decode()
            .map_err(decode_error)?;
        let (width, height) = (image.width() as usize, image.height() as usize);
        let (format, data) = match image {
            DynamicImage::ImageLuma8(gray) => (PixelFormat::Gray8, gray.into_raw()),
            DynamicImage::ImageLuma16(_) | DynamicImage::ImageLumaA8(_) => {
                (PixelFormat::Gray8, image.to_luma8().into_raw())
            }
            DynamicImage::ImageLumaA16(_) => (PixelFormat::Gray8, image.to_luma8().into_raw()),
            DynamicImage::ImageRgb8(rgb) => (PixelFormat::Rgb8, rgb.into_raw()),
            other => (PixelFormat::Rgb8, other.to_rgb8().into_raw()),
        };
        Frame::from_packed(width, height, format, data, origin)
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
            data,
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
        let (bytes, color) = match self.format {
            PixelFormat::Rgb8 => (self.data.clone(), image::ExtendedColorType::Rgb8),
            PixelFormat::Bgr8 => (
                self.data
                    .chunks_exact(3)
                    .flat_map(|p| [p[2], p[1], p[0]])
                    .collect(),
                image::ExtendedColorType::Rgb8,
            ),
            PixelFormat::Gray8 => (self.data.clone(), image::ExtendedColorType::L8),
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
