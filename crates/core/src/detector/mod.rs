//! The detection pipeline for one frame, top to bottom:
//! preprocess → backend session → decode → NMS → image coordinates.
//!
//! A [`Detector`] is immutable and shared; each thread that detects holds a
//! [`DetectorSession`] with the reusable buffers.

mod device;

use std::sync::Arc;

use self::device::DeviceRunner;
use crate::backend::{BackendError, Engine, GatherPlan, ImageOutputs, InputBatch, Session};
use crate::frame::Frame;
use crate::model::{
    COCO_CLASS_NAMES, Candidate, DecodeError, DecodeParams, Layout, LayoutError, LayoutOverrides,
    OutputMap,
};
use crate::postprocess::{self, Detection, NmsParams};
use crate::preprocess::{self, PreprocessError, PreprocessSpec, Transform};

/// Score, NMS and candidate limits.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DetectionParams {
    /// Minimum class score (strictly above).
    pub score_threshold: f32,
    /// Class-aware NMS IoU threshold.
    pub iou_threshold: f32,
    /// Detections kept per image.
    pub max_detections: usize,
    /// Legacy layouts: priors kept per level before NMS.
    pub top_k_per_level: usize,
}

impl DetectionParams {
    /// The daemon's and `detect`'s defaults: score 0.35.
    pub const LIVE: DetectionParams = DetectionParams {
        score_threshold: 0.35,
        iou_threshold: 0.6,
        max_detections: 100,
        top_k_per_level: 1000,
    };

    /// COCO evaluation's defaults: score 0.05, as the reference scores it.
    pub const EVAL: DetectionParams = DetectionParams {
        score_threshold: 0.05,
        ..DetectionParams::LIVE
    };
}

