//! Inference backends behind one interface, in tract's split: preparing a
//! model gives a shareable, immutable [`Engine`]; each thread that runs it
//! holds its own [`Session`] with the mutable scratch buffers.
//!
//! Callers see host `f32` tensors in, named `f32` tensors out, for a batch
//! of one or more images. A backend that keeps its data on a GPU (TensorRT)
//! copies only at these edges, and takes device buffers through a further
//! [`InputBatch`] variant without changing the callers.

mod auto;
#[cfg(feature = "cuda")]
mod gather;
pub mod onnxruntime;
#[cfg(feature = "tensorrt")]
pub mod tensorrt;
mod tract;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use self::auto::{BackendChoice, Contender, choose_fastest};
#[cfg(feature = "cuda")]
pub use self::gather::ROWS_PER_IMAGE;
pub use self::tract::{BatchMismatch, TractEngine, batchable, batchable_as, validate_batch};
use crate::errors::{Cause, While};
use crate::model::TensorShape;

/// What a prepared model consumes and produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The image input, `[1, 3, H, W]`.
    pub input: TensorShape,
    /// Outputs in declared order, at batch 1.
    pub outputs: Vec<TensorShape>,
}

/// Settings for preparing a model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EngineOptions {
    /// Input `(width, height)` for models whose input size is not fixed in
    /// the file.
    pub input_size: Option<(usize, usize)>,
    /// How ONNX Runtime runs it, for `onnxruntime` (and `auto`).
    pub onnxruntime: onnxruntime::OnnxRuntimeOptions,
}

/// A prepared model, shared between threads.
pub trait Engine: Send + Sync {
    /// The backend's name, as selected on the command line.
    fn backend(&self) -> BackendKind;
    /// Shapes of the input and outputs.
    fn info(&self) -> &ModelInfo;
    /// Largest batch one `run` accepts.
    fn max_batch(&self) -> usize;
    /// A new session with its own scratch buffers.
    fn new_session(&self) -> Result<Box<dyn Session>, BackendError>;
    /// What an operator should know about how this engine runs: every
    /// fallback from the configuration, where a built plan came from.
    /// Shown on the stats topic.
    fn notes(&self) -> Vec<String> {
        Vec::new()
    }
    /// Whether inference runs on a GPU.
    fn on_gpu(&self) -> bool {
        false
    }
    /// A session whose input already lives on the GPU, for the GPU
    /// preprocessor to write into; `None` where the engine runs on the
    /// CPU, and in every build without feature `cuda`.
    fn new_device_session(&self) -> Option<Result<DeviceSessionBox, BackendError>> {
        None
    }
}

/// A [`DeviceSession`], boxed. Without feature `cuda` it is a type with no
/// values: no engine can make one, and [`Engine::new_device_session`]
/// exists in every build, with no cfg where it is declared or passed on.
#[cfg(feature = "cuda")]
pub type DeviceSessionBox = Box<dyn DeviceSession>;

/// See the `cuda` build's alias: without the feature, no value exists.
#[cfg(not(feature = "cuda"))]
#[derive(Debug)]
pub enum DeviceSessionBox {}

/// A session with its input buffer on the GPU: the preprocessing kernel
/// writes each image straight into it, on the device's stream, and the
/// run follows on that stream with no copy and no sync in between. Only
/// the (small) outputs come back to the host.
#[cfg(feature = "cuda")]
pub trait DeviceSession: Send {
    /// The device the buffers are on.
    fn gpu(&self) -> &Arc<crate::gpu::Gpu>;
    /// Largest batch one `run_on_device` takes.
    fn max_images(&self) -> usize;
    /// Image `index` of the next batch, `None` past
    /// [`max_images`](Self::max_images).
    fn input_image(&mut self, index: usize) -> Option<cudarc::driver::CudaViewMut<'_, f32>>;
    /// Runs the first `images` images of the input buffer and brings the
    /// outputs to the host.
    fn run_on_device(&mut self, images: usize) -> Result<(), BackendError>;
    /// The last run's outputs.
    fn outputs(&self) -> &BatchOutputs;
    /// From the next run on, bring back only the rows `plan` selects, or
    /// every value again (`None`). Answers whether this session can:
    /// those that cannot keep bringing everything back.
    fn gather_rows(&mut self, plan: Option<GatherPlan>) -> Result<bool, BackendError> {
        let _ = plan;
        Ok(false)
    }
}

