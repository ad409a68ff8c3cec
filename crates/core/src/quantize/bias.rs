//! Bias correction (issue 22): rounding a Conv's weights to INT8 shifts
//! each output channel's mean by `(Wq − W) · E[patch]`, where `E[patch]` is
//! the mean input patch the channel sees. Measured on the calibration
//! images (the FP32 model's activations, equalized), that shift is taken
//! out of the float bias, so the quantized Conv's mean output is the FP32
//! Conv's on those images. Nagel et al., "Data-Free Quantization", 2019,
//! section 4.2, with the expectation measured instead of derived from
//! BatchNorm statistics. It needs no labels, and no run beyond the
//! statistics pass the quantizer makes anyway.
//!
//! The mean patch is exact at the borders: positions where the kernel
//! reads padding count their zeros.

use super::graph::{FreshNames, GraphError, attr_int, f32_tensor, read_f32};
use super::histogram::weight_scales;
use tract_onnx::pb::{GraphProto, NodeProto};

/// A Conv's geometry and the running sum of its input patches.
#[derive(Debug, Clone)]
pub struct PatchMeans {
    /// The Conv's node name (or first output).
    pub conv: String,
    weight: String,
    group: usize,
    kernel: [usize; 2],
    strides: [usize; 2],
    /// Top, left.
    pads: [usize; 2],
    /// Output height and width follow from these too.
    pads_end: [usize; 2],
    dilations: [usize; 2],
    /// Per input channel and kernel position: the sum over images and
    /// output positions of the input value the kernel reads there.
    sums: Vec<f64>,
    positions: u64,
    /// The same sums of the input as its Q/DQ pair passes it on, once the
    /// activation scale is known ([`Self::quantized_input`]).
    quantized: Option<(f32, Vec<f64>)>,
}

fn ints(node: &NodeProto, name: &str) -> Option<Vec<i64>> {
    node.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
}

fn pair(values: Option<Vec<i64>>, default: usize, at: usize) -> Option<usize> {
    match values {
        None => Some(default),
        Some(v) => v.get(at).and_then(|&x| usize::try_from(x).ok()),
    }
}

impl PatchMeans {
    /// For `conv` with weight dims `weight_dims`; `None` for what this
    /// does not handle (not 2-D, `auto_pad`, odd attributes).
    pub fn new(conv: &NodeProto, id: &str, weight_dims: &[i64]) -> Option<PatchMeans> {
        let [_, in_per_group, kh, kw] = *weight_dims else {
            return None;
        };
        if attr_auto_pad(conv) {
            return None;
        }
        let group = usize::try_from(attr_int(conv, "group").unwrap_or(1)).ok()?;
        let (in_per_group, kh, kw) = (
            usize::try_from(in_per_group).ok()?,
            usize::try_from(kh).ok()?,
            usize::try_from(kw).ok()?,
        );
        let strides = ints(conv, "strides");
        let pads = ints(conv, "pads");
        let dilations = ints(conv, "dilations");
        let channels = in_per_group.checked_mul(group)?;
        Some(PatchMeans {
            conv: id.to_owned(),
            weight: conv.input.get(1)?.clone(),
            group,
            kernel: [kh, kw],
            strides: [pair(strides.clone(), 1, 0)?, pair(strides, 1, 1)?],
            pads: [pair(pads.clone(), 0, 0)?, pair(pads.clone(), 0, 1)?],
            pads_end: [pair(pads.clone(), 0, 2)?, pair(pads, 0, 3)?],
            dilations: [pair(dilations.clone(), 1, 0)?, pair(dilations, 1, 1)?],
            sums: vec![0.0; channels.checked_mul(kh)?.checked_mul(kw)?],
            positions: 0,
            quantized: None,
        })
    }

    /// From now on, [`add`](Self::add) also sums the input as a Q/DQ
    /// pair of `scale` passes it on (symmetric INT8, ties to even), so the
    /// correction also takes out the mean shift of the activation's
    /// rounding and clipping.
    pub fn quantized_input(&mut self, scale: f32) {
        self.quantized = Some((scale, vec![0.0; self.sums.len()]));
    }

