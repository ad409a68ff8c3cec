//! Rewrites of the real exports for GPU engines, checked on the CPU:
//! batch-1 exports made batchable for GPUs that serve several cameras
//! (batch 4 against four single runs), and the FP16 copy TensorRT 11
//! builds (its detections against the FP32 model's).

#![allow(clippy::unwrap_used)]

use crate::support;

use crate::support::{assets, model};
use nanodetd::backend::validate_batch;
use nanodetd::model::OnnxModel;

#[test]
fn nanodet_exports_batch_where_the_graph_allows_and_say_why_where_not() {
    let Some(a) = assets("nanodet_exports_batch") else {
        return;
    };
    for (name, side, batchable) in [
        ("nanodet-plus-m_320", 320, true),
        ("nanodet-plus-m_416", 416, true),
        // The legacy exports fold the batch into the priors: outputs are
        // [priors, classes] without a batch axis, and the integral head
        // reshapes to [-1, 8]. No constant rewrite can undo that.
        ("nanodet-m_320", 320, false),
        ("nanodet-m-0.5x_320", 320, false),
    ] {
        let bytes = std::fs::read(model(&a, name)).unwrap();
        let (rewritten, report) = OnnxModel::parse(&bytes)
            .unwrap()
            .with_dynamic_batch()
            .unwrap();
        let rewritten = rewritten.bytes().into_owned();
        assert!(report.reshapes > 0, "{name}: {report:?}");
        let verdict = validate_batch(&rewritten, (side, side), 4);
        eprintln!("{name}: {report:?}: {verdict:?}");
        match (batchable, verdict) {
            (true, Ok(())) => {}
            (false, Err(why)) => assert!(why.to_string().contains("folds the batch"), "{why}"),
            (expected, got) => panic!("{name}: expected batchable={expected}, got {got:?}"),
        }
        // The original, untouched, is not batchable at all.
        assert!(validate_batch(&bytes, (side, side), 2).is_err(), "{name}");
    }
}

#[test]
fn the_batch_check_runs_once_per_model_and_its_verdict_is_kept() {
    use nanodetd::backend::batchable;
    let Some(a) = assets("the_batch_check_runs_once_per_model") else {
        return;
    };
    let memo = tempfile::tempdir().unwrap();
    let memo_dir = memo.path().join("engines");
    let memos = || -> Vec<(String, String)> {
        let mut found: Vec<(String, String)> = std::fs::read_dir(&memo_dir)
            .unwrap()
            .map(|e| {
                let path = e.unwrap().path();
                let name = path.file_name().unwrap().to_string_lossy().into_owned();
                (name, std::fs::read_to_string(&path).unwrap())
            })
            .collect();
        found.sort();
        found
    };

    let plus = std::fs::read(model(&a, "nanodet-plus-m_320")).unwrap();
    let plus_model = OnnxModel::parse(&plus).unwrap();
    let (rewritten, batch, why) = batchable(&plus_model, 4, &memo_dir);
    assert_eq!((batch, why.as_deref()), (4, None));
    assert_ne!(rewritten, plus);
    let kept = memos();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(kept[0].1, "ok");

    let legacy = std::fs::read(model(&a, "nanodet-m_320")).unwrap();
    let (unchanged, batch, why) = batchable(&OnnxModel::parse(&legacy).unwrap(), 4, &memo_dir);
    assert_eq!((batch, unchanged == legacy), (1, true));
    let why = why.unwrap();
    assert!(why.contains("folds the batch"), "{why}");
    assert!(memos().iter().any(|(_, verdict)| *verdict == why));

    // A kept verdict is believed, not re-checked: this one is planted.
    std::fs::write(memo_dir.join(&kept[0].0), "planted verdict").unwrap();
    let (_, batch, why) = batchable(&plus_model, 4, &memo_dir);
    assert_eq!((batch, why.as_deref()), (1, Some("planted verdict")));

    // Batch 1 asked: nothing to check, nothing kept.
    let (same, batch, why) = batchable(&plus_model, 1, &memo.path().join("unused"));
    assert_eq!((same == plus, batch, why), (true, 1, None));
    assert!(!memo.path().join("unused").exists());
}

