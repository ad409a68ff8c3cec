//! The onnxruntime backend: ONNX Runtime through the `ort` crate, with the
//! library loaded at run time (`load-dynamic`), so nothing is downloaded at
//! build time and a box without libonnxruntime still starts on tract.
//!
//! The library comes from `ORT_DYLIB_PATH`, else the path the caller
//! gives, else `libonnxruntime.so` on the loader's path. It is loaded
//! once per process through ort's fallible init, so a missing or too old
//! library is an error, never a panic.
//!
//! Three execution providers: the CPU's, CUDA's (onnxruntime-gpu, and
//! feature `cuda` for the device buffers) and TensorRT's (onnxruntime-gpu
//! built with it, and TensorRT installed). A GPU provider that cannot be
//! registered falls back to the next one, and the engine's notes say so.

#[cfg(feature = "cuda")]
mod cuda;
mod device;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use ort::ep::ExecutionProviderDispatch;
use ort::memory::{AllocationDevice, Allocator, AllocatorType, MemoryInfo, MemoryType};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{IoBinding, Session as OrtSession};
use ort::value::{Tensor, TensorRef};

use super::{
    BackendError, BackendKind, BatchOutputs, Engine, EngineOptions, InputBatch, ModelFileProblem,
    ModelInfo, Session,
};
use crate::errors::{Cause, While};
use crate::model::TensorShape;

/// The library this process loaded. A failure is not kept: a corrected
/// path (a config reload) is tried afresh.
static LOADED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The library nanodetd looks for when neither `ORT_DYLIB_PATH` nor a
/// configured path names one.
pub const DEFAULT_LIBRARY: &str = "libonnxruntime.so";

fn unavailable(cause: impl Into<Cause>) -> BackendError {
    BackendError::unavailable(BackendKind::OnnxRuntime, cause)
}

/// ONNX Runtime's error while `doing` something, as the cause of the
/// backend's being unavailable.
fn failed(doing: impl Into<String>) -> impl Fn(ort::Error) -> BackendError {
    let doing = doing.into();
    move |source| unavailable(While::new(doing.clone(), source))
}

/// ONNX Runtime's library could not be loaded.
#[derive(Debug, thiserror::Error)]
#[error(
    "ONNX Runtime: {source} (set ORT_DYLIB_PATH or [model.onnxruntime] library to libonnxruntime.so 1.{minor} or newer; the PyPI onnxruntime wheel ships it in onnxruntime/capi/)",
    minor = ort::MINOR_VERSION
)]
pub struct LibraryError {
    /// What ort reported (the path, dlopen's message, or the API version).
    #[source]
    pub source: ort::LoadDynamicError,
}

/// Loads ONNX Runtime: `ORT_DYLIB_PATH`, else `configured`, else
/// [`DEFAULT_LIBRARY`]. Once one has loaded, later calls return its path
/// (a process holds one ONNX Runtime).
pub fn load_library(configured: Option<&Path>) -> Result<PathBuf, LibraryError> {
    let mut loaded = LOADED.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(path) = loaded.as_ref() {
        return Ok(path.clone());
    }
    let path = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .or_else(|| configured.map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_LIBRARY));
    let outcome = ort::init_from(&path)
        .map(|environment| {
            environment.with_name("nanodetd").commit();
            path.clone()
        })
        .map_err(|source| LibraryError { source });
    if let Ok(path) = &outcome {
        *loaded = Some(path.clone());
    }
    outcome
}

/// Where ONNX Runtime runs the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    /// The CPU execution provider, in every onnxruntime build.
    #[default]
    Cpu,
    /// The CUDA execution provider (onnxruntime-gpu; nanodetd built with
    /// feature `cuda`), with input and outputs in device memory.
    Cuda,
    /// The TensorRT execution provider, with CUDA for what it leaves
    /// (onnxruntime-gpu built with TensorRT, and TensorRT installed).
    TensorRt,
}

impl Provider {
    /// Its name in the config and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
            Provider::TensorRt => "tensorrt",
        }
    }

    /// The provider when the configuration names none: the GPU's for
    /// `auto` where this build can drive one, the CPU's otherwise.
    pub fn default_for(choice: super::BackendChoice) -> Provider {
        if choice == super::BackendChoice::Auto && cfg!(feature = "cuda") {
            Provider::Cuda
        } else {
            Provider::Cpu
        }
    }
}

