//! The onnxruntime backend: ONNX Runtime's CPU execution provider through
//! the `ort` crate, with the library loaded at run time (`load-dynamic`),
//! so nothing is downloaded at build time and a box without
//! libonnxruntime still starts on tract.
//!
//! The library comes from `ORT_DYLIB_PATH`, else the path the caller
//! gives, else `libonnxruntime.so` on the loader's path. It is loaded
//! once per process through ort's fallible init, so a missing or too old
//! library is an error, never a panic.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use ort::session::Session as OrtSession;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use super::{
    BackendError, BackendKind, BatchOutputs, Engine, EngineOptions, InputBatch, ModelInfo, Session,
};
use crate::model::TensorShape;

/// The library this process loaded. A failure is not kept: a corrected
/// path (a config reload) is tried afresh.
static LOADED: Mutex<Option<PathBuf>> = Mutex::new(None);

/// The library nanodetd looks for when neither `ORT_DYLIB_PATH` nor a
/// configured path names one.
pub const DEFAULT_LIBRARY: &str = "libonnxruntime.so";

fn unavailable(reason: String) -> BackendError {
    BackendError::Unavailable {
        backend: BackendKind::OnnxRuntime,
        reason,
    }
}

/// Loads ONNX Runtime: `ORT_DYLIB_PATH`, else `configured`, else
/// [`DEFAULT_LIBRARY`]. Once one has loaded, later calls return its path
/// (a process holds one ONNX Runtime).
pub fn load_library(configured: Option<&Path>) -> Result<PathBuf, String> {
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
        .map_err(|e| {
            format!(
                "ONNX Runtime: {e} (set ORT_DYLIB_PATH or [model.onnxruntime] library to libonnxruntime.so {}.{} or newer; the PyPI onnxruntime wheel ships it in onnxruntime/capi/)",
                1,
                ort::MINOR_VERSION
            )
        });
    if let Ok(path) = &outcome {
        *loaded = Some(path.clone());
    }
    outcome
}

/// Settings of the CPU execution provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxRuntimeOptions {
    /// The library, when `ORT_DYLIB_PATH` is not set.
    pub library: Option<PathBuf>,
    /// Threads inside one operator. 1 keeps a small box's other cores for
    /// capture and MQTT, and matches tract, which runs on one thread.
    pub intra_threads: usize,
}

impl Default for OnnxRuntimeOptions {
    fn default() -> Self {
        OnnxRuntimeOptions {
            library: None,
            intra_threads: 1,
        }
    }
}

/// A model prepared for ONNX Runtime. Sessions are made from the bytes,
/// one per thread (`ort`'s run takes `&mut`).
pub struct OnnxRuntimeEngine {
    onnx: Vec<u8>,
    options: OnnxRuntimeOptions,
    info: ModelInfo,
    input_name: String,
    /// The session `load` made to learn the output shapes, handed to the
    /// first `new_session` so start-up builds the graph once.
    spare: Mutex<Option<OrtSession>>,
}

