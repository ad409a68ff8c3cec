//! Command-line front end. This is the binary's edge: errors become
//! `anyhow` chains here and end as a one-line message and an exit code.
//!
//! Exit codes: 0 ok; 1 runtime failure; 2 bad usage or bad input file
//! (model, image, annotations).

mod bench;
#[cfg(feature = "cuda")]
mod bench_gpu;
mod calibrate;
mod camera;
mod detect;
mod eval;
mod quantize;
mod run;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};

use nanodetd::backend::onnxruntime::{OnnxRuntimeOptions, Provider};
use nanodetd::backend::{self, BackendChoice, EngineOptions};
use nanodetd::config::{Bounded, Decibels, ModelConfig, Precision, Real};
use nanodetd::detector::{DetectionParams, Detector};
use nanodetd::model::{self, LayoutKind, LayoutOverrides};
use nanodetd::prepare::{LoadOptions, load_detector};
use nanodetd::preprocess::ResizeMode;

/// NanoDet object detection for edge cameras.
#[derive(Parser)]
#[command(name = "nanodetd", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Detect objects in image files and print them.
    Detect(detect::DetectArgs),
    /// Score a model on a COCO-format dataset with the 12 COCO metrics.
    Eval(eval::EvalArgs),
    /// Time each pipeline stage (decode, preprocess, inference, postprocess).
    Bench(bench::BenchArgs),
    /// Time the GPU preprocessing kernel and its copies, beside the CPU
    /// path, on a CUDA device.
    #[cfg(feature = "cuda")]
    BenchGpu(bench_gpu::BenchGpuArgs),
    /// Make an INT8 model: explicit Q/DQ ONNX calibrated on a directory of
    /// images, which TensorRT 8.6, 10 and 11 build directly.
    Quantize(quantize::QuantizeArgs),
    /// Capture calibration frames from a configured camera (near-duplicates
    /// skipped) into the INT8 calibration directory.
    Calibrate(calibrate::CalibrateArgs),
    /// Open a V4L2 camera as the daemon would, stream frames through the
    /// conversion, and report the negotiated format and the frame rate
    /// (one JSON line); optionally save a converted frame.
    Camera(camera::CameraArgs),
    /// Run the daemon: cameras -> detector -> tracked MQTT events, until
    /// SIGTERM. Exit 78 (EX_CONFIG) for a bad config.
    Run(run::RunArgs),
    /// Parse and check a daemon configuration file (exit 0 if valid, 2 if not).
    CheckConfig {
        /// The TOML file.
        file: PathBuf,
    },
    /// The daemon's trial load of a model, in a child process (see
    /// nanodetd::daemon::probe): exit 0, 2 for a clean refusal, or a crash.
    #[command(hide = true)]
    ProbeModel {
        /// The address-space limit to run under, in bytes.
        #[arg(long)]
        max_memory: Option<u64>,
        /// Load it with ONNX Runtime's CPU provider instead of tract.
        #[arg(long)]
        onnxruntime: bool,
        /// The libonnxruntime to load (else the default search).
        #[arg(long, requires = "onnxruntime")]
        onnxruntime_library: Option<PathBuf>,
        /// ONNX Runtime's execution provider: cpu, cuda or tensorrt.
        #[arg(long, requires = "onnxruntime", default_value = "cpu", value_parser = parse_provider)]
        provider: Provider,
        /// The ONNX file.
        file: PathBuf,
    },
}

/// How a command failed, which decides the exit code.
pub enum Failure {
    /// Bad usage or a bad input file: exit 2.
    BadInput(anyhow::Error),
    /// Something failed at run time: exit 1.
    Runtime(anyhow::Error),
    /// The daemon's configuration is unusable: exit 78 (sysexits'
    /// EX_CONFIG), which the unit's RestartPreventExitStatus= knows.
    Config(anyhow::Error),
}

