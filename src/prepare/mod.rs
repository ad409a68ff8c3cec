//! The one model-preparation path: a `[model]` table (the daemon's, or one
//! a command builds from its flags) → the file that runs (the FP32 ONNX,
//! or the Q/DQ INT8 model made from it and cached) → an engine → a
//! detector. The daemon and the `detect`, `eval`, `bench` and `quantize`
//! commands all load models here, so a command runs the model the daemon
//! runs, from the same cache.

pub mod int8;
#[cfg(feature = "tensorrt")]
mod tensorrt;
/// A build without TensorRT: a model configured for it falls back, as on a
/// box without a GPU, and says why.
#[cfg(not(feature = "tensorrt"))]
mod tensorrt {
    use super::{LoadOptions, TensorRtSetupError};

    /// Always [`TensorRtSetupError::NotCompiledIn`].
    pub fn engine(
        _: &crate::config::ModelConfig,
        _: &std::path::Path,
        _: &LoadOptions,
    ) -> Result<std::sync::Arc<dyn crate::backend::Engine>, TensorRtSetupError> {
        Err(TensorRtSetupError::NotCompiledIn)
    }
}

use std::path::PathBuf;
use std::sync::Arc;

use crate::backend::onnxruntime::{OnnxRuntimeOptions, Provider, TensorRtProviderOptions};
use crate::backend::{self, BackendChoice, BackendError, BackendKind, EngineOptions};
use crate::config::{Int8Mode, ModelConfig, Precision};
use crate::detector::{DetectionParams, Detector, DetectorError};
use crate::model::{self, ClassNamesError, LayoutOverrides, SizeError};
use crate::quantize::QuantizeError;
pub use int8::Int8Error;
pub use nanodetd_core::errors::one_line;

/// Told of each step of a long build (a TensorRT engine); the daemon
/// passes it on to systemd.
pub type Progress = Arc<dyn Fn(&str) + Send + Sync>;

/// What a load needs beyond the `[model]` table.
#[derive(Clone)]
pub struct LoadOptions {
    /// Score and NMS settings.
    pub params: DetectionParams,
    /// Layout settings for exports that break convention (commands only).
    pub overrides: LayoutOverrides,
    /// Input size for models whose size is not fixed (commands only).
    pub input_size: Option<(usize, usize)>,
    /// Where `backend = "tensorrt"` cannot run, run tract and say so (the
    /// daemon), rather than fail (a command, whose figures would
    /// otherwise be another backend's).
    pub fall_back_to_cpu: bool,
    /// Build progress.
    pub progress: Progress,
}

impl LoadOptions {
    /// The daemon's: detection settings from the table, progress logged.
    pub fn from_config(model: &ModelConfig) -> LoadOptions {
        LoadOptions {
            params: DetectionParams {
                score_threshold: model.score.get(),
                iou_threshold: model.iou.get(),
                max_detections: model.max_detections.get(),
                ..DetectionParams::LIVE
            },
            overrides: LayoutOverrides::default(),
            input_size: None,
            fall_back_to_cpu: true,
            progress: Arc::new(|status: &str| log::info!("{status}")),
        }
    }
}

