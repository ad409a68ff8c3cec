//! The tract backend: pure Rust, CPU, always available.

use std::path::Path;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_hir::infer::Factoid;
use tract_onnx::tract_hir::internal::DimLike;

use crate::errors::{Cause, While};
use crate::model::{OnnxModel, TensorShape};

use super::{
    BackendError, BackendKind, BatchOutputs, Engine, EngineOptions, InputBatch, ModelFileProblem,
    ModelInfo, Session,
};

/// A model optimised by tract, ready to run.
pub struct TractEngine {
    plan: Arc<TypedRunnableModel>,
    info: ModelInfo,
    /// Images one run of the plan takes: 1, or up to this many where the
    /// plan was built for a symbolic batch.
    max_batch: usize,
    notes: Vec<String>,
}

impl TractEngine {
    /// Loads, shape-checks and optimises an ONNX file.
    pub fn load(path: &Path, options: &EngineOptions) -> Result<TractEngine, BackendError> {
        let bytes = std::fs::read(path).map_err(|e| BackendError::ModelFile {
            path: path.to_owned(),
            problem: ModelFileProblem::Read(e),
        })?;
        TractEngine::from_bytes(&bytes, path, options)
    }

    /// [`load`](Self::load) for a model already read; `path` names it in
    /// errors.
    pub fn from_bytes(
        bytes: &[u8],
        path: &Path,
        options: &EngineOptions,
    ) -> Result<TractEngine, BackendError> {
        TractEngine::build(bytes, path, options, 1)
    }

    /// [`load`](Self::load) of the model made batchable
    /// ([`batchable`], its verdict kept in `memo`): one plan over a
    /// symbolic batch runs up to `max_batch` images at once. An export
    /// that cannot batch runs image by image, and the engine's notes say
    /// why. A CPU gains nothing by it; it is how the batch rewrite is
    /// checked end to end where no GPU is.
    pub fn load_batched(
        path: &Path,
        options: &EngineOptions,
        max_batch: u32,
        memo: &Path,
    ) -> Result<TractEngine, BackendError> {
        let fail = |problem: ModelFileProblem| BackendError::ModelFile {
            path: path.to_owned(),
            problem,
        };
        let bytes = std::fs::read(path).map_err(|e| fail(ModelFileProblem::Read(e)))?;
        let model = OnnxModel::decode(&bytes).map_err(|e| {
            fail(ModelFileProblem::Refused(While::new(
                "reading the model",
                e,
            )))
        })?;
        let (bytes, batch, why_not) = batchable(&model, max_batch, memo);
        let mut engine = TractEngine::build(&bytes, path, options, batch as usize)?;
        if let Some(why) = why_not {
            engine.notes.push(format!(
                "max_batch {max_batch} asked, but this export cannot batch ({why}): batch 1"
            ));
        }
        Ok(engine)
    }

