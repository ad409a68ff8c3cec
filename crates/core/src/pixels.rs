//! Camera buffers → [`Frame`]: the pixel formats V4L2 devices deliver,
//! converted in one pass. A buffer that is short or corrupt is an error
//! naming the frame, for the camera to count and skip.

use crate::frame::{Frame, FrameError, PixelFormat};

/// Pixel formats a camera may deliver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraFormat {
    /// Motion JPEG: each buffer is one JPEG image.
    Mjpeg,
    /// Packed 4:2:2, Y0 U Y1 V.
    Yuyv,
    /// Packed 4:2:2, U Y0 V Y1 (many HDMI grabbers and industrial cameras).
    Uyvy,
    /// Planar Y, then interleaved U V at half resolution both ways.
    Nv12,
    /// 8-bit luma only.
    Grey,
    /// Packed R G B.
    Rgb24,
    /// Packed B G R.
    Bgr24,
}

impl CameraFormat {
    /// Every format, by its configuration name.
    pub const NAMED: [(&'static str, CameraFormat); 7] = [
        ("mjpeg", CameraFormat::Mjpeg),
        ("yuyv", CameraFormat::Yuyv),
        ("uyvy", CameraFormat::Uyvy),
        ("nv12", CameraFormat::Nv12),
        ("grey", CameraFormat::Grey),
        ("rgb24", CameraFormat::Rgb24),
        ("bgr24", CameraFormat::Bgr24),
    ];

    /// Every uncompressed format: all but MJPEG.
    pub const RAW: [CameraFormat; 6] = [
        CameraFormat::Yuyv,
        CameraFormat::Uyvy,
        CameraFormat::Nv12,
        CameraFormat::Grey,
        CameraFormat::Rgb24,
        CameraFormat::Bgr24,
    ];
}

/// A pixel format name nanodetd does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: the formats are {names}", names = CameraFormat::NAMED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", "))]
pub struct UnknownFormat(pub String);

impl std::str::FromStr for CameraFormat {
    type Err = UnknownFormat;

    fn from_str(s: &str) -> Result<CameraFormat, UnknownFormat> {
        CameraFormat::NAMED
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
            .map(|(_, f)| *f)
            .ok_or_else(|| UnknownFormat(s.to_owned()))
    }
}

/// Geometry of one raw buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BufferLayout {
    /// Pixel format.
    pub format: CameraFormat,
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Bytes per row of the (first) plane, which drivers may pad.
    pub bytes_per_line: usize,
}

impl BufferLayout {
    /// Minimum bytes per row for this format and width.
    fn min_bytes_per_line(&self) -> usize {
        match self.format {
            // Chroma comes per pixel pair, so an odd width still needs
            // the whole last pair.
            CameraFormat::Yuyv | CameraFormat::Uyvy => self.width.div_ceil(2) * 4,
            CameraFormat::Nv12 => self.width.div_ceil(2) * 2,
            CameraFormat::Rgb24 | CameraFormat::Bgr24 => self.width * 3,
            CameraFormat::Grey | CameraFormat::Mjpeg => self.width,
        }
    }

    /// Checks that a raw (non-JPEG) buffer of `len` bytes holds a whole
    /// frame of this geometry; `origin` names the frame in the error.
    pub fn check(&self, len: usize, origin: &str) -> Result<(), FrameError> {
        let geometry = |reason: String| FrameError::Geometry {
            origin: origin.to_owned(),
            reason,
        };
        let (w, h) = (self.width, self.height);
        if w == 0 || h == 0 || self.bytes_per_line < self.min_bytes_per_line() {
            return Err(geometry(format!(
                "{w}x{h} {:?} with {} bytes per line",
                self.format, self.bytes_per_line
            )));
        }
        if len < self.needed() {
            return Err(geometry(format!(
                "short buffer: {len} bytes, {w}x{h} {:?} needs {}",
                self.format,
                self.needed()
            )));
        }
        Ok(())
    }

