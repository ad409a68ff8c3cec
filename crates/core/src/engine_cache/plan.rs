//! Engine plans (TensorRT's serialized engines) on disk, keyed by every
//! input that makes a plan valid and checked before use, so a plan is
//! never rebuilt without need and a stale or damaged one is never loaded.
//!
//! Each plan `<model>.<key>.plan` has a JSON sidecar `<model>.<key>.json`
//! with the key's fields, the plan's size and SHA-256, and the build's
//! time and log summary. The plan is written first and the sidecar last,
//! both atomically: a plan without a sidecar is an interrupted store and
//! is never loaded. A lock file per key makes concurrent starts build once.
//! Nothing here knows TensorRT: the builder and the deserializer are given.

use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{CacheError, hex, write_atomically};

/// Hex digits of the key in file names (64 bits).
const KEY_CHARS: usize = 16;

/// Everything that makes a plan valid. Any field changing means a rebuild.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanKey {
    /// The model's file stem: names files and messages.
    pub model: String,
    /// SHA-256 of the ONNX bytes the plan is built from.
    pub onnx_sha256: String,
    /// Calibration digest and quantization options ("" without INT8).
    pub quantization: String,
    /// fp32, fp16 or int8.
    pub precision: String,
    /// Builder options (workspace, tactics, strongly typed, ...).
    pub builder: String,
    /// Input shape `[N, C, H, W]` at batch 1.
    pub input: Vec<usize>,
    /// Largest batch of the optimisation profile.
    pub max_batch: usize,
    /// TensorRT version of the loaded library (not the headers').
    pub tensorrt: String,
    /// GPU name.
    pub gpu: String,
    /// Compute capability, e.g. "8.7".
    pub compute_capability: String,
    /// DLA core, if the plan runs on one.
    pub dla_core: Option<u32>,
}

impl PlanKey {
    /// SHA-256 over the key's canonical JSON.
    pub fn digest(&self) -> String {
        let json = serde_json::to_vec(self).unwrap_or_default();
        hex(&Sha256::digest(&json))
    }

    /// What differs from `older`, in words an operator reads in a log.
    pub fn changes_since(&self, older: &PlanKey) -> Vec<String> {
        let mut why = Vec::new();
        let mut field = |name: &str, old: String, new: String| {
            if old != new {
                why.push(format!("{name} {old} → {new}"));
            }
        };
        field("TensorRT", older.tensorrt.clone(), self.tensorrt.clone());
        field("GPU", older.gpu.clone(), self.gpu.clone());
        field(
            "compute capability",
            older.compute_capability.clone(),
            self.compute_capability.clone(),
        );
        field("precision", older.precision.clone(), self.precision.clone());
        field(
            "input",
            format!("{:?}", older.input),
            format!("{:?}", self.input),
        );
        field(
            "max batch",
            older.max_batch.to_string(),
            self.max_batch.to_string(),
        );
        field(
            "DLA core",
            format!("{:?}", older.dla_core),
            format!("{:?}", self.dla_core),
        );
        if older.onnx_sha256 != self.onnx_sha256 {
            why.push("model changed".into());
        }
        if older.quantization != self.quantization {
            why.push("calibration or quantization options changed".into());
        }
        if older.builder != self.builder {
            why.push("builder options changed".into());
        }
        why
    }
}

/// The sidecar stored beside a plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanRecord {
    /// What the plan was built for.
    pub key: PlanKey,
    /// Plan size in bytes.
    pub plan_bytes: u64,
    /// SHA-256 of the plan.
    pub plan_sha256: String,
    /// Seconds the build took.
    pub build_seconds: f64,
    /// The builder's log, summarised.
    pub builder_log: Vec<String>,
    /// When it was built (Unix seconds).
    pub built_at: u64,
}

/// A plan fresh from a builder.
#[derive(Debug, Clone)]
pub struct BuiltPlan {
    /// The serialized engine.
    pub plan: Vec<u8>,
    /// A summary of the builder's log (warnings, fallbacks).
    pub log: Vec<String>,
}

/// Builds plans. TensorRT behind the `tensorrt` feature; a stand-in in
/// the tests.
pub trait PlanBuilder {
    /// Why a build failed; also what a plan that does not load gives.
    type Error: std::fmt::Display;
    /// Builds the plan `key` describes.
    fn build(&self, key: &PlanKey) -> Result<BuiltPlan, Self::Error>;
}

