//! The INT8 model the daemon runs: made from the FP32 model and the
//! configured calibration set on first use, then served from the cache
//! until the model file, the set, or the calibration options change.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use crate::backend::{self, BackendKind, EngineOptions};
use crate::config::ModelConfig;
use crate::detector::{DetectionParams, Detector};
use crate::engine_cache::ArtifactCache;
use crate::model::LayoutOverrides;
use crate::quantize::{self, CalibrationSet, QuantizeOptions};

/// File kind of cached Q/DQ models.
const KIND: &str = "int8.onnx";

/// The Q/DQ model for `model`, from the cache or freshly calibrated.
/// Errors are one readable line.
pub fn qdq_model(model: &ModelConfig) -> Result<PathBuf, String> {
    let int8 = &model.int8;
    let options = QuantizeOptions {
        method: quantize::parse_method(&int8.method)?,
        max_images: int8.images,
        keep_float: int8.keep_float.clone(),
        equalize: int8.equalize,
    };
    let set = CalibrationSet::scan(&int8.calibration, int8.images).map_err(|e| e.to_string())?;
    let source_sha256 =
        quantize::file_sha256(&model.path).map_err(|e| format!("cannot read the model: {e}"))?;
    let key = quantize::cache_key(&source_sha256, &set, &options);
    let stem = crate::model::file_name_stem(&model.path);
    let cache = ArtifactCache::new(&model.cache);
    if let Some(path) = cache.lookup(&stem, &key, KIND) {
        log::info!("INT8 model from the cache: {}", path.display());
        return Ok(path);
    }

    log::info!(
        "making the INT8 model: {} images from {}, method {}",
        set.files.len(),
        set.dir.display(),
        int8.method
    );
    // The calibration images are preprocessed exactly as inference will
    // preprocess frames, so the FP32 model's layout decides it.
    let engine = backend::open_engine(BackendKind::Tract, &model.path, &EngineOptions::default())
        .map_err(|e| e.to_string())?;
    let fp32 = Detector::new(
        engine,
        &LayoutOverrides::default(),
        None,
        DetectionParams::LIVE,
    )
    .map(Arc::new)
    .map_err(|e| e.to_string())?;
    let started = Instant::now();
    let mut progress = quantize::TenthsLog::new("INT8 calibration");
    let quantized = quantize::quantize(
        &model.path,
        fp32.preprocess_spec(),
        &set,
        &options,
        &mut |done, total| progress.update(done, total),
    )
    .map_err(|e| e.to_string())?;
    let path = cache
        .store(&stem, &key, KIND, &quantized.bytes)
        .map_err(|e| format!("cannot cache the INT8 model: {e}"))?;
    let r = &quantized.report;
    log::info!(
        "INT8 model {} made in {:.1} s: {} Convs INT8, {} float, {} images ({} skipped)",
        path.display(),
        started.elapsed().as_secs_f64(),
        r.rules.quantized_convs,
        r.rules.float_convs,
        r.images_used,
        r.images_skipped.len()
    );
    Ok(path)
}
