//! Adaptive weight rounding (issue 22), after AdaRound (Nagel et al.,
//! "Up or Down? Adaptive Rounding for Post-Training Quantization", 2020):
//! each INT8 weight may round down or up, not only to the nearest, and
//! the choice that keeps a Conv's output closest to the float one on the
//! calibration images wins.
//!
//! Per output channel the error a rounding adds to the output is `δᵀ H
//! δ`, with `δ` the weights' rounding errors and `H = E[x xᵀ]` the second
//! moment of the input patches the channel reads (AdaRound's local loss,
//! on the float inputs). `H` is measured on a spread of output positions
//! of the calibration images in the statistics pass the quantizer makes
//! anyway. A greedy search then flips single weights to their other
//! neighbour on the grid while that lowers the loss: each flip test costs
//! O(1) with `g = H δ` kept up to date, and AdaRound's gradient solver
//! (annealed regularizer, Adam) is left out for a search that takes
//! seconds. The weights are written back on the grid of their own
//! per-channel scale, so the Q/DQ pairs reproduce them exactly.

use super::bias::ConvGeometry;
use super::graph::{GraphError, f32_tensor, read_f32};
use super::histogram::weight_scales;
use tract_onnx::pb::GraphProto;
use tract_onnx::prelude::tract_ndarray::linalg::general_mat_mul;
use tract_onnx::prelude::tract_ndarray::{Array2, ArrayViewMut2};

/// Output positions sampled per Conv over the whole set, spread over the
/// images and over each image: enough for `H` to be full rank where the
/// patch is large (a dense 3×3 Conv of 96 channels reads 864 values), and
/// a bound on the pass's cost: 4,096 outer products of the patch.
pub const SAMPLES_PER_CONV: usize = 4096;

/// Patches longer than this are left to round to nearest: `H` would take
/// `len²` values (2,048: 32 MB of f64 per group).
pub const MAX_PATCH: usize = 2048;

/// The second moments all Convs of one model may hold, in values (64 MB
/// of f64): nanodet-plus-m needs 2.9 M. A model past it (thousands of
/// groups, or of Convs) keeps rounding to nearest where the budget ran
/// out, rather than allocate what its file asks for.
pub const MAX_MOMENT_VALUES: usize = 1 << 23;

/// Greedy passes over a channel's weights at most; each pass that flips
/// nothing ends the search.
const MAX_SWEEPS: usize = 4;

/// A Conv's geometry and the running second moments of its input patches,
/// one `len × len` matrix per group (all of it filled; the rounding reads
/// the upper triangle).
#[derive(Debug, Clone)]
pub struct PatchMoments {
    geometry: ConvGeometry,
    moments: Vec<Vec<f64>>,
    samples: u64,
    /// Positions to sample in each image.
    per_image: usize,
}

impl PatchMoments {
    /// For a Conv of `geometry`, over `images` calibration images, its
    /// moments taken out of `budget` (values; see [`MAX_MOMENT_VALUES`]);
    /// `None` where its patch is over [`MAX_PATCH`], the budget is short or
    /// it has no image.
    pub fn new(geometry: ConvGeometry, images: usize, budget: &mut usize) -> Option<PatchMoments> {
        let len = geometry.patch_len();
        if len > MAX_PATCH || images == 0 {
            return None;
        }
        let groups = geometry.group;
        let values = len.checked_mul(len)?.checked_mul(groups)?;
        *budget = budget.checked_sub(values)?;
        let per_image = SAMPLES_PER_CONV.div_ceil(images).max(1);
        Some(PatchMoments {
            geometry,
            moments: vec![vec![0.0; len * len]; groups],
            samples: 0,
            per_image,
        })
    }

    /// The Conv's id.
    pub fn conv(&self) -> &str {
        &self.geometry.conv
    }

