//! Camera pixel formats made from a real photo (as a UVC camera would
//! deliver it) convert back to the photo and still detect the same object.

#![allow(clippy::unwrap_used)]

use crate::support::{assets, live_detector, model, sample};
use nanodetd::capture::{CameraFormat, encode, to_frame};
use nanodetd::frame::Frame;

#[test]
fn yuyv_and_nv12_from_a_real_photo_round_trip_and_detect() {
    let Some(a) = assets("yuyv_and_nv12_from_a_real_photo_round_trip_and_detect") else {
        return;
    };
    let photo = image::open(sample(&a, "skimage_chelsea.png"))
        .unwrap()
        .to_rgb8();
    let (w, h) = (photo.width() as usize, photo.height() as usize);
    let detector = live_detector(&model(&a, "nanodet-plus-m_320"));
    let mut session = detector.session().unwrap();
    let original = Frame::from_file(&sample(&a, "skimage_chelsea.png")).unwrap();
    let reference = session.detect(&original).unwrap();
    // YUYV with rows padded by 64 bytes, as some drivers do; NV12 rows
    // hold whole chroma pairs, so an odd width rounds up.
    for (format, pad) in [(CameraFormat::Yuyv, 64), (CameraFormat::Nv12, 0)] {
        let (layout, bytes) = encode(&original, format, pad).unwrap();
        assert_eq!(
            layout.bytes_per_line,
            w.div_ceil(2) * [2, 4][usize::from(format == CameraFormat::Yuyv)] + pad
        );
        let frame = to_frame(&layout, &bytes, "test camera").unwrap();
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

/// JPEG segments: (marker, whole segment bytes) up to the start of scan,
/// then the rest.
fn split_segments(jpeg: &[u8]) -> (Vec<(u8, Vec<u8>)>, Vec<u8>) {
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
    let mut at = 2;
    let mut segments = Vec::new();
    loop {
        assert_eq!(jpeg[at], 0xFF, "marker expected at {at}");
        let marker = jpeg[at + 1];
        let len = usize::from(u16::from_be_bytes([jpeg[at + 2], jpeg[at + 3]]));
        if marker == 0xDA {
            return (segments, jpeg[at..].to_vec());
        }
        segments.push((marker, jpeg[at..at + 2 + len].to_vec()));
        at += 2 + len;
    }
}

#[test]
fn uvc_mjpeg_without_huffman_tables_decodes_like_the_full_jpeg() {
    let Some(a) = assets("uvc_mjpeg_without_huffman_tables_decodes_like_the_full_jpeg") else {
        return;
    };
    let original = Frame::from_file(&sample(&a, "skimage_chelsea.png")).unwrap();
    let jpeg = original.to_jpeg(85).unwrap();
    let (segments, scan) = split_segments(&jpeg);
    assert!(
        segments.iter().any(|(m, _)| *m == 0xC4),
        "the encoder wrote no DHT to take out"
    );
    // What UVC webcams send: an APP0 "AVI1" segment in place of JFIF, and
    // no DHT: the decoder must supply JPEG's standard (Annex K) tables.
    let mut uvc = vec![0xFF, 0xD8];
    uvc.extend_from_slice(&[0xFF, 0xE0, 0x00, 0x10]);
    uvc.extend_from_slice(b"AVI1\0\0\0\0\0\0\0\0\0\0");
    for (marker, bytes) in &segments {
        if *marker != 0xC4 && *marker != 0xE0 {
            uvc.extend_from_slice(bytes);
        }
    }
    uvc.extend_from_slice(&scan);
    let layout = nanodetd::capture::BufferLayout {
        format: CameraFormat::Mjpeg,
        width: original.width(),
        height: original.height(),
        bytes_per_line: 0,
    };
    let full = to_frame(&layout, &jpeg, "full").unwrap();
    let stripped = to_frame(&layout, &uvc, "uvc frame 1").unwrap();
    assert_eq!(
        (stripped.width(), stripped.height()),
        (full.width(), full.height())
    );
    assert_eq!(stripped.data(), full.data());
}
