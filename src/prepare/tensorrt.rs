//! The TensorRT engine a `[model]` table asks for (feature `tensorrt`):
//! the model's settings turned into the backend's options, with build
//! progress told to the caller (the daemon tells systemd).

use std::path::Path;
use std::sync::Arc;

use super::{LoadError, LoadOptions, TensorRtSetupError};
use crate::backend::tensorrt::{OnnxSources, TensorRtOptions, TrtEngine, TrtPrecision};
use crate::config::{Bounded, Int8Mode, ModelConfig, Precision};
use crate::engine_cache::sha256_hex;

/// The TensorRT engine for `model`, built from `file` (the Q/DQ model for
/// INT8) or loaded from the engine cache. `options.progress` hears each
/// step of a build; the calibrator preprocesses with the layout of
/// `options.overrides` at the declared input size, which TensorRT builds
/// for.
pub fn engine(
    model: &ModelConfig,
    file: &Path,
    options: &LoadOptions,
) -> Result<Arc<dyn crate::backend::Engine>, TensorRtSetupError> {
    let progress = &options.progress;
    let trt = &model.tensorrt;
    let precision = match (model.precision, trt.int8_mode) {
        (Precision::Fp32, _) => TrtPrecision::Fp32,
        (Precision::Fp16, _) => TrtPrecision::Fp16,
        (Precision::Int8, Int8Mode::Qdq) => TrtPrecision::Int8Qdq,
        (Precision::Int8, Int8Mode::Calibrator) => TrtPrecision::Int8Calibrator,
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|source| TensorRtSetupError::Read {
            path: path.to_owned(),
            source,
        })
    };
    let fp32 = read(&model.path)?;
    let qdq = match precision {
        TrtPrecision::Int8Qdq => Some(read(file)?),
        _ => None,
    };
    let name = crate::model::file_name_stem(&model.path);
    // The legacy calibrator sees the calibration images preprocessed as
    // inference will preprocess frames: the FP32 model's layout decides.
    let calibration = match precision {
        TrtPrecision::Int8Calibrator => {
            let images = model.int8.images.map(Bounded::get);
            let set = crate::quantize::CalibrationSet::scan(&model.int8.calibration, images)
                .map_err(TensorRtSetupError::Calibration)?;
            let spec = super::int8::fp32_layout(&model.path, &options.overrides, None)
                .map_err(|e| TensorRtSetupError::Fp32(Box::new(LoadError::from(e))))?
                .preprocess_spec();
            Some((set, spec))
        }
        _ => None,
    };
    let options = TensorRtOptions {
        precision,
        quantization: match (precision, &calibration) {
            // The Q/DQ file's name carries the calibration key.
            (TrtPrecision::Int8Qdq, _) => file
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            (_, Some((set, spec))) => format!(
                "calibrator:{}",
                crate::quantize::calibrator_key(&sha256_hex(&fp32), set, spec)
            ),
            _ => String::new(),
        },
        calibration,
        workspace_bytes: trt.workspace_mib.get() << 20,
        max_batch: trt.max_batch.get(),
        dla_core: trt.dla_core.map(Bounded::get),
        device: trt.device.get(),
        cuda_graph: trt.cuda_graph,
        engines: trt
            .engines
            .clone()
            .unwrap_or_else(|| model.cache.join("engines")),
        cache_bytes: trt.cache_limit_mib.get() << 20,
        progress: progress.clone(),
    };
    let sources = OnnxSources {
        fp32: &fp32,
        qdq: qdq.as_deref(),
    };
    let engine = TrtEngine::open(&name, &sources, &options)?;
    Ok(Arc::new(engine))
}
