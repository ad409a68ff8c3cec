//! The engine-plan cache, on the CPU, with a stand-in builder behind the
//! same trait TensorRT implements: corruption, truncation, a writer killed
//! mid-store, concurrent starts, every key field, eviction, and a cache
//! that cannot be written.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nanodetd::engine_cache::{BuiltPlan, Lookup, PlanBuilder, PlanCache, PlanKey, Provenance};

/// Builds a "plan" that spells out its key, slowly if asked, and counts.
struct StandIn {
    builds: AtomicUsize,
    delay: Duration,
    size: usize,
}

impl StandIn {
    fn new() -> StandIn {
        StandIn {
            builds: AtomicUsize::new(0),
            delay: Duration::ZERO,
            size: 4096,
        }
    }
    fn builds(&self) -> usize {
        self.builds.load(Ordering::SeqCst)
    }
}

/// The stand-in's errors: what a real builder or deserializer would say.
#[derive(Debug, PartialEq, thiserror::Error)]
#[error("{0}")]
struct Refused(&'static str);

impl PlanBuilder for StandIn {
    type Error = Refused;
    fn build(&self, key: &PlanKey) -> Result<BuiltPlan, Refused> {
        self.builds.fetch_add(1, Ordering::SeqCst);
        std::thread::sleep(self.delay);
        let mut plan = format!("PLAN {}", key.digest()).into_bytes();
        plan.resize(self.size, 0xA5);
        Ok(BuiltPlan {
            plan,
            log: vec!["stand-in builder".into()],
        })
    }
}

/// The stand-in's "deserializer": a plan must start with its key.
fn loader(key: &PlanKey) -> impl FnMut(&[u8]) -> Result<String, Refused> + use<> {
    let expected = format!("PLAN {}", key.digest());
    move |plan: &[u8]| {
        if plan.starts_with(expected.as_bytes()) {
            Ok(expected.clone())
        } else {
            Err(Refused("not this key's plan"))
        }
    }
}

fn key() -> PlanKey {
    PlanKey {
        model: "nanodet-plus-m_320".into(),
        onnx_sha256: "aa".repeat(32),
        quantization: String::new(),
        precision: "fp16".into(),
        builder: "workspace=1GiB".into(),
        input: vec![1, 3, 320, 320],
        max_batch: 4,
        tensorrt: "10.3.0".into(),
        gpu: "Orin".into(),
        compute_capability: "8.7".into(),
        dla_core: None,
    }
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(ext))
        .collect();
    v.sort();
    v
}

#[test]
fn a_plan_is_built_once_then_served_and_every_key_field_forces_a_rebuild_with_its_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cache = PlanCache::new(dir.path(), u64::MAX);
    let builder = StandIn::new();
    let k = key();
    let (_, first) = cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap();
    assert_eq!(
        first,
        Provenance::Built {
            why: "no cached engine for this model".into(),
            stored: true
        }
    );
    let (_, second) = cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap();
    assert_eq!(second, Provenance::Cached);
    assert_eq!(builder.builds(), 1);

    type Edit = Box<dyn Fn(&mut PlanKey)>;
    let changes: Vec<(Edit, &str)> = vec![
        (
            Box::new(|k| k.tensorrt = "10.7.0".into()),
            "TensorRT 10.3.0 → 10.7.0",
        ),
        (
            Box::new(|k| k.onnx_sha256 = "bb".repeat(32)),
            "model changed",
        ),
        (
            Box::new(|k| k.quantization = "set abc, percentile".into()),
            "calibration or quantization options changed",
        ),
        (
            Box::new(|k| k.precision = "int8".into()),
            "precision fp16 → int8",
        ),
        (
            Box::new(|k| k.builder = "workspace=2GiB".into()),
            "builder options changed",
        ),
        (
            Box::new(|k| k.input = vec![1, 3, 416, 416]),
            "input [1, 3, 320, 320] → [1, 3, 416, 416]",
        ),
        (Box::new(|k| k.max_batch = 8), "max batch 4 → 8"),
        (Box::new(|k| k.gpu = "H100".into()), "GPU Orin → H100"),
        (
            Box::new(|k| k.compute_capability = "9.0".into()),
            "compute capability 8.7 → 9.0",
        ),
        (
            Box::new(|k| k.dla_core = Some(0)),
            "DLA core None → Some(0)",
        ),
    ];
    for (change, reason) in changes {
        let mut changed = key();
        change(&mut changed);
        // Compare with the original entry alone.
        let fresh = tempfile::tempdir().unwrap();
        let one = PlanCache::new(fresh.path(), u64::MAX);
        one.get_or_build(&k, &builder, &mut loader(&k)).unwrap();
        let (_, how) = one
            .get_or_build(&changed, &builder, &mut loader(&changed))
            .unwrap();
        match how {
            Provenance::Built { why, stored: true } => {
                assert!(why.contains(reason), "{why:?} lacks {reason:?}")
            }
            other => panic!("{reason}: {other:?}"),
        }
    }
}

