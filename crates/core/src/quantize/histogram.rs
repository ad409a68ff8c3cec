//! Activation statistics and clipping thresholds for INT8 calibration:
//! a histogram of absolute values that grows with the data, and the three
//! ways of turning it into a threshold (TensorRT's entropy/KL search, a
//! percentile, the least squared error, plain min-max). Pure functions on
//! plain data.

/// Bins a histogram starts with; more are added as the range grows.
pub const DEFAULT_BINS: usize = 2048;

/// Growth beyond this many bins halves the resolution instead, so one
/// outlier batch cannot make a tensor's histogram huge.
const MAX_BINS: usize = 16 * DEFAULT_BINS;

/// Bins the entropy search quantizes the reference distribution into:
/// 2^(8-1), the positive half of signed INT8.
const QUANT_BINS: usize = 128;

/// A histogram of |x| over [0, bins × width), with a fixed bin width that
/// only changes (doubles) when the range outgrows [`MAX_BINS`].
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    counts: Vec<u64>,
    width: f32,
    amax: f32,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: Vec::new(),
            width: 0.0,
            amax: 0.0,
        }
    }
}

impl Histogram {
    /// Adds a tensor's values. NaNs are ignored; the first non-zero batch
    /// sets the bin width to cover it with [`DEFAULT_BINS`] bins.
    pub fn add(&mut self, values: &[f32]) {
        let batch_max = values
            .iter()
            .map(|v| v.abs())
            .filter(|v| v.is_finite())
            .fold(0.0f32, f32::max);
        if batch_max == 0.0 && self.counts.is_empty() {
            // All zeros so far: no range to set yet, and these zeros are
            // not counted (the statistics pass runs on one thread until
            // every histogram has its range, so that this stays as one pass
            // would have it).
            self.amax = self.amax.max(0.0);
            return;
        }
        if self.counts.is_empty() {
            // A subnormal maximum (below ~3e-42) would make the width 0,
            // and grow_to would double 0 forever: the width stays a normal
            // number, so doubling reaches any finite maximum.
            self.width = (batch_max / DEFAULT_BINS as f32).max(f32::MIN_POSITIVE);
            self.counts = vec![0; DEFAULT_BINS];
        }
        self.amax = self.amax.max(batch_max);
        self.grow_to(batch_max);
        let last = self.counts.len() - 1;
        for v in values.iter().map(|v| v.abs()).filter(|v| v.is_finite()) {
            let bin = ((v / self.width) as usize).min(last);
            self.counts[bin] += 1;
        }
    }

    /// Extends the range to hold `max`: more bins of the same width, or,
    /// past [`MAX_BINS`], pairs of bins merged.
    fn grow_to(&mut self, max: f32) {
        loop {
            let needed = (max / self.width).ceil() as usize;
            if needed <= self.counts.len() {
                return;
            }
            if needed <= MAX_BINS {
                self.counts.resize(needed, 0);
                return;
            }
            self.halve();
        }
    }

    /// The same bins, empty: where a second thread starts, so that its
    /// histogram and this one merge exactly ([`Histogram::merge`]).
    pub fn emptied(&self) -> Histogram {
        Histogram {
            counts: vec![0; self.counts.len()],
            width: self.width,
            amax: 0.0,
        }
    }

