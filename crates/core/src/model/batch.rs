//! Making a batch-1 export batchable. NanoDet exports fix the batch at 1
//! in the input, the outputs and in every Reshape's shape constant (a
//! leading 1). Several cameras batch together on a GPU, so the input and
//! output batch become a symbolic `N` and each Reshape constant's leading
//! 1 becomes 0 ("copy the input's dimension"). Graphs that fold the batch
//! into another axis cannot be fixed this way; the backend checks the
//! result (`validate_batch` in the tract backend) and falls back to batch 1.

use tract_onnx::pb::{self, tensor_proto, tensor_shape_proto, type_proto};

use super::{OnnxModel, RewriteError};
use crate::quantize::graph::runtime_inputs;

/// The symbolic batch dimension.
pub const BATCH: &str = "N";

/// What the rewrite changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BatchRewrite {
    /// Reshape shape constants whose leading 1 became 0.
    pub reshapes: usize,
    /// Reshapes whose shape is computed at run time or does not start
    /// with 1: left alone.
    pub untouched: usize,
}

impl OnnxModel {
    /// A copy rewritten for a symbolic batch.
    pub fn with_dynamic_batch(&self) -> Result<(OnnxModel, BatchRewrite), RewriteError> {
        let mut model = self.rewritable();
        let graph = model.graph_mut()?;
        let inputs = runtime_inputs(graph);
        let [input] = inputs.as_slice() else {
            return Err(RewriteError::Inputs(inputs.len()));
        };
        let input = input.clone();
        for value in graph.input.iter_mut().filter(|v| v.name == input) {
            set_leading_dim(value)?;
        }
        for value in graph.output.iter_mut() {
            set_leading_dim(value)?;
        }
        // Intermediate shapes recorded by the exporter would now be wrong.
        graph.value_info.clear();

        let constants: std::collections::HashMap<String, usize> = graph
            .node
            .iter()
            .enumerate()
            .filter(|(_, n)| n.op_type == "Constant")
            .filter_map(|(i, n)| n.output.first().map(|o| (o.clone(), i)))
            .collect();
        let mut rewrite = BatchRewrite {
            reshapes: 0,
            untouched: 0,
        };
        let reshape_shapes: Vec<(String, bool)> = graph
            .node
            .iter()
            .filter(|n| n.op_type == "Reshape")
            .map(|n| {
                let allow_zero = n
                    .attribute
                    .iter()
                    .any(|a| a.name == "allowzero" && a.i != 0);
                (n.input.get(1).cloned().unwrap_or_default(), allow_zero)
            })
            .collect();
        let mut done = std::collections::HashSet::new();
        for (shape, allow_zero) in reshape_shapes {
            if allow_zero || done.contains(&shape) {
                rewrite.untouched += usize::from(allow_zero);
                continue;
            }
            let tensor = if let Some(t) = graph.initializer.iter_mut().find(|t| t.name == shape) {
                Some(t)
            } else if let Some(&i) = constants.get(&shape) {
                graph.node[i]
                    .attribute
                    .iter_mut()
                    .find(|a| a.name == "value")
                    .and_then(|a| a.t.as_mut())
            } else {
                None
            };
            match tensor.map(lead_one_to_zero) {
                Some(true) => {
                    rewrite.reshapes += 1;
                    done.insert(shape);
                }
                _ => rewrite.untouched += 1,
            }
        }
        Ok((model, rewrite))
    }

    /// The image input's shape as declared, at batch 1 (a backend binds
    /// one image; the batch, fixed or symbolic, is read as 1). Any other
    /// symbolic dimension is an error naming it.
    pub fn input_shape(&self) -> Result<Vec<usize>, RewriteError> {
        let graph = self.graph()?;
        let inputs = runtime_inputs(graph);
        let [input] = inputs.as_slice() else {
            return Err(RewriteError::Inputs(inputs.len()));
        };
        let value = graph
            .input
            .iter()
            .find(|v| &v.name == input)
            .ok_or_else(|| RewriteError::Undeclared(input.clone()))?;
        let Some(type_proto::Value::TensorType(t)) =
            value.r#type.as_ref().and_then(|t| t.value.as_ref())
        else {
            return Err(RewriteError::NotATensor(input.clone()));
        };
        let dims = t
            .shape
            .as_ref()
            .map(|s| s.dim.as_slice())
            .unwrap_or_default();
        dims.iter()
            .enumerate()
            .map(|(i, d)| match (&d.value, i) {
                (_, 0) => Ok(1),
                (Some(tensor_shape_proto::dimension::Value::DimValue(v)), _) if *v > 0 => {
                    Ok(*v as usize)
                }
                (_, index) => Err(RewriteError::NotFixed {
                    input: input.clone(),
                    index,
                }),
            })
            .collect()
    }
}

/// Turns an int64 shape constant `[1, ...]` into `[0, ...]`.
fn lead_one_to_zero(t: &mut pb::TensorProto) -> bool {
    if t.data_type != tensor_proto::DataType::Int64 as i32 || t.dims.len() != 1 {
        return false;
    }
    if !t.raw_data.is_empty() {
        if t.raw_data.get(..8) == Some(&1i64.to_le_bytes()[..]) {
            t.raw_data[..8].copy_from_slice(&0i64.to_le_bytes());
            return true;
        }
        return false;
    }
    match t.int64_data.first_mut() {
        Some(v) if *v == 1 => {
            *v = 0;
            true
        }
        _ => false,
    }
}

fn set_leading_dim(value: &mut pb::ValueInfoProto) -> Result<(), RewriteError> {
    let Some(type_proto::Value::TensorType(t)) =
        value.r#type.as_mut().and_then(|t| t.value.as_mut())
    else {
        return Err(RewriteError::NotATensor(value.name.clone()));
    };
    let Some(dim) = t.shape.as_mut().and_then(|s| s.dim.first_mut()) else {
        return Err(RewriteError::NoShape(value.name.clone()));
    };
    dim.value = Some(tensor_shape_proto::dimension::Value::DimParam(BATCH.into()));
    Ok(())
}
