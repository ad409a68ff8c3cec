//! Shared by the integration tests: finding the real assets, and building
//! small ONNX graphs with NanoDet's output shapes.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::sync::Arc;

use nanodetd::backend::{self, BackendKind, EngineOptions};
use nanodetd::detector::{DetectionParams, Detector};
use nanodetd::model::LayoutOverrides;
use nanodetd::postprocess::Detection;

use prost::Message;
use tract_onnx::pb;

/// Runs the built `nanodetd` binary with `args`.
pub fn nanodetd(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_nanodetd"))
        .args(args)
        .output()
        .unwrap()
}

/// A loopback port nothing listens on (at the time of asking).
/// A test that cannot run here: under CI (which installs everything the
/// tests need) a failure naming `why`; elsewhere a `SKIPPED` line.
pub fn skip_or_fail(test: &str, why: &str) {
    assert!(std::env::var_os("CI").is_none(), "{test}: {why}");
    eprintln!("SKIPPED {test}: {why}");
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// SIGTERM to `child`, as systemd stops the service.
pub fn terminate(child: &std::process::Child) {
    signal(child, nix::sys::signal::Signal::SIGTERM);
}

/// Sends `signal` to `child` with kill(2): no `kill` program needed.
pub fn signal(child: &std::process::Child, signal: nix::sys::signal::Signal) {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap());
    nix::sys::signal::kill(pid, signal).unwrap_or_else(|e| panic!("{signal} to {pid}: {e}"));
}

/// A command's standard error, as text.
pub fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A command's standard output, as text.
pub fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The shared assets folder (`NANODETD_ASSETS`, else `../shared`). When it
/// is missing the test fails under CI and is skipped, loudly, elsewhere.
pub fn assets(test: &str) -> Option<PathBuf> {
    let dir = std::env::var_os("NANODETD_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared"));
    if dir.join("models/nanodet-plus-m_320.onnx").is_file() {
        return Some(dir);
    }
    let msg = format!(
        "{test}: assets not found at {} (set NANODETD_ASSETS)",
        dir.display()
    );
    if std::env::var_os("CI").is_some() {
        panic!("{msg}; CI must run against the real models");
    }
    eprintln!("SKIPPED {msg}");
    None
}

pub fn model(assets: &Path, name: &str) -> PathBuf {
    assets.join("models").join(format!("{name}.onnx"))
}

pub fn sample(assets: &Path, name: &str) -> PathBuf {
    assets.join("samples").join(name)
}

/// A tract detector on `path` with the live defaults (score 0.35).
pub fn live_detector(path: &Path) -> Arc<Detector> {
    let engine = backend::open_engine(BackendKind::Tract, path, &EngineOptions::default()).unwrap();
    live_detector_on(engine)
}

/// A detector on `engine` with the live defaults.
pub fn live_detector_on(engine: Arc<dyn backend::Engine>) -> Arc<Detector> {
    Arc::new(
        Detector::new(
            engine,
            &LayoutOverrides::default(),
            None,
            DetectionParams::LIVE,
        )
        .unwrap(),
    )
}

/// The four shared models and the layout each one must be detected as.
pub const MODELS: [(&str, &str); 4] = [
    ("nanodet-plus-m_320", "plus"),
    ("nanodet-plus-m_416", "plus"),
    ("nanodet-m_320", "raw"),
    ("nanodet-m-0.5x_320", "integral"),
];

fn dims(shape: &[i64]) -> pb::TypeProto {
    pb::TypeProto {
        value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
            elem_type: pb::tensor_proto::DataType::Float as i32,
            shape: Some(pb::TensorShapeProto {
                dim: shape
                    .iter()
                    .map(|&d| pb::tensor_shape_proto::Dimension {
                        value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(d)),
                        ..Default::default()
                    })
                    .collect(),
            }),
        })),
        ..Default::default()
    }
}

pub fn value_info(name: &str, shape: &[i64]) -> pb::ValueInfoProto {
    pb::ValueInfoProto {
        name: name.into(),
        r#type: Some(dims(shape)),
        ..Default::default()
    }
}

fn float_tensor(name: &str, shape: &[i64], data: Vec<f32>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: shape.to_vec(),
        data_type: pb::tensor_proto::DataType::Float as i32,
        float_data: data,
        ..Default::default()
    }
}

pub fn int_tensor(name: &str, data: Vec<i64>) -> pb::TensorProto {
    pb::TensorProto {
        name: name.into(),
        dims: vec![data.len() as i64],
        data_type: pb::tensor_proto::DataType::Int64 as i32,
        int64_data: data,
        ..Default::default()
    }
}

