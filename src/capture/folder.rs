//! The image-folder source: the JPEG and PNG files of a directory, in name
//! order, once or looping. For demos, tests and replays. Pacing (fps) is
//! the caller's, so this stays free of clocks.

use std::path::{Path, PathBuf};

use crate::frame::{Frame, FrameError};

/// Why a folder cannot serve as a source.
#[derive(Debug, thiserror::Error)]
pub enum FolderError {
    /// The folder cannot be listed.
    #[error("{path}: cannot list image folder: {source}")]
    List {
        /// The folder.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A glob pattern that does not parse.
    #[error("{pattern}: bad glob pattern: {reason}")]
    Pattern {
        /// The pattern.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The folder has no JPEG or PNG files.
    #[error("{path}: no .jpg, .jpeg or .png files in the image folder")]
    Empty {
        /// The folder.
        path: PathBuf,
    },
}

/// Frames from the image files of one folder.
#[derive(Debug)]
pub struct FolderSource {
    files: Vec<PathBuf>,
    next: usize,
    looping: bool,
    max_pixels: u64,
}

fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| ["jpg", "jpeg", "png"].contains(&e.to_ascii_lowercase().as_str()))
}

impl FolderSource {
    /// Lists the images of a directory, or those matching a glob pattern
    /// (`/srv/replay/cam1-*.jpg`). Files added later are not picked up.
    pub fn open(dir: &Path, looping: bool) -> Result<FolderSource, FolderError> {
        let list_error = |source| FolderError::List {
            path: dir.to_owned(),
            source,
        };
        let pattern = dir.to_string_lossy();
        let candidates: Vec<PathBuf> = if pattern.contains(['*', '?', '[']) {
            glob::glob(&pattern)
                .map_err(|e| FolderError::Pattern {
                    pattern: pattern.clone().into_owned(),
                    reason: e.to_string(),
                })?
                .collect::<Result<_, _>>()
                .map_err(|e| FolderError::List {
                    path: e.path().to_owned(),
                    source: e.into(),
                })?
        } else {
            std::fs::read_dir(dir)
                .map_err(list_error)?
                .map(|entry| entry.map(|e| e.path()))
                .collect::<Result<_, _>>()
                .map_err(list_error)?
        };
        // Not only regular files: a FIFO named *.jpg lets another program
        // feed frames (and is how the watchdog test stalls a camera).
        let mut files: Vec<PathBuf> = candidates
            .into_iter()
            .filter(|p| !p.is_dir() && is_image(p))
            .collect();
        if files.is_empty() {
            return Err(FolderError::Empty {
                path: dir.to_owned(),
            });
        }
        files.sort();
        Ok(FolderSource {
            files,
            next: 0,
            looping,
            max_pixels: crate::frame::MAX_PIXELS,
        })
    }

    /// Refuses images of more than `max_pixels` pixels, before decoding
    /// them (the camera's frame budget).
    pub fn with_max_pixels(mut self, max_pixels: u64) -> FolderSource {
        self.max_pixels = max_pixels;
        self
    }

    /// The files played, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// The next file and its decoded frame (or why it would not decode:
    /// the caller counts it and goes on). `None` once a non-looping
    /// source has played every file.
    pub fn next_frame(&mut self) -> Option<(PathBuf, Result<Frame, FrameError>)> {
        if self.next == self.files.len() {
            if !self.looping {
                return None;
            }
            self.next = 0;
        }
        let path = self.files[self.next].clone();
        self.next += 1;
        let frame = Frame::from_file_within(&path, self.max_pixels);
        Some((path, frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path) {
        image::RgbImage::from_pixel(4, 3, image::Rgb([1, 2, 3]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn plays_images_in_name_order_skipping_other_files() {
        let dir = tempfile::tempdir().unwrap();
        png(&dir.path().join("b.PNG"));
        png(&dir.path().join("a.png"));
        std::fs::write(dir.path().join("notes.txt"), "x").unwrap();
        std::fs::write(dir.path().join("c.jpg"), b"broken").unwrap();
        let mut s = FolderSource::open(dir.path(), false).unwrap();
        let names: Vec<String> = std::iter::from_fn(|| s.next_frame())
            .map(|(p, f)| format!("{} {}", p.file_name().unwrap().to_string_lossy(), f.is_ok()))
            .collect();
        assert_eq!(names, ["a.png true", "b.PNG true", "c.jpg false"]);
        assert!(s.next_frame().is_none(), "played once");
    }

    #[test]
    fn a_glob_picks_the_matching_images() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["cam1-a.png", "cam1-b.png", "cam2-a.png"] {
            png(&dir.path().join(name));
        }
        let s = FolderSource::open(&dir.path().join("cam1-*.png"), false).unwrap();
        let names: Vec<_> = s.files().iter().map(|p| p.file_name().unwrap()).collect();
        assert_eq!(names, ["cam1-a.png", "cam1-b.png"]);
        let err = FolderSource::open(&dir.path().join("cam[.png"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad glob pattern"), "{err}");
        let err = FolderSource::open(&dir.path().join("cam9-*.png"), false)
            .unwrap_err()
            .to_string();
        assert!(err.contains("no .jpg, .jpeg or .png files"), "{err}");
    }

    #[test]
    fn loops_when_asked() {
        let dir = tempfile::tempdir().unwrap();
        png(&dir.path().join("only.png"));
        let mut s = FolderSource::open(dir.path(), true).unwrap();
        for _ in 0..3 {
            assert!(s.next_frame().unwrap().1.is_ok());
        }
    }

    #[test]
    fn missing_and_empty_folders_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope");
        let err = FolderSource::open(&missing, false).unwrap_err().to_string();
        assert!(err.contains("nope: cannot list image folder"), "{err}");
        let err = FolderSource::open(dir.path(), false)
            .unwrap_err()
            .to_string();
        assert!(
            err.ends_with("no .jpg, .jpeg or .png files in the image folder"),
            "{err}"
        );
    }
}
