//! ONNX protobuf plumbing for the quantizer: reading and writing tensors
//! and attributes, and lifting an opset 11/12 graph to opset 13, where
//! QuantizeLinear/DequantizeLinear gain the `axis` that per-channel weight
//! scales need.
//!
//! The upgrade converts each operator whose signature or meaning changed
//! by opset 13, and refuses operators it does not know to be unchanged, so
//! an unusual export fails loudly instead of being silently mistranslated.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{
    self, AttributeProto, ModelProto, NodeProto, TensorProto, attribute_proto, tensor_proto,
};

/// The opset the quantized model is written for: the first with
/// per-axis Q/DQ.
pub const QDQ_OPSET: i64 = 13;

/// IR version 7 is the first that may carry opset 13.
const QDQ_IR_VERSION: i64 = 7;

/// Default-domain operators whose opset-13 form reads the same graph as
/// their opset-11/12 form (opsets 12 and 13 only added types to them, or
/// turned optional inputs into optional-with-default).
const UNCHANGED_BY_13: &[&str] = &[
    "Abs",
    "Add",
    "ArgMax",
    "ArgMin",
    "AveragePool",
    "BatchNormalization",
    "Cast",
    "Ceil",
    "Clip",
    "Concat",
    "Constant",
    "ConstantOfShape",
    "Conv",
    "ConvTranspose",
    "DepthToSpace",
    "Div",
    "Dropout",
    "Equal",
    "Erf",
    "Exp",
    "Expand",
    "Flatten",
    "Floor",
    "Gather",
    "Gemm",
    "GlobalAveragePool",
    "GlobalMaxPool",
    "Greater",
    "HardSigmoid",
    "Identity",
    "InstanceNormalization",
    "LeakyRelu",
    "Less",
    "Log",
    "MatMul",
    "Max",
    "MaxPool",
    "Mean",
    "Min",
    "Mul",
    "Neg",
    "Not",
    "PRelu",
    "Pad",
    "Pow",
    "Range",
    "Reciprocal",
    "ReduceMax",
    "ReduceMean",
    "ReduceMin",
    "ReduceProd",
    "Relu",
    "Reshape",
    "Resize",
    "Shape",
    "Sigmoid",
    "Sign",
    "Slice",
    "SpaceToDepth",
    "Sqrt",
    "Sub",
    "Sum",
    "Tanh",
    "Tile",
    "TopK",
    "Transpose",
    "Upsample",
    "Where",
];

/// What the upgrade could not do.
#[derive(Debug, thiserror::Error)]
pub enum GraphError {
    /// The file has no graph.
    #[error("the model has no graph")]
    NoGraph,
    /// An operator whose opset-13 form the upgrade does not know.
    #[error(
        "node {node:?} ({op}) cannot be moved from opset {from} to {QDQ_OPSET}: its definition changed and nanodetd does not convert it"
    )]
    UnknownOp {
        /// Node name.
        node: String,
        /// Operator type.
        op: String,
        /// The model's opset.
        from: i64,
    },
    /// A tensor the quantizer must read is stored in a way it cannot.
    #[error("tensor {name:?}: {reason}")]
    Tensor {
        /// Tensor name.
        name: String,
        /// What is wrong.
        reason: String,
    },
}

/// The graph, or [`GraphError::NoGraph`].
pub fn graph_mut(model: &mut ModelProto) -> Result<&mut pb::GraphProto, GraphError> {
    model.graph.as_mut().ok_or(GraphError::NoGraph)
}

/// The default-domain opset a model imports (1 when it names none).
pub fn default_opset(model: &ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| o.domain.is_empty() || o.domain == "ai.onnx")
        .map_or(1, |o| o.version)
}

/// The graph's real inputs: declared inputs that are not initializers
/// (old exporters list every weight as an input too).
pub fn runtime_inputs(graph: &pb::GraphProto) -> Vec<String> {
    let weights: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
    graph
        .input
        .iter()
        .map(|i| i.name.clone())
        .filter(|n| !weights.contains(n.as_str()))
        .collect()
}

