//! Sizes a model file may declare, checked on its ONNX graph before any
//! backend builds it. A backend sizes its buffers from these shapes: an
//! input of 1×3×100000×100000 made tract ask for 92 GB, a million classes
//! for 8.4 GB, and the failed allocation aborted the whole daemon, on a hot
//! swap too. Real NanoDet exports are far inside every limit.

use tract_onnx::pb::{ValueInfoProto, tensor_shape_proto, type_proto};

use super::{OnnxModel, TensorShape};

/// Largest model file read, in bytes (NanoDet-Plus-m 416 is 4.8 MB).
pub const MAX_MODEL_BYTES: u64 = 512 << 20;
/// Largest input side, in pixels.
pub const MAX_INPUT_SIDE: i64 = 4096;
/// Most elements in one declared input or output, batch included (a
/// NanoDet-Plus 416 output is 0.4 M; 64 of them are 26 M).
pub const MAX_TENSOR_ELEMENTS: u64 = 64 << 20;

/// Why a model's declared sizes are refused.
#[derive(Debug, thiserror::Error)]
pub enum SizeError {
    /// The file is larger than [`MAX_MODEL_BYTES`].
    #[error("the model file is {bytes} bytes; at most {MAX_MODEL_BYTES} are read")]
    File {
        /// Its size.
        bytes: u64,
    },
    /// An input's height or width is over [`MAX_INPUT_SIDE`].
    #[error("input {name:?} is {dims:?}: a side over {MAX_INPUT_SIDE} pixels")]
    InputSide {
        /// The input.
        name: String,
        /// Its declared dimensions (-1: not fixed).
        dims: Vec<i64>,
    },
    /// A graph output that no node, input or initializer produces:
    /// tract-onnx 0.23 panics on it (found by fuzzing), which a release
    /// build turns into an abort.
    #[error("output {name:?} is produced by no node, input or initializer")]
    UnproducedOutput {
        /// The output.
        name: String,
    },
    /// A declared tensor holds more than [`MAX_TENSOR_ELEMENTS`].
    #[error("{what} {name:?} is {dims:?}: over {MAX_TENSOR_ELEMENTS} elements")]
    Elements {
        /// "input", "output" or "initializer".
        what: &'static str,
        /// The tensor.
        name: String,
        /// Its declared dimensions (-1: not fixed).
        dims: Vec<i64>,
    },
}

/// [`check_sizes`] on the file at `path`, reading at most
/// [`MAX_MODEL_BYTES`] of it. A file that cannot be read passes: the
/// backend reads it next, and names what is wrong as it always has.
pub fn check_file_sizes(path: &std::path::Path) -> Result<(), SizeError> {
    use std::io::Read;
    let mut onnx = Vec::new();
    let read =
        std::fs::File::open(path).and_then(|f| f.take(MAX_MODEL_BYTES + 1).read_to_end(&mut onnx));
    match read {
        Ok(_) => check_sizes(&onnx),
        Err(_) => Ok(()),
    }
}

/// Checks the sizes `onnx` declares: its inputs (sides and elements), its
/// outputs and its initializers (elements). Dimensions that are not fixed
/// (a symbolic batch) count as 1. Bytes that are not an ONNX model pass:
/// they declare no size, and the backend refuses them with its own words.
pub fn check_sizes(onnx: &[u8]) -> Result<(), SizeError> {
    if onnx.len() as u64 > MAX_MODEL_BYTES {
        return Err(SizeError::File {
            bytes: onnx.len() as u64,
        });
    }
    match OnnxModel::decode(onnx) {
        Ok(model) => model.check_sizes(),
        Err(_) => Ok(()),
    }
}

