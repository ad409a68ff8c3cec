//! Bias correction (issue 22): rounding a Conv's weights to INT8 shifts
//! each output channel's mean by `(Wq − W) · E[patch]`, where `E[patch]` is
//! the mean input patch the channel sees. Measured on the calibration
//! images (the FP32 model's activations, equalized), that shift is taken
//! out of the float bias, so the quantized Conv's mean output is the FP32
//! Conv's on those images. Nagel et al., "Data-Free Quantization", 2019,
//! section 4.2, with the expectation measured instead of derived from
//! BatchNorm statistics. It needs no labels; its pass runs once the
//! activation scales are known, on a spread of the calibration images
//! (`quantize::BIAS_IMAGES`), and sums both means from the same images.
//!
//! The mean patch is exact at the borders: positions where the kernel
//! reads padding count their zeros.

use super::graph::{FreshNames, GraphError, attr_int, f32_tensor, read_f32};
use super::histogram::weight_scales;
use tract_onnx::pb::{GraphProto, NodeProto};

/// A 2-D Conv's geometry: which input values each output position reads.
#[derive(Debug, Clone)]
pub struct ConvGeometry {
    /// The Conv's node name (or first output).
    pub conv: String,
    /// Its weight initializer's name.
    pub weight: String,
    /// Groups.
    pub group: usize,
    /// Input channels each group reads.
    pub in_per_group: usize,
    /// Kernel height and width.
    pub kernel: [usize; 2],
    strides: [usize; 2],
    /// Top, left.
    pads: [usize; 2],
    /// Output height and width follow from these too.
    pads_end: [usize; 2],
    dilations: [usize; 2],
}

impl ConvGeometry {
    /// For `conv` with weight dims `weight_dims`; `None` for what this
    /// does not handle (not 2-D, `auto_pad`, odd attributes).
    pub fn new(conv: &NodeProto, id: &str, weight_dims: &[i64]) -> Option<ConvGeometry> {
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
        // Attributes from the model file: nothing below divides by zero,
        // underflows or overflows on them.
        let strides = [pair(strides.clone(), 1, 0)?, pair(strides, 1, 1)?];
        let dilations = [pair(dilations.clone(), 1, 0)?, pair(dilations, 1, 1)?];
        let pads_all = [0, 1, 2, 3].map(|at| pair(pads.clone(), 0, at));
        let [Some(top), Some(left), Some(bottom), Some(right)] = pads_all else {
            return None;
        };
        let sane = |v: usize| (1..=1 << 16).contains(&v);
        let all_sane = [group, in_per_group, kh, kw]
            .into_iter()
            .chain(strides)
            .chain(dilations)
            .all(sane);
        if !all_sane || [top, left, bottom, right].into_iter().any(|p| p > 1 << 16) {
            return None;
        }
        // Within 2^64: each factor is at most 2^16.
        in_per_group
            .checked_mul(group)?
            .checked_mul(kh)?
            .checked_mul(kw)?;
        Some(ConvGeometry {
            conv: id.to_owned(),
            weight: conv.input.get(1)?.clone(),
            group,
            in_per_group,
            kernel: [kh, kw],
            strides,
            pads: [top, left],
            pads_end: [bottom, right],
            dilations,
        })
    }

    /// Input channels, all groups.
    pub fn channels(&self) -> usize {
        self.in_per_group * self.group
    }

    /// Values in one group's patch: its input channels times the kernel.
    pub fn patch_len(&self) -> usize {
        self.in_per_group * self.kernel[0] * self.kernel[1]
    }

    /// The input's height and width, and the output's, for an input of
    /// `shape` (`[1, C, H, W]`) holding `values`; `None` where it does not
    /// fit the Conv.
    pub fn sizes(&self, shape: &[usize], values: &[f32]) -> Option<([usize; 2], [usize; 2])> {
        let &[1, channels, height, width] = shape else {
            return None;
        };
        if channels != self.channels()
            || Some(values.len()) != channels.checked_mul(height)?.checked_mul(width)
        {
            return None;
        }
        let out = |size: usize, axis: usize| -> Option<usize> {
            let padded = size + self.pads[axis] + self.pads_end[axis];
            let reach = self.dilations[axis] * (self.kernel[axis] - 1) + 1;
            padded
                .checked_sub(reach)
                .map(|room| room / self.strides[axis].max(1) + 1)
        };
        Some(([height, width], [out(height, 0)?, out(width, 1)?]))
    }