    /// Bytes a raw (non-JPEG) buffer must hold.
    pub fn needed(&self) -> usize {
        let luma = self.bytes_per_line * self.height;
        match self.format {
            CameraFormat::Nv12 => luma + self.bytes_per_line * self.height.div_ceil(2),
            _ => luma,
        }
    }
}

/// BT.601 limited-range YCbCr → one B, G, R triple, in integers (the
/// encoding UVC webcams and V4L2 use by default for YUYV and NV12).
#[inline(always)]
fn ycbcr_to_bgr(y: u8, cb: u8, cr: u8) -> [u8; 3] {
    let c = 298 * (i32::from(y) - 16);
    let d = i32::from(cb) - 128;
    let e = i32::from(cr) - 128;
    let clip = |v: i32| ((v + 128) >> 8).clamp(0, 255) as u8;
    [
        clip(c + 516 * d),
        clip(c - 100 * d - 208 * e),
        clip(c + 409 * e),
    ]
}

/// Converts one camera buffer into a frame. `origin` names the frame in
/// errors (camera and sequence number).
pub fn to_frame(layout: &BufferLayout, bytes: &[u8], origin: &str) -> Result<Frame, FrameError> {
    if layout.format == CameraFormat::Mjpeg {
        return decode_mjpeg(layout, bytes, origin);
    }
    layout.check(bytes.len(), origin)?;
    let (w, h) = (layout.width, layout.height);
    let stride = layout.bytes_per_line;
    let rows = bytes.chunks(stride).take(h);
    let (format, data) = match layout.format {
        CameraFormat::Grey => (
            PixelFormat::Gray8,
            rows.flat_map(|r| &r[..w]).copied().collect(),
        ),
        CameraFormat::Rgb24 => (
            PixelFormat::Rgb8,
            rows.flat_map(|r| &r[..w * 3]).copied().collect(),
        ),
        CameraFormat::Bgr24 => (
            PixelFormat::Bgr8,
            rows.flat_map(|r| &r[..w * 3]).copied().collect(),
        ),
        CameraFormat::Yuyv | CameraFormat::Uyvy => {
            // Byte offsets of Y0, Cb, Y1, Cr within a pixel pair.
            let [y0, cb, y1, cr] = if layout.format == CameraFormat::Yuyv {
                [0, 1, 2, 3]
            } else {
                [1, 0, 3, 2]
            };
            let mut out = Vec::with_capacity(w * h * 3);
            for row in rows {
                for x in 0..w {
                    let pair = &row[(x / 2) * 4..(x / 2) * 4 + 4];
                    let y = if x % 2 == 0 { pair[y0] } else { pair[y1] };
                    out.extend_from_slice(&ycbcr_to_bgr(y, pair[cb], pair[cr]));
                }
            }
            (PixelFormat::Bgr8, out)
        }
        CameraFormat::Nv12 => {
            let (luma, chroma) = bytes.split_at(stride * h);
            let mut out = Vec::with_capacity(w * h * 3);
            for y in 0..h {
                let luma_row = &luma[y * stride..][..w];
                let chroma_row = &chroma[(y / 2) * stride..][..w.div_ceil(2) * 2];
                for (x, &l) in luma_row.iter().enumerate() {
                    let uv = &chroma_row[(x / 2) * 2..(x / 2) * 2 + 2];
                    out.extend_from_slice(&ycbcr_to_bgr(l, uv[0], uv[1]));
                }
            }
            (PixelFormat::Bgr8, out)
        }
        CameraFormat::Mjpeg => return decode_mjpeg(layout, bytes, origin),
    };
    Frame::from_packed(w, h, format, data, origin)
}

/// An MJPEG buffer's JPEG may declare any size; one much larger than the
/// negotiated format (which the frame budget bounds) is refused before it
/// is decoded. 16 pixels of slack a side allow for encoders that round up
/// to whole macroblocks.
fn decode_mjpeg(layout: &BufferLayout, bytes: &[u8], origin: &str) -> Result<Frame, FrameError> {
    let max = (layout.width as u64 + 16).saturating_mul(layout.height as u64 + 16);
    Frame::decode_within(bytes, origin, max)
}

