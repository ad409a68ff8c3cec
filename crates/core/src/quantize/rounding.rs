//! Adaptive weight rounding (issue 22), after AdaRound (Nagel et al.,
//! "Up or Down? Adaptive Rounding for Post-Training Quantization", 2020):
//! each INT8 weight may round down or up, not only to the nearest, and
//! the choice that keeps a Conv's output closest to the float one on the
//! calibration images wins.
//!
//! The loss is AdaRound's asymmetric reconstruction, with the input's own
//! quantization: per output channel `E[(w·x − ŵ·x̂)²]`, with `x` the float
//! model's input patch, `x̂` the same patch through the input's Q/DQ pair,
//! `w` the float weights and `ŵ` the rounded ones. With `δ = ŵ − w` and
//! `e = x − x̂` it is `c − 2 δᵀb + δᵀ H δ`, where `H = E[x̂ x̂ᵀ]`,
//! `b = E[x̂ (w·e)]` and `c = E[(w·e)²]`: so the rounding may lean against
//! the error its input's quantization adds, where rounding on the float
//! inputs alone (`b = c = 0`) only kept its own error small. The errors of
//! the layers before are left out: `x̂` taken from the quantized model made
//! nanodet-plus-m_320 worse (docs/INT8.md). The three sums run over a spread
//! of output positions of the calibration images, in a pass made once the
//! activation scales are final. A greedy search then flips single weights to
//! their other neighbour on the grid while that lowers the loss: each flip
//! test costs O(1) with `g = H δ − b` kept up to date, and AdaRound's
//! gradient solver (annealed regularizer, Adam) is left out for a search
//! that takes seconds. The weights are written back on the grid of their
//! own per-channel scale, so the Q/DQ pairs reproduce them exactly.

use super::bias::ConvGeometry;
use super::graph::{GraphError, f32_tensor, read_f32};
use super::histogram::weight_scales;
use tract_onnx::pb::GraphProto;
use tract_onnx::prelude::tract_ndarray::linalg::general_mat_mul;
use tract_onnx::prelude::tract_ndarray::{Array2, ArrayView2, ArrayViewMut2};

/// Output positions sampled per Conv over the whole set, spread over the
/// images and over each image: enough for `H` to be full rank where the
/// patch is large (a dense 3×3 Conv of 96 channels reads 864 values), and
/// a bound on the pass's cost: 4,096 outer products of the patch.
pub const SAMPLES_PER_CONV: usize = 4096;

/// Patches longer than this are left to round to nearest: `H` would take
/// `len²` values (2,048: 32 MB of f64 per group).
pub const MAX_PATCH: usize = 2048;

/// The sums all Convs of one model may hold, in values (64 MB of f64):
/// nanodet-plus-m_320 needs 3.6 M for its 79 quantized Convs. A model past
/// it (thousands of groups, or of Convs) keeps rounding to nearest where
/// the budget ran out, rather than allocate what its file asks for.
pub const MAX_MOMENT_VALUES: usize = 1 << 23;

/// Greedy passes over a channel's weights at most; each pass that flips
/// nothing ends the search.
const MAX_SWEEPS: usize = 4;

/// A Conv's geometry, its float weights, and the running sums of the
/// asymmetric loss over its input patches (see the module's comment).
#[derive(Debug, Clone)]
pub struct PatchMoments {
    geometry: ConvGeometry,
    /// `out_channels` rows of `patch_len` values, as the initializer holds
    /// them.
    weights: Vec<f32>,
    out_channels: usize,
    /// Per group, `Σ x̂ x̂ᵀ`, `len × len`, all of it filled.
    moments: Vec<Vec<f64>>,
    /// Per group, `Σ x̂ (w·e)` for each of its output channels: `len` rows
    /// of `out_channels / group`.
    cross: Vec<Vec<f64>>,
    /// Per output channel, `Σ (w·e)²`.
    residual: Vec<f64>,
    samples: u64,
    /// Positions to sample in each image.
    per_image: usize,
}

