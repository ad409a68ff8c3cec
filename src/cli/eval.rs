//! `nanodetd eval`: the 12 COCO metrics of a model on a COCO-format set.

use std::path::PathBuf;

use anyhow::anyhow;
use clap::Args;

use nanodetd::detector::DetectionParams;
use nanodetd::eval::{CocoDataset, CocoDetection, CocoStats, evaluate, to_coco_bbox};
use nanodetd::frame::Frame;

use super::{Failure, ModelArgs, PrecisionArgs, ThresholdArgs};

/// Arguments of `eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    precision: PrecisionArgs,
    #[command(flatten)]
    thresholds: ThresholdArgs,
    /// Folder holding the dataset's images.
    #[arg(long)]
    images: PathBuf,
    /// COCO instances JSON.
    #[arg(long)]
    annotations: PathBuf,
    /// Also write the detections as COCO results JSON (for pycocotools).
    #[arg(long)]
    save_detections: Option<PathBuf>,
    /// Print the metrics as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: &EvalArgs) -> Result<(), Failure> {
    let dataset =
        CocoDataset::from_file(&args.annotations).map_err(|e| Failure::BadInput(e.into()))?;
    let detector = args.model.detector_at(
        args.thresholds.params(DetectionParams::EVAL)?,
        &args.precision,
    )?;
    let categories = dataset.sorted_category_ids();
    if categories.len() != detector.layout().num_classes {
        return Err(Failure::BadInput(anyhow!(
            "{}: {} categories, but the model scores {} classes",
            args.annotations.display(),
            categories.len(),
            detector.layout().num_classes
        )));
    }
    let mut session = detector.session().map_err(|e| Failure::Runtime(e.into()))?;
    let mut detections = Vec::new();
    let mut unreadable = 0usize;
    for image in &dataset.images {
        let path = args.images.join(&image.file_name);
        let frame = match Frame::from_file(&path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("error: {e}");
                unreadable += 1;
                continue;
            }
        };
        let found = session.detect(&frame).map_err(|e| {
            Failure::Runtime(anyhow!(
                "{}: {}",
                path.display(),
                nanodetd::errors::one_line(&e)
            ))
        })?;
        detections.extend(found.iter().filter_map(|d| {
            Some(CocoDetection {
                image_id: image.id,
                category_id: *categories.get(d.class_id as usize)?,
                bbox: to_coco_bbox(d.bbox),
                score: f64::from(d.score),
            })
        }));
    }
    if let Some(path) = &args.save_detections {
        let text = serde_json::to_vec(&detections).map_err(|e| Failure::Runtime(e.into()))?;
        std::fs::write(path, text)
            .map_err(|e| Failure::Runtime(anyhow!("{}: cannot write: {e}", path.display())))?;
    }
    let stats = evaluate(&dataset, &detections);
    if args.json {
        let out = serde_json::json!({
            "model": args.model.model.display().to_string(),
            "layout": detector.layout().kind.to_string(),
            "images": dataset.images.len(),
            "unreadable": unreadable,
            "detections": detections.len(),
            "stats": stats.0,
        });
        println!("{out}");
    } else {
        println!(
            "{}: {} layout, {} images, {} detections",
            args.model.model.display(),
            detector.layout().kind,
            dataset.images.len(),
            detections.len()
        );
        for (label, value) in CocoStats::LABELS.iter().zip(stats.0) {
            println!(" {label} = {value:.3}");
        }
    }
    if unreadable > 0 {
        return Err(Failure::BadInput(anyhow!(
            "{unreadable} of {} images could not be read; the metrics count them as missed",
            dataset.images.len()
        )));
    }
    Ok(())
}
