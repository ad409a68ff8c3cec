//! The TensorRT backend (feature `tensorrt`): the plan is built on first
//! use from the ONNX model (FP32, FP16, or INT8 from the quantizer's Q/DQ
//! model), kept in the [`PlanCache`], and run with `enqueueV3` on the
//! GPU's stream with every tensor in device memory that cudarc owns.
//!
//! TensorRT itself is reached through a small C++ shim (`shim.cpp`) that
//! dlopens it; this module decides everything that can be decided without
//! TensorRT: which precision the GPU can really run, what goes into the
//! cache key, and when a batch-1 export may batch.

mod ffi;
mod library;

use std::path::PathBuf;
use std::sync::Arc;

use cudarc::driver::{CudaSlice, DevicePtr, PinnedHostSlice};

pub use self::library::{BuildProgress, BuildRequest, TensorRt, TrtVersion};
use self::library::{Calibration, DATA_TYPE_FLOAT, ExecutionContext, LoadedPlan, TensorBinding};
use super::gather::RowGather;
use super::{
    BackendError, BackendKind, BatchOutputs, DeviceSession, DeviceSessionBox, Engine, GatherPlan,
    InputBatch, ModelInfo, Session,
};
use crate::engine_cache::{
    BuiltPlan, PlanBuilder, PlanCache, PlanKey, Provenance, write_atomically,
};
use crate::errors::{Cause, While};
use crate::frame::Frame;
use crate::gpu::{Gpu, GpuError, GraphReplay};
use crate::model::{OnnxModel, TensorShape};
use crate::preprocess::{PreprocessSpec, preprocess_into};
use crate::quantize::CalibrationSet;

/// The precision asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrtPrecision {
    /// As exported.
    Fp32,
    /// FP16 kernels allowed.
    Fp16,
    /// INT8 from the Q/DQ nodes of the quantizer's model.
    Int8Qdq,
    /// INT8 through TensorRT's own calibrator (TensorRT < 11 only).
    Int8Calibrator,
}

impl TrtPrecision {
    fn code(self) -> i32 {
        match self {
            TrtPrecision::Fp32 => ffi::FP32,
            TrtPrecision::Fp16 => ffi::FP16,
            TrtPrecision::Int8Qdq => ffi::INT8_QDQ,
            TrtPrecision::Int8Calibrator => ffi::INT8_CALIBRATOR,
        }
    }

    /// The name in the cache key and the logs.
    pub fn name(self) -> &'static str {
        match self {
            TrtPrecision::Fp32 => "fp32",
            TrtPrecision::Fp16 => "fp16",
            TrtPrecision::Int8Qdq => "int8",
            TrtPrecision::Int8Calibrator => "int8-calibrator",
        }
    }
}

/// What the GPU and the library really allow for a request: the build to
/// ask for, and every way it differs from what was configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrecisionPlan {
    /// The precision that will be built.
    pub precision: TrtPrecision,
    /// Whether INT8 builds may run float layers in FP16.
    pub float_layers_fp16: bool,
    /// The DLA core it runs on, if any.
    pub dla_core: Option<u32>,
    /// Each fallback, in words, for the log, the cache key and the stats
    /// topic. Empty when the request is built as asked.
    pub fallbacks: Vec<String>,
}

/// GPUs with fast INT8 (DP4A or tensor cores): sm_61 and sm_70 on.
fn fast_int8((major, minor): (i32, i32)) -> bool {
    major >= 7 || (major, minor) == (6, 1)
}

/// GPUs with fast FP16: sm_53, sm_60, sm_62 and sm_70 on (not the
/// GeForce Pascals, sm_61).
fn fast_fp16((major, minor): (i32, i32)) -> bool {
    major >= 7 || matches!((major, minor), (5, 3) | (6, 0) | (6, 2))
}