/// A float tensor's values, from `float_data` or little-endian `raw_data`.
pub fn read_f32(tensor: &TensorProto) -> Result<Vec<f32>, GraphError> {
    let fail = |reason: &str| GraphError::Tensor {
        name: tensor.name.clone(),
        reason: reason.to_owned(),
    };
    if tensor.data_type != tensor_proto::DataType::Float as i32 {
        return Err(fail("not a float32 tensor"));
    }
    if tensor.data_location == Some(tensor_proto::DataLocation::External as i32) {
        return Err(fail(
            "stored in an external data file, which the quantizer does not read",
        ));
    }
    // Checked: the dims come from the file (the qdq_writer fuzzer found a
    // product that overflowed).
    let expected = tensor
        .dims
        .iter()
        .try_fold(1i64, |n, &d| n.checked_mul(d))
        .ok_or_else(|| fail(&format!("dims {:?} overflow", tensor.dims)))?;
    let values: Vec<f32> = if !tensor.raw_data.is_empty() {
        tensor
            .raw_data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    } else {
        tensor.float_data.clone()
    };
    if values.len() as i64 != expected {
        return Err(fail(&format!(
            "{} values for dims {:?}",
            values.len(),
            tensor.dims
        )));
    }
    Ok(values)
}

/// A float32 initializer.
pub fn f32_tensor(name: &str, dims: &[i64], values: &[f32]) -> TensorProto {
    TensorProto {
        name: name.to_owned(),
        dims: dims.to_vec(),
        data_type: tensor_proto::DataType::Float as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..TensorProto::default()
    }
}

/// An int8 initializer of zeros (zero-points).
pub fn i8_zeros(name: &str, dims: &[i64]) -> TensorProto {
    let len: i64 = dims.iter().product();
    TensorProto {
        name: name.to_owned(),
        dims: dims.to_vec(),
        data_type: tensor_proto::DataType::Int8 as i32,
        raw_data: vec![0; len.max(1) as usize],
        ..TensorProto::default()
    }
}

/// An int64 initializer.
pub fn i64_tensor(name: &str, values: &[i64]) -> TensorProto {
    TensorProto {
        name: name.to_owned(),
        dims: vec![values.len() as i64],
        data_type: tensor_proto::DataType::Int64 as i32,
        raw_data: values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        ..TensorProto::default()
    }
}

/// An integer attribute.
pub fn int_attr(name: &str, value: i64) -> AttributeProto {
    AttributeProto {
        name: name.to_owned(),
        r#type: attribute_proto::AttributeType::Int as i32,
        i: value,
        ..AttributeProto::default()
    }
}

/// The value of an integer attribute.
pub fn attr_int(node: &NodeProto, name: &str) -> Option<i64> {
    node.attribute.iter().find(|a| a.name == name).map(|a| a.i)
}

/// Removes an integer-list attribute and returns its values.
fn take_ints(node: &mut NodeProto, name: &str) -> Option<Vec<i64>> {
    let at = node.attribute.iter().position(|a| a.name == name)?;
    Some(node.attribute.remove(at).ints)
}

/// A node of the default domain.
pub fn node(op: &str, name: &str, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.to_owned(),
        name: name.to_owned(),
        input: inputs.iter().map(|s| (*s).to_owned()).collect(),
        output: outputs.iter().map(|s| (*s).to_owned()).collect(),
        ..NodeProto::default()
    }
}

/// Names not yet used by any tensor or node in the graph.
pub struct FreshNames {
    taken: HashSet<String>,
}

impl FreshNames {
    /// Collects every name in `graph`.
    pub fn of(graph: &pb::GraphProto) -> FreshNames {
        let mut taken = HashSet::new();
        for n in &graph.node {
            taken.insert(n.name.clone());
            taken.extend(n.input.iter().cloned());
            taken.extend(n.output.iter().cloned());
        }
        taken.extend(graph.initializer.iter().map(|t| t.name.clone()));
        taken.extend(graph.input.iter().map(|t| t.name.clone()));
        taken.extend(graph.output.iter().map(|t| t.name.clone()));
        FreshNames { taken }
    }

    /// `base`, or `base_2`, `base_3`… if taken; the result is reserved.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_owned();
        let mut n = 2;
        while self.taken.contains(&name) {
            name = format!("{base}_{n}");
            n += 1;
        }
        self.taken.insert(name.clone());
        name
    }
}

