//! Black-box tests of the `nanodetd` binary: exit codes, one-line errors
//! naming the file, JSON output, `bench`, and COCO accuracy on the real
//! models checked against the reference table and against pycocotools.

#![allow(clippy::unwrap_used)]

use crate::support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use crate::support::{
    MODELS, TinyOutput, assets, model, nanodetd, sample, stderr, stdout, tiny_nanodet,
};

/// `nanodetd detect --model MODEL IMAGE`.
fn detect(model: &Path, image: &Path) -> Output {
    nanodetd(&[
        "detect",
        "--model",
        model.to_str().unwrap(),
        image.to_str().unwrap(),
    ])
}

/// A valid 3-class plus-layout model that finds one box on any image.
fn tiny_plus(dir: &Path) -> PathBuf {
    let mut values = vec![0.0; 22 * 35];
    values[2] = 0.9;
    values[3..35].copy_from_slice(&support::one_hot_dfl([0, 0, 2, 2]));
    write_tiny(&dir.join("tiny-plus.onnx"), 35, values)
}

/// A one-output model over the four Plus levels of a 32x32 input (22
/// priors) with `columns` values per prior, written to `path`.
fn write_tiny(path: &Path, columns: i64, values: Vec<f32>) -> PathBuf {
    let output = TinyOutput {
        strides: vec![8, 16, 32, 64],
        columns,
        values,
    };
    std::fs::write(path, tiny_nanodet(32, &[output])).unwrap();
    path.to_owned()
}

fn write_png(path: &Path) {
    image::RgbImage::from_pixel(40, 30, image::Rgb([10, 200, 30]))
        .save(path)
        .unwrap();
}