impl PatchMoments {
    /// For a Conv of `geometry` with float `weights` (its initializer's
    /// values), over `images` calibration images, its sums taken out of
    /// `budget` (values; see [`MAX_MOMENT_VALUES`]); `None` where its patch
    /// is over [`MAX_PATCH`], the weights do not fit the geometry, the
    /// budget is short or it has no image.
    pub fn new(
        geometry: ConvGeometry,
        weights: Vec<f32>,
        images: usize,
        budget: &mut usize,
    ) -> Option<PatchMoments> {
        let len = geometry.patch_len();
        let groups = geometry.group;
        if len == 0 || len > MAX_PATCH || images == 0 || !weights.len().is_multiple_of(len) {
            return None;
        }
        let out_channels = weights.len() / len;
        if out_channels == 0 || !out_channels.is_multiple_of(groups) {
            return None;
        }
        let values = len
            .checked_mul(len)?
            .checked_add(len.checked_mul(out_channels / groups)?)?
            .checked_mul(groups)?
            .checked_add(out_channels)?;
        *budget = budget.checked_sub(values)?;
        let per_image = SAMPLES_PER_CONV.div_ceil(images).max(1);
        Some(PatchMoments {
            moments: vec![vec![0.0; len * len]; groups],
            cross: vec![vec![0.0; len * (out_channels / groups)]; groups],
            residual: vec![0.0; out_channels],
            geometry,
            weights,
            out_channels,
            samples: 0,
            per_image,
        })
    }

