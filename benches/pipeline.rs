//! Criterion benches for the CPU stages around inference: decoding a
//! camera's JPEG into a frame, preprocessing a 1080p frame, decode + NMS
//! on real NanoDet-Plus outputs, and rendering a snapshot.
//!
//! Inference itself is measured by `nanodetd bench` beside onnxruntime
//! (see docs/PERFORMANCE.md).

use std::hint::black_box;
use std::path::PathBuf;
use std::sync::Arc;

use criterion::{Criterion, criterion_group, criterion_main};

use nanodetd::backend::{self, EngineOptions, InputBatch};
use nanodetd::detector::{DetectionParams, Detector};
use nanodetd::frame::{Frame, PixelFormat};
use nanodetd::model::{DecodeParams, LayoutOverrides};
use nanodetd::postprocess::{NmsParams, class_aware_nms};
use nanodetd::preprocess::{PreprocessSpec, ResizeMode, preprocess_into};

fn assets() -> PathBuf {
    std::env::var_os("NANODETD_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

fn camera_frame() -> Frame {
    let (w, h) = (1920, 1080);
    let data: Vec<u8> = (0..w * h * 3).map(|i| ((i * 7919) % 251) as u8).collect();
    Frame::from_packed(w, h, PixelFormat::Bgr8, data, "bench").expect("valid frame")
}

fn preprocess(c: &mut Criterion) {
    let frame = camera_frame();
    for resize in [ResizeMode::Stretch, ResizeMode::Letterbox] {
        let spec = PreprocessSpec::nanodet(320, 320, resize);
        let mut out = vec![0.0; spec.tensor_len()];
        c.bench_function(
            &format!("preprocess 1920x1080 bgr -> 320x320 {resize:?}"),
            |b| {
                b.iter(|| {
                    preprocess_into(black_box(&frame), &spec, &mut out).expect("sized buffer")
                })
            },
        );
    }
    // The photo `benches/compare_onnxruntime.sh` times beside Python, at
    // nanodet-plus-m_416's input.
    let photo = Frame::from_file(&assets().join("samples/hpc203_bus.jpg")).expect("sample photo");
    let spec = PreprocessSpec::nanodet(416, 416, ResizeMode::Stretch);
    let mut out = vec![0.0; spec.tensor_len()];
    c.bench_function("preprocess 810x1080 photo -> 416x416 Stretch", |b| {
        b.iter(|| preprocess_into(black_box(&photo), &spec, &mut out).expect("sized buffer"))
    });
}

/// A 1280x720 JPEG, the size of a UVC camera's MJPEG frame, decoded as a
/// camera's frame (from memory, onto the heap) and as a photo in a folder
/// (the file and the frame in mappings of their own), each beside the
/// image crate's own `load_from_memory` on the heap. The photo's
/// mappings cost their page faults on every decode: why a camera's frames,
/// decoded 30 times a second at one size, stay on the heap.
fn jpeg_to_frame(c: &mut Criterion) {
    let path = assets().join("samples/hpc203_zidane.jpg");
    let jpeg = std::fs::read(&path).expect("sample photo");
    c.bench_function(
        "jpeg 1280x720 bytes -> frame, heap (nanodetd: MJPEG)",
        |b| b.iter(|| Frame::decode(black_box(&jpeg), "bench").expect("decodes")),
    );
    c.bench_function(
        "jpeg 1280x720 bytes -> rgb, heap (image::load_from_memory)",
        |b| {
            b.iter(|| {
                image::load_from_memory(black_box(&jpeg))
                    .expect("decodes")
                    .into_rgb8()
            })
        },
    );
    c.bench_function(
        "jpeg 1280x720 file -> frame, own mappings (nanodetd: folder)",
        |b| b.iter(|| Frame::from_file(black_box(&path)).expect("decodes")),
    );
    c.bench_function(
        "jpeg 1280x720 file -> rgb, heap (fs::read + image::load_from_memory)",
        |b| {
            b.iter(|| {
                let bytes = std::fs::read(black_box(&path)).expect("reads");
                image::load_from_memory(&bytes)
                    .expect("decodes")
                    .into_rgb8()
            })
        },
    );
}

fn decode_and_nms(c: &mut Criterion) {
    let model = assets().join("models/nanodet-plus-m_320.onnx");
    let image = assets().join("samples/hpc203_bus.jpg");
    if !model.exists() || !image.exists() {
        eprintln!(
            "skipping decode+nms bench: {} not found (set NANODETD_ASSETS)",
            model.display()
        );
        return;
    }
    let engine = backend::open_engine(
        backend::BackendKind::Tract,
        &model,
        &EngineOptions::default(),
    )
    .expect("model loads");
    let detector = Detector::new(
        Arc::clone(&engine),
        &LayoutOverrides::default(),
        None,
        DetectionParams::LIVE,
    )
    .expect("layout");
    let (layout, spec) = (detector.layout(), detector.preprocess_spec());
    let frame = Frame::from_file(&image).expect("sample decodes");
    let mut input = vec![0.0; spec.tensor_len()];
    preprocess_into(&frame, spec, &mut input).expect("sized buffer");
    let mut session = engine.new_session().expect("session");
    session.run(InputBatch::host(&input, 1)).expect("inference");
    let raw: Vec<Vec<f32>> = session
        .outputs()
        .for_image(0)
        .iter()
        .map(|s| s.to_vec())
        .collect();
    let raw_refs: Vec<&[f32]> = raw.iter().map(Vec::as_slice).collect();
    let nms = NmsParams {
        iou_threshold: 0.6,
        max_detections: 100,
    };
    for score in [0.35f32, 0.05] {
        let params = DecodeParams {
            score_threshold: score,
            top_k_per_level: Some(1000),
        };
        let mut candidates = Vec::new();
        c.bench_function(
            &format!("decode+nms nanodet-plus-m_320 bus.jpg score>{score}"),
            |b| {
                b.iter(|| {
                    candidates.clear();
                    layout
                        .decode(black_box(&raw_refs), &params, &mut candidates)
                        .expect("decodes");
                    black_box(class_aware_nms(&mut candidates, &nms))
                })
            },
        );
    }
}

/// A snapshot of a 1280x720 photo (the writer thread's work per picture),
/// beside the image crate's own JPEG encoder on the same frame.
fn snapshot(c: &mut Criterion) {
    use nanodetd::daemon::snapshot::render::{RenderSettings, Subject, render};
    let frame = Frame::from_file(&assets().join("samples/hpc203_zidane.jpg")).expect("decodes");
    let subject = Subject {
        bbox: [100.0, 100.0, 300.0, 400.0],
        caption: "person 87%",
    };
    let full = RenderSettings {
        draw: true,
        crop: false,
        margin: 0.25,
        height: None,
        quality: 80,
    };
    c.bench_function("snapshot 1280x720 q80: box, label, jpeg-encoder", |b| {
        b.iter(|| render(black_box(&frame), &subject, &full).expect("renders"))
    });
    let scaled = RenderSettings {
        height: Some(480),
        ..full
    };
    c.bench_function("snapshot 1280x720 q80 scaled to 480 high", |b| {
        b.iter(|| render(black_box(&frame), &subject, &scaled).expect("renders"))
    });
    c.bench_function("jpeg 1280x720 q80, image crate's encoder (peer)", |b| {
        b.iter(|| black_box(&frame).to_jpeg(80).expect("encodes"))
    });
}

criterion_group!(benches, jpeg_to_frame, preprocess, decode_and_nms, snapshot);
criterion_main!(benches);
