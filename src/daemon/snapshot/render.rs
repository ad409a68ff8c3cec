//! A snapshot's picture: the frame (or the object's part of it, with a
//! margin), scaled to the configured height, with the object's box and
//! label drawn, as a JPEG. Pure: a frame and settings in, bytes out.

use embedded_graphics::mono_font::MonoTextStyleBuilder;
use embedded_graphics::mono_font::ascii::FONT_10X20;
use embedded_graphics::pixelcolor::{Rgb888, RgbColor};
use embedded_graphics::prelude::{DrawTarget, OriginDimensions, Point, Primitive, Size};
use embedded_graphics::primitives::{PrimitiveStyle, Rectangle};
use embedded_graphics::text::{Baseline, Text};
use embedded_graphics::{Drawable, Pixel};

use crate::frame::{Frame, PixelFormat};

/// How a snapshot is made.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenderSettings {
    /// Draw the box and the label.
    pub draw: bool,
    /// Crop to the box and its margin.
    pub crop: bool,
    /// The margin, as a share of the box's larger side.
    pub margin: f32,
    /// Scale down to at most this height.
    pub height: Option<u32>,
    /// JPEG quality, 1 to 100.
    pub quality: u8,
}

/// What is drawn: the object's box in frame pixels and its caption.
#[derive(Debug, Clone, Copy)]
pub struct Subject<'a> {
    /// `[x1, y1, x2, y2]` in the frame's pixels.
    pub bbox: [f32; 4],
    /// Drawn above the box, e.g. `person 87%`.
    pub caption: &'a str,
}

/// Why a snapshot could not be made.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    /// The encoder refused the picture.
    #[error("cannot encode a {width}x{height} JPEG")]
    Encode {
        /// Width in pixels.
        width: usize,
        /// Height in pixels.
        height: usize,
        /// The encoder's reason.
        #[source]
        source: jpeg_encoder::EncodingError,
    },
}

/// The box's colour: red, which JPEG keeps visible on most scenes.
pub const BOX_COLOUR: [u8; 3] = [255, 32, 32];

/// The part of a `width`×`height` frame a snapshot shows, `[x0, y0, x1,
/// y1)` in whole pixels: the whole frame, or with `crop` the box grown by
/// `margin` times its larger side, within the frame and never empty.
pub fn region(
    bbox: [f32; 4],
    (width, height): (usize, usize),
    settings: &RenderSettings,
) -> [usize; 4] {
    let (w, h) = (width.max(1), height.max(1));
    if !settings.crop {
        return [0, 0, w, h];
    }
    let side = (bbox[2] - bbox[0]).max(bbox[3] - bbox[1]).max(0.0);
    let grow = side * settings.margin;
    // NaN and infinities from a hostile model clamp to the frame's edges.
    let clamp = |v: f32, hi: usize| {
        if v.is_nan() {
            0
        } else {
            (v.max(0.0) as usize).min(hi)
        }
    };
    let x0 = clamp((bbox[0] - grow).floor(), w - 1);
    let y0 = clamp((bbox[1] - grow).floor(), h - 1);
    let x1 = clamp((bbox[2] + grow).ceil(), w).max(x0 + 1);
    let y1 = clamp((bbox[3] + grow).ceil(), h).max(y0 + 1);
    [x0, y0, x1, y1]
}