    /// Adds one image's input, `[1, C, H, W]`: to the plain sums, or to
    /// the quantized ones once [`quantized_input`](Self::quantized_input)
    /// was called. A shape that does not fit the Conv is skipped and
    /// answered `false`.
    pub fn add(&mut self, shape: &[usize], values: &[f32]) -> bool {
        if let Some((scale, mut sums)) = self.quantized.take() {
            let through: Vec<f32> = values
                .iter()
                .map(|x| (x / scale).round_ties_even().clamp(-128.0, 127.0) * scale)
                .collect();
            let added = Self::add_to(self, shape, &through, &mut sums, false);
            self.quantized = Some((scale, sums));
            return added;
        }
        let mut sums = std::mem::take(&mut self.sums);
        let added = Self::add_to(self, shape, values, &mut sums, true);
        self.sums = sums;
        added
    }

    fn add_to(&mut self, shape: &[usize], values: &[f32], sums: &mut [f64], count: bool) -> bool {
        let &[1, channels, height, width] = shape else {
            return false;
        };
        let [kh, kw] = self.kernel;
        if channels * kh * kw != sums.len() || values.len() != channels * height * width {
            return false;
        }
        let out = |size: usize, axis: usize| -> Option<usize> {
            let padded = size + self.pads[axis] + self.pads_end[axis];
            let reach = self.dilations[axis] * (self.kernel[axis] - 1) + 1;
            padded
                .checked_sub(reach)
                .map(|room| room / self.strides[axis].max(1) + 1)
        };
        let (Some(out_h), Some(out_w)) = (out(height, 0), out(width, 1)) else {
            return false;
        };
        // The input row (or column) read at output `o`, kernel tap `k`.
        let at = |o: usize, k: usize, axis: usize| -> Option<usize> {
            (o * self.strides[axis] + k * self.dilations[axis]).checked_sub(self.pads[axis])
        };
        for c in 0..channels {
            let plane = &values[c * height * width..][..height * width];
            for y in 0..kh {
                for x in 0..kw {
                    let mut sum = 0f64;
                    for oy in 0..out_h {
                        let Some(row) = at(oy, y, 0).filter(|&r| r < height) else {
                            continue;
                        };
                        let row = &plane[row * width..][..width];
                        for ox in 0..out_w {
                            if let Some(col) = at(ox, x, 1).filter(|&c| c < width) {
                                sum += f64::from(row[col]);
                            }
                        }
                    }
                    sums[(c * kh + y) * kw + x] += sum;
                }
            }
        }
        if count {
            self.positions += (out_h * out_w) as u64;
        }
        true
    }

    /// Each output channel's mean shift, `Wq · E[patch of x̃] − W ·
    /// E[patch of x]` (x̃ = x where the input's own rounding was not
    /// measured), for `weights` quantized per output channel to the narrow
    /// INT8 range as [`super::qdq::insert_qdq`] does (ties to even, as
    /// QuantizeLinear).
    fn shifts(&self, weights: &[f32], out_channels: usize) -> Vec<f64> {
        let per_out = weights.len() / out_channels.max(1);
        let scales = weight_scales(weights, out_channels);
        let out_per_group = out_channels / self.group.max(1);
        let positions = self.positions.max(1) as f64;
        let mut shifts = Vec::with_capacity(out_channels);
        for (o, (w, s)) in weights.chunks(per_out.max(1)).zip(&scales).enumerate() {
            let group = o / out_per_group.max(1);
            let first = group * per_out;
            let mut shift = 0f64;
            let through = self.quantized.as_ref().map_or(&self.sums, |(_, q)| q);
            for (i, &w) in w.iter().enumerate() {
                let q = (w / s).round_ties_even().clamp(-127.0, 127.0) * s;
                shift += (f64::from(q) * through[first + i] - f64::from(w) * self.sums[first + i])
                    / positions;
            }
            shifts.push(shift);
        }
        shifts
    }
}

fn attr_auto_pad(conv: &NodeProto) -> bool {
    conv.attribute
        .iter()
        .find(|a| a.name == "auto_pad")
        .is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET")
}

