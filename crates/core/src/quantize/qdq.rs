//! Q/DQ insertion by TensorRT's explicit-quantization rules: every
//! quantized Conv reads its activation through a per-tensor
//! QuantizeLinear → DequantizeLinear pair and its weight through a
//! per-output-channel (axis 0) pair. Weights stay float in the file, as
//! TensorRT 8.6 expects, and TensorRT folds the weight Q into INT8 itself.
//! Biases are left alone (float). Nothing is put on a network output.

use std::collections::{BTreeMap, HashMap, HashSet};

use tract_onnx::pb::{ModelProto, NodeProto, TensorProto};

use super::graph::{
    FreshNames, GraphError, f32_tensor, graph_mut, i8_zeros, int_attr, node, read_f32,
    runtime_inputs,
};
use super::histogram::weight_scales;

/// How a Conv is told apart: its node name, or its first output's name
/// when the exporter left nodes unnamed.
pub fn conv_id(node: &NodeProto) -> &str {
    if node.name.is_empty() {
        node.output.first().map_or("", String::as_str)
    } else {
        &node.name
    }
}

/// One Q/DQ pair to build.
struct Pair {
    /// Tensor it reads.
    source: String,
    /// The DequantizeLinear output that replaces `source` for its convs.
    dequantized: String,
    nodes: [NodeProto; 2],
}

/// Adds Q/DQ in front of the activation and weight of every Conv whose
/// [`conv_id`] is in `convs`. `activation_scale` gives each activation
/// tensor's per-tensor scale. Returns the number of Convs quantized.
pub fn insert_qdq(
    model: &mut ModelProto,
    convs: &HashSet<String>,
    activation_scale: &dyn Fn(&str) -> Option<f32>,
) -> Result<usize, GraphError> {
    let graph = graph_mut(model)?;
    let mut names = FreshNames::of(graph);
    let weights: HashMap<String, TensorProto> = graph
        .initializer
        .iter()
        .map(|t| (t.name.clone(), t.clone()))
        .collect();
    let graph_inputs: HashSet<String> = runtime_inputs(graph).into_iter().collect();

    // Ordered maps: the pairs that go first are written in their order, and
    // a HashMap's would make every run's file differ in bytes.
    let mut activation_pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut weight_pairs: BTreeMap<String, Pair> = BTreeMap::new();
    let mut new_initializers = Vec::new();
    let mut quantized = 0;
    for conv in graph.node.iter_mut() {
        if conv.op_type != "Conv" || !convs.contains(conv_id(conv)) {
            continue;
        }
        let (Some(activation), Some(weight)) = (conv.input.first(), conv.input.get(1)) else {
            continue;
        };
        let (activation, weight) = (activation.clone(), weight.clone());
        let scale = activation_scale(&activation).ok_or_else(|| GraphError::Tensor {
            name: activation.clone(),
            reason: "no calibration statistics for this Conv input".into(),
        })?;
        let pair = activation_pairs
            .entry(activation.clone())
            .or_insert_with(|| {
                let scale = f32_tensor(&names.fresh(&format!("{activation}_scale")), &[], &[scale]);
                let zero = i8_zeros(&names.fresh(&format!("{activation}_zero_point")), &[]);
                let pair = make_pair(&mut names, &activation, &scale.name, &zero.name, None);
                new_initializers.extend([scale, zero]);
                pair
            });
        conv.input[0] = pair.dequantized.clone();

        if !weight_pairs.contains_key(&weight) {
            let tensor = weights.get(&weight).ok_or_else(|| GraphError::Tensor {
                name: weight.clone(),
                reason: format!(
                    "the weight of Conv {:?} is not an initializer, so it cannot be quantized",
                    conv_id(conv)
                ),
            })?;
            let values = read_f32(tensor)?;
            let out_channels = tensor.dims.first().copied().unwrap_or(0).max(0);
            let scales = weight_scales(&values, out_channels as usize);
            let scale = f32_tensor(
                &names.fresh(&format!("{weight}_scale")),
                &[out_channels],
                &scales,
            );
            let zero = i8_zeros(
                &names.fresh(&format!("{weight}_zero_point")),
                &[out_channels],
            );
            let pair = make_pair(&mut names, &weight, &scale.name, &zero.name, Some(0));
            new_initializers.extend([scale, zero]);
            weight_pairs.insert(weight.clone(), pair);
        }
        if let Some(pair) = weight_pairs.get(&weight) {
            conv.input[1] = pair.dequantized.clone();
        }
        quantized += 1;
    }

    // Keep the node list topologically sorted: weight pairs and pairs on
    // graph inputs first, every other pair right after its producer.
    let mut by_producer: HashMap<String, Vec<NodeProto>> = HashMap::new();
    let mut first = Vec::new();
    for pair in weight_pairs.into_values() {
        first.extend(pair.nodes);
    }
    for pair in activation_pairs.into_values() {
        if graph_inputs.contains(&pair.source) || weights.contains_key(&pair.source) {
            first.extend(pair.nodes);
        } else {
            by_producer
                .entry(pair.source.clone())
                .or_default()
                .extend(pair.nodes);
        }
    }
    let mut nodes = first;
    for n in std::mem::take(&mut graph.node) {
        let after: Vec<NodeProto> = n
            .output
            .iter()
            .filter_map(|o| by_producer.remove(o))
            .flatten()
            .collect();
        nodes.push(n);
        nodes.extend(after);
    }
    graph.node = nodes;
    graph.initializer.extend(new_initializers);
    Ok(quantized)
}