impl std::fmt::Display for Provider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Provider::Cpu => "CPU",
            Provider::Cuda => "CUDA",
            Provider::TensorRt => "TensorRT",
        })
    }
}

/// Settings of the TensorRT execution provider.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TensorRtProviderOptions {
    /// Where it keeps built engines and its timing cache: ONNX Runtime
    /// keys engines by model and GPU itself.
    pub cache: PathBuf,
    /// FP16 for the float layers.
    pub fp16: bool,
    /// INT8 from the Q/DQ nodes of the model (no calibration table).
    pub int8: bool,
}

/// How ONNX Runtime runs a model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxRuntimeOptions {
    /// The library, when `ORT_DYLIB_PATH` is not set.
    pub library: Option<PathBuf>,
    /// Threads inside one operator on the CPU. 1 keeps a small box's other
    /// cores for capture and MQTT, and matches tract, which runs on one
    /// thread.
    pub intra_threads: usize,
    /// The execution provider asked for.
    pub provider: Provider,
    /// CUDA device, for the GPU providers.
    pub device: usize,
    /// Capture the CUDA provider's run in a CUDA graph and replay it (a
    /// session of one batch size only: see `OnnxRuntimeEngine::graphs`).
    pub cuda_graph: bool,
    /// Largest batch a CUDA-provider session takes: above 1 the model is
    /// made batchable ([`batchable`](crate::backend::batchable)) and the
    /// device buffers hold this many images.
    pub max_batch: u32,
    /// Run float16 weights on the CUDA provider
    /// ([`OnnxModel::to_fp16`](crate::model::OnnxModel::to_fp16)); input
    /// and outputs stay float32.
    pub fp16: bool,
    /// Where the batch check's verdict is kept (the engine cache).
    pub batch_memo: PathBuf,
    /// The TensorRT provider's settings.
    pub tensorrt: TensorRtProviderOptions,
}

impl Default for OnnxRuntimeOptions {
    fn default() -> Self {
        OnnxRuntimeOptions {
            library: None,
            intra_threads: 1,
            provider: Provider::Cpu,
            device: 0,
            cuda_graph: true,
            max_batch: 1,
            fp16: false,
            batch_memo: PathBuf::new(),
            tensorrt: TensorRtProviderOptions::default(),
        }
    }
}

/// What ONNX Runtime's CUDA provider runs for a model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaModel {
    /// The rewritten model; `None` where the file's runs as it is.
    pub onnx: Option<Vec<u8>>,
    /// Images one run takes.
    pub max_batch: u32,
    /// What was done, and what could not be, for the engine's notes.
    pub notes: Vec<String>,
}

/// The model the CUDA provider runs for `onnx`: float16 weights where
/// `fp16` ([`OnnxModel::to_fp16`](crate::model::OnnxModel::to_fp16)), then
/// batchable up to `max_batch` ([`batchable_as`](crate::backend::batchable_as):
/// checked on the FP32 model, its verdict kept in `memo`), in TensorRT's
/// order. What cannot be done is noted, and the rest still runs.
pub fn cuda_model(onnx: &[u8], fp16: bool, max_batch: u32, memo: &Path) -> CudaModel {
    let mut made = CudaModel {
        onnx: None,
        max_batch: 1,
        notes: Vec::new(),
    };
    if !fp16 && max_batch <= 1 {
        return made;
    }
    let fp32 = match crate::model::OnnxModel::decode(onnx) {
        Ok(model) => model,
        Err(why) => {
            made.notes.push(format!(
                "the model cannot be rewritten ({}): FP32, batch 1",
                crate::errors::one_line(&why)
            ));
            return made;
        }
    };
    let mut half = None;
    if fp16 {
        match fp32.to_fp16() {
            Ok((model, report)) => {
                made.notes.push(format!(
                    "FP16: {} weight tensors in float16, {} kept float32",
                    report.converted, report.kept_float
                ));
                half = Some(model);
            }
            Err(why) => made.notes.push(format!(
                "precision fp16 asked, but the model cannot be converted ({}): FP32",
                crate::errors::one_line(&why)
            )),
        }
    }
    let (bytes, batch, why_not) =
        crate::backend::batchable_as(half.as_ref().unwrap_or(&fp32), &fp32, max_batch, memo);
    if let Some(why) = why_not {
        made.notes.push(format!(
            "max_batch {max_batch} asked, but this export cannot batch ({why}): batch 1"
        ));
    }
    made.max_batch = batch;
    made.onnx = Some(bytes);
    made
}