impl OnnxModel {
    /// [`check_sizes`] on a decoded model: the sizes its graph declares (a
    /// model without a graph declares none).
    pub fn check_sizes(&self) -> Result<(), SizeError> {
        let Ok(graph) = self.graph() else {
            return Ok(());
        };
        for input in &graph.input {
            let dims = dims_of(input);
            // NCHW: the last two are the image's sides.
            if dims.len() >= 2 && dims[dims.len() - 2..].iter().any(|&d| d > MAX_INPUT_SIDE) {
                return Err(SizeError::InputSide {
                    name: input.name.clone(),
                    dims,
                });
            }
            check_elements("input", &input.name, dims)?;
        }
        for output in &graph.output {
            check_elements("output", &output.name, dims_of(output))?;
        }
        for initializer in &graph.initializer {
            check_elements("initializer", &initializer.name, initializer.dims.clone())?;
        }
        let produced: std::collections::HashSet<&str> = graph
            .node
            .iter()
            .flat_map(|n| n.output.iter().map(String::as_str))
            .chain(graph.input.iter().map(|i| i.name.as_str()))
            .chain(graph.initializer.iter().map(|t| t.name.as_str()))
            .collect();
        if let Some(output) = graph
            .output
            .iter()
            .find(|o| !produced.contains(o.name.as_str()))
        {
            return Err(SizeError::UnproducedOutput {
                name: output.name.clone(),
            });
        }
        Ok(())
    }
}

fn check_elements(what: &'static str, name: &str, dims: Vec<i64>) -> Result<(), SizeError> {
    let elements = dims.iter().try_fold(1u64, |n, &d| {
        n.checked_mul(u64::try_from(d.max(1)).unwrap_or(u64::MAX))
    });
    if elements.is_none_or(|n| n > MAX_TENSOR_ELEMENTS) {
        return Err(SizeError::Elements {
            what,
            name: name.to_owned(),
            dims,
        });
    }
    Ok(())
}

impl OnnxModel {
    /// The image input's shape and the outputs' shapes as the model declares
    /// them, at batch 1: what a backend's shape inference would find, read
    /// without building one. `None` when the file does not say: one graph
    /// input besides the initializers, and every dimension but the leading
    /// batch fixed, or the outputs' shapes absent.
    pub fn declared_shapes(&self) -> Option<(Vec<usize>, Vec<TensorShape>)> {
        let graph = self.graph().ok()?;
        let initializers: std::collections::HashSet<&str> =
            graph.initializer.iter().map(|t| t.name.as_str()).collect();
        let mut inputs = graph
            .input
            .iter()
            .filter(|i| !initializers.contains(i.name.as_str()));
        let (Some(input), None) = (inputs.next(), inputs.next()) else {
            return None;
        };
        // A symbolic batch is 1; any other unknown dimension is not declared.
        let batch_one = |dims: Vec<i64>| -> Option<Vec<usize>> {
            dims.iter()
                .enumerate()
                .map(|(i, &d)| match (i, usize::try_from(d)) {
                    (_, Ok(d)) if d > 0 => Some(d),
                    (0, _) => Some(1),
                    _ => None,
                })
                .collect()
        };
        let input_shape = batch_one(dims_of(input)).filter(|s| !s.is_empty())?;
        if graph.output.is_empty() {
            return None;
        }
        let outputs = graph
            .output
            .iter()
            .map(|o| {
                let shape = batch_one(dims_of(o)).filter(|s| !s.is_empty())?;
                Some(TensorShape {
                    name: o.name.clone(),
                    shape,
                })
            })
            .collect::<Option<Vec<_>>>()?;
        Some((input_shape, outputs))
    }
}

