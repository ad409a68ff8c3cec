//! [`OnnxModel`]: an ONNX file's protobuf, decoded once.
//!
//! Reading the graph (the sizes and shapes it declares, the input a
//! backend binds) and rewriting it (a batchable copy, an FP16 copy) are
//! methods of the decoded model, and a rewrite hands back a decoded model.
//! A chain of them, such as TensorRT's (an FP16 copy, made batchable, then
//! the input shape it binds), decodes the file once and encodes what the
//! backend's own parser reads once, where each step used to take bytes
//! and decode them again.

use std::borrow::Cow;

use prost::Message;
use tract_onnx::pb::{GraphProto, ModelProto};

use super::RewriteError;

/// A decoded ONNX model.
#[derive(Debug, Clone)]
pub struct OnnxModel {
    proto: ModelProto,
    /// The bytes it was decoded from, while it is unchanged: a backend is
    /// handed the file as exported, not a re-encoding (which would drop
    /// any field this protobuf schema does not know).
    source: Option<Vec<u8>>,
}

impl OnnxModel {
    /// Decodes `onnx`, keeping the bytes.
    pub fn from_bytes(onnx: Vec<u8>) -> Result<OnnxModel, RewriteError> {
        let proto = ModelProto::decode(onnx.as_slice()).map_err(RewriteError::Decode)?;
        Ok(OnnxModel {
            proto,
            source: Some(onnx),
        })
    }

    /// Decodes a copy of `onnx`.
    pub fn parse(onnx: &[u8]) -> Result<OnnxModel, RewriteError> {
        OnnxModel::from_bytes(onnx.to_vec())
    }

    /// Decodes `onnx` to read its graph, keeping no copy of the bytes (a
    /// model may be 512 MiB): [`bytes`](Self::bytes) then encodes the
    /// protobuf.
    pub fn decode(onnx: &[u8]) -> Result<OnnxModel, RewriteError> {
        let proto = ModelProto::decode(onnx).map_err(RewriteError::Decode)?;
        Ok(OnnxModel {
            proto,
            source: None,
        })
    }

    /// The bytes for a backend's own parser: those it was decoded from,
    /// or, once rewritten, the rewrite encoded.
    pub fn bytes(&self) -> Cow<'_, [u8]> {
        match &self.source {
            Some(onnx) => Cow::Borrowed(onnx),
            None => Cow::Owned(self.proto.encode_to_vec()),
        }
    }

    /// A copy to rewrite: it no longer has the bytes it came from.
    pub(super) fn rewritable(&self) -> OnnxModel {
        OnnxModel {
            proto: self.proto.clone(),
            source: None,
        }
    }

    /// Its graph.
    pub(super) fn graph(&self) -> Result<&GraphProto, RewriteError> {
        self.proto.graph.as_ref().ok_or(RewriteError::NoGraph)
    }

    /// Its graph, to rewrite.
    pub(super) fn graph_mut(&mut self) -> Result<&mut GraphProto, RewriteError> {
        self.proto.graph.as_mut().ok_or(RewriteError::NoGraph)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A backend gets the file as exported while the model is unchanged:
    /// a re-encoding would drop what this schema does not know (here a
    /// field numbered 100).
    #[test]
    fn an_unchanged_model_keeps_the_files_own_bytes() {
        let mut onnx = ModelProto {
            graph: Some(GraphProto {
                name: "g".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec();
        onnx.extend_from_slice(&[0xA0, 0x06, 0x01]);
        let kept = OnnxModel::parse(&onnx).unwrap();
        assert!(matches!(kept.bytes(), Cow::Borrowed(b) if b == onnx.as_slice()));
        let read_only = OnnxModel::decode(&onnx).unwrap();
        assert_eq!(
            read_only.bytes().len(),
            onnx.len() - 3,
            "unknown field dropped"
        );
        assert_eq!(read_only.graph().unwrap().name, "g");
        let rewritten = kept.rewritable();
        assert!(matches!(rewritten.bytes(), Cow::Owned(_)));
        assert!(OnnxModel::parse(b"\xff not onnx").is_err());
    }
}
