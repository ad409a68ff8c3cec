//! Frame → network input: bilinear resize (stretch or letterbox), channel
//! reorder and per-channel normalisation, written straight into a CHW f32
//! buffer in one pass, plus the [`Transform`] that maps boxes back.
//!
//! This is the only preprocessing code in nanodetd: inference on every
//! backend and INT8 calibration all call [`preprocess_into`], so the
//! calibrated ranges describe exactly what the network sees at run time.
//! With the `cuda` feature, `GpuPreprocessor` runs the same arithmetic as
//! one CUDA kernel, taking its taps from the same code.

use crate::frame::{Frame, PixelFormat};

#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::{CameraImage, GpuPreprocessError, GpuPreprocessor, InputElement};

/// Frames uploaded ahead of their run at most, on a GPU: two batches of
/// the largest (`detector::MAX_BATCH`), one running and one uploading.
/// Each slot's device buffer is made on first use and kept, at the size of
/// the largest frame it held: two batches of 32 1080p YUYV frames are
/// 265 MB of device memory.
pub const UPLOAD_SLOTS: usize = 256;

/// How a frame is fitted into the network's input rectangle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeMode {
    /// Scale each axis independently to fill the input (NanoDet-Plus).
    Stretch,
    /// Keep the aspect ratio, centre the image and pad with black (legacy
    /// NanoDet).
    Letterbox,
}

impl std::str::FromStr for ResizeMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stretch" => Ok(ResizeMode::Stretch),
            "letterbox" => Ok(ResizeMode::Letterbox),
            other => Err(format!(
                "unknown resize mode {other:?}; known: stretch, letterbox"
            )),
        }
    }
}

/// Channel order the network expects in its input planes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelOrder {
    /// Plane 0 is blue (every NanoDet export: it was trained on OpenCV BGR).
    Bgr,
    /// Plane 0 is red.
    Rgb,
}

/// Everything that defines the network input for a model.
#[derive(Debug, Clone, PartialEq)]
pub struct PreprocessSpec {
    /// Input width in pixels.
    pub width: usize,
    /// Input height in pixels.
    pub height: usize,
    /// How the frame is fitted.
    pub resize: ResizeMode,
    /// Channel order of the input planes.
    pub channel_order: ChannelOrder,
    /// Per-plane mean, in plane order, on the 0..255 scale.
    pub mean: [f32; 3],
    /// Per-plane standard deviation, in plane order.
    pub std: [f32; 3],
}

impl PreprocessSpec {
    /// NanoDet's normalisation (BGR planes) at the given input size.
    pub fn nanodet(width: usize, height: usize, resize: ResizeMode) -> PreprocessSpec {
        PreprocessSpec {
            width,
            height,
            resize,
            channel_order: ChannelOrder::Bgr,
            mean: [103.53, 116.28, 123.675],
            std: [57.375, 57.12, 58.395],
        }
    }

    /// Number of f32 values in one CHW input tensor.
    pub fn tensor_len(&self) -> usize {
        3 * self.width * self.height
    }

    /// Every field in a fixed text, for the caches whose content
    /// depends on what the network is fed: two specs with the same text
    /// preprocess every frame the same way.
    pub fn key_text(&self) -> String {
        // Taken apart so that a field added later cannot be left out.
        let PreprocessSpec {
            width,
            height,
            resize,
            channel_order,
            mean,
            std,
        } = self;
        format!("{width}x{height} {resize:?} {channel_order:?} mean {mean:?} std {std:?}")
    }
}

/// Maps between network-input pixels and original-image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Transform {
    /// Network pixels per image pixel, horizontally.
    pub scale_x: f32,
    /// Network pixels per image pixel, vertically.
    pub scale_y: f32,
    /// Left padding in network pixels.
    pub pad_x: f32,
    /// Top padding in network pixels.
    pub pad_y: f32,
    /// Original image width.
    pub image_width: f32,
    /// Original image height.
    pub image_height: f32,
}

impl Transform {
    /// A network-input point in original-image coordinates.
    pub fn to_image(&self, x: f32, y: f32) -> (f32, f32) {
        (
            (x - self.pad_x) / self.scale_x,
            (y - self.pad_y) / self.scale_y,
        )
    }