#[test]
fn no_arguments_is_a_usage_error() {
    let o = nanodetd(&[]);
    assert_eq!(o.status.code(), Some(2));
    let o = nanodetd(&["detect", "--model", "m.onnx", "--score", "1.5", "x.jpg"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("--score 1.5 is outside [0, 1]"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn bad_model_files_give_one_line_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("ok.png");
    write_png(&image);
    let good = std::fs::read(tiny_plus(dir.path())).unwrap();
    let cases: [(&str, Option<Vec<u8>>, &str); 4] = [
        ("missing.onnx", None, "cannot read model"),
        ("empty.onnx", Some(vec![]), "empty file (0 bytes)"),
        (
            "truncated.onnx",
            Some(good[..good.len() / 2].to_vec()),
            "not a loadable ONNX model",
        ),
        (
            "text.onnx",
            Some(b"this is not a protobuf\n".to_vec()),
            "not a loadable ONNX model",
        ),
    ];
    for (name, bytes, cause) in cases {
        let path = dir.path().join(name);
        if let Some(b) = bytes {
            std::fs::write(&path, b).unwrap();
        }
        let o = detect(&path, &image);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{name}: {err}");
        assert_eq!(err.lines().count(), 1, "{name}: one line, got {err}");
        assert!(err.contains(name) && err.contains(cause), "{name}: {err}");
        assert!(!err.contains("panicked"), "{err}");
    }
}

#[test]
fn unknown_layout_lists_shapes_and_known_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny(&dir.path().join("odd.onnx"), 7, vec![0.0; 22 * 7]);
    let image = dir.path().join("ok.png");
    write_png(&image);
    let o = detect(&path, &image);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("odd.onnx") && err.contains("[1, 22, 7]") && err.contains("known layouts"),
        "{err}"
    );
}

#[test]
fn bad_images_are_reported_and_the_others_still_run() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_plus(dir.path());
    let good = dir.path().join("good.png");
    write_png(&good);
    let corrupt = dir.path().join("corrupt.jpg");
    let mut jpeg = Vec::new();
    image::RgbImage::from_pixel(64, 64, image::Rgb([1, 2, 3]))
        .write_to(
            &mut std::io::Cursor::new(&mut jpeg),
            image::ImageFormat::Jpeg,
        )
        .unwrap();
    std::fs::write(&corrupt, &jpeg[..jpeg.len() / 3]).unwrap();
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"").unwrap();
    let missing = dir.path().join("missing.jpg");
    let paths = [&corrupt, &good, &empty, &missing].map(|p| p.to_str().unwrap().to_owned());
    let mut args = vec!["detect", "--model", model.to_str().unwrap(), "--classes"];
    let classes = dir.path().join("classes.txt");
    std::fs::write(&classes, "alpha\nbeta\ngamma\n").unwrap();
    args.push(classes.to_str().unwrap());
    args.extend(paths.iter().map(String::as_str));
    let o = nanodetd(&args);
    let (out, err) = (stdout(&o), stderr(&o));
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(out.contains("good.png: 40x30, 1 detection"), "{out}");
    // Class index 2 from --classes; network box [0, 0, 16, 16] on the
    // 32x32 input maps to [0, 0, 20, 15] on the 40x30 image.
    assert!(
        out.contains("gamma             0.900      0.0      0.0     20.0     15.0"),
        "{out}"
    );
    assert!(err.contains("corrupt.jpg: cannot decode image"), "{err}");
    assert!(err.contains("empty.png: empty file (0 bytes)"), "{err}");
    assert!(err.contains("missing.jpg: cannot read"), "{err}");
    assert!(err.contains("3 of 4 images could not be read"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn json_output_is_coco_results_with_standard_category_ids() {
    let Some(a) = assets("json_output_is_coco_results_with_standard_category_ids") else {
        return;
    };
    let bus = sample(&a, "hpc203_bus.jpg");
    let o = nanodetd(&[
        "detect",
        "--model",
        model(&a, "nanodet-plus-m_320").to_str().unwrap(),
        "--json",
        bus.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let dets: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(dets.len(), 5);
    // person is COCO category 1, bus is 6.
    let ids: Vec<u64> = dets
        .iter()
        .map(|d| d["category_id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 4, "{ids:?}");
    assert_eq!(ids.iter().filter(|&&i| i == 6).count(), 1, "{ids:?}");
    for d in &dets {
        assert_eq!(d["file_name"], bus.to_str().unwrap());
        let b: Vec<f64> = serde_json::from_value(d["bbox"].clone()).unwrap();
        assert!(
            b[2] > 0.0 && b[3] > 0.0 && b[0] + b[2] <= 810.01 && b[1] + b[3] <= 1080.01,
            "{b:?}"
        );
        assert!(d["score"].as_f64().unwrap() > 0.35);
    }
}

#[test]
fn bench_reports_every_stage() {
    let dir = tempfile::tempdir().unwrap();
    let model = tiny_plus(dir.path());
    let o = nanodetd(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--iters",
        "3",
        "--warmup",
        "1",
        "--json",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    for stage in [
        "decode image",
        "preprocess",
        "inference",
        "postprocess",
        "total",
    ] {
        let median = v["stages"][stage]["median_ms"].as_f64().unwrap();
        assert!(median > 0.0, "{stage}: {v}");
    }
    assert_eq!(v["image_size"], serde_json::json!([1920, 1080]));
    assert!(v["peak_rss_mib"].as_f64().unwrap() > 1.0);
}

/// mAP@[.5:.95] on coco128 from ../shared/README.md.
const REFERENCE_MAP: [(&str, f64); 4] = [
    ("nanodet-plus-m_320", 0.398),
    ("nanodet-plus-m_416", 0.410),
    ("nanodet-m_320", 0.323),
    ("nanodet-m-0.5x_320", 0.194),
];

fn pycocotools_available() -> bool {
    Command::new("python3")
        .args(["-c", "import pycocotools"])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn coco128_accuracy_matches_reference_and_pycocotools() {
    let Some(a) = assets("coco128_accuracy_matches_reference_and_pycocotools") else {
        return;
    };
    let check_pycocotools = pycocotools_available();
    if !check_pycocotools {
        crate::support::skip_or_fail(
            "the pycocotools comparison",
            "python3 -c 'import pycocotools' failed (scripts/test.sh installs it)",
        );
    }
    let images = a.join("datasets/coco128/images");
    let annotations = a.join("datasets/coco128/annotations/instances_coco128.json");
    let dir = tempfile::tempdir().unwrap();
    for ((name, layout), (ref_name, reference)) in MODELS.iter().zip(REFERENCE_MAP) {
        assert_eq!(*name, ref_name);
        let saved = dir.path().join(format!("{name}.json"));
        // The same command line for every model: no per-model flags.
        let o = nanodetd(&[
            "eval",
            "--model",
            model(&a, name).to_str().unwrap(),
            "--images",
            images.to_str().unwrap(),
            "--annotations",
            annotations.to_str().unwrap(),
            "--save-detections",
            saved.to_str().unwrap(),
            "--json",
        ]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        assert_eq!(v["layout"], *layout);
        let ours: Vec<f64> = serde_json::from_value(v["stats"].clone()).unwrap();
        assert!(
            (ours[0] - reference).abs() <= 0.005,
            "{name}: mAP {:.4} vs reference {reference}",
            ours[0]
        );
        if check_pycocotools {
            let py = Command::new("python3")
                .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/tools/pycocotools_stats.py"))
                .args([&annotations, &saved])
                .output()
                .unwrap();
            assert!(py.status.success(), "{}", stderr(&py));
            let theirs: Vec<f64> = serde_json::from_slice(&py.stdout).unwrap();
            assert_eq!(theirs.len(), 12);
            // Both evaluate the same saved detections, in f64: what the
            // README promises is 1e-12.
            let mut worst = 0f64;
            for (i, (o, t)) in ours.iter().zip(&theirs).enumerate() {
                assert!(
                    (o - t).abs() <= 1e-12,
                    "{name} stat {i}: ours {o} pycocotools {t}"
                );
                worst = worst.max((o - t).abs());
            }
            eprintln!("{name}: the 12 COCO stats agree with pycocotools to {worst:e}");
        }
    }
}

#[test]
fn eval_with_missing_images_counts_them_and_exits_2() {
    let Some(a) = assets("eval_with_missing_images_counts_them_and_exits_2") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // Two real images, one listed image that is not there.
    let two = support::coco128_subset(&a, dir.path(), 2);
    let mut coco: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&two).unwrap()).unwrap();
    coco["images"].as_array_mut().unwrap().push(
        serde_json::json!({"id": 999999, "file_name": "not-there.jpg", "width": 10, "height": 10}),
    );
    let ann = dir.path().join("subset.json");
    std::fs::write(&ann, coco.to_string()).unwrap();
    let o = nanodetd(&[
        "eval",
        "--model",
        model(&a, "nanodet-plus-m_320").to_str().unwrap(),
        "--images",
        a.join("datasets/coco128/images").to_str().unwrap(),
        "--annotations",
        ann.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("not-there.jpg: cannot read"), "{err}");
    assert!(err.contains("1 of 3 images could not be read"), "{err}");
    assert!(
        stdout(&o).contains("Average Precision"),
        "metrics are still printed"
    );
}

#[test]
fn check_config_accepts_the_shipped_example_and_rejects_bad_edits() {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/nanodetd.toml");
    let o = nanodetd(&["check-config", shipped.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("ok (2 cameras)"), "{}", stdout(&o));

    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(&shipped)
        .unwrap()
        .replace("iou = 0.6", "iou = 6");
    std::fs::write(&bad, text).unwrap();
    let o = nanodetd(&["check-config", bad.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("bad.toml: model.iou: must be at least 0 and at most 1, got 6"),
        "{err}"
    );

    // A backend this build lacks is no error (the daemon falls back to
    // the CPU), but check-config says so.
    let trt = dir.path().join("tensorrt.toml");
    let text = std::fs::read_to_string(&shipped).unwrap();
    let text = text.replacen("backend = \"tract\"", "backend = \"tensorrt\"", 1);
    assert!(text.contains("backend = \"tensorrt\""));
    std::fs::write(&trt, text).unwrap();
    let o = nanodetd(&["check-config", trt.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert_eq!(
        err.contains("model.backend = \"tensorrt\" is not compiled into this nanodetd"),
        !cfg!(feature = "tensorrt"),
        "{err}"
    );
}

/// The flags of `detect --precision int8` calibrating on 8 images of
/// `calibration` with percentile alone (these tests are about the cache
/// and the layout, not the methods), cached in `cache`.
fn percentile_int8_args(calibration: &Path, cache: &Path) -> Vec<String> {
    let mut args: Vec<String> = [
        "--precision",
        "int8",
        "--calibration",
        calibration.to_str().unwrap(),
        "--int8-images",
        "8",
        "--int8-no-auto-float",
        "--int8-no-threshold-choice",
        "--int8-no-adaround",
        "--int8-no-bias-correction",
        "--cache",
    ]
    .map(str::to_owned)
    .to_vec();
    args.push(cache.to_str().unwrap().to_owned());
    args
}

/// `nanodetd quantize` of `model` with the layout flags `layout`, on 8
/// images of `calibration` with percentile alone, as
/// [`percentile_int8_args`] asks of `detect`, into `out`.
fn quantize_with_percentile_alone(model: &str, layout: &[&str], calibration: &Path, out: &Path) {
    let mut args = vec!["quantize", "--model", model];
    args.extend_from_slice(layout);
    args.extend([
        "--calibration",
        calibration.to_str().unwrap(),
        "--images",
        "8",
        "--no-auto-float",
        "--no-threshold-choice",
        "--no-adaround",
        "--no-bias-correction",
        "--out",
        out.to_str().unwrap(),
    ]);
    let o = nanodetd(&args);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// The INT8 models in the cache directory `cache`, sorted.
fn cached_int8_models(cache: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(cache)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".int8.onnx"))
        .collect();
    files.sort();
    files
}

/// Issue 22: a model whose input size is not fixed calibrates at the size
/// the command asks for (`--input-size`), and `detect`, `eval` and `bench`
/// share one INT8 model: the one `quantize --size` makes. (At 320 only:
/// the shipped exports fix their Reshapes to the size they were made at.)
#[test]
fn int8_calibration_of_a_free_size_model_takes_the_commands_input_size_issue_22() {
    let Some(a) = assets("int8 free input size") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let free = dir.path().join("free-size.onnx");
    let fixed = std::fs::read(model(&a, "nanodet-m-0.5x_320")).unwrap();
    std::fs::write(&free, support::with_free_input_size(&fixed)).unwrap();
    let free = free.to_str().unwrap();
    let calibration = a.join("datasets/calibration-80");
    let quantized = dir.path().join("free-size.int8.onnx");
    quantize_with_percentile_alone(free, &["--size", "320x320"], &calibration, &quantized);
    let int8 = percentile_int8_args(&calibration, &cache);
    let run = |command: &[&str]| {
        // Info shows where the INT8 model came from.
        Command::new(env!("CARGO_BIN_EXE_nanodetd"))
            .env("RUST_LOG", "info")
            .args(command)
            .args(["--model", free])
            .args(&int8)
            .output()
            .unwrap()
    };
    let image = sample(&a, "hpc203_bus.jpg");
    let image = image.to_str().unwrap();
    // Without a size there is nothing to calibrate at, and nothing is cached.
    let o = run(&["detect", "--json", image]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(stderr(&o).contains("--size WxH"), "{}", stderr(&o));
    assert!(!cache.exists() || cached_int8_models(&cache).is_empty());
    let o = run(&["detect", "--json", "--input-size", "320x320", image]);
    assert!(o.status.success(), "{}", stderr(&o));
    let detections: Vec<serde_json::Value> = serde_json::from_slice(&o.stdout).unwrap();
    assert!(!detections.is_empty(), "{}", stdout(&o));
    let made = cached_int8_models(&cache);
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(std::fs::read(&made[0]).unwrap() == std::fs::read(&quantized).unwrap());
    let modified = || std::fs::metadata(&made[0]).unwrap().modified().unwrap();
    let first = modified();
    // `eval` and `bench` load the model as `detect` does: the same file,
    // found in the cache, not made again.
    let annotations = support::coco128_subset(&a, dir.path(), 2);
    let images = a.join("datasets/coco128/images");
    let from_cache = format!("INT8 model from the cache: {}", made[0].display());
    let eval = run(&[
        "eval",
        "--json",
        "--input-size",
        "320x320",
        "--images",
        images.to_str().unwrap(),
        "--annotations",
        annotations.to_str().unwrap(),
    ]);
    let bench = run(&[
        "bench",
        "--json",
        "--input-size",
        "320x320",
        "--iters",
        "1",
        "--warmup",
        "0",
    ]);
    for o in [eval, bench] {
        assert!(o.status.success(), "{}", stderr(&o));
        assert!(stderr(&o).contains(&from_cache), "{}", stderr(&o));
    }
    assert_eq!(cached_int8_models(&cache), made);
    assert_eq!(modified(), first);
}

/// Issue 18: `detect` loads models the daemon's way, so it runs the INT8
/// model the daemon would, made once and kept in the shared cache.
#[test]
fn detect_runs_the_int8_model_from_the_cache_the_daemon_uses_issue_18() {
    let Some(a) = assets("detect int8") else {
        return;
    };
    let cache = tempfile::tempdir().unwrap();
    let model_path = model(&a, "nanodet-plus-m_320");
    let calibration = a.join("datasets/calibration-80");
    let run = || {
        let mut command = Command::new(env!("CARGO_BIN_EXE_nanodetd"));
        // Info shows the calibration, which a command otherwise does quietly.
        command
            .env("RUST_LOG", "info")
            .args(["detect", "--json", "--model", model_path.to_str().unwrap()])
            .args(percentile_int8_args(&calibration, cache.path()))
            .arg(sample(&a, "hpc203_bus.jpg"));
        command.output().unwrap()
    };
    let first = run();
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(
        stderr(&first).contains("making the INT8 model: 8 images"),
        "{}",
        stderr(&first)
    );
    let made = cached_int8_models(cache.path());
    assert_eq!(made.len(), 1, "{made:?}");
    let detections: serde_json::Value = serde_json::from_str(&stdout(&first)).unwrap();
    // COCO id 6 is bus.
    assert!(
        detections
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["category_id"] == 6 && d["score"].as_f64().unwrap() > 0.5),
        "{detections}"
    );
    // The second run finds it, as a daemon with this cache would.
    let second = run();
    assert!(second.status.success(), "{}", stderr(&second));
    assert!(
        stderr(&second).contains(&format!("INT8 model from the cache: {}", made[0].display())),
        "{}",
        stderr(&second)
    );
    assert_eq!(stdout(&second), stdout(&first));
}

/// Issue 22: a command's layout flags reach the INT8 calibration, which
/// preprocesses as the detector will (here a legacy model stretched, not
/// letterboxed): the cached model is the one `quantize` makes with the
/// same flags, byte for byte; the default layout has another key, which
/// flags restating it share.
#[test]
fn int8_calibration_reads_the_model_with_the_commands_layout_flags_issue_22() {
    let Some(a) = assets("int8 layout flags") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let cache = dir.path().join("cache");
    let model_path = model(&a, "nanodet-m-0.5x_320");
    let calibration = a.join("datasets/calibration-80");
    let image = sample(&a, "hpc203_bus.jpg");
    // Percentile alone, on 8 images: this is about the layout.
    let quantized = dir.path().join("stretched.int8.onnx");
    quantize_with_percentile_alone(
        model_path.to_str().unwrap(),
        &["--resize", "stretch"],
        &calibration,
        &quantized,
    );
    let int8 = percentile_int8_args(&calibration, &cache);
    let detect = |layout: &[&str]| {
        let mut args = vec!["detect", "--json", "--model", model_path.to_str().unwrap()];
        args.extend_from_slice(layout);
        args.extend(int8.iter().map(String::as_str));
        args.push(image.to_str().unwrap());
        let o = nanodetd(&args);
        assert!(o.status.success(), "{}", stderr(&o));
    };
    let cached = || cached_int8_models(&cache);
    detect(&["--resize", "stretch"]);
    let stretched = cached();
    assert_eq!(stretched.len(), 1, "{stretched:?}");
    let expected = std::fs::read(&quantized).unwrap();
    assert!(std::fs::read(&stretched[0]).unwrap() == expected);
    // The default layout misses the stretched model's key; its model
    // replaces the stale one, as the cache keeps one per model file.
    detect(&[]);
    let letterboxed = cached();
    assert_eq!(letterboxed.len(), 1, "{letterboxed:?}");
    assert_ne!(letterboxed, stretched);
    assert!(std::fs::read(&letterboxed[0]).unwrap() != expected);
    // Flags that restate the default layout, and a class-name file of the
    // count the shapes tell, read the model the same way: the key is the
    // layout's, so the daemon's model is found, not made again.
    let made = std::fs::metadata(&letterboxed[0])
        .unwrap()
        .modified()
        .unwrap();
    let classes = dir.path().join("coco.names");
    std::fs::write(&classes, nanodetd::model::COCO_CLASS_NAMES.join("\n")).unwrap();
    detect(&[
        "--resize",
        "letterbox",
        "--classes",
        classes.to_str().unwrap(),
    ]);
    assert_eq!(cached(), letterboxed);
    let found = std::fs::metadata(&letterboxed[0])
        .unwrap()
        .modified()
        .unwrap();
    assert_eq!(found, made);
}