impl OnnxRuntimeEngine {
    /// Loads `path` on ONNX Runtime.
    pub fn load(
        path: &Path,
        options: &EngineOptions,
        runtime: &OnnxRuntimeOptions,
    ) -> Result<OnnxRuntimeEngine, BackendError> {
        let fail = |reason: String| BackendError::ModelFile {
            path: path.to_owned(),
            reason,
        };
        load_library(runtime.library.as_deref()).map_err(unavailable)?;
        let onnx = std::fs::read(path).map_err(|e| fail(format!("cannot read model: {e}")))?;
        if onnx.is_empty() {
            return Err(fail("empty file (0 bytes), not an ONNX model".into()));
        }
        let mut input = match options.input_size {
            Some((w, h)) => vec![1, 3, h, w],
            None => crate::model::input_shape(&onnx)
                .map_err(|e| fail(format!("{e}; give the input size (--size WxH)")))?,
        };
        if let Some(batch) = input.first_mut() {
            *batch = 1;
        }
        let mut engine = OnnxRuntimeEngine {
            onnx,
            options: runtime.clone(),
            info: ModelInfo {
                input: TensorShape {
                    name: String::new(),
                    shape: input,
                },
                outputs: Vec::new(),
            },
            input_name: String::new(),
            spare: Mutex::new(None),
        };
        // The outputs' shapes, from one run on zeros: the file may leave
        // them symbolic, the run cannot.
        let mut session = engine.session().map_err(|e| fail(e.to_string()))?;
        let Some(first) = session.inputs().first() else {
            return Err(fail("the model has no input".into()));
        };
        engine.input_name = first.name().to_owned();
        engine.info.input.name = engine.input_name.clone();
        let zeros = vec![0f32; engine.info.input.shape.iter().product()];
        let shape: Vec<i64> = engine.info.input.shape.iter().map(|&d| d as i64).collect();
        let tensor = TensorRef::from_array_view((shape, zeros.as_slice()))
            .map_err(|e| fail(e.to_string()))?;
        let outputs = session
            .run(ort::inputs![engine.input_name.as_str() => tensor])
            .map_err(|e| fail(format!("a run on zeros failed: {e}")))?;
        for (name, value) in outputs.iter() {
            let (shape, _) = value
                .try_extract_tensor::<f32>()
                .map_err(|e| fail(format!("output {name}: {e}")))?;
            engine.info.outputs.push(TensorShape {
                name: name.to_owned(),
                shape: shape.iter().map(|&d| d.max(0) as usize).collect(),
            });
        }
        drop(outputs);
        engine.spare = Mutex::new(Some(session));
        Ok(engine)
    }

    fn session(&self) -> Result<OrtSession, BackendError> {
        let error = |e: ort::Error| unavailable(format!("creating a session: {e}"));
        OrtSession::builder()
            .map_err(error)?
            // ORT_ENABLE_ALL, Python's default: the peer we are held to.
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(|e| error(e.into()))?
            .with_intra_threads(self.options.intra_threads)
            .map_err(|e| error(e.into()))?
            .commit_from_memory(&self.onnx)
            .map_err(error)
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
        // Batch-1 exports: bigger batches run image by image.
        usize::MAX
    }

    fn new_session(&self) -> Result<Box<dyn Session>, BackendError> {
        let spare = self
            .spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let session = match spare {
            Some(session) => session,
            None => self.session()?,
        };
        Ok(Box::new(OnnxRuntimeSession {
            session,
            input_name: self.input_name.clone(),
            input_shape: self.info.input.shape.iter().map(|&d| d as i64).collect(),
            image_shape: self.info.input.shape.clone(),
            per_image: self.info.input.shape.iter().product(),
            outputs: BatchOutputs::default(),
            output_count: self.info.outputs.len(),
        }))
    }
}

struct OnnxRuntimeSession {
    session: OrtSession,
    input_name: String,
    input_shape: Vec<i64>,
    image_shape: Vec<usize>,
    per_image: usize,
    outputs: BatchOutputs,
    output_count: usize,
}

impl Session for OnnxRuntimeSession {
    fn run(&mut self, batch: InputBatch<'_>) -> Result<(), BackendError> {
        batch.check(&self.image_shape, usize::MAX)?;
        let run_error = |e: ort::Error| BackendError::Run(e.to_string());
        self.outputs.reset(self.output_count, batch.images);
        for image in batch.data.chunks_exact(self.per_image) {
            // A view of the caller's buffer: no copy on the way in.
            let input = TensorRef::from_array_view((self.input_shape.as_slice(), image))
                .map_err(run_error)?;
            let results = self
                .session
                .run(ort::inputs![self.input_name.as_str() => input])
                .map_err(run_error)?;
            for (index, (_, value)) in results.iter().enumerate() {
                let (_, values) = value.try_extract_tensor::<f32>().map_err(run_error)?;
                self.outputs.push(index, values);
            }
        }
        Ok(())
    }

    fn outputs(&self) -> &BatchOutputs {
        &self.outputs
    }
}
