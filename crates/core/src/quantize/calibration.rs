//! The calibration set: image files from a directory, chosen and hashed
//! before any work is done, so that the INT8 cache can tell whether the
//! set changed without decoding anything.

use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{CalibrationProblem, QuantizeError};
pub use crate::engine_cache::hex;
use crate::frame::Frame;

/// Extensions taken as calibration images; other files (a README, a
/// `.gitkeep`) are ignored rather than counted as corrupt.
pub(super) const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// Fewer usable images than this draws a warning: the activation ranges
/// of a handful of scenes say little about the rest.
pub const FEW_IMAGES: usize = 32;

/// The chosen files of a calibration directory and their digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CalibrationSet {
    /// The directory.
    pub dir: PathBuf,
    /// The chosen files, sorted by name.
    pub files: Vec<PathBuf>,
    /// Image files in the directory before `--images` chose among them.
    pub available: usize,
    /// SHA-256 over the chosen files' names, sizes and content hashes.
    pub digest: String,
}

impl CalibrationSet {
    /// Lists `dir`'s images (sorted by name), keeps `limit` of them spread
    /// evenly over the list (all when `None`), and hashes them.
    pub fn scan(dir: &Path, limit: Option<usize>) -> Result<CalibrationSet, QuantizeError> {
        let fail = |problem: CalibrationProblem| QuantizeError::Calibration {
            dir: dir.to_owned(),
            problem,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| fail(CalibrationProblem::List(e)))?;
        let mut all = Vec::new();
        for entry in entries {
            let path = entry.map_err(|e| fail(CalibrationProblem::List(e)))?.path();
            let is_image = path
                .extension()
                .and_then(|e| e.to_str())
                .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()));
            if is_image && path.is_file() {
                all.push(path);
            }
        }
        all.sort();
        if all.is_empty() {
            return Err(fail(CalibrationProblem::NoImages));
        }
        let available = all.len();
        let files = match limit {
            Some(0) => return Err(fail(CalibrationProblem::ZeroImages)),
            Some(n) if n < available => spread(&all, n),
            _ => all,
        };
        let mut hasher = Sha256::new();
        for file in &files {
            let (size, content) = hash_file(file).map_err(|source| QuantizeError::Image {
                path: file.clone(),
                source,
            })?;
            let name = file
                .file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or(&[]);
            hasher.update(name);
            hasher.update([0]);
            hasher.update(size.to_le_bytes());
            hasher.update(content);
        }
        Ok(CalibrationSet {
            dir: dir.to_owned(),
            files,
            available,
            digest: hex(&hasher.finalize()),
        })
    }
}

/// Side of the grey thumbnail two frames are compared on.
const THUMB: usize = 32;

/// A small grey thumbnail of a frame, for telling near-duplicate
/// calibration frames apart: a parked car at 2 fps makes hundreds of
/// identical frames that would only weigh the statistics towards one scene.
#[derive(Debug, Clone, PartialEq)]
pub struct Thumbnail(Vec<f32>);

impl Thumbnail {
    /// Box-averages `frame` down to 32×32 grey levels (0..255).
    pub fn of(frame: &Frame) -> Thumbnail {
        let (w, h, c) = (frame.width(), frame.height(), frame.format().channels());
        let data = frame.data();
        let mut sums = vec![0.0f32; THUMB * THUMB];
        let mut counts = vec![0u32; THUMB * THUMB];
        for y in 0..h {
            let ty = y * THUMB / h.max(1);
            for x in 0..w {
                let tx = x * THUMB / w.max(1);
                let px = &data[(y * w + x) * c..(y * w + x + 1) * c];
                let grey = px.iter().map(|&v| f32::from(v)).sum::<f32>() / c as f32;
                sums[ty * THUMB + tx] += grey;
                counts[ty * THUMB + tx] += 1;
            }
        }
        Thumbnail(
            sums.iter()
                .zip(&counts)
                .map(|(s, &n)| s / n.max(1) as f32)
                .collect(),
        )
    }

    /// Mean absolute grey-level difference, as a fraction of full scale.
    pub fn difference(&self, other: &Thumbnail) -> f32 {
        let total: f32 = self
            .0
            .iter()
            .zip(&other.0)
            .map(|(a, b)| (a - b).abs())
            .sum();
        total / (self.0.len().max(1) as f32 * 255.0)
    }
}

/// Size and SHA-256 of a file, read in blocks.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, [u8; 32])> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut size = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((size, hasher.finalize().into()))
}

/// `n` of `items` spread evenly over them, first included (all of them
/// when there are no more than `n`).
pub(crate) fn spread<T: Clone>(items: &[T], n: usize) -> Vec<T> {
    if n == 0 || n >= items.len() {
        return items.to_vec();
    }
    (0..n)
        .filter_map(|i| items.get(i * items.len() / n).cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_digest_follows_names_and_content_and_the_limit_spreads_out() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..10 {
            std::fs::write(dir.path().join(format!("{i:02}.jpg")), [i as u8; 3]).unwrap();
        }
        std::fs::write(dir.path().join("README.md"), "not an image").unwrap();
        let all = CalibrationSet::scan(dir.path(), None).unwrap();
        assert_eq!(all.files.len(), 10, "the README is not an image");
        let five = CalibrationSet::scan(dir.path(), Some(5)).unwrap();
        let names: Vec<_> = five
            .files
            .iter()
            .map(|f| f.file_name().unwrap().to_str().unwrap().to_owned())
            .collect();
        assert_eq!(names, ["00.jpg", "02.jpg", "04.jpg", "06.jpg", "08.jpg"]);
        assert_ne!(all.digest, five.digest);
        assert_eq!(
            all.digest,
            CalibrationSet::scan(dir.path(), None).unwrap().digest
        );
        std::fs::write(dir.path().join("03.jpg"), [9u8; 3]).unwrap();
        assert_ne!(
            all.digest,
            CalibrationSet::scan(dir.path(), None).unwrap().digest
        );
    }

    #[test]
    fn thumbnails_tell_a_changed_scene_from_sensor_noise() {
        let frame = |f: &dyn Fn(usize, usize) -> u8| {
            let data: Vec<u8> = (0..48 * 64).flat_map(|i| [f(i % 64, i / 64); 3]).collect();
            Frame::from_packed(64, 48, crate::frame::PixelFormat::Rgb8, data, "test").unwrap()
        };
        let base = Thumbnail::of(&frame(&|x, _| (x * 4) as u8));
        let noisy = Thumbnail::of(&frame(&|x, y| (x * 4 + (x + y) % 3) as u8));
        let moved = Thumbnail::of(&frame(&|x, y| if y > 24 { 255 } else { (x * 4) as u8 }));
        assert!(
            base.difference(&noisy) < 0.01,
            "{}",
            base.difference(&noisy)
        );
        assert!(base.difference(&moved) > 0.2, "{}", base.difference(&moved));
        assert_eq!(base.difference(&base), 0.0);
    }

    #[test]
    fn missing_and_empty_directories_are_errors_naming_the_directory() {
        let dir = tempfile::tempdir().unwrap();
        let err = CalibrationSet::scan(dir.path(), None).unwrap_err();
        assert!(err.to_string().contains("no calibration images"), "{err}");
        let missing = dir.path().join("nope");
        let err = CalibrationSet::scan(&missing, None).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }
}
