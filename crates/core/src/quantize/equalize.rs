//! Activation equalization (the cross-layer equalization of Nagel et al.,
//! "Data-Free Quantization", ICCV 2019, driven by measured activation
//! ranges).
//!
//! A Conv's input gets one per-tensor INT8 scale, but its channels can
//! differ in range by 100×, so the quiet channels are left with a few
//! levels. For a chain `Conv₁ → [LeakyRelu|Relu] → [MaxPool] → Conv₂…`,
//! dividing channel c of Conv₁'s weight and bias by s_c and multiplying
//! input channel c of every Conv₂'s weight by s_c computes exactly the same
//! function: the activations are positively homogeneous and a max pool
//! commutes with a positive per-channel scale.
//!
//! Conv₁'s weight is quantized per output channel, so its quantization
//! does not change. A depthwise Conv₂'s is per channel too: for chains
//! that feed only depthwise Convs, s_c = range_c / max range fills the
//! INT8 range with every channel. A full Conv₂ (group 1) has a weight row
//! per output channel across all input channels, and raising a quiet
//! activation channel shrinks its weight column inside those rows, so
//! such chains split the difference as the paper does: s_c =
//! √(a_c / w_c), with a_c the channel's activation range and w_c its
//! weight column's largest share of a row's range, both relative. This is
//! what the ShuffleNet stems of the legacy NanoDet models need (the max
//! pool's output, read by a depthwise and a 1×1 Conv): one of its 24
//! channels spans 2 % of the tensor's range (docs/INT8.md).

use std::collections::{HashMap, HashSet};

use tract_onnx::pb::{GraphProto, NodeProto, TensorProto};

use super::graph::{GraphError, attr_int, f32_tensor, producers, read_f32};

/// The smallest channel scale applied: quieter channels are raised by at
/// most this factor's inverse, so a nearly dead channel is not blown up.
pub const MIN_SCALE: f32 = 1.0 / 256.0;

/// A Conv that reads the equalized tensor, and how its weight holds the
/// tensor's channels.
#[derive(Debug, Clone)]
struct Consumer {
    weight: String,
    /// `[C, 1, …]` with `group = C`: channel c is output channel c.
    /// Otherwise group 1, `[O, C, …]`: channel c is a column of each row.
    depthwise: bool,
}

/// One equalizable chain.
#[derive(Debug, Clone)]
pub struct Chain {
    /// The producing Conv's weight and (optional) bias initializers.
    producer_weight: String,
    producer_bias: Option<String>,
    /// Every Conv that reads the tensor.
    consumers: Vec<Consumer>,
    /// The tensor the consumers read, whose channel ranges are measured.
    pub tensor: String,
    /// Channels.
    pub channels: usize,
}

/// Finds every equalizable chain: `Conv → [LeakyRelu|Relu] → depthwise
/// Conv`, or `Conv → [LeakyRelu|Relu] → MaxPool → Conv…` with depthwise
/// and group-1 Convs reading the pool. Its intermediate tensors and
/// weights belong to the chain alone, and only Convs read its end tensor.
///
/// A chain into a group-1 Conv that has no max pool is not taken: on the
/// shipped models those chains (a Conv, its activation and a 1×1 Conv; 28
/// on each legacy model, 39 on the Plus models) brought nothing or worse
/// on coco128, while the pool chain of a ShuffleNet stem is the one whose
/// channels are far apart (docs/INT8.md).
pub fn find_chains(graph: &GraphProto) -> Vec<Chain> {
    let mut uses: HashMap<&str, usize> = HashMap::new();
    let mut readers: HashMap<&str, Vec<&NodeProto>> = HashMap::new();
    for n in &graph.node {
        for i in &n.input {
            *uses.entry(i.as_str()).or_default() += 1;
            readers.entry(i.as_str()).or_default().push(n);
        }
    }
    for o in &graph.output {
        *uses.entry(o.name.as_str()).or_default() += 1;
    }
    let view = GraphView {
        uses,
        readers,
        producer: producers(graph),
        dims: graph
            .initializer
            .iter()
            .map(|t| (t.name.as_str(), t.dims.as_slice()))
            .collect(),
    };
    // Each tensor once, in the order of its first reader.
    let mut seen = HashSet::new();
    graph
        .node
        .iter()
        .filter(|n| n.op_type == "Conv")
        .filter_map(|n| n.input.first())
        .filter(|x| seen.insert(x.as_str()))
        .filter_map(|x| view.chain_ending_at(x))
        .collect()
}