/// Which rows of a single `[priors, columns]` output the GPU keeps: those
/// whose best score among `classes` columns from `score_first` is above
/// `threshold`. Only those priors can yield a detection, so the host
/// decodes the same candidates from them as from the whole output.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GatherPlan {
    /// Which output, in declared order.
    pub output: usize,
    /// Rows per image.
    pub priors: usize,
    /// Values per row.
    pub columns: usize,
    /// First class score of a row.
    pub score_first: usize,
    /// Class scores per row.
    pub classes: usize,
    /// A row is kept when its best class score is strictly above this.
    pub threshold: f32,
}

/// The rows of one output that a [`GatherPlan`] kept, per image, by
/// ascending prior. Its buffers outlive each run: refilled, not remade.
#[derive(Debug, Default)]
struct GatheredRows {
    /// Whether the last run's outputs are these rows.
    active: bool,
    columns: usize,
    /// Image `i`'s rows are `starts[i]..starts[i + 1]`.
    starts: Vec<usize>,
    priors: Vec<u32>,
    values: Vec<f32>,
    /// Scratch: one image's rows in prior order.
    order: Vec<usize>,
}

/// One image's outputs.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageOutputs<'a> {
    /// Every value of every output, in declared order.
    Whole(Vec<&'a [f32]>),
    /// Of the output a [`GatherPlan`] names, only the rows it kept.
    Rows {
        /// Each row's prior, ascending.
        priors: &'a [u32],
        /// The rows, `priors.len()` times the row's width.
        values: &'a [f32],
    },
}

/// An engine with notes added by whoever chose it: the fallback that put
/// it in service, for instance.
struct NotedEngine {
    inner: Arc<dyn Engine>,
    notes: Vec<String>,
}

impl Engine for NotedEngine {
    fn backend(&self) -> BackendKind {
        self.inner.backend()
    }
    fn info(&self) -> &ModelInfo {
        self.inner.info()
    }
    fn max_batch(&self) -> usize {
        self.inner.max_batch()
    }
    fn new_session(&self) -> Result<Box<dyn Session>, BackendError> {
        self.inner.new_session()
    }
    fn notes(&self) -> Vec<String> {
        let mut notes = self.notes.clone();
        notes.extend(self.inner.notes());
        notes
    }
    fn on_gpu(&self) -> bool {
        self.inner.on_gpu()
    }
    fn new_device_session(&self) -> Option<Result<DeviceSessionBox, BackendError>> {
        self.inner.new_device_session()
    }
}

/// `engine`, with `notes` shown before its own.
pub fn with_notes(engine: Arc<dyn Engine>, notes: Vec<String>) -> Arc<dyn Engine> {
    Arc::new(NotedEngine {
        inner: engine,
        notes,
    })
}

/// Input images for one run: `images` CHW tensors back to back.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub struct InputBatch<'a> {
    /// `images × 3 × H × W` values.
    pub data: &'a [f32],
    /// Number of images.
    pub images: usize,
}

impl<'a> InputBatch<'a> {
    /// A batch in host memory.
    pub fn host(data: &'a [f32], images: usize) -> InputBatch<'a> {
        InputBatch { data, images }
    }

    /// Checks the batch against a model input of `shape` (one image) and
    /// an engine taking at most `max_images` per run.
    pub fn check(&self, shape: &[usize], max_images: usize) -> Result<(), BackendError> {
        let per_image: usize = shape.iter().product();
        if self.images == 0
            || self.images > max_images
            || self.data.len() != per_image * self.images
        {
            return Err(BackendError::Input {
                images: self.images,
                values: self.data.len(),
                reason: if max_images == usize::MAX {
                    format!("each image needs {per_image} values ({shape:?})")
                } else {
                    format!(
                        "this engine takes 1 to {max_images} images of {per_image} values ({shape:?})"
                    )
                },
            });
        }
        Ok(())
    }
}

/// Per-thread mutable state for running an engine.
pub trait Session: Send {
    /// Runs a batch, leaving its results in [`Session::outputs`].
    fn run(&mut self, batch: InputBatch<'_>) -> Result<(), BackendError>;
    /// Outputs of the last successful run.
    fn outputs(&self) -> &BatchOutputs;
}

/// Outputs of one run, for every image in the batch.
#[derive(Debug, Default)]
pub struct BatchOutputs {
    images: usize,
    /// Per output: its values for all images, image after image.
    tensors: Vec<Vec<f32>>,
    /// In use instead of `tensors` when the device kept only some rows.
    gathered: GatheredRows,
}

impl BatchOutputs {
    /// Clears the outputs for a batch of `images`, keeping their memory.
    pub fn reset(&mut self, outputs: usize, images: usize) {
        self.images = images;
        self.tensors.resize_with(outputs, Vec::new);
        for t in &mut self.tensors {
            t.clear();
        }
        self.gathered.active = false;
    }

