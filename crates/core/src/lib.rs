//! nanodetd's detection core: everything that turns an image into tracked
//! detections, and a float model into an INT8 one, with no daemon in it.
//! This crate depends on neither tokio, rumqttc, nor the config file; the
//! capture layer, the daemon, MQTT and the CLI sit above it in the
//! `nanodetd` crate.
//!
//! - [`frame`] decodes images; [`pixels`] converts the pixel formats
//!   cameras deliver; [`buffer`] holds capture buffers that travel to the
//!   detector without a copy.
//! - [`preprocess`] turns a frame into network input, [`backend`] runs the
//!   network (tract, ONNX Runtime, TensorRT), [`model`] understands its
//!   layouts and outputs, [`postprocess`] applies NMS, and [`detector`]
//!   strings those together for one frame.
//! - [`track`] turns a camera's detections into objects with lifecycle
//!   events; [`eval`] scores detections the way pycocotools does.
//! - [`quantize`] calibrates an FP32 model into explicit Q/DQ ONNX;
//!   [`engine_cache`] keeps such built artifacts between runs.
//! - [`errors`] prints an error and its causes on one line.
//! - [`contain`] turns a panic in a third-party decoder into that input's
//!   error; every other panic aborts.
//! - GPU (feature `cuda`): `gpu` finds a CUDA device at run time, and
//!   `preprocess` gains a kernel doing the same preprocessing on it.

pub mod backend;
pub mod buffer;
pub mod contain;
pub mod detector;
pub mod engine_cache;
pub mod errors;
pub mod eval;
pub mod frame;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod model;
pub mod pixels;
pub mod postprocess;
pub mod preprocess;
pub mod quantize;
pub mod track;