/// Moves the model to opset 13 (if it is older), rewriting Split,
/// Squeeze, Unsqueeze and ReduceSum (attribute → input) and Softmax,
/// LogSoftmax and Hardmax (whose `axis` meant "flatten from here" before
/// 13). `rank` gives a tensor's rank where known; a Softmax over the last
/// axis needs no rewrite, any other is wrapped in Flatten/Reshape.
pub fn upgrade_to_qdq_opset(
    model: &mut ModelProto,
    rank: &dyn Fn(&str) -> Option<usize>,
) -> Result<(), GraphError> {
    let from = default_opset(model);
    if from >= QDQ_OPSET {
        return Ok(());
    }
    let graph = graph_mut(model)?;
    let mut names = FreshNames::of(graph);
    let mut new_initializers = Vec::new();
    let mut nodes = Vec::with_capacity(graph.node.len());
    for mut node in std::mem::take(&mut graph.node) {
        if !(node.domain.is_empty() || node.domain == "ai.onnx") {
            nodes.push(node);
            continue;
        }
        match node.op_type.as_str() {
            "Split" => move_ints_to_input(&mut node, "split", &mut names, &mut new_initializers),
            "Squeeze" | "Unsqueeze" | "ReduceSum" => {
                move_ints_to_input(&mut node, "axes", &mut names, &mut new_initializers)
            }
            "Softmax" | "LogSoftmax" | "Hardmax" => {
                let axis = attr_int(&node, "axis").unwrap_or(1);
                let input = node.input.first().cloned().unwrap_or_default();
                let last_axis = match rank(&input) {
                    Some(r) => axis == -1 || axis == r as i64 - 1,
                    None => axis == -1,
                };
                if !last_axis {
                    nodes.extend(flatten_around(node, axis, &mut names));
                    continue;
                }
                node.attribute.retain(|a| a.name != "axis");
                node.attribute.push(int_attr("axis", -1));
            }
            op if UNCHANGED_BY_13.contains(&op) => {}
            op => {
                return Err(GraphError::UnknownOp {
                    node: node.name.clone(),
                    op: op.to_owned(),
                    from,
                });
            }
        }
        nodes.push(node);
    }
    graph.node = nodes;
    graph.initializer.extend(new_initializers);
    for opset in &mut model.opset_import {
        if opset.domain.is_empty() || opset.domain == "ai.onnx" {
            opset.version = QDQ_OPSET;
        }
    }
    model.ir_version = model.ir_version.max(QDQ_IR_VERSION);
    Ok(())
}

/// Opset 13 made `split` / `axes` an int64 input.
fn move_ints_to_input(
    node: &mut NodeProto,
    attribute: &str,
    names: &mut FreshNames,
    initializers: &mut Vec<TensorProto>,
) {
    let Some(values) = take_ints(node, attribute) else {
        return;
    };
    let name = names.fresh(&format!("{}_{attribute}", node.name));
    initializers.push(i64_tensor(&name, &values));
    // Squeeze/Unsqueeze/ReduceSum/Split all take it as input 1.
    node.input.truncate(1);
    node.input.push(name);
}

/// Before opset 13 a softmax-like op flattened its input to 2-D at `axis`
/// and normalised each row; from 13 it normalises along `axis` alone. The
/// old meaning, spelled out: Flatten(axis) → op(axis=-1) → Reshape back.
fn flatten_around(mut node: NodeProto, axis: i64, names: &mut FreshNames) -> Vec<NodeProto> {
    let input = node.input.first().cloned().unwrap_or_default();
    let output = node.output.first().cloned().unwrap_or_default();
    let shape = names.fresh(&format!("{input}_shape"));
    let flat = names.fresh(&format!("{input}_flat"));
    let normalised = names.fresh(&format!("{output}_flat"));
    let shape_node = self::node(
        "Shape",
        &names.fresh(&format!("{}_shape", node.name)),
        &[&input],
        &[&shape],
    );
    let mut flatten = self::node(
        "Flatten",
        &names.fresh(&format!("{}_flatten", node.name)),
        &[&input],
        &[&flat],
    );
    flatten.attribute.push(int_attr("axis", axis));
    let reshape = self::node(
        "Reshape",
        &names.fresh(&format!("{}_reshape", node.name)),
        &[&normalised, &shape],
        &[&output],
    );
    node.input = vec![flat];
    node.output = vec![normalised];
    node.attribute.retain(|a| a.name != "axis");
    node.attribute.push(int_attr("axis", -1));
    vec![shape_node, flatten, node, reshape]
}

/// Sets (or replaces) a `metadata_props` entry.
pub fn set_metadata(model: &mut ModelProto, key: &str, value: String) {
    model.metadata_props.retain(|e| e.key != key);
    model.metadata_props.push(pb::StringStringEntryProto {
        key: key.to_owned(),
        value,
    });
}

