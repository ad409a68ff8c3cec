//! An FP16 copy of an FP32 export, for TensorRT 11: its networks are
//! strongly typed, so the ONNX's own types decide the precision and there
//! is no FP16 builder flag any more. Weights become float16; the input and
//! outputs stay float32 behind Cast nodes, so nothing around the engine
//! changes. Inputs the ONNX spec types as float whatever the data
//! (Resize's roi and scales) stay float32.

use std::collections::HashSet;

use tract_onnx::pb::{self, TensorProto, tensor_proto, type_proto};

use super::{OnnxModel, RewriteError};
use crate::quantize::graph::{read_f32, runtime_inputs};

const FLOAT: i32 = tensor_proto::DataType::Float as i32;
const FLOAT16: i32 = tensor_proto::DataType::Float16 as i32;

/// What the conversion did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HalfConversion {
    /// Float tensors (weights and constants) stored as float16.
    pub converted: usize,
    /// Float tensors kept float32 because their consumer requires it.
    pub kept_float: usize,
}

impl OnnxModel {
    /// A copy with every float weight in float16 and Casts at the input and
    /// outputs.
    pub fn to_fp16(&self) -> Result<(OnnxModel, HalfConversion), RewriteError> {
        let mut model = self.rewritable();
        let graph = model.graph_mut()?;
        if graph
            .node
            .iter()
            .any(|n| n.op_type == "QuantizeLinear" || n.op_type == "DequantizeLinear")
        {
            return Err(RewriteError::QdqToFp16);
        }
        // Inputs that the ONNX spec types as float32 whatever the data type.
        let must_stay_float: HashSet<String> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "Resize" || n.op_type == "Upsample")
            .flat_map(|n| n.input.iter().skip(1).cloned())
            .collect();
        let mut report = HalfConversion {
            converted: 0,
            kept_float: 0,
        };
        for tensor in &mut graph.initializer {
            half_tensor(tensor, &must_stay_float, &mut report)?;
        }
        for node in graph.node.iter_mut().filter(|n| n.op_type == "Constant") {
            let output = node.output.first().cloned().unwrap_or_default();
            for attribute in node.attribute.iter_mut().filter(|a| a.name == "value") {
                if let Some(tensor) = attribute.t.as_mut() {
                    if must_stay_float.contains(&output) {
                        report.kept_float += usize::from(tensor.data_type == FLOAT);
                    } else {
                        half_tensor(tensor, &HashSet::new(), &mut report)?;
                    }
                }
            }
        }
        // The declared weights among the inputs (old exporters list them)
        // change type with their initializers.
        let weights: HashSet<String> = graph
            .initializer
            .iter()
            .filter(|t| t.data_type == FLOAT16)
            .map(|t| t.name.clone())
            .collect();
        for input in graph.input.iter_mut().filter(|i| weights.contains(&i.name)) {
            set_elem_type(input, FLOAT16);
        }

        // Casts at the edges: the engine's bindings stay float32.
        let inputs = runtime_inputs(graph);
        let mut casts = Vec::new();
        for input in &inputs {
            let half = format!("{input}__fp16");
            for node in &mut graph.node {
                for name in node.input.iter_mut().filter(|n| *n == input) {
                    name.clone_from(&half);
                }
            }
            casts.push(cast(input, &half, FLOAT16));
        }
        let outputs: Vec<String> = graph.output.iter().map(|o| o.name.clone()).collect();
        for output in &outputs {
            let half = format!("{output}__fp16");
            for node in &mut graph.node {
                for name in node.output.iter_mut().filter(|n| *n == output) {
                    name.clone_from(&half);
                }
                for name in node.input.iter_mut().filter(|n| *n == output) {
                    name.clone_from(&half);
                }
            }
            graph.node.push(cast(&half, output, FLOAT));
        }
        casts.append(&mut graph.node);
        graph.node = casts;
        // Intermediate types recorded by the exporter are float32: now wrong.
        graph.value_info.clear();

        Ok((model, report))
    }
}

fn half_tensor(
    tensor: &mut TensorProto,
    keep: &HashSet<String>,
    report: &mut HalfConversion,
) -> Result<(), RewriteError> {
    if tensor.data_type != FLOAT {
        return Ok(());
    }
    if keep.contains(&tensor.name) {
        report.kept_float += 1;
        return Ok(());
    }
    let values = read_f32(tensor)?;
    tensor.raw_data = values
        .iter()
        .flat_map(|&v| half::f16::from_f32(v).to_bits().to_le_bytes())
        .collect();
    tensor.float_data.clear();
    tensor.data_type = FLOAT16;
    report.converted += 1;
    Ok(())
}

fn set_elem_type(value: &mut pb::ValueInfoProto, elem_type: i32) {
    if let Some(type_proto::Value::TensorType(tensor)) =
        value.r#type.as_mut().and_then(|t| t.value.as_mut())
    {
        tensor.elem_type = elem_type;
    }
}

fn cast(input: &str, output: &str, to: i32) -> pb::NodeProto {
    pb::NodeProto {
        input: vec![input.to_owned()],
        output: vec![output.to_owned()],
        name: format!("{output}__cast"),
        op_type: "Cast".into(),
        attribute: vec![pb::AttributeProto {
            name: "to".into(),
            r#type: pb::attribute_proto::AttributeType::Int as i32,
            i: i64::from(to),
            ..Default::default()
        }],
        ..Default::default()
    }
}
