//! Every committed fuzz input, the hand-made seeds (fuzz/seeds/<target>/)
//! and what the fuzzers found (fuzz/corpus/<target>/), run through its
//! target on stable: each stays a regression test. The fuzzers themselves
//! run on nightly (fuzz/Cargo.toml, docs/RELIABILITY.md).

use std::path::Path;
use std::time::Instant;

use nanodetd::fuzzing::TARGETS;

#[test]
fn every_committed_fuzz_input_runs_without_a_panic() {
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz");
    for (name, target) in TARGETS {
        // The seeds must be there; a corpus only once a fuzzer has run.
        let seeds = std::fs::read_dir(fuzz.join("seeds").join(name))
            .unwrap_or_else(|e| panic!("fuzz/seeds/{name}: {e}"));
        let corpus = std::fs::read_dir(fuzz.join("corpus").join(name))
            .into_iter()
            .flatten();
        let mut inputs: Vec<_> = seeds.chain(corpus).map(|e| e.unwrap().path()).collect();
        inputs.sort();
        assert!(!inputs.is_empty(), "{name}: no seeds");
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
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/onnx_model/tiny_nanodet_plus_32");
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

/// Inputs that crash a third-party loader (tract-onnx panics on them) can
/// never be replayed in-process. Each is kept in fuzz/crashes/onnx_model/,
/// and the daemon must refuse every one before tract runs in its own
/// process: by its own checks (`model::check_sizes`), or because the trial
/// load in a child process (`daemon::probe`) crashed.
#[test]
fn every_model_that_crashes_tract_is_refused_before_the_daemon_loads_it() {
    use nanodetd::daemon::probe::{ProbeEngine, ProbeOutcome, run_probe, verdict};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/crashes/onnx_model");
    let exe = Path::new(env!("CARGO_BIN_EXE_nanodetd"));
    let mut count = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let outcome = run_probe(exe, &path, &ProbeEngine::Tract);
        let refused_by_our_checks =
            nanodetd::model::check_sizes(&std::fs::read(&path).unwrap()).is_err();
        assert!(
            verdict(&outcome).is_err()
                || (outcome == ProbeOutcome::Exited(2) && refused_by_our_checks),
            "{}: {outcome:?}",
            path.display()
        );
        count += 1;
    }
    assert!(count >= 2, "{count} crash inputs");
}