/// Where a plan came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Provenance {
    /// Loaded from the cache.
    Cached,
    /// Built now, because of `why`; `stored` is false when the cache
    /// could not keep it (read-only or full disk).
    Built {
        /// Why the cache could not serve it.
        why: String,
        /// Whether it is in the cache now.
        stored: bool,
    },
}

/// What a lookup found.
#[derive(Debug)]
pub enum Lookup {
    /// A plan whose sidecar matches the key and whose bytes match the
    /// sidecar.
    Hit(Vec<u8>),
    /// Nothing usable, and why.
    Miss(String),
}

/// A directory of plans with a total size limit.
#[derive(Debug, Clone)]
pub struct PlanCache {
    dir: PathBuf,
    max_bytes: u64,
}

impl PlanCache {
    /// Plans in `dir`, evicting the least recently used beyond `max_bytes`.
    pub fn new(dir: impl Into<PathBuf>, max_bytes: u64) -> PlanCache {
        PlanCache {
            dir: dir.into(),
            max_bytes,
        }
    }

    fn path(&self, key: &PlanKey, ext: &str) -> PathBuf {
        let digest = key.digest();
        let short = digest.get(..KEY_CHARS).unwrap_or(&digest);
        self.dir.join(format!("{}.{short}.{ext}", key.model))
    }

