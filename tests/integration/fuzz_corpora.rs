//! Every committed fuzz corpus (fuzz/corpus/<target>/), run through its
//! target on stable: what the fuzzers found interesting, including every
//! input that once crashed, stays a regression test. The fuzzers
//! themselves run on nightly (fuzz/Cargo.toml, docs/RELIABILITY.md).

use std::path::Path;
use std::time::Instant;

use nanodetd::fuzzing::TARGETS;

#[test]
fn every_committed_fuzz_input_runs_without_a_panic() {
    let corpora = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    for (name, target) in TARGETS {
        let dir = corpora.join(name);
        let mut inputs: Vec<_> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .map(|e| e.unwrap().path())
            .collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: an empty corpus");
        let started = Instant::now();
        for input in &inputs {
            let bytes = std::fs::read(input).unwrap();
            let caught = std::panic::catch_unwind(|| target(&bytes));
            assert!(caught.is_ok(), "{name}: {} panics", input.display());
        }
        eprintln!(
            "fuzz corpus {name}: {} inputs in {:.2} s",
            inputs.len(),
            started.elapsed().as_secs_f64()
        );
    }
}

/// The ONNX seeds mean something only if they reach the layout detection:
/// the tiny model must load and be taken for a NanoDet-Plus head.
#[test]
fn the_onnx_seed_is_a_model_the_detector_takes() {
    let seed =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/onnx_model/tiny_nanodet_plus_32");
    let bytes = std::fs::read(&seed).unwrap();
    let engine = nanodetd::backend::TractEngine::from_bytes(
        &bytes,
        &seed,
        &nanodetd::backend::EngineOptions::default(),
    )
    .unwrap();
    let detector = nanodetd::detector::Detector::new(
        std::sync::Arc::new(engine),
        &nanodetd::model::LayoutOverrides::default(),
        None,
        nanodetd::detector::DetectionParams::LIVE,
    )
    .unwrap();
    assert_eq!(
        (
            detector.layout().input_width,
            detector.layout().input_height
        ),
        (32, 32)
    );
}
