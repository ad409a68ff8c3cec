//! Camera pixel formats made from a real photo (as a UVC camera would
//! deliver it) convert back to the photo and still detect the same object.

#![allow(clippy::unwrap_used)]

mod support;

use nanodetd::capture::{BufferLayout, CameraFormat, to_frame};
use nanodetd::frame::Frame;
use support::{assets, live_detector, model, sample};

/// BT.601 limited range, the inverse of what cameras are decoded with.
fn ycbcr(r: u8, g: u8, b: u8) -> [u8; 3] {
    let (r, g, b) = (f32::from(r), f32::from(g), f32::from(b));
    let y = 16.0 + 0.257 * r + 0.504 * g + 0.098 * b;
    let cb = 128.0 - 0.148 * r - 0.291 * g + 0.439 * b;
    let cr = 128.0 + 0.439 * r - 0.368 * g - 0.071 * b;
    [y, cb, cr].map(|v| v.round().clamp(0.0, 255.0) as u8)
}

#[test]
fn yuyv_and_nv12_from_a_real_photo_round_trip_and_detect() {
    let Some(a) = assets("yuyv_and_nv12_from_a_real_photo_round_trip_and_detect") else {
        return;
    };
    let photo = image::open(sample(&a, "skimage_chelsea.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = (photo.width() as usize, photo.height() as usize);
    let px = |x: usize, y: usize| {
        let p = photo.get_pixel(x as u32, y as u32);
        ycbcr(p[0], p[1], p[2])
    };
    // YUYV with rows padded by 64 bytes, as some drivers do.
    let stride = w.div_ceil(2) * 4 + 64;
    let mut yuyv = vec![0u8; stride * h];
    for y in 0..h {
        for x in (0..w).step_by(2) {
            let (p0, p1) = (px(x, y), px((x + 1).min(w - 1), y));
            let o = y * stride + x * 2;
            yuyv[o..o + 4].copy_from_slice(&[p0[0], p0[1], p1[0], p0[2]]);
        }
    }
    // NV12 rows hold whole chroma pairs: an odd width rounds up.
    let nv12_stride = w.div_ceil(2) * 2;
    let mut nv12 = vec![0u8; nv12_stride * (h + h.div_ceil(2))];
    for y in 0..h {
        for x in 0..w {
            let p = px(x, y);
            nv12[y * nv12_stride + x] = p[0];
            if y % 2 == 0 && x % 2 == 0 {
                let o = nv12_stride * h + (y / 2) * nv12_stride + x;
                nv12[o..o + 2].copy_from_slice(&[p[1], p[2]]);
            }
        }
    }
    let detector = live_detector(&model(&a, "nanodet-plus-m_320"));
    let mut session = detector.session().unwrap();
    let original = Frame::from_file(&sample(&a, "skimage_chelsea.png")).unwrap();
    let reference = session.detect(&original).unwrap();
    for (format, bytes, bytes_per_line) in [
        (CameraFormat::Yuyv, &yuyv, stride),
        (CameraFormat::Nv12, &nv12, nv12_stride),
    ] {
        let layout = BufferLayout {
            format,
            width: w,
            height: h,
            bytes_per_line,
        };
        let frame = to_frame(&layout, bytes, "test camera").unwrap();
        // Back to RGB order to compare with the photo.
        let mut error = 0u64;
        for (bgr, rgb) in frame
            .data()
            .chunks_exact(3)
            .zip(photo.as_raw().chunks_exact(3))
        {
            for c in 0..3 {
                error += u64::from(bgr[2 - c].abs_diff(rgb[c]));
            }
        }
        let mean = error as f64 / (w * h * 3) as f64;
        assert!(mean < 4.0, "{format:?}: mean error {mean}");
        let found = session.detect(&frame).unwrap();
        assert_eq!(detector.class_name(found[0].class_id), "cat", "{format:?}");
        assert!(
            (found[0].score - reference[0].score).abs() < 0.05,
            "{format:?}: {found:?} vs {reference:?}"
        );
    }
}

#[test]
fn sample_folder_plays_every_photo_once() {
    let Some(a) = assets("sample_folder_plays_every_photo_once") else {
        return;
    };
    let mut source = nanodetd::capture::FolderSource::open(&a.join("samples"), false).unwrap();
    let listed = source.files().len();
    assert!(listed >= 7, "{listed} files");
    let mut decoded = 0;
    while let Some((path, frame)) = source.next_frame() {
        let frame = frame.unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(frame.width() > 0);
        decoded += 1;
    }
    assert_eq!(decoded, listed);
}