#[test]
fn corruption_truncation_and_a_missing_sidecar_each_rebuild_and_say_why() {
    let dir = tempfile::tempdir().unwrap();
    let cache = PlanCache::new(dir.path(), u64::MAX);
    let builder = StandIn::new();
    let k = key();
    cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap();
    let plan = files(dir.path(), ".plan").pop().unwrap();
    let sidecar = files(dir.path(), ".json").pop().unwrap();
    let good = std::fs::read(&plan).unwrap();

    let mut flipped = good.clone();
    flipped[2000] ^= 0xFF;
    std::fs::write(&plan, &flipped).unwrap();
    assert!(matches!(cache.lookup(&k), Lookup::Miss(why) if why.contains("corrupted")));
    let (_, how) = cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap();
    assert!(matches!(how, Provenance::Built { why, .. } if why.contains("corrupted")));
    assert_eq!(std::fs::read(&plan).unwrap(), good, "rebuilt in place");

    std::fs::write(&plan, &good[..1000]).unwrap();
    assert!(
        matches!(cache.lookup(&k), Lookup::Miss(why) if why == "plan truncated (1000 of 4096 bytes)")
    );
    cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap();

    // A plan that hashes right but the deserializer rejects (another
    // TensorRT build of the same version, say) is rebuilt too.
    let sidecar_text = std::fs::read_to_string(&sidecar).unwrap();
    std::fs::write(&sidecar, "{ not json").unwrap();
    assert!(matches!(cache.lookup(&k), Lookup::Miss(why) if why.starts_with("sidecar unreadable")));
    std::fs::write(&sidecar, &sidecar_text).unwrap();
    let mut refuse = |_: &[u8]| -> Result<String, Refused> { Err(Refused("magic mismatch")) };
    let built_before = builder.builds();
    let err = cache.get_or_build(&k, &builder, &mut refuse).unwrap_err();
    assert_eq!(
        err,
        Refused("magic mismatch"),
        "a fresh plan that will not load is an error"
    );
    assert_eq!(builder.builds(), built_before + 1);

    // The plan stored, the sidecar never written (a crash in between):
    // not loadable, rebuilt.
    std::fs::remove_file(&sidecar).unwrap();
    assert!(matches!(cache.lookup(&k), Lookup::Miss(_)));
    let (_, how) = cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap();
    assert!(matches!(how, Provenance::Built { .. }));
    assert_eq!(builder.builds(), built_before + 2);
}

/// Not a test on its own: the child process of the kill test. It stores a
/// big plan into `NANODETD_PLAN_CACHE` and is killed while writing.
#[test]
#[ignore]
fn child_stores_a_big_plan() {
    let Some(dir) = std::env::var_os("NANODETD_PLAN_CACHE") else {
        return;
    };
    let cache = PlanCache::new(PathBuf::from(dir), u64::MAX);
    let builder = StandIn {
        size: 256 << 20,
        ..StandIn::new()
    };
    let k = key();
    cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap();
}

#[test]
fn a_writer_killed_mid_store_leaves_nothing_that_loads() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            // The full test path: this file is a module of the one
            // integration binary.
            "engine_cache::child_stores_a_big_plan",
            "--exact",
            "--ignored",
            "--nocapture",
        ])
        .env("NANODETD_PLAN_CACHE", dir.path())
        .spawn()
        .unwrap();
    // Kill it once its temporary file exists and is growing.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let partial = files(dir.path(), ".partial");
        if partial
            .first()
            .is_some_and(|p| std::fs::metadata(p).map_or(0, |m| m.len()) > 0)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the child never wrote"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        files(dir.path(), ".json").is_empty(),
        "no sidecar, so no entry"
    );
    let cache = PlanCache::new(dir.path(), u64::MAX);
    let k = key();
    assert!(matches!(cache.lookup(&k), Lookup::Miss(_)));
    // The next start builds and stores normally.
    let builder = StandIn::new();
    let (_, how) = cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap();
    assert!(matches!(how, Provenance::Built { stored: true, .. }));
    assert_eq!(files(dir.path(), ".plan").len(), 1);
}

#[test]
fn concurrent_starts_build_once() {
    let dir = tempfile::tempdir().unwrap();
    let builder = StandIn {
        delay: Duration::from_millis(300),
        ..StandIn::new()
    };
    let k = key();
    let provenances: Vec<Provenance> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                s.spawn(|| {
                    let cache = PlanCache::new(dir.path(), u64::MAX);
                    cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap().1
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(builder.builds(), 1, "{provenances:?}");
    assert_eq!(
        provenances
            .iter()
            .filter(|p| **p == Provenance::Cached)
            .count(),
        3
    );
}

#[test]
fn the_least_recently_used_plans_go_when_the_cache_is_over_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    // Room for two 4 KiB plans and their sidecars, not three.
    let cache = PlanCache::new(dir.path(), 10_000);
    let builder = StandIn::new();
    let keys: Vec<PlanKey> = (0..3)
        .map(|i| PlanKey {
            max_batch: i + 1,
            ..key()
        })
        .collect();
    cache
        .get_or_build(&keys[0], &builder, &mut loader(&keys[0]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    cache
        .get_or_build(&keys[1], &builder, &mut loader(&keys[1]))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    // Using the first makes the second the least recently used.
    assert!(matches!(cache.lookup(&keys[0]), Lookup::Hit(_)));
    std::thread::sleep(Duration::from_millis(20));
    cache
        .get_or_build(&keys[2], &builder, &mut loader(&keys[2]))
        .unwrap();
    assert!(matches!(cache.lookup(&keys[0]), Lookup::Hit(_)));
    assert!(matches!(cache.lookup(&keys[1]), Lookup::Miss(_)));
    assert!(matches!(cache.lookup(&keys[2]), Lookup::Hit(_)));
    assert_eq!(files(dir.path(), ".plan").len(), 2);
}

#[test]
fn a_cache_that_cannot_be_written_still_gives_an_engine() {
    // A path under a regular file can never be a directory, for root too.
    let file = tempfile::NamedTempFile::new().unwrap();
    let cache = PlanCache::new(file.path().join("engines"), u64::MAX);
    let builder = StandIn::new();
    let k = key();
    let (engine, how) = cache.get_or_build(&k, &builder, &mut loader(&k)).unwrap();
    assert!(engine.starts_with("PLAN "));
    assert!(
        matches!(how, Provenance::Built { stored: false, .. }),
        "{how:?}"
    );
}