impl Failure {
    fn report(self) -> ExitCode {
        let (code, error) = match self {
            Failure::BadInput(e) => (2, e),
            Failure::Runtime(e) => (1, e),
            Failure::Config(e) => (78, e),
        };
        eprintln!("error: {}", one_line(&error));
        ExitCode::from(code)
    }
}

/// The error and its causes on one line ([`nanodetd::prepare::one_line`]).
fn one_line(error: &anyhow::Error) -> String {
    nanodetd::prepare::one_line(error.as_ref())
}

/// Model selection and the overrides for exports that break convention.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// NanoDet ONNX file (any known export layout).
    #[arg(long, short = 'm')]
    model: PathBuf,
    /// Inference backend: tract, onnxruntime, tensorrt (feature), or auto,
    /// the fastest that runs here.
    #[arg(long, default_value = "tract")]
    backend: BackendChoice,
    /// ONNX Runtime's execution provider: cpu, cuda (feature `cuda`) or
    /// tensorrt [default: cpu; cuda for auto in a cuda build].
    #[arg(long, value_parser = parse_provider)]
    provider: Option<Provider>,
    /// Run on the GPU (ONNX Runtime's GPU providers, TensorRT) without
    /// replaying a captured CUDA graph.
    #[arg(long)]
    no_cuda_graph: bool,
    /// Force the output layout instead of inferring it from the shapes.
    #[arg(long)]
    layout: Option<LayoutKind>,
    /// Strides of the output levels, finest first (e.g. 8,16,32).
    #[arg(long, value_delimiter = ',')]
    strides: Option<Vec<usize>>,
    /// Cell-centre offset in cells (0 for Plus, 0.5 for legacy models).
    #[arg(long)]
    center_offset: Option<f32>,
    /// Resize mode: stretch (Plus) or letterbox (legacy).
    #[arg(long)]
    resize: Option<ResizeMode>,
    /// DFL bins per side minus one (7 in every official export; inferred
    /// from the shapes when --classes is given).
    #[arg(long)]
    reg_max: Option<usize>,
    /// Class-name file, one per line (default: the 80 COCO classes).
    #[arg(long)]
    classes: Option<PathBuf>,
    /// Input size WxH, for models whose input size is not fixed.
    #[arg(long, visible_alias = "size", value_parser = parse_size)]
    input_size: Option<(usize, usize)>,
}

/// The precision a command runs at, with the `[model.int8]` options:
/// `detect`, `eval` and `bench` run the model the daemon runs.
#[derive(Args, Debug, Default)]
pub struct PrecisionArgs {
    /// Precision: fp32, fp16 (GPU engines) or int8 (the Q/DQ model
    /// nanodetd calibrates, as the daemon's `[model] precision`).
    #[arg(long, value_enum, default_value_t = Precision::Fp32)]
    precision: Precision,
    /// Calibration images for --precision int8 (`[model.int8]
    /// calibration`).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Calibration method: percentile, percentile:P, entropy, mse or minmax
    /// (`[model.int8] method`).
    #[arg(long)]
    int8_method: Option<String>,
    /// Use at most this many calibration images (`[model.int8] images`).
    #[arg(long)]
    int8_images: Option<Bounded<usize, 1, 100_000>>,
    /// Convs left in float: names, patterns, @first, @last; repeatable
    /// (`[model.int8] keep_float`).
    #[arg(long)]
    int8_keep_float: Vec<String>,
    /// No channel equalization before depthwise Convs (`[model.int8]
    /// equalize = false`).
    #[arg(long)]
    int8_no_equalize: bool,
    /// Correct each quantized Conv's bias for its weights' rounding, the
    /// default (`[model.int8] bias_correction = true`).
    #[arg(long, conflicts_with = "int8_no_bias_correction")]
    int8_bias_correction: bool,
    /// No bias correction (`[model.int8] bias_correction = false`).
    #[arg(long)]
    int8_no_bias_correction: bool,
    /// Adaptive rounding of the INT8 weights, the default (`[model.int8]
    /// adaround = true`).
    #[arg(long, conflicts_with = "int8_no_adaround")]
    int8_adaround: bool,
    /// Round the INT8 weights to nearest (`[model.int8] adaround =
    /// false`).
    #[arg(long)]
    int8_no_adaround: bool,
    /// Per tensor, the method's threshold or mse's (percentile's, for mse),
    /// whichever does less damage on trial models, the default
    /// (`[model.int8] threshold_choice = true`).
    #[arg(long, conflicts_with = "int8_no_threshold_choice")]
    int8_threshold_choice: bool,
    /// Every threshold from the method alone (`[model.int8]
    /// threshold_choice = false`).
    #[arg(long)]
    int8_no_threshold_choice: bool,
    /// Automatic partial quantization to this SNR in dB, on by default at
    /// 30 (`[model.int8] auto_float_db`).
    #[arg(long, value_name = "DB", value_parser = decibels, conflicts_with = "int8_no_auto_float")]
    int8_auto_float: Option<f64>,
    /// Every Conv the model can quantize in INT8 (`[model.int8] auto_float
    /// = false`).
    #[arg(long)]
    int8_no_auto_float: bool,
    /// Where built models are kept (`[model] cache`): the daemon's by
    /// default, so a command reuses the INT8 model and engines it made.
    #[arg(long)]
    cache: Option<PathBuf>,
}