    /// [`PatchMoments::new`] for the Conv of `geometry` in `graph`, its
    /// weights read from there. `Ok(Err(why))` where it keeps rounding to
    /// nearest: its weight is shared or not an initializer, or `new`
    /// refused it.
    pub fn of_conv(
        graph: &GraphProto,
        geometry: ConvGeometry,
        images: usize,
        budget: &mut usize,
    ) -> Result<Result<PatchMoments, &'static str>, GraphError> {
        let name = &geometry.weight;
        let readers = graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == name))
            .count();
        if readers != 1 {
            return Ok(Err("its weight is shared"));
        }
        let Some(tensor) = graph.initializer.iter().find(|t| t.name == *name) else {
            return Ok(Err("its weight is not an initializer"));
        };
        let weights = read_f32(tensor)?;
        Ok(PatchMoments::new(geometry, weights, images, budget).ok_or(
            "its patch or its model's moments are over the bounds, or its weights do not fit it",
        ))
    }

    /// The Conv's id.
    pub fn conv(&self) -> &str {
        &self.geometry.conv
    }

    /// Adds one image's input, `[1, C, H, W]`, as the float model computes
    /// it (`float`) and as the quantized Conv reads it (`quantized`); a
    /// shape that does not fit the Conv is skipped and answered `false`.
    pub fn add(&mut self, shape: &[usize], float: &[f32], quantized: &[f32]) -> bool {
        let g = &self.geometry;
        let Some(([height, width], [out_h, out_w])) = g.sizes(shape, float) else {
            return false;
        };
        if quantized.len() != float.len() {
            return false;
        }
        let positions = out_h * out_w;
        let taken = self.per_image.min(positions);
        let len = g.patch_len();
        let out_per_group = self.out_channels / g.group;
        // Per group, this image's patches as the rows of matrices, so the
        // sums grow by matrix products: a rank-1 update per patch streamed
        // all of H through memory each time (a dense 3×3 Conv of 96
        // channels: 3 MB a patch), and took most of the pass.
        let mut error = Array2::<f64>::zeros((taken, len));
        let mut seen = Array2::<f64>::zeros((taken, len));
        let mut output_error = Array2::<f64>::zeros((taken, out_per_group));
        for group in 0..g.group {
            fill_patches(
                g,
                group,
                [height, width],
                out_w,
                positions,
                float,
                &mut error,
            );
            fill_patches(
                g,
                group,
                [height, width],
                out_w,
                positions,
                quantized,
                &mut seen,
            );
            error -= &seen;
            let rows = &self.weights[group * out_per_group * len..][..out_per_group * len];
            let Ok(rows) = ArrayView2::from_shape((out_per_group, len), rows) else {
                return false;
            };
            let rows = rows.mapv(f64::from);
            // w·e for each sampled position and output channel.
            general_mat_mul(1.0, &error, &rows.t(), 0.0, &mut output_error);
            let Ok(mut h) =
                ArrayViewMut2::from_shape((len, len), self.moments[group].as_mut_slice())
            else {
                return false;
            };
            general_mat_mul(1.0, &seen.t(), &seen, 1.0, &mut h);
            let Ok(mut b) =
                ArrayViewMut2::from_shape((len, out_per_group), self.cross[group].as_mut_slice())
            else {
                return false;
            };
            general_mat_mul(1.0, &seen.t(), &output_error, 1.0, &mut b);
            let residual = &mut self.residual[group * out_per_group..][..out_per_group];
            for (r, column) in residual.iter_mut().zip(output_error.columns()) {
                *r += column.iter().map(|v| v * v).sum::<f64>();
            }
        }
        self.samples += taken as u64;
        true
    }

    /// The weights rounded to INT8 on each row's own scale
    /// ([`weight_scales`], as the Q/DQ pairs take it), each weight down or
    /// up, whichever keeps the rows' outputs on the sampled patches
    /// closest to the float ones; returned as the values on the grid, with
    /// what changed. `None` where nothing was sampled.
    pub fn round(&self) -> Option<(Vec<f32>, RoundingDone)> {
        let group_count = self.geometry.group;
        let len = self.geometry.patch_len();
        if self.samples == 0 {
            return None;
        }
        let scales = weight_scales(&self.weights, self.out_channels);
        let out_per_group = self.out_channels / group_count;
        let mut rounded = Vec::with_capacity(self.weights.len());
        let mut done = RoundingDone::default();
        for (o, (w, &s)) in self.weights.chunks(len).zip(&scales).enumerate() {
            let group = o / out_per_group;
            let h = &self.moments[group];
            let b: Vec<f64> = self.cross[group]
                .chunks(out_per_group)
                .map(|row| row[o % out_per_group])
                .collect();
            let (q, nearest, best) = round_row(w, s, h, &b, self.residual[o], len);
            done.flipped += q
                .iter()
                .zip(w)
                .filter(|&(&q, &w)| q != (w / s).round_ties_even().clamp(-127.0, 127.0))
                .count();
            done.nearest_loss += nearest;
            done.loss += best;
            rounded.extend(q.iter().map(|&q| q * s));
        }
        Some((rounded, done))
    }
}

/// The rows of `patches`: sampled output positions of one image, evenly
/// over it, row after row, each row the values of `group`'s patch there
/// (zeros where the kernel reads padding).
fn fill_patches(
    g: &ConvGeometry,
    group: usize,
    [height, width]: [usize; 2],
    out_w: usize,
    positions: usize,
    values: &[f32],
    patches: &mut Array2<f64>,
) {
    let taken = patches.nrows();
    let [kh, kw] = g.kernel;
    for k in 0..taken {
        let p = k * positions / taken.max(1);
        let (oy, ox) = (p / out_w.max(1), p % out_w.max(1));
        let mut patch = patches.row_mut(k);
        patch.fill(0.0);
        for ci in 0..g.in_per_group {
            let c = group * g.in_per_group + ci;
            let plane = &values[c * height * width..][..height * width];
            for y in 0..kh {
                let Some(row) = g.tap(oy, y, 0).filter(|&r| r < height) else {
                    continue;
                };
                for x in 0..kw {
                    if let Some(col) = g.tap(ox, x, 1).filter(|&c| c < width) {
                        patch[(ci * kh + y) * kw + x] = f64::from(plane[row * width + col]);
                    }
                }
            }
        }
    }
}

