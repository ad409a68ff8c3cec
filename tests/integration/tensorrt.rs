//! The TensorRT backend where TensorRT cannot run: a binary built with
//! the `tensorrt` feature starts, and says exactly what is missing; one
//! built without it says so. Either way the daemon falls back to the CPU.
//! (No machine this project can reach has TensorRT: docs/TENSORRT.md says
//! how the shim is checked instead.)
#![allow(clippy::unwrap_used)]

use crate::support;

#[test]
fn without_tensorrt_the_backend_says_what_is_missing() {
    let Some(a) = support::assets("without_tensorrt_the_backend_says_what_is_missing") else {
        return;
    };
    let model = support::model(&a, "nanodet-plus-m_320");
    let image = support::sample(&a, "hpc203_bus.jpg");
    let out = support::nanodetd(&[
        "detect",
        "--backend",
        "tensorrt",
        "--model",
        model.to_str().unwrap(),
        image.to_str().unwrap(),
    ]);
    let err = support::stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(err.contains("tensorrt backend unavailable"), "{err}");
    // Without a GPU the driver is what is missing; with one (the GPU test
    // machine), TensorRT's library.
    #[cfg(feature = "tensorrt")]
    match nanodetd::gpu::Gpu::open(0) {
        Err(_) => assert!(err.contains("no CUDA driver library"), "{err}"),
        Ok(_) => assert!(err.contains("cannot load libnvinfer.so."), "{err}"),
    }
    #[cfg(not(feature = "tensorrt"))]
    assert!(
        err.contains(nanodetd::backend::TENSORRT_NOT_COMPILED_IN),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn daemon_falls_back_to_the_cpu_loudly_when_tensorrt_cannot_run() {
    let Some(a) = support::assets("daemon_falls_back_to_the_cpu_loudly_when_tensorrt_cannot_run")
    else {
        return;
    };
    #[cfg(feature = "tensorrt")]
    if nanodetd::gpu::Gpu::open(0).is_ok() && nanodetd::backend::tensorrt::TensorRt::open().is_ok()
    {
        eprintln!("SKIPPED: this machine has a GPU and TensorRT, so nothing falls back");
        return;
    }
    let cache = tempfile::tempdir().unwrap();
    let model = support::model(&a, "nanodet-plus-m_320");
    let text = format!(
        "[model]\npath = {:?}\nbackend = \"tensorrt\"\ncache = {:?}\n\n[[camera]]\nname = \"front\"\nsource = {{ folder = \"/srv\" }}\n",
        model.display().to_string(),
        cache.path().display().to_string()
    );
    let config =
        nanodetd::config::Config::parse(&text, std::path::Path::new("/etc/nanodetd.toml")).unwrap();
    let options = nanodetd::prepare::LoadOptions::from_config(&config.model);
    let detector = nanodetd::prepare::load_detector(&config.model, &options).unwrap();
    assert_eq!(
        detector.engine().backend(),
        nanodetd::backend::BackendKind::Tract
    );
    let notes = detector.engine().notes();
    assert!(
        notes
            .first()
            .is_some_and(|n| n.starts_with("fallback: TensorRT unavailable (")
                && n.ends_with("running on tract, the CPU")),
        "{notes:?}"
    );
    // And the CPU really runs it.
    let frame = nanodetd::frame::Frame::from_file(&support::sample(&a, "hpc203_bus.jpg")).unwrap();
    let found = detector.session().unwrap().detect(&frame).unwrap();
    assert!(
        found
            .iter()
            .any(|d| detector.class_name(d.class_id) == "bus"),
        "{found:?}"
    );
}