    fn build(
        bytes: &[u8],
        path: &Path,
        options: &EngineOptions,
        max_batch: usize,
    ) -> Result<TractEngine, BackendError> {
        let fail = |problem: ModelFileProblem| BackendError::ModelFile {
            path: path.to_owned(),
            problem,
        };
        // tract's errors are anyhow chains: kept whole as the cause.
        let refused = |stage: String| {
            move |e: TractError| fail(ModelFileProblem::Refused(While::new(stage, e)))
        };
        if bytes.is_empty() {
            return Err(fail(ModelFileProblem::Empty));
        }
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &*bytes)
            .map_err(refused("not a loadable ONNX model".into()))?;
        if model.inputs.len() != 1 || model.outputs.is_empty() {
            return Err(fail(ModelFileProblem::NotADetector {
                inputs: model.inputs.len(),
                outputs: model.outputs.len(),
            }));
        }
        let input_name = model.node(model.inputs[0].node).name.clone();
        let declared: Vec<Option<usize>> = model
            .input_fact(0)
            .map_err(refused("reading the input's shape".into()))?
            .shape
            .dims()
            .map(|d| d.concretize().and_then(|d| d.as_usize()))
            .collect();
        let (height, width) = match (declared.as_slice(), options.input_size) {
            (_, Some((w, h))) => (h, w),
            ([_, _, Some(h), Some(w)], None) => (*h, *w),
            _ => {
                return Err(fail(ModelFileProblem::OpenInputSize {
                    input: input_name,
                    declared: format!("{declared:?}"),
                }));
            }
        };
        let input_shape = vec![1, 3, height, width];
        // A batched plan takes any batch: its first axis is a symbol.
        let batch: TDim = if max_batch > 1 {
            model.symbols.sym("N").into()
        } else {
            1.into()
        };
        let input_fact = f32::fact([batch, 3.into(), height.into(), width.into()]);
        model
            .set_input_fact(0, input_fact.into())
            .map_err(refused(format!("setting the input to {input_shape:?}")))?;
        let typed = model.into_typed().map_err(refused(format!(
            "shape inference failed for input {input_shape:?}"
        )))?;
        let mut outputs = Vec::with_capacity(typed.outputs.len());
        for (i, outlet) in typed.outputs.iter().enumerate() {
            let fact = typed
                .outlet_fact(*outlet)
                .map_err(refused(format!("reading output {i}'s shape")))?;
            // At batch 1: a batched plan's outputs lead with the symbol.
            let shape: Option<Vec<usize>> = fact
                .shape
                .iter()
                .enumerate()
                .map(|(axis, d)| {
                    if axis == 0 && max_batch > 1 {
                        Some(1)
                    } else {
                        d.to_usize().ok()
                    }
                })
                .collect();
            let shape = shape.ok_or_else(|| {
                fail(ModelFileProblem::OpenOutputShape {
                    index: i,
                    shape: format!("{:?}", fact.shape),
                })
            })?;
            let name = typed
                .outlet_label(*outlet)
                .unwrap_or(&typed.node(outlet.node).name)
                .to_owned();
            outputs.push(TensorShape { name, shape });
        }
        let plan = typed
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(refused("tract cannot optimise the model".into()))?;
        Ok(TractEngine {
            plan,
            info: ModelInfo {
                input: TensorShape {
                    name: input_name,
                    shape: input_shape,
                },
                outputs,
            },
            max_batch,
            notes: Vec::new(),
        })
    }
}

impl Engine for TractEngine {
    fn backend(&self) -> BackendKind {
        BackendKind::Tract
    }

    fn info(&self) -> &ModelInfo {
        &self.info
    }

    fn max_batch(&self) -> usize {
        if self.max_batch > 1 {
            return self.max_batch;
        }
        // The plan is built for batch 1; bigger batches run image by image,
        // which on a CPU costs nothing extra.
        usize::MAX
    }

    fn new_session(&self) -> Result<Box<dyn Session>, BackendError> {
        let state = self.plan.spawn().map_err(BackendError::run)?;
        Ok(Box::new(TractSession {
            state,
            input_shape: self.info.input.shape.clone(),
            max_batch: self.max_batch,
            outputs: BatchOutputs::default(),
        }))
    }

    fn notes(&self) -> Vec<String> {
        self.notes.clone()
    }
}

struct TractSession {
    state: TypedSimpleState,
    input_shape: Vec<usize>,
    /// Images one run of the plan takes.
    max_batch: usize,
    outputs: BatchOutputs,
}

impl Session for TractSession {
    fn run(&mut self, batch: InputBatch<'_>) -> Result<(), BackendError> {
        batch.check(&self.input_shape, usize::MAX)?;
        let per_image: usize = self.input_shape.iter().product();
        let run_error = BackendError::run;
        self.outputs
            .reset(self.state.plan().model().outputs.len(), batch.images);
        for images in batch.data.chunks(per_image * self.max_batch) {
            let mut shape = self.input_shape.clone();
            shape[0] = images.len() / per_image;
            let input = Tensor::from_shape(&shape, images).map_err(run_error)?;
            let results = self
                .state
                .run(tvec!(input.into_tvalue()))
                .map_err(run_error)?;
            for (index, value) in results.iter().enumerate() {
                let values = value.cast_to::<f32>().map_err(run_error)?;
                let plain = values.try_as_plain_ram().map_err(run_error)?;
                let slice = plain.as_slice::<f32>().map_err(run_error)?;
                self.outputs.push(index, slice);
            }
        }
        Ok(())
    }