    /// Adds `other`'s counts. Where both grew from the same bins
    /// ([`Histogram::emptied`]) their widths differ by a power of two, as
    /// only doubling changes them, and the finer one's bins nest in the
    /// coarser one's: the result is then, count for count and bin for bin,
    /// what adding both sets of batches to one histogram gives, whatever
    /// their order (but for a batch maximum that falls exactly on the
    /// range's upper edge, which counts in the last bin until the range
    /// grows). Otherwise `other`'s counts go to the bins of their bins'
    /// centres, an approximation that the quantizer never asks for: its
    /// second thread starts only once every histogram has its bins.
    pub fn merge(&mut self, other: &Histogram) {
        self.amax = self.amax.max(other.amax);
        if other.counts.is_empty() {
            return;
        }
        if self.counts.is_empty() {
            self.counts = other.counts.clone();
            self.width = other.width;
            return;
        }
        let mut other = other.clone();
        let nested = |fine: f32, coarse: f32| {
            let ratio = coarse / fine;
            ratio >= 1.0 && ratio.fract() == 0.0 && (ratio as u64).is_power_of_two()
        };
        if nested(other.width, self.width) {
            while other.width < self.width {
                other.halve();
            }
        } else if nested(self.width, other.width) {
            while self.width < other.width {
                self.halve();
            }
        } else {
            // Widths of two unrelated first batches: each of `other`'s
            // bins goes where its centre falls.
            self.grow_to(other.amax);
            let last = self.counts.len() - 1;
            for (i, &c) in other.counts.iter().enumerate() {
                let centre = (i as f32 + 0.5) * other.width;
                let bin = ((centre / self.width) as usize).min(last);
                self.counts[bin] += c;
            }
            return;
        }
        if self.counts.len() < other.counts.len() {
            self.counts.resize(other.counts.len(), 0);
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
    }

    /// Pairs of bins merged, the width doubled.
    fn halve(&mut self) {
        self.counts = self.counts.chunks(2).map(|c| c.iter().sum()).collect();
        self.width *= 2.0;
    }

    /// The largest |x| seen.
    pub fn amax(&self) -> f32 {
        self.amax
    }

    /// The bin counts.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }

    /// The upper edge of bin `i`.
    fn edge(&self, i: usize) -> f32 {
        (i as f32 + 1.0) * self.width
    }
}

/// How a tensor's clipping threshold is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// The threshold whose 8-bit quantization keeps the distribution
    /// closest (KL divergence) to the original, as TensorRT's entropy
    /// calibrator does.
    Entropy,
    /// The given percentile of |x| (99.99 by default).
    Percentile(f64),
    /// The largest |x|: what the original NanoDet INT8 tutorial used.
    MinMax,
    /// The threshold whose INT8 quantization (round to nearest, clip)
    /// leaves the least mean squared error over the histogram, as
    /// pytorch-quantization's and TensorRT Model Optimizer's `mse`
    /// calibrators choose it.
    Mse,
}

/// The clipping threshold (amax) for a histogram. 0 when nothing but
/// zeros was seen.
pub fn threshold(hist: &Histogram, method: Method) -> f32 {
    if hist.counts.is_empty() {
        return 0.0;
    }
    match method {
        Method::MinMax => hist.amax,
        Method::Percentile(p) => percentile(hist, p),
        Method::Entropy => entropy(hist),
        Method::Mse => least_squared_error(hist),
    }
}

fn percentile(hist: &Histogram, p: f64) -> f32 {
    let total: u64 = hist.counts.iter().sum();
    let wanted = (p / 100.0 * total as f64).ceil() as u64;
    let mut seen = 0;
    for (i, &c) in hist.counts.iter().enumerate() {
        seen += c;
        if seen >= wanted {
            return hist.edge(i).min(hist.amax);
        }
    }
    hist.amax
}

/// KL(P || Q) over normalised distributions; infinite where Q lacks mass
/// that P has.
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let (sp, sq): (f64, f64) = (p.iter().sum(), q.iter().sum());
    if sp == 0.0 || sq == 0.0 {
        return f64::INFINITY;
    }
    let mut d = 0.0;
    for (&pi, &qi) in p.iter().zip(q) {
        if pi > 0.0 {
            if qi == 0.0 {
                return f64::INFINITY;
            }
            let (pn, qn) = (pi / sp, qi / sq);
            d += pn * (pn / qn).ln();
        }
    }
    d
}

/// TensorRT's entropy calibration: for each candidate threshold bin `i`
/// (from [`QUANT_BINS`] on), clip the histogram there (outliers folded
/// into the last bin) as P, quantize its first `i` bins into 128 levels and
/// expand them back over the non-empty bins as Q, and keep the `i` with
/// the smallest KL(P || Q). As in TensorRT and pytorch-quantization, a
/// candidate whose last bin is empty while outliers are folded into it
/// has infinite divergence, so thresholds land on populated bins.
fn entropy(hist: &Histogram) -> f32 {
    let counts: Vec<f64> = hist.counts.iter().map(|&c| c as f64).collect();
    let n = counts.len();
    if n <= QUANT_BINS {
        return hist.amax;
    }
    let mut best = (f64::INFINITY, n);
    let mut p = Vec::with_capacity(n);
    let mut q = vec![0.0; n];
    let mut tail: f64 = counts[QUANT_BINS..].iter().sum();
    // Bounded work for grown histograms: about 2048 candidates at most.
    let stride = n.div_ceil(DEFAULT_BINS).max(1);
    let mut i = QUANT_BINS;
    while i <= n {
        p.clear();
        p.extend_from_slice(&counts[..i]);
        p[i - 1] += tail;
        // Bin k of the i goes to level floor(k * 128 / i).
        q[..i].iter_mut().for_each(|v| *v = 0.0);
        let mut start = 0;
        for level in 0..QUANT_BINS {
            let end = ((level + 1) * i).div_ceil(QUANT_BINS).min(i);
            let chunk = &counts[start..end];
            let total: f64 = chunk.iter().sum();
            let nonzero = chunk.iter().filter(|&&c| c > 0.0).count();
            if nonzero > 0 {
                let share = total / nonzero as f64;
                for (k, &c) in chunk.iter().enumerate() {
                    if c > 0.0 {
                        q[start + k] = share;
                    }
                }
            }
            start = end;
        }
        let d = kl_divergence(&p, &q[..i]);
        if d < best.0 {
            best = (d, i);
        }
        let next = i + stride;
        tail -= counts[i.min(n)..next.min(n)].iter().sum::<f64>();
        i = next;
    }
    hist.edge(best.1 - 1).min(hist.amax)
}