impl PrecisionArgs {
    /// Applies these flags to `model`.
    fn apply(&self, model: &mut ModelConfig) {
        model.precision = self.precision;
        if let Some(cache) = &self.cache {
            model.cache = cache.clone();
        }
        let int8 = &mut model.int8;
        if let Some(dir) = &self.calibration {
            int8.calibration = dir.clone();
        }
        if let Some(method) = &self.int8_method {
            int8.method = method.clone();
        }
        int8.images = self.int8_images.or(int8.images);
        int8.keep_float.extend(self.int8_keep_float.iter().cloned());
        int8.equalize &= !self.int8_no_equalize;
        // The flags override the file either way; clap refuses both of a
        // pair.
        int8.bias_correction =
            (int8.bias_correction || self.int8_bias_correction) && !self.int8_no_bias_correction;
        int8.adaround = (int8.adaround || self.int8_adaround) && !self.int8_no_adaround;
        int8.threshold_choice =
            (int8.threshold_choice || self.int8_threshold_choice) && !self.int8_no_threshold_choice;
        if let Some(db) = self.int8_auto_float.and_then(Real::new) {
            int8.auto_float = true;
            int8.auto_float_db = Some(db);
        }
        int8.auto_float &= !self.int8_no_auto_float;
    }
}

/// An SNR in dB as `[model.int8] auto_float_db` takes it.
pub(crate) fn decibels(text: &str) -> Result<f64, String> {
    let db: f64 = text.parse().map_err(|e| format!("{e}"))?;
    Real::<f64, Decibels>::new(db)
        .map(Real::get)
        .ok_or_else(|| format!("must be more than 0 and at most 100 dB, got {db}"))
}

pub(super) fn parse_provider(s: &str) -> Result<Provider, String> {
    match s {
        "cpu" => Ok(Provider::Cpu),
        "cuda" => Ok(Provider::Cuda),
        "tensorrt" => Ok(Provider::TensorRt),
        other => Err(format!(
            "{other:?}: the providers are cpu, cuda and tensorrt"
        )),
    }
}

pub(super) fn parse_size(s: &str) -> Result<(usize, usize), String> {
    let (w, h) = s
        .split_once('x')
        .ok_or_else(|| format!("{s:?} is not WxH"))?;
    let parse = |v: &str| {
        v.parse::<usize>()
            .ok()
            .filter(|n| *n > 0)
            .ok_or_else(|| format!("{s:?} is not WxH with positive integers"))
    };
    Ok((parse(w)?, parse(h)?))
}