    /// An original-image point in network-input coordinates.
    pub fn to_network(&self, x: f32, y: f32) -> (f32, f32) {
        (x * self.scale_x + self.pad_x, y * self.scale_y + self.pad_y)
    }

    /// Maps an `[x1, y1, x2, y2]` network box to the image, clipped to it.
    pub fn box_to_image(&self, b: [f32; 4]) -> [f32; 4] {
        let (x1, y1) = self.to_image(b[0], b[1]);
        let (x2, y2) = self.to_image(b[2], b[3]);
        [
            x1.clamp(0.0, self.image_width),
            y1.clamp(0.0, self.image_height),
            x2.clamp(0.0, self.image_width),
            y2.clamp(0.0, self.image_height),
        ]
    }
}

/// Why a frame could not be preprocessed.
#[derive(Debug, thiserror::Error)]
pub enum PreprocessError {
    /// The output buffer does not hold exactly one input tensor.
    #[error("input buffer holds {got} values, the {width}x{height} input needs {needed}")]
    BufferSize {
        /// Values in the buffer given.
        got: usize,
        /// Values needed.
        needed: usize,
        /// Input width.
        width: usize,
        /// Input height.
        height: usize,
    },
}

/// Where the frame lands in the input: NanoDet's resize matrix. Letterbox
/// centres the scaled frame exactly (the padding may be fractional), as
/// `get_resize_matrix(keep_ratio=True)` does.
fn placement(frame_w: usize, frame_h: usize, spec: &PreprocessSpec) -> Transform {
    let (fw, fh) = (frame_w as f64, frame_h as f64);
    let (dw, dh) = (spec.width as f64, spec.height as f64);
    let (scale_x, scale_y, pad_x, pad_y) = match spec.resize {
        ResizeMode::Stretch => (dw / fw, dh / fh, 0.0, 0.0),
        ResizeMode::Letterbox => {
            let ratio = (dw / fw).min(dh / fh);
            (
                ratio,
                ratio,
                0.5 * dw - 0.5 * fw * ratio,
                0.5 * dh - 0.5 * fh * ratio,
            )
        }
    };
    Transform {
        scale_x: scale_x as f32,
        scale_y: scale_y as f32,
        pad_x: pad_x as f32,
        pad_y: pad_y as f32,
        image_width: frame_w as f32,
        image_height: frame_h as f32,
    }
}

/// One destination coordinate's two source taps: the pixel at `first`
/// and the next one, with weights in 1/32 steps (the sub-pixel grid), so
/// products of two weights are exact integers in 1/1024 steps. `first` is
/// kept one short of the edge, with the weights shifted to match, so both
/// taps are always in bounds and one slice fetches them.
#[derive(Clone, Copy)]
struct Taps {
    first: usize,
    weight_first: u32,
    weight_second: u32,
}

const SUBPIXELS: i64 = 32;

/// Bilinear taps as OpenCV's `warpPerspective` computes them, because that
/// is how NanoDet resizes in training and in its reference inference: the
/// inverse map `src = (dst - pad) / scale` (no half-pixel shift), rounded
/// to 1/32 pixel, with black beyond the source edge (BORDER_CONSTANT).
/// Reproducing it moves scores by up to 0.015 against `cv2.resize`.
/// `src_len` must be at least 2.
fn taps(dst_len: usize, src_len: usize, scale: f64, pad: f64) -> impl Iterator<Item = Taps> {
    let last = src_len as i64 - 1;
    (0..dst_len).map(move |d| {
        let fixed = (((d as f64 - pad) / scale) * SUBPIXELS as f64).round() as i64;
        let index = fixed.div_euclid(SUBPIXELS);
        let frac = fixed.rem_euclid(SUBPIXELS) as u32;
        let weight_of = |i: i64| match i - index {
            _ if !(0..=last).contains(&i) => 0,
            0 => SUBPIXELS as u32 - frac,
            1 => frac,
            _ => 0,
        };
        let first = index.clamp(0, last - 1);
        Taps {
            first: first as usize,
            weight_first: weight_of(first),
            weight_second: weight_of(first + 1),
        }
    })
}