/// The bins the squared-error search reads: a grown histogram is merged
/// down to about this many, so its cost stays near 2048 × 2048 / 2 bin
/// visits per tensor.
const MSE_BINS: usize = DEFAULT_BINS;

/// ∫ (x − m)² dx over [a, b].
fn squared_distance_integral(a: f64, b: f64, m: f64) -> f64 {
    ((b - m).powi(3) - (a - m).powi(3)) / 3.0
}

/// ∫ (x − q(x))² dx over [a, b] ⊂ [0, 127 s], with q rounding to the
/// nearest multiple of `s` (ties away from zero; they have no mass).
fn rounding_error_integral(a: f64, b: f64, s: f64) -> f64 {
    let mut total = 0.0;
    let mut x = a;
    // Levels only go up, so the loop ends even where float rounding puts
    // a segment's end at its start.
    let mut level = (a / s + 0.5).floor();
    while x < b {
        let end = ((level + 0.5) * s).min(b);
        if end > x {
            total += squared_distance_integral(x, end, level * s);
            x = end;
        }
        level += 1.0;
    }
    total
}

/// [`Method::Mse`]: for each candidate threshold t at a bin edge (from
/// the [`QUANT_BINS`]th on), the squared error of quantizing the
/// histogram's values with scale t/127: the values are taken as spread
/// evenly inside their bin, those below t rounded to the grid, those above
/// clipped to t. The candidate with the least error wins.
fn least_squared_error(hist: &Histogram) -> f32 {
    let merge = hist.counts.len().div_ceil(MSE_BINS).max(1);
    let counts: Vec<f64> = hist
        .counts
        .chunks(merge)
        .map(|c| c.iter().sum::<u64>() as f64)
        .collect();
    let width = f64::from(hist.width) * merge as f64;
    let n = counts.len();
    if n <= QUANT_BINS {
        return hist.amax;
    }
    // Suffix sums over the bins above a candidate, for the clipping error
    // Σ c (E[x²] − 2t E[x] + t²) with x even in [a, b]: E[x] = (a+b)/2 and
    // E[x²] = (a² + ab + b²)/3.
    let mut above = vec![(0.0f64, 0.0f64, 0.0f64); n + 1];
    for i in (0..n).rev() {
        let (a, b) = (i as f64 * width, (i + 1) as f64 * width);
        let c = counts[i];
        let (n1, s1, s2) = above[i + 1];
        above[i] = (
            n1 + c,
            s1 + c * (a + b) / 2.0,
            s2 + c * (a * a + a * b + b * b) / 3.0,
        );
    }
    let mut best = (f64::INFINITY, n);
    for i in QUANT_BINS..=n {
        let t = i as f64 * width;
        let s = t / 127.0;
        let below: f64 = counts[..i]
            .iter()
            .enumerate()
            .filter(|&(_, &c)| c > 0.0)
            .map(|(k, &c)| {
                let a = k as f64 * width;
                c * rounding_error_integral(a, a + width, s) / width
            })
            .sum();
        let (c, sx, sxx) = above[i];
        let clipped = sxx - 2.0 * t * sx + t * t * c;
        let error = below + clipped;
        if error < best.0 {
            best = (error, i);
        }
    }
    ((best.1 as f64 * width) as f32).min(hist.amax)
}

/// The symmetric INT8 scale for a threshold: values in [-t, t] map to
/// [-127, 127]. A zero threshold (an all-zero tensor or channel, which
/// pruned exports have) gets the scale of a threshold of 1: TensorRT
/// rejects a zero scale, and a denormal-sized one trips its range checks,
/// while any scale represents zeros exactly.
pub fn scale(threshold: f32) -> f32 {
    if threshold > 0.0 && threshold.is_finite() {
        threshold / 127.0
    } else {
        1.0 / 127.0
    }
}