/// Settles what to build. Never silent: each change from the request is
/// one line in `fallbacks`.
pub fn plan_precision(
    requested: TrtPrecision,
    library: TrtVersion,
    compute_capability: (i32, i32),
    dla_core: Option<u32>,
    dla_cores: u32,
) -> PrecisionPlan {
    let (major, minor) = compute_capability;
    let mut fallbacks = Vec::new();
    let mut precision = requested;
    if precision == TrtPrecision::Int8Calibrator && library.major >= 11 {
        fallbacks.push(format!(
            "int8_mode \"calibrator\" asked, but TensorRT {library} removed the implicit calibrator: building the Q/DQ model"
        ));
        precision = TrtPrecision::Int8Qdq;
    }
    if matches!(
        precision,
        TrtPrecision::Int8Qdq | TrtPrecision::Int8Calibrator
    ) && !fast_int8(compute_capability)
    {
        let to = if fast_fp16(compute_capability) {
            TrtPrecision::Fp16
        } else {
            TrtPrecision::Fp32
        };
        fallbacks.push(format!(
            "INT8 asked, but this GPU (sm_{major}{minor}) has no fast INT8: building {}",
            to.name().to_uppercase()
        ));
        precision = to;
    }
    if precision == TrtPrecision::Fp16 && !fast_fp16(compute_capability) {
        fallbacks.push(format!(
            "FP16 asked, but this GPU (sm_{major}{minor}) has no fast FP16: building FP32"
        ));
        precision = TrtPrecision::Fp32;
    }
    let float_layers_fp16 = library.major < 11 && fast_fp16(compute_capability);
    let dla_core = match dla_core {
        Some(core) if core >= dla_cores => {
            fallbacks.push(format!(
                "DLA core {core} asked, but this device has {dla_cores}: running on the GPU"
            ));
            None
        }
        other => other,
    };
    PrecisionPlan {
        precision,
        float_layers_fp16,
        dla_core,
        fallbacks,
    }
}

/// Everything the TensorRT backend is configured with.
#[derive(Clone)]
pub struct TensorRtOptions {
    /// Precision asked for.
    pub precision: TrtPrecision,
    /// Where the INT8 ranges come from, for the cache key: the Q/DQ
    /// file's name (which carries its INT8 cache key), or
    /// `calibrator:` and [`crate::quantize::calibrator_key`]; "" for float.
    pub quantization: String,
    /// Builder workspace limit.
    pub workspace_bytes: u64,
    /// Largest batch (cameras batched together).
    pub max_batch: u32,
    /// DLA core on Jetson Xavier/Orin.
    pub dla_core: Option<u32>,
    /// CUDA device.
    pub device: usize,
    /// Replay each batch size's enqueue from a CUDA graph (captured on
    /// its second run), rather than launching every kernel each frame.
    pub cuda_graph: bool,
    /// The engine cache directory.
    pub engines: PathBuf,
    /// The cache's size limit.
    pub cache_bytes: u64,
    /// Told of build progress (the daemon feeds sd_notify with it).
    pub progress: Arc<dyn Fn(&str) + Send + Sync>,
    /// For [`TrtPrecision::Int8Calibrator`]: the images and the
    /// preprocessing inference uses, so the calibrator sees what the
    /// engine will.
    pub calibration: Option<(CalibrationSet, PreprocessSpec)>,
}

impl Default for TensorRtOptions {
    /// FP32 at batch 1 on device 0, 1 GiB of workspace, plans under
    /// /var/cache/nanodetd/engines (4 GiB at most), progress to the log.
    fn default() -> TensorRtOptions {
        TensorRtOptions {
            precision: TrtPrecision::Fp32,
            quantization: String::new(),
            workspace_bytes: 1 << 30,
            max_batch: 1,
            dla_core: None,
            device: 0,
            cuda_graph: true,
            engines: PathBuf::from("/var/cache/nanodetd/engines"),
            cache_bytes: 4 << 30,
            progress: Arc::new(|status| log::info!("{status}")),
            calibration: None,
        }
    }
}

impl std::fmt::Debug for TensorRtOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TensorRtOptions")
            .field("precision", &self.precision)
            .field("workspace_bytes", &self.workspace_bytes)
            .field("max_batch", &self.max_batch)
            .field("dla_core", &self.dla_core)
            .field("cuda_graph", &self.cuda_graph)
            .field("engines", &self.engines)
            .finish_non_exhaustive()
    }
}

/// The ONNX models an engine may be built from.
#[derive(Debug, Clone, Copy)]
pub struct OnnxSources<'a> {
    /// The model as exported (FP32, FP16, the legacy calibrator, and any
    /// fallback from INT8).
    pub fp32: &'a [u8],
    /// The quantizer's Q/DQ model, for INT8.
    pub qdq: Option<&'a [u8]>,
}