/// Fills `out` (CHW, `spec.tensor_len()` values) from `frame` and returns
/// the transform from network to image pixels.
pub fn preprocess_into(
    frame: &Frame,
    spec: &PreprocessSpec,
    out: &mut [f32],
) -> Result<Transform, PreprocessError> {
    if out.len() != spec.tensor_len() {
        return Err(PreprocessError::BufferSize {
            got: out.len(),
            needed: spec.tensor_len(),
            width: spec.width,
            height: spec.height,
        });
    }
    let transform = placement(frame.width(), frame.height(), spec);
    // The taps read pixel pairs. A black second column or row is exactly
    // what BORDER_CONSTANT blends in, so padding changes no value.
    let padded;
    let frame = if frame.width() < 2 || frame.height() < 2 {
        padded = frame.padded_with_black(frame.width().max(2), frame.height().max(2));
        &padded
    } else {
        frame
    };

    // The warped pixel is an 8-bit value, so normalisation is a lookup.
    let normalised: [[f32; 256]; 3] =
        std::array::from_fn(|p| std::array::from_fn(|v| (v as f32 - spec.mean[p]) / spec.std[p]));
    let channels = frame.format().channels();
    let columns: Vec<Taps> = taps(
        spec.width,
        frame.width(),
        f64::from(transform.scale_x),
        f64::from(transform.pad_x),
    )
    .map(|t| Taps {
        first: t.first * channels,
        ..t
    })
    .collect();
    let rows = taps(
        spec.height,
        frame.height(),
        f64::from(transform.scale_y),
        f64::from(transform.pad_y),
    );
    let row_bytes = frame.width() * channels;
    let pixels = frame.data();
    let plane_len = spec.width * spec.height;
    let (plane0, rest) = out.split_at_mut(plane_len);
    let (plane1, plane2) = rest.split_at_mut(plane_len);
    let out_rows = plane0
        .chunks_exact_mut(spec.width)
        .zip(plane1.chunks_exact_mut(spec.width))
        .zip(plane2.chunks_exact_mut(spec.width));
    let swap = matches!(
        (frame.format(), spec.channel_order),
        (PixelFormat::Bgr8, ChannelOrder::Rgb) | (PixelFormat::Rgb8, ChannelOrder::Bgr)
    );
    // The bytes of a source row any column tap reads.
    let span = match (columns.first(), columns.last()) {
        (Some(first), Some(last)) => first.first..last.first + 2 * channels,
        _ => 0..0,
    };
    let mut blended = vec![0u16; span.len()];

    for (row, ((r0, r1), r2)) in rows.zip(out_rows) {
        blend_rows(
            &pixels[row.first * row_bytes..][..row_bytes][span.clone()],
            &pixels[(row.first + 1) * row_bytes..][..row_bytes][span.clone()],
            [row.weight_first, row.weight_second],
            &mut blended,
        );
        let source = BlendedRow {
            values: &blended,
            offset: span.start,
        };
        // Swap the output rows rather than the bytes, so channel c of the
        // frame always lands in `dst[c]`.
        match (frame.format(), swap) {
            (PixelFormat::Gray8, _) => warp_row::<1>(&source, &columns, [r0, r1, r2], &normalised),
            (_, false) => warp_row::<3>(&source, &columns, [r0, r1, r2], &normalised),
            (_, true) => warp_row::<3>(
                &source,
                &columns,
                [r2, r1, r0],
                &[normalised[2], normalised[1], normalised[0]],
            ),
        }
    }
    Ok(transform)
}

/// The vertical half of the bilinear blend, over a whole row at once: a
/// straight loop the compiler vectorises. Exact: weights are 1/32 steps,
/// so `255 * 32` fits in 16 bits, and blending rows before columns gives
/// the same integers as columns before rows.
fn blend_rows(top: &[u8], bottom: &[u8], [weight_top, weight_bottom]: [u32; 2], out: &mut [u16]) {
    // Both weights are at most 32.
    let (weight_top, weight_bottom) = (weight_top as u16, weight_bottom as u16);
    for ((o, &t), &b) in out.iter_mut().zip(top).zip(bottom) {
        *o = u16::from(t) * weight_top + u16::from(b) * weight_bottom;
    }
}