#[test]
fn the_fp16_copy_finds_what_the_fp32_model_finds() {
    use std::sync::Arc;

    use nanodetd::backend::{BackendKind, EngineOptions, open_engine};
    use nanodetd::frame::Frame;

    let Some(a) = assets("the_fp16_copy_finds_what_the_fp32_model_finds") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    for name in ["nanodet-plus-m_320", "nanodet-m_320"] {
        let fp32 = model(&a, name);
        let (half, report) = OnnxModel::parse(&std::fs::read(&fp32).unwrap())
            .unwrap()
            .to_fp16()
            .unwrap();
        let half = half.bytes();
        assert!(report.converted > 100, "{name}: {report:?}");
        let half_path = dir.path().join(format!("{name}.fp16.onnx"));
        std::fs::write(&half_path, &*half).unwrap();
        let detector = |path: &std::path::Path| {
            support::live_detector_on(
                open_engine(BackendKind::Tract, path, &EngineOptions::default()).unwrap(),
            )
        };
        let (full, halved): (Arc<_>, Arc<_>) = (detector(&fp32), detector(&half_path));
        let (mut full, mut halved) = (full.session().unwrap(), halved.session().unwrap());
        let mut compared = 0;
        for photo in ["hpc203_bus.jpg", "hpc203_zidane.jpg", "skimage_chelsea.png"] {
            let frame = Frame::from_file(&support::sample(&a, photo)).unwrap();
            let (want, got) = (full.detect(&frame).unwrap(), halved.detect(&frame).unwrap());
            // float16 keeps 11 bits: scores move in the third decimal, so
            // only detections clear of the floor are matched.
            for w in want.iter().filter(|d| d.score > 0.45) {
                let g = support::nearest(&got, w)
                    .unwrap_or_else(|| panic!("{name} {photo}: FP16 lost {w:?}"));
                assert!(
                    (g.score - w.score).abs() < 0.02,
                    "{name} {photo}: {g:?} vs {w:?}"
                );
                assert!(
                    support::box_diff(g, w) < 2.0,
                    "{name} {photo}: {g:?} vs {w:?}"
                );
                compared += 1;
            }
        }
        assert!(compared >= 3, "{name}: only {compared} detections compared");
        // The ONNX checker, where Python has it (CI installs onnx).
        let checked = std::process::Command::new("python3")
            .args(["-c", "import onnx, sys; onnx.checker.check_model(onnx.load(sys.argv[1]), full_check=True)"])
            .arg(&half_path)
            .output()
            .unwrap();
        if std::env::var_os("CI").is_some() || checked.status.success() {
            assert!(
                checked.status.success(),
                "{name}: {}",
                String::from_utf8_lossy(&checked.stderr)
            );
        }
    }
    // Bad input is a typed error, not a panic.
    let garbage = OnnxModel::parse(b"not onnx").unwrap_err();
    assert!(
        matches!(garbage, nanodetd::model::RewriteError::Decode(_)),
        "{garbage}"
    );
    assert!(
        garbage.to_string().starts_with("not an ONNX model: "),
        "{garbage}"
    );
}

/// Issue 21: a session fed image by image into the slots of one batch,
/// run once, and read slot by slot gives each photo exactly the
/// detections a run of its own gives (tract, the real model); a slot past
/// the session's batch is an error, not a panic.
#[test]
fn a_batch_of_slots_gives_each_image_its_own_detections_issue_21() {
    let Some(a) = assets("a_batch_of_slots") else {
        return;
    };
    let detector = support::live_detector(&model(&a, "nanodet-plus-m_320"));
    let mut session = detector.session().unwrap();
    let photos: Vec<nanodetd::frame::Frame> = [
        "hpc203_bus.jpg",
        "hpc203_person.jpg",
        "hpc203_dog.jpg",
        "nanodet_000252.jpg",
    ]
    .iter()
    .map(|name| nanodetd::frame::Frame::from_file(&support::sample(&a, name)).unwrap())
    .collect();
    let alone: Vec<_> = photos.iter().map(|p| session.detect(p).unwrap()).collect();
    let transforms: Vec<_> = photos
        .iter()
        .enumerate()
        .map(|(slot, p)| session.preprocess_into(slot, p).unwrap())
        .collect();
    session.infer_batch(photos.len()).unwrap();
    for (slot, transform) in transforms.iter().enumerate() {
        let batched = session.postprocess_slot(slot, transform).unwrap();
        assert!(!batched.is_empty(), "slot {slot}");
        assert_eq!(batched, alone[slot], "slot {slot}");
    }
    assert!(
        session
            .postprocess_slot(photos.len(), &transforms[0])
            .is_err()
    );
    let past = session.max_batch();
    assert!(session.preprocess_into(past, &photos[0]).is_err());
}