/// The snapshot of `frame` for `subject`, as JPEG bytes.
pub fn render(
    frame: &Frame,
    subject: &Subject<'_>,
    settings: &RenderSettings,
) -> Result<Vec<u8>, RenderError> {
    let [x0, y0, x1, y1] = region(subject.bbox, (frame.width(), frame.height()), settings);
    let mut picture = crop_to_rgb(frame, [x0, y0, x1, y1]);
    // The box in the picture's pixels, before any scaling.
    let mut bbox = [
        subject.bbox[0] - x0 as f32,
        subject.bbox[1] - y0 as f32,
        subject.bbox[2] - x0 as f32,
        subject.bbox[3] - y0 as f32,
    ];
    if let Some(limit) = settings.height
        && picture.height() > limit
    {
        let scale = f64::from(limit) / f64::from(picture.height());
        let width = ((f64::from(picture.width()) * scale).round() as u32).max(1);
        picture = image::imageops::resize(
            &picture,
            width,
            limit,
            image::imageops::FilterType::Triangle,
        );
        bbox = bbox.map(|v| (f64::from(v) * scale) as f32);
    }
    if settings.draw {
        draw(&mut picture, bbox, subject.caption);
    }
    let (width, height) = (picture.width() as usize, picture.height() as usize);
    let mut jpeg = Vec::new();
    // Frames are at most 16384 pixels a side (config::MAX_SIDE), within
    // the encoder's 65535; saturating keeps a larger one an error.
    let side = |v: usize| u16::try_from(v).unwrap_or(u16::MAX);
    jpeg_encoder::Encoder::new(&mut jpeg, settings.quality.clamp(1, 100))
        .encode(
            picture.as_raw(),
            side(width),
            side(height),
            jpeg_encoder::ColorType::Rgb,
        )
        .map_err(|source| RenderError::Encode {
            width,
            height,
            source,
        })?;
    Ok(jpeg)
}

/// The region's pixels as RGB, whatever the frame's layout.
fn crop_to_rgb(frame: &Frame, [x0, y0, x1, y1]: [usize; 4]) -> image::RgbImage {
    let channels = frame.format().channels();
    let stride = frame.width() * channels;
    let mut rgb = Vec::with_capacity((x1 - x0) * (y1 - y0) * 3);
    for row in frame.data().chunks_exact(stride).skip(y0).take(y1 - y0) {
        let row = &row[x0 * channels..x1 * channels];
        match frame.format() {
            PixelFormat::Rgb8 => rgb.extend_from_slice(row),
            PixelFormat::Bgr8 => rgb.extend(row.chunks_exact(3).flat_map(|p| [p[2], p[1], p[0]])),
            PixelFormat::Gray8 => rgb.extend(row.iter().flat_map(|&g| [g, g, g])),
        }
    }
    let (w, h) = ((x1 - x0) as u32, (y1 - y0) as u32);
    image::RgbImage::from_raw(w, h, rgb).unwrap_or_else(|| image::RgbImage::new(w, h))
}

/// An RGB picture as embedded-graphics' drawing target.
struct Canvas<'a>(&'a mut image::RgbImage);

impl OriginDimensions for Canvas<'_> {
    fn size(&self) -> Size {
        Size::new(self.0.width(), self.0.height())
    }
}

impl DrawTarget for Canvas<'_> {
    type Color = Rgb888;
    type Error = std::convert::Infallible;

    fn draw_iter<I: IntoIterator<Item = Pixel<Rgb888>>>(
        &mut self,
        pixels: I,
    ) -> Result<(), Self::Error> {
        let (w, h) = (self.0.width(), self.0.height());
        for Pixel(at, colour) in pixels {
            if let (Ok(x), Ok(y)) = (u32::try_from(at.x), u32::try_from(at.y))
                && x < w
                && y < h
            {
                self.0
                    .put_pixel(x, y, image::Rgb([colour.r(), colour.g(), colour.b()]));
            }
        }
        Ok(())
    }
}