/// One output row's source, blended vertically: byte `offset` of the
/// source row onwards.
struct BlendedRow<'a> {
    values: &'a [u16],
    offset: usize,
}

impl BlendedRow<'_> {
    /// The warped 8-bit values of the `C` channels at `col`: the exact
    /// integer form of OpenCV's fixed-point bilinear (its 15-bit weights
    /// are exact multiples of our 1/1024 ones), rounded half up.
    #[inline(always)]
    fn sample<const C: usize>(&self, col: &Taps) -> [usize; C] {
        let pair = &self.values[col.first - self.offset..][..2 * C];
        std::array::from_fn(|c| {
            let sum =
                u32::from(pair[c]) * col.weight_first + u32::from(pair[c + C]) * col.weight_second;
            ((sum + 512) >> 10) as usize
        })
    }
}

/// One output row. `C` is the frame's channel count; a gray frame feeds
/// all three planes. `dst[c]` and `lut[c]` belong to frame channel `c`.
#[inline(always)]
fn warp_row<const C: usize>(
    source: &BlendedRow<'_>,
    columns: &[Taps],
    dst: [&mut [f32]; 3],
    lut: &[[f32; 256]; 3],
) {
    let [d0, d1, d2] = dst;
    let outputs = columns.iter().zip(d0).zip(d1).zip(d2);
    for (((col, o0), o1), o2) in outputs {
        let v = source.sample::<C>(col);
        // A gray frame has one value; it feeds every plane.
        let (v0, v1, v2) = (v[0], v[C / 2], v[C - 1]);
        *o0 = lut[0][v0 & 255];
        *o1 = lut[1][v1 & 255];
        *o2 = lut[2][v2 & 255];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(
        w: usize,
        h: usize,
        format: PixelFormat,
        f: impl Fn(usize, usize, usize) -> u8,
    ) -> Frame {
        let c = format.channels();
        let mut data = Vec::with_capacity(w * h * c);
        for y in 0..h {
            for x in 0..w {
                for ch in 0..c {
                    data.push(f(x, y, ch));
                }
            }
        }
        Frame::from_packed(w, h, format, data, "test").unwrap()
    }

    fn unit_spec(w: usize, h: usize, resize: ResizeMode) -> PreprocessSpec {
        PreprocessSpec {
            width: w,
            height: h,
            resize,
            channel_order: ChannelOrder::Bgr,
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }

    #[test]
    fn identity_size_copies_pixels_and_swaps_rgb_to_bgr() {
        let f = frame(4, 3, PixelFormat::Rgb8, |x, y, c| {
            (x * 10 + y * 50 + c) as u8
        });
        let spec = unit_spec(4, 3, ResizeMode::Stretch);
        let mut out = vec![0.0; spec.tensor_len()];
        preprocess_into(&f, &spec, &mut out).unwrap();
        // Plane 0 is blue = RGB channel 2.
        assert_eq!(out[0], 2.0);
        assert_eq!(out[12], 1.0);
        assert_eq!(out[24], 0.0);
        // Pixel (3, 2) of the red plane.
        assert_eq!(out[24 + 2 * 4 + 3], 130.0);
    }

    #[test]
    fn downscale_samples_like_opencv_warp() {
        // warpPerspective 4->2 samples at source 0 and 2 (no half-pixel
        // shift); 5->2 at 0 and 2.5, rounded to 8 bits.
        let f = frame(4, 1, PixelFormat::Gray8, |x, _, _| [0, 100, 200, 250][x]);
        let spec = unit_spec(2, 1, ResizeMode::Stretch);
        let mut out = vec![0.0; spec.tensor_len()];
        preprocess_into(&f, &spec, &mut out).unwrap();
        assert_eq!(&out[..2], &[0.0, 200.0]);
        assert_eq!(&out[2..4], &[0.0, 200.0], "gray feeds every plane");
        let f = frame(5, 1, PixelFormat::Gray8, |x, _, _| [0, 100, 200, 251, 0][x]);
        preprocess_into(&f, &spec, &mut out).unwrap();
        assert_eq!(&out[..2], &[0.0, 226.0], "225.5 rounds up");
    }

    #[test]
    fn upscale_fades_to_black_past_the_last_pixel_like_opencv() {
        let f = frame(2, 1, PixelFormat::Gray8, |_, _, _| 160);
        let spec = unit_spec(4, 1, ResizeMode::Stretch);
        let mut out = vec![0.0; spec.tensor_len()];
        preprocess_into(&f, &spec, &mut out).unwrap();
        // Source positions 0, 0.5, 1, 1.5: the last blends with the border.
        assert_eq!(&out[..4], &[160.0, 160.0, 160.0, 80.0]);
    }

    #[test]
    fn normalisation_uses_plane_mean_and_std() {
        let f = frame(1, 1, PixelFormat::Bgr8, |_, _, c| [103, 116, 124][c]);
        let spec = PreprocessSpec::nanodet(1, 1, ResizeMode::Stretch);
        let mut out = vec![0.0; 3];
        preprocess_into(&f, &spec, &mut out).unwrap();
        assert!((out[0] - (103.0 - 103.53) / 57.375).abs() < 1e-6);
        assert!((out[2] - (124.0 - 123.675) / 58.395).abs() < 1e-6);
    }

    #[test]
    fn letterbox_centres_and_pads_with_normalised_black() {
        let f = frame(8, 4, PixelFormat::Gray8, |_, _, _| 255);
        let spec = PreprocessSpec::nanodet(8, 8, ResizeMode::Letterbox);
        let mut out = vec![0.0; spec.tensor_len()];
        let t = preprocess_into(&f, &spec, &mut out).unwrap();
        assert_eq!(
            (t.pad_x, t.pad_y, t.scale_x, t.scale_y),
            (0.0, 2.0, 1.0, 1.0)
        );
        let odd = placement(3, 1, &spec);
        assert_eq!(odd.pad_x, 0.0);
        assert!(
            (odd.pad_y - (4.0 - 4.0 / 3.0)).abs() < 1e-5,
            "fractional padding, exactly centred"
        );
        let black = -103.53 / 57.375;
        let white = (255.0 - 103.53) / 57.375;
        assert!((out[0] - black).abs() < 1e-6, "top padding row");
        assert!((out[2 * 8] - white).abs() < 1e-5, "first content row");
        assert!((out[6 * 8] - black).abs() < 1e-6, "bottom padding row");
    }

    #[test]
    fn one_pixel_image_covers_the_input() {
        let f = frame(1, 1, PixelFormat::Rgb8, |_, _, _| 200);
        for resize in [ResizeMode::Stretch, ResizeMode::Letterbox] {
            let spec = unit_spec(16, 16, resize);
            let mut out = vec![0.0; spec.tensor_len()];
            let t = preprocess_into(&f, &spec, &mut out).unwrap();
            assert_eq!(
                (t.scale_x, t.scale_y, t.pad_x, t.pad_y),
                (16.0, 16.0, 0.0, 0.0)
            );
            assert_eq!(out[0], 200.0);
            assert!(out.iter().all(|&v| (0.0..=200.0).contains(&v)));
        }
    }

    #[test]
    fn wrong_buffer_size_is_an_error_not_a_panic() {
        let f = frame(2, 2, PixelFormat::Gray8, |_, _, _| 0);
        let spec = unit_spec(4, 4, ResizeMode::Stretch);
        let err = preprocess_into(&f, &spec, &mut [0.0; 5]).unwrap_err();
        assert!(err.to_string().contains("needs 48"));
    }

    /// The blend written the plain way, pixel by pixel and columns before
    /// rows, straight from the taps: what the row-at-a-time code must equal.
    fn reference(frame: &Frame, spec: &PreprocessSpec) -> Vec<f32> {
        let t = placement(frame.width(), frame.height(), spec);
        let frame = frame.padded_with_black(frame.width().max(2), frame.height().max(2));
        let c = frame.format().channels();
        let columns: Vec<Taps> = taps(
            spec.width,
            frame.width(),
            f64::from(t.scale_x),
            f64::from(t.pad_x),
        )
        .collect();
        let rows: Vec<Taps> = taps(
            spec.height,
            frame.height(),
            f64::from(t.scale_y),
            f64::from(t.pad_y),
        )
        .collect();
        let at = |x: usize, y: usize, ch: usize| {
            u32::from(frame.data()[(y * frame.width() + x) * c + ch])
        };
        let mut out = vec![0.0; spec.tensor_len()];
        for (y, row) in rows.iter().enumerate() {
            for (x, col) in columns.iter().enumerate() {
                for plane in 0..3 {
                    let frame_channel = match (c, spec.channel_order, frame.format()) {
                        (1, _, _) => 0,
                        (_, ChannelOrder::Bgr, PixelFormat::Rgb8)
                        | (_, ChannelOrder::Rgb, PixelFormat::Bgr8) => 2 - plane,
                        _ => plane,
                    };
                    let across = |yy: usize| {
                        at(col.first, yy, frame_channel) * col.weight_first
                            + at(col.first + 1, yy, frame_channel) * col.weight_second
                    };
                    let v = (across(row.first) * row.weight_first
                        + across(row.first + 1) * row.weight_second
                        + 512)
                        >> 10;
                    out[plane * spec.width * spec.height + y * spec.width + x] =
                        (v as f32 - spec.mean[plane]) / spec.std[plane];
                }
            }
        }
        out
    }

    proptest! {
        // Box -> network coordinates -> back is the identity, for any frame
        // size and both resize modes.
        #[test]
        fn letterbox_round_trip(
            fw in 1usize..4000, fh in 1usize..4000,
            x in 0.0f32..1.0, y in 0.0f32..1.0, w in 0.0f32..1.0, h in 0.0f32..1.0,
            letterbox in any::<bool>(),
        ) {
            let resize = if letterbox { ResizeMode::Letterbox } else { ResizeMode::Stretch };
            let spec = unit_spec(320, 320, resize);
            let t = placement(fw, fh, &spec);
            let x1 = x * fw as f32;
            let y1 = y * fh as f32;
            let x2 = (x1 + w * fw as f32).min(fw as f32);
            let y2 = (y1 + h * fh as f32).min(fh as f32);
            let (nx1, ny1) = t.to_network(x1, y1);
            let (nx2, ny2) = t.to_network(x2, y2);
            prop_assert!(nx1 >= -1e-3 && nx2 <= 320.0 + 1e-2 && ny1 >= -1e-3 && ny2 <= 320.0 + 1e-2);
            let back = t.box_to_image([nx1, ny1, nx2, ny2]);
            let tol = 1e-3 * fw.max(fh) as f32;
            for (a, b) in back.iter().zip([x1, y1, x2, y2]) {
                prop_assert!((a - b).abs() <= tol, "{back:?} vs {:?}", [x1, y1, x2, y2]);
            }
        }

        // Every value equals the plain per-pixel blend, for any sizes,
        // formats, channel orders and both resize modes.
        #[test]
        fn equals_the_per_pixel_blend(
            fw in 1usize..70, fh in 1usize..70, dw in 1usize..50, dh in 1usize..50,
            format in prop::sample::select(vec![PixelFormat::Gray8, PixelFormat::Rgb8, PixelFormat::Bgr8]),
            rgb in any::<bool>(), letterbox in any::<bool>(), seed in any::<u64>(),
        ) {
            let f = frame(fw, fh, format, |x, y, c| {
                (seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> ((x * 7 + y * 13 + c * 5) % 56)) as u8
            });
            let resize = if letterbox { ResizeMode::Letterbox } else { ResizeMode::Stretch };
            let spec = PreprocessSpec {
                channel_order: if rgb { ChannelOrder::Rgb } else { ChannelOrder::Bgr },
                ..PreprocessSpec::nanodet(dw, dh, resize)
            };
            let mut out = vec![0.0; spec.tensor_len()];
            preprocess_into(&f, &spec, &mut out).unwrap();
            prop_assert_eq!(out, reference(&f, &spec));
        }
    }
}