/// How the engine came to be, for the log and the stats topic.
#[derive(Debug, Clone)]
pub struct EngineReport {
    /// The loaded library's version.
    pub tensorrt: TrtVersion,
    /// The GPU.
    pub gpu: String,
    /// What was built, after fallbacks.
    pub precision: TrtPrecision,
    /// Every fallback from the configuration.
    pub fallbacks: Vec<String>,
    /// Cached or built, and why.
    pub provenance: Provenance,
    /// The batch the engine takes at most.
    pub max_batch: u32,
}

/// Why a TensorRT plan could not be built or loaded.
#[derive(Debug, thiserror::Error)]
pub enum PlanFailure {
    /// TensorRT refused, in its own words.
    #[error(transparent)]
    TensorRt(#[from] library::TrtError),
    /// The calibrator's buffer could not be set up on the GPU.
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// Builds plans with TensorRT for the plan cache.
struct TrtPlanBuilder<'a> {
    tensorrt: &'a TensorRt,
    onnx: &'a [u8],
    request: BuildRequest,
    timing_cache: PathBuf,
    progress: &'a (dyn Fn(&str) + Send + Sync),
    /// The legacy calibrator's images, the GPU to stage them on, and where
    /// its table is kept.
    calibrator: Option<(&'a CalibrationSet, &'a PreprocessSpec, &'a Gpu, PathBuf)>,
}

impl PlanBuilder for TrtPlanBuilder<'_> {
    type Error = PlanFailure;
    fn build(&self, _key: &PlanKey) -> Result<BuiltPlan, PlanFailure> {
        // A missing or stale timing cache only makes the build slower.
        let timing = std::fs::read(&self.timing_cache).unwrap_or_default();
        let mut on_progress = |step: BuildProgress<'_>| {
            match step {
                BuildProgress::PhaseStart { phase, steps } => {
                    (self.progress)(&format!("building engine: {phase} ({steps} steps)"));
                }
                BuildProgress::Step { phase, step } => {
                    (self.progress)(&format!("building engine: {phase}, step {}", step + 1));
                }
                BuildProgress::PhaseFinish { .. } => {}
            }
            true
        };
        let built = match self.calibrator {
            None => {
                self.tensorrt
                    .build(self.onnx, &self.request, &timing, &mut on_progress, None)?
            }
            Some((set, spec, gpu, ref table_path)) => {
                let built =
                    self.build_calibrated(set, spec, gpu, table_path, &timing, &mut on_progress)?;
                if !built.calibration_table.is_empty()
                    && let Err(e) = write_atomically(table_path, &built.calibration_table)
                {
                    log::warn!("calibration table not kept: {e}");
                }
                built
            }
        };
        if !built.timing_cache.is_empty()
            && let Err(e) = write_atomically(&self.timing_cache, &built.timing_cache)
        {
            log::warn!("timing cache not kept: {e}");
        }
        Ok(BuiltPlan {
            plan: built.plan,
            log: built.log,
        })
    }
}

impl TrtPlanBuilder<'_> {
    /// A build with TensorRT's entropy calibrator, fed one preprocessed
    /// calibration image at a time from a device buffer, or from the table
    /// of an earlier build of the same model and set.
    fn build_calibrated(
        &self,
        set: &CalibrationSet,
        spec: &PreprocessSpec,
        gpu: &Gpu,
        table_path: &std::path::Path,
        timing: &[u8],
        on_progress: &mut dyn FnMut(BuildProgress<'_>) -> bool,
    ) -> Result<library::BuildOutput, PlanFailure> {
        let table = std::fs::read(table_path).unwrap_or_default();
        if table.is_empty() {
            log::info!(
                "calibrating with TensorRT's entropy calibrator: {} images from {}",
                set.files.len(),
                set.dir.display()
            );
        } else {
            log::info!("calibration table from {}", table_path.display());
        }
        let stream = gpu.stream().clone();
        let mut device = stream
            .alloc_zeros::<f32>(spec.tensor_len())
            .map_err(GpuError::driver("allocating the calibration buffer"))?;
        let mut host = vec![0f32; spec.tensor_len()];
        let mut files = set.files.iter();
        let mut next_batch = |_input: &str| -> Option<u64> {
            for file in files.by_ref() {
                let ready = Frame::from_file(file)
                    .map_err(|e| e.to_string())
                    .and_then(|f| preprocess_into(&f, spec, &mut host).map_err(|e| e.to_string()))
                    .and_then(|_| {
                        stream
                            .memcpy_htod(&host, &mut device)
                            .and_then(|()| stream.synchronize())
                            .map_err(|e| e.to_string())
                    });
                match ready {
                    Ok(_) => return Some(device.device_ptr(&stream).0),
                    Err(e) => log::warn!("calibration image {} skipped: {e}", file.display()),
                }
            }
            None
        };
        self.tensorrt
            .build(
                self.onnx,
                &self.request,
                timing,
                on_progress,
                Some(Calibration {
                    table: &table,
                    next_batch: &mut next_batch,
                }),
            )
            .map_err(PlanFailure::from)
    }
}

