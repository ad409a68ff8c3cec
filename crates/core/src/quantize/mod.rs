//! INT8 post-training quantization: from an FP32 NanoDet ONNX and a set of
//! calibration images to an explicit Q/DQ ONNX that TensorRT 8.6, 10 and 11
//! build directly (TensorRT 10 deprecated, and 11 removed, the implicit
//! calibrator that would otherwise do this).
//!
//! The pipeline, top to bottom, in [`quantize`]:
//! calibration set → preprocess (the inference code path) → equalization →
//! FP32 run with every Conv input exposed → |x| histograms → thresholds →
//! opset 13 → trial models (automatic partial quantization, the threshold
//! choice) → one more FP32 run for adaptive rounding's and bias
//! correction's sums → Q/DQ pairs → metadata → rule check → bytes. The
//! passes over the images run on two threads: tract runs a model on one.

mod bias;
pub mod calibration;
pub mod equalize;
pub mod graph;
pub mod histogram;
pub mod qdq;
pub mod rounding;
pub mod rules;
pub mod sensitivity;
mod stats;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use prost::Message;
use sha2::{Digest, Sha256};
use tract_onnx::pb::{GraphProto, ModelProto, NodeProto, TensorProto};

pub use calibration::{CalibrationSet, FEW_IMAGES};
pub use histogram::{DEFAULT_BINS, Histogram, Method, scale, threshold, weight_scales};
pub use rules::{RuleSummary, check};
pub use stats::ProbeError;

use crate::errors::one_line;
use crate::frame::Frame;
use crate::model::Layout;
use crate::preprocess::{PreprocessSpec, preprocess_into};
use graph::{GraphError, set_metadata};
use qdq::conv_id;

/// The default: the 99.99th percentile of |x|. On the shared NanoDet-Plus
/// models it beat TensorRT-style entropy on every fidelity measure and on
/// mAP (docs/INT8.md).
pub const DEFAULT_METHOD: Method = Method::Percentile(99.99);

/// Changes whenever the same inputs would give a different model, so the
/// daemon's cache never serves a model made by older code.
pub const QUANTIZER_VERSION: u32 = 6;

/// Metadata keys the quantized model carries.
pub mod keys {
    /// entropy, percentile:P, mse or minmax.
    pub const METHOD: &str = "nanodetd.int8.method";
    /// Calibration images used.
    pub const IMAGES: &str = "nanodetd.int8.images";
    /// [`super::CalibrationSet::digest`].
    pub const SET_DIGEST: &str = "nanodetd.int8.calibration_sha256";
    /// SHA-256 of the FP32 source model file.
    pub const SOURCE_SHA256: &str = "nanodetd.int8.source_sha256";
    /// [`super::QUANTIZER_VERSION`].
    pub const VERSION: &str = "nanodetd.int8.quantizer_version";
    /// How many Convs had their bias corrected (absent: none were).
    pub const BIAS_CORRECTED: &str = "nanodetd.int8.bias_corrected";
    /// Adaptive rounding: the Convs rounded, the weights flipped and the
    /// local loss against rounding to nearest (absent: it was off).
    pub const ADAROUND: &str = "nanodetd.int8.adaround";
    /// Automatic partial quantization: the target and the measured SNR
    /// (absent: it was off).
    pub const AUTO_FLOAT: &str = "nanodetd.int8.auto_float";
    /// The threshold choice: the second method, and the tensors it was
    /// tried on and kept for (absent: it was off).
    pub const THRESHOLDS: &str = "nanodetd.int8.thresholds";
    /// The Convs' multiply-accumulates at batch 1 that run in INT8, then
    /// all of them: "int8/all" (absent where a Conv's size was unknown).
    pub const CONV_MACS: &str = "nanodetd.int8.conv_macs";
}

/// What the quantizer is asked to do.
#[derive(Debug, Clone, PartialEq)]
pub struct QuantizeOptions {
    /// How activation thresholds are chosen.
    pub method: Method,
    /// Use at most this many images, spread over the set.
    pub max_images: Option<usize>,
    /// Convs left in float: node names, glob patterns, `@first` (Convs
    /// reading the image) or `@last` (Convs whose output reaches a network
    /// output without another Conv).
    pub keep_float: Vec<String>,
    /// Equalize channel ranges in front of depthwise Convs (and after a
    /// stem's max pool) first
    /// ([`equalize`]): the same FP32 function, less INT8 error.
    pub equalize: bool,
    /// Take each quantized Conv's mean shift from weight rounding, measured
    /// on the calibration images, out of its bias (`bias.rs`).
    pub bias_correction: bool,
    /// Round each quantized Conv's weights down or up, whichever keeps its
    /// outputs on the calibration images closest to the float ones
    /// ([`rounding`]), rather than to nearest.
    pub adaround: bool,
    /// Automatic partial quantization ([`sensitivity`]): keep Convs in
    /// float, the most damaging inputs first, until the outputs on
    /// [`AUTO_FLOAT_IMAGES`] calibration images reach this SNR (dB)
    /// against FP32, with at most [`MAX_FLOAT_MACS`] of the Convs' MACs in
    /// float.
    pub auto_float_db: Option<f64>,
    /// Per tensor, the threshold of `method` or of [`second_method`],
    /// whichever does less damage to the outputs, measured on trial models
    /// as automatic partial quantization measures it ([`sensitivity`]):
    /// tried on the worst tensors that stay quantized.
    pub threshold_choice: bool,
}

/// The most of the Convs' MACs automatic partial quantization keeps in
/// float: issue 22 asks for at least 90 % in INT8, where TensorRT's
/// speed comes from.
pub const MAX_FLOAT_MACS: f64 = 0.10;

/// Calibration images bias correction measures its mean shifts on, spread
/// over the set (docs/INT8.md).
pub const BIAS_IMAGES: usize = 20;

/// Calibration images adaptive rounding takes its sums on, spread over the
/// set: a bound on its pass, which runs the FP32 model once more after the
/// trial models, for sets larger than the 80 images it was measured with.
/// On 40 of them its sums moved plus-m_320's drop by 0.71 points,
/// coco128's noise, with the same fidelity (docs/INT8.md). The sums take
/// at most 4,096 positions per Conv whatever the count.
pub const ROUNDING_IMAGES: usize = 80;

/// Calibration images automatic partial quantization runs its trial
/// models on, spread over the set: with 6, plus-m_416 quantizes in under
/// a minute on 2 cores (docs/INT8.md).
pub const AUTO_FLOAT_IMAGES: usize = 6;

/// The SNR target automatic partial quantization aims for by default. On
/// the shipped models the 10 % cap on float MACs binds first (docs/INT8.md),
/// so this asks for as much as the cap allows.
pub const DEFAULT_AUTO_FLOAT_DB: f64 = 30.0;

/// The defaults are the best measured combination (docs/INT8.md, issue
/// 22): percentile thresholds, equalization, automatic partial
/// quantization, the threshold choice, adaptive rounding and bias
/// correction.
impl Default for QuantizeOptions {
    fn default() -> Self {
        QuantizeOptions {
            method: DEFAULT_METHOD,
            max_images: None,
            keep_float: Vec::new(),
            equalize: true,
            bias_correction: true,
            adaround: true,
            auto_float_db: Some(DEFAULT_AUTO_FLOAT_DB),
            threshold_choice: true,
        }
    }
}

/// The method the threshold choice tries against `method`: `mse`, or the
/// default percentile where `method` is `mse`. On plus-m_320 mse's
/// thresholds run from 3.5 % below to 47 % above percentile's (above on 77
/// of 85 tensors), so the two differ in how much of the tail they clip
/// (docs/INT8.md).
pub fn second_method(method: Method) -> Method {
    if method == Method::Mse {
        DEFAULT_METHOD
    } else {
        Method::Mse
    }
}

/// The method as written on the command line and in metadata.
pub fn method_name(method: Method) -> String {
    match method {
        Method::Entropy => "entropy".into(),
        Method::MinMax => "minmax".into(),
        Method::Mse => "mse".into(),
        Method::Percentile(p) => format!("percentile:{p}"),
    }
}