/// Per-output-channel weight scales (axis 0) for the narrow range
/// [-127, 127]: each channel's largest |w| maps to 127.
pub fn weight_scales(weights: &[f32], out_channels: usize) -> Vec<f32> {
    if out_channels == 0 || weights.is_empty() {
        return Vec::new();
    }
    let per = weights.len() / out_channels;
    weights
        .chunks(per.max(1))
        .take(out_channels)
        .map(|c| scale(c.iter().map(|w| w.abs()).fold(0.0, f32::max)))
        .collect()
}

#[cfg(test)]
mod tests {
    /// Issue 17: an activation whose first non-zero maximum was subnormal
    /// made the bin width 0, and the next batch looped forever.
    #[test]
    fn a_subnormal_first_maximum_does_not_hang_issue_17() {
        let mut h = Histogram::default();
        h.add(&[1e-42, 0.0]);
        h.add(&[1.0, 3e38]);
        assert_eq!(h.counts().iter().sum::<u64>(), 4);
        assert_eq!(h.amax(), 3e38);
        assert!(h.counts().len() <= MAX_BINS);
    }

    use super::*;

    /// A deterministic bell-ish sample: the sum of four uniform draws.
    fn bell(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed;
        let mut uniform = move || {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 11) as f32 / (1u64 << 53) as f32 - 0.5
        };
        (0..n)
            .map(|_| uniform() + uniform() + uniform() + uniform())
            .collect()
    }

    #[test]
    fn the_histogram_grows_with_the_range_and_keeps_every_count() {
        let mut h = Histogram::default();
        h.add(&[0.5, -1.0]);
        assert_eq!(h.counts().len(), DEFAULT_BINS);
        h.add(&[3.0, f32::NAN]);
        assert_eq!(h.counts().iter().sum::<u64>(), 3, "NaN ignored");
        assert_eq!(h.amax(), 3.0);
        assert_eq!(h.counts().len(), 3 * DEFAULT_BINS);
        // Far beyond MAX_BINS: bins merge, counts survive.
        h.add(&[1000.0]);
        assert!(h.counts().len() <= MAX_BINS);
        assert_eq!(h.counts().iter().sum::<u64>(), 4);
    }

    /// The statistics pass runs on two threads: the first batch sets the
    /// bins, then each half of the rest goes into its own histogram, one
    /// of them started from the first's bins emptied. The merge must be
    /// the one-pass histogram exactly, thresholds and all, whichever half
    /// grew more and past how many pair merges.
    #[test]
    fn halves_started_from_the_same_bins_merge_into_the_one_pass_histogram() {
        let scales = [1.0f32, 2.5, 0.7, 40.0, 3.0, 900.0, 1.2, 0.3];
        let batches: Vec<Vec<f32>> = scales
            .iter()
            .enumerate()
            .map(|(i, &s)| bell(5_000, i as u64 + 1).iter().map(|v| v * s).collect())
            .collect();
        for split in 1..batches.len() {
            let mut one_pass = Histogram::default();
            for b in &batches {
                one_pass.add(b);
            }
            let mut mine = Histogram::default();
            mine.add(&batches[0]);
            let mut theirs = mine.emptied();
            for b in &batches[1..split] {
                mine.add(b);
            }
            for b in &batches[split..] {
                theirs.add(b);
            }
            // Either way round.
            let mut other_way = theirs.clone();
            other_way.merge(&mine);
            mine.merge(&theirs);
            assert_eq!(mine, one_pass, "split at {split}");
            assert_eq!(other_way, one_pass, "split at {split}, the other way");
            for method in [Method::Percentile(99.99), Method::Mse, Method::Entropy] {
                assert_eq!(threshold(&mine, method), threshold(&one_pass, method));
            }
        }
        // The batch at 900 takes the range past MAX_BINS: bins merged.
        let mut h = Histogram::default();
        batches.iter().for_each(|b| h.add(b));
        assert!(h.width > batches[0].iter().fold(0f32, |m, v| m.max(v.abs())) / 2048.0);
    }

    /// Histograms started apart (the first batch all zeros for one of
    /// them) still merge: every count kept, the largest value the larger.
    #[test]
    fn histograms_of_unrelated_bins_merge_every_count() {
        let mut a = Histogram::default();
        a.add(&bell(1000, 3));
        let mut b = Histogram::default();
        b.add(&[0.0, 0.0]);
        b.add(&bell(1000, 4).iter().map(|v| v * 3.3).collect::<Vec<_>>());
        let ratio = b.width / a.width;
        assert!(
            ratio.log2().fract() != 0.0,
            "widths {ratio} apart: not nested"
        );
        let amax = a.amax().max(b.amax());
        let counted = |h: &Histogram| h.counts().iter().sum::<u64>();
        let both = counted(&a) + counted(&b);
        assert!(both >= 2000);
        a.merge(&b);
        assert_eq!(counted(&a), both);
        assert_eq!(a.amax(), amax);
        assert!(a.edge(a.counts().len() - 1) >= amax);
        // An empty one changes nothing but the largest value.
        let before = a.clone();
        a.merge(&Histogram::default());
        assert_eq!(a, before);
        let mut empty = Histogram::default();
        empty.merge(&before);
        assert_eq!(empty, before);
    }

    #[test]
    fn minmax_percentile_and_entropy_order_as_expected() {
        let mut h = Histogram::default();
        let mut data = bell(200_000, 7);
        // A few large outliers, as activations without ReLU6 have.
        data.extend([4.0, -3.5, 3.0]);
        h.add(&data);
        let minmax = threshold(&h, Method::MinMax);
        let p9999 = threshold(&h, Method::Percentile(99.99));
        let entropy = threshold(&h, Method::Entropy);
        let mse = threshold(&h, Method::Mse);
        assert_eq!(minmax, 4.0);
        assert!(mse > 1.0 && mse < 4.0, "{mse}");
        // The bulk lies within ±2: both clip the outliers away.
        assert!(p9999 > 1.0 && p9999 < 2.1, "{p9999}");
        assert!(entropy > 0.8 && entropy < 2.1, "{entropy}");
    }

    /// The least-squared-error threshold, against a brute-force search of
    /// the same error on the raw values: clipping a Laplace-like tail that
    /// rounding would spread over the grid.
    #[test]
    fn mse_picks_the_threshold_with_the_least_squared_error() {
        // |x| with a long tail: a bell plus a sparse exponential tail.
        let mut data = bell(100_000, 3);
        data.extend((1..2000).map(|k| (k as f32 / 2000.0).ln().abs() * 1.5));
        let mut h = Histogram::default();
        h.add(&data);
        let error = |t: f32| -> f64 {
            let s = f64::from(t) / 127.0;
            data.iter()
                .map(|&v| {
                    let x = f64::from(v.abs());
                    let q = ((x / s).round().min(127.0)) * s;
                    (x - q) * (x - q)
                })
                .sum()
        };
        let chosen = threshold(&h, Method::Mse);
        let amax = h.amax();
        assert!(chosen > 0.0 && chosen < amax, "{chosen} of {amax}");
        // No threshold on a fine grid over the range does better by more
        // than the histogram's resolution allows (1 %).
        let best_brute = (1..=400)
            .map(|k| amax * k as f32 / 400.0)
            .filter(|&t| t >= amax * QUANT_BINS as f32 / DEFAULT_BINS as f32)
            .map(error)
            .fold(f64::INFINITY, f64::min);
        assert!(
            error(chosen) <= best_brute * 1.01,
            "{} against {best_brute}",
            error(chosen)
        );
        // And it clips: min-max's error is larger.
        assert!(error(chosen) < error(amax));
    }

    #[test]
    fn entropy_keeps_the_full_range_when_nothing_is_an_outlier() {
        // Uniform data: clipping anything loses information.
        let data: Vec<f32> = (0..100_000).map(|i| i as f32 / 100_000.0).collect();
        let mut h = Histogram::default();
        h.add(&data);
        let t = threshold(&h, Method::Entropy);
        assert!(t > 0.9, "{t}");
    }

    #[test]
    fn scales_are_positive_and_per_channel() {
        assert_eq!(scale(12.7), 0.1);
        assert_eq!(scale(0.0), 1.0 / 127.0);
        let w = [1.0, -2.0, 0.5, 0.0, 0.0, 0.0, 127.0, 3.0, -1.0];
        assert_eq!(weight_scales(&w, 3), [2.0 / 127.0, 1.0 / 127.0, 1.0]);
        let zeros = Histogram::default();
        assert_eq!(threshold(&zeros, Method::Entropy), 0.0);
        assert_eq!(threshold(&zeros, Method::Mse), 0.0);
    }
}
