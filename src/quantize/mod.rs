//! INT8 post-training quantization: from an FP32 NanoDet ONNX and a set of
//! calibration images to an explicit Q/DQ ONNX that TensorRT 8.6, 10 and 11
//! build directly. This first part is the calibration math
//! ([`histogram`]); graph rewriting and the CLI are the rest of the INT8
//! issue.

pub mod histogram;

pub use histogram::{DEFAULT_BINS, Histogram, Method, scale, threshold, weight_scales};