    /// Replaces the outputs by the rows a [`GatherPlan`] kept of `images`
    /// images. Image `i` kept `counts[i]` rows: its priors are the first
    /// `counts[i]` of `picked[i * capacity..]`, in any order, and its rows
    /// the same of `rows[i * capacity * columns..]`. They are stored by
    /// ascending prior, the order the host decode reads them in.
    pub fn set_gathered(
        &mut self,
        plan: &GatherPlan,
        capacity: usize,
        counts: &[u32],
        picked: &[u32],
        rows: &[f32],
    ) -> Result<(), BackendError> {
        self.reset(self.tensors.len(), counts.len());
        let gathered = &mut self.gathered;
        gathered.columns = plan.columns;
        gathered.starts.clear();
        gathered.priors.clear();
        gathered.values.clear();
        gathered.starts.push(0);
        for (image, &count) in counts.iter().enumerate() {
            let first = image * capacity;
            let count = (count as usize).min(capacity);
            let priors = picked.get(first..first + count);
            let values = rows.get(first * plan.columns..(first + count) * plan.columns);
            let (Some(priors), Some(values)) = (priors, values) else {
                return Err(BackendError::Input {
                    images: counts.len(),
                    values: rows.len(),
                    reason: format!("image {image} kept {count} rows past the gathered buffers"),
                });
            };
            gathered.order.clear();
            gathered.order.extend(0..count);
            gathered.order.sort_unstable_by_key(|&row| priors[row]);
            for &row in &gathered.order {
                gathered.priors.push(priors[row]);
                gathered
                    .values
                    .extend_from_slice(&values[row * plan.columns..][..plan.columns]);
            }
            gathered.starts.push(gathered.priors.len());
        }
        gathered.active = true;
        Ok(())
    }

    /// The outputs of image `image`, `None` past the batch.
    pub fn image(&self, image: usize) -> Option<ImageOutputs<'_>> {
        if image >= self.images {
            return None;
        }
        let gathered = &self.gathered;
        if !gathered.active {
            return Some(ImageOutputs::Whole(self.for_image(image)));
        }
        let rows = gathered.starts[image]..gathered.starts[image + 1];
        Some(ImageOutputs::Rows {
            priors: &gathered.priors[rows.clone()],
            values: &gathered.values[rows.start * gathered.columns..rows.end * gathered.columns],
        })
    }

    /// Appends one image's values of output `index`.
    pub fn push(&mut self, index: usize, values: &[f32]) {
        if let Some(t) = self.tensors.get_mut(index) {
            t.extend_from_slice(values);
        }
    }

    /// Number of images.
    pub fn images(&self) -> usize {
        self.images
    }

    /// The outputs of image `image`, in declared order.
    pub fn for_image(&self, image: usize) -> Vec<&[f32]> {
        self.tensors
            .iter()
            .map(|t| {
                let per_image = t.len() / self.images.max(1);
                t.get(image * per_image..(image + 1) * per_image)
                    .unwrap_or(&[])
            })
            .collect()
    }
}

/// Every backend nanodetd knows, whether or not this binary runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// tract, pure Rust on the CPU.
    Tract,
    /// ONNX Runtime's CPU execution provider, loaded at run time.
    OnnxRuntime,
    /// TensorRT on an NVIDIA GPU. Only a build with the `tensorrt` feature
    /// runs it; in others, opening it answers [`TENSORRT_NOT_COMPILED_IN`].
    TensorRt,
}

/// Why a build without the `tensorrt` feature cannot open TensorRT.
pub const TENSORRT_NOT_COMPILED_IN: &str =
    "not compiled in: this nanodetd was built without the `tensorrt` feature";

impl BackendKind {
    /// Every backend nanodetd knows.
    pub const ALL: &[BackendKind] = &[
        BackendKind::Tract,
        BackendKind::OnnxRuntime,
        BackendKind::TensorRt,
    ];

    /// Whether this binary can run it.
    pub fn compiled_in(self) -> bool {
        match self {
            BackendKind::Tract | BackendKind::OnnxRuntime => true,
            BackendKind::TensorRt => cfg!(feature = "tensorrt"),
        }
    }