/// Why an enqueue, plain or replayed, failed.
#[derive(Debug, thiserror::Error)]
enum EnqueueError {
    /// TensorRT's enqueue refused.
    #[error(transparent)]
    TensorRt(#[from] library::TrtError),
    /// The CUDA graph could not be launched.
    #[error(transparent)]
    Gpu(#[from] GpuError),
}

/// A TensorRT engine, shared between pipeline threads.
pub struct TrtEngine {
    plan: Arc<LoadedPlan>,
    gpu: Arc<Gpu>,
    info: ModelInfo,
    input: TensorBinding,
    outputs: Vec<TensorBinding>,
    max_batch: usize,
    cuda_graph: bool,
    report: EngineReport,
}

fn unavailable(cause: impl Into<Cause>) -> BackendError {
    BackendError::unavailable(BackendKind::TensorRt, cause)
}

impl TrtEngine {
    /// Loads the plan for the model `name` (its file stem) from the
    /// cache, or builds it from `sources`.
    pub fn open(
        name: &str,
        sources: &OnnxSources<'_>,
        options: &TensorRtOptions,
    ) -> Result<TrtEngine, BackendError> {
        let gpu = Arc::new(Gpu::open(options.device).map_err(unavailable)?);
        let tensorrt = TensorRt::open().map_err(unavailable)?;
        let version = tensorrt.version();
        if version.major != TensorRt::header_major() {
            return Err(unavailable(format!(
                "TensorRT {version} is loaded but this binary was built for {}.x",
                TensorRt::header_major()
            )));
        }
        let mut plan = plan_precision(
            options.precision,
            version,
            gpu.compute_capability(),
            options.dla_core,
            tensorrt.dla_cores(),
        );
        for fallback in &plan.fallbacks {
            log::warn!("TensorRT fallback: {fallback}");
        }

        // A Q/DQ graph needs INT8 enabled: a fallback from INT8 builds
        // the float model. TensorRT 11 builds the ONNX's own types, so FP16
        // there means an FP16 copy of the model. The file is decoded once:
        // the FP16 copy, the input shape and the batch rewrite work on the
        // decoded model.
        let decode = |onnx: &[u8]| {
            OnnxModel::parse(onnx).map_err(|e| unavailable(While::new("reading the model", e)))
        };
        // The batch check runs on the FP32 model whatever is built from it.
        let fp32 = decode(sources.fp32)?;
        let model = match (plan.precision, sources.qdq) {
            (TrtPrecision::Int8Qdq, Some(qdq)) => decode(qdq)?,
            (TrtPrecision::Int8Qdq, None) => {
                return Err(unavailable(
                    "INT8 from Q/DQ asked, but no Q/DQ model was given",
                ));
            }
            (TrtPrecision::Fp16, _) if version.major >= 11 => match fp32.to_fp16() {
                Ok((half, report)) => {
                    log::info!(
                        "TensorRT {version} builds the ONNX's own types: an FP16 copy of the model ({} weights in float16, {} kept float32)",
                        report.converted,
                        report.kept_float
                    );
                    half
                }
                Err(why) => {
                    let note = format!(
                        "FP16 asked, but TensorRT {version} builds the ONNX's own types and the FP16 copy failed ({why}): building FP32"
                    );
                    log::warn!("{note}");
                    plan.fallbacks.push(note);
                    plan.precision = TrtPrecision::Fp32;
                    fp32.clone()
                }
            },
            _ => fp32.clone(),
        };
        // At batch 1, the same before the batch rewrite as after it.
        let input_shape = declared_input(&model)?;
        // The CPU check of the batch rewrite runs once per model: its
        // verdict is kept beside the plans.
        let (onnx, max_batch, why_not) =
            super::batchable_as(&model, &fp32, options.max_batch, &options.engines);
        if let Some(why) = why_not {
            log::warn!(
                "max_batch {} asked, but this export cannot batch ({why}): building batch 1",
                options.max_batch
            );
        }
        let (major, minor) = gpu.compute_capability();
        let request = BuildRequest {
            precision: plan.precision.code(),
            int8_float_layers_fp16: plan.float_layers_fp16,
            workspace_bytes: options.workspace_bytes,
            max_batch,
            dla_core: plan.dla_core,
        };
        let key = PlanKey {
            model: name.to_owned(),
            onnx_sha256: crate::engine_cache::sha256_hex(&onnx),
            quantization: options.quantization.clone(),
            precision: plan.precision.name().to_owned(),
            builder: format!(
                "workspace={} float_fp16={} fallbacks=[{}]",
                options.workspace_bytes,
                plan.float_layers_fp16,
                plan.fallbacks.join("; ")
            ),
            input: input_shape,
            max_batch: max_batch as usize,
            tensorrt: version.to_string(),
            gpu: gpu.name().to_owned(),
            compute_capability: format!("{major}.{minor}"),
            dla_core: plan.dla_core,
        };
        let cache = PlanCache::new(&options.engines, options.cache_bytes);
        let builder = TrtPlanBuilder {
            tensorrt: &tensorrt,
            onnx: &onnx,
            request,
            timing_cache: options
                .engines
                .join(format!("timing-sm{major}{minor}-trt{version}.cache")),
            progress: options.progress.as_ref(),
            calibrator: match (&options.calibration, plan.precision) {
                (Some((set, spec)), TrtPrecision::Int8Calibrator) => {
                    // Named by the calibrator's key (the model, the
                    // images, their preprocessing), which `quantization`
                    // must hold.
                    let Some(table) =
                        crate::quantize::calibration_table_name(name, &options.quantization)
                    else {
                        return Err(unavailable(
                            "int8_mode \"calibrator\" needs the calibrator's key in the plan key (quantize::calibrator_key)",
                        ));
                    };
                    Some((set, spec, gpu.as_ref(), options.engines.join(table)))
                }
                (None, TrtPrecision::Int8Calibrator) => {
                    return Err(unavailable(
                        "int8_mode \"calibrator\" needs calibration images",
                    ));
                }
                _ => None,
            },
        };
        let (loaded, provenance) = cache
            .get_or_build(&key, &builder, &mut |bytes| {
                tensorrt
                    .load(bytes, plan.dla_core)
                    .map_err(PlanFailure::from)
            })
            .map_err(unavailable)?;
        let loaded = Arc::new(loaded);
        let report = EngineReport {
            tensorrt: version,
            gpu: gpu.name().to_owned(),
            precision: plan.precision,
            fallbacks: plan.fallbacks,
            provenance,
            max_batch,
        };
        TrtEngine::bind(loaded, gpu, report, options.cuda_graph)
    }

    fn bind(
        plan: Arc<LoadedPlan>,
        gpu: Arc<Gpu>,
        report: EngineReport,
        cuda_graph: bool,
    ) -> Result<TrtEngine, BackendError> {
        let (inputs, outputs): (Vec<_>, Vec<_>) =
            plan.tensors().iter().cloned().partition(|t| t.is_input);
        let [input] = inputs.as_slice() else {
            return Err(unavailable(format!(
                "the engine has {} inputs; a detector has one",
                inputs.len()
            )));
        };
        let shape = |t: &TensorBinding| -> Result<TensorShape, BackendError> {
            if t.data_type != DATA_TYPE_FLOAT {
                return Err(unavailable(format!(
                    "tensor {:?} has TensorRT data type {}, nanodetd binds float32 I/O",
                    t.name, t.data_type
                )));
            }
            let dims = t
                .dims
                .iter()
                .enumerate()
                .map(|(i, &d)| match (i, usize::try_from(d)) {
                    (0, _) => Ok(1),
                    (_, Ok(d)) => Ok(d),
                    _ => Err(unavailable(format!(
                        "tensor {:?} is dynamic beyond its batch: {:?}",
                        t.name, t.dims
                    ))),
                })
                .collect::<Result<Vec<_>, _>>()?;
            Ok(TensorShape {
                name: t.name.to_string_lossy().into_owned(),
                shape: dims,
            })
        };
        let info = ModelInfo {
            input: shape(input)?,
            outputs: outputs.iter().map(shape).collect::<Result<_, _>>()?,
        };
        Ok(TrtEngine {
            max_batch: report.max_batch as usize,
            input: input.clone(),
            outputs,
            info,
            plan,
            gpu,
            cuda_graph,
            report,
        })
    }

    /// How this engine came to be.
    pub fn report(&self) -> &EngineReport {
        &self.report
    }
}

/// The model's input shape at batch 1, from the ONNX.
fn declared_input(model: &OnnxModel) -> Result<Vec<usize>, BackendError> {
    model
        .input_shape()
        .map_err(|e| unavailable(While::new("reading the model's input", e)))
}

impl Engine for TrtEngine {
    fn backend(&self) -> BackendKind {
        BackendKind::TensorRt
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn max_batch(&self) -> usize {
        self.max_batch
    }

    fn new_session(&self) -> Result<Box<dyn Session>, BackendError> {
        Ok(Box::new(TrtSession::new(self)?))
    }

    fn new_device_session(&self) -> Option<Result<DeviceSessionBox, BackendError>> {
        Some(TrtSession::new(self).map(|s| Box::new(s) as DeviceSessionBox))
    }

    fn on_gpu(&self) -> bool {
        true
    }

    fn notes(&self) -> Vec<String> {
        let r = &self.report;
        let mut notes = vec![format!(
            "TensorRT {} on {}: {} plan, batch 1..{}{}, {}",
            r.tensorrt,
            r.gpu,
            r.precision.name(),
            r.max_batch,
            if self.cuda_graph { ", CUDA graph" } else { "" },
            match &r.provenance {
                Provenance::Cached => "loaded from the engine cache".to_owned(),
                Provenance::Built { why, stored: true } => format!("built ({why}) and cached"),
                Provenance::Built { why, stored: false } =>
                    format!("built ({why}), NOT cached: the next start builds again"),
            }
        )];
        notes.extend(r.fallbacks.iter().map(|f| format!("fallback: {f}")));
        notes
    }
}

/// Per-thread state: an execution context and its device buffers.
pub struct TrtSession {
    context: ExecutionContext,
    gpu: Arc<Gpu>,
    input: TensorBinding,
    input_buffer: CudaSlice<f32>,
    image_shape: Vec<usize>,
    per_image: usize,
    outputs: Vec<(TensorBinding, CudaSlice<f32>, PinnedHostSlice<f32>, usize)>,
    results: BatchOutputs,
    max_batch: usize,
    dynamic: bool,
    /// The enqueue, replayed per batch size. The buffers are bound once
    /// and never move, which is what a replay needs.
    replay: GraphReplay,
    /// Set: runs on the device bring back only the rows it keeps.
    gather: Option<RowGather>,
}

impl TrtSession {
    #[allow(unsafe_code)]
    fn new(engine: &TrtEngine) -> Result<TrtSession, BackendError> {
        let gpu = engine.gpu.clone();
        let stream = gpu.stream().clone();
        let cuda = |what: &'static str| move |e| unavailable(GpuError::driver(what)(e));
        let mut context = engine.plan.context().map_err(unavailable)?;
        let per_image: usize = engine.info.input.shape.iter().product();
        let input_buffer = stream
            .alloc_zeros::<f32>(per_image * engine.max_batch)
            .map_err(cuda("allocating the input buffer"))?;
        let mut outputs = Vec::new();
        for (binding, shape) in engine.outputs.iter().zip(&engine.info.outputs) {
            let len: usize = shape.shape.iter().product();
            let device = stream
                .alloc_zeros::<f32>(len * engine.max_batch)
                .map_err(cuda("allocating an output buffer"))?;
            // SAFETY: only read after a device-to-host copy fills it.
            // Not write-combined: the CPU reads it.
            let host = unsafe {
                gpu.context()
                    .alloc_pinned_with_flags::<f32>(len * engine.max_batch, 0)
            }
            .map_err(cuda("allocating pinned output memory"))?;
            outputs.push((binding.clone(), device, host, len));
        }
        // The buffers never move, so they are bound once.
        {
            let (address, _sync) = input_buffer.device_ptr(&stream);
            // SAFETY: the buffer holds max_batch images and lives as long
            // as the context (both are fields of this session).
            unsafe { context.set_tensor_address(&engine.input.name, address) }
                .map_err(unavailable)?;
        }
        for (binding, device, _, _) in &outputs {
            let (address, _sync) = device.device_ptr(&stream);
            // SAFETY: as above, sized for max_batch images.
            unsafe { context.set_tensor_address(&binding.name, address) }.map_err(unavailable)?;
        }
        Ok(TrtSession {
            context,
            gpu,
            input: engine.input.clone(),
            input_buffer,
            image_shape: engine.info.input.shape.clone(),
            per_image,
            outputs,
            results: BatchOutputs::default(),
            max_batch: engine.max_batch,
            dynamic: engine.input.dims.first().is_some_and(|&d| d < 0),
            replay: GraphReplay::new(stream, engine.cuda_graph),
            gather: None,
        })
    }

    /// Runs the `images` already in the device input buffer and brings
    /// their outputs to the host, or only the rows the row gather keeps
    /// when there is one and `gather` is set.
    #[allow(unsafe_code)]
    fn run_images(&mut self, images: usize, gather: bool) -> Result<(), BackendError> {
        if images == 0 || images > self.max_batch {
            return Err(BackendError::Input {
                images,
                values: images * self.per_image,
                reason: format!("this engine takes 1 to {} images", self.max_batch),
            });
        }
        let stream = self.gpu.stream().clone();
        let trt = |e: library::TrtError| BackendError::run(e);
        if self.dynamic {
            let mut dims: Vec<i64> = self.input.dims.clone();
            dims[0] = images as i64;
            self.context
                .set_input_shape(&self.input.name, &dims)
                .map_err(trt)?;
        }
        let context = &mut self.context;
        let cu_stream = stream.cu_stream();
        self.replay
            .run(images, &mut || {
                // SAFETY: every tensor is bound to a live buffer of this
                // session, allocated in the stream's context.
                unsafe { context.enqueue(cu_stream.cast()) }.map_err(EnqueueError::from)
            })
            .map_err(BackendError::run)?;
        if gather && let Some(rows) = &mut self.gather {
            let output = self.outputs.get(rows.plan().output);
            let (_, device, _, _) = output.ok_or(BackendError::HandedBack)?;
            let (address, _sync) = device.device_ptr(&stream);
            if rows.gather(address, images, &mut self.results)? {
                return Ok(());
            }
        }
        let copy = |e| BackendError::run(GpuError::driver("copying outputs to the host")(e));
        for (_, device, host, len) in &mut self.outputs {
            stream
                .memcpy_dtoh(&device.slice(..images * *len), host)
                .map_err(copy)?;
        }
        stream.synchronize().map_err(copy)?;
        self.results.reset(self.outputs.len(), images);
        for (index, (_, _, host, len)) in self.outputs.iter().enumerate() {
            let values = host.as_slice().map_err(copy)?;
            for image in 0..images {
                self.results
                    .push(index, &values[image * *len..(image + 1) * *len]);
            }
        }
        Ok(())
    }
}

impl DeviceSession for TrtSession {
    fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    fn max_images(&self) -> usize {
        self.max_batch
    }

    fn outputs(&self) -> &BatchOutputs {
        &self.results
    }

    /// The engine's input buffer, for the GPU preprocessor to write
    /// image `index` of the next batch into.
    fn input_image(&mut self, index: usize) -> Option<cudarc::driver::CudaViewMut<'_, f32>> {
        (index < self.max_batch).then(|| {
            self.input_buffer
                .slice_mut(index * self.per_image..(index + 1) * self.per_image)
        })
    }

    /// Runs the `images` already in the device input buffer.
    fn run_on_device(&mut self, images: usize) -> Result<(), BackendError> {
        self.run_images(images, true)
    }

    fn gather_rows(&mut self, plan: Option<GatherPlan>) -> Result<bool, BackendError> {
        let outputs = &self.outputs;
        RowGather::replan(
            &mut self.gather,
            plan,
            |index| outputs.get(index).map(|(_, _, _, len)| *len),
            &self.gpu,
            self.max_batch,
        )
    }
}

impl Session for TrtSession {
    fn run(&mut self, batch: InputBatch<'_>) -> Result<(), BackendError> {
        batch.check(&self.image_shape, self.max_batch)?;
        let expected = batch.images * self.per_image;
        let stream = self.gpu.stream().clone();
        stream
            .memcpy_htod(batch.data, &mut self.input_buffer.slice_mut(..expected))
            .map_err(|e| BackendError::run(GpuError::driver("copying the input")(e)))?;
        self.run_images(batch.images, false)
    }

    fn outputs(&self) -> &BatchOutputs {
        &self.results
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRT_10: TrtVersion = TrtVersion {
        major: 10,
        minor: 3,
        patch: 0,
    };
    const TRT_11: TrtVersion = TrtVersion {
        major: 11,
        minor: 1,
        patch: 0,
    };

    #[test]
    fn int8_on_a_gpu_with_fast_int8_is_built_as_asked() {
        let plan = plan_precision(TrtPrecision::Int8Qdq, TRT_10, (8, 7), None, 2);
        assert_eq!(plan.precision, TrtPrecision::Int8Qdq);
        assert!(plan.float_layers_fp16);
        assert!(plan.fallbacks.is_empty(), "{:?}", plan.fallbacks);
    }

    #[test]
    fn every_fallback_is_said_in_words() {
        // Jetson TX2 (sm_62): no fast INT8, fast FP16.
        let tx2 = plan_precision(TrtPrecision::Int8Qdq, TRT_10, (6, 2), None, 0);
        assert_eq!(tx2.precision, TrtPrecision::Fp16);
        assert!(
            tx2.fallbacks[0].contains("no fast INT8: building FP16"),
            "{:?}",
            tx2.fallbacks
        );
        // GeForce Pascal (sm_61): fast INT8, slow FP16.
        let gtx = plan_precision(TrtPrecision::Fp16, TRT_10, (6, 1), None, 0);
        assert_eq!(gtx.precision, TrtPrecision::Fp32);
        assert!(
            gtx.fallbacks[0].contains("no fast FP16"),
            "{:?}",
            gtx.fallbacks
        );
        // Maxwell desktop (sm_52): neither.
        let old = plan_precision(TrtPrecision::Int8Qdq, TRT_10, (5, 2), None, 0);
        assert_eq!(old.precision, TrtPrecision::Fp32);
        // No DLA where one was asked for.
        let dla = plan_precision(TrtPrecision::Int8Qdq, TRT_10, (9, 0), Some(0), 0);
        assert_eq!(dla.dla_core, None);
        assert!(
            dla.fallbacks[0].contains("running on the GPU"),
            "{:?}",
            dla.fallbacks
        );
        // Orin has two.
        let orin = plan_precision(TrtPrecision::Int8Qdq, TRT_10, (8, 7), Some(1), 2);
        assert_eq!(orin.dla_core, Some(1));
        assert!(orin.fallbacks.is_empty());
    }

    #[test]
    fn tensorrt_11_is_strongly_typed() {
        let calibrator = plan_precision(TrtPrecision::Int8Calibrator, TRT_11, (9, 0), None, 0);
        assert_eq!(calibrator.precision, TrtPrecision::Int8Qdq);
        assert!(calibrator.fallbacks[0].contains("removed the implicit calibrator"));
        assert!(!calibrator.float_layers_fp16);
        // FP16 stays FP16: the engine builds an FP16 copy of the model.
        let fp16 = plan_precision(TrtPrecision::Fp16, TRT_11, (9, 0), None, 0);
        assert_eq!(fp16.precision, TrtPrecision::Fp16);
        assert!(fp16.fallbacks.is_empty(), "{:?}", fp16.fallbacks);
        // The legacy calibrator is still there before 11.
        let legacy = plan_precision(TrtPrecision::Int8Calibrator, TRT_10, (8, 7), None, 0);
        assert_eq!(legacy.precision, TrtPrecision::Int8Calibrator);
    }
}