impl ModelArgs {
    /// The `[model]` table these flags stand for, at `precision`.
    fn model_config(&self, precision: &PrecisionArgs) -> ModelConfig {
        let mut model = ModelConfig::for_file(self.model.clone());
        model.backend = self.backend;
        model.classes = self.classes.clone();
        model.onnxruntime.provider = self.provider;
        model.onnxruntime.cuda_graph = !self.no_cuda_graph;
        model.tensorrt.cuda_graph = !self.no_cuda_graph;
        precision.apply(&mut model);
        model
    }

    /// Loads the FP32 model; see [`ModelArgs::detector_at`].
    fn detector(&self, params: DetectionParams) -> Result<Arc<Detector>, Failure> {
        self.detector_at(params, &PrecisionArgs::default())
    }

    /// Loads the model at `precision` through the daemon's own path
    /// ([`nanodetd::prepare`]): every failure here is a bad input file.
    fn detector_at(
        &self,
        params: DetectionParams,
        precision: &PrecisionArgs,
    ) -> Result<Arc<Detector>, Failure> {
        let model = self.model_config(precision);
        let options = LoadOptions {
            params,
            overrides: LayoutOverrides {
                layout: self.layout,
                strides: self.strides.clone(),
                center_offset: self.center_offset,
                resize: self.resize,
                reg_max: self.reg_max,
                num_classes: None,
            },
            input_size: self.input_size,
            // A command runs the backend it was asked for, or says why not.
            fall_back_to_cpu: false,
            ..LoadOptions::from_config(&model)
        };
        load_detector(&model, &options)
            .with_context(|| format!("{}", self.model.display()))
            .map_err(Failure::BadInput)
    }
}

/// Score/NMS flags shared by `detect` and `eval`.
#[derive(Args, Debug)]
pub struct ThresholdArgs {
    /// Minimum class score (default 0.35 for detect, 0.05 for eval).
    #[arg(long)]
    score: Option<f32>,
    /// Class-aware NMS IoU threshold.
    #[arg(long, default_value_t = 0.6)]
    iou: f32,
    /// Most detections kept per image.
    #[arg(long, default_value_t = 100)]
    max_detections: usize,
}

impl ThresholdArgs {
    fn params(&self, defaults: DetectionParams) -> Result<DetectionParams, Failure> {
        let score = self.score.unwrap_or(defaults.score_threshold);
        for (name, v) in [("--score", score), ("--iou", self.iou)] {
            if !(0.0..=1.0).contains(&v) {
                return Err(Failure::BadInput(anyhow::anyhow!(
                    "{name} {v} is outside [0, 1]"
                )));
            }
        }
        Ok(DetectionParams {
            score_threshold: score,
            iou_threshold: self.iou,
            max_detections: self.max_detections,
            ..defaults
        })
    }
}

/// `probe-model`: loads the model with tract under `max_memory` bytes of
/// address space and runs it once on a grey frame. A failed allocation
/// aborts this process, which is the point: the daemon that started it
/// then refuses the model instead of aborting itself.
fn probe_model(
    max_memory: Option<u64>,
    kind: backend::BackendKind,
    onnxruntime: OnnxRuntimeOptions,
    file: &std::path::Path,
) -> Result<(), Failure> {
    use nanodetd::frame::{Frame, PixelFormat};
    if let Some(limit) = max_memory {
        nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, limit, limit)
            .map_err(|e| Failure::Runtime(anyhow::Error::new(e).context("setrlimit")))?;
    }
    let bad = |e: anyhow::Error| Failure::BadInput(e.context(file.display().to_string()));
    model::check_file_sizes(file).map_err(|e| bad(e.into()))?;
    let options = EngineOptions {
        onnxruntime,
        ..EngineOptions::default()
    };
    let engine = backend::open_engine(kind, file, &options).map_err(|e| bad(e.into()))?;
    let detector = Detector::new(
        engine,
        &model::LayoutOverrides::default(),
        None,
        DetectionParams::LIVE,
    )
    .map(Arc::new)
    .map_err(|e| bad(e.into()))?;
    let (w, h) = (
        detector.layout().input_width,
        detector.layout().input_height,
    );
    let frame = Frame::from_packed(w, h, PixelFormat::Rgb8, vec![114; w * h * 3], "probe")
        .map_err(|e| bad(e.into()))?;
    let mut session = detector.session().map_err(|e| bad(e.into()))?;
    session.detect(&frame).map_err(|e| bad(e.into()))?;
    // The daemon does not read it; a person or a test running the probe
    // by hand sees where it ran.
    println!(
        "{}: loaded and ran once on {}: {}",
        file.display(),
        detector.engine().backend(),
        detector.engine().notes().join("; ")
    );
    Ok(())
}

