//! The entry points the fuzzers drive (`fuzz/`, cargo-fuzz and libFuzzer
//! on nightly) and the corpus replay test runs on stable, so both reach
//! exactly the same code. Each takes arbitrary bytes, feeds them where
//! outside input enters the daemon, and panics only when an invariant
//! breaks: a panic here is a crash loop in the field, where every panic
//! outside a contained decoder aborts (`crate::contain`) and systemd
//! restarts into the same input.
//!
//! Each target first installs [`crate::contain`]'s hook, as the daemon
//! does, so that a panic a decoder's caller contains is not taken for a
//! crash, and every other panic still is (the fuzzer's own hook runs).
//!
//! Sizes are kept small (a 4 Mi-pixel budget, 2048-pixel sides) so that
//! the fuzzers spend their time on paths, not on big allocations, which
//! the budgets under test refuse anyway.

use std::collections::HashSet;
use std::path::Path;

use prost::Message as _;
use tract_onnx::pb::ModelProto;

use crate::capture::{BufferLayout, CameraFormat, Captured, to_frame};
use crate::config::{Config, topic_level_char};
use crate::frame::Frame;

/// The frame budget the image targets decode within.
const BUDGET: u64 = 1 << 22;

/// The daemon's panic hook, over the fuzzer's, once.
fn hook_as_the_daemon_does() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| crate::contain::install_hook(crate::contain::Uncontained::PreviousHook));
}

/// Config text, as `check-config`, start-up and every reload read it.
pub fn config_text(data: &[u8]) {
    hook_as_the_daemon_does();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(config) = Config::parse(text, Path::new("fuzz.toml")) {
        // What the daemon does with a config it accepted must not fail.
        let budgets = config
            .cameras
            .iter()
            .map(|c| c.frame_budget())
            .fold(0u64, u64::saturating_add);
        assert!(budgets <= config.capture.max_pixels_total.get());
        for camera in &config.cameras {
            assert!(camera.same_source(camera));
        }
        let _ = config.mqtt.embedded_broker_addr();
        let _ = config.mqtt.prefix_for(&config.device_id);
    }
}

/// An image file's bytes, as a replay folder reads them.
pub fn image_bytes(data: &[u8]) {
    hook_as_the_daemon_does();
    if let Ok(frame) = Frame::decode_within(data, "fuzz", BUDGET) {
        assert!((frame.width() * frame.height()) as u64 <= BUDGET);
    }
}

/// A little-endian u16 from `data` at `at`, 0 past its end.
fn u16_at(data: &[u8], at: usize) -> usize {
    usize::from(u16::from_le_bytes([
        data.get(at).copied().unwrap_or(0),
        data.get(at + 1).copied().unwrap_or(0),
    ]))
}

/// A raw V4L2 buffer: the first 7 bytes choose the format, size and row
/// padding the driver claimed, the rest is the buffer.
pub fn v4l2_buffer(data: &[u8]) {
    hook_as_the_daemon_does();
    if data.len() < 7 {
        return;
    }
    let format = CameraFormat::RAW[usize::from(data[0]) % CameraFormat::RAW.len()];
    let (width, height) = (u16_at(data, 1) % 2048, u16_at(data, 3) % 2048);
    let padding = u16_at(data, 5) % 256;
    let Some(bytes) = data.get(7..) else { return };
    // bytes_per_line as a driver reports it: anything, padding included.
    let layout = BufferLayout {
        format,
        width,
        height,
        bytes_per_line: width.saturating_mul(3).saturating_add(padding),
    };
    // Both ways a frame is converted: kept raw for a GPU, then converted,
    // and converted at once.
    if let Ok(raw) = Captured::raw(layout, bytes, "fuzz".into())
        && let Ok(frame) = raw.into_frame()
    {
        assert_eq!((frame.width(), frame.height()), (width, height));
    }
    if let Ok(frame) = to_frame(&layout, bytes, "fuzz") {
        assert_eq!((frame.width(), frame.height()), (width, height));
    }
}

/// A UVC camera's MJPEG buffer: the first 4 bytes are the negotiated size,
/// the rest the JPEG the camera sent, whatever size it declares.
pub fn uvc_mjpeg(data: &[u8]) {
    hook_as_the_daemon_does();
    if data.len() < 4 {
        return;
    }
    let (width, height) = (u16_at(data, 0) % 2048, u16_at(data, 2) % 2048);
    let layout = BufferLayout {
        format: CameraFormat::Mjpeg,
        width,
        height,
        bytes_per_line: 0,
    };
    if let Ok(frame) = to_frame(&layout, &data[4..], "fuzz") {
        let most = (width as u64 + 16) * (height as u64 + 16);
        assert!((frame.width() * frame.height()) as u64 <= most);
    }
}

/// An H.264 byte stream, as an IP camera or a raw file sends it: cut into
/// access units (fed in pieces of an odd size, as reads and packets
/// split it), each decoded, then the pictures held for reordering. Every
/// picture must fit the budget and convert.
pub fn h264_stream(data: &[u8]) {
    use crate::capture::h264::{AccessUnits, H264Decoder, MAX_ACCESS_UNIT};
    hook_as_the_daemon_does();
    let Ok(mut decoder) = H264Decoder::new(BUDGET) else {
        return;
    };
    let mut split = AccessUnits::new();
    let check = |picture: Captured| {
        let (w, h) = picture.size();
        assert!((w * h) as u64 <= BUDGET);
        assert!(picture.into_frame().is_ok(), "a decoded picture converts");
    };
    let pieces = data.chunks(997).map(Some).chain([None]);
    for piece in pieces {
        if let Some(piece) = piece {
            split.push(piece);
        }
        while let Some(unit) = split.next_unit(piece.is_none()) {
            let Ok(unit) = unit else { continue };
            assert!(unit.len() <= MAX_ACCESS_UNIT);
            if let Ok(Some(picture)) = decoder.decode(&unit, "fuzz") {
                check(picture);
            }
        }
    }
    for picture in decoder.finish("fuzz").into_iter().flatten() {
        check(picture);
    }
}

