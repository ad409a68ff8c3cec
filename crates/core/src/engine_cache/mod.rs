//! Built artifacts kept on disk between runs: INT8 Q/DQ models now, and
//! TensorRT plans. An artifact's file name carries a key that hashes
//! everything that makes it valid, so a changed input simply misses;
//! files are written to a temporary name and renamed into place, so a
//! crash or a full disk never leaves a truncated artifact under a valid
//! name.

mod plan;

use std::io::Write;
use std::path::{Path, PathBuf};

pub use plan::{BuiltPlan, Lookup, PlanBuilder, PlanCache, PlanKey, PlanRecord, Provenance};

/// Hex digits of the key kept in file names (64 bits).
const KEY_CHARS: usize = 16;

/// Why the cache could not store an artifact.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {source}")]
pub struct CacheError {
    /// The file or directory involved.
    pub path: PathBuf,
    /// The OS error.
    pub source: std::io::Error,
}

/// A directory of keyed artifacts.
#[derive(Debug, Clone)]
pub struct ArtifactCache {
    dir: PathBuf,
}

impl ArtifactCache {
    /// A cache in `dir` (created on the first store).
    pub fn new(dir: impl Into<PathBuf>) -> ArtifactCache {
        ArtifactCache { dir: dir.into() }
    }

    /// Where the artifact `stem` with `key` and extension `kind` lives:
    /// `<dir>/<stem>.<key prefix>.<kind>`.
    pub fn path(&self, stem: &str, key: &str, kind: &str) -> PathBuf {
        let key = key.get(..KEY_CHARS).unwrap_or(key);
        self.dir.join(format!("{stem}.{key}.{kind}"))
    }

    /// The artifact's path, if it is there (and not empty).
    pub fn lookup(&self, stem: &str, key: &str, kind: &str) -> Option<PathBuf> {
        let path = self.path(stem, key, kind);
        let len = std::fs::metadata(&path).ok()?.len();
        (len > 0).then_some(path)
    }

    /// Stores `bytes` atomically and removes older artifacts of the same
    /// stem and kind (other keys can never be valid again for this stem's
    /// configuration; keeping them would only fill the disk).
    pub fn store(
        &self,
        stem: &str,
        key: &str,
        kind: &str,
        bytes: &[u8],
    ) -> Result<PathBuf, CacheError> {
        std::fs::create_dir_all(&self.dir).map_err(|source| CacheError {
            path: self.dir.clone(),
            source,
        })?;
        remove_abandoned_writes(&self.dir);
        let path = self.path(stem, key, kind);
        write_atomically(&path, bytes).map_err(|source| CacheError {
            path: path.clone(),
            source,
        })?;
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let old = entry.path();
                let name = entry.file_name();
                let name = name.to_string_lossy();
                let same_family = name.starts_with(&format!("{stem}."))
                    && name.ends_with(&format!(".{kind}"))
                    && name.len() == stem.len() + KEY_CHARS + kind.len() + 2;
                if same_family && old != path {
                    match std::fs::remove_file(&old) {
                        Ok(()) => log::info!("removed stale cache entry {}", old.display()),
                        Err(e) => log::warn!("cannot remove stale {}: {e}", old.display()),
                    }
                }
            }
        }
        Ok(path)
    }
}

/// How old a temporary file of [`write_atomically`] must be to count as
/// abandoned: a writer killed mid-write (`kill -9`, the OOM killer) leaves
/// it behind, and one per crash would fill the disk. A live write of even
/// a large engine plan takes seconds.
const ABANDONED_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Whether a directory entry is a temporary file of [`write_atomically`]
/// old enough to be abandoned.
fn is_abandoned_write(name: &str, age: std::time::Duration) -> bool {
    name.starts_with(".nanodetd-") && name.ends_with(".partial") && age >= ABANDONED_AFTER
}

/// Removes the abandoned temporary files in `dir`, before a store that
/// may need their room.
fn remove_abandoned_writes(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        if is_abandoned_write(&entry.file_name().to_string_lossy(), age) {
            let path = entry.path();
            match std::fs::remove_file(&path) {
                Ok(()) => log::info!("removed {}, left by an interrupted write", path.display()),
                Err(e) => log::warn!("cannot remove {}: {e}", path.display()),
            }
        }
    }
}

/// SHA-256 of `bytes`, in hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Lower-case hex, for digests in names and metadata.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Writes `bytes` to `path` through a temporary file in the same
/// directory, synced before the rename. Nothing is left behind on error.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut tmp = tempfile::Builder::new()
        .prefix(".nanodetd-")
        .suffix(".partial")
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    // The rename is durable only once the directory is synced too.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: a write killed midway left its temporary file for good.
    #[test]
    fn a_store_removes_temporary_files_an_interrupted_write_left() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir.path().join(".nanodetd-AbCd12.partial");
        let fresh = dir.path().join(".nanodetd-EfGh34.partial");
        let other = dir.path().join("notes.partial");
        for f in [&old, &fresh, &other] {
            std::fs::write(f, b"half a model").unwrap();
        }
        let two_minutes_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(120);
        for f in [&old, &other] {
            std::fs::File::options()
                .write(true)
                .open(f)
                .unwrap()
                .set_modified(two_minutes_ago)
                .unwrap();
        }
        ArtifactCache::new(dir.path())
            .store("m", "0123456789abcdef0123", "int8.onnx", b"model")
            .unwrap();
        assert!(!old.exists(), "abandoned: removed");
        assert!(fresh.exists(), "maybe a live write: kept");
        assert!(other.exists(), "not ours: kept");
        assert!(!is_abandoned_write(
            ".nanodetd-x.partial",
            std::time::Duration::from_secs(59)
        ));
        assert!(is_abandoned_write(".nanodetd-x.partial", ABANDONED_AFTER));
    }

    #[test]
    fn a_store_replaces_older_keys_and_lookup_finds_it() {
        let dir = tempfile::tempdir().unwrap();
        let cache = ArtifactCache::new(dir.path().join("c"));
        assert!(
            cache
                .lookup("m", "aaaaaaaaaaaaaaaaXX", "int8.onnx")
                .is_none()
        );
        let first = cache
            .store("m", "aaaaaaaaaaaaaaaaXX", "int8.onnx", b"one")
            .unwrap();
        assert_eq!(
            cache.lookup("m", "aaaaaaaaaaaaaaaaYY", "int8.onnx"),
            Some(first.clone()),
            "only the key prefix names the file"
        );
        cache
            .store("other", "cccccccccccccccc", "int8.onnx", b"x")
            .unwrap();
        let second = cache
            .store("m", "bbbbbbbbbbbbbbbb", "int8.onnx", b"two")
            .unwrap();
        assert!(!first.exists(), "the stale key is gone");
        assert_eq!(std::fs::read(&second).unwrap(), b"two");
        assert!(
            cache
                .lookup("other", "cccccccccccccccc", "int8.onnx")
                .is_some(),
            "other stems are kept"
        );
        let leftovers = std::fs::read_dir(dir.path().join("c"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .ends_with(".partial")
            })
            .count();
        assert_eq!(leftovers, 0);
    }

    #[test]
    fn a_failed_write_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("no/such/dir/model.onnx");
        assert!(write_atomically(&missing, b"x").is_err());
        assert!(!missing.exists());
    }
}
