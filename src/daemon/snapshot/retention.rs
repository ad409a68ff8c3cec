//! Which snapshot files to delete: the oldest, while there are more than
//! `keep_count`, they take more than `keep_mib`, or they are older than
//! `keep_hours`. A state machine over the files' index, with the time
//! passed in; the writer thread deletes what it answers.

use std::collections::BTreeMap;
use std::path::PathBuf;

/// The limits, from `[snapshots]`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    /// Most files.
    pub count: usize,
    /// Most bytes.
    pub bytes: u64,
    /// Oldest, in seconds.
    pub age: f64,
}

/// The snapshot files, oldest first.
#[derive(Debug, Default)]
pub struct Retention {
    /// Path → (written at, Unix seconds; bytes).
    files: BTreeMap<PathBuf, (f64, u64)>,
    bytes: u64,
}

impl Retention {
    /// A file written (or rewritten: an object's better snapshot) at
    /// `written`, Unix seconds.
    pub fn add(&mut self, path: PathBuf, written: f64, bytes: u64) {
        if let Some((_, old)) = self.files.insert(path, (written, bytes)) {
            self.bytes = self.bytes.saturating_sub(old);
        }
        self.bytes = self.bytes.saturating_add(bytes);
    }

    /// Files now kept, and their bytes.
    pub fn totals(&self) -> (usize, u64) {
        (self.files.len(), self.bytes)
    }

    /// The files to delete at `now` under `limits`, oldest first; they
    /// leave the index.
    pub fn expire(&mut self, now: f64, limits: &Limits) -> Vec<PathBuf> {
        let mut by_age: Vec<(f64, PathBuf)> = self
            .files
            .iter()
            .map(|(path, &(written, _))| (written, path.clone()))
            .collect();
        by_age.sort_by(|a, b| a.0.total_cmp(&b.0).then_with(|| a.1.cmp(&b.1)));
        let mut doomed = Vec::new();
        for (written, path) in by_age {
            let over = self.files.len() > limits.count
                || self.bytes > limits.bytes
                || now - written > limits.age;
            if !over {
                break;
            }
            if let Some((_, bytes)) = self.files.remove(&path) {
                self.bytes = self.bytes.saturating_sub(bytes);
            }
            doomed.push(path);
        }
        doomed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(count: usize, bytes: u64, age: f64) -> Limits {
        Limits { count, bytes, age }
    }

    fn names(paths: &[PathBuf]) -> Vec<&str> {
        paths.iter().map(|p| p.to_str().unwrap()).collect()
    }

    /// Issue 19: retention deletes the oldest first, by count, bytes and age.
    #[test]
    fn the_oldest_go_first_by_count_bytes_and_age_issue_19() {
        let mut r = Retention::default();
        for (i, name) in ["a", "b", "c", "d"].iter().enumerate() {
            r.add(PathBuf::from(name), 100.0 + i as f64, 10);
        }
        assert!(r.expire(104.0, &limits(4, 40, 3600.0)).is_empty());
        assert_eq!(names(&r.expire(104.0, &limits(3, 40, 3600.0))), ["a"]);
        // 30 bytes in 3 files; 15 allowed.
        assert_eq!(names(&r.expire(104.0, &limits(3, 15, 3600.0))), ["b", "c"]);
        assert_eq!(r.totals(), (1, 10));
        // An hour later, d is too old.
        assert!(r.expire(3600.0, &limits(3, 40, 3600.0)).is_empty());
        assert_eq!(names(&r.expire(3704.0, &limits(3, 40, 3600.0))), ["d"]);
        assert_eq!(r.totals(), (0, 0));
    }

    #[test]
    fn a_rewritten_file_counts_once_with_its_new_size_and_time() {
        let mut r = Retention::default();
        r.add(PathBuf::from("a"), 1.0, 10);
        r.add(PathBuf::from("b"), 2.0, 10);
        r.add(PathBuf::from("a"), 3.0, 30);
        assert_eq!(r.totals(), (2, 40));
        assert_eq!(names(&r.expire(3.0, &limits(1, 100, 60.0))), ["b"]);
    }
}
