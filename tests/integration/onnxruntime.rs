//! The onnxruntime backend against tract on the real models and photos,
//! and its errors. Needs libonnxruntime: `ORT_DYLIB_PATH`, else the one in
//! the PyPI onnxruntime wheel (CI installs it). Without it these tests fail
//! under CI and skip, loudly, elsewhere.
#![allow(clippy::unwrap_used)]

use crate::support;

use std::path::PathBuf;
use std::sync::Arc;

use nanodetd::backend::onnxruntime::{OnnxRuntimeEngine, OnnxRuntimeOptions, Provider};
use nanodetd::backend::{
    BackendChoice, BackendKind, Engine, EngineOptions, open_chosen, open_engine,
};
use nanodetd::detector::DetectionParams;
use nanodetd::frame::Frame;

#[test]
fn same_detections_as_tract_for_every_model_and_photo() {
    let test = "same_detections_as_tract_for_every_model_and_photo";
    let (Some(a), Some(lib)) = (support::assets(test), support::onnxruntime_library(test)) else {
        return;
    };
    let runtime = OnnxRuntimeOptions {
        library: Some(lib),
        ..OnnxRuntimeOptions::default()
    };
    let mut photos: Vec<PathBuf> = std::fs::read_dir(a.join("samples"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    photos.sort();
    let mut compared = 0;
    for name in [
        "nanodet-plus-m_320",
        "nanodet-plus-m_416",
        "nanodet-m_320",
        "nanodet-m-0.5x_320",
    ] {
        let model = support::model(&a, name);
        let ort = support::live_detector_on(Arc::new(
            OnnxRuntimeEngine::load(&model, &EngineOptions::default(), &runtime).unwrap(),
        ));
        assert_eq!(ort.engine().backend(), BackendKind::OnnxRuntime);
        let tract = support::live_detector_on(
            open_engine(BackendKind::Tract, &model, &EngineOptions::default()).unwrap(),
        );
        assert_eq!(ort.layout().kind, tract.layout().kind, "{name}");
        let (mut ort_session, mut tract_session) =
            (ort.session().unwrap(), tract.session().unwrap());
        for photo in &photos {
            let frame = Frame::from_file(photo).unwrap();
            let (got, want) = (
                ort_session.detect(&frame).unwrap(),
                tract_session.detect(&frame).unwrap(),
            );
            // A detection right at the score floor may fall either side of
            // it; every other one must match.
            let clear = |d: &&nanodetd::postprocess::Detection| {
                d.score > DetectionParams::LIVE.score_threshold + 2e-3
            };
            let got: Vec<_> = got.iter().filter(clear).collect();
            let want: Vec<_> = want.iter().filter(clear).collect();
            assert_eq!(
                got.len(),
                want.len(),
                "{name} {}: {got:?} vs {want:?}",
                photo.display()
            );
            for (g, w) in got.iter().zip(&want) {
                assert_eq!(g.class_id, w.class_id, "{name} {}", photo.display());
                assert!(
                    (g.score - w.score).abs() < 2e-3,
                    "{name} {}: {g:?} vs {w:?}",
                    photo.display()
                );
                for (x, y) in g.bbox.iter().zip(&w.bbox) {
                    assert!(
                        (x - y).abs() < 0.5,
                        "{name} {}: {g:?} vs {w:?}",
                        photo.display()
                    );
                }
            }
            compared += got.len();
        }
    }
    assert!(compared > 50, "only {compared} detections compared");
}

#[test]
fn a_wrong_library_path_is_a_clear_error() {
    let Some(a) = support::assets("a_wrong_library_path_is_a_clear_error") else {
        return;
    };
    let model = support::model(&a, "nanodet-plus-m_320");
    let image = support::sample(&a, "hpc203_bus.jpg");
    let detect_with = |library: &std::path::Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nanodetd"))
            .env("ORT_DYLIB_PATH", library)
            .args(["detect", "--backend", "onnxruntime", "--model"])
            .args([&model, &image])
            .output()
            .unwrap();
        let err = support::stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{err}");
        assert!(err.contains("onnxruntime backend unavailable"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    };
    let err = detect_with(std::path::Path::new("/nonexistent/libonnxruntime.so.1.99"));
    assert!(
        err.contains("/nonexistent/libonnxruntime.so.1.99") && err.contains("ORT_DYLIB_PATH"),
        "{err}"
    );
    // A file that is not a library at all.
    detect_with(&model);
}

/// A real libonnxruntime older than the API level nanodetd is built for:
/// ONNX Runtime 1.14.1, from `scripts/old-onnxruntime.sh`.
fn old_onnxruntime_library(test: &str) -> Option<PathBuf> {
    let path = std::env::var_os("NANODETD_OLD_ORT_LIB")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("target/old-onnxruntime/libonnxruntime.so.1.14.1")
        });
    if path.is_file() {
        return Some(path);
    }
    let why = format!(
        "no ONNX Runtime 1.14 library at {} (run scripts/old-onnxruntime.sh, or set NANODETD_OLD_ORT_LIB)",
        path.display()
    );
    crate::support::skip_or_fail(test, &why);
    None
}

#[test]
fn a_library_of_an_older_api_level_is_a_clear_error_or_an_auto_fallback() {
    let test = "a_library_of_an_older_api_level_is_a_clear_error_or_an_auto_fallback";
    let (Some(a), Some(old)) = (support::assets(test), old_onnxruntime_library(test)) else {
        return;
    };
    let model = support::model(&a, "nanodet-plus-m_320");
    let image = support::sample(&a, "hpc203_bus.jpg");
    let detect = |backend: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_nanodetd"))
            .env("ORT_DYLIB_PATH", &old)
            .env("RUST_LOG", "info")
            .args(["detect", "--backend", backend, "--model"])
            .args([&model, &image])
            .output()
            .unwrap()
    };
    // Asked for by name: exit 2, naming the file, its version and the
    // version needed.
    let out = detect("onnxruntime");
    let err = support::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(
        err.contains("onnxruntime backend unavailable")
            && err.contains(&old.display().to_string())
            && err.contains("got '1.14.1'")
            && err.contains("or newer"),
        "{err}"
    );
    // Under `auto` the same library is passed over, with the reason, and
    // tract detects.
    let out = detect("auto");
    let err = support::stderr(&out);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("auto: onnxruntime unavailable (") && err.contains("got '1.14.1'"),
        "{err}"
    );
    assert!(err.contains("auto: tract is the fastest here"), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("bus"), "{stdout}");
}

