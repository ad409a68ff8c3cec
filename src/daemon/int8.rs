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
    let fallback = fallback_cache();
    if let Some(path) = std::iter::once(&cache)
        .chain(fallback.as_ref())
        .find_map(|c| c.lookup(&stem, &key, KIND))
    {
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
    // A cache that cannot be written (full, read-only) must not cost the
    // calibration: the model goes to the temporary directory instead, and
    // the daemon runs it, where failing would restart into the same
    // calibration again and again.
    let path = match cache.store(&stem, &key, KIND, &quantized.bytes) {
        Ok(path) => path,
        Err(e) => {
            let path = fallback
                .ok_or_else(|| "no private temporary directory".to_owned())
                .and_then(|f| {
                    f.store(&stem, &key, KIND, &quantized.bytes)
                        .map_err(|e| e.to_string())
                })
                .map_err(|e2| {
                    format!(
                        "cannot cache the INT8 model: {e}; nor in the temporary directory: {e2}"
                    )
                })?;
            log::warn!(
                "cannot cache the INT8 model: {e}; running it from {} (model.cache needs room and write access, or the next start calibrates again)",
                path.display()
            );
            path
        }
    };
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

/// Where a built model goes when `model.cache` cannot take it: a
/// directory of the temporary one that only this user can write (under
/// systemd, PrivateTmp= makes it the unit's own). `None` when another
/// user owns it or could plant a model there.
fn fallback_cache() -> Option<ArtifactCache> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt};
    let dir = std::env::temp_dir().join(format!("nanodetd-cache-{}", nix::unistd::geteuid()));
    let _ = std::fs::DirBuilder::new().mode(0o700).create(&dir);
    let meta = std::fs::symlink_metadata(&dir).ok()?;
    let private =
        meta.is_dir() && meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o077 == 0;
    private.then(|| ArtifactCache::new(dir))
}
