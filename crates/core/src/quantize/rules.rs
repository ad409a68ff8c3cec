//! Checks a Q/DQ model against TensorRT's explicit-quantization rules, so
//! a model that TensorRT would reject, or build wrongly, is caught on the
//! CPU before any engine build. The quantizer runs it on its own output;
//! the tests run it on every model they make.

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{ModelProto, NodeProto, TensorProto, tensor_proto};

use super::graph::{
    QDQ_OPSET, attr_int, default_opset, initializers, metadata, producers, read_f32,
};
use super::qdq::conv_id;

/// Metadata key listing the Convs deliberately left in float, by
/// [`conv_id`], comma-separated.
pub const FLOAT_CONVS_KEY: &str = "nanodetd.int8.float_convs";

/// What a passing model contains.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleSummary {
    /// Convs with Q/DQ on activation and weight.
    pub quantized_convs: usize,
    /// Convs left in float on purpose.
    pub float_convs: usize,
    /// QuantizeLinear/DequantizeLinear pairs.
    pub pairs: usize,
}

/// Checks every rule; returns all violations, each naming its node.
pub fn check(model: &ModelProto) -> Result<RuleSummary, Vec<String>> {
    let mut problems = Vec::new();
    let Some(graph) = model.graph.as_ref() else {
        return Err(vec!["the model has no graph".into()]);
    };
    if default_opset(model) < QDQ_OPSET {
        problems.push(format!(
            "opset {} < {QDQ_OPSET}: per-channel Q/DQ needs `axis`",
            default_opset(model)
        ));
    }
    let init = initializers(graph);
    let producer = producers(graph);
    let float_convs: HashSet<&str> = metadata(model, FLOAT_CONVS_KEY)
        .map(|v| v.split(',').filter(|s| !s.is_empty()).collect())
        .unwrap_or_default();

    let mut pairs = 0;
    for n in &graph.node {
        let name = &n.name;
        match n.op_type.as_str() {
            "QuantizeLinear" | "DequantizeLinear" => {
                check_scale_and_zero(n, &init, &mut problems);
                if n.op_type == "DequantizeLinear" {
                    pairs += 1;
                    match n.input.first().and_then(|i| producer.get(i.as_str())) {
                        Some(q) if q.op_type == "QuantizeLinear" => {
                            if q.input.get(1) != n.input.get(1) || q.input.get(2) != n.input.get(2)
                            {
                                problems.push(format!(
                                    "{name}: its QuantizeLinear {:?} uses other scale or zero-point tensors",
                                    q.name
                                ));
                            }
                        }
                        _ => problems.push(format!(
                            "{name}: DequantizeLinear not fed by a QuantizeLinear"
                        )),
                    }
                }
            }
            _ => {}
        }
    }

    let mut quantized_convs = 0;
    let mut kept = 0;
    for conv in graph.node.iter().filter(|n| n.op_type == "Conv") {
        let id = conv_id(conv);
        if float_convs.contains(id) {
            kept += 1;
            continue;
        }
        quantized_convs += 1;
        let dq_of = |input: usize| {
            conv.input
                .get(input)
                .and_then(|t| producer.get(t.as_str()))
                .filter(|p| p.op_type == "DequantizeLinear")
        };
        if dq_of(0).is_none() {
            problems.push(format!(
                "Conv {id}: its activation input is not a DequantizeLinear output"
            ));
        }
        match dq_of(1) {
            None => problems.push(format!(
                "Conv {id}: its weight is not a DequantizeLinear output"
            )),
            Some(dq) => check_weight(id, dq, &producer, &init, &mut problems),
        }
        if let Some(bias) = conv.input.get(2).filter(|b| !b.is_empty()) {
            match init.get(bias.as_str()) {
                Some(t) if t.data_type == tensor_proto::DataType::Float as i32 => {}
                _ => problems.push(format!(
                    "Conv {id}: bias {bias:?} must stay a float initializer"
                )),
            }
        }
    }
    for output in &graph.output {
        if let Some(p) = producer.get(output.name.as_str())
            && matches!(p.op_type.as_str(), "QuantizeLinear" | "DequantizeLinear")
        {
            problems.push(format!(
                "network output {:?} comes from {} {:?}",
                output.name, p.op_type, p.name
            ));
        }
    }
    if problems.is_empty() {
        Ok(RuleSummary {
            quantized_convs,
            float_convs: kept,
            pairs,
        })
    } else {
        Err(problems)
    }
}