    /// Every backend this binary can run, in [`BackendKind::ALL`]'s order.
    pub fn compiled() -> impl DoubleEndedIterator<Item = BackendKind> {
        BackendKind::ALL
            .iter()
            .copied()
            .filter(|kind| kind.compiled_in())
    }
}

impl BackendKind {
    /// Whether the backend runs a Q/DQ model with INT8 kernels (otherwise
    /// it only emulates INT8 rounding in float).
    pub fn has_int8_kernels(self) -> bool {
        match self {
            BackendKind::Tract => false,
            BackendKind::OnnxRuntime | BackendKind::TensorRt => true,
        }
    }

    /// Whether `precision = "fp16"` means anything to the backend (ONNX
    /// Runtime: on its GPU providers).
    pub fn has_fp16_kernels(self) -> bool {
        match self {
            BackendKind::Tract => false,
            BackendKind::OnnxRuntime | BackendKind::TensorRt => true,
        }
    }
}

impl fmt::Display for BackendKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            BackendKind::Tract => "tract",
            BackendKind::OnnxRuntime => "onnxruntime",
            BackendKind::TensorRt => "tensorrt",
        })
    }
}

/// A backend name nanodetd does not know.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown backend {name:?}; known: tract, onnxruntime, tensorrt{}", if *.or_auto { ", or auto" } else { "" })]
pub struct UnknownBackend {
    /// The name given.
    pub name: String,
    /// Whether `auto` was an option too.
    pub or_auto: bool,
}

impl std::str::FromStr for BackendKind {
    type Err = UnknownBackend;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        BackendKind::ALL
            .iter()
            .copied()
            .find(|k| k.to_string() == s)
            .ok_or_else(|| UnknownBackend {
                name: s.to_owned(),
                or_auto: false,
            })
    }
}

/// Why a model could not be prepared or run. A third-party library's error
/// is kept whole as the `source()` (a [`Cause`]). The message shows the
/// cause's own text, which for tract's errors is only their outermost
/// context: print it with [`crate::errors::one_line`] to show the chain.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// The model file is missing, unreadable, empty or not a model this
    /// backend can prepare.
    #[error("{path}: {problem}")]
    ModelFile {
        /// The model file.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        problem: ModelFileProblem,
    },
    /// The input batch does not match the model.
    #[error("input batch of {images} images with {values} values does not fit: {reason}")]
    Input {
        /// Images in the batch.
        images: usize,
        /// Values given.
        values: usize,
        /// What the model takes.
        reason: String,
    },
    /// Inference failed in the backend's library or on the device.
    #[error("inference failed: {0}")]
    Run(#[source] Cause),
    /// A call that needs a session on the GPU was made on one that is not.
    #[error("{0} needs a session on the GPU")]
    NotOnDevice(String),
    /// The session was handed back after a failure and cannot run again.
    #[error("inference failed: the session was handed back")]
    HandedBack,
    /// `auto` found no backend that opens the model here.
    #[error("auto: no backend runs this model here: {}", join_skipped(.0))]
    NoneRuns(Vec<Skipped>),
    /// The backend cannot run here (no GPU, no TensorRT, a plan that
    /// cannot be built).
    #[error("{backend} backend unavailable: {cause}")]
    Unavailable {
        /// The backend.
        backend: BackendKind,
        /// Why: the library's or the device's error, or nanodetd's own
        /// reason as text.
        #[source]
        cause: Cause,
    },
}

impl BackendError {
    /// `backend` cannot run here, for `cause`.
    pub fn unavailable(backend: BackendKind, cause: impl Into<Cause>) -> BackendError {
        BackendError::Unavailable {
            backend,
            cause: cause.into(),
        }
    }

    /// Inference failed, for `cause`.
    pub fn run(cause: impl Into<Cause>) -> BackendError {
        BackendError::Run(cause.into())
    }
}