    /// The input row (`axis` 0) or column (1) that output `o` reads at
    /// kernel tap `k`, or `None` in the padding before the input (past it,
    /// the caller compares with the size).
    pub fn tap(&self, o: usize, k: usize, axis: usize) -> Option<usize> {
        (o * self.strides[axis] + k * self.dilations[axis]).checked_sub(self.pads[axis])
    }
}

/// A Conv's geometry and the running sum of its input patches.
#[derive(Debug, Clone)]
pub struct PatchMeans {
    geometry: ConvGeometry,
    /// Per input channel and kernel position: the sum over images and
    /// output positions of the input value the kernel reads there.
    sums: Vec<f64>,
    positions: u64,
    /// The same sums of the input as its Q/DQ pair passes it on
    /// ([`Self::add_quantized`]), once the activation scale is known, and
    /// the output positions they were summed over.
    quantized: Option<Vec<f64>>,
    quantized_positions: u64,
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
        let geometry = ConvGeometry::new(conv, id, weight_dims)?;
        let len = geometry.patch_len() * geometry.group;
        Some(PatchMeans {
            geometry,
            sums: vec![0.0; len],
            positions: 0,
            quantized: None,
            quantized_positions: 0,
        })
    }

    /// The Conv's id.
    pub fn conv(&self) -> &str {
        &self.geometry.conv
    }

    /// Adds one image's input, `[1, C, H, W]`, to the plain sums. A shape
    /// that does not fit the Conv is skipped and answered `false`.
    pub fn add(&mut self, shape: &[usize], values: &[f32]) -> bool {
        let mut sums = std::mem::take(&mut self.sums);
        let positions = self.add_to(shape, values, &mut sums);
        self.sums = sums;
        self.positions += positions.unwrap_or(0);
        positions.is_some()
    }

    /// Adds one image's input as its Q/DQ pair passes it on
    /// ([`through_qdq`]), to the quantized sums: the correction then also
    /// takes out the mean shift of the activation's rounding and clipping.
    pub fn add_quantized(&mut self, shape: &[usize], values: &[f32]) -> bool {
        let mut sums = self
            .quantized
            .take()
            .unwrap_or_else(|| vec![0.0; self.sums.len()]);
        let positions = self.add_to(shape, values, &mut sums);
        self.quantized = Some(sums);
        self.quantized_positions += positions.unwrap_or(0);
        positions.is_some()
    }

    /// Adds one image's patches to `sums`; answers the output positions
    /// they were summed over, `None` for a shape that does not fit.
    fn add_to(&self, shape: &[usize], values: &[f32], sums: &mut [f64]) -> Option<u64> {
        let g = &self.geometry;
        let ([height, width], [out_h, out_w]) = g.sizes(shape, values)?;
        let [kh, kw] = g.kernel;
        if g.channels() * kh * kw != sums.len() {
            return None;
        }
        let at = |o: usize, k: usize, axis: usize| g.tap(o, k, axis);
        for c in 0..g.channels() {
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
        Some((out_h * out_w) as u64)
    }

    /// Each output channel's mean shift, `Wq · E[patch of x̃] − W ·
    /// E[patch of x]` (x̃ = x where the input's own rounding was not
    /// measured), for `weights` quantized per output channel to the narrow
    /// INT8 range as [`super::qdq::insert_qdq`] does (ties to even, as
    /// QuantizeLinear).
    /// `None` where the weights do not fit the Conv's geometry.
    fn shifts(&self, weights: &[f32], out_channels: usize) -> Option<Vec<f64>> {
        let group = self.geometry.group;
        let per_out = weights.len().checked_div(out_channels)?;
        if !out_channels.is_multiple_of(group)
            || per_out.checked_mul(out_channels) != Some(weights.len())
            || per_out.checked_mul(group) != Some(self.sums.len())
        {
            return None;
        }
        let scales = weight_scales(weights, out_channels);
        let out_per_group = out_channels / group;
        let positions = self.positions.max(1) as f64;
        // The Q/DQ sums where they were measured, over their own count.
        let (through, through_positions) = match &self.quantized {
            Some(sums) if self.quantized_positions > 0 => (sums, self.quantized_positions as f64),
            _ => (&self.sums, positions),
        };
        let mut shifts = Vec::with_capacity(out_channels);
        for (o, (w, s)) in weights.chunks(per_out.max(1)).zip(&scales).enumerate() {
            let group = o / out_per_group.max(1);
            let first = group * per_out;
            let mut shift = 0f64;
            for (i, &w) in w.iter().enumerate() {
                let q = (w / s).round_ties_even().clamp(-127.0, 127.0) * s;
                shift += f64::from(q) * through[first + i] / through_positions
                    - f64::from(w) * self.sums[first + i] / positions;
            }
            shifts.push(shift);
        }
        Some(shifts)
    }
}