fn make_pair(
    names: &mut FreshNames,
    source: &str,
    scale: &str,
    zero_point: &str,
    axis: Option<i64>,
) -> Pair {
    let quantized = names.fresh(&format!("{source}_quantized"));
    let dequantized = names.fresh(&format!("{source}_dequantized"));
    let mut q = node(
        "QuantizeLinear",
        &names.fresh(&format!("{source}_QuantizeLinear")),
        &[source, scale, zero_point],
        &[&quantized],
    );
    let mut dq = node(
        "DequantizeLinear",
        &names.fresh(&format!("{source}_DequantizeLinear")),
        &[&quantized, scale, zero_point],
        &[&dequantized],
    );
    if let Some(axis) = axis {
        q.attribute.push(int_attr("axis", axis));
        dq.attribute.push(int_attr("axis", axis));
    }
    Pair {
        source: source.to_owned(),
        dequantized,
        nodes: [q, dq],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_onnx::pb::{GraphProto, ValueInfoProto};

    /// Eight chained 1×1 Convs, each with its own weight, the first two
    /// reading the graph input.
    fn chain() -> ModelProto {
        let mut graph = GraphProto {
            input: vec![ValueInfoProto {
                name: "x".into(),
                ..ValueInfoProto::default()
            }],
            ..GraphProto::default()
        };
        let mut previous = "x".to_owned();
        for i in 0..8 {
            let (weight, output) = (format!("w{i}"), format!("a{i}"));
            let reads = if i == 1 {
                "x".to_owned()
            } else {
                previous.clone()
            };
            graph
                .initializer
                .push(f32_tensor(&weight, &[2, 2, 1, 1], &[0.5, -1.0, 0.25, 2.0]));
            graph.node.push(node(
                "Conv",
                &format!("conv{i}"),
                &[&reads, &weight],
                &[&output],
            ));
            previous = output;
        }
        ModelProto {
            graph: Some(graph),
            ..ModelProto::default()
        }
    }

    #[test]
    fn the_same_model_and_scales_give_the_same_nodes_in_the_same_order() {
        let convs: HashSet<String> = (0..8).map(|i| format!("conv{i}")).collect();
        let quantize = || {
            let mut model = chain();
            let done = insert_qdq(&mut model, &convs, &|_| Some(0.1)).unwrap();
            assert_eq!(done, 8);
            model
        };
        let first = quantize();
        for _ in 0..4 {
            assert_eq!(
                quantize(),
                first,
                "each map's random order must not reach the file"
            );
        }
        // Topologically sorted: every tensor is made before it is read.
        let graph = first.graph.as_ref().unwrap();
        let mut made: HashSet<&str> = graph.initializer.iter().map(|t| t.name.as_str()).collect();
        made.insert("x");
        for n in &graph.node {
            for input in &n.input {
                assert!(
                    made.contains(input.as_str()),
                    "{} reads {input} before it is made",
                    n.name
                );
            }
            made.extend(n.output.iter().map(String::as_str));
        }
        assert_eq!(
            graph.node.len(),
            8 + 2 * (8 + 8 - 1),
            "x is read by two Convs, one pair"
        );
    }
}
