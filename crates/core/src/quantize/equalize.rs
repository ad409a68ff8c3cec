//! Activation equalization in front of depthwise convolutions (the
//! cross-layer equalization of Nagel et al., "Data-Free Quantization",
//! ICCV 2019, driven by measured activation ranges).
//!
//! A depthwise Conv's input gets one per-tensor INT8 scale, but its
//! channels can differ in range by 100×, so the quiet channels are left
//! with a few levels. For a chain `Conv₁ → [LeakyRelu|Relu] → depthwise
//! Conv₂`, dividing channel c of Conv₁'s weight and bias by s_c and
//! multiplying channel c of Conv₂'s weight by s_c computes exactly the
//! same function (both activations are positively homogeneous), and with
//! s_c = range_c / max range every channel fills the INT8 range. Both
//! weights are quantized per output channel, so their quantization does
//! not change at all.

use std::collections::HashMap;

use tract_onnx::pb::GraphProto;

use super::graph::{GraphError, attr_int, f32_tensor, producers, read_f32, runtime_inputs};

/// The smallest channel scale applied: quieter channels are raised by at
/// most this factor's inverse, so a nearly dead channel is not blown up.
pub const MIN_SCALE: f32 = 1.0 / 256.0;

/// One equalizable chain.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The producing Conv's weight and (optional) bias initializers.
    producer_weight: String,
    producer_bias: Option<String>,
    /// The depthwise Conv's weight initializer.
    depthwise_weight: String,
    /// The tensor the depthwise Conv reads, whose channel ranges are
    /// measured.
    pub tensor: String,
    /// Channels.
    pub channels: usize,
}

/// Finds every `Conv → [LeakyRelu|Relu] → depthwise Conv` chain whose
/// tensors and weights belong to that chain alone.
pub fn find_chains(graph: &GraphProto) -> Vec<Chain> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
        }
    }
    for o in &graph.output {
        *uses.entry(o.name.as_str()).or_default() += 1;
    }
    let only_once = |t: &str| uses.get(t).copied() == Some(1);
    let producer = producers(graph);
    let dims: HashMap<&str, &[i64]> = graph
        .initializer
        .iter()
        .map(|t| (t.name.as_str(), t.dims.as_slice()))
        .collect();
    let inputs = runtime_inputs(graph);

    let mut chains = Vec::new();
    for dw in graph.node.iter().filter(|n| n.op_type == "Conv") {
        let (Some(x), Some(w2)) = (dw.input.first(), dw.input.get(1)) else {
            continue;
        };
        let Some(&[channels, 1, ..]) = dims.get(w2.as_str()).copied() else {
            continue;
        };
        if attr_int(dw, "group") != Some(channels) || !only_once(x) || !only_once(w2) {
            continue;
        }
        let Some(mut p) = producer.get(x.as_str()).copied() else {
            continue;
        };
        if matches!(p.op_type.as_str(), "LeakyRelu" | "Relu") {
            let Some(y) = p.input.first().filter(|y| only_once(y)) else {
                continue;
            };
            let Some(conv) = producer.get(y.as_str()).copied() else {
                continue;
            };
            p = conv;
        }
        if p.op_type != "Conv" || p.input.first().is_some_and(|i| inputs.contains(i)) {
            continue;
        }
        let Some(w1) = p.input.get(1).filter(|w| only_once(w)) else {
            continue;
        };
        let bias = p.input.get(2).filter(|b| !b.is_empty());
        if dims.get(w1.as_str()).and_then(|d| d.first()) != Some(&channels)
            || bias.is_some_and(|b| !only_once(b) || !dims.contains_key(b.as_str()))
        {
            continue;
        }
        chains.push(Chain {
            producer_weight: w1.clone(),
            producer_bias: bias.cloned(),
            depthwise_weight: w2.clone(),
            tensor: x.clone(),
            channels: channels as usize,
        });
    }
    chains
}

/// Per-channel |x| maxima of an NCHW tensor (batch 1), folded into
/// `ranges`.
pub fn fold_channel_ranges(ranges: &mut [f32], values: &[f32]) {
    let per = values.len() / ranges.len().max(1);
    for (range, channel) in ranges.iter_mut().zip(values.chunks(per.max(1))) {
        let m = channel
            .iter()
            .filter(|v| v.is_finite())
            .fold(0.0f32, |m, v| m.max(v.abs()));
        *range = range.max(m);
    }
}

/// The channel scales for measured ranges: s_c = range_c / max range,
/// at least [`MIN_SCALE`]; channels never active stay as they are.
pub fn channel_scales(ranges: &[f32]) -> Vec<f32> {
    let top = ranges.iter().copied().fold(0.0f32, f32::max);
    ranges
        .iter()
        .map(|&r| {
            if r > 0.0 && top > 0.0 {
                (r / top).max(MIN_SCALE)
            } else {
                1.0
            }
        })
        .collect()
}

/// Rescales `chain`'s weights by `scales` in `graph`.
pub fn apply(graph: &mut GraphProto, chain: &Chain, scales: &[f32]) -> Result<(), GraphError> {
    let mut rescale = |name: &str, by: &dyn Fn(f32) -> f32| -> Result<(), GraphError> {
        let Some(t) = graph.initializer.iter_mut().find(|t| t.name == name) else {
            return Ok(());
        };
        let mut values = read_f32(t)?;
        let per = values.len() / chain.channels.max(1);
        for (channel, s) in values.chunks_mut(per.max(1)).zip(scales) {
            let factor = by(*s);
            channel.iter_mut().for_each(|v| *v *= factor);
        }
        let dims = t.dims.clone();
        *t = f32_tensor(name, &dims, &values);
        Ok(())
    };
    rescale(&chain.producer_weight, &|s| 1.0 / s)?;
    if let Some(bias) = &chain.producer_bias {
        rescale(bias, &|s| 1.0 / s)?;
    }
    rescale(&chain.depthwise_weight, &|s| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scales_raise_quiet_channels_and_leave_dead_ones() {
        let s = channel_scales(&[4.0, 1.0, 0.0, 0.001]);
        assert_eq!(s, [1.0, 0.25, 1.0, MIN_SCALE]);
        let mut ranges = [0.0f32; 2];
        fold_channel_ranges(&mut ranges, &[1.0, -3.0, 0.5, f32::NAN]);
        assert_eq!(ranges, [3.0, 0.5]);
    }
}