/// A `metadata_props` entry.
pub fn metadata<'m>(model: &'m ModelProto, key: &str) -> Option<&'m str> {
    model
        .metadata_props
        .iter()
        .find(|e| e.key == key)
        .map(|e| e.value.as_str())
}

/// The node producing each tensor, by tensor name.
pub fn producers(graph: &pb::GraphProto) -> HashMap<&str, &NodeProto> {
    graph
        .node
        .iter()
        .flat_map(|n| n.output.iter().map(move |o| (o.as_str(), n)))
        .collect()
}

/// Initializers by name.
pub fn initializers(graph: &pb::GraphProto) -> HashMap<&str, &TensorProto> {
    graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model_with(nodes: Vec<NodeProto>, opset: i64) -> ModelProto {
        ModelProto {
            ir_version: 6,
            opset_import: vec![pb::OperatorSetIdProto {
                domain: String::new(),
                version: opset,
            }],
            graph: Some(pb::GraphProto {
                node: nodes,
                ..pb::GraphProto::default()
            }),
            ..ModelProto::default()
        }
    }

    #[test]
    fn split_and_unsqueeze_attributes_become_inputs() {
        let mut split = node("Split", "s", &["x"], &["a", "b"]);
        split.attribute.push(AttributeProto {
            name: "split".into(),
            ints: vec![58, 58],
            ..AttributeProto::default()
        });
        split.attribute.push(int_attr("axis", 1));
        let mut unsq = node("Unsqueeze", "u", &["a"], &["c"]);
        unsq.attribute.push(AttributeProto {
            name: "axes".into(),
            ints: vec![0],
            ..AttributeProto::default()
        });
        let mut m = model_with(vec![split, unsq], 11);
        upgrade_to_qdq_opset(&mut m, &|_| None).unwrap();
        let g = m.graph.as_ref().unwrap();
        assert_eq!(g.node[0].input, vec!["x", "s_split"]);
        assert_eq!(attr_int(&g.node[0], "axis"), Some(1), "axis stays");
        assert_eq!(g.node[1].input, vec!["a", "u_axes"]);
        let init = initializers(g);
        assert_eq!(init["s_split"].raw_data.len(), 16);
        assert_eq!(default_opset(&m), 13);
        assert_eq!(m.ir_version, 7);
    }

    #[test]
    fn softmax_over_the_last_axis_is_kept_and_others_are_flattened() {
        let mut last = node("Softmax", "last", &["x"], &["y"]);
        last.attribute.push(int_attr("axis", 1));
        let mut mid = node("Softmax", "mid", &["z"], &["w"]);
        mid.attribute.push(int_attr("axis", 1));
        let mut m = model_with(vec![last, mid], 11);
        let rank = |t: &str| match t {
            "x" => Some(2),
            "z" => Some(4),
            _ => None,
        };
        upgrade_to_qdq_opset(&mut m, &rank).unwrap();
        let ops: Vec<&str> = m
            .graph
            .as_ref()
            .unwrap()
            .node
            .iter()
            .map(|n| n.op_type.as_str())
            .collect();
        assert_eq!(ops, ["Softmax", "Shape", "Flatten", "Softmax", "Reshape"]);
        let g = m.graph.as_ref().unwrap();
        assert_eq!(attr_int(&g.node[0], "axis"), Some(-1));
        assert_eq!(g.node[4].output, vec!["w"], "the reshape restores the name");
    }

    #[test]
    fn an_unknown_operator_is_refused_by_name() {
        let mut m = model_with(vec![node("Scan", "loop7", &["x"], &["y"])], 11);
        let err = upgrade_to_qdq_opset(&mut m, &|_| None).unwrap_err();
        assert!(err.to_string().contains("\"loop7\" (Scan)"), "{err}");
    }

    #[test]
    fn raw_and_float_data_read_alike() {
        let raw = f32_tensor("w", &[2], &[1.5, -2.0]);
        assert_eq!(read_f32(&raw).unwrap(), vec![1.5, -2.0]);
        let listed = TensorProto {
            name: "v".into(),
            dims: vec![2],
            data_type: tensor_proto::DataType::Float as i32,
            float_data: vec![1.5, -2.0],
            ..TensorProto::default()
        };
        assert_eq!(read_f32(&listed).unwrap(), vec![1.5, -2.0]);
        let short = TensorProto {
            dims: vec![3],
            ..listed
        };
        assert!(read_f32(&short).is_err());
    }
}