/// Takes each Conv's mean shift out of its bias, giving the Conv a bias of
/// its own first where it has none or shares one. Answers the largest
/// shift taken out, relative to the largest |bias| of its Conv.
pub fn correct(graph: &mut GraphProto, patches: &[PatchMeans]) -> Result<f64, GraphError> {
    let mut names = FreshNames::of(graph);
    let mut largest = 0f64;
    for patch in patches.iter().filter(|p| p.positions > 0) {
        let tensor_error = |reason: &str| GraphError::Tensor {
            name: patch.weight.clone(),
            reason: reason.to_owned(),
        };
        let weight = graph
            .initializer
            .iter()
            .find(|t| t.name == patch.weight)
            .ok_or_else(|| tensor_error("not an initializer"))?;
        let out_channels = weight
            .dims
            .first()
            .and_then(|&d| usize::try_from(d).ok())
            .ok_or_else(|| tensor_error("no output channels"))?;
        let shifts = patch.shifts(&read_f32(weight)?, out_channels);
        let Some(conv) = graph
            .node
            .iter()
            .position(|n| n.op_type == "Conv" && super::qdq::conv_id(n) == patch.conv)
        else {
            continue;
        };
        let old = graph.node[conv]
            .input
            .get(2)
            .filter(|b| !b.is_empty())
            .cloned();
        let shared = old.as_ref().is_some_and(|bias| {
            graph
                .node
                .iter()
                .filter(|n| n.input.iter().any(|i| i == bias))
                .count()
                > 1
        });
        let mut bias = match &old {
            Some(name) => {
                let tensor = graph
                    .initializer
                    .iter()
                    .find(|t| t.name == *name)
                    .ok_or_else(|| GraphError::Tensor {
                        name: name.clone(),
                        reason: "a bias that is not an initializer".into(),
                    })?;
                read_f32(tensor)?
            }
            None => vec![0.0; out_channels],
        };
        if bias.len() != out_channels {
            return Err(tensor_error(
                "a bias of another length than the output channels",
            ));
        }
        let top = bias
            .iter()
            .fold(0f32, |m, b| m.max(b.abs()))
            .max(f32::MIN_POSITIVE);
        for (b, shift) in bias.iter_mut().zip(&shifts) {
            largest = largest.max(shift.abs() / f64::from(top));
            *b -= *shift as f32;
        }
        let dims = [out_channels as i64];
        match old {
            Some(name) if !shared => {
                if let Some(t) = graph.initializer.iter_mut().find(|t| t.name == name) {
                    *t = f32_tensor(&name, &dims, &bias);
                }
            }
            _ => {
                let name = names.fresh(&format!("{}_bias_corrected", patch.conv));
                graph.initializer.push(f32_tensor(&name, &dims, &bias));
                let inputs = &mut graph.node[conv].input;
                inputs.resize(3, String::new());
                inputs[2] = name;
            }
        }
    }
    Ok(largest)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::graph::{int_attr, node};
    use tract_onnx::pb::AttributeProto;

    fn ints_attr(name: &str, values: &[i64]) -> AttributeProto {
        AttributeProto {
            name: name.into(),
            r#type: 7,
            ints: values.to_vec(),
            ..AttributeProto::default()
        }
    }

    /// The mean patch counts the padding's zeros: a 3x3 kernel, pad 1, on a
    /// 2x2 input of ones reads the centre tap at every output and each
    /// corner tap at one output of four.
    #[test]
    fn patch_means_count_padding_as_zeros() {
        let mut conv = node("Conv", "c", &["x", "w", "b"], &["y"]);
        conv.attribute.push(ints_attr("pads", &[1, 1, 1, 1]));
        let mut p = PatchMeans::new(&conv, "c", &[1, 1, 3, 3]).unwrap();
        assert!(p.add(&[1, 1, 2, 2], &[1.0; 4]));
        assert_eq!(p.positions, 4);
        assert_eq!(p.sums, [1.0, 2.0, 1.0, 2.0, 4.0, 2.0, 1.0, 2.0, 1.0]);
        assert!(!p.add(&[1, 2, 2, 2], &[1.0; 8]), "another channel count");
    }

    /// After the correction, the quantized Conv's mean output over the
    /// images equals the float Conv's (to f32 rounding), per channel, for a
    /// grouped, strided Conv.
    #[test]
    fn the_corrected_bias_restores_each_channels_mean() {
        let (c, h, w) = (4usize, 5usize, 6usize);
        let mut conv = node("Conv", "c", &["x", "w", "b"], &["y"]);
        conv.attribute.push(int_attr("group", 2));
        conv.attribute.push(ints_attr("strides", &[2, 1]));
        conv.attribute.push(ints_attr("pads", &[1, 0, 1, 0]));
        // 4 outputs, 2 inputs per group, 3x2 kernels.
        let weights: Vec<f32> = (0..4 * 2 * 3 * 2)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.0137)
            .collect();
        let bias = [0.5f32, -0.25, 0.125, 0.0];
        let mut patch = PatchMeans::new(&conv, "c", &[4, 2, 3, 2]).unwrap();
        let images: Vec<Vec<f32>> = (0..3)
            .map(|k| {
                (0..c * h * w)
                    .map(|i| ((i * 13 + k * 7) % 17) as f32 * 0.3 - 1.0)
                    .collect()
            })
            .collect();
        for image in &images {
            assert!(patch.add(&[1, c, h, w], image));
        }
        let mut graph = GraphProto {
            node: vec![conv],
            initializer: vec![
                f32_tensor("w", &[4, 2, 3, 2], &weights),
                f32_tensor("b", &[4], &bias),
            ],
            ..GraphProto::default()
        };
        correct(&mut graph, &[patch.clone()]).unwrap();
        let corrected = read_f32(&graph.initializer[1]).unwrap();
        // Mean outputs, by the same patch means: float with the old bias,
        // quantized with the new one.
        let scales = weight_scales(&weights, 4);
        let quantized: Vec<f32> = weights
            .chunks(12)
            .zip(&scales)
            .flat_map(|(ch, s)| {
                ch.iter()
                    .map(move |w| (w / s).round_ties_even().clamp(-127.0, 127.0) * s)
            })
            .collect();
        let positions = patch.positions as f64;
        for o in 0..4 {
            let first = (o / 2) * 12;
            let mean = |ws: &[f32], b: f32| {
                ws[o * 12..][..12]
                    .iter()
                    .enumerate()
                    .map(|(i, &w)| f64::from(w) * patch.sums[first + i] / positions)
                    .sum::<f64>()
                    + f64::from(b)
            };
            let (float, int8) = (mean(&weights, bias[o]), mean(&quantized, corrected[o]));
            assert!(
                (float - int8).abs() < 1e-6,
                "channel {o}: {float} vs {int8}"
            );
            assert!(
                (mean(&quantized, bias[o]) - float).abs() > 1e-5,
                "channel {o}: rounding shifted nothing to correct"
            );
        }
    }

    /// A Conv without a bias gets one of its own; a shared bias is copied
    /// before it changes.
    #[test]
    fn a_missing_or_shared_bias_becomes_the_convs_own() {
        let conv = |name: &str, bias: Option<&str>| {
            let mut inputs = vec!["x", "w"];
            inputs.extend(bias);
            node("Conv", name, &inputs, &[&format!("{name}_y")])
        };
        let weights = [0.3f32, -0.7, 0.11, 0.9];
        let mut graph = GraphProto {
            node: vec![
                conv("a", None),
                conv("b", Some("shared")),
                conv("c", Some("shared")),
            ],
            initializer: vec![
                f32_tensor("w", &[1, 1, 2, 2], &weights),
                f32_tensor("shared", &[1], &[1.0]),
            ],
            ..GraphProto::default()
        };
        let patches: Vec<PatchMeans> = ["a", "b"]
            .iter()
            .map(|name| {
                let node = graph.node.iter().find(|n| n.name == *name).unwrap();
                let mut p = PatchMeans::new(node, name, &[1, 1, 2, 2]).unwrap();
                assert!(p.add(
                    &[1, 1, 3, 3],
                    &[0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 1.0, 2.0, 4.0]
                ));
                p
            })
            .collect();
        correct(&mut graph, &patches).unwrap();
        assert_eq!(graph.node[0].input.len(), 3);
        assert_ne!(graph.node[1].input[2], "shared");
        assert_eq!(graph.node[2].input[2], "shared", "c keeps the original");
        let shared = graph
            .initializer
            .iter()
            .find(|t| t.name == "shared")
            .unwrap();
        assert_eq!(read_f32(shared).unwrap(), [1.0]);
    }
}