    /// Adds one image's input, `[1, C, H, W]`; a shape that does not fit
    /// the Conv is skipped and answered `false`.
    pub fn add(&mut self, shape: &[usize], values: &[f32]) -> bool {
        let g = &self.geometry;
        let Some(([height, width], [out_h, out_w])) = g.sizes(shape, values) else {
            return false;
        };
        let positions = out_h * out_w;
        let taken = self.per_image.min(positions);
        let len = g.patch_len();
        let [kh, kw] = g.kernel;
        // Per group, this image's patches as the rows of one matrix, so H
        // grows by one product Xᵀ X: a rank-1 update per patch streamed
        // all of H through memory each time (a dense 3×3 Conv of 96
        // channels: 3 MB a patch), and took most of the statistics pass.
        let mut patches = Array2::<f64>::zeros((taken, len));
        for (group, moments) in self.moments.iter_mut().enumerate() {
            for k in 0..taken {
                // Evenly over the image, row after row.
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
            let Ok(mut h) = ArrayViewMut2::from_shape((len, len), moments.as_mut_slice()) else {
                return false;
            };
            general_mat_mul(1.0, &patches.t(), &patches, 1.0, &mut h);
        }
        self.samples += taken as u64;
        true
    }

    /// `weights` (`out_channels` rows, the Conv's layout) rounded to INT8
    /// on each row's own scale ([`weight_scales`], as the Q/DQ pairs take
    /// it), each weight down or up, whichever keeps the rows' outputs on
    /// the sampled patches closest to the float ones; returned as the
    /// values on the grid, with what changed. `None` where the weights do
    /// not fit the geometry or nothing was sampled.
    pub fn round(&self, weights: &[f32], out_channels: usize) -> Option<(Vec<f32>, RoundingDone)> {
        let group = self.geometry.group;
        let len = self.geometry.patch_len();
        if self.samples == 0
            || out_channels == 0
            || !out_channels.is_multiple_of(group)
            || len.checked_mul(out_channels) != Some(weights.len())
        {
            return None;
        }
        let scales = weight_scales(weights, out_channels);
        let out_per_group = out_channels / group;
        let mut rounded = Vec::with_capacity(weights.len());
        let mut done = RoundingDone::default();
        let mut h = vec![0f64; len * len];
        let mut current_group = usize::MAX;
        for (o, (w, &s)) in weights.chunks(len).zip(&scales).enumerate() {
            let group = o / out_per_group;
            if group != current_group {
                full_symmetric(&self.moments[group], len, &mut h);
                current_group = group;
            }
            let (q, nearest, best) = round_row(w, s, &h, len);
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

/// What adaptive rounding changed.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoundingDone {
    /// Convs rounded.
    pub convs: usize,
    /// Weights rounded to the other neighbour than the nearest.
    pub flipped: usize,
    /// The summed local loss `δᵀ H δ` with rounding to nearest (per
    /// sample, over every channel)...
    pub nearest_loss: f64,
    /// ... and with the rounding chosen.
    pub loss: f64,
}

/// `upper` (upper triangle of a `len × len` matrix) as the full symmetric
/// matrix, into `full`.
fn full_symmetric(upper: &[f64], len: usize, full: &mut [f64]) {
    for i in 0..len {
        for j in i..len {
            let v = upper[i * len + j];
            full[i * len + j] = v;
            full[j * len + i] = v;
        }
    }
}

/// One output channel's weights `w` on the grid of `s`: the integers, the
/// loss `δᵀ H δ` of rounding to nearest, and that of the result. Starts at
/// the nearest and flips single weights to their other neighbour while a
/// flip lowers the loss.
fn round_row(w: &[f32], s: f32, h: &[f64], len: usize) -> (Vec<f32>, f64, f64) {
    let s64 = f64::from(s);
    let mut q: Vec<f32> = w
        .iter()
        .map(|&w| (w / s).round_ties_even().clamp(-127.0, 127.0))
        .collect();
    if s <= 0.0 || !s.is_finite() {
        return (q, 0.0, 0.0);
    }
    let delta: Vec<f64> = q
        .iter()
        .zip(w)
        .map(|(&q, &w)| f64::from(q) * s64 - f64::from(w))
        .collect();
    // g = H δ.
    let mut g: Vec<f64> = (0..len)
        .map(|i| {
            h[i * len..][..len]
                .iter()
                .zip(&delta)
                .map(|(a, b)| a * b)
                .sum()
        })
        .collect();
    let nearest: f64 = g.iter().zip(&delta).map(|(a, b)| a * b).sum();
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
    dims: Vec<i64>,
    rounded: Vec<f32>,
    done: RoundingDone,
}

/// Rounds each Conv of `moments` against `graph`'s weights, consuming the
/// moments as it goes: they are the largest thing the quantizer holds,
/// and automatic partial quantization's trial models run after this. A
/// Conv whose weight is not a float initializer of its own, or does not
/// fit its geometry, keeps rounding to nearest, with a warning.
pub fn plan(
    graph: &GraphProto,
    moments: Vec<PatchMoments>,
) -> Result<Vec<RoundedConv>, GraphError> {
    let mut planned = Vec::with_capacity(moments.len());
    for m in moments {
        let skip = |why: &str| log::warn!("adaptive rounding: Conv {} skipped: {why}", m.conv());
        let name = &m.geometry.weight;
        let readers = graph
            .node
            .iter()
            .filter(|n| n.input.iter().any(|i| i == name))
            .count();
        if readers != 1 {
            skip("its weight is shared");
            continue;
        }
        let Some(tensor) = graph.initializer.iter().find(|t| t.name == *name) else {
            skip("its weight is not an initializer");
            continue;
        };
        let Some(out_channels) = tensor.dims.first().and_then(|&d| usize::try_from(d).ok()) else {
            skip("its weight has no output channels");
            continue;
        };
        let Some((rounded, done)) = m.round(&read_f32(tensor)?, out_channels) else {
            skip("its weights do not fit its geometry, or no patch was sampled");
            continue;
        };
        planned.push(RoundedConv {
            conv: m.conv().to_owned(),
            weight: name.clone(),
            dims: tensor.dims.clone(),
            rounded,
            done,
        });
    }
    Ok(planned)
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
        *tensor = f32_tensor(&p.weight, &p.dims, &p.rounded);
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

    /// A 1×1 Conv over 6 correlated channels: the chosen rounding never
    /// loses to nearest on the sampled patches, stays on the grid within
    /// ±127, and moves some weights (nearest's errors all point one way,
    /// and the correlations add them up).
    #[test]
    fn the_chosen_rounding_never_loses_to_nearest_and_stays_on_the_grid_issue_22() {
        let conv = node("Conv", "c", &["x", "w"], &["y"]);
        let (c, hw) = (6usize, 8usize);
        let geometry = ConvGeometry::new(&conv, "c", &[4, 6, 1, 1]).unwrap();
        let mut budget = 40;
        assert!(
            PatchMoments::new(geometry.clone(), 2, &mut 35).is_none(),
            "over budget"
        );
        let mut moments = PatchMoments::new(geometry, 2, &mut budget).unwrap();
        assert_eq!(budget, 4, "one 6x6 matrix taken");
        for k in 0..2 {
            let image: Vec<f32> = (0..c * hw * hw)
                .map(|i| {
                    let (ch, p) = (i / (hw * hw), i % (hw * hw));
                    // Channels share a common part: H is far from diagonal.
                    let common = ((p * 7 + k * 3) % 11) as f32 * 0.2;
                    common + ((p * (ch + 2) + k) % 5) as f32 * 0.05
                })
                .collect();
            assert!(moments.add(&[1, c, hw, hw], &image));
        }
        assert!(
            !moments.add(&[1, 5, hw, hw], &[0.0; 5 * 64]),
            "another channel count"
        );
        // Each row's largest weight sits on its grid (127 steps); the
        // others 0.4 of a step above one, so rounding to nearest takes
        // 0.4 off each: errors that add up on correlated inputs.
        let weights: Vec<f32> = (0..4)
            .flat_map(|row| {
                let step = 0.001 * (row + 1) as f32;
                [127.0, 10.4, -20.6, 33.4, 5.4, -7.6]
                    .map(|k: f32| if row % 2 == 0 { k } else { -k })
                    .map(move |k| k * step)
            })
            .collect();
        let (rounded, done) = moments.round(&weights, 4).unwrap();
        assert!(done.loss <= done.nearest_loss, "{done:?}");
        assert!(done.flipped > 0, "{done:?}");
        let scales = weight_scales(&weights, 4);
        for (row, (w, s)) in rounded.chunks(6).zip(weights.chunks(6).zip(&scales)) {
            for (&r, &w) in row.iter().zip(w) {
                let q = r / s;
                assert!((q - q.round()).abs() < 1e-3, "{r} is off the grid of {s}");
                assert!(q.abs() <= 127.001);
                // Down or up from the float weight, never further.
                assert!((r - w).abs() <= s * 1.0001, "{r} from {w}");
            }
        }
        // The loss the search reports is the loss of what it returns.
        let mut h = vec![0.0; 36];
        full_symmetric(&moments.moments[0], 6, &mut h);
        let mut loss = 0.0;
        for (row, w) in rounded.chunks(6).zip(weights.chunks(6)) {
            let d: Vec<f64> = row.iter().zip(w).map(|(r, w)| f64::from(r - w)).collect();
            for i in 0..6 {
                for j in 0..6 {
                    loss += d[i] * h[i * 6 + j] * d[j];
                }
            }
        }
        assert!(
            (loss - done.loss).abs() <= 1e-3 * done.nearest_loss.max(1e-12),
            "{loss} vs {}",
            done.loss
        );
    }
}