/// Declared dimensions; -1 where one is not fixed.
fn dims_of(value: &ValueInfoProto) -> Vec<i64> {
    let Some(type_proto::Value::TensorType(tensor)) =
        value.r#type.as_ref().and_then(|t| t.value.as_ref())
    else {
        return Vec::new();
    };
    tensor
        .shape
        .as_ref()
        .map(|s| {
            s.dim
                .iter()
                .map(|d| match d.value {
                    Some(tensor_shape_proto::dimension::Value::DimValue(v)) => v,
                    _ => -1,
                })
                .collect()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;
    use tract_onnx::pb::{GraphProto, ModelProto, TypeProto, ValueInfoProto, tensor_proto};

    fn value(name: &str, dims: &[i64]) -> ValueInfoProto {
        ValueInfoProto {
            name: name.into(),
            r#type: Some(TypeProto {
                value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                    elem_type: tensor_proto::DataType::Float as i32,
                    shape: Some(tract_onnx::pb::TensorShapeProto {
                        dim: dims
                            .iter()
                            .map(|&d| tensor_shape_proto::Dimension {
                                value: Some(if d > 0 {
                                    tensor_shape_proto::dimension::Value::DimValue(d)
                                } else {
                                    tensor_shape_proto::dimension::Value::DimParam("N".into())
                                }),
                                ..Default::default()
                            })
                            .collect(),
                    }),
                })),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn model(input: &[i64], output: &[i64]) -> Vec<u8> {
        ModelProto {
            graph: Some(GraphProto {
                input: vec![value("data", input)],
                output: vec![value("output", output)],
                node: vec![tract_onnx::pb::NodeProto {
                    op_type: "Identity".into(),
                    input: vec!["data".into()],
                    output: vec!["output".into()],
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
        .encode_to_vec()
    }

    /// Issue 17: shapes that made tract allocate 92 GB and 8.4 GB, and
    /// abort the daemon, are refused before any backend sees them.
    #[test]
    fn huge_inputs_and_outputs_are_refused_before_building_issue_17() {
        let err = check_sizes(&model(&[1, 3, 100_000, 100_000], &[1, 2125, 112])).unwrap_err();
        assert!(matches!(err, SizeError::InputSide { .. }), "{err}");
        let err = check_sizes(&model(&[1, 3, 320, 320], &[1, 2125, 1_000_032])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("output \"output\" is [1, 2125, 1000032]: over"),
            "{err}"
        );
        let err = check_sizes(&model(&[1, 3000, 4096, 4096], &[1, 2125, 112])).unwrap_err();
        assert!(
            matches!(err, SizeError::Elements { what: "input", .. }),
            "{err}"
        );
        // Not a model: left to the backend, which says so in its words.
        check_sizes(b"\xff\xff\xff not onnx").unwrap();
        // Real shapes, fixed or with a symbolic batch, pass.
        check_sizes(&model(&[1, 3, 416, 416], &[1, 3598, 112])).unwrap();
        check_sizes(&model(&[-1, 3, 320, 320], &[-1, 2125, 112])).unwrap();
    }

    /// Found by fuzzing (issue 17): a graph output that nothing produces
    /// made tract-onnx panic ("no entry found for key"), an abort in a
    /// release build.
    #[test]
    fn an_output_nothing_produces_is_refused_before_tract_sees_it() {
        let mut proto =
            ModelProto::decode(model(&[1, 3, 320, 320], &[1, 2125, 112]).as_slice()).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        graph.node.clear();
        let err = check_sizes(&proto.encode_to_vec()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "output \"output\" is produced by no node, input or initializer"
        );
    }

    #[test]
    fn declared_shapes_read_batch_one_and_refuse_what_is_not_fixed() {
        let shape = |v: &[usize]| v.to_vec();
        let declared_shapes = |onnx: &[u8]| OnnxModel::parse(onnx).unwrap().declared_shapes();
        let (input, outputs) =
            declared_shapes(&model(&[-1, 3, 320, 320], &[-1, 2125, 112])).unwrap();
        assert_eq!(input, shape(&[1, 3, 320, 320]));
        assert_eq!(outputs.len(), 1);
        assert_eq!(
            (outputs[0].name.as_str(), outputs[0].shape.clone()),
            ("output", shape(&[1, 2125, 112]))
        );
        // A size that is not fixed, or an output without a shape: the file
        // does not say, shape inference must.
        assert!(declared_shapes(&model(&[1, 3, -1, -1], &[1, 2125, 112])).is_none());
        assert!(declared_shapes(&model(&[1, 3, 320, 320], &[])).is_none());
        assert!(OnnxModel::parse(b"not onnx").is_err());
        // An initializer listed among the inputs (older exporters) is not
        // the image.
        let mut proto =
            ModelProto::decode(model(&[1, 3, 320, 320], &[1, 2125, 112]).as_slice()).unwrap();
        let graph = proto.graph.as_mut().unwrap();
        graph.input.push(value("weight", &[8, 3, 3, 3]));
        graph.initializer.push(tract_onnx::pb::TensorProto {
            name: "weight".into(),
            dims: vec![8, 3, 3, 3],
            ..Default::default()
        });
        let (input, _) = declared_shapes(&proto.encode_to_vec()).unwrap();
        assert_eq!(input, shape(&[1, 3, 320, 320]));
        proto.graph.as_mut().unwrap().initializer.clear();
        assert!(
            declared_shapes(&proto.encode_to_vec()).is_none(),
            "two inputs"
        );
    }
}