/// What adaptive rounding changed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoundingDone {
    /// Convs rounded.
    pub convs: usize,
    /// Weights rounded to the other neighbour than the nearest.
    pub flipped: usize,
    /// The summed loss `c − 2 δᵀb + δᵀ H δ` with rounding to nearest (per
    /// sample, over every channel; `c`, which no rounding removes,
    /// included)...
    pub nearest_loss: f64,
    /// ... and with the rounding chosen.
    pub loss: f64,
}

/// One output channel's weights `w` on the grid of `s`: the integers, the
/// loss `c − 2 δᵀb + δᵀ H δ` of rounding to nearest, and that of the
/// result (`h`: `len × len`). Starts at the nearest and flips single
/// weights to their other neighbour while a flip lowers the loss.
fn round_row(w: &[f32], s: f32, h: &[f64], b: &[f64], c: f64, len: usize) -> (Vec<f32>, f64, f64) {
    let s64 = f64::from(s);
    let mut q: Vec<f32> = w
        .iter()
        .map(|&w| (w / s).round_ties_even().clamp(-127.0, 127.0))
        .collect();
    if s <= 0.0 || !s.is_finite() {
        return (q, c, c);
    }
    let delta: Vec<f64> = q
        .iter()
        .zip(w)
        .map(|(&q, &w)| f64::from(q) * s64 - f64::from(w))
        .collect();
    // g = H δ − b: half the loss's gradient in δ.
    let mut g: Vec<f64> = (0..len)
        .map(|i| {
            h[i * len..][..len]
                .iter()
                .zip(&delta)
                .map(|(a, d)| a * d)
                .sum::<f64>()
                - b[i]
        })
        .collect();
    // δᵀHδ − 2δᵀb = δᵀ(g − b).
    let nearest = c + g
        .iter()
        .zip(b)
        .zip(&delta)
        .map(|((g, b), d)| d * (g - b))
        .sum::<f64>();
    let mut loss = nearest;
    // Changes smaller than this are rounding noise of the sums.
    let tolerance = 1e-12 * (0..len).map(|i| h[i * len + i]).sum::<f64>() * s64 * s64;
    for _ in 0..MAX_SWEEPS {
        let mut flips = 0;
        for j in 0..len {
            let down = (w[j] / s).floor();
            let other = if q[j] > down { down } else { down + 1.0 };
            if !(-127.0..=127.0).contains(&other) || other == q[j] {
                continue;
            }
            let d = f64::from(other - q[j]) * s64;
            let change = 2.0 * d * g[j] + d * d * h[j * len + j];
            if change < -tolerance {
                q[j] = other;
                loss += change;
                for (gi, hij) in g.iter_mut().zip(&h[j * len..][..len]) {
                    *gi += d * hij;
                }
                flips += 1;
            }
        }
        if flips == 0 {
            break;
        }
    }
    (q, nearest, loss)
}

/// One Conv's weights as adaptive rounding chose them, not yet written
/// into the graph.
#[derive(Debug, Clone)]
pub struct RoundedConv {
    /// The Conv ([`super::qdq::conv_id`]).
    pub conv: String,
    weight: String,
    rounded: Vec<f32>,
    done: RoundingDone,
}

/// Rounds each Conv of `moments`, consuming the moments as it goes: they
/// are the largest thing the quantizer holds. A Conv where nothing was
/// sampled keeps rounding to nearest, with a warning.
pub fn plan(moments: Vec<PatchMoments>) -> Vec<RoundedConv> {
    let mut planned = Vec::with_capacity(moments.len());
    for m in moments {
        let Some((rounded, done)) = m.round() else {
            log::warn!(
                "adaptive rounding: Conv {} skipped: no patch was sampled",
                m.conv()
            );
            continue;
        };
        planned.push(RoundedConv {
            conv: m.conv().to_owned(),
            weight: m.geometry.weight.clone(),
            rounded,
            done,
        });
    }
    planned
}