/// A calibration method name that is none of the known ones.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown calibration method {0:?}; known: entropy, percentile, percentile:P (0 < P <= 100), mse, minmax"
)]
pub struct UnknownMethod(pub String);

/// Parses `entropy`, `minmax`, `percentile` (99.99) or `percentile:P`.
pub fn parse_method(s: &str) -> Result<Method, UnknownMethod> {
    match s {
        "entropy" => Ok(Method::Entropy),
        "minmax" => Ok(Method::MinMax),
        "mse" => Ok(Method::Mse),
        "percentile" => Ok(Method::Percentile(99.99)),
        other => match other.strip_prefix("percentile:").map(str::parse::<f64>) {
            Some(Ok(p)) if p > 0.0 && p <= 100.0 => Ok(Method::Percentile(p)),
            _ => Err(UnknownMethod(other.to_owned())),
        },
    }
}

/// What is wrong with the model to quantize.
#[derive(Debug, thiserror::Error)]
pub enum ModelProblem {
    /// The file could not be read.
    #[error("cannot read: {0}")]
    Read(#[source] std::io::Error),
    /// The bytes are not an ONNX ModelProto.
    #[error("not an ONNX model: {0}")]
    NotOnnx(#[source] prost::DecodeError),
    /// The model has no graph.
    #[error("no graph")]
    NoGraph,
    /// Nothing would be quantized.
    #[error("no Conv left to quantize (the graph has none, or keep_float names them all)")]
    NoConvLeft,
}

/// What is wrong with a calibration directory.
#[derive(Debug, thiserror::Error)]
pub enum CalibrationProblem {
    /// The directory could not be listed.
    #[error("cannot list: {0}")]
    List(#[source] std::io::Error),
    /// It holds no image.
    #[error("no calibration images ({}) in the directory", calibration::IMAGE_EXTENSIONS.join(", "))]
    NoImages,
    /// `--images 0` was asked.
    #[error("--images 0 leaves nothing to calibrate with")]
    ZeroImages,
    /// Every image failed to decode.
    #[error("none of its {images} images could be used (first: {first})")]
    NoneUsable {
        /// Images in the set.
        images: usize,
        /// The first one's error, on one line.
        first: String,
    },
}

/// Why quantization failed. Nothing is written when it does.
#[derive(Debug, thiserror::Error)]
pub enum QuantizeError {
    /// The source model cannot be read or is not usable.
    #[error("{path}: {problem}")]
    Model {
        /// The model file.
        path: PathBuf,
        /// What is wrong.
        #[source]
        problem: ModelProblem,
    },
    /// The calibration directory is missing, empty or all corrupt.
    #[error("calibration directory {dir}: {problem}")]
    Calibration {
        /// The directory.
        dir: PathBuf,
        /// What is wrong.
        #[source]
        problem: CalibrationProblem,
    },
    /// A calibration file could not be read at all.
    #[error("calibration image {path}: {source}")]
    Image {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A `keep_float` entry matches no Conv.
    #[error("keep_float entry {pattern:?} matches no Conv node (Convs are named like {example:?})")]
    KeepFloat {
        /// The entry.
        pattern: String,
        /// A Conv's name, to show the naming.
        example: String,
    },
    /// The FP32 model cannot be run for its statistics.
    #[error("{}", path.display())]
    Probe {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: ProbeError,
    },
    /// The graph could not be converted.
    #[error("{path}: {source}")]
    Graph {
        /// The model file.
        path: PathBuf,
        /// The conversion error.
        source: GraphError,
    },
    /// Automatic partial quantization could not measure the Convs.
    #[error("{}: automatic partial quantization", path.display())]
    Sensitivity {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: sensitivity::SensitivityError,
    },
    /// The result broke a TensorRT rule: a quantizer bug, never written.
    #[error("the quantized model breaks TensorRT's Q/DQ rules: {}", .0.join("; "))]
    Rules(Vec<String>),
}

/// What quantization did and measured.
#[derive(Debug, Clone)]
pub struct QuantizeReport {
    /// The method used.
    pub method: Method,
    /// Images that decoded and ran.
    pub images_used: usize,
    /// Images skipped, with the reason.
    pub images_skipped: Vec<(PathBuf, String)>,
    /// The calibration set's digest.
    pub set_digest: String,
    /// SHA-256 of the source model file.
    pub source_sha256: String,
    /// Conv inputs whose channels were equalized.
    pub equalized: usize,
    /// The rule checker's account of the result.
    pub rules: RuleSummary,
    /// Convs left in float.
    pub float_convs: Vec<String>,
    /// The Convs' multiply-accumulates at batch 1, in INT8 and in all;
    /// `None` where tract could not size a Conv's output.
    pub macs: Option<MacCount>,
    /// What automatic partial quantization chose and measured.
    pub auto_float: Option<AutoFloatReport>,
    /// What the threshold choice tried and changed, where it ran.
    pub threshold_choice: Option<ThresholdChoice>,
    /// What adaptive rounding changed, where it ran.
    pub adaround: Option<rounding::RoundingDone>,
    /// Seconds spent running the calibration images.
    pub statistics_seconds: f64,
    /// Seconds for the whole job.
    pub total_seconds: f64,
}

/// What automatic partial quantization chose and measured, on
/// [`AUTO_FLOAT_IMAGES`] calibration images.
#[derive(Debug, Clone, PartialEq)]
pub struct AutoFloatReport {
    /// The SNR asked for (dB).
    pub target_db: f64,
    /// The fully quantized model's SNR against FP32 (dB).
    pub all_int8_db: f64,
    /// The estimate for the chosen model (dB).
    pub estimated_db: f64,
    /// The chosen model's SNR, measured (dB), with the thresholds the
    /// threshold choice kept where it ran.
    pub measured_db: f64,
    /// The activation tensors whose Convs stay float, worst first.
    pub tensors: Vec<String>,
    /// Images the trial models ran.
    pub images: usize,
    /// Seconds the trial models took, the threshold choice's included.
    pub seconds: f64,
    /// Whether the trial models weighed class scores and boxes as two
    /// halves; false where the outputs did not fit the model's layout and
    /// every value counted the same.
    pub by_part: bool,
}

/// What the threshold choice tried and kept.
#[derive(Debug, Clone, PartialEq)]
pub struct ThresholdChoice {
    /// The method tried against the first.
    pub second: Method,
    /// The tensors tried at its threshold, the worst first.
    pub tried: Vec<String>,
    /// The tensors measured for this choice alone: their Convs by
    /// themselves pass automatic partial quantization's MAC cap, so they
    /// could never be floated.
    pub past_cap: Vec<String>,
    /// Those whose trial alone did less damage at it, the largest gain
    /// first.
    pub better_alone: Vec<String>,
    /// Those that keep it in the model: all of `better_alone` where
    /// switching them all measured no worse than switching none; else the
    /// best of its halving prefixes that measured no worse, or none.
    pub kept: Vec<String>,
    /// The SNR (dB) on the trial images against FP32 with the first
    /// method's thresholds, after automatic partial quantization's choice.
    pub before_db: f64,
    /// The same with every tensor of `better_alone` switched.
    pub switched_db: f64,
    /// The same with `kept` switched: the model's.
    pub kept_db: f64,
}

/// Multiply-accumulates of the model's Convs at batch 1: TensorRT's INT8
/// speed-up follows the share that runs in INT8.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MacCount {
    /// In the Convs that are quantized.
    pub int8: u64,
    /// In every Conv.
    pub all: u64,
}

impl MacCount {
    /// The INT8 share, 0 to 1 (1 for a model without Conv MACs).
    pub fn int8_fraction(&self) -> f64 {
        if self.all == 0 {
            1.0
        } else {
            self.int8 as f64 / self.all as f64
        }
    }
}

/// The multiply-accumulates of one Conv at batch 1: its weight's elements
/// (output channels × input channels per group × kernel) times its output
/// positions. `None` for a size that is not positive or overflows.
pub fn conv_macs(weight_dims: &[i64], output_shape: &[usize]) -> Option<u64> {
    let mut macs: u64 = 1;
    for &d in weight_dims {
        macs = macs.checked_mul(u64::try_from(d).ok().filter(|&d| d > 0)?)?;
    }
    for &d in output_shape.get(2..)? {
        macs = macs.checked_mul(u64::try_from(d).ok()?)?;
    }
    Some(macs)
}

/// A quantized model, not yet written anywhere.
#[derive(Debug, Clone)]
pub struct QuantizedModel {
    /// The serialized ONNX.
    pub bytes: Vec<u8>,
    /// What was done.
    pub report: QuantizeReport,
}

/// SHA-256 of a file's content, in hex.
pub fn file_sha256(path: &Path) -> std::io::Result<String> {
    calibration::hash_file(path).map(|(_, h)| calibration::hex(&h))
}

/// The cache key for quantizing `source_sha256` of `layout` with `set`
/// and `options`: everything that changes the output, and nothing that
/// does not.
pub fn cache_key(
    source_sha256: &str,
    layout: &Layout,
    set: &CalibrationSet,
    options: &QuantizeOptions,
) -> String {
    let mut h = Sha256::new();
    h.update(format!(
        "v{QUANTIZER_VERSION}\n{source_sha256}\n{}\n{}\n{:?}\n{:?}\n{}\n",
        set.digest,
        method_name(options.method),
        options.max_images,
        options.keep_float,
        options.equalize
    ));
    // Only when on, so models cached before the option keep their key.
    if options.bias_correction {
        h.update("bias_correction\n");
    }
    if options.adaround {
        h.update("adaround\n");
    }
    if let Some(db) = options.auto_float_db {
        h.update(format!("auto_float {db}\n"));
    }
    if options.threshold_choice {
        h.update("threshold_choice\n");
    }
    h.update(layout_key(layout));
    calibration::hex(&h.finalize())
}

/// What `layout` decides for the quantizer, in a fixed text: the
/// preprocessing, and which output values the trial models weigh as
/// class scores and which as box values. Two readings of a model that
/// agree on these (flags that restate the defaults, a class-name file of
/// the count the shapes tell) make the same model, and share its key.
fn layout_key(layout: &Layout) -> String {
    let spec = layout.preprocess_spec();
    let boxes = match layout.boxes {
        crate::model::BoxEncoding::Dfl { bins } => format!("dfl {bins}"),
        crate::model::BoxEncoding::Distances => "distances".to_owned(),
    };
    let outputs = match &layout.outputs {
        crate::model::OutputMap::Single {
            output,
            score_column,
            box_column,
        } => format!("single {output} {score_column} {box_column}"),
        crate::model::OutputMap::PerLevel { scores, boxes } => {
            format!("per-level {scores:?} {boxes:?}")
        }
    };
    let levels: Vec<String> = layout
        .levels
        .iter()
        .map(|l| format!("{}:{}x{}", l.stride, l.width, l.height))
        .collect();
    format!(
        "layout {}; {} classes, boxes {boxes}, outputs {outputs}, levels {}\n",
        spec.key_text(),
        layout.num_classes,
        levels.join(" "),
    )
}

/// The key of what TensorRT's legacy INT8 calibrator makes of the FP32
/// model `model_sha256` from `set` preprocessed by `spec`: its
/// calibration table (the ranges of that network's activations on those
/// inputs), and the plan built with it. The calibrator chooses the ranges
/// itself, so nothing of nanodetd's quantizer is in it.
pub fn calibrator_key(model_sha256: &str, set: &CalibrationSet, spec: &PreprocessSpec) -> String {
    let text = format!(
        "calibrator\n{model_sha256}\n{}\n{}\n",
        set.digest,
        spec.key_text()
    );
    calibration::hex(&Sha256::digest(text.as_bytes()))
}

/// The file TensorRT's legacy calibrator keeps its table in, for the model
/// `stem` and the plan key's `quantization`: named by the calibrator's key
/// ([`calibrator_key`]), so another model, image set or preprocessing never
/// reads it. `None` unless `quantization` is `calibrator:` and such a key:
/// a caller that forgot the key would otherwise share one table per model
/// name.
pub fn calibration_table_name(stem: &str, quantization: &str) -> Option<String> {
    let key = quantization.strip_prefix("calibrator:")?;
    let is_key = key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit());
    is_key.then(|| format!("{stem}.calibration-{}.table", &key[..16]))
}

/// Quantizes the FP32 model at `source`, of `layout`, with the images of
/// `set`, each preprocessed exactly as inference does. `progress` hears
/// `(images done, images total)`.
pub fn quantize(
    source: &Path,
    layout: &Layout,
    set: &CalibrationSet,
    options: &QuantizeOptions,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<QuantizedModel, QuantizeError> {
    let started = Instant::now();
    let model_error = |problem: ModelProblem| QuantizeError::Model {
        path: source.to_owned(),
        problem,
    };
    let probe_error = |source_error: ProbeError| QuantizeError::Probe {
        path: source.to_owned(),
        source: source_error,
    };
    let graph_error = |source_error: GraphError| QuantizeError::Graph {
        path: source.to_owned(),
        source: source_error,
    };
    let bytes = std::fs::read(source).map_err(|e| model_error(ModelProblem::Read(e)))?;
    let source_sha256 = calibration::hex(&Sha256::digest(&bytes));
    let mut model =
        ModelProto::decode(bytes.as_slice()).map_err(|e| model_error(ModelProblem::NotOnnx(e)))?;
    let graph = model
        .graph
        .as_ref()
        .ok_or_else(|| model_error(ModelProblem::NoGraph))?;

    // Which Convs to quantize, and which tensors feed them.
    let mut float_convs = resolve_keep_float(&model, &options.keep_float)?;
    let mut quantized = HashSet::new();
    let mut tensors: Vec<String> = Vec::new();
    for conv in graph.node.iter().filter(|n| n.op_type == "Conv") {
        let id = conv_id(conv).to_owned();
        if float_convs.contains(&id) {
            continue;
        }
        if let Some(activation) = conv.input.first()
            && !tensors.contains(activation)
        {
            tensors.push(activation.clone());
        }
        quantized.insert(id);
    }
    if quantized.is_empty() {
        return Err(model_error(ModelProblem::NoConvLeft));
    }

    // Equalization, measured on the images, then the statistics of the
    // equalized model: two passes over the set when there is anything to
    // equalize (decoding twice keeps memory flat for big sets).
    let stats_started = Instant::now();
    let spec = &layout.preprocess_spec();
    let size = (spec.width, spec.height);
    let chains = if options.equalize {
        equalize::find_chains(graph)
    } else {
        Vec::new()
    };
    // Bias correction measures the Conv inputs once more, as they are and
    // through their Q/DQ pairs, once their scales are known, on a spread
    // of the images: a mean over every output position of 20 images moves
    // the shifts little, and the pass costs a quarter.
    let bias_files = if options.bias_correction {
        calibration::spread(&set.files, BIAS_IMAGES)
    } else {
        Vec::new()
    };
    // After the trials, one pass over the images adaptive rounding or bias
    // correction measure on, in the set's order.
    let rounding_files = if options.adaround {
        calibration::spread(&set.files, ROUNDING_IMAGES)
    } else {
        Vec::new()
    };
    let after_trials: Vec<PathBuf> = set
        .files
        .iter()
        .filter(|f| rounding_files.contains(f) || bias_files.contains(f))
        .cloned()
        .collect();
    // Statistics, and equalization's ranges before them.
    let passes = 1 + usize::from(!chains.is_empty());
    let total = passes * set.files.len() + after_trials.len();
    let mut done = 0;
    let mut next_image = || {
        done += 1;
        progress(done, total);
    };
    let mut equalized = 0;
    if !chains.is_empty() {
        let watched: Vec<String> = chains.iter().map(|c| c.tensor.clone()).collect();
        let probe = stats::ActivationProbe::new(&bytes, size, &watched).map_err(probe_error)?;
        // The ranges are maxima, so the halves merge into exactly what one
        // pass gives. Images skipped here are reported by the next pass.
        let ([mut ranges, their_ranges], _) = fold_on_two_threads(
            &set.files,
            spec,
            &mut next_image,
            [(), ()].map(|_| chains.iter().map(|c| vec![0.0; c.channels]).collect()),
            &|ranges: &mut Vec<Vec<f32>>, _, input| {
                probe
                    .run(input, &mut |i, _, values| {
                        equalize::fold_channel_ranges(&mut ranges[i], values)
                    })
                    .map_err(|e| one_line(&e))
            },
        );
        for (mine, theirs) in ranges.iter_mut().zip(&their_ranges) {
            for (m, t) in mine.iter_mut().zip(theirs) {
                *m = m.max(*t);
            }
        }
        let graph = graph::graph_mut(&mut model).map_err(graph_error)?;
        for (chain, ranges) in chains.iter().zip(&ranges) {
            if let Some(scales) =
                equalize::chain_scales(graph, chain, ranges).map_err(graph_error)?
            {
                equalize::apply(graph, chain, &scales).map_err(graph_error)?;
                equalized += 1;
            }
        }
    }
    let equalized_bytes = if equalized == 0 {
        bytes
    } else {
        model.encode_to_vec()
    };
    let probe =
        stats::ActivationProbe::new(&equalized_bytes, size, &tensors).map_err(probe_error)?;
    let mut histograms = vec![Histogram::default(); tensors.len()];
    // On two threads, as equalization's pass. The images up to the one by
    // which every histogram has its bins run here (the first image, unless
    // a tensor is all zeros on it), and both halves of the rest start from
    // those bins, so that they merge into the histograms one pass would give
    // ([`Histogram::merge`]): the same thresholds, in half the time.
    let add = |histograms: &mut Vec<Histogram>, _: &Path, input: &[f32]| {
        probe
            .run(input, &mut |i, _, values| histograms[i].add(values))
            .map_err(|e| one_line(&e))
    };
    let mut skipped = Vec::new();
    let mut rest: &[PathBuf] = &[];
    for (k, file) in set.files.iter().enumerate() {
        let first = std::slice::from_ref(file);
        let failed = each_input(first, spec, &mut next_image, &mut |file, input| {
            add(&mut histograms, file, input)
        });
        skipped.extend(failed);
        if histograms.iter().all(|h| !h.counts().is_empty()) {
            rest = set.files.get(k + 1..).unwrap_or(&[]);
            break;
        }
    }
    let emptied = histograms.iter().map(Histogram::emptied).collect();
    let ([mine, theirs], failed) =
        fold_on_two_threads(rest, spec, &mut next_image, [histograms, emptied], &add);
    histograms = mine;
    for (mine, theirs) in histograms.iter_mut().zip(&theirs) {
        mine.merge(theirs);
    }
    skipped.extend(failed);
    for (file, reason) in &skipped {
        log::warn!("calibration image {} skipped: {reason}", file.display());
    }
    let used = set.files.len() - skipped.len();
    if used == 0 {
        let first = skipped.first().map(|(_, r)| r.as_str()).unwrap_or("");
        return Err(QuantizeError::Calibration {
            dir: set.dir.clone(),
            problem: CalibrationProblem::NoneUsable {
                images: set.files.len(),
                first: first.to_owned(),
            },
        });
    }
    if used < FEW_IMAGES {
        log::warn!(
            "calibrating with only {used} images from {}; {FEW_IMAGES} or more give steadier ranges",
            set.dir.display()
        );
    }
    let ranks = probe.ranks().clone();
    // The pass after the trials makes its own: this one's plan and buffers
    // would stay resident through automatic partial quantization's trial
    // models.
    drop(probe);
    let statistics_seconds = stats_started.elapsed().as_secs_f64();
    let conv_macs = match stats::tensor_shapes(&equalized_bytes, size) {
        Ok(shapes) => macs_by_conv(&model, &shapes),
        Err(e) => {
            log::warn!("the Convs' MACs are not counted: {}", one_line(&e));
            None
        }
    };
    let mut scales: HashMap<String, f32> = tensors
        .iter()
        .zip(&histograms)
        .map(|(name, hist)| (name.clone(), scale(threshold(hist, options.method))))
        .collect();
    graph::upgrade_to_qdq_opset(&mut model, &|t| ranks.get(t).copied()).map_err(graph_error)?;

    let (auto_float, threshold_choice) =
        if options.auto_float_db.is_none() && !options.threshold_choice {
            (None, None)
        } else {
            let sensitivity_error = |e| QuantizeError::Sensitivity {
                path: source.to_owned(),
                source: e,
            };
            let auto_float = match (options.auto_float_db, &conv_macs) {
                (None, _) => None,
                (Some(target_db), Some(conv_macs)) => Some((target_db, conv_macs)),
                (Some(_), None) => {
                    return Err(sensitivity_error(
                        sensitivity::SensitivityError::UnknownMacs,
                    ));
                }
            };
            let outcome = choose_by_trials(
                &model,
                TrialJob {
                    set,
                    spec,
                    layout,
                    size,
                    tensors: &tensors,
                    histograms: &histograms,
                    auto_float,
                    second: options
                        .threshold_choice
                        .then(|| second_method(options.method)),
                },
                &mut quantized,
                &mut scales,
            )
            .map_err(sensitivity_error)?;
            // Their own weights and biases: the sums after the trials are
            // taken only for what stays quantized.
            for conv in &outcome.float_convs {
                float_convs.insert(conv.clone());
            }
            (outcome.auto_float, outcome.thresholds)
        };
    let macs = conv_macs.as_ref().and_then(|m| count_macs(m, &quantized));

    // One more pass once every scale and float Conv is settled: adaptive
    // rounding's sums on its spread of the images (their loss reads each
    // input through its Q/DQ pair), bias correction's means on its own. The
    // rounding goes first, since bias correction takes the shifts of the
    // weights as rounded.
    let mut moments = if options.adaround {
        rounding_moments(&model, &quantized, &tensors, rounding_files.len()).map_err(graph_error)?
    } else {
        Vec::new()
    };
    // Each quantized Conv's mean input patch, from the tensor it reads.
    let mut patches = if options.bias_correction {
        bias_patches(&model, &quantized, &tensors)
    } else {
        Vec::new()
    };
    if !after_trials.is_empty() {
        let for_bias: HashSet<&Path> = bias_files.iter().map(PathBuf::as_path).collect();
        let for_rounding: HashSet<&Path> = rounding_files.iter().map(PathBuf::as_path).collect();
        let probe =
            stats::ActivationProbe::new(&equalized_bytes, size, &tensors).map_err(probe_error)?;
        let skipped = each_input(&after_trials, spec, &mut next_image, &mut |file, input| {
            let probed = probe.outputs(input).map_err(|e| one_line(&e))?;
            // Every tensor read before any sum takes the image, so that an
            // image skipped adds to none.
            for (t, _) in &moments {
                probed.get(*t).map_err(|e| one_line(&e))?;
            }
            for (t, _) in &patches {
                probed.get(*t).map_err(|e| one_line(&e))?;
            }
            // Every Conv's sums this image adds to, dealt to two threads
            // in turn. Each Conv's sums take the images in order, as on one
            // thread, so they are the same to the bit.
            let rounding = for_rounding.contains(file);
            let bias = for_bias.contains(file);
            let work = moments
                .iter_mut()
                .filter(|_| rounding)
                .map(|(t, m)| (*t, ConvSums::Rounding(m)))
                .chain(
                    patches
                        .iter_mut()
                        .filter(|_| bias)
                        .map(|(t, p)| (*t, ConvSums::Bias(p))),
                );
            let (mine, theirs): (Vec<_>, Vec<_>) =
                work.enumerate().partition(|(k, _)| k.is_multiple_of(2));
            let scale = |i: usize| tensors.get(i).and_then(|t| scales.get(t)).copied();
            std::thread::scope(|s| {
                let other = s.spawn(|| add_conv_sums(theirs, &probed, &scale));
                let mine = add_conv_sums(mine, &probed, &scale);
                let theirs = other
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                mine.and(theirs)
            })
            .map_err(|e| one_line(&e))
        });
        for (file, reason) in &skipped {
            log::warn!(
                "calibration image {} skipped on the pass after the trials: {reason}",
                file.display()
            );
        }
    }
    let adaround = if options.adaround {
        let planned = rounding::plan(moments.into_iter().map(|(_, m)| m).collect());
        let done = rounding::apply(graph::graph_mut(&mut model).map_err(graph_error)?, &planned);
        log::info!(
            "adaptive rounding: {} of {} quantized Convs, {} weights rounded the other way, local loss {:.1} % of rounding to nearest",
            done.convs,
            quantized.len(),
            done.flipped,
            100.0 * done.loss / done.nearest_loss.max(f64::MIN_POSITIVE)
        );
        Some(done)
    } else {
        None
    };
    let mut bias_corrected = 0;
    if options.bias_correction {
        let patches: Vec<bias::PatchMeans> = patches.into_iter().map(|(_, p)| p).collect();
        let graph = graph::graph_mut(&mut model).map_err(graph_error)?;
        let corrected = bias::correct(graph, &patches).map_err(graph_error)?;
        bias_corrected = corrected.convs;
        log::info!(
            "bias correction: {} of {} Convs, the largest shift {:.4}",
            corrected.convs,
            patches.len(),
            corrected.largest_shift
        );
    }

    // The pairs.
    qdq::insert_qdq(&mut model, &quantized, &|t| scales.get(t).copied()).map_err(graph_error)?;
    let mut float_list: Vec<String> = float_convs.into_iter().collect();
    float_list.sort();
    set_metadata(&mut model, keys::METHOD, method_name(options.method));
    set_metadata(&mut model, keys::IMAGES, used.to_string());
    set_metadata(&mut model, keys::SET_DIGEST, set.digest.clone());
    set_metadata(&mut model, keys::SOURCE_SHA256, source_sha256.clone());
    set_metadata(&mut model, keys::VERSION, QUANTIZER_VERSION.to_string());
    set_metadata(&mut model, rules::FLOAT_CONVS_KEY, float_list.join(","));
    if options.bias_correction {
        set_metadata(&mut model, keys::BIAS_CORRECTED, bias_corrected.to_string());
    }
    if let Some(done) = &adaround {
        set_metadata(
            &mut model,
            keys::ADAROUND,
            format!(
                "{} Convs, {} weights rounded the other way, local loss {:.1} % of rounding to nearest",
                done.convs,
                done.flipped,
                100.0 * done.loss / done.nearest_loss.max(f64::MIN_POSITIVE)
            ),
        );
    }
    if let Some(t) = &threshold_choice {
        set_metadata(
            &mut model,
            keys::THRESHOLDS,
            format!(
                "{} on {} of {} tensors tried ({} better alone; {:.1} dB with all of them, {:.1} dB with none, {:.1} dB as kept){}{}",
                method_name(t.second),
                t.kept.len(),
                t.tried.len(),
                t.better_alone.len(),
                t.switched_db,
                t.before_db,
                t.kept_db,
                if t.kept.is_empty() { "" } else { ": " },
                t.kept.join(",")
            ),
        );
    }
    if let Some(m) = macs {
        set_metadata(&mut model, keys::CONV_MACS, format!("{}/{}", m.int8, m.all));
    }
    if let Some(a) = &auto_float {
        set_metadata(
            &mut model,
            keys::AUTO_FLOAT,
            format!(
                "target {:.1} dB, measured {:.1} dB (all INT8: {:.1} dB) on {} images{}",
                a.target_db,
                a.measured_db,
                a.all_int8_db,
                a.images,
                if options.bias_correction {
                    ", before bias correction"
                } else {
                    ""
                }
            ),
        );
    }
    model.producer_name = "nanodetd".into();
    model.producer_version = env!("CARGO_PKG_VERSION").into();
    let rules = check(&model).map_err(QuantizeError::Rules)?;
    Ok(QuantizedModel {
        bytes: model.encode_to_vec(),
        report: QuantizeReport {
            method: options.method,
            images_used: used,
            images_skipped: skipped,
            equalized,
            set_digest: set.digest.clone(),
            source_sha256,
            rules,
            float_convs: float_list,
            macs,
            auto_float,
            threshold_choice,
            adaround,
            statistics_seconds,
            total_seconds: started.elapsed().as_secs_f64(),
        },
    })
}

/// A Conv's sums that the pass after the trials adds an image to.
enum ConvSums<'s> {
    /// Adaptive rounding's.
    Rounding(&'s mut rounding::PatchMoments),
    /// Bias correction's.
    Bias(&'s mut bias::PatchMeans),
}

/// Adds one image to each of `work`'s sums, `(_, (tensor, sums))`, from the
/// tensor of that index in `probed`, and from the same through its Q/DQ
/// pair at `scale`. A tensor without a scale adds nothing.
fn add_conv_sums(
    work: Vec<(usize, (usize, ConvSums<'_>))>,
    probed: &stats::Probed<'_>,
    scale: &(dyn Fn(usize) -> Option<f32> + Sync),
) -> Result<(), stats::ProbeError> {
    let mut through = Vec::new();
    let mut through_of = None;
    for (_, (tensor, sums)) in work {
        let Some(scale) = scale(tensor) else {
            continue;
        };
        let (shape, values) = probed.get(tensor)?;
        // Convs reading one tensor that come one after another here share
        // its values through the pair.
        if through_of != Some(tensor) {
            bias::through_qdq(values, scale, &mut through);
            through_of = Some(tensor);
        }
        match sums {
            ConvSums::Rounding(m) => {
                m.add(shape, values, &through);
            }
            ConvSums::Bias(p) => {
                p.add(shape, values);
                p.add_quantized(shape, &through);
            }
        }
    }
    Ok(())
}

/// The Convs in `quantized` that read one of `tensors` and whose weight
/// is an initializer: each with its id, its input's index in `tensors`
/// and its weight, in graph order.
fn quantized_conv_inputs<'g>(
    graph: &'g GraphProto,
    quantized: &HashSet<String>,
    tensors: &[String],
) -> Vec<(&'g NodeProto, &'g str, usize, &'g TensorProto)> {
    let init = graph::initializers(graph);
    let mut convs = Vec::new();
    for conv in graph.node.iter().filter(|n| n.op_type == "Conv") {
        let id = conv_id(conv);
        let input = conv
            .input
            .first()
            .and_then(|i| tensors.iter().position(|t| t == i));
        let weight = conv.input.get(1).and_then(|w| init.get(w.as_str()));
        if let (true, Some(input), Some(weight)) = (quantized.contains(id), input, weight) {
            convs.push((conv, id, input, *weight));
        }
    }
    convs
}

/// Bias correction's sums (`bias.rs`) for every Conv in `quantized` it can
/// correct, each with the index in `tensors` of the input it reads.
fn bias_patches(
    model: &ModelProto,
    quantized: &HashSet<String>,
    tensors: &[String],
) -> Vec<(usize, bias::PatchMeans)> {
    let Some(graph) = model.graph.as_ref() else {
        return Vec::new();
    };
    quantized_conv_inputs(graph, quantized, tensors)
        .into_iter()
        .filter_map(|(conv, id, input, weight)| {
            Some((input, bias::PatchMeans::new(conv, id, &weight.dims)?))
        })
        .collect()
}

/// Adaptive rounding's sums (`rounding.rs`) for every Conv in `quantized`
/// it can round, each with the index in `tensors` of the input it reads,
/// over `images` images. A Conv it cannot round keeps rounding to nearest,
/// with a warning where that is not plain from its shape.
fn rounding_moments(
    model: &ModelProto,
    quantized: &HashSet<String>,
    tensors: &[String],
    images: usize,
) -> Result<Vec<(usize, rounding::PatchMoments)>, GraphError> {
    let Some(graph) = model.graph.as_ref() else {
        return Ok(Vec::new());
    };
    let mut budget = rounding::MAX_MOMENT_VALUES;
    let mut moments = Vec::new();
    for (conv, id, input, weight) in quantized_conv_inputs(graph, quantized, tensors) {
        let Some(geometry) = bias::ConvGeometry::new(conv, id, &weight.dims) else {
            continue;
        };
        match rounding::PatchMoments::of_conv(graph, geometry, images, &mut budget)? {
            Ok(m) => moments.push((input, m)),
            Err(why) => log::warn!("adaptive rounding: Conv {id} keeps rounding to nearest: {why}"),
        }
    }
    log::debug!(
        "adaptive rounding: {} moment values for {} Convs",
        rounding::MAX_MOMENT_VALUES - budget,
        moments.len()
    );
    Ok(moments)
}

/// Every Conv's multiply-accumulates by [`conv_id`], from its weight and
/// the output shape tract inferred; `None` if any Conv cannot be sized.
fn macs_by_conv(
    model: &ModelProto,
    shapes: &HashMap<String, Vec<usize>>,
) -> Option<HashMap<String, u64>> {
    let graph = model.graph.as_ref()?;
    let init = graph::initializers(graph);
    let mut macs = HashMap::new();
    for conv in graph.node.iter().filter(|n| n.op_type == "Conv") {
        let weight = init.get(conv.input.get(1)?.as_str())?;
        let output = shapes.get(conv.output.first()?)?;
        macs.insert(conv_id(conv).to_owned(), conv_macs(&weight.dims, output)?);
    }
    Some(macs)
}

/// The MACs of all Convs and of the `quantized` ones.
fn count_macs(by_conv: &HashMap<String, u64>, quantized: &HashSet<String>) -> Option<MacCount> {
    let mut count = MacCount { int8: 0, all: 0 };
    for (conv, &macs) in by_conv {
        count.all = count.all.checked_add(macs)?;
        if quantized.contains(conv) {
            count.int8 = count.int8.checked_add(macs)?;
        }
    }
    Some(count)
}

/// What [`choose_by_trials`] works from.
struct TrialJob<'a> {
    set: &'a CalibrationSet,
    spec: &'a PreprocessSpec,
    layout: &'a Layout,
    size: (usize, usize),
    /// The quantized activation tensors.
    tensors: &'a [String],
    /// Their histograms, in the same order.
    histograms: &'a [Histogram],
    /// Automatic partial quantization's SNR target and every Conv's MACs
    /// (`None`: off).
    auto_float: Option<(f64, &'a HashMap<String, u64>)>,
    /// The threshold choice's second method (`None`: off).
    second: Option<Method>,
}

/// What [`choose_by_trials`] chose.
struct TrialOutcome {
    auto_float: Option<AutoFloatReport>,
    /// The Convs automatic partial quantization keeps in float.
    float_convs: Vec<String>,
    thresholds: Option<ThresholdChoice>,
}

/// Measures each quantized tensor's damage on trial models of `model`
/// (the FP32 graph at the Q/DQ opset), then, as `job` asks: chooses the
/// Convs to keep in float and takes them out of `quantized`; tries the
/// second method's threshold on the worst tensors still quantized and
/// puts the scales that did less damage into `scales`.
fn choose_by_trials(
    model: &ModelProto,
    job: TrialJob<'_>,
    quantized: &mut HashSet<String>,
    scales: &mut HashMap<String, f32>,
) -> Result<TrialOutcome, sensitivity::SensitivityError> {
    let started = Instant::now();
    let files = calibration::spread(&job.set.files, AUTO_FLOAT_IMAGES);
    let mut inputs = Vec::with_capacity(files.len());
    for file in &files {
        let mut input = vec![0.0f32; job.spec.tensor_len()];
        let made = Frame::from_file(file)
            .map_err(|e| e.to_string())
            .and_then(|f| preprocess_into(&f, job.spec, &mut input).map_err(|e| e.to_string()));
        match made {
            Ok(_) => inputs.push(input),
            Err(reason) => log::warn!(
                "trial models: calibration image {} skipped: {reason}",
                file.display()
            ),
        }
    }
    let images = inputs.len();
    let trials = sensitivity::Trials::new(model, job.size, inputs, job.layout)?;
    let graph_nodes = model
        .graph
        .as_ref()
        .map(|g| g.node.as_slice())
        .unwrap_or(&[]);
    let mut candidates: Vec<sensitivity::Candidate> = job
        .tensors
        .iter()
        .map(|tensor| {
            let convs: Vec<String> = graph_nodes
                .iter()
                .filter(|n| n.op_type == "Conv" && n.input.first() == Some(tensor))
                .map(|n| conv_id(n).to_owned())
                .filter(|id| quantized.contains(id))
                .collect();
            let macs = job.auto_float.map_or(0, |(_, conv_macs)| {
                convs
                    .iter()
                    .filter_map(|c| conv_macs.get(c))
                    .fold(0u64, |m, &c| m.saturating_add(c))
            });
            sensitivity::Candidate {
                tensor: tensor.clone(),
                convs,
                macs,
                noise: 0.0,
            }
        })
        .collect();
    candidates.retain(|c| !c.convs.is_empty());
    let cap = job.auto_float.map(|(_, conv_macs)| {
        let all: u64 = conv_macs.values().fold(0, |m, &c| m.saturating_add(c));
        // Within the cap, counting what keep_float already holds.
        let already: u64 = conv_macs
            .iter()
            .filter(|(c, _)| !quantized.contains(*c))
            .fold(0, |m, (_, &c)| m.saturating_add(c));
        ((all as f64 * MAX_FLOAT_MACS) as u64).saturating_sub(already)
    });
    let past_cap: Vec<String> = candidates
        .iter()
        .filter(|c| cap.is_some_and(|cap| c.macs > cap))
        .map(|c| c.tensor.clone())
        .collect();
    if job.second.is_none() {
        // One that alone passes the cap could never be chosen (`choose`
        // skips it), and without the threshold choice nothing else needs
        // its damage.
        candidates.retain(|c| !past_cap.contains(&c.tensor));
    }
    let first: HashMap<String, f32> = scales.clone();
    let first_scale = |t: &str| first.get(t).copied();
    sensitivity::measure(&trials, &mut candidates, &first_scale)?;
    let signal = trials.signal();
    let all_noise = trials.noise(quantized, &first_scale)?;

    let mut float_choice = None;
    if let (Some((target_db, _)), Some(cap)) = (job.auto_float, cap) {
        let choice = sensitivity::choose(&candidates, signal, all_noise, target_db, cap);
        for conv in &choice.convs {
            quantized.remove(conv);
        }
        float_choice = Some((target_db, choice));
    }

    // After the float choice, so that no trial goes to a tensor that is no
    // longer quantized.
    let thresholds = match job.second {
        None => None,
        Some(second) => {
            // mse's search is costly (about 2,000 candidate thresholds per
            // tensor): only for the tensors in the running.
            let mut seconds = HashMap::new();
            let mut tried = sensitivity::threshold_trials(
                &candidates,
                quantized,
                &first_scale,
                &mut |t: &str| {
                    let i = job.tensors.iter().position(|name| name == t)?;
                    let hist = job.histograms.get(i)?;
                    let s = scale(threshold(hist, second));
                    seconds.insert(t.to_owned(), s);
                    Some(s)
                },
            );
            let second_scale = |t: &str| seconds.get(t).copied();
            let tried_convs: Vec<HashSet<String>> = tried
                .iter()
                .map(|c| c.convs.iter().cloned().collect())
                .collect();
            let mut jobs: Vec<sensitivity::Trial<'_>> = tried_convs
                .iter()
                .map(|c| (c, &second_scale as _))
                .collect();
            // The model as automatic partial quantization left it, with the
            // first thresholds: measured already where it floated nothing,
            // else in the same batch.
            let floated = float_choice
                .as_ref()
                .is_some_and(|(_, c)| !c.convs.is_empty());
            if floated {
                jobs.push((quantized, &first_scale));
            }
            let mut noise = sensitivity::measure_all(&trials, &jobs)?;
            let before = if floated {
                // One noise per job, so never empty.
                noise.pop().ok_or(sensitivity::SensitivityError::Worker)?
            } else {
                all_noise
            };
            for (c, n) in tried.iter_mut().zip(noise) {
                c.noise = n;
            }
            let better_alone = sensitivity::better_at_second(&candidates, &tried);
            // The scales with the first `k` of `better_alone` switched.
            let switched_first = |k: usize| {
                let mut switched = scales.clone();
                for t in better_alone.iter().take(k) {
                    if let Some(&s) = seconds.get(t) {
                        switched.insert(t.clone(), s);
                    }
                }
                switched
            };
            let all = better_alone.len();
            let switched_noise = if all == 0 {
                before
            } else {
                let switched = switched_first(all);
                trials.noise(quantized, &|t| switched.get(t).copied())?
            };
            // Each tensor's damage was measured alone; together they need
            // not add up (on m-0.5x the switched model measured 1.9 dB
            // worse), so the whole model decides. Where all of them hurt,
            // the prefixes of halving length (the largest gains alone
            // first) are measured in one batch, and the best that does no
            // harm is kept.
            let (kept, kept_noise) = if switched_noise <= before {
                (all, switched_noise)
            } else {
                let lengths = sensitivity::halvings(all);
                let prefixes: Vec<HashMap<String, f32>> =
                    lengths.iter().map(|&k| switched_first(k)).collect();
                let lookups: Vec<_> = prefixes
                    .iter()
                    .map(|p| move |t: &str| p.get(t).copied())
                    .collect();
                let jobs: Vec<sensitivity::Trial<'_>> = lookups
                    .iter()
                    .map(|lookup| (&*quantized, lookup as _))
                    .collect();
                let noise = sensitivity::measure_all(&trials, &jobs)?;
                for (k, n) in lengths.iter().zip(&noise) {
                    log::info!(
                        "threshold choice: the first {k} of {all} switched: {:.1} dB",
                        sensitivity::db(signal, *n)
                    );
                }
                let measured: Vec<(usize, f64)> = lengths.into_iter().zip(noise).collect();
                sensitivity::best_prefix(before, &measured)
            };
            *scales = switched_first(kept);
            let choice = ThresholdChoice {
                second,
                tried: tried.iter().map(|c| c.tensor.clone()).collect(),
                past_cap,
                kept: better_alone.iter().take(kept).cloned().collect(),
                better_alone,
                before_db: sensitivity::db(signal, before),
                switched_db: sensitivity::db(signal, switched_noise),
                kept_db: sensitivity::db(signal, kept_noise),
            };
            log::debug!(
                "threshold choice: tried {:?}; past the MAC cap {:?}",
                choice.tried,
                choice.past_cap
            );
            log::info!(
                "threshold choice: {} of {} tensors tried did less damage alone at {}'s threshold; all of them switched: {:.1} dB against {:.1} dB with none; {} kept: {:.1} dB",
                choice.better_alone.len(),
                choice.tried.len(),
                method_name(second),
                choice.switched_db,
                choice.before_db,
                choice.kept.len(),
                choice.kept_db,
            );
            Some((choice, kept_noise))
        }
    };
    let (thresholds, measured) = match thresholds {
        Some((choice, noise)) => (Some(choice), noise),
        None => (None, trials.noise(quantized, &first_scale)?),
    };
    let (auto_float, float_convs) = match float_choice {
        None => (None, Vec::new()),
        Some((target_db, choice)) => (
            Some(AutoFloatReport {
                target_db,
                all_int8_db: sensitivity::db(signal, all_noise),
                estimated_db: choice.estimated_db,
                measured_db: sensitivity::db(signal, measured),
                tensors: choice.tensors,
                images,
                seconds: started.elapsed().as_secs_f64(),
                by_part: trials.by_part(),
            }),
            choice.convs,
        ),
    };
    match &auto_float {
        Some(report) => log::info!(
            "automatic partial quantization: {} tensors' Convs in float ({}), {:.1} dB all INT8, {:.1} dB estimated, {:.1} dB measured{}, target {:.1} dB, {:.1} s",
            report.tensors.len(),
            report.tensors.join(", "),
            report.all_int8_db,
            report.estimated_db,
            report.measured_db,
            if thresholds.is_some() {
                " with the thresholds chosen"
            } else {
                ""
            },
            report.target_db,
            report.seconds
        ),
        None => log::info!(
            "trial models: {:.1} dB with the first thresholds, {:.1} dB with those chosen, {:.1} s",
            sensitivity::db(signal, all_noise),
            sensitivity::db(signal, measured),
            started.elapsed().as_secs_f64()
        ),
    }
    Ok(TrialOutcome {
        auto_float,
        float_convs,
        thresholds,
    })
}

/// Progress for logs that are not a terminal: one info line per tenth of
/// the way, never a line per image.
#[derive(Debug)]
pub struct TenthsLog {
    what: &'static str,
    next_tenth: usize,
}

impl TenthsLog {
    /// Lines read "`what`: done/total".
    pub fn new(what: &'static str) -> TenthsLog {
        TenthsLog {
            what,
            next_tenth: 1,
        }
    }

    /// Logs if `done` reached the next tenth of `total`.
    pub fn update(&mut self, done: usize, total: usize) {
        if done * 10 >= self.next_tenth * total {
            log::info!("{}: {done}/{total}", self.what);
            self.next_tenth = done * 10 / total.max(1) + 1;
        }
    }
}

/// What a pass does with an image: its file and its preprocessed input.
type PerImage<'a> = dyn FnMut(&Path, &[f32]) -> Result<(), String> + 'a;

/// [`PerImage`] on one of two threads, into that thread's state.
type FoldImage<'a, S> = dyn Fn(&mut S, &Path, &[f32]) -> Result<(), String> + Sync + 'a;

/// Decodes and preprocesses every image of `set` and hands it to `run`;
/// returns the images that could not be used, with the reason.
fn each_input(
    files: &[PathBuf],
    spec: &PreprocessSpec,
    next_image: &mut dyn FnMut(),
    run: &mut PerImage<'_>,
) -> Vec<(PathBuf, String)> {
    let mut input = vec![0.0f32; spec.tensor_len()];
    let mut skipped = Vec::new();
    for file in files {
        let ran = Frame::from_file(file)
            .map_err(|e| e.to_string())
            .and_then(|frame| preprocess_into(&frame, spec, &mut input).map_err(|e| e.to_string()))
            .and_then(|_| run(file, &input));
        if let Err(reason) = ran {
            skipped.push((file.clone(), reason));
        }
        next_image();
    }
    skipped
}

/// [`each_input`] on two threads (tract runs a model on one): the first
/// half of `files` on this thread, the rest on a second, each folded by
/// `fold` into its own state, from `start`'s first here and its second
/// there. Answers both states in that order, to be merged by the caller,
/// and the images skipped, in `files`' order. `next_image` is
/// called once per image, all from this thread, which takes the larger half
/// so that its reports run to the end.
fn fold_on_two_threads<S: Send>(
    files: &[PathBuf],
    spec: &PreprocessSpec,
    next_image: &mut dyn FnMut(),
    [mine_start, theirs_start]: [S; 2],
    fold: &FoldImage<'_, S>,
) -> ([S; 2], Vec<(PathBuf, String)>) {
    let (mine, theirs) = files.split_at(files.len().div_ceil(2));
    let theirs_done = AtomicUsize::new(0);
    let pass = |mut state: S, files: &[PathBuf], next_image: &mut dyn FnMut()| {
        let skipped = each_input(files, spec, next_image, &mut |file, input| {
            fold(&mut state, file, input)
        });
        (state, skipped)
    };
    let ((mine, mut skipped), (theirs, their_skipped)) = std::thread::scope(|s| {
        let other = s.spawn(|| {
            pass(theirs_start, theirs, &mut || {
                theirs_done.fetch_add(1, Ordering::Relaxed);
            })
        });
        // One report per image: this thread makes the other's too.
        let mine = pass(mine_start, mine, &mut || {
            for _ in 0..=theirs_done.swap(0, Ordering::Relaxed) {
                next_image();
            }
        });
        let theirs = other
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
        (mine, theirs)
    });
    for _ in 0..theirs_done.swap(0, Ordering::Relaxed) {
        next_image();
    }
    skipped.extend(their_skipped);
    ([mine, theirs], skipped)
}

/// The Convs `keep_float` names. Every entry must match at least one.
fn resolve_keep_float(
    model: &ModelProto,
    keep_float: &[String],
) -> Result<HashSet<String>, QuantizeError> {
    let Some(graph) = model.graph.as_ref() else {
        return Ok(HashSet::new());
    };
    let convs: Vec<_> = graph.node.iter().filter(|n| n.op_type == "Conv").collect();
    let mut kept = HashSet::new();
    for entry in keep_float {
        let matched: Vec<String> = match entry.as_str() {
            "@first" => {
                let inputs = graph::runtime_inputs(graph);
                convs
                    .iter()
                    .filter(|c| c.input.first().is_some_and(|i| inputs.contains(i)))
                    .map(|c| conv_id(c).to_owned())
                    .collect()
            }
            "@last" => last_convs(graph),
            pattern => {
                let glob = glob::Pattern::new(pattern).map_err(|e| QuantizeError::KeepFloat {
                    pattern: pattern.to_owned(),
                    example: format!("not a valid pattern: {e}"),
                })?;
                convs
                    .iter()
                    .map(|c| conv_id(c))
                    .filter(|id| glob.matches(id))
                    .map(str::to_owned)
                    .collect()
            }
        };
        if matched.is_empty() {
            return Err(QuantizeError::KeepFloat {
                pattern: entry.clone(),
                example: convs
                    .first()
                    .map(|c| conv_id(c).to_owned())
                    .unwrap_or_default(),
            });
        }
        kept.extend(matched);
    }
    Ok(kept)
}

/// Convs whose output reaches a network output through non-Conv nodes
/// only: the heads' final layers.
fn last_convs(graph: &tract_onnx::pb::GraphProto) -> Vec<String> {
    let producer = graph::producers(graph);
    let mut found = Vec::new();
    let mut seen = HashSet::new();
    let mut stack: Vec<&str> = graph.output.iter().map(|o| o.name.as_str()).collect();
    while let Some(tensor) = stack.pop() {
        let Some(node) = producer.get(tensor) else {
            continue;
        };
        if !seen.insert(node.output.first().map_or("", String::as_str)) {
            continue;
        }
        if node.op_type == "Conv" {
            found.push(conv_id(node).to_owned());
        } else {
            stack.extend(node.input.iter().map(String::as_str));
        }
    }
    found.sort();
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 3×3 Conv, 8 → 16 channels in 2 groups, on a 40×30 output: 16 · 4 ·
    /// 9 MACs a position. A size from a hostile model is refused, not
    /// wrapped.
    #[test]
    fn conv_macs_are_weight_elements_times_output_positions() {
        assert_eq!(conv_macs(&[16, 4, 3, 3], &[1, 16, 30, 40]), Some(691_200));
        assert_eq!(conv_macs(&[16, -4, 3, 3], &[1, 16, 30, 40]), None);
        assert_eq!(conv_macs(&[i64::MAX, 4], &[1, 16, 30, 40]), None);
        assert_eq!(conv_macs(&[16, 4, 3, 3], &[1]), None);
        let half = MacCount { int8: 1, all: 2 };
        assert_eq!(half.int8_fraction(), 0.5);
        assert_eq!(MacCount { int8: 0, all: 0 }.int8_fraction(), 1.0);
    }

    /// The legacy calibrator's table and plan are keyed on the network,
    /// the images and how they are fed: a retrained model, or a stretched
    /// one, does not reuse the table of another.
    #[test]
    fn the_calibrator_key_holds_the_model_the_images_and_the_preprocessing() {
        use crate::preprocess::{ChannelOrder, ResizeMode};
        let set = |digest: &str| CalibrationSet {
            dir: PathBuf::from("/calibration"),
            files: Vec::new(),
            available: 0,
            digest: digest.to_owned(),
        };
        let letterbox = PreprocessSpec::nanodet(320, 320, ResizeMode::Letterbox);
        let key = calibrator_key("model", &set("a"), &letterbox);
        assert_eq!(key.len(), 64);
        assert_eq!(calibrator_key("model", &set("a"), &letterbox.clone()), key);
        assert_ne!(calibrator_key("retrained", &set("a"), &letterbox), key);
        assert_ne!(calibrator_key("model", &set("b"), &letterbox), key);
        let others = [
            PreprocessSpec::nanodet(320, 320, ResizeMode::Stretch),
            PreprocessSpec::nanodet(416, 416, ResizeMode::Letterbox),
            PreprocessSpec {
                channel_order: ChannelOrder::Rgb,
                ..letterbox.clone()
            },
            PreprocessSpec {
                mean: [0.0; 3],
                ..letterbox.clone()
            },
            PreprocessSpec {
                std: [1.0; 3],
                ..letterbox.clone()
            },
        ];
        for other in others {
            assert_ne!(calibrator_key("model", &set("a"), &other), key, "{other:?}");
        }
    }

    #[test]
    fn the_calibration_table_is_named_by_the_calibrator_key_or_not_at_all() {
        let key = "0123456789abcdef".repeat(4);
        assert_eq!(
            calibration_table_name("plus", &format!("calibrator:{key}")).as_deref(),
            Some("plus.calibration-0123456789abcdef.table")
        );
        let short = &key[..63];
        let not_hex = format!("{}g", &key[..63]);
        for quantization in [
            String::new(),
            key.clone(),
            "plus.int8-abc.onnx".to_owned(),
            "calibrator:".to_owned(),
            format!("calibrator:{short}"),
            format!("calibrator:{not_hex}"),
            format!("calibrator:{key}0"),
        ] {
            assert_eq!(
                calibration_table_name("plus", &quantization),
                None,
                "{quantization}"
            );
        }
    }

    /// The INT8 cache's key holds this text: it must not change unless
    /// what the quantizer makes of the layout does, or every cached model
    /// is made again.
    #[test]
    fn the_layout_key_text_is_fixed() {
        let layout = Layout::detect(
            &[1, 3, 320, 320],
            &[crate::model::TensorShape {
                name: "output".into(),
                shape: vec![1, 2125, 112],
            }],
            &crate::model::LayoutOverrides::default(),
        )
        .unwrap();
        assert_eq!(
            layout_key(&layout),
            "layout 320x320 Stretch Bgr mean [103.53, 116.28, 123.675] std [57.375, 57.12, 58.395]; \
             80 classes, boxes dfl 8, outputs single 0 0 80, levels 8:40x40 16:20x20 32:10x10 64:5x5\n"
        );
    }

    #[test]
    fn methods_parse_and_print_alike() {
        for m in ["entropy", "minmax", "mse", "percentile:99.9"] {
            assert_eq!(method_name(parse_method(m).unwrap()), m);
        }
        assert_eq!(
            parse_method("percentile").unwrap(),
            Method::Percentile(99.99)
        );
        assert!(parse_method("percentile:120").is_err());
        assert!(
            parse_method("kl")
                .unwrap_err()
                .to_string()
                .contains("known: entropy")
        );
    }
}