/// `shape` (one image's) for `images` images: a batchable model's tensors
/// lead with the batch; a batch-1 model's stay as they are.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn batch_shape(shape: &[usize], images: usize) -> Vec<usize> {
    match shape.split_first() {
        Some((_, rest)) if images > 1 => std::iter::once(images)
            .chain(rest.iter().copied())
            .collect(),
        _ => shape.to_vec(),
    }
}

/// A model prepared for ONNX Runtime. Sessions are made from the bytes,
/// one per thread (`ort`'s run takes `&mut`).
pub struct OnnxRuntimeEngine {
    onnx: Vec<u8>,
    /// What the CUDA provider runs, where it differs from the file:
    /// batchable, float16 weights.
    cuda_onnx: Option<Vec<u8>>,
    /// Images a CUDA-provider session takes in one run.
    max_batch: usize,
    options: OnnxRuntimeOptions,
    info: ModelInfo,
    input_name: String,
    /// The provider sessions run on, after any fallback.
    provider: Provider,
    /// The device sessions share, when the provider is a GPU one.
    gpu: Option<device::SharedGpu>,
    notes: Vec<String>,
    /// A built session waiting for `new_session`: the one `load` made,
    /// or one a dropped CPU session handed back. Start-up then builds the
    /// graph once, though `auto` times a session before the detector
    /// takes its own.
    spare: Arc<Mutex<Option<OrtSession>>>,
    /// Sessions (graph builds) made so far.
    built: AtomicUsize,
}

