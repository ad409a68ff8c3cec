//! Model-level knowledge that is not tied to a backend: output layouts and
//! their decoding, and class names.

mod batch;
mod decode;
mod fp16;
mod layout;
mod limits;
mod onnx;
mod rewrite;

use std::path::{Path, PathBuf};

pub use batch::{BATCH, BatchRewrite};
pub use decode::{Candidate, DecodeError, DecodeParams};
pub use fp16::HalfConversion;
#[cfg(test)]
pub(crate) use layout::square_layout;
pub use layout::{
    BoxEncoding, Layout, LayoutError, LayoutKind, LayoutOverrides, Level, OutputMap, TensorShape,
};
pub use limits::{
    MAX_INPUT_SIDE, MAX_MODEL_BYTES, MAX_TENSOR_ELEMENTS, SizeError, check_file_sizes, check_sizes,
};
pub use onnx::OnnxModel;
pub use rewrite::RewriteError;

/// The 80 COCO class names in NanoDet's training order, used when no
/// class-name file is given.
pub const COCO_CLASS_NAMES: [&str; 80] = [
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
];

/// Why a class-name file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ClassNamesError {
    /// The file could not be read.
    #[error("{path}: cannot read class names: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The file lists no names.
    #[error("{path}: no class names in file")]
    Empty {
        /// The file.
        path: PathBuf,
    },
    /// A name is longer than [`MAX_CLASS_NAME_BYTES`].
    #[error(
        "{path}: line {line}: a class name of {bytes} bytes; at most {MAX_CLASS_NAME_BYTES} are allowed"
    )]
    TooLong {
        /// The file.
        path: PathBuf,
        /// The name's line, from 1 (blank lines counted out).
        line: usize,
        /// Its length.
        bytes: usize,
    },
}

/// Longest class name, in bytes: it becomes a topic level and a field of
/// every event.
pub const MAX_CLASS_NAME_BYTES: usize = 128;

/// The name cached artifacts of the model file `path` go by: its stem
/// ("nanodet-plus-m_320"), or "model" for a path without one.
pub fn file_name_stem(path: &Path) -> String {
    path.file_stem()
        .map_or_else(|| "model".into(), |s| s.to_string_lossy().into_owned())
}

/// Reads one class name per line; blank lines and surrounding space are
/// ignored.
pub fn read_class_names(path: &Path) -> Result<Vec<String>, ClassNamesError> {
    let text = std::fs::read_to_string(path).map_err(|source| ClassNamesError::Read {
        path: path.to_owned(),
        source,
    })?;
    let names: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect();
    if names.is_empty() {
        return Err(ClassNamesError::Empty {
            path: path.to_owned(),
        });
    }
    // A name is a topic level and a JSON field in every event: one of 10 KB
    // made messages no broker took.
    if let Some((line, name)) = names
        .iter()
        .enumerate()
        .find(|(_, n)| n.len() > MAX_CLASS_NAME_BYTES)
    {
        return Err(ClassNamesError::TooLong {
            path: path.to_owned(),
            line: line + 1,
            bytes: name.len(),
        });
    }
    Ok(names)
}

#[cfg(test)]
mod class_name_tests {
    use super::*;

    /// Issue 17: a class name over 10 KB made every event for it a message
    /// no broker took.
    #[test]
    fn an_overlong_class_name_is_refused_with_its_line_issue_17() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("classes.txt");
        std::fs::write(&path, format!("person\n\n{}\n", "x".repeat(10_240))).unwrap();
        let err = read_class_names(&path).unwrap_err().to_string();
        assert!(
            err.ends_with("line 2: a class name of 10240 bytes; at most 128 are allowed"),
            "{err}"
        );
        std::fs::write(&path, format!("person\n{}\n", "y".repeat(128))).unwrap();
        assert_eq!(read_class_names(&path).unwrap().len(), 2);
    }
}