/// Issue 21: the batch rewrite run as one plan on tract (a symbolic
/// batch), six photos in one run: each photo's detections are, frame by
/// frame, what the file's own model finds in it alone: the same classes in
/// the same order, scores within 1e-5 and boxes within 0.01 px (a batched
/// convolution sums in another order: about 1e-7 apart, measured). A
/// legacy export that cannot batch says why and runs image by image.
#[test]
fn tract_runs_the_batch_rewrite_in_one_run_with_each_photo_s_own_detections_issue_21() {
    use std::sync::Arc;

    use nanodetd::backend::{EngineOptions, TractEngine};

    let Some(a) = assets("tract_runs_the_batch_rewrite") else {
        return;
    };
    let memo = tempfile::tempdir().unwrap();
    let path = model(&a, "nanodet-plus-m_320");
    let engine =
        TractEngine::load_batched(&path, &EngineOptions::default(), 8, memo.path()).unwrap();
    assert_eq!(nanodetd::backend::Engine::max_batch(&engine), 8);
    assert!(nanodetd::backend::Engine::notes(&engine).is_empty());
    let batched = support::live_detector_on(Arc::new(engine));
    let alone = support::live_detector(&path);
    let mut batched = batched.session().unwrap();
    let mut alone = alone.session().unwrap();
    assert_eq!(batched.max_batch(), 8);
    let photos: Vec<nanodetd::frame::Frame> = [
        "hpc203_bus.jpg",
        "hpc203_person.jpg",
        "hpc203_dog.jpg",
        "hpc203_zidane.jpg",
        "nanodet_000252.jpg",
        "skimage_motorcycle_left.png",
    ]
    .iter()
    .map(|name| nanodetd::frame::Frame::from_file(&support::sample(&a, name)).unwrap())
    .collect();
    let transforms: Vec<_> = photos
        .iter()
        .enumerate()
        .map(|(slot, p)| batched.preprocess_into(slot, p).unwrap())
        .collect();
    batched.infer_batch(photos.len()).unwrap();
    let (mut found, mut worst) = (0, (0f32, 0f32));
    for (slot, (photo, transform)) in photos.iter().zip(&transforms).enumerate() {
        let got = batched.postprocess_slot(slot, transform).unwrap();
        let want = alone.detect(photo).unwrap();
        assert!(!want.is_empty(), "slot {slot}");
        let (score, pixels) =
            support::assert_same_detections(&got, &want, 1e-5, 0.01, &format!("slot {slot}"));
        worst = (worst.0.max(score), worst.1.max(pixels));
        found += got.len();
    }
    eprintln!(
        "{} photos in one run, {found} detections; worst score difference {}, worst box difference {} px",
        photos.len(),
        worst.0,
        worst.1
    );

    let legacy = TractEngine::load_batched(
        &model(&a, "nanodet-m_320"),
        &EngineOptions::default(),
        8,
        memo.path(),
    )
    .unwrap();
    let notes = nanodetd::backend::Engine::notes(&legacy);
    assert!(
        notes
            .iter()
            .any(|n| n.contains("cannot batch") && n.contains("folds the batch")),
        "{notes:?}"
    );
    assert_eq!(nanodetd::backend::Engine::max_batch(&legacy), usize::MAX);
}

/// Issue 21: what ONNX Runtime's CUDA provider runs. FP16 and batchable
/// together: the batch check runs on the FP32 model (tract's float16
/// differs at 1e-3 between a batch and a single run, which failed the
/// check on the copy itself), the rewrite goes on the FP16 copy, and the
/// result runs on tract at batch 3 with each image's outputs what it gives
/// alone, within FP16's own rounding. A legacy export stays at batch 1,
/// with the reason.
#[test]
fn the_cuda_provider_s_model_is_fp16_and_batchable_checked_on_fp32_issue_21() {
    use nanodetd::backend::onnxruntime::cuda_model;

    let Some(a) = assets("the_cuda_provider_s_model") else {
        return;
    };
    let memo = tempfile::tempdir().unwrap();
    let plus = std::fs::read(model(&a, "nanodet-plus-m_320")).unwrap();
    let made = cuda_model(&plus, true, 8, memo.path());
    assert_eq!(made.max_batch, 8, "{:?}", made.notes);
    assert!(
        made.notes.iter().any(|n| n.starts_with("FP16:")),
        "{:?}",
        made.notes
    );
    assert!(
        !made.notes.iter().any(|n| n.contains("cannot")),
        "{:?}",
        made.notes
    );
    let onnx = made.onnx.unwrap();
    // A batch of three, each image against itself alone, on tract: equal
    // but for FP16's rounding, which the check's 1e-4 does not allow.
    match validate_batch(&onnx, (320, 320), 3) {
        Ok(()) => {}
        Err(nanodetd::backend::BatchMismatch::Differs { batched, alone, .. }) => {
            assert!((batched - alone).abs() < 0.01, "{batched} against {alone}");
        }
        Err(other) => panic!("{other}"),
    }

    let as_is = cuda_model(&plus, false, 1, memo.path());
    assert_eq!((as_is.onnx, as_is.max_batch), (None, 1));
    let legacy = std::fs::read(model(&a, "nanodet-m_320")).unwrap();
    let made = cuda_model(&legacy, false, 8, memo.path());
    assert_eq!(made.max_batch, 1);
    assert!(
        made.notes.iter().any(|n| n.contains("cannot batch")),
        "{:?}",
        made.notes
    );
}