/// What [`find_chains`] looks up.
struct GraphView<'g> {
    uses: HashMap<&'g str, usize>,
    readers: HashMap<&'g str, Vec<&'g NodeProto>>,
    producer: HashMap<&'g str, &'g NodeProto>,
    dims: HashMap<&'g str, &'g [i64]>,
}

impl GraphView<'_> {
    fn only_once(&self, tensor: &str) -> bool {
        self.uses.get(tensor).copied() == Some(1)
    }

    /// The node that makes `tensor`, if `tensor` has no other reader.
    fn sole_producer(&self, tensor: Option<&String>) -> Option<&NodeProto> {
        let tensor = tensor.filter(|t| self.only_once(t))?;
        self.producer.get(tensor.as_str()).copied()
    }

    /// The chain whose consumers read `x`, if `x` ends one.
    fn chain_ending_at(&self, x: &str) -> Option<Chain> {
        let reading = self.readers.get(x)?;
        // Every use of `x` is a Conv's activation input (no graph output).
        if self.uses.get(x).copied() != Some(reading.len()) {
            return None;
        }
        let mut consumers = Vec::new();
        let mut channels = None;
        for conv in reading {
            if conv.op_type != "Conv" || conv.input.first().map(String::as_str) != Some(x) {
                return None;
            }
            let w = conv.input.get(1).filter(|w| self.only_once(w))?;
            let &[out, per_group, ..] = self.dims.get(w.as_str()).copied()? else {
                return None;
            };
            let group = attr_int(conv, "group").unwrap_or(1);
            let (c, depthwise) = if per_group == 1 && group == out && out > 1 {
                (out, true)
            } else if group == 1 {
                (per_group, false)
            } else {
                return None;
            };
            if *channels.get_or_insert(c) != c {
                return None;
            }
            consumers.push(Consumer {
                weight: w.clone(),
                depthwise,
            });
        }
        let channels = channels?;
        let mut p = self.producer.get(x).copied()?;
        let pooled = p.op_type == "MaxPool";
        if pooled {
            if p.output.iter().skip(1).any(|o| !o.is_empty()) {
                return None;
            }
            p = self.sole_producer(p.input.first())?;
        }
        if !pooled && !consumers.iter().all(|c| c.depthwise) {
            return None;
        }
        if matches!(p.op_type.as_str(), "LeakyRelu" | "Relu") {
            p = self.sole_producer(p.input.first())?;
        }
        if p.op_type != "Conv" {
            return None;
        }
        let w1 = p.input.get(1).filter(|w| self.only_once(w))?;
        let bias = p.input.get(2).filter(|b| !b.is_empty());
        if self.dims.get(w1.as_str()).and_then(|d| d.first()) != Some(&channels)
            || bias.is_some_and(|b| !self.only_once(b) || !self.dims.contains_key(b.as_str()))
        {
            return None;
        }
        Some(Chain {
            producer_weight: w1.clone(),
            producer_bias: bias.cloned(),
            consumers,
            tensor: x.to_owned(),
            channels: usize::try_from(channels).ok()?,
        })
    }
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

/// A weight's output channels (its first dimension), at least 1.
fn output_channels(weight: &TensorProto) -> usize {
    weight
        .dims
        .first()
        .and_then(|&o| usize::try_from(o).ok())
        .unwrap_or(1)
        .max(1)
}

/// Each input channel's largest share of a weight row's range (|w|
/// maxima), over the rows of every group-1 consumer; `None` when the
/// chain has none.
fn column_shares(graph: &GraphProto, chain: &Chain) -> Result<Option<Vec<f32>>, GraphError> {
    let mut shares: Option<Vec<f32>> = None;
    for consumer in chain.consumers.iter().filter(|c| !c.depthwise) {
        let Some(t) = graph.initializer.iter().find(|t| t.name == consumer.weight) else {
            continue;
        };
        let values = read_f32(t)?;
        let per_row = values.len() / output_channels(t);
        let per_column = per_row / chain.channels.max(1);
        let shares = shares.get_or_insert_with(|| vec![0.0; chain.channels]);
        for row in values.chunks(per_row.max(1)) {
            let top = row.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            if top <= 0.0 || !top.is_finite() {
                continue;
            }
            for (share, column) in shares.iter_mut().zip(row.chunks(per_column.max(1))) {
                let m = column.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                *share = share.max(m / top);
            }
        }
    }
    Ok(shares)
}

