//! The whole pipeline (ONNX load, shape inference, layout detection,
//! inference, decoding, NMS, mapping back) on tiny NanoDet-shaped models
//! that the test builds itself, so it runs even without the shared assets.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::sync::Arc;

use crate::support::{TinyOutput, one_hot_dfl, tiny_nanodet};
use nanodetd::backend::{self, BackendKind, EngineOptions};
use nanodetd::detector::{DetectionParams, Detector};
use nanodetd::frame::{Frame, PixelFormat};
use nanodetd::model::{LayoutKind, LayoutOverrides};

fn detector(dir: &Path, bytes: Vec<u8>, names: &[&str]) -> Arc<Detector> {
    let path = dir.join("tiny.onnx");
    std::fs::write(&path, bytes).unwrap();
    let engine =
        backend::open_engine(BackendKind::Tract, &path, &EngineOptions::default()).unwrap();
    let names = names.iter().map(|s| s.to_string()).collect();
    Arc::new(
        Detector::new(
            engine,
            &LayoutOverrides::default(),
            Some(names),
            DetectionParams::LIVE,
        )
        .unwrap(),
    )
}

fn gray_frame(w: usize, h: usize) -> Frame {
    Frame::from_packed(w, h, PixelFormat::Gray8, vec![128; w * h], "tiny").unwrap()
}

fn assert_box(got: [f32; 4], want: [f32; 4]) {
    for (g, w) in got.iter().zip(want) {
        assert!((g - w).abs() < 1e-3, "box {got:?}, expected {want:?}");
    }
}

#[test]
fn plus_layout_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    // 32x32 input: 4x4 + 2x2 + 1x1 + 1x1 = 22 priors; 3 classes + 32 DFL.
    let mut values = vec![0.0; 22 * 35];
    let prior = 16 + 1; // stride 16, cell (1, 0): centre (16, 0)
    values[prior * 35 + 2] = 0.9;
    values[prior * 35 + 3..prior * 35 + 35].copy_from_slice(&one_hot_dfl([1, 0, 1, 1]));
    let model = tiny_nanodet(
        32,
        &[TinyOutput {
            strides: vec![8, 16, 32, 64],
            columns: 35,
            values,
        }],
    );
    let d = detector(dir.path(), model, &["a", "b", "c"]);
    assert_eq!(d.layout().kind, LayoutKind::Plus);
    let found = d.session().unwrap().detect(&gray_frame(64, 32)).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(
        (d.class_name(found[0].class_id), found[0].score),
        ("c", 0.9)
    );
    // Network box [0, 0, 32, 16]; the 64x32 frame was stretched by 1/2 in x.
    assert_box(found[0].bbox, [0.0, 0.0, 64.0, 16.0]);
}

#[test]
fn raw_layout_end_to_end_with_letterbox() {
    let dir = tempfile::tempdir().unwrap();
    let levels = [(8, 16), (16, 4), (32, 1)];
    let mut outputs: Vec<TinyOutput> = levels
        .iter()
        .map(|&(s, n)| TinyOutput {
            strides: vec![s],
            columns: 3,
            values: vec![0.0; n * 3],
        })
        .collect();
    let mut boxes: Vec<TinyOutput> = levels
        .iter()
        .map(|&(s, n)| TinyOutput {
            strides: vec![s],
            columns: 32,
            values: vec![0.0; n * 32],
        })
        .collect();
    // Stride 8, cell (1, 1): centre (12, 12) with the legacy +0.5.
    let prior = 4 + 1;
    outputs[0].values[prior * 3] = 0.7;
    boxes[0].values[prior * 32..prior * 32 + 32].copy_from_slice(&one_hot_dfl([1, 1, 1, 1]));
    outputs.extend(boxes);
    let d = detector(dir.path(), tiny_nanodet(32, &outputs), &["a", "b", "c"]);
    assert_eq!(d.layout().kind, LayoutKind::Raw);
    // A 64x32 frame is letterboxed at ratio 1/2 with 8 px of padding on top.
    let found = d.session().unwrap().detect(&gray_frame(64, 32)).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].class_id, 0);
    assert_box(found[0].bbox, [8.0, 0.0, 40.0, 24.0]);
}

#[test]
fn fused_layout_end_to_end() {
    let dir = tempfile::tempdir().unwrap();
    // 16 + 4 + 1 = 21 priors; 4 distances then 3 scores.
    let mut values = vec![0.0; 21 * 7];
    values[20 * 7..].copy_from_slice(&[0.25, 0.25, 0.5, 0.5, 0.0, 0.8, 0.1]);
    let model = tiny_nanodet(
        32,
        &[TinyOutput {
            strides: vec![8, 16, 32],
            columns: 7,
            values,
        }],
    );
    let d = detector(dir.path(), model, &["a", "b", "c"]);
    assert_eq!(d.layout().kind, LayoutKind::Fused);
    let found = d.session().unwrap().detect(&gray_frame(32, 32)).unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!((found[0].class_id, found[0].score), (1, 0.8));
    // Centre (16, 16), distances 8, 8, 16, 16.
    assert_box(found[0].bbox, [8.0, 8.0, 32.0, 32.0]);
}

#[test]
fn unknown_layout_names_the_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_nanodet(
        32,
        &[TinyOutput {
            strides: vec![8, 16, 32, 64],
            columns: 7,
            values: vec![0.0; 22 * 7],
        }],
    );
    let path = dir.path().join("odd.onnx");
    std::fs::write(&path, model).unwrap();
    let engine =
        backend::open_engine(BackendKind::Tract, &path, &EngineOptions::default()).unwrap();
    let err = Detector::new(
        engine,
        &LayoutOverrides::default(),
        None,
        DetectionParams::LIVE,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(err.contains("input [1, 3, 32, 32]"), "{err}");
    assert!(err.contains("output0 [1, 22, 7]"), "{err}");
    assert!(err.contains("known layouts: plus"), "{err}");
}
