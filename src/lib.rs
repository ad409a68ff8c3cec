//! nanodetd: NanoDet object detection for edge cameras.
//!
//! The library is the pure core plus the backends: [`frame`] decodes
//! images, [`preprocess`] turns them into network input, [`backend`] runs
//! the network, [`model`] understands its outputs, [`postprocess`] applies
//! NMS, and [`detector`] strings those together for one frame. [`track`]
//! turns a camera's detections into objects with lifecycle events. [`eval`]
//! scores detections the way pycocotools does.
//!
//! The daemon's shell: [`capture`] reads cameras, [`daemon`] wires the
//! threads and tasks, [`mqtt`] publishes, [`reload`] watches the config,
//! [`watchdog`] tells systemd the pipeline is alive, [`logging`] sends lines
//! to journald or stderr.
//!
//! [`allocator`] sets how glibc's malloc keeps the daemon's memory.
//!
//! [`contain`] turns a panic in a third-party decoder into that input's
//! error; every other panic aborts.
//!
//! [`fuzzing`] holds the entry points of the fuzz targets (`fuzz/`).
//!
//! INT8: [`quantize`] calibrates an FP32 model into explicit Q/DQ ONNX;
//! [`engine_cache`] keeps such built artifacts between runs.
//!
//! GPU (feature `cuda`): `gpu` finds a CUDA device at run time, and
//! `preprocess` gains a kernel doing the same preprocessing on it.

pub mod allocator;
pub mod backend;
pub mod capture;
pub mod config;
pub mod contain;
pub mod daemon;
pub mod detector;
pub mod engine_cache;
pub mod eval;
pub mod frame;
pub mod fuzzing;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod logging;
pub mod model;
pub mod mqtt;
pub mod postprocess;
pub mod preprocess;
pub mod quantize;
pub mod reload;
pub mod track;
pub mod watchdog;
