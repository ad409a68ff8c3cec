//! The TensorRT engine the daemon runs (feature `tensorrt`): the model's
//! settings turned into the backend's options, with build progress sent
//! to systemd.

use std::path::Path;
use std::sync::Arc;

use sd_notify::NotifyState;

use super::notify;
use crate::backend::tensorrt::{OnnxSources, TensorRtOptions, TrtEngine, TrtPrecision};
use crate::backend::{self, EngineOptions};
use crate::config::{Int8Mode, ModelConfig, Precision};
use crate::detector::{DetectionParams, Detector};
use crate::model::LayoutOverrides;

/// The TensorRT engine for `model`, built from `file` (the Q/DQ model for
/// INT8) or loaded from the engine cache. While it builds, systemd hears
/// each step (STATUS=) and the start timeout is pushed out, so a slow
/// first build on a Jetson is not killed.
pub fn engine(model: &ModelConfig, file: &Path) -> Result<Arc<dyn crate::backend::Engine>, String> {
    let trt = &model.tensorrt;
    let precision = match (model.precision, trt.int8_mode) {
        (Precision::Fp32, _) => TrtPrecision::Fp32,
        (Precision::Fp16, _) => TrtPrecision::Fp16,
        (Precision::Int8, Int8Mode::Qdq) => TrtPrecision::Int8Qdq,
        (Precision::Int8, Int8Mode::Calibrator) => TrtPrecision::Int8Calibrator,
    };
    let read = |path: &Path| {
        std::fs::read(path).map_err(|e| format!("{}: cannot read: {e}", path.display()))
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
            let set =
                crate::quantize::CalibrationSet::scan(&model.int8.calibration, model.int8.images)
                    .map_err(|e| e.to_string())?;
            let fp32 = backend::open_engine(
                backend::BackendKind::Tract,
                &model.path,
                &EngineOptions::default(),
            )
            .and_then(|engine| {
                Detector::new(
                    engine,
                    &LayoutOverrides::default(),
                    None,
                    DetectionParams::LIVE,
                )
                .map_err(|e| backend::BackendError::Run(e.to_string()))
            })
            .map_err(|e| e.to_string())?;
            Some((set, fp32.preprocess_spec().clone()))
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
            (_, Some((set, _))) => format!("calibrator:{}", set.digest),
            _ => String::new(),
        },
        calibration,
        workspace_bytes: trt.workspace_mib << 20,
        max_batch: trt.max_batch,
        dla_core: trt.dla_core,
        device: trt.device,
        cuda_graph: trt.cuda_graph,
        engines: trt
            .engines
            .clone()
            .unwrap_or_else(|| model.cache.join("engines")),
        cache_bytes: trt.cache_limit_mib << 20,
        progress: Arc::new(|status: &str| {
            log::info!("{status}");
            notify(&[
                NotifyState::Status(status),
                NotifyState::ExtendTimeoutUsec(120_000_000),
            ]);
        }),
    };
    let sources = OnnxSources {
        fp32: &fp32,
        qdq: qdq.as_deref(),
    };
    let engine = TrtEngine::open(&name, &sources, &options).map_err(|e| e.to_string())?;
    Ok(Arc::new(engine))
}
