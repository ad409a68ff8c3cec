//! What can stop a rewrite of an ONNX model (a batchable copy, an FP16
//! copy) or the reading of its input shape.

use crate::quantize::graph::GraphError;

/// Why a model could not be read or rewritten.
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    /// The bytes are not an ONNX ModelProto.
    #[error("not an ONNX model: {0}")]
    Decode(#[source] prost::DecodeError),
    /// The model has no graph.
    #[error("the model has no graph")]
    NoGraph,
    /// A detector has one image input.
    #[error("{0} inputs; a detector has one")]
    Inputs(usize),
    /// The runtime input is not among the declared inputs.
    #[error("input {0:?} is not declared")]
    Undeclared(String),
    /// A graph input or output that should be a tensor is not.
    #[error("{0:?} is not a tensor")]
    NotATensor(String),
    /// A graph input or output has no shape to rewrite.
    #[error("{0:?} has no shape")]
    NoShape(String),
    /// A dimension of the input other than the batch is symbolic.
    #[error("input {input:?} dimension {index} is not fixed")]
    NotFixed {
        /// The input.
        input: String,
        /// Which dimension.
        index: usize,
    },
    /// FP16 was asked of a Q/DQ model.
    #[error("a Q/DQ model keeps its float scales: build it as INT8 instead")]
    QdqToFp16,
    /// A weight could not be read.
    #[error(transparent)]
    Graph(#[from] GraphError),
}