/// What is wrong with a model file, as a backend found it.
#[derive(Debug, thiserror::Error)]
pub enum ModelFileProblem {
    /// The file could not be read.
    #[error("cannot read model: {0}")]
    Read(#[source] std::io::Error),
    /// The file is empty.
    #[error("empty file (0 bytes), not an ONNX model")]
    Empty,
    /// The backend's library refused the model: its error, and what the
    /// backend was doing ("not a loadable ONNX model", "shape inference
    /// failed for input [1, 3, 320, 320]").
    #[error(transparent)]
    Refused(While),
    /// Not one image input and at least one output.
    #[error(
        "a detector has one image input and at least one output, this model has {inputs} inputs and {outputs} outputs"
    )]
    NotADetector {
        /// Inputs found.
        inputs: usize,
        /// Outputs found.
        outputs: usize,
    },
    /// The input's height and width are not fixed, and none were given.
    #[error(
        "input {input:?} has shape {declared}, not a fixed [N, 3, H, W]; give the input size (--size WxH)"
    )]
    OpenInputSize {
        /// The input's name.
        input: String,
        /// The shape it declares.
        declared: String,
    },
    /// An output's shape is not fixed once the input is.
    #[error("output {index} has a shape that depends on the input: {shape}")]
    OpenOutputShape {
        /// The output's position.
        index: usize,
        /// The shape inferred.
        shape: String,
    },
}

/// A backend `auto` passed over, and why.
#[derive(Debug)]
pub struct Skipped {
    /// The backend.
    pub kind: BackendKind,
    /// Whether it failed to open, or opened and failed a timing run.
    pub at_timing: bool,
    /// Its error.
    pub error: BackendError,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let stage = if self.at_timing {
            "failed a timing run"
        } else {
            "unavailable"
        };
        write!(
            f,
            "{} {stage} ({})",
            self.kind,
            crate::errors::one_line(&self.error)
        )
    }
}

fn join_skipped(skipped: &[Skipped]) -> String {
    let each: Vec<String> = skipped.iter().map(ToString::to_string).collect();
    each.join("; ")
}

/// Prepares `model` on `backend` with default settings for the backend
/// (the daemon's come from its configuration).
pub fn open_engine(
    backend: BackendKind,
    model: &Path,
    options: &EngineOptions,
) -> Result<Arc<dyn Engine>, BackendError> {
    match backend {
        BackendKind::Tract => Ok(Arc::new(TractEngine::load(model, options)?)),
        BackendKind::OnnxRuntime => Ok(Arc::new(onnxruntime::OnnxRuntimeEngine::load(
            model,
            options,
            &options.onnxruntime,
        )?)),
        BackendKind::TensorRt => open_tensorrt(model, options),
    }
}

#[cfg(feature = "tensorrt")]
fn open_tensorrt(model: &Path, options: &EngineOptions) -> Result<Arc<dyn Engine>, BackendError> {
    let onnx = std::fs::read(model).map_err(|e| BackendError::ModelFile {
        path: model.to_owned(),
        problem: ModelFileProblem::Read(e),
    })?;
    let name = crate::model::file_name_stem(model);
    let trt = tensorrt::TensorRtOptions {
        // The command line's one switch for CUDA graphs, kept with
        // ONNX Runtime's options, covers TensorRT's too.
        cuda_graph: options.onnxruntime.cuda_graph,
        ..tensorrt::TensorRtOptions::default()
    };
    let sources = tensorrt::OnnxSources {
        fp32: &onnx,
        qdq: None,
    };
    Ok(Arc::new(tensorrt::TrtEngine::open(&name, &sources, &trt)?))
}

#[cfg(not(feature = "tensorrt"))]
fn open_tensorrt(_: &Path, _: &EngineOptions) -> Result<Arc<dyn Engine>, BackendError> {
    Err(BackendError::unavailable(
        BackendKind::TensorRt,
        TENSORRT_NOT_COMPILED_IN,
    ))
}

