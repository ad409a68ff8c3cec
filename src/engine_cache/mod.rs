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