impl OnnxRuntimeEngine {
    /// Loads `path` on ONNX Runtime, on the provider `runtime` asks for
    /// or, where that cannot run here, the next one down (noted).
    pub fn load(
        path: &Path,
        options: &EngineOptions,
        runtime: &OnnxRuntimeOptions,
    ) -> Result<OnnxRuntimeEngine, BackendError> {
        let fail = |problem: ModelFileProblem| BackendError::ModelFile {
            path: path.to_owned(),
            problem,
        };
        let refused = |stage: &str| {
            let stage = stage.to_owned();
            move |e: Cause| fail(ModelFileProblem::Refused(While::new(stage, e)))
        };
        load_library(runtime.library.as_deref()).map_err(unavailable)?;
        let onnx = std::fs::read(path).map_err(|e| fail(ModelFileProblem::Read(e)))?;
        if onnx.is_empty() {
            return Err(fail(ModelFileProblem::Empty));
        }
        let input = match options.input_size {
            Some((w, h)) => vec![1, 3, h, w],
            None => crate::model::OnnxModel::decode(&onnx)
                .and_then(|model| model.input_shape())
                .map_err(|e| {
                    refused("reading the input size; give it with --size WxH")(e.into())
                })?,
        };
        let mut engine = OnnxRuntimeEngine {
            onnx,
            cuda_onnx: None,
            max_batch: 1,
            options: runtime.clone(),
            info: ModelInfo {
                input: TensorShape {
                    name: String::new(),
                    shape: input,
                },
                outputs: Vec::new(),
            },
            input_name: String::new(),
            provider: Provider::Cpu,
            gpu: None,
            notes: Vec::new(),
            spare: Arc::default(),
            built: AtomicUsize::new(0),
        };
        // The outputs' shapes, from one run on zeros on the CPU: the file
        // may leave them symbolic, the run cannot, and a CUDA-graph
        // session must not see a run without its bound buffers.
        let mut session = engine
            .session_on(Provider::Cpu)
            .map_err(|e| refused("opening a CPU session")(e.into()))?;
        let Some(first) = session.inputs().first() else {
            return Err(fail(ModelFileProblem::NotADetector {
                inputs: 0,
                outputs: session.outputs().len(),
            }));
        };
        engine.input_name = first.name().to_owned();
        engine.info.input.name = engine.input_name.clone();
        let zeros = vec![0f32; engine.info.input.shape.iter().product()];
        let shape: Vec<i64> = engine.info.input.shape.iter().map(|&d| d as i64).collect();
        let tensor = TensorRef::from_array_view((shape, zeros.as_slice()))
            .map_err(|e| refused("making a tensor of zeros")(e.into()))?;
        let outputs = session
            .run(ort::inputs![engine.input_name.as_str() => tensor])
            .map_err(|e| refused("a run on zeros failed")(e.into()))?;
        for (name, value) in outputs.iter() {
            let (shape, _) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| refused(&format!("reading output {name}"))(e.into()))?;
            engine.info.outputs.push(TensorShape {
                name: name.to_owned(),
                shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
            });
        }
        drop(outputs);
        if runtime.provider == Provider::Cuda {
            engine.rewrite_for_cuda();
        } else if runtime.provider == Provider::TensorRt && runtime.max_batch > 1 {
            // Its engines would be rebuilt for each batch size it meets.
            engine.notes.push(format!(
                "max_batch {} applies where the CUDA provider is asked; with the TensorRT provider (and its fallback to CUDA) sessions run batch 1",
                runtime.max_batch
            ));
        }
        let rewrite_notes = std::mem::take(&mut engine.notes);
        let spare = engine.on_provider(runtime.provider, session);
        if engine.provider != Provider::Cpu {
            engine.notes.extend(rewrite_notes);
        }
        if engine.provider != Provider::Cuda {
            // Any other provider runs the file's model, at batch 1.
            engine.max_batch = 1;
            engine.cuda_onnx = None;
        }
        if engine.provider == Provider::Cpu && runtime.fp16 {
            engine.notes.push(
                "precision fp16 applies to the GPU providers; the CPU provider runs FP32".into(),
            );
        }
        *engine.spare.lock().unwrap_or_else(PoisonError::into_inner) = Some(spare);
        for note in &engine.notes {
            log::warn!("{}: {note}", path.display());
        }
        Ok(engine)
    }

    fn rewrite_for_cuda(&mut self) {
        let model = cuda_model(
            &self.onnx,
            self.options.fp16,
            self.options.max_batch,
            &self.options.batch_memo,
        );
        self.notes.extend(model.notes);
        self.max_batch = model.max_batch as usize;
        self.cuda_onnx = model.onnx;
    }

    /// Whether the GPU provider's runs are captured in a CUDA graph: where
    /// configured. A CUDA session runs one shape, `max_batch` images,
    /// whatever the batch (`cuda.rs`), so it has one graph; with two or
    /// more graph ids in one session ONNX Runtime 1.31.1's runs faulted on
    /// an H100 (issue 21).
    fn graphs(&self) -> bool {
        self.options.cuda_graph
    }

    /// The session on `asked`, or on the next provider down where that
    /// one cannot start: TensorRT → CUDA → CPU. `cpu` is the CPU session
    /// already made, kept when everything else fails.
    fn on_provider(&mut self, asked: Provider, cpu: OrtSession) -> OrtSession {
        let mut next = asked;
        loop {
            if next == Provider::Cpu {
                self.provider = Provider::Cpu;
                return cpu;
            }
            match self.gpu_session(next) {
                Ok(session) => {
                    self.provider = next;
                    return session;
                }
                Err(why) => {
                    let down = if next == Provider::TensorRt {
                        Provider::Cuda
                    } else {
                        Provider::Cpu
                    };
                    self.notes.push(format!(
                        "fallback: ONNX Runtime's {next} provider unavailable ({why}); running on its {down} provider"
                    ));
                    next = down;
                }
            }
        }
    }

    /// A session on a GPU provider, with the device it runs on opened.
    fn gpu_session(&mut self, provider: Provider) -> Result<OrtSession, String> {
        self.gpu = Some(device::open(self.options.device)?);
        self.session_on(provider).map_err(|e| e.to_string())
    }

    /// The execution providers to register for `provider`, best first.
    fn providers(&self, provider: Provider) -> Vec<ExecutionProviderDispatch> {
        let device = i32::try_from(self.options.device).unwrap_or(0);
        let mut list = Vec::new();
        if provider == Provider::TensorRt {
            let trt = &self.options.tensorrt;
            let mut ep = ort::ep::TensorRT::default()
                .with_device_id(device)
                .with_fp16(trt.fp16)
                .with_int8(trt.int8)
                .with_cuda_graph(self.options.cuda_graph);
            // ONNX Runtime refuses an empty path: no directory, no cache.
            if !trt.cache.as_os_str().is_empty() {
                let cache = trt.cache.to_string_lossy().into_owned();
                ep = ep
                    .with_engine_cache(true)
                    .with_engine_cache_path(&cache)
                    .with_timing_cache(true)
                    .with_timing_cache_path(&cache);
            }
            list.push(ep.build().error_on_failure());
        }
        if provider != Provider::Cpu {
            let mut cuda = ort::ep::CUDA::default()
                .with_device_id(device)
                .with_cuda_graph(self.graphs() && provider == Provider::Cuda);
            if !self.graphs() {
                // With cuDNN 9, ONNX Runtime's "exhaustive" default builds
                // each Conv's plan with cuDNN's slower heuristic (mode B): 4 s
                // a shape for FP32 and 9 s for FP16 on an H100 (issue 21),
                // paid by the first run on the detector's thread. A session
                // without a graph, which gains nothing from a replay, takes
                // the quick heuristic instead.
                cuda =
                    cuda.with_conv_algorithm_search(ort::ep::cuda::ConvAlgorithmSearch::Heuristic);
            }
            if let Some(gpu) = &self.gpu {
                cuda = device::with_stream(cuda, gpu);
            }
            list.push(cuda.build().error_on_failure());
        }
        list
    }

    fn session_on(&self, provider: Provider) -> Result<OrtSession, BackendError> {
        let error = failed(format!("creating a {provider} session"));
        self.built.fetch_add(1, Ordering::Relaxed);
        OrtSession::builder()
            .map_err(&error)?
            // ORT_ENABLE_ALL, Python's default: the peer we are held to.
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| error(e.into()))?
            .with_intra_threads(self.options.intra_threads)
            .map_err(|e| error(e.into()))?
            .with_execution_providers(self.providers(provider))
            .map_err(|e| error(e.into()))?
            .commit_from_memory(match (&self.cuda_onnx, provider) {
                (Some(rewritten), Provider::Cuda) => rewritten,
                _ => &self.onnx,
            })
            .map_err(&error)
    }

    /// The provider sessions run on.
    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// How many sessions this engine has built, each a graph optimisation
    /// of the whole model: one per provider tried at load, and one per
    /// session alive at once after that.
    pub fn sessions_built(&self) -> usize {
        self.built.load(Ordering::Relaxed)
    }

    /// A session with device buffers, where the provider is a GPU one.
    fn cuda_session(&self) -> Option<Result<device::CudaSession, BackendError>> {
        let gpu = self
            .gpu
            .as_ref()
            .filter(|_| self.provider != Provider::Cpu)?;
        Some(
            self.take_session()
                .and_then(|session| device::CudaSession::new(session, self, gpu.clone())),
        )
    }

    fn take_session(&self) -> Result<OrtSession, BackendError> {
        let spare = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match spare {
            Some(session) => Ok(session),
            None => self.session_on(self.provider),
        }
    }
}