    fn outputs(&self) -> &BatchOutputs {
        &self.outputs
    }
}

/// `model` made batchable for up to `max_batch` images, where the graph
/// allows it: rewritten by [`OnnxModel::with_dynamic_batch`] and checked
/// by [`validate_batch`] (batch 2 against single runs), else the export as
/// it is at batch 1, with the reason. The check costs a few seconds of CPU,
/// so its verdict is kept in `memo` (a directory: the engine cache), keyed
/// by the rewritten model's hash, and later starts read it instead. The
/// bytes returned are what a backend's parser reads: the file's own where
/// the model is left as it was.
pub fn batchable(model: &OnnxModel, max_batch: u32, memo: &Path) -> (Vec<u8>, u32, Option<String>) {
    let as_it_is = || model.bytes().into_owned();
    if max_batch <= 1 {
        return (as_it_is(), 1, None);
    }
    let (batched, _) = match model.with_dynamic_batch() {
        Ok(rewritten) => rewritten,
        Err(why) => return (as_it_is(), 1, Some(why.to_string())),
    };
    let rewritten = batched.bytes().into_owned();
    let file = memo.join(format!(
        "batch-check-{}.txt",
        &crate::engine_cache::sha256_hex(&rewritten)[..16]
    ));
    let verdict = match std::fs::read_to_string(&file) {
        Ok(memo) if memo == "ok" => Ok(()),
        Ok(memo) => Err(memo),
        Err(_) => {
            let verdict = batched
                .input_shape()
                .ok()
                .and_then(|s| Some((*s.get(3)?, *s.get(2)?)))
                .ok_or_else(|| "no fixed input size".to_owned())
                .and_then(|size| {
                    validate_batch(&rewritten, size, 2).map_err(|e| crate::errors::one_line(&e))
                });
            let text = verdict.as_ref().err().map_or("ok", String::as_str);
            let kept = std::fs::create_dir_all(memo)
                .and_then(|()| crate::engine_cache::write_atomically(&file, text.as_bytes()));
            if let Err(e) = kept {
                log::warn!(
                    "{}: cannot keep the batch check's verdict ({e}); the next start checks again",
                    file.display()
                );
            }
            verdict
        }
    };
    match verdict {
        Ok(()) => (rewritten, max_batch, None),
        Err(why) => (as_it_is(), 1, Some(why)),
    }
}

/// [`batchable`] for a model derived from `fp32` (its FP16 copy, its Q/DQ
/// model): the check runs on `fp32`, whose graph it shares, and the
/// rewrite is applied to `model`. A check on the derived model itself
/// would compare float16 or INT8 rounding, which a batch may legitimately
/// do in another order (tract's FP16 differs at 1e-3 between batch and
/// alone), not the graph's treatment of the batch.
pub fn batchable_as(
    model: &OnnxModel,
    fp32: &OnnxModel,
    max_batch: u32,
    memo: &Path,
) -> (Vec<u8>, u32, Option<String>) {
    let (_, batch, why_not) = batchable(fp32, max_batch, memo);
    if batch <= 1 {
        return (model.bytes().into_owned(), 1, why_not);
    }
    match model.with_dynamic_batch() {
        Ok((rewritten, _)) => (rewritten.bytes().into_owned(), batch, None),
        Err(why) => (model.bytes().into_owned(), 1, Some(why.to_string())),
    }
}