fn check_scale_and_zero(
    n: &NodeProto,
    init: &HashMap<&str, &TensorProto>,
    problems: &mut Vec<String>,
) {
    let name = &n.name;
    let scale = n.input.get(1).and_then(|s| init.get(s.as_str()));
    let zero = n.input.get(2).and_then(|z| init.get(z.as_str()));
    let Some(scale) = scale else {
        problems.push(format!("{name}: scale is not an initializer"));
        return;
    };
    match read_f32(scale) {
        Ok(values) => {
            if let Some(bad) = values.iter().find(|s| !(s.is_finite() && **s > 0.0)) {
                problems.push(format!("{name}: scale {bad} is not finite and > 0"));
            }
            if values.len() > 1 && attr_int(n, "axis") != Some(0) {
                problems.push(format!(
                    "{name}: {} per-channel scales without axis = 0",
                    values.len()
                ));
            }
        }
        Err(e) => problems.push(format!("{name}: {e}")),
    }
    match zero {
        None => problems.push(format!(
            "{name}: zero-point missing (it would default to uint8)"
        )),
        Some(z) if z.data_type != tensor_proto::DataType::Int8 as i32 => {
            problems.push(format!("{name}: zero-point is not int8 (symmetric INT8)"))
        }
        Some(z) if z.raw_data.iter().any(|&b| b != 0) || z.int32_data.iter().any(|&v| v != 0) => {
            problems.push(format!("{name}: zero-point is not 0"))
        }
        Some(z) if z.dims != scale.dims => problems.push(format!(
            "{name}: zero-point dims {:?} differ from scale dims {:?}",
            z.dims, scale.dims
        )),
        Some(_) => {}
    }
}

fn check_weight(
    conv: &str,
    dq: &NodeProto,
    producer: &HashMap<&str, &NodeProto>,
    init: &HashMap<&str, &TensorProto>,
    problems: &mut Vec<String>,
) {
    let Some(q) = dq.input.first().and_then(|i| producer.get(i.as_str())) else {
        return; // reported with the pair
    };
    let weight = q.input.first().and_then(|w| init.get(w.as_str()));
    let scales = q
        .input
        .get(1)
        .and_then(|s| init.get(s.as_str()))
        .and_then(|s| read_f32(s).ok());
    let (Some(weight), Some(scales)) = (weight, scales) else {
        problems.push(format!(
            "Conv {conv}: weight Q/DQ does not read a float initializer with initializer scales"
        ));
        return;
    };
    let out_channels = weight.dims.first().copied().unwrap_or(0) as usize;
    if scales.len() != out_channels || attr_int(q, "axis") != Some(0) {
        problems.push(format!(
            "Conv {conv}: {} weight scales for {out_channels} output channels; one per channel on axis 0 is required",
            scales.len()
        ));
        return;
    }
    let Ok(values) = read_f32(weight) else {
        problems.push(format!("Conv {conv}: weight is not readable float32"));
        return;
    };
    let per = values.len() / out_channels.max(1);
    for (channel, (chunk, s)) in values.chunks(per.max(1)).zip(&scales).enumerate() {
        if let Some(w) = chunk.iter().find(|w| (*w / s).round().abs() > 127.0) {
            problems.push(format!(
                "Conv {conv}: channel {channel} weight {w} quantizes outside the narrow range [-127, 127]"
            ));
            return;
        }
    }
}