/// Parses arguments, runs the command and maps the outcome to an exit code.
pub fn main() -> ExitCode {
    nanodetd::contain::install_hook(nanodetd::contain::Uncontained::Abort);
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Detect(_) | Command::Eval(_) | Command::Bench(_)
    ) {
        // Warnings (a provider that fell back, a library passed over) by
        // default; RUST_LOG=info adds the engine's notes, such as what
        // `--backend auto` chose and why.
        nanodetd::logging::start(log::LevelFilter::Warn);
    }
    let outcome = match cli.command {
        Command::Detect(args) => detect::run(&args),
        Command::Eval(args) => eval::run(&args),
        Command::Bench(args) => bench::run(&args),
        #[cfg(feature = "cuda")]
        Command::BenchGpu(args) => bench_gpu::run(&args),
        Command::Quantize(args) => quantize::run(&args),
        Command::Calibrate(args) => calibrate::run(&args),
        Command::Camera(args) => camera::run(&args),
        Command::Run(args) => run::run(&args),
        Command::ProbeModel {
            max_memory,
            onnxruntime,
            onnxruntime_library,
            provider,
            file,
        } => {
            let kind = if onnxruntime {
                backend::BackendKind::OnnxRuntime
            } else {
                backend::BackendKind::Tract
            };
            let ort = OnnxRuntimeOptions {
                library: onnxruntime_library,
                provider,
                ..Default::default()
            };
            probe_model(max_memory, kind, ort, &file)
        }
        Command::CheckConfig { file } => nanodetd::config::Config::load(&file)
            .map(|c| {
                if let nanodetd::backend::BackendChoice::Only(kind) = c.model.backend
                    && !kind.compiled_in()
                {
                    eprintln!(
                        "{}: warning: model.backend = \"{kind}\" is not compiled into this nanodetd; the daemon will run the model on tract, the CPU",
                        file.display()
                    );
                }
                println!(
                    "{}: ok ({} camera{})",
                    file.display(),
                    c.cameras.len(),
                    if c.cameras.len() == 1 { "" } else { "s" }
                )
            })
            .map_err(|e| Failure::BadInput(e.into())),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => failure.report(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `--auto-float` takes what `[model.int8] auto_float_db` takes.
    #[test]
    fn auto_float_takes_decibels_in_the_config_range() {
        assert_eq!(decibels("30"), Ok(30.0));
        assert_eq!(decibels("100"), Ok(100.0));
        for bad in ["0", "-3", "100.5", "nan", "inf", "loud"] {
            assert!(decibels(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cause_already_in_the_message_is_not_repeated() {
        let os = std::io::Error::from_raw_os_error(19);
        let lost = nanodetd::capture::V4l2Error::Lost {
            path: "/dev/video0".into(),
            what: "VIDIOC_QBUF",
            source: os,
        };
        let error = anyhow::Error::from(lost).context("camera front");
        assert_eq!(
            one_line(&error),
            "camera front: /dev/video0: VIDIOC_QBUF: No such device (os error 19)"
        );
        let plain = anyhow::anyhow!("inner").context("outer");
        assert_eq!(one_line(&plain), "outer: inner");
    }
}
