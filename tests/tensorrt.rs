//! The TensorRT backend where TensorRT cannot run: the binary built with
//! the `tensorrt` feature starts, and says exactly what is missing. (No
//! machine this project can reach has TensorRT: docs/TENSORRT.md says how
//! the shim is checked instead.)
#![cfg(feature = "tensorrt")]
#![allow(clippy::unwrap_used)]

mod support;

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
    match nanodetd::gpu::Gpu::open(0) {
        Err(_) => assert!(err.contains("no CUDA driver library"), "{err}"),
        Ok(_) => assert!(err.contains("cannot load libnvinfer.so."), "{err}"),
    }
    assert!(!err.contains("panicked"), "{err}");
}