pub fn ints_attr(name: &str, v: &[i64]) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Ints as i32,
        ints: v.to_vec(),
        ..Default::default()
    }
}

fn int_attr(name: &str, v: i64) -> pb::AttributeProto {
    pb::AttributeProto {
        name: name.into(),
        r#type: pb::attribute_proto::AttributeType::Int as i32,
        i: v,
        ..Default::default()
    }
}

pub fn node(
    op: &str,
    inputs: &[&str],
    output: &str,
    attrs: Vec<pb::AttributeProto>,
) -> pb::NodeProto {
    pb::NodeProto {
        op_type: op.into(),
        name: output.into(),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: vec![output.into()],
        attribute: attrs,
        ..Default::default()
    }
}

pub fn concat(inputs: &[&str], output: &str, axis: i64) -> pb::NodeProto {
    node("Concat", inputs, output, vec![int_attr("axis", axis)])
}

/// One output of a tiny model: the levels (strides) it spans, its columns
/// per prior, and the values it must produce (priors × columns).
pub struct TinyOutput {
    pub strides: Vec<i64>,
    pub columns: i64,
    pub values: Vec<f32>,
}

/// A NanoDet-shaped ONNX model on a `[1, 3, size, size]` input. Each output
/// is built as real exports build theirs: a strided conv per level,
/// reshaped to `[1, K, N]`, concatenated over levels, transposed to
/// `[1, N, K]`. The conv weights are zero and a constant is added, so the
/// outputs are exactly `values` whatever the image, and a test knows which
/// boxes must come out.
pub fn tiny_nanodet(size: i64, outputs: &[TinyOutput]) -> Vec<u8> {
    let mut graph = pb::GraphProto {
        name: "tiny-nanodet".into(),
        input: vec![value_info("data", &[1, 3, size, size])],
        ..Default::default()
    };
    graph
        .initializer
        .push(int_tensor("flat_shape", vec![0, 0, -1]));
    for (o, out) in outputs.iter().enumerate() {
        let k = out.columns;
        let mut level_outputs = Vec::new();
        for &s in &out.strides {
            let w = format!("w{o}_{s}");
            graph
                .initializer
                .push(float_tensor(&w, &[k, 3, 1, 1], vec![0.0; (k * 3) as usize]));
            let conv = format!("conv{o}_{s}");
            graph.node.push(node(
                "Conv",
                &["data", &w],
                &conv,
                vec![
                    ints_attr("strides", &[s, s]),
                    ints_attr("kernel_shape", &[1, 1]),
                ],
            ));
            let flat = format!("flat{o}_{s}");
            graph
                .node
                .push(node("Reshape", &[&conv, "flat_shape"], &flat, vec![]));
            level_outputs.push(flat);
        }
        let cat = format!("cat{o}");
        let refs: Vec<&str> = level_outputs.iter().map(String::as_str).collect();
        graph.node.push(concat(&refs, &cat, 2));
        let tr = format!("tr{o}");
        graph.node.push(node(
            "Transpose",
            &[&cat],
            &tr,
            vec![ints_attr("perm", &[0, 2, 1])],
        ));
        let priors = out.values.len() as i64 / k;
        let c = format!("const{o}");
        graph
            .initializer
            .push(float_tensor(&c, &[1, priors, k], out.values.clone()));
        let name = format!("output{o}");
        graph.node.push(node("Add", &[&tr, &c], &name, vec![]));
        graph.output.push(value_info(&name, &[1, priors, k]));
    }
    encode(graph)
}

pub fn encode(graph: pb::GraphProto) -> Vec<u8> {
    pb::ModelProto {
        ir_version: 7,
        opset_import: vec![pb::OperatorSetIdProto {
            domain: String::new(),
            version: 11,
        }],
        producer_name: "nanodetd-tests".into(),
        graph: Some(graph),
        ..Default::default()
    }
    .encode_to_vec()
}

/// `model` (ONNX bytes) with its input's height and width made free
/// (`dim_param`), as an export with dynamic axes declares them.
pub fn with_free_input_size(model: &[u8]) -> Vec<u8> {
    let mut proto = pb::ModelProto::decode(model).unwrap();
    let input = &mut proto.graph.as_mut().unwrap().input[0];
    let Some(pb::type_proto::Value::TensorType(t)) =
        input.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        panic!("the model's input is not a tensor");
    };
    for (d, name) in t
        .shape
        .as_mut()
        .unwrap()
        .dim
        .iter_mut()
        .skip(2)
        .zip(["height", "width"])
    {
        d.value = Some(pb::tensor_shape_proto::dimension::Value::DimParam(
            name.into(),
        ));
    }
    proto.encode_to_vec()
}

