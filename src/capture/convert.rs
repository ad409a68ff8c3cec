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
    /// Planar Y, then interleaved U V at half resolution both ways.
    Nv12,
    /// 8-bit luma only.
    Grey,
    /// Packed R G B.
    Rgb24,
    /// Packed B G R.
    Bgr24,
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
            CameraFormat::Yuyv => self.width.div_ceil(2) * 4,
            CameraFormat::Nv12 => self.width.div_ceil(2) * 2,
            CameraFormat::Rgb24 | CameraFormat::Bgr24 => self.width * 3,
            CameraFormat::Grey | CameraFormat::Mjpeg => self.width,
        }
    }

    /// Bytes a raw (non-JPEG) buffer must hold.
    fn needed(&self) -> usize {
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
    let geometry = |reason: String| FrameError::Geometry {
        origin: origin.to_owned(),
        reason,
    };
    if layout.format == CameraFormat::Mjpeg {
        return Frame::decode(bytes, origin);
    }
    let (w, h) = (layout.width, layout.height);
    if w == 0 || h == 0 || layout.bytes_per_line < layout.min_bytes_per_line() {
        return Err(geometry(format!(
            "{w}x{h} {:?} with {} bytes per line",
            layout.format, layout.bytes_per_line
        )));
    }
    if bytes.len() < layout.needed() {
        return Err(geometry(format!(
            "short buffer: {} bytes, {w}x{h} {:?} needs {}",
            bytes.len(),
            layout.format,
            layout.needed()
        )));
    }
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
        CameraFormat::Yuyv => {
            let mut out = Vec::with_capacity(w * h * 3);
            for row in rows {
                for x in 0..w {
                    let pair = &row[(x / 2) * 4..(x / 2) * 4 + 4];
                    let y = if x % 2 == 0 { pair[0] } else { pair[2] };
                    out.extend_from_slice(&ycbcr_to_bgr(y, pair[1], pair[3]));
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
        CameraFormat::Mjpeg => return Frame::decode(bytes, origin),
    };
    Frame::from_packed(w, h, format, data, origin)
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
}
