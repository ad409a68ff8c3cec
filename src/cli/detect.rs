//! `nanodetd detect`: detections for image files, as a table or COCO JSON.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;
use serde::Serialize;

use nanodetd::detector::DetectionParams;
use nanodetd::eval::{default_category_id, to_coco_bbox};
use nanodetd::frame::Frame;

use super::{Failure, ModelArgs, PrecisionArgs, ThresholdArgs};

/// Arguments of `detect`.
#[derive(Args, Debug)]
pub struct DetectArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    thresholds: ThresholdArgs,
    /// Print COCO results JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Image files (JPEG, PNG).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

#[derive(Serialize)]
struct JsonDetection {
    file_name: String,
    category_id: u64,
    bbox: [f64; 4],
    score: f32,
}

pub fn run(args: &DetectArgs) -> Result<(), Failure> {
    let detector = args.model.detector_at(
        args.thresholds.params(DetectionParams::LIVE)?,
        &args.precision,
    )?;
    let mut session = detector.session().map_err(|e| Failure::Runtime(e.into()))?;
    let num_classes = detector.layout().num_classes;
    let (mut unreadable, mut failed) = (0usize, 0usize);
    let mut json = Vec::new();
    for path in &args.images {
        let frame = match Frame::from_file(path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e}");
                unreadable += 1;
                continue;
            }
        };
        let detections = match session.detect(&frame) {
            Ok(d) => d,
            Err(e) => {
                eprintln!(
                    "error: {}: {}",
                    path.display(),
                    nanodetd::errors::one_line(&e)
                );
                failed += 1;
                continue;
            }
        };
        if args.json {
            json.extend(detections.iter().map(|d| JsonDetection {
                file_name: path.display().to_string(),
                category_id: default_category_id(d.class_id, num_classes),
                bbox: to_coco_bbox(d.bbox).map(|v| (v * 100.0).round() / 100.0),
                score: d.score,
            }));
            continue;
        }
        println!(
            "{}: {}x{}, {} detection{}",
            path.display(),
            frame.width(),
            frame.height(),
            detections.len(),
            if detections.len() == 1 { "" } else { "s" }
        );
        if !detections.is_empty() {
            println!(
                "  {:<16} {:>6} {:>8} {:>8} {:>8} {:>8}",
                "label", "score", "x1", "y1", "x2", "y2"
            );
        }
        for d in &detections {
            println!(
                "  {:<16} {:>6.3} {:>8.1} {:>8.1} {:>8.1} {:>8.1}",
                detector.class_name(d.class_id),
                d.score,
                d.bbox[0],
                d.bbox[1],
                d.bbox[2],
                d.bbox[3]
            );
        }
    }
    if args.json {
        let text = serde_json::to_string_pretty(&json).map_err(|e| Failure::Runtime(e.into()))?;
        println!("{text}");
    }
    let total = args.images.len();
    if failed > 0 {
        Err(Failure::Runtime(anyhow!(
            "detection failed on {failed} of {total} images"
        )))
    } else if unreadable > 0 {
        Err(Failure::BadInput(anyhow!(
            "{unreadable} of {total} images could not be read"
        )))
    } else {
        Ok(())
    }
}