/// Why a model could not be made ready.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The class-name file cannot be used.
    #[error("{}", path.display())]
    ClassNames {
        /// The class-name file.
        path: PathBuf,
        /// Why.
        source: ClassNamesError,
    },
    /// The model declares sizes no backend is allowed to allocate.
    #[error(transparent)]
    Size(#[from] SizeError),
    /// The INT8 model cannot be made or found.
    #[error("the INT8 model")]
    Int8(#[from] Int8Error),
    /// No engine opens the model.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The engine's shapes are not a NanoDet detector's.
    #[error(transparent)]
    Detector(#[from] DetectorError),
}

/// Why the TensorRT engine could not be set up; the daemon then falls
/// back to the CPU and says why.
#[derive(Debug, thiserror::Error)]
pub enum TensorRtSetupError {
    /// This binary has no TensorRT backend.
    #[error("{}", backend::TENSORRT_NOT_COMPILED_IN)]
    NotCompiledIn,
    /// A model file cannot be read.
    #[error("{}: cannot read", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The legacy calibrator's image set cannot be read.
    #[error("the calibration set")]
    Calibration(#[source] QuantizeError),
    /// The FP32 model, whose preprocessing calibration repeats, does not
    /// open as a detector.
    #[error("the FP32 model")]
    Fp32(#[source] Box<LoadError>),
    /// TensorRT refused, or no GPU is here.
    #[error(transparent)]
    Backend(#[from] BackendError),
}

/// The file that runs for `model`: the FP32 ONNX, or the Q/DQ INT8 model
/// made from it (cached) for the layout `options` read it with.
pub fn prepared_file(model: &ModelConfig, options: &LoadOptions) -> Result<PathBuf, Int8Error> {
    let runs = |kind: BackendKind| match model.backend {
        BackendChoice::Only(chosen) => chosen == kind,
        BackendChoice::Auto => true,
    };
    match model.precision {
        Precision::Fp32 => Ok(model.path.clone()),
        Precision::Fp16 => {
            if !BackendKind::compiled().any(|kind| runs(kind) && kind.has_fp16_kernels()) {
                log::info!(
                    "precision fp16 applies to GPU engines; {} runs FP32",
                    model.backend
                );
            }
            Ok(model.path.clone())
        }
        // TensorRT's own calibrator works from the FP32 model.
        Precision::Int8
            if model.backend == BackendChoice::Only(BackendKind::TensorRt)
                && model.tensorrt.int8_mode == Int8Mode::Calibrator =>
        {
            Ok(model.path.clone())
        }
        Precision::Int8 => {
            let qdq = int8::qdq_model(model, &options.overrides, options.input_size)?;
            if let BackendChoice::Only(kind) = model.backend
                && !kind.has_int8_kernels()
            {
                log::info!(
                    "{kind} runs the Q/DQ model with INT8 rounding emulated in float: the accuracy is INT8's, the speed is not"
                );
            }
            Ok(qdq)
        }
    }
}

/// Builds the detector a `[model]` table describes.
pub fn load_detector(
    model: &ModelConfig,
    options: &LoadOptions,
) -> Result<Arc<Detector>, LoadError> {
    let class_names = match &model.classes {
        Some(path) => {
            Some(
                model::read_class_names(path).map_err(|source| LoadError::ClassNames {
                    path: path.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    // Before any backend sizes its buffers from the model's shapes: a
    // hostile one would make it allocate gigabytes and abort the daemon.
    model::check_file_sizes(&model.path)?;
    // The class names decide the class count, as in `Detector::new`, for
    // the layout the INT8 calibration reads too.
    let options = &LoadOptions {
        overrides: options.overrides.counting(class_names.as_deref()),
        ..options.clone()
    };
    let file = prepared_file(model, options)?;
    let engine_options = EngineOptions {
        input_size: options.input_size,
        onnxruntime: onnxruntime_options(model),
    };
    let engine = match model.backend {
        // No GPU, no driver or no TensorRT on this box: the CPU runs the
        // same model, and the log and the stats topic say so.
        BackendChoice::Only(BackendKind::TensorRt) if options.fall_back_to_cpu => {
            match tensorrt::engine(model, &file, options) {
                Ok(engine) => engine,
                Err(why) => {
                    let note = format!(
                        "fallback: TensorRT unavailable ({}); running on tract, the CPU",
                        one_line(&why)
                    );
                    log::error!("{note}");
                    let cpu = backend::open_engine(BackendKind::Tract, &file, &engine_options)?;
                    backend::with_notes(cpu, vec![note])
                }
            }
        }
        choice => backend::open_chosen(choice, &|kind| match kind {
            BackendKind::TensorRt => {
                tensorrt::engine(model, &file, options).map_err(|why| match why {
                    // Already says the backend is unavailable, and why.
                    TensorRtSetupError::Backend(e) => e,
                    why => BackendError::unavailable(kind, why),
                })
            }
            _ => backend::open_engine(kind, &file, &engine_options),
        })?,
    };
    for note in engine.notes() {
        log::info!("engine: {note}");
    }
    let detector = Detector::new(engine, &options.overrides, class_names, options.params)?;
    Ok(Arc::new(detector))
}

/// ONNX Runtime's settings from `[model.onnxruntime]` and `[model]`.
pub fn onnxruntime_options(model: &ModelConfig) -> OnnxRuntimeOptions {
    let ort = &model.onnxruntime;
    OnnxRuntimeOptions {
        library: ort.library.clone(),
        intra_threads: ort.intra_threads.get(),
        provider: ort
            .provider
            .unwrap_or_else(|| Provider::default_for(model.backend)),
        device: ort.device.get(),
        cuda_graph: ort.cuda_graph,
        max_batch: ort.max_batch.get(),
        fp16: model.precision == Precision::Fp16,
        // Beside TensorRT's plans: the same verdict serves both.
        batch_memo: model
            .tensorrt
            .engines
            .clone()
            .unwrap_or_else(|| model.cache.join("engines")),
        tensorrt: TensorRtProviderOptions {
            cache: model.cache.join("onnxruntime-tensorrt"),
            fp16: model.precision != Precision::Fp32,
            int8: model.precision == Precision::Int8,
        },
    }
}