/// The first `n` images of coco128's annotations, written to `dir` as
/// `coco128-first-N.json`, whose path this returns.
pub fn coco128_subset(assets: &Path, dir: &Path, n: usize) -> PathBuf {
    let text =
        std::fs::read_to_string(assets.join("datasets/coco128/annotations/instances_coco128.json"))
            .unwrap();
    let mut coco: serde_json::Value = serde_json::from_str(&text).unwrap();
    let images = coco["images"].as_array().unwrap()[..n].to_vec();
    coco["images"] = serde_json::Value::Array(images);
    let path = dir.join(format!("coco128-first-{n}.json"));
    std::fs::write(&path, coco.to_string()).unwrap();
    path
}

/// Rewrites the real integral-layout model (per level `[1,N,80]` scores and
/// `[1,N,4]` distances) into the single-output fused layout `[1,N,4+80]`,
/// the way the TensorRT-tutorial export concatenates its head.
pub fn fused_from_integral(integral: &[u8]) -> Vec<u8> {
    let mut model = pb::ModelProto::decode(integral).unwrap();
    let graph = model.graph.as_mut().unwrap();
    let names: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
    let (scores, dists) = names.split_at(3);
    let mut levels = Vec::new();
    for (i, (s, d)) in scores.iter().zip(dists).enumerate() {
        let level = format!("fused_level{i}");
        graph.node.push(concat(&[d, s], &level, 2));
        levels.push(level);
    }
    let refs: Vec<&str> = levels.iter().map(String::as_str).collect();
    graph.node.push(concat(&refs, "fused", 1));
    graph.output = vec![value_info("fused", &[1, 2100, 84])];
    model.encode_to_vec()
}

/// DFL logits (4 sides × 8 bins) that put all mass on one bin per side.
pub fn one_hot_dfl(bins: [usize; 4]) -> Vec<f32> {
    let mut v = vec![-40.0; 32];
    for (side, bin) in bins.iter().enumerate() {
        v[side * 8 + bin] = 40.0;
    }
    v
}

/// libonnxruntime: `ORT_DYLIB_PATH`, else the Python wheel's.
pub fn onnxruntime_library(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("ORT_DYLIB_PATH").map(PathBuf::from).or_else(|| {
        let out = std::process::Command::new("python3")
            .args([
                "-c",
                "import glob, os, onnxruntime; print(sorted(glob.glob(os.path.join(os.path.dirname(onnxruntime.__file__), 'capi', 'libonnxruntime.so*')))[-1])",
            ])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
    });
    match found {
        Some(path) if path.is_file() => Some(path),
        _ if std::env::var_os("CI").is_some() => {
            panic!("{test}: no libonnxruntime (pip install onnxruntime, or set ORT_DYLIB_PATH)")
        }
        _ => {
            eprintln!(
                "SKIPPED {test}: no libonnxruntime (pip install onnxruntime, or set ORT_DYLIB_PATH)"
            );
            None
        }
    }
}

/// Largest difference between two boxes' coordinates, in pixels.
pub fn box_diff(a: &Detection, b: &Detection) -> f32 {
    a.bbox
        .iter()
        .zip(&b.bbox)
        .map(|(x, y)| (x - y).abs())
        .fold(0f32, f32::max)
}

/// The detection in `found` of `wanted`'s class whose box is nearest to
/// it: how two runs' answers are paired when scores reorder them.
pub fn nearest<'a>(found: &'a [Detection], wanted: &Detection) -> Option<&'a Detection> {
    found
        .iter()
        .filter(|d| d.class_id == wanted.class_id)
        .min_by(|a, b| box_diff(a, wanted).total_cmp(&box_diff(b, wanted)))
}

/// `got` and `want` are the same detections, in the same order, up to
/// float rounding: each pair of the same class, scores within `score`,
/// box corners within `pixels`. Returns the largest differences seen.
pub fn assert_same_detections(
    got: &[Detection],
    want: &[Detection],
    score: f32,
    pixels: f32,
    what: &str,
) -> (f32, f32) {
    assert_eq!(got.len(), want.len(), "{what}: {got:?} against {want:?}");
    let (mut worst_score, mut worst_box) = (0f32, 0f32);
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.class_id, w.class_id, "{what}: {g:?} against {w:?}");
        worst_score = worst_score.max((g.score - w.score).abs());
        worst_box = worst_box.max(box_diff(g, w));
    }
    assert!(
        worst_score <= score,
        "{what}: scores differ by {worst_score}"
    );
    assert!(
        worst_box <= pixels,
        "{what}: boxes differ by {worst_box} px"
    );
    (worst_score, worst_box)
}
