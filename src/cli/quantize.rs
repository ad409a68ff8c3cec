//! `nanodetd quantize`: FP32 ONNX + calibration images → INT8 Q/DQ ONNX.

use std::io::IsTerminal;
use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;

use nanodetd::detector::DetectionParams;
use nanodetd::engine_cache::write_atomically;
use nanodetd::quantize::{self, CalibrationSet, QuantizeError, QuantizeOptions};

use super::{Failure, ModelArgs};

/// Arguments of `quantize`.
#[derive(Args, Debug)]
pub struct QuantizeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Directory of calibration images (JPEG/PNG), ideally frames from the
    /// cameras the model will watch.
    #[arg(long)]
    calibration: PathBuf,
    /// percentile (99.99, the default), percentile:P, entropy (KL search,
    /// as TensorRT's calibrator), mse (least squared error) or minmax.
    #[arg(long, default_value = "percentile", value_parser = quantize::parse_method)]
    method: quantize::Method,
    /// Use at most N images, spread evenly over the sorted set.
    #[arg(long)]
    images: Option<usize>,
    /// Convs to keep in float: node names, glob patterns, @first, @last.
    #[arg(long, value_delimiter = ',')]
    keep_float: Vec<String>,
    /// Skip the channel equalization (in front of depthwise Convs and after
    /// the stem's max pool).
    #[arg(long)]
    no_equalize: bool,
    /// Correct each quantized Conv's bias for the mean shift its weights'
    /// rounding causes, measured on the calibration images (the default).
    #[arg(long, conflicts_with = "no_bias_correction")]
    bias_correction: bool,
    /// No bias correction.
    #[arg(long)]
    no_bias_correction: bool,
    /// Round each quantized Conv's weights down or up, whichever keeps its
    /// outputs on the calibration images closest to the float ones
    /// (adaptive rounding, after AdaRound), rather than to nearest (the
    /// default).
    #[arg(long, conflicts_with = "no_adaround")]
    adaround: bool,
    /// Round the weights to nearest.
    #[arg(long)]
    no_adaround: bool,
    /// Per tensor, the method's threshold or a second method's (mse's; the
    /// percentile's for `--method mse`), whichever does less damage to the
    /// outputs on trial models (the default; tried on the worst tensors that
    /// stay quantized).
    #[arg(long, conflicts_with = "no_threshold_choice")]
    threshold_choice: bool,
    /// Every tensor's threshold from `--method` alone.
    #[arg(long)]
    no_threshold_choice: bool,
    /// Automatic partial quantization: keep Convs in float, for the
    /// outputs on 6 calibration images (class scores and boxes weighed as
    /// two halves) to reach this SNR (dB) against FP32, with at most 10 %
    /// of the Convs' MACs in float (the default, at 30).
    #[arg(
        long,
        value_name = "DB",
        value_parser = super::decibels,
        default_value_t = quantize::DEFAULT_AUTO_FLOAT_DB,
        conflicts_with = "no_auto_float"
    )]
    auto_float: f64,
    /// Quantize every Conv the model allows (no automatic partial
    /// quantization).
    #[arg(long)]
    no_auto_float: bool,
    /// Where to write the Q/DQ ONNX (atomically).
    #[arg(long, short = 'o')]
    out: PathBuf,
}

pub fn run(args: &QuantizeArgs) -> Result<(), Failure> {
    nanodetd::logging::start(log::LevelFilter::Info);
    let detector = args.model.detector(DetectionParams::LIVE)?;
    let set = CalibrationSet::scan(&args.calibration, args.images).map_err(bad_input)?;
    let options = QuantizeOptions {
        method: args.method,
        max_images: args.images,
        keep_float: args.keep_float.clone(),
        equalize: !args.no_equalize,
        bias_correction: !args.no_bias_correction,
        adaround: !args.no_adaround,
        auto_float_db: (!args.no_auto_float).then_some(args.auto_float),
        threshold_choice: !args.no_threshold_choice,
    };
    let mut progress = Progress::new(set.files.len());
    let quantized = quantize::quantize(
        &args.model.model,
        detector.layout(),
        &set,
        &options,
        &mut |done, total| progress.update(done, total),
    )
    .map_err(bad_input)?;
    progress.finish();
    write_atomically(&args.out, &quantized.bytes)
        .map_err(|e| Failure::Runtime(anyhow!("{}: cannot write: {e}", args.out.display())))?;
    let r = &quantized.report;
    let thresholds = r.threshold_choice.as_ref().map_or_else(String::new, |t| {
        format!(
            " ({} on {} of {} tensors tried)",
            quantize::method_name(t.second),
            t.kept.len(),
            t.tried.len()
        )
    });
    println!(
        "{}: {} Convs INT8 ({} of the Convs' MACs), {} float, {} Q/DQ pairs, {} Conv inputs equalized; method {}{thresholds}; {} images ({} skipped) in {:.1} s, {:.1} s in all",
        args.out.display(),
        r.rules.quantized_convs,
        r.macs.map_or_else(
            || "unknown share".to_owned(),
            |m| format!("{:.1} %", m.int8_fraction() * 100.0)
        ),
        r.rules.float_convs,
        r.rules.pairs,
        r.equalized,
        quantize::method_name(r.method),
        r.images_used,
        r.images_skipped.len(),
        r.statistics_seconds,
        r.total_seconds,
    );
    Ok(())
}

/// Every quantizer error is about the inputs (model, images, options),
/// except a rule violation, which is a bug in the quantizer.
fn bad_input(e: QuantizeError) -> Failure {
    match e {
        QuantizeError::Rules(_) => Failure::Runtime(e.into()),
        other => Failure::BadInput(other.into()),
    }
}

/// A bar on a terminal; a log line per tenth otherwise (journald and CI
/// logs do not want carriage returns).
enum Progress {
    Bar(indicatif::ProgressBar),
    Lines(quantize::TenthsLog),
}

impl Progress {
    fn new(total: usize) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = indicatif::ProgressBar::new(total as u64);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "calibrating {bar:40} {pos}/{len} images, {elapsed} (eta {eta})",
            ) {
                bar.set_style(style);
            }
            Progress::Bar(bar)
        } else {
            Progress::Lines(quantize::TenthsLog::new("calibration"))
        }
    }

    fn update(&mut self, done: usize, total: usize) {
        match self {
            Progress::Bar(bar) => bar.set_position(done as u64),
            Progress::Lines(log) => log.update(done, total),
        }
    }

    fn finish(&self) {
        if let Progress::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}