/// A video file's bytes, as `source = { video = ... }` reads them, both
/// as MP4 (the index checks, the MP4 reader) and as raw H.264, looping:
/// every frame of two passes, or the end.
pub fn video_file(data: &[u8]) {
    use crate::capture::{Miss, VideoFile};
    hook_as_the_daemon_does();
    let Ok(dir) = tempfile::tempdir() else {
        return;
    };
    for name in ["fuzz.mp4", "fuzz.h264"] {
        let path = dir.path().join(name);
        if std::fs::write(&path, data).is_err() {
            return;
        }
        let Ok(mut video) = VideoFile::open(&path, true, BUDGET) else {
            continue;
        };
        // A call that spins for good (a looping file whose pass gives
        // nothing) is the fuzzer's timeout. 256 calls cover two passes of
        // the seeds; more would only decode the same units again.
        for _ in 0..256 {
            match video.next_capture() {
                Ok(picture) => {
                    let (w, h) = picture.size();
                    assert!((w * h) as u64 <= BUDGET);
                }
                Err(Miss::Broken(_)) | Err(Miss::Idle) => {}
                Err(Miss::Finished) | Err(Miss::Lost(_)) => break,
            }
        }
    }
}

/// ONNX bytes, as a model file: the size checks, then tract's loader and
/// the layout detection, as the daemon loads a model.
pub fn onnx_model(data: &[u8]) {
    hook_as_the_daemon_does();
    if crate::model::check_sizes(data).is_err() {
        return;
    }
    let options = crate::backend::EngineOptions::default();
    let Ok(engine) =
        crate::backend::TractEngine::from_bytes(data, Path::new("fuzz.onnx"), &options)
    else {
        return;
    };
    let _ = crate::detector::Detector::new(
        std::sync::Arc::new(engine),
        &crate::model::LayoutOverrides::default(),
        None,
        crate::detector::DetectionParams::LIVE,
    );
}

/// Camera names and class labels, as configs and class files give them:
/// the topics built from them must be valid MQTT topics of exactly the
/// levels intended, and the payloads JSON.
pub fn names(data: &[u8]) {
    hook_as_the_daemon_does();
    let text = String::from_utf8_lossy(data);
    let (camera, label) = text.split_once('\n').unwrap_or((&text, ""));
    // A camera name reaches topics only through the config's check.
    let config = format!(
        "[model]\npath = \"m.onnx\"\n[[camera]]\nname = {}\nsource = {{ folder = \"/x\" }}\n",
        toml_string(camera)
    );
    let Ok(config) = Config::parse(&config, Path::new("fuzz.toml")) else {
        return;
    };
    let camera = config.cameras[0].name.as_str();
    let count = crate::mqtt::count_message(camera, label, 3);
    let levels: Vec<&str> = count.topic.split('/').collect();
    assert_eq!(levels.len(), 2, "{:?}", count.topic);
    assert_eq!(levels[0], camera);
    for level in levels {
        assert!(
            !level.is_empty() && level.chars().all(topic_level_char),
            "{level:?}"
        );
    }
    let detection = crate::postprocess::Detection {
        bbox: [1.0, 2.0, 30.0, 40.0],
        score: 0.5,
        class_id: 0,
    };
    let timing = crate::mqtt::FrameTiming::default();
    let message = crate::mqtt::detections_message(
        camera,
        0.0,
        (64, 48),
        &[detection],
        |_| label.to_owned(),
        timing,
    );
    assert!(serde_json::from_slice::<serde_json::Value>(&message.payload).is_ok());
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The Q/DQ writer: the first 8 bytes make the activation scales (zero,
/// subnormal, NaN and infinite included), the rest is the FP32 model. Every
/// Conv is quantized; a model the writer accepts must pass the same rule
/// check the quantizer applies to what it writes.
pub fn qdq_writer(data: &[u8]) {
    hook_as_the_daemon_does();
    let Some((seed, model)) = data.split_at_checked(8) else {
        return;
    };
    let Ok(mut model) = ModelProto::decode(model) else {
        return;
    };
    let convs: HashSet<String> = model
        .graph
        .iter()
        .flat_map(|g| &g.node)
        .filter(|n| n.op_type == "Conv")
        .map(|n| crate::quantize::qdq::conv_id(n).to_owned())
        .collect();
    let scale = |name: &str| {
        let mut bits = [0u8; 4];
        for (i, b) in name.bytes().chain(seed.iter().copied()).enumerate() {
            bits[i % 4] ^= b;
        }
        Some(f32::from_le_bytes(bits))
    };
    if crate::quantize::graph::upgrade_to_qdq_opset(&mut model, &|_| Some(4)).is_err() {
        return;
    }
    if crate::quantize::qdq::insert_qdq(&mut model, &convs, &scale).is_ok() {
        let _ = crate::quantize::check(&model);
        let _ = model.encode_to_vec();
    }
}

/// A fuzz target: bytes in, a panic only on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target, by the name its fuzzer and corpus directory have.
pub const TARGETS: [(&str, Target); 9] = [
    ("config_text", config_text),
    ("image_bytes", image_bytes),
    ("v4l2_buffer", v4l2_buffer),
    ("uvc_mjpeg", uvc_mjpeg),
    ("onnx_model", onnx_model),
    ("names", names),
    ("qdq_writer", qdq_writer),
    ("h264_stream", h264_stream),
    ("video_file", video_file),
];