/// Why a detector could not be built or could not process a frame.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    /// The model's shapes match no known layout.
    #[error(transparent)]
    Layout(#[from] LayoutError),
    /// The class-name list does not fit the model.
    #[error("{0}")]
    ClassNames(String),
    /// Preprocessing failed.
    #[error(transparent)]
    Preprocess(#[from] PreprocessError),
    /// The backend failed.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The outputs did not match the layout.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A raw camera buffer does not hold the frame its layout describes.
    #[error(transparent)]
    Frame(#[from] crate::frame::FrameError),
    /// The GPU could not take or preprocess the frame.
    #[cfg(feature = "cuda")]
    #[error(transparent)]
    GpuPreprocess(#[from] crate::preprocess::GpuPreprocessError),
}

/// The layout `model` declares, read from its shapes: what
/// [`Detector::new`] finds from an engine, without building one. `None`
/// when the file does not declare its shapes fully; a backend's shape
/// inference must then tell.
pub fn declared_layout(
    model: &crate::model::OnnxModel,
    overrides: &LayoutOverrides,
) -> Option<Result<Layout, LayoutError>> {
    let (input, outputs) = model.declared_shapes()?;
    Some(Layout::detect(&input, &outputs, overrides))
}

/// The preprocessing of [`declared_layout`].
pub fn declared_preprocess(
    model: &crate::model::OnnxModel,
    overrides: &LayoutOverrides,
) -> Option<Result<PreprocessSpec, LayoutError>> {
    declared_layout(model, overrides).map(|layout| layout.map(|l| l.preprocess_spec()))
}

/// A prepared model plus everything needed to interpret it.
pub struct Detector {
    engine: Arc<dyn Engine>,
    layout: Layout,
    preprocess: PreprocessSpec,
    class_names: Vec<String>,
    params: DetectionParams,
}

impl Detector {
    /// Works out the layout of `engine`'s model and binds the settings.
    /// `class_names` defaults to COCO's 80 when the model scores 80 classes.
    pub fn new(
        engine: Arc<dyn Engine>,
        overrides: &LayoutOverrides,
        class_names: Option<Vec<String>>,
        params: DetectionParams,
    ) -> Result<Detector, DetectorError> {
        let info = engine.info();
        let overrides = overrides.counting(class_names.as_deref());
        let layout = Layout::detect(&info.input.shape, &info.outputs, &overrides)?;
        let class_names = match class_names {
            Some(names) => names,
            None if layout.num_classes == COCO_CLASS_NAMES.len() => {
                COCO_CLASS_NAMES.iter().map(|s| (*s).to_owned()).collect()
            }
            None => (0..layout.num_classes)
                .map(|i| format!("class{i}"))
                .collect(),
        };
        if class_names.len() != layout.num_classes {
            return Err(DetectorError::ClassNames(format!(
                "{} class names given, the model scores {} classes",
                class_names.len(),
                layout.num_classes
            )));
        }
        let preprocess = layout.preprocess_spec();
        Ok(Detector {
            engine,
            layout,
            preprocess,
            class_names,
            params,
        })
    }

    /// The decoded layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The engine this detector runs on.
    pub fn engine(&self) -> &Arc<dyn Engine> {
        &self.engine
    }

    /// The input definition, shared with calibration.
    pub fn preprocess_spec(&self) -> &PreprocessSpec {
        &self.preprocess
    }

    /// Score and NMS settings.
    pub fn params(&self) -> &DetectionParams {
        &self.params
    }

    /// Name of a class index (`"?"` when out of range).
    pub fn class_name(&self, class_id: u32) -> &str {
        class_name(&self.class_names, class_id)
    }

    /// Every class name, by class index.
    pub fn class_names(&self) -> &[String] {
        &self.class_names
    }

    /// Which rows of the raw outputs a GPU may keep and bring back alone
    /// (see [`GatherPlan`]): those of the priors whose best class is above
    /// the score threshold. `None` for layouts that decode from more than
    /// those (legacy exports keep a top-k per level; per-level outputs).
    pub fn gather_plan(&self) -> Option<GatherPlan> {
        let OutputMap::Single {
            output,
            score_column,
            ..
        } = self.layout.outputs
        else {
            return None;
        };
        (!self.layout.kind.is_legacy()).then(|| GatherPlan {
            output,
            priors: self.layout.priors(),
            columns: self.layout.num_classes + self.layout.boxes.width(),
            score_first: score_column,
            classes: self.layout.num_classes,
            threshold: self.params.score_threshold,
        })
    }

    /// Raw outputs of one image → detections in image pixels, best
    /// first. `candidates` is scratch space.
    fn postprocess(
        &self,
        outputs: ImageOutputs<'_>,
        transform: &Transform,
        candidates: &mut Vec<Candidate>,
    ) -> Result<Vec<Detection>, DetectorError> {
        candidates.clear();
        let params = DecodeParams {
            score_threshold: self.params.score_threshold,
            top_k_per_level: Some(self.params.top_k_per_level),
        };
        match outputs {
            ImageOutputs::Whole(outputs) => self.layout.decode(&outputs, &params, candidates)?,
            ImageOutputs::Rows { priors, values, .. } => self
                .layout
                .decode_rows(priors, values, &params, candidates)?,
        }
        let kept = postprocess::class_aware_nms(
            candidates,
            &NmsParams {
                iou_threshold: self.params.iou_threshold,
                max_detections: self.params.max_detections,
            },
        );
        Ok(postprocess::to_image(&kept, transform))
    }

    /// A session for the calling thread: on the GPU where the engine runs
    /// there (the frame is preprocessed there too), on the host otherwise.
    pub fn session(self: &Arc<Self>) -> Result<DetectorSession, DetectorError> {
        if let Some(device) = DeviceRunner::open(self.engine.as_ref()) {
            let mut session = DetectorSession {
                runner: Runner::Device(device?),
                candidates: Vec::new(),
                detector: Arc::clone(self),
            };
            match session.decode_on_gpu(true) {
                Ok(true) => log::info!(
                    "decoding on the GPU: only rows scoring above {} come back to the host",
                    self.params.score_threshold
                ),
                Ok(false) => {
                    log::info!(
                        "decoding on the host: this engine or layout keeps no rows on the GPU"
                    )
                }
                // A session that cannot gather still detects: everything
                // comes back and the host decodes it, as before.
                Err(e) => log::warn!("decoding on the host: the GPU row gather failed: {e}"),
            }
            return Ok(session);
        }
        Ok(DetectorSession {
            runner: Runner::Host {
                session: self.engine.new_session()?,
                input: vec![0.0; self.preprocess.tensor_len()],
            },
            candidates: Vec::new(),
            detector: Arc::clone(self),
        })
    }
}

/// Where a session's tensors live.
enum Runner {
    /// Preprocessed into host memory, handed to the engine from there.
    Host {
        session: Box<dyn Session>,
        input: Vec<f32>,
    },
    /// On the GPU ([`device`]); never built without the `cuda` feature.
    Device(DeviceRunner),
}

/// Per-thread buffers for running a [`Detector`].
pub struct DetectorSession {
    detector: Arc<Detector>,
    runner: Runner,
    candidates: Vec<Candidate>,
}

impl DetectorSession {
    /// Runs the whole pipeline on one frame.
    pub fn detect(&mut self, frame: &Frame) -> Result<Vec<Detection>, DetectorError> {
        let transform = self.preprocess(frame)?;
        self.infer()?;
        self.postprocess(&transform)
    }

    /// On a GPU session, whether the device keeps only the rows that can
    /// yield a detection and the host decodes those
    /// ([`Detector::gather_plan`]), or everything comes back (`false`).
    /// Sessions start with it on. Answers whether rows are now gathered;
    /// on the host, and where the engine or layout cannot, never.
    pub fn decode_on_gpu(&mut self, on: bool) -> Result<bool, DetectorError> {
        let Runner::Device(device) = &mut self.runner else {
            return Ok(false);
        };
        let plan = if on {
            match self.detector.gather_plan() {
                Some(plan) => Some(plan),
                None => return Ok(false),
            }
        } else {
            None
        };
        let gathers = device.gather_rows(plan)?;
        Ok(on && gathers)
    }

    /// How many rows the GPU kept for image `slot` of the last run; `None`
    /// where the whole outputs came back (see
    /// [`decode_on_gpu`](Self::decode_on_gpu)).
    pub fn kept_rows(&self, slot: usize) -> Option<usize> {
        let outputs = match &self.runner {
            Runner::Host { session, .. } => session.outputs(),
            Runner::Device(device) => device.outputs(),
        };
        match outputs.image(slot)? {
            ImageOutputs::Rows { priors, .. } => Some(priors.len()),
            ImageOutputs::Whole(_) => None,
        }
    }

    /// Whether this session runs on the GPU.
    pub fn on_gpu(&self) -> bool {
        matches!(self.runner, Runner::Device(_))
    }

    /// The most images one [`infer_batch`](Self::infer_batch) takes: the
    /// device session's buffers on a GPU; on the host, where engines run a
    /// batch image by image, [`MAX_BATCH`].
    pub fn max_batch(&self) -> usize {
        match &self.runner {
            Runner::Host { .. } => self.detector.engine.max_batch().min(MAX_BATCH),
            Runner::Device(device) => device.max_images(),
        }
    }

    /// Stage 1: frame → input tensor; returns the way back.
    pub fn preprocess(&mut self, frame: &Frame) -> Result<Transform, DetectorError> {
        self.preprocess_into(0, frame)
    }

    /// Stage 1 into image `slot` of the next [`infer_batch`](Self::infer_batch).
    pub fn preprocess_into(
        &mut self,
        slot: usize,
        frame: &Frame,
    ) -> Result<Transform, DetectorError> {
        self.check_slot(slot)?;
        match &mut self.runner {
            Runner::Host { input, .. } => {
                let len = self.detector.preprocess.tensor_len();
                let end = (slot + 1) * len;
                if input.len() < end {
                    input.resize(end, 0.0);
                }
                Ok(preprocess::preprocess_into(
                    frame,
                    &self.detector.preprocess,
                    &mut input[slot * len..end],
                )?)
            }
            Runner::Device(device) => {
                device.preprocess_frame(slot, frame, &self.detector.preprocess)
            }
        }
    }

    /// Stage 1 from a camera's raw buffer: converted by the GPU's kernel
    /// where the session runs there (a lent USERPTR buffer uploaded as it
    /// is), on the host otherwise. A lent buffer must be kept until
    /// [`postprocess`](Self::postprocess) has returned: the upload reads it
    /// until then.
    pub fn preprocess_raw(
        &mut self,
        layout: crate::pixels::BufferLayout,
        bytes: &crate::buffer::RawBytes,
        origin: &str,
    ) -> Result<Transform, DetectorError> {
        self.preprocess_raw_into(0, layout, bytes, origin)
    }

    /// [`preprocess_raw`](Self::preprocess_raw) into image `slot`.
    pub fn preprocess_raw_into(
        &mut self,
        slot: usize,
        layout: crate::pixels::BufferLayout,
        bytes: &crate::buffer::RawBytes,
        origin: &str,
    ) -> Result<Transform, DetectorError> {
        self.check_slot(slot)?;
        match &mut self.runner {
            Runner::Host { .. } => {
                let frame = crate::pixels::to_frame(&layout, bytes, origin)?;
                self.preprocess_into(slot, &frame)
            }
            Runner::Device(device) => {
                device.preprocess_raw(slot, layout, bytes, origin, &self.detector.preprocess)
            }
        }
    }

    /// Queues the upload of a camera's lent buffer into upload slot
    /// `ahead` (below [`UPLOAD_SLOTS`](crate::preprocess::UPLOAD_SLOTS)),
    /// ahead of its run: on a GPU the copy overlaps the run before. `false`
    /// where nothing was queued (a host session, a copied buffer): such a
    /// frame is preprocessed as usual when its run comes. The caller keeps
    /// the buffer until that run's detections are back, or until
    /// [`wait_for_uploads`](Self::wait_for_uploads).
    pub fn upload_ahead(
        &mut self,
        ahead: usize,
        layout: crate::pixels::BufferLayout,
        bytes: &crate::buffer::RawBytes,
        origin: &str,
    ) -> Result<bool, DetectorError> {
        match &mut self.runner {
            Runner::Host { .. } => Ok(false),
            Runner::Device(device) => device.upload_ahead(ahead, layout, bytes, origin),
        }
    }

    /// Stage 1 on the frame in upload slot `ahead`, into image `slot` of
    /// the next [`infer_batch`](Self::infer_batch).
    pub fn preprocess_uploaded_into(
        &mut self,
        ahead: usize,
        slot: usize,
    ) -> Result<Transform, DetectorError> {
        self.check_slot(slot)?;
        match &mut self.runner {
            Runner::Host { .. } => {
                Err(BackendError::NotOnDevice(format!("upload slot {ahead}")).into())
            }
            Runner::Device(device) => {
                device.preprocess_uploaded(ahead, slot, &self.detector.preprocess)
            }
        }
    }

    /// A raw buffer converted on the host, then stage 1 as for a frame.
    #[cfg(feature = "cuda")]
    fn preprocess_converted(
        &mut self,
        layout: crate::pixels::BufferLayout,
        bytes: &[u8],
        origin: &str,
    ) -> Result<Transform, DetectorError> {
        let frame = crate::pixels::to_frame(&layout, bytes, origin)?;
        self.preprocess(&frame)
    }

    fn check_slot(&self, slot: usize) -> Result<(), DetectorError> {
        let max = self.max_batch();
        if slot >= max {
            return Err(BackendError::Input {
                images: slot + 1,
                values: 0,
                reason: format!("this session takes 1 to {max} images a run"),
            }
            .into());
        }
        Ok(())
    }

    /// Waits until nothing queued on the GPU reads a frame any more: for a
    /// batch none of whose frames ran, before their lent buffers go back.
    /// Nothing to wait for on the host.
    pub fn wait_for_uploads(&self) -> Result<(), DetectorError> {
        match &self.runner {
            Runner::Host { .. } => Ok(()),
            Runner::Device(device) => Ok(device.wait()?),
        }
    }

    /// Stage 2: input tensor → raw outputs.
    pub fn infer(&mut self) -> Result<(), DetectorError> {
        self.infer_batch(1)
    }

    /// Stage 2 for the first `images` slots, in one run.
    pub fn infer_batch(&mut self, images: usize) -> Result<(), DetectorError> {
        match &mut self.runner {
            Runner::Host { session, input } => {
                let len = self.detector.preprocess.tensor_len();
                let data =
                    input
                        .get(..images.saturating_mul(len))
                        .ok_or_else(|| BackendError::Input {
                            images,
                            values: input.len(),
                            reason: "fewer images were preprocessed".into(),
                        })?;
                Ok(session.run(InputBatch::host(data, images))?)
            }
            Runner::Device(device) => Ok(device.infer(images)?),
        }
    }

    /// Stage 3: raw outputs → detections in image pixels, best first.
    pub fn postprocess(&mut self, transform: &Transform) -> Result<Vec<Detection>, DetectorError> {
        self.postprocess_slot(0, transform)
    }

    /// Stage 3 for image `slot` of the last run.
    pub fn postprocess_slot(
        &mut self,
        slot: usize,
        transform: &Transform,
    ) -> Result<Vec<Detection>, DetectorError> {
        let outputs = match &self.runner {
            Runner::Host { session, .. } => session.outputs(),
            Runner::Device(device) => device.outputs(),
        };
        let Some(outputs) = outputs.image(slot) else {
            return Err(BackendError::Input {
                images: slot + 1,
                values: 0,
                reason: format!("the last run had {} images", outputs.images()),
            }
            .into());
        };
        self.detector
            .postprocess(outputs, transform, &mut self.candidates)
    }

    /// The detector this session runs.
    pub fn detector(&self) -> &Arc<Detector> {
        &self.detector
    }
}

/// The most images one run takes, on any backend: a host session's input
/// buffer grows to what a batch needs, up to this (128 × a 416² input:
/// 266 MB), and GPU engines are built for at most this many.
pub const MAX_BATCH: usize = 128;

/// Name of a class index in `names` (`"?"` when out of range).
pub fn class_name(names: &[String], class_id: u32) -> &str {
    names.get(class_id as usize).map_or("?", String::as_str)
}