/// A group-1 Conv reading a chain pays for equalization with the
/// precision of its weight columns, so such a chain is equalized only
/// when a channel of its activation spans less than this share of the
/// tensor's range, where per-tensor INT8 would leave it fewer than 8 of
/// its 128 levels. The legacy NanoDet stems have a channel at 2 % and
/// 0.4 %; the Plus stems' quietest is at 15 %, and equalizing them left
/// the fidelity measures where they were (docs/INT8.md).
pub const QUIET_CHANNEL: f32 = 1.0 / 16.0;

/// The scales for `chain` given its measured channel ranges: the ranges
/// alone when only depthwise Convs read it, else balanced against the
/// group-1 consumers' weight columns (module docs); `None` where a chain
/// read by group-1 Convs has no channel below [`QUIET_CHANNEL`].
pub fn chain_scales(
    graph: &GraphProto,
    chain: &Chain,
    ranges: &[f32],
) -> Result<Option<Vec<f32>>, GraphError> {
    let Some(shares) = column_shares(graph, chain)? else {
        return Ok(Some(channel_scales(ranges)));
    };
    let top = ranges.iter().copied().fold(0.0f32, f32::max);
    let quietest = ranges
        .iter()
        .filter(|&&r| r > 0.0)
        .fold(top, |m, &r| m.min(r));
    if !(top > 0.0 && quietest < top * QUIET_CHANNEL) {
        return Ok(None);
    }
    let raw: Vec<f32> = ranges
        .iter()
        .zip(&shares)
        .map(|(&r, &w)| match (r > 0.0, w > 0.0) {
            (false, _) => 1.0,
            (true, true) => (r / top / w).sqrt(),
            (true, false) => r / top,
        })
        .collect();
    // A column share too small to divide by (subnormal) would blow one
    // channel up and flatten the rest: such a chain is left alone.
    if raw.iter().any(|s| !s.is_finite()) {
        return Ok(None);
    }
    let most = raw.iter().copied().fold(0.0f32, f32::max);
    Ok(Some(
        raw.iter()
            .map(|&s| {
                if most > 0.0 && s.is_finite() {
                    (s / most).max(MIN_SCALE)
                } else {
                    1.0
                }
            })
            .collect(),
    ))
}