/// Writes the planned weights back into `graph`, on the grid.
pub fn apply(graph: &mut GraphProto, planned: &[RoundedConv]) -> RoundingDone {
    let mut done = RoundingDone::default();
    for p in planned {
        let Some(tensor) = graph.initializer.iter_mut().find(|t| t.name == p.weight) else {
            log::warn!(
                "adaptive rounding: Conv {} skipped: its weight is gone",
                p.conv
            );
            continue;
        };
        let elements = tensor
            .dims
            .iter()
            .try_fold(1usize, |n, &d| n.checked_mul(usize::try_from(d).ok()?));
        if elements != Some(p.rounded.len()) {
            log::warn!(
                "adaptive rounding: Conv {} skipped: its weight changed shape",
                p.conv
            );
            continue;
        }
        *tensor = f32_tensor(&p.weight, &tensor.dims.clone(), &p.rounded);
        done.convs += 1;
        done.flipped += p.done.flipped;
        done.nearest_loss += p.done.nearest_loss;
        done.loss += p.done.loss;
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quantize::graph::node;

    const CHANNELS: usize = 6;
    const SIDE: usize = 8;

    /// Two 8×8 images of 6 correlated channels: channels share a common
    /// part, so `H` is far from diagonal.
    fn images() -> Vec<Vec<f32>> {
        (0..2)
            .map(|k| {
                (0..CHANNELS * SIDE * SIDE)
                    .map(|i| {
                        let (ch, p) = (i / (SIDE * SIDE), i % (SIDE * SIDE));
                        let common = ((p * 7 + k * 3) % 11) as f32 * 0.2;
                        common + ((p * (ch + 2) + k) % 5) as f32 * 0.05
                    })
                    .collect()
            })
            .collect()
    }

    /// Four rows: each row's largest weight sits on its grid (127 steps),
    /// the others 0.4 of a step above one, so rounding to nearest takes 0.4
    /// off each: errors that add up on correlated inputs.
    fn weights() -> Vec<f32> {
        (0..4)
            .flat_map(|row| {
                let step = 0.001 * (row + 1) as f32;
                [127.0, 10.4, -20.6, 33.4, 5.4, -7.6]
                    .map(|k: f32| if row % 2 == 0 { k } else { -k })
                    .map(move |k| k * step)
            })
            .collect()
    }

    /// The moments of a 1×1 Conv of [`weights`] over [`images`], the
    /// quantized model's input being `seen(float)`.
    fn measured(seen: &dyn Fn(f32) -> f32) -> PatchMoments {
        let conv = node("Conv", "c", &["x", "w"], &["y"]);
        let geometry = ConvGeometry::new(&conv, "c", &[4, 6, 1, 1]).unwrap();
        let mut budget = 100;
        let mut moments = PatchMoments::new(geometry, weights(), 2, &mut budget).unwrap();
        assert_eq!(budget, 100 - 36 - 24 - 4, "H, b and c of one group taken");
        for image in images() {
            let quantized: Vec<f32> = image.iter().map(|&x| seen(x)).collect();
            assert!(moments.add(&[1, CHANNELS, SIDE, SIDE], &image, &quantized));
        }
        moments
    }

    /// `Σ (w·x − ŵ·x̂)²` over every position of [`images`] (each is
    /// sampled: 64 positions an image, under the 2,048 allowed).
    fn direct_loss(rounded: &[f32], seen: &dyn Fn(f32) -> f32) -> f64 {
        let mut loss = 0.0;
        for image in images() {
            for p in 0..SIDE * SIDE {
                let x: Vec<f64> = (0..CHANNELS)
                    .map(|c| f64::from(image[c * SIDE * SIDE + p]))
                    .collect();
                let x_seen: Vec<f64> = (0..CHANNELS)
                    .map(|c| f64::from(seen(image[c * SIDE * SIDE + p])))
                    .collect();
                for (w, r) in weights().chunks(CHANNELS).zip(rounded.chunks(CHANNELS)) {
                    let float: f64 = w.iter().zip(&x).map(|(&w, x)| f64::from(w) * x).sum();
                    let got: f64 = r.iter().zip(&x_seen).map(|(&r, x)| f64::from(r) * x).sum();
                    loss += (float - got).powi(2);
                }
            }
        }
        loss
    }

    /// The rounding stays on each row's grid, within ±127 and at most one
    /// step from the float weight.
    fn assert_on_the_grid(rounded: &[f32]) {
        let weights = weights();
        let scales = weight_scales(&weights, 4);
        for (row, (w, s)) in rounded.chunks(6).zip(weights.chunks(6).zip(&scales)) {
            for (&r, &w) in row.iter().zip(w) {
                let q = r / s;
                assert!((q - q.round()).abs() < 1e-3, "{r} is off the grid of {s}");
                assert!(q.abs() <= 127.001);
                assert!((r - w).abs() <= s * 1.0001, "{r} from {w}");
            }
        }
    }

    /// With the quantized model's input equal to the float one, the loss is
    /// AdaRound's on the float inputs, `δᵀHδ`: the chosen rounding never
    /// loses to nearest, stays on the grid, moves some weights, and the
    /// loss it reports is the loss of what it returns.
    #[test]
    fn the_chosen_rounding_never_loses_to_nearest_and_stays_on_the_grid_issue_22() {
        let conv = node("Conv", "c", &["x", "w"], &["y"]);
        let geometry = ConvGeometry::new(&conv, "c", &[4, 6, 1, 1]).unwrap();
        assert!(
            PatchMoments::new(geometry.clone(), weights(), 2, &mut 63).is_none(),
            "over budget"
        );
        assert!(
            PatchMoments::new(geometry, weights()[1..].to_vec(), 2, &mut 100).is_none(),
            "weights that do not fill whole rows"
        );
        let same = |x: f32| x;
        let mut moments = measured(&same);
        assert!(
            !moments.add(&[1, 5, SIDE, SIDE], &[0.0; 5 * 64], &[0.0; 5 * 64]),
            "another channel count"
        );
        assert!(
            !moments.add(&[1, 6, SIDE, SIDE], &[0.0; 6 * 64], &[0.0; 6 * 63]),
            "the two inputs of different lengths"
        );
        let (rounded, done) = moments.round().unwrap();
        assert!(done.loss <= done.nearest_loss, "{done:?}");
        assert!(done.flipped > 0, "{done:?}");
        assert_on_the_grid(&rounded);
        let loss = direct_loss(&rounded, &same);
        assert!(
            (loss - done.loss).abs() <= 1e-6 * done.nearest_loss,
            "{loss} vs {}",
            done.loss
        );
    }

    /// The asymmetric loss: the quantized model's input reads 10 % low, as
    /// if the layers before lost that much. The rounding leans against it:
    /// on that input, it does better than the rounding the float inputs
    /// alone choose (previous test) and than nearest; the loss it reports,
    /// now with the input's own error in it, is the loss of what it
    /// returns, and so is the nearest's.
    #[test]
    fn the_rounding_leans_against_the_error_its_input_already_carries_issue_22() {
        let low = |x: f32| 0.9 * x;
        let (rounded, done) = measured(&low).round().unwrap();
        assert!(done.loss < done.nearest_loss, "{done:?}");
        assert!(done.flipped > 0, "{done:?}");
        assert_on_the_grid(&rounded);
        let (on_float_inputs, _) = measured(&|x| x).round().unwrap();
        assert_ne!(rounded, on_float_inputs);
        let weights = weights();
        let scales = weight_scales(&weights, 4);
        let loss = direct_loss(&rounded, &low);
        let nearest: Vec<f32> = weights
            .iter()
            .zip(scales.iter().flat_map(|&s| [s; 6]))
            .map(|(w, s)| (w / s).round_ties_even() * s)
            .collect();
        for (reported, returned) in [(done.loss, &rounded), (done.nearest_loss, &nearest)] {
            let direct = direct_loss(returned, &low);
            assert!(
                (direct - reported).abs() <= 1e-6 * direct,
                "{direct} vs {reported}"
            );
        }
        assert!(loss < direct_loss(&nearest, &low));
        assert!(
            loss < direct_loss(&on_float_inputs, &low),
            "{loss} against {}",
            direct_loss(&on_float_inputs, &low)
        );
    }
}