/// BT.601 limited-range B, G, R → Y, Cb, Cr: the camera's side of
/// [`ycbcr_to_bgr`], rounded to nearest.
fn bgr_to_ycbcr([b, g, r]: [u8; 3]) -> [u8; 3] {
    let (b, g, r) = (i32::from(b), i32::from(g), i32::from(r));
    let clip = |v: i32| v.clamp(0, 255) as u8;
    [
        clip(((66 * r + 129 * g + 25 * b + 128) >> 8) + 16),
        clip(((-38 * r - 74 * g + 112 * b + 128) >> 8) + 128),
        clip(((112 * r - 94 * g - 18 * b + 128) >> 8) + 128),
    ]
}

/// The buffer a camera delivering `format` would send for `frame`, with
/// each row padded by `pad` bytes as some drivers do: the inverse of
/// [`to_frame`], for benchmarks and tests of the raw-format paths (the
/// GPU kernel's, the converters'). Chroma is subsampled by taking the
/// first pixel of each pair (and, for NV12, of each even row). MJPEG is
/// not a raw format and is refused.
pub fn encode(
    frame: &Frame,
    format: CameraFormat,
    pad: usize,
) -> Result<(BufferLayout, Vec<u8>), FrameError> {
    let (w, h) = (frame.width(), frame.height());
    let channels = frame.format().channels();
    let bgr_at = |x: usize, y: usize| -> [u8; 3] {
        let p = &frame.data()[(y * w + x.min(w - 1)) * channels..][..channels];
        match frame.format() {
            PixelFormat::Bgr8 => [p[0], p[1], p[2]],
            PixelFormat::Rgb8 => [p[2], p[1], p[0]],
            PixelFormat::Gray8 => [p[0]; 3],
        }
    };
    let mut layout = BufferLayout {
        format,
        width: w,
        height: h,
        bytes_per_line: 0,
    };
    if format == CameraFormat::Mjpeg {
        return Err(FrameError::Geometry {
            origin: "encode".into(),
            reason: "MJPEG is not a raw format".into(),
        });
    }
    let row_bytes = layout.min_bytes_per_line();
    layout.bytes_per_line = row_bytes + pad;
    let stride = layout.bytes_per_line;
    let mut bytes = vec![0u8; layout.needed()];
    for y in 0..h {
        let row = &mut bytes[y * stride..][..row_bytes];
        match format {
            CameraFormat::Yuyv | CameraFormat::Uyvy => {
                for (pair, out) in row.chunks_exact_mut(4).enumerate() {
                    let a = bgr_to_ycbcr(bgr_at(2 * pair, y));
                    let b = bgr_to_ycbcr(bgr_at(2 * pair + 1, y));
                    out.copy_from_slice(&if format == CameraFormat::Yuyv {
                        [a[0], a[1], b[0], a[2]]
                    } else {
                        [a[1], a[0], a[2], b[0]]
                    });
                }
            }
            CameraFormat::Nv12 | CameraFormat::Grey => {
                for (x, out) in row.iter_mut().enumerate().take(w) {
                    *out = bgr_to_ycbcr(bgr_at(x, y))[0];
                }
            }
            CameraFormat::Rgb24 | CameraFormat::Bgr24 => {
                for (x, out) in row.chunks_exact_mut(3).enumerate() {
                    let [b, g, r] = bgr_at(x, y);
                    let rgb = format == CameraFormat::Rgb24;
                    out.copy_from_slice(&if rgb { [r, g, b] } else { [b, g, r] });
                }
            }
            CameraFormat::Mjpeg => {}
        }
    }
    if format == CameraFormat::Nv12 {
        let (_, chroma) = bytes.split_at_mut(stride * h);
        for (y, row) in chroma.chunks_exact_mut(stride).enumerate() {
            for (pair, out) in row[..w.div_ceil(2) * 2].chunks_exact_mut(2).enumerate() {
                let c = bgr_to_ycbcr(bgr_at(2 * pair, 2 * y));
                out.copy_from_slice(&c[1..]);
            }
        }
    }
    Ok((layout, bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layout(
        format: CameraFormat,
        width: usize,
        height: usize,
        bytes_per_line: usize,
    ) -> BufferLayout {
        BufferLayout {
            format,
            width,
            height,
            bytes_per_line,
        }
    }

    #[test]
    fn limited_range_black_white_and_red() {
        assert_eq!(ycbcr_to_bgr(16, 128, 128), [0, 0, 0]);
        assert_eq!(ycbcr_to_bgr(235, 128, 128), [255, 255, 255]);
        // BT.601 red: Y 81, Cb 90, Cr 240.
        let [b, g, r] = ycbcr_to_bgr(81, 90, 240);
        assert!(r >= 253 && g <= 2 && b <= 2, "{b} {g} {r}");
    }

    #[test]
    fn yuyv_pairs_share_chroma_and_padding_is_skipped() {
        // 2x2, rows padded to 6 bytes.
        let bytes = [16, 128, 235, 128, 9, 9, 235, 128, 16, 128, 9, 9];
        let f = to_frame(&layout(CameraFormat::Yuyv, 2, 2, 6), &bytes, "cam0 #1").unwrap();
        assert_eq!(f.format(), PixelFormat::Bgr8);
        assert_eq!(f.data(), &[0, 0, 0, 255, 255, 255, 255, 255, 255, 0, 0, 0]);
    }

    #[test]
    fn uyvy_is_yuyv_with_chroma_first() {
        let yuyv = [16, 90, 235, 240, 81, 128, 81, 128];
        let uyvy = [90, 16, 240, 235, 128, 81, 128, 81];
        let a = to_frame(&layout(CameraFormat::Yuyv, 2, 2, 4), &yuyv, "a").unwrap();
        let b = to_frame(&layout(CameraFormat::Uyvy, 2, 2, 4), &uyvy, "b").unwrap();
        assert_eq!(a.data(), b.data());
        assert_ne!(a.data()[..3], a.data()[3..6]);
    }

    #[test]
    fn nv12_uses_half_resolution_chroma() {
        // 2x2 white/black luma, one chroma pair.
        let bytes = [235, 16, 16, 235, 128, 128];
        let f = to_frame(&layout(CameraFormat::Nv12, 2, 2, 2), &bytes, "cam0 #2").unwrap();
        assert_eq!(f.data(), &[255, 255, 255, 0, 0, 0, 0, 0, 0, 255, 255, 255]);
    }

    #[test]
    fn short_buffers_and_bad_geometry_name_the_frame() {
        let err = to_frame(
            &layout(CameraFormat::Yuyv, 640, 480, 1280),
            &[0; 1000],
            "cam1 #77",
        )
        .unwrap_err()
        .to_string();
        assert_eq!(
            err,
            "cam1 #77: bad frame geometry: short buffer: 1000 bytes, 640x480 Yuyv needs 614400"
        );
        let err =
            to_frame(&layout(CameraFormat::Rgb24, 4, 4, 8), &[0; 64], "cam1 #78").unwrap_err();
        assert!(err.to_string().contains("bytes per line"), "{err}");
        let err = to_frame(
            &layout(CameraFormat::Mjpeg, 4, 4, 0),
            &[0xFF, 0xD8, 0xFF],
            "cam1 #79",
        )
        .unwrap_err();
        assert!(
            err.to_string().starts_with("cam1 #79: cannot decode image"),
            "{err}"
        );
    }

    #[test]
    fn odd_widths_need_whole_chroma_pairs_and_never_panic() {
        // 3 pixels wide: YUYV needs 2 pairs (8 bytes) per row, NV12 a
        // 4-byte chroma row.
        for (format, tight) in [(CameraFormat::Yuyv, 6), (CameraFormat::Nv12, 3)] {
            let err = to_frame(&layout(format, 3, 3, tight), &[128; 64], "odd").unwrap_err();
            assert!(
                err.to_string().contains("bytes per line"),
                "{format:?}: {err}"
            );
        }
        let f = to_frame(
            &layout(CameraFormat::Yuyv, 3, 1, 8),
            &[16, 128, 16, 128, 235, 128, 0, 128],
            "odd",
        )
        .unwrap();
        assert_eq!(f.data(), &[0, 0, 0, 0, 0, 0, 255, 255, 255]);
        let nv12 = [16, 16, 235, 0, 128, 128, 128, 128];
        let f = to_frame(&layout(CameraFormat::Nv12, 3, 1, 4), &nv12, "odd").unwrap();
        assert_eq!(f.data(), &[0, 0, 0, 0, 0, 0, 255, 255, 255]);
    }

    #[test]
    fn grey_and_packed_rgb_copy_rows() {
        let f = to_frame(
            &layout(CameraFormat::Grey, 3, 2, 4),
            &[1, 2, 3, 0, 4, 5, 6, 0],
            "g",
        )
        .unwrap();
        assert_eq!(
            (f.format(), f.data()),
            (PixelFormat::Gray8, &[1, 2, 3, 4, 5, 6][..])
        );
        let f = to_frame(&layout(CameraFormat::Rgb24, 1, 1, 3), &[7, 8, 9], "c").unwrap();
        assert_eq!((f.format(), f.data()), (PixelFormat::Rgb8, &[7, 8, 9][..]));
    }

    #[test]
    fn encode_is_the_inverse_of_to_frame() {
        // A 5x3 frame (odd width: a half chroma pair) with distinct colours.
        let data: Vec<u8> = (0..5 * 3)
            .flat_map(|i| [(i * 17) as u8, (255 - i * 13) as u8, (i * 29 % 256) as u8])
            .collect();
        let frame = Frame::from_packed(5, 3, PixelFormat::Bgr8, data, "t").unwrap();
        for format in [CameraFormat::Bgr24, CameraFormat::Rgb24] {
            let (layout, bytes) = encode(&frame, format, 7).unwrap();
            assert_eq!(layout.bytes_per_line, 5 * 3 + 7);
            let back = to_frame(&layout, &bytes, "t").unwrap();
            let bgr: Vec<u8> = match back.format() {
                PixelFormat::Rgb8 => back
                    .data()
                    .chunks(3)
                    .flat_map(|p| [p[2], p[1], p[0]])
                    .collect(),
                _ => back.data().to_vec(),
            };
            assert_eq!(bgr, frame.data(), "{format:?}");
        }
        // Luma is BT.601's, to within the integer formula's rounding.
        let (layout, bytes) = encode(&frame, CameraFormat::Grey, 0).unwrap();
        let grey = to_frame(&layout, &bytes, "t").unwrap();
        for (y, p) in grey.data().iter().zip(frame.data().chunks(3)) {
            let (b, g, r) = (f32::from(p[0]), f32::from(p[1]), f32::from(p[2]));
            let expected = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b;
            assert!((f32::from(*y) - expected).abs() <= 1.0, "{y} vs {expected}");
        }
        // Chroma is shared by pairs (and rows, for NV12): each pixel comes
        // back close to the pair's first pixel's colour at least.
        for format in [CameraFormat::Yuyv, CameraFormat::Uyvy, CameraFormat::Nv12] {
            let (layout, bytes) = encode(&frame, format, 3).unwrap();
            assert_eq!(bytes.len(), layout.needed());
            let back = to_frame(&layout, &bytes, "t").unwrap();
            assert_eq!((back.width(), back.height()), (5, 3));
            // Pixel (0, 0) owns its chroma: it round-trips within 3 levels.
            for c in 0..3 {
                let d = back.data()[c].abs_diff(frame.data()[c]);
                assert!(d <= 3, "{format:?} channel {c}: off by {d}");
            }
        }
        assert!(encode(&frame, CameraFormat::Mjpeg, 0).is_err());
    }
}
