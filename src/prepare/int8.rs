//! The INT8 model a `[model]` table asks for: made from the FP32 model and the
//! configured calibration set on first use, then served from the cache
//! until the model file, the set, or the calibration options change.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::backend::{self, BackendError, BackendKind, EngineOptions};
use crate::config::{Bounded, ModelConfig, Real};
use crate::detector::{DetectionParams, Detector, DetectorError, declared_layout};
use crate::engine_cache::{ArtifactCache, CacheError};
use crate::model::{Layout, LayoutOverrides, MAX_MODEL_BYTES, OnnxModel};
use crate::quantize::{self, CalibrationSet, QuantizeError, QuantizeOptions, UnknownMethod};

/// Why the INT8 model could not be made or found.
#[derive(Debug, thiserror::Error)]
pub enum Int8Error {
    /// `model.int8.method` names no method.
    #[error(transparent)]
    Method(#[from] UnknownMethod),
    /// The FP32 model cannot be read to key the cache.
    #[error("cannot read the model: {0}")]
    ReadModel(#[source] std::io::Error),
    /// The FP32 model does not open on tract, whose preprocessing the
    /// calibration repeats.
    #[error(transparent)]
    Fp32(#[from] BackendError),
    /// Its layout is not a detector's.
    #[error(transparent)]
    Layout(#[from] DetectorError),
    /// The calibration set or the calibration itself failed.
    #[error(transparent)]
    Quantize(#[from] QuantizeError),
    /// Neither the cache nor the private temporary directory took it.
    #[error("cannot cache the INT8 model: {cache}; nor in the temporary directory: {}", fallback.as_ref().map_or_else(|| "there is no private one".to_owned(), ToString::to_string))]
    Store {
        /// Why `model.cache` did not take it.
        cache: CacheError,
        /// Why the temporary directory did not, if there is one.
        fallback: Option<CacheError>,
    },
}

/// File kind of cached Q/DQ models.
const KIND: &str = "int8.onnx";

/// The Q/DQ model for `model`, from the cache or freshly calibrated. The
/// detector will read the model with `overrides` (a command's layout
/// flags, and the class count of a class-name file) at `input_size`, so
/// the calibration preprocesses and weighs with the layout they give,
/// which is part of the cache key.
pub fn qdq_model(
    model: &ModelConfig,
    overrides: &LayoutOverrides,
    input_size: Option<(usize, usize)>,
) -> Result<PathBuf, Int8Error> {
    let int8 = &model.int8;
    let options = QuantizeOptions {
        method: quantize::parse_method(&int8.method)?,
        max_images: int8.images.map(Bounded::get),
        keep_float: int8.keep_float.clone(),
        equalize: int8.equalize,
        bias_correction: int8.bias_correction,
        adaround: int8.adaround,
        threshold_choice: int8.threshold_choice,
        auto_float_db: int8
            .auto_float
            .then(|| int8.auto_float_db.map(Real::get))
            .flatten(),
    };
    let set = CalibrationSet::scan(&int8.calibration, int8.images.map(Bounded::get))?;
    let source_sha256 = quantize::file_sha256(&model.path).map_err(Int8Error::ReadModel)?;
    // Read first, as it is in the key: from the declared shapes, a parse
    // of the file; tract's shape inference only where they do not tell.
    let layout = fp32_layout(&model.path, overrides, input_size)?;
    let key = quantize::cache_key(&source_sha256, &layout, &set, &options);
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
    let started = Instant::now();
    let mut progress = quantize::TenthsLog::new("INT8 calibration");
    let quantized =
        quantize::quantize(&model.path, &layout, &set, &options, &mut |done, total| {
            progress.update(done, total)
        })?;
    // A cache that cannot be written (full, read-only) must not cost the
    // calibration: the model goes to the temporary directory instead, and
    // the daemon runs it, where failing would restart into the same
    // calibration again and again.
    let path = match cache.store(&stem, &key, KIND, &quantized.bytes) {
        Ok(path) => path,
        Err(e) => {
            let stored = match &fallback {
                Some(f) => f.store(&stem, &key, KIND, &quantized.bytes).map_err(Some),
                None => Err(None),
            };
            let path = match stored {
                Ok(path) => path,
                Err(fallback) => return Err(Int8Error::Store { cache: e, fallback }),
            };
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

/// The layout of the FP32 model at `path` read with `overrides` at
/// `input_size`, as the detector will read it: its preprocessing
/// calibration repeats so that the statistics are those of the frames
/// inference will see, and its outputs weigh the trial models' errors.
/// From the shapes the file declares, or, where it does not declare them
/// all or another input size is asked for, from tract's shape inference.
pub fn fp32_layout(
    path: &Path,
    overrides: &LayoutOverrides,
    input_size: Option<(usize, usize)>,
) -> Result<Layout, Int8Error> {
    use std::io::Read;
    let mut onnx = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_MODEL_BYTES).read_to_end(&mut onnx))
        .map_err(Int8Error::ReadModel)?;
    // Bytes that do not decode leave it to tract, which names the problem.
    let declared = OnnxModel::from_bytes(onnx)
        .ok()
        .filter(|_| input_size.is_none())
        .and_then(|model| declared_layout(&model, overrides));
    if let Some(declared) = declared {
        return Ok(declared.map_err(DetectorError::from)?);
    }
    let options = EngineOptions {
        input_size,
        ..EngineOptions::default()
    };
    let engine = backend::open_engine(BackendKind::Tract, path, &options)?;
    let fp32 = Detector::new(engine, overrides, None, DetectionParams::LIVE)?;
    Ok(fp32.layout().clone())
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