/// The engine `choice` names, opened by `open`; for `auto`, the fastest
/// of every compiled-in backend that opens ([`choose_fastest`], GPU
/// backends first).
pub fn open_chosen(
    choice: BackendChoice,
    open: &dyn Fn(BackendKind) -> Result<Arc<dyn Engine>, BackendError>,
) -> Result<Arc<dyn Engine>, BackendError> {
    match choice {
        BackendChoice::Only(kind) => open(kind),
        BackendChoice::Auto => choose_fastest(
            BackendKind::compiled()
                .rev()
                .map(|kind| Contender {
                    kind,
                    open: Box::new(move || open(kind)),
                })
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_outputs_split_per_image() {
        let mut o = BatchOutputs::default();
        o.reset(2, 2);
        o.push(0, &[1.0, 2.0]);
        o.push(1, &[5.0]);
        o.push(0, &[3.0, 4.0]);
        o.push(1, &[6.0]);
        assert_eq!(o.for_image(1), vec![&[3.0, 4.0][..], &[6.0][..]]);
        o.reset(2, 1);
        assert!(o.for_image(0).iter().all(|s| s.is_empty()));
    }

    #[test]
    fn gathered_rows_come_out_by_prior_per_image() {
        let plan = GatherPlan {
            output: 0,
            priors: 10,
            columns: 2,
            score_first: 0,
            classes: 1,
            threshold: 0.5,
        };
        let mut o = BatchOutputs::default();
        o.reset(1, 2);
        o.push(0, &[0.0; 40]);
        // Capacity 3: image 0 kept priors 7 then 2 (the order the GPU's
        // atomics ran in), image 1 kept none, image 2 four (one past).
        let counts = [2, 0, 4];
        let picked = [7, 2, 99, 0, 0, 0, 9, 1, 5];
        let rows = [
            7.0, 7.5, 2.0, 2.5, 0.0, 0.0, //
            0.0, 0.0, 0.0, 0.0, 0.0, 0.0, //
            9.0, 9.5, 1.0, 1.5, 5.0, 5.5,
        ];
        o.set_gathered(&plan, 3, &counts, &picked, &rows).unwrap();
        assert_eq!(o.images(), 3);
        assert_eq!(
            o.image(0),
            Some(ImageOutputs::Rows {
                priors: &[2, 7],
                values: &[2.0, 2.5, 7.0, 7.5],
            })
        );
        assert_eq!(
            o.image(1),
            Some(ImageOutputs::Rows {
                priors: &[],
                values: &[],
            })
        );
        let Some(ImageOutputs::Rows { priors, .. }) = o.image(2) else {
            panic!("{:?}", o.image(2));
        };
        assert_eq!(priors, [1, 5, 9], "at most the capacity");
        assert_eq!(o.image(3), None);
        // Too few rows for the counts is an error, not a panic.
        assert!(
            o.set_gathered(&plan, 3, &counts, &picked, &rows[..4])
                .is_err()
        );
        // A reset brings back whole outputs.
        o.reset(1, 1);
        o.push(0, &[1.0]);
        assert_eq!(o.image(0), Some(ImageOutputs::Whole(vec![&[1.0][..]])));
    }

    #[test]
    fn batches_are_checked_against_shape_and_limit() {
        let data = [0.0f32; 12];
        let shape = [1, 3, 2, 2];
        assert!(InputBatch::host(&data, 1).check(&shape, 1).is_ok());
        let short = InputBatch::host(&data[..11], 1).check(&shape, usize::MAX);
        assert!(
            matches!(&short, Err(e) if e.to_string().contains("each image needs 12 values")),
            "{short:?}"
        );
        let too_many = InputBatch::host(&data, 1).check(&[1, 3, 1, 2], 1);
        assert!(
            matches!(&too_many, Err(e) if e.to_string().contains("takes 1 to 1 images of 6 values")),
            "{too_many:?}"
        );
        assert!(InputBatch::host(&[], 0).check(&shape, 4).is_err());
    }

    #[test]
    fn unknown_backend_lists_known_ones() {
        let err = "openvino".parse::<BackendKind>().unwrap_err().to_string();
        assert_eq!(
            err,
            r#"unknown backend "openvino"; known: tract, onnxruntime, tensorrt"#
        );
        let err = "openvino".parse::<BackendChoice>().unwrap_err().to_string();
        assert_eq!(
            err,
            r#"unknown backend "openvino"; known: tract, onnxruntime, tensorrt, or auto"#
        );
        // The list in the message is every backend there is.
        let names: Vec<String> = BackendKind::ALL.iter().map(ToString::to_string).collect();
        assert!(err.contains(&names.join(", ")), "{err}");
        assert_eq!("tensorrt".parse(), Ok(BackendKind::TensorRt));
        assert_eq!(
            BackendKind::compiled().collect::<Vec<_>>().len(),
            if cfg!(feature = "tensorrt") { 3 } else { 2 }
        );
    }

    #[cfg(not(feature = "tensorrt"))]
    #[test]
    fn tensorrt_in_a_build_without_it_answers_not_compiled_in() {
        let err = open_engine(
            BackendKind::TensorRt,
            Path::new("any.onnx"),
            &EngineOptions::default(),
        )
        .err()
        .map(|e| e.to_string());
        assert_eq!(
            err.as_deref(),
            Some(
                "tensorrt backend unavailable: not compiled in: this nanodetd was built without the `tensorrt` feature"
            )
        );
    }
}