impl Engine for OnnxRuntimeEngine {
    fn backend(&self) -> BackendKind {
        BackendKind::OnnxRuntime
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn max_batch(&self) -> usize {
        // Any batch: a host session runs it image by image, a CUDA session
        // in runs of up to its `max_batch`.
        usize::MAX
    }

    fn new_session(&self) -> Result<Box<dyn Session>, BackendError> {
        if let Some(session) = self.cuda_session() {
            return Ok(Box::new(session?));
        }
        let session = self.take_session()?;
        Ok(Box::new(CpuSession::new(session, self)?))
    }

    fn new_device_session(&self) -> Option<Result<super::DeviceSessionBox, BackendError>> {
        self.cuda_session()
            .map(|session| session.map(device::into_device_session))
    }

    fn on_gpu(&self) -> bool {
        self.provider != Provider::Cpu
    }

    fn notes(&self) -> Vec<String> {
        let mut notes = self.notes.clone();
        notes.push(format!(
            "ONNX Runtime {} provider{}{}",
            self.provider,
            if self.provider != Provider::Cpu && self.graphs() {
                ", CUDA graph"
            } else {
                ""
            },
            if self.max_batch > 1 {
                format!(", batches of up to {}", self.max_batch)
            } else {
                String::new()
            }
        ));
        notes
    }
}

/// A session on the CPU provider. Outputs are bound once to tensors ONNX
/// Runtime fills in place on every run; the input is a view of the
/// caller's buffer, bound per run: no copy, no per-frame output
/// allocation.
struct CpuSession {
    // Drop order: the bound outputs, then the allocator that made them
    // (ONNX Runtime frees them through it), then the session goes back.
    binding: IoBinding,
    _allocator: Allocator,
    session: HandedBack,
    input_name: String,
    input_shape: Vec<i64>,
    image_shape: Vec<usize>,
    per_image: usize,
    outputs: BatchOutputs,
    output_count: usize,
}

impl CpuSession {
    fn new(session: OrtSession, engine: &OnnxRuntimeEngine) -> Result<CpuSession, BackendError> {
        let error = failed("binding the outputs");
        let mut binding = session.create_binding().map_err(&error)?;
        let allocator = Allocator::new(
            &session,
            MemoryInfo::new(
                AllocationDevice::CPU,
                0,
                AllocatorType::Device,
                MemoryType::Default,
            )
            .map_err(&error)?,
        )
        .map_err(&error)?;
        for output in &engine.info.outputs {
            let tensor = Tensor::<f32>::new(&allocator, output.shape.as_slice()).map_err(&error)?;
            binding
                .bind_output(output.name.as_str(), tensor)
                .map_err(&error)?;
        }
        Ok(CpuSession {
            binding,
            _allocator: allocator,
            session: HandedBack {
                session: Some(session),
                spare: engine.spare.clone(),
            },
            input_name: engine.input_name.clone(),
            input_shape: engine.info.input.shape.iter().map(|&d| d as i64).collect(),
            image_shape: engine.info.input.shape.clone(),
            per_image: engine.info.input.shape.iter().product(),
            outputs: BatchOutputs::default(),
            output_count: engine.info.outputs.len(),
        })
    }
}

impl Session for CpuSession {
    fn run(&mut self, batch: InputBatch<'_>) -> Result<(), BackendError> {
        batch.check(&self.image_shape, usize::MAX)?;
        let run_error = |e: ort::Error| BackendError::run(e);
        self.outputs.reset(self.output_count, batch.images);
        let mut run = || {
            for image in batch.data.chunks_exact(self.per_image) {
                let input = TensorRef::from_array_view((self.input_shape.as_slice(), image))
                    .map_err(run_error)?;
                self.binding
                    .bind_input(self.input_name.as_str(), &input)
                    .map_err(run_error)?;
                let results = self
                    .session
                    .get()?
                    .run_binding(&self.binding)
                    .map_err(run_error)?;
                for (index, (_, value)) in results.iter().enumerate() {
                    let (_, values) = value.try_extract_tensor::<f32>().map_err(run_error)?;
                    self.outputs.push(index, values);
                }
            }
            Ok(())
        };
        let outcome = run();
        // The view borrows the caller's buffer: never kept past this call.
        self.binding.clear_inputs();
        outcome
    }

    fn outputs(&self) -> &BatchOutputs {
        &self.outputs
    }
}

/// A CPU session's ONNX Runtime session, handed back to its engine's
/// spare slot when the session is dropped (when the slot is empty), so
/// the next `new_session` need not build the graph again. GPU sessions
/// are not handed back: their CUDA graph holds their own buffers'
/// addresses.
struct HandedBack {
    session: Option<OrtSession>,
    spare: Arc<Mutex<Option<OrtSession>>>,
}

impl HandedBack {
    fn get(&mut self) -> Result<&mut OrtSession, BackendError> {
        // Only `drop` takes it.
        self.session.as_mut().ok_or(BackendError::HandedBack)
    }
}

impl Drop for HandedBack {
    fn drop(&mut self) {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        if spare.is_none() {
            *spare = self.session.take();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batchable_models_tensors_lead_with_the_batch() {
        assert_eq!(batch_shape(&[1, 2125, 112], 4), [4, 2125, 112]);
        assert_eq!(batch_shape(&[2125, 80], 1), [2125, 80]);
    }
}