#[test]
fn coco128_map_within_0_002_of_tract() {
    let test = "coco128_map_within_0_002_of_tract";
    let (Some(a), Some(lib)) = (support::assets(test), support::onnxruntime_library(test)) else {
        return;
    };
    let coco = a.join("datasets/coco128");
    let map = |backend: &str| -> f64 {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_nanodetd"))
            .env("ORT_DYLIB_PATH", &lib)
            .args(["eval", "--json", "--backend", backend, "--model"])
            .arg(support::model(&a, "nanodet-plus-m_320"))
            .arg("--images")
            .arg(coco.join("images"))
            .arg("--annotations")
            .arg(coco.join("annotations/instances_coco128.json"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", support::stderr(&out));
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        report["stats"][0].as_f64().unwrap()
    };
    let (tract, onnxruntime) = (map("tract"), map("onnxruntime"));
    assert!(tract > 0.39, "tract mAP {tract}");
    assert!(
        (tract - onnxruntime).abs() <= 0.002,
        "tract {tract}, onnxruntime {onnxruntime}"
    );
}

#[test]
fn auto_times_the_cpu_backends_and_keeps_the_faster() {
    let test = "auto_times_the_cpu_backends_and_keeps_the_faster";
    let (Some(a), Some(lib)) = (support::assets(test), support::onnxruntime_library(test)) else {
        return;
    };
    let model = support::model(&a, "nanodet-plus-m_320");
    let options = EngineOptions {
        onnxruntime: OnnxRuntimeOptions {
            library: Some(lib),
            ..OnnxRuntimeOptions::default()
        },
        ..EngineOptions::default()
    };
    let engine = open_chosen(BackendChoice::Auto, &|kind| {
        open_engine(kind, &model, &options)
    })
    .unwrap();
    let notes = engine.notes();
    let choice = &notes[0];
    // "auto: onnxruntime is the fastest here, 6.1 ms per run beside tract
    // 13.0 ms (median of 5 at start)"
    let chosen = engine.backend().to_string();
    let other = if chosen == "tract" {
        "onnxruntime"
    } else {
        "tract"
    };
    assert!(
        choice.starts_with(&format!("auto: {chosen} is the fastest here"))
            && choice.contains(&format!("beside {other} ")),
        "{notes:?}"
    );
    let times: Vec<f64> = choice
        .split(' ')
        .filter_map(|w| w.parse::<f64>().ok())
        .collect();
    assert!(times.len() >= 2 && times[0] <= times[1], "{choice}");
    // No GPU backend here, and none pretended.
    assert!(!engine.on_gpu());
    eprintln!("{test}: {choice}");
}

#[test]
fn a_dropped_cpu_session_is_reused_so_auto_builds_the_graph_once() {
    let test = "a_dropped_cpu_session_is_reused_so_auto_builds_the_graph_once";
    let (Some(a), Some(lib)) = (support::assets(test), support::onnxruntime_library(test)) else {
        return;
    };
    let started = std::time::Instant::now();
    let engine = OnnxRuntimeEngine::load(
        &support::model(&a, "nanodet-plus-m_320"),
        &EngineOptions::default(),
        &OnnxRuntimeOptions {
            library: Some(lib),
            ..OnnxRuntimeOptions::default()
        },
    )
    .unwrap();
    eprintln!(
        "{test}: load, with one graph build, took {:?}",
        started.elapsed()
    );
    assert_eq!(engine.sessions_built(), 1);
    let input = vec![0.5f32; engine.info().input.shape.iter().product()];
    let run = |session: &mut Box<dyn nanodetd::backend::Session>| {
        session
            .run(nanodetd::backend::InputBatch::host(&input, 1))
            .unwrap();
        session.outputs().for_image(0)[0].to_vec()
    };
    // What `auto` does: time a session, drop it; then the detector takes one.
    let timed = run(&mut engine.new_session().unwrap());
    let mut detector = engine.new_session().unwrap();
    assert_eq!(engine.sessions_built(), 1, "the timed session was rebuilt");
    assert_eq!(run(&mut detector), timed);
    // A second session alive at once needs a graph of its own.
    let mut second = engine.new_session().unwrap();
    assert_eq!(engine.sessions_built(), 2);
    assert_eq!(run(&mut second), timed);
}

#[test]
fn a_cuda_provider_that_cannot_start_falls_back_to_the_cpu_and_says_why() {
    let test = "a_cuda_provider_that_cannot_start_falls_back_to_the_cpu_and_says_why";
    let (Some(a), Some(lib)) = (support::assets(test), support::onnxruntime_library(test)) else {
        return;
    };
    for asked in [Provider::Cuda, Provider::TensorRt] {
        let engine = OnnxRuntimeEngine::load(
            &support::model(&a, "nanodet-plus-m_320"),
            &EngineOptions::default(),
            &OnnxRuntimeOptions {
                library: Some(lib.clone()),
                provider: asked,
                ..OnnxRuntimeOptions::default()
            },
        )
        .unwrap();
        if engine.on_gpu() {
            eprintln!("SKIPPED {test}: this box runs ONNX Runtime's {asked} provider");
            return;
        }
        assert_eq!(engine.provider(), Provider::Cpu);
        let notes = Engine::notes(&engine);
        assert!(
            notes.iter().any(|n| n.starts_with(&format!(
                "fallback: ONNX Runtime's {asked} provider unavailable ("
            ))),
            "{notes:?}"
        );
        assert!(
            notes
                .last()
                .is_some_and(|n| n == "ONNX Runtime CPU provider"),
            "{notes:?}"
        );
        // And it still detects.
        let detector = support::live_detector_on(Arc::new(engine));
        let frame = Frame::from_file(&support::sample(&a, "hpc203_bus.jpg")).unwrap();
        assert!(
            !detector
                .session()
                .unwrap()
                .detect(&frame)
                .unwrap()
                .is_empty()
        );
    }
}

/// Issue 17: the daemon's trial load of a model runs ONNX Runtime too,
/// in the child process, where the daemon may run the model on it: its
/// C++ loader is as exposed to a hostile model as tract's. The child
/// takes the configured library; without one it refuses cleanly (exit 2),
/// which tract, needing none, would not.
#[test]
fn the_trial_load_runs_onnxruntime_in_the_child_issue_17() {
    use nanodetd::daemon::probe::{ProbeEngine, ProbeOutcome, run_probe};
    let test = "the_trial_load_runs_onnxruntime_in_the_child_issue_17";
    let (Some(a), Some(lib)) = (support::assets(test), support::onnxruntime_library(test)) else {
        return;
    };
    let exe = std::path::Path::new(env!("CARGO_BIN_EXE_nanodetd"));
    let model = support::model(&a, "nanodet-plus-m_320");
    let with = |library: PathBuf| ProbeEngine::OnnxRuntime {
        library: Some(library),
        provider: nanodetd::backend::onnxruntime::Provider::Cpu,
    };
    assert_eq!(run_probe(exe, &model, &with(lib)), ProbeOutcome::Exited(0));
    assert_eq!(
        run_probe(
            exe,
            &model,
            &with("/nonexistent/libonnxruntime.so.1.99".into())
        ),
        ProbeOutcome::Exited(2)
    );
    assert_eq!(
        run_probe(exe, &model, &ProbeEngine::Tract),
        ProbeOutcome::Exited(0)
    );
}