    /// The plan for `key`, checked against its sidecar, or why not.
    pub fn lookup(&self, key: &PlanKey) -> Lookup {
        let sidecar = self.path(key, "json");
        let record: PlanRecord = match std::fs::read(&sidecar) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(r) => r,
                Err(e) => return Lookup::Miss(format!("sidecar unreadable ({e})")),
            },
            Err(_) => return Lookup::Miss(self.why_absent(key)),
        };
        if record.key != *key {
            let changes = key.changes_since(&record.key);
            return Lookup::Miss(if changes.is_empty() {
                "sidecar describes another plan".into()
            } else {
                changes.join(", ")
            });
        }
        let plan = match std::fs::read(self.path(key, "plan")) {
            Ok(p) => p,
            Err(e) => return Lookup::Miss(format!("plan missing ({e})")),
        };
        if (plan.len() as u64) < record.plan_bytes {
            return Lookup::Miss(format!(
                "plan truncated ({} of {} bytes)",
                plan.len(),
                record.plan_bytes
            ));
        }
        if plan.len() as u64 != record.plan_bytes
            || hex(&Sha256::digest(&plan)) != record.plan_sha256
        {
            return Lookup::Miss("plan corrupted (SHA-256 mismatch)".into());
        }
        // Recently used plans survive eviction: the sidecar's mtime is the
        // use time.
        if let Ok(f) = std::fs::File::options().append(true).open(&sidecar) {
            let _ = f.set_modified(SystemTime::now());
        }
        Lookup::Hit(plan)
    }

    /// Why there is no entry: the nearest older entry for the same model
    /// says what changed.
    fn why_absent(&self, key: &PlanKey) -> String {
        let prefix = format!("{}.", key.model);
        let mut newest: Option<(SystemTime, PlanKey)> = None;
        for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) || !name.ends_with(".json") {
                continue;
            }
            let Ok(bytes) = std::fs::read(entry.path()) else {
                continue;
            };
            let Ok(record) = serde_json::from_slice::<PlanRecord>(&bytes) else {
                continue;
            };
            let modified = entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(UNIX_EPOCH);
            if newest.as_ref().is_none_or(|(t, _)| modified > *t) {
                newest = Some((modified, record.key));
            }
        }
        match newest {
            Some((_, older)) => {
                let changes = key.changes_since(&older);
                if changes.is_empty() {
                    "no cached engine for this key".into()
                } else {
                    changes.join(", ")
                }
            }
            None => "no cached engine for this model".into(),
        }
    }

    /// Stores a plan (plan first, sidecar last, both atomic), then evicts
    /// the least recently used plans beyond the size limit.
    pub fn store(
        &self,
        key: &PlanKey,
        built: &BuiltPlan,
        build_seconds: f64,
    ) -> Result<PathBuf, CacheError> {
        let fail = |path: &Path| {
            let path = path.to_owned();
            move |source| CacheError { path, source }
        };
        std::fs::create_dir_all(&self.dir).map_err(fail(&self.dir))?;
        let plan_path = self.path(key, "plan");
        let sidecar = self.path(key, "json");
        write_atomically(&plan_path, &built.plan).map_err(fail(&plan_path))?;
        let record = PlanRecord {
            key: key.clone(),
            plan_bytes: built.plan.len() as u64,
            plan_sha256: hex(&Sha256::digest(&built.plan)),
            build_seconds,
            builder_log: built.log.clone(),
            built_at: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let json = serde_json::to_vec_pretty(&record).unwrap_or_default();
        write_atomically(&sidecar, &json).map_err(fail(&sidecar))?;
        self.evict(&sidecar);
        Ok(plan_path)
    }

    /// Removes the least recently used entries (and leftovers of
    /// interrupted stores) until the total fits; never `keep`.
    fn evict(&self, keep: &Path) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        let mut sidecars = Vec::new();
        let mut total = 0u64;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let Ok(meta) = entry.metadata() else { continue };
            if name.ends_with(".partial") {
                // An interrupted write: nobody will finish it.
                let stale = meta
                    .modified()
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 3600);
                if stale {
                    let _ = std::fs::remove_file(&path);
                }
                continue;
            }
            if name.ends_with(".json") {
                let plan = path.with_extension("plan");
                let size = meta.len() + std::fs::metadata(&plan).map_or(0, |m| m.len());
                total += size;
                sidecars.push((meta.modified().unwrap_or(UNIX_EPOCH), path, plan, size));
            } else if name.ends_with(".plan") && !path.with_extension("json").exists() {
                // A plan whose sidecar never came: an interrupted store.
                let _ = std::fs::remove_file(&path);
            }
        }
        sidecars.sort_by_key(|(used, ..)| *used);
        for (_, sidecar, plan, size) in sidecars {
            if total <= self.max_bytes {
                break;
            }
            if sidecar == keep {
                continue;
            }
            log::info!("engine cache over its limit: evicting {}", plan.display());
            let _ = std::fs::remove_file(&sidecar);
            let _ = std::fs::remove_file(&plan);
            total -= size;
        }
    }

    /// The plan for `key`, loaded by `load` (TensorRT's deserializer),
    /// from the cache or built by `builder` when the cache cannot serve
    /// it. A plan that fails to load is rebuilt. One process or thread
    /// builds a key at a time; the others then find it cached.
    pub fn get_or_build<T, E: std::fmt::Display>(
        &self,
        key: &PlanKey,
        builder: &dyn PlanBuilder<Error = E>,
        load: &mut dyn FnMut(&[u8]) -> Result<T, E>,
    ) -> Result<(T, Provenance), E> {
        let _lock = self.lock(key);
        let why = match self.lookup(key) {
            Lookup::Hit(plan) => match load(&plan) {
                Ok(engine) => return Ok((engine, Provenance::Cached)),
                Err(e) => format!("cached plan does not deserialize ({e})"),
            },
            Lookup::Miss(why) => why,
        };
        log::info!("building the {} engine: {why}", key.model);
        let started = Instant::now();
        let built = builder.build(key)?;
        let seconds = started.elapsed().as_secs_f64();
        let stored = match self.store(key, &built, seconds) {
            Ok(path) => {
                log::info!(
                    "engine built in {seconds:.1} s, cached as {}",
                    path.display()
                );
                true
            }
            Err(e) => {
                log::warn!(
                    "engine built in {seconds:.1} s but not cached: {e}; the next start builds again"
                );
                false
            }
        };
        let engine = load(&built.plan)?;
        Ok((engine, Provenance::Built { why, stored }))
    }

    /// An exclusive lock on the key, held until dropped; `None` where the
    /// directory cannot hold a lock file (then builds are not serialised).
    fn lock(&self, key: &PlanKey) -> Option<std::fs::File> {
        std::fs::create_dir_all(&self.dir).ok()?;
        let file = std::fs::File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.path(key, "lock"))
            .ok()?;
        file.lock().ok()?;
        Some(file)
    }
}