/// The box, a line of 3 pixels or 1/240 of the height (thinner lines
/// blur into the photo once JPEG halves the colour's resolution), and the caption
/// in white on the box's colour above it (inside it at the top edge).
fn draw(picture: &mut image::RgbImage, bbox: [f32; 4], caption: &str) {
    let colour = Rgb888::new(BOX_COLOUR[0], BOX_COLOUR[1], BOX_COLOUR[2]);
    let thickness = (picture.height() / 240).max(3);
    // Out-of-frame corners are clipped by the canvas; the casts saturate.
    let corner = |x: f32, y: f32| Point::new(x.round() as i32, y.round() as i32);
    let top_left = corner(bbox[0], bbox[1]);
    let mut canvas = Canvas(picture);
    let Ok(()) = Rectangle::with_corners(top_left, corner(bbox[2], bbox[3]))
        .into_styled(PrimitiveStyle::with_stroke(colour, thickness))
        .draw(&mut canvas);
    let style = MonoTextStyleBuilder::new()
        .font(&FONT_10X20)
        .text_color(Rgb888::WHITE)
        .background_color(colour)
        .build();
    let above = top_left
        .y
        .saturating_sub(FONT_10X20.character_size.height as i32);
    let at = Point::new(top_left.x.max(0), above.max(0));
    // Only ASCII is in the font; anything else shows as `?`.
    let caption: String = caption
        .chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    let _ = Text::with_baseline(&caption, at, style, Baseline::Top).draw(&mut canvas);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> RenderSettings {
        RenderSettings {
            draw: true,
            crop: false,
            margin: 0.25,
            height: None,
            quality: 90,
        }
    }

    fn grey(width: usize, height: usize) -> Frame {
        Frame::from_packed(
            width,
            height,
            PixelFormat::Gray8,
            vec![128; width * height],
            "t",
        )
        .unwrap()
    }

    fn decode(jpeg: &[u8]) -> image::RgbImage {
        image::load_from_memory(jpeg).unwrap().to_rgb8()
    }

    fn is_box_colour(p: &image::Rgb<u8>) -> bool {
        p[0] > 200 && p[1] < 100 && p[2] < 100
    }

    /// Issue 19: the snapshot decodes, and its box is where the event says.
    #[test]
    fn the_box_is_drawn_where_the_event_says_issue_19() {
        let frame = grey(640, 480);
        let bbox = [100.0, 150.0, 300.0, 400.0];
        let jpeg = render(
            &frame,
            &Subject {
                bbox,
                caption: "person 87%",
            },
            &settings(),
        )
        .unwrap();
        let picture = decode(&jpeg);
        assert_eq!((picture.width(), picture.height()), (640, 480));
        // Along each edge, away from the caption: the box's colour.
        for (x, y) in [(200, 150), (200, 400), (100, 300), (300, 300)] {
            assert!(
                is_box_colour(picture.get_pixel(x, y)),
                "({x}, {y}): {:?}",
                picture.get_pixel(x, y)
            );
        }
        // Inside and outside: the frame's grey.
        for (x, y) in [(200, 275), (50, 50), (500, 450)] {
            let p = picture.get_pixel(x, y);
            assert!(
                p.0.iter().all(|&c| (118..=138).contains(&c)),
                "({x}, {y}): {p:?}"
            );
        }
    }

    #[test]
    fn a_crop_keeps_the_box_and_its_margin_within_the_frame() {
        let crop = RenderSettings {
            crop: true,
            ..settings()
        };
        // A 100x200 box: 50 pixels of margin on each side.
        assert_eq!(
            region([100.0, 100.0, 200.0, 300.0], (640, 480), &crop),
            [50, 50, 250, 350]
        );
        // At the frame's edge, clamped.
        assert_eq!(
            region([0.0, 400.0, 50.0, 480.0], (640, 480), &crop),
            [0, 380, 70, 480]
        );
        // A degenerate or hostile box still gives a pixel.
        assert_eq!(
            region([f32::NAN, 1e30, -5.0, f32::NEG_INFINITY], (640, 480), &crop),
            [0, 479, 1, 480]
        );
        let jpeg = render(
            &grey(640, 480),
            &Subject {
                bbox: [100.0, 100.0, 200.0, 300.0],
                caption: "cat",
            },
            &crop,
        )
        .unwrap();
        let picture = decode(&jpeg);
        assert_eq!((picture.width(), picture.height()), (200, 300));
        // The box's left edge, 50 pixels in.
        assert!(is_box_colour(picture.get_pixel(50, 150)));
    }

    #[test]
    fn a_tall_snapshot_is_scaled_to_the_height_with_its_box() {
        let small = RenderSettings {
            height: Some(240),
            ..settings()
        };
        let jpeg = render(
            &grey(640, 480),
            &Subject {
                bbox: [100.0, 100.0, 300.0, 400.0],
                caption: "dog",
            },
            &small,
        )
        .unwrap();
        let picture = decode(&jpeg);
        assert_eq!((picture.width(), picture.height()), (320, 240));
        assert!(
            is_box_colour(picture.get_pixel(50, 150)),
            "left edge at x = 50"
        );
    }
}