/// Why a batched model does not compute what it computes image by image.
#[derive(Debug, thiserror::Error)]
pub enum BatchMismatch {
    /// tract cannot build it at this batch size.
    #[error("batch {batch} does not build")]
    Build {
        /// The batch size.
        batch: usize,
        /// tract's error.
        source: Cause,
    },
    /// A run failed.
    #[error("inference failed")]
    Run(#[source] Cause),
    /// An output is not a plain float tensor.
    #[error("output {0} is not a float tensor")]
    NotFloat(usize),
    /// The graph moves the batch into another axis.
    #[error(
        "output {output} has shape {batched:?} at batch {batch} but {alone:?} at batch 1: the graph folds the batch into another axis"
    )]
    Folded {
        /// The output.
        output: usize,
        /// The batch size.
        batch: usize,
        /// Its shape at that batch size.
        batched: Vec<usize>,
        /// Its shape at batch 1.
        alone: Vec<usize>,
    },
    /// A value differs.
    #[error("output {output}, image {image}, value {index}: {batched} in the batch, {alone} alone")]
    Differs {
        /// The output.
        output: usize,
        /// The image in the batch.
        image: usize,
        /// The value's index in the image's output.
        index: usize,
        /// The value computed in the batch.
        batched: f32,
        /// The value computed alone.
        alone: f32,
    },
}

/// Checks, on the CPU, that `onnx` (rewritten for a symbolic batch by
/// [`OnnxModel::with_dynamic_batch`]) computes for a batch of `batch` images
/// exactly what it computes for each image alone: same output shapes, and
/// every value within 1e-4 (relative to its size). The error says where
/// they part, for the log line of a fallback to batch 1.
pub fn validate_batch(
    onnx: &[u8],
    (width, height): (usize, usize),
    batch: usize,
) -> Result<(), BatchMismatch> {
    let plan = |n: usize| -> Result<Arc<TypedRunnableModel>, BatchMismatch> {
        let build = |e: TractError| BatchMismatch::Build {
            batch: n,
            source: e.into(),
        };
        let mut model = tract_onnx::onnx()
            .model_for_read(&mut &*onnx)
            .map_err(build)?;
        model
            .set_input_fact(0, f32::fact([n, 3, height, width]).into())
            .map_err(build)?;
        model
            .into_optimized()
            .and_then(|m| m.into_runnable())
            .map_err(build)
    };
    let single = plan(1)?;
    let batched = plan(batch)?;
    let per_image = 3 * height * width;
    // Deterministic inputs in NanoDet's normalised range.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let values: Vec<f32> = (0..batch * per_image)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32 * 4.0 - 2.0
        })
        .collect();
    let run = |plan: &Arc<TypedRunnableModel>, n: usize, data: &[f32]| {
        let failed = |e: TractError| BatchMismatch::Run(e.into());
        let input = Tensor::from_shape(&[n, 3, height, width], data).map_err(failed)?;
        plan.run(tvec!(input.into_tvalue())).map_err(failed)
    };
    let together = run(&batched, batch, &values)?;
    for (image, data) in values.chunks(per_image).enumerate() {
        let alone = run(&single, 1, data)?;
        for (o, (b, s)) in together.iter().zip(alone.iter()).enumerate() {
            let not_float = || BatchMismatch::NotFloat(o);
            let (b, s) = (
                b.cast_to::<f32>().map_err(|_| not_float())?,
                s.cast_to::<f32>().map_err(|_| not_float())?,
            );
            // An output that ignores the batch may still lead with a 2
            // (a constant [2, 4]): its size then differs from the batch's.
            if b.shape().first() != Some(&batch)
                || b.shape()[1..] != s.shape()[1..]
                || Some(b.len()) != batch.checked_mul(s.len())
            {
                return Err(BatchMismatch::Folded {
                    output: o,
                    batch,
                    batched: b.shape().to_vec(),
                    alone: s.shape().to_vec(),
                });
            }
            let b = b.try_as_plain_ram().map_err(|_| not_float())?;
            let s = s.try_as_plain_ram().map_err(|_| not_float())?;
            let (b, s) = (
                b.as_slice::<f32>().map_err(|_| not_float())?,
                s.as_slice::<f32>().map_err(|_| not_float())?,
            );
            let part = &b[image * s.len()..(image + 1) * s.len()];
            if let Some((i, (x, y))) = part
                .iter()
                .zip(s)
                .enumerate()
                .find(|(_, (x, y))| (*x - *y).abs() > 1e-4 * (1.0 + y.abs()))
            {
                return Err(BatchMismatch::Differs {
                    output: o,
                    image,
                    index: i,
                    batched: *x,
                    alone: *y,
                });
            }
        }
    }
    Ok(())
}