/// Rescales `chain`'s weights by `scales` in `graph`.
pub fn apply(graph: &mut GraphProto, chain: &Chain, scales: &[f32]) -> Result<(), GraphError> {
    // A channel is one contiguous chunk of the tensor (a weight's output
    // channel, a bias value), or with `columns` (a group-1 reader's input
    // channel) one chunk of every output channel's row.
    let mut rescale = |name: &str, columns: bool, by: &dyn Fn(f32) -> f32| {
        let Some(t) = graph.initializer.iter_mut().find(|t| t.name == name) else {
            return Ok::<(), GraphError>(());
        };
        let mut values = read_f32(t)?;
        let rows = if columns { output_channels(t) } else { 1 };
        let per_row = values.len() / rows;
        let per_channel = per_row / chain.channels.max(1);
        for row in values.chunks_mut(per_row.max(1)) {
            for (channel, s) in row.chunks_mut(per_channel.max(1)).zip(scales) {
                let factor = by(*s);
                channel.iter_mut().for_each(|v| *v *= factor);
            }
        }
        let dims = t.dims.clone();
        *t = f32_tensor(name, &dims, &values);
        Ok(())
    };
    rescale(&chain.producer_weight, false, &|s| 1.0 / s)?;
    if let Some(bias) = &chain.producer_bias {
        rescale(bias, false, &|s| 1.0 / s)?;
    }
    for consumer in &chain.consumers {
        rescale(&consumer.weight, !consumer.depthwise, &|s| s)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::graph::{int_attr, node};

    /// A stem: `stem` (reading the image) → LeakyRelu → MaxPool, read by a
    /// depthwise Conv and a 1×1 Conv; 2 channels, with weights `dw` and
    /// `pw` (2 outputs × 2 inputs).
    fn stem(pw: &[f32]) -> GraphProto {
        let mut dw = node("Conv", "dw", &["pooled", "w_dw"], &["y_dw"]);
        dw.attribute.push(int_attr("group", 2));
        GraphProto {
            node: vec![
                node("Conv", "stem", &["image", "w_stem", "b_stem"], &["s"]),
                node("LeakyRelu", "act", &["s"], &["a"]),
                node("MaxPool", "pool", &["a"], &["pooled"]),
                dw,
                node("Conv", "pw", &["pooled", "w_pw"], &["y_pw"]),
            ],
            initializer: vec![
                f32_tensor("w_stem", &[2, 1, 1, 1], &[1.0, 2.0]),
                f32_tensor("b_stem", &[2], &[0.5, -0.5]),
                f32_tensor("w_dw", &[2, 1, 1, 1], &[3.0, 4.0]),
                f32_tensor("w_pw", &[2, 2, 1, 1], pw),
            ],
            ..GraphProto::default()
        }
    }

    fn weights(graph: &GraphProto, name: &str) -> Vec<f32> {
        let t = graph.initializer.iter().find(|t| t.name == name).unwrap();
        read_f32(t).unwrap()
    }

    /// The pool chain is found with both readers; a quiet channel is
    /// raised by √(a / w) and the 1×1 Conv's column, not its row, takes
    /// the factor back.
    #[test]
    fn a_stem_through_its_max_pool_is_equalized_into_every_reader() {
        // Row 0 of the 1×1 weight: column 1 is a quarter of the row's
        // range; row 1: an eighth. Column 1's largest share: 1/4.
        let mut graph = stem(&[2.0, 0.5, 8.0, -1.0]);
        let chains = find_chains(&graph);
        assert_eq!(chains.len(), 1);
        let chain = &chains[0];
        assert_eq!((chain.tensor.as_str(), chain.channels), ("pooled", 2));
        assert_eq!(chain.consumers.len(), 2);
        // Channel 1 spans 1/64 of the range: below QUIET_CHANNEL.
        let scales = chain_scales(&graph, chain, &[6.4, 0.1]).unwrap().unwrap();
        // Channel 0: √(1 / 1) = 1; channel 1: √((1/64) / (1/4)) = 1/4.
        assert_eq!(scales, [1.0, 0.25]);
        apply(&mut graph, chain, &scales).unwrap();
        assert_eq!(weights(&graph, "w_stem"), [1.0, 8.0]);
        assert_eq!(weights(&graph, "b_stem"), [0.5, -2.0]);
        assert_eq!(weights(&graph, "w_dw"), [3.0, 1.0]);
        assert_eq!(weights(&graph, "w_pw"), [2.0, 0.125, 8.0, -0.25]);
        // No channel below 1/16 of the range: left alone.
        assert_eq!(chain_scales(&graph, chain, &[6.4, 0.5]).unwrap(), None);
    }

    /// Without a max pool, a chain into a group-1 Conv is not taken, nor
    /// one whose tensor something other than a Conv's activation input
    /// reads.
    #[test]
    fn chains_into_a_full_conv_need_the_pool() {
        let mut graph = stem(&[1.0; 4]);
        graph.node.remove(2);
        for n in &mut graph.node {
            for i in &mut n.input {
                if i == "pooled" {
                    *i = "a".into();
                }
            }
        }
        assert!(find_chains(&graph).is_empty());
        // Only the depthwise reader left: an ordinary chain again.
        graph.node.pop();
        assert_eq!(find_chains(&graph).len(), 1);
        // The tensor is a graph output too.
        graph.output.push(tract_onnx::pb::ValueInfoProto {
            name: "a".into(),
            ..Default::default()
        });
        assert!(find_chains(&graph).is_empty());
    }

    #[test]
    fn scales_raise_quiet_channels_and_leave_dead_ones() {
        let s = channel_scales(&[4.0, 1.0, 0.0, 0.001]);
        assert_eq!(s, [1.0, 0.25, 1.0, MIN_SCALE]);
        let mut ranges = [0.0f32; 2];
        fold_channel_ranges(&mut ranges, &[1.0, -3.0, 0.5, f32::NAN]);
        assert_eq!(ranges, [3.0, 0.5]);
    }
}