fn attr_auto_pad(conv: &NodeProto) -> bool {
    conv.attribute
        .iter()
        .find(|a| a.name == "auto_pad")
        .is_some_and(|a| !a.s.is_empty() && a.s != b"NOTSET")
}

/// `values` as a symmetric INT8 Q/DQ pair of `scale` passes them on: ties
/// to even, clipped to [-128, 127], into `out`.
pub fn through_qdq(values: &[f32], scale: f32, out: &mut Vec<f32>) {
    out.clear();
    out.extend(
        values
            .iter()
            .map(|x| (x / scale).round_ties_even().clamp(-128.0, 127.0) * scale),
    );
}

/// What [`correct`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Corrected {
    /// Convs whose bias changed.
    pub convs: usize,
    /// The largest shift taken out of one channel's bias.
    pub largest_shift: f64,
}

/// Takes each Conv's mean shift out of its bias, giving the Conv a bias of
/// its own first where it has none or shares one. A Conv it cannot correct
/// (a bias that is not a float initializer of one value per output
/// channel, weights that do not fit the Conv) keeps its bias, with a
/// warning.
pub fn correct(graph: &mut GraphProto, patches: &[PatchMeans]) -> Result<Corrected, GraphError> {
    let mut names = FreshNames::of(graph);
    let mut done = Corrected::default();
    for patch in patches.iter().filter(|p| p.positions > 0) {
        let skip = |why: &str| log::warn!("bias correction: Conv {} skipped: {why}", patch.conv());
        let Some(weight) = graph
            .initializer
            .iter()
            .find(|t| t.name == patch.geometry.weight)
        else {
            skip("its weight is not an initializer");
            continue;
        };
        let Some(out_channels) = weight.dims.first().and_then(|&d| usize::try_from(d).ok()) else {
            skip("its weight has no output channels");
            continue;
        };
        let Some(shifts) = patch.shifts(&read_f32(weight)?, out_channels) else {
            skip("its weights do not fit its geometry");
            continue;
        };
        let Some(conv) = graph
            .node
            .iter()
            .position(|n| n.op_type == "Conv" && super::qdq::conv_id(n) == patch.conv())
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
            Some(name) => match graph.initializer.iter().find(|t| t.name == *name) {
                Some(tensor) => read_f32(tensor)?,
                None => {
                    skip("its bias is not an initializer");
                    continue;
                }
            },
            None => vec![0.0; out_channels],
        };
        if bias.len() != out_channels {
            skip("its bias has another length than its output channels");
            continue;
        }
        for (b, shift) in bias.iter_mut().zip(&shifts) {
            done.largest_shift = done.largest_shift.max(shift.abs());
            *b -= *shift as f32;
        }
        done.convs += 1;
        let dims = [out_channels as i64];
        match old {
            Some(name) if !shared => {
                if let Some(t) = graph.initializer.iter_mut().find(|t| t.name == name) {
                    *t = f32_tensor(&name, &dims, &bias);
                }
            }
            _ => {
                let name = names.fresh(&format!("{}_bias_corrected", patch.conv()));
                graph.initializer.push(f32_tensor(&name, &dims, &bias));
                let inputs = &mut graph.node[conv].input;
                inputs.resize(3, String::new());
                inputs[2] = name;
            }
        }
    }
    Ok(done)
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

    /// The mean over images and positions of each output channel of a
    /// Conv (2 groups, strides [2, 1], pads [1, 0, 1, 0], 3x2 kernels, 4
    /// outputs, 4 inputs), computed directly.
    fn conv_means(images: &[Vec<f32>], weights: &[f32], bias: &[f32]) -> Vec<f64> {
        let (h, w) = (5usize, 6usize);
        let (out_h, out_w) = ((h + 2 - 3) / 2 + 1, w - 2 + 1);
        let mut means = [0f64; 4];
        for image in images {
            for (o, mean) in means.iter_mut().enumerate() {
                for oy in 0..out_h {
                    for ox in 0..out_w {
                        let mut y = f64::from(bias[o]);
                        for ci in 0..2 {
                            let c = (o / 2) * 2 + ci;
                            for ky in 0..3 {
                                let Some(iy) = (oy * 2 + ky).checked_sub(1).filter(|&r| r < h)
                                else {
                                    continue;
                                };
                                for kx in 0..2 {
                                    let x = image[(c * h + iy) * w + ox + kx];
                                    let k = weights[((o * 2 + ci) * 3 + ky) * 2 + kx];
                                    y += f64::from(k) * f64::from(x);
                                }
                            }
                        }
                        *mean += y;
                    }
                }
            }
        }
        let count = (images.len() * out_h * out_w) as f64;
        means.iter().map(|m| m / count).collect()
    }

    /// After the correction, the quantized Conv (INT8 weights, its input
    /// through a Q/DQ pair) has, per output channel, the float Conv's mean
    /// output over the images, computed by convolving both directly.
    #[test]
    fn the_corrected_bias_restores_each_channels_mean() {
        let (c, h, w) = (4usize, 5usize, 6usize);
        let mut conv = node("Conv", "c", &["x", "w", "b"], &["y"]);
        conv.attribute.push(int_attr("group", 2));
        conv.attribute.push(ints_attr("strides", &[2, 1]));
        conv.attribute.push(ints_attr("pads", &[1, 0, 1, 0]));
        let weights: Vec<f32> = (0..4 * 2 * 3 * 2)
            .map(|i| ((i * 37 % 23) as f32 - 11.0) * 0.0137)
            .collect();
        let bias = [0.5f32, -0.25, 0.125, 0.0];
        let images: Vec<Vec<f32>> = (0..3)
            .map(|k| {
                (0..c * h * w)
                    .map(|i| ((i * 13 + k * 7) % 17) as f32 * 0.3 - 1.0)
                    .collect()
            })
            .collect();
        // The input's Q/DQ clips at 0.02 * 127 = 2.54 and rounds to 0.02.
        let scale = 0.02;
        let mut patch = PatchMeans::new(&conv, "c", &[4, 2, 3, 2]).unwrap();
        let mut through = Vec::new();
        let mut images_through = Vec::new();
        for image in &images {
            assert!(patch.add(&[1, c, h, w], image));
            through_qdq(image, scale, &mut through);
            assert!(patch.add_quantized(&[1, c, h, w], &through));
            images_through.push(through.clone());
        }
        let mut graph = GraphProto {
            node: vec![conv],
            initializer: vec![
                f32_tensor("w", &[4, 2, 3, 2], &weights),
                f32_tensor("b", &[4], &bias),
            ],
            ..GraphProto::default()
        };
        correct(&mut graph, &[patch]).unwrap();
        let corrected = read_f32(&graph.initializer[1]).unwrap();
        let scales = weight_scales(&weights, 4);
        let quantized: Vec<f32> = weights
            .chunks(12)
            .zip(&scales)
            .flat_map(|(ch, s)| {
                ch.iter()
                    .map(move |w| (w / s).round_ties_even().clamp(-127.0, 127.0) * s)
            })
            .collect();
        let float = conv_means(&images, &weights, &bias);
        let before = conv_means(&images_through, &quantized, &bias);
        let after = conv_means(&images_through, &quantized, &corrected);
        for o in 0..4 {
            assert!(
                (float[o] - after[o]).abs() < 1e-5,
                "channel {o}: float {} vs corrected {}",
                float[o],
                after[o]
            );
            assert!(
                (float[o] - before[o]).abs() > 1e-4,
                "channel {o}: quantization shifted nothing to correct"
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
