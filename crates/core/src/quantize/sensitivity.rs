//! Automatic partial quantization and the threshold choice (issue 22):
//! which Convs to keep in float, and which threshold each quantized input
//! gets, from each input's measured damage to the outputs.
//!
//! The damage has to be measured end to end. On nanodet-m_320 the stem's
//! max pool output, quantized alone, took the outputs to 17.3 dB SNR while
//! the next worst input gave 30.4 dB, yet neither that tensor's own
//! quantization SNR nor its per-channel SNR ranked it among the worst 15
//! (docs/INT8.md): the harm shows only downstream. So the model is run
//! once per quantized activation tensor, with only that tensor's Convs
//! quantized (their input and weights), on a few calibration images, and
//! its outputs are compared with the FP32 model's.
//!
//! The choice is then a pure function of those measures. Quantization
//! noise from different layers adds up nearly independently, so keeping a
//! tensor's Convs in float takes its own noise off the whole model's.
//! Tensors are taken, worst first or most noise per MAC first (whichever
//! does better, [`choose`]), until the estimate reaches the target SNR,
//! skipping any that would take the float share of the MACs past its cap.
//! The model it gives is measured again, and both figures reported.
//!
//! The same measure chooses each tensor's threshold (the threshold
//! choice): the worst tensors still quantized are tried once more at a
//! second method's threshold ([`threshold_trials`]), and those that did
//! less damage alone ([`better_at_second`], ranked by gain) switch, if the
//! whole model measures no worse with all of them switched; else the best
//! of the ranking's halving prefixes ([`halvings`], [`best_prefix`]) that
//! measures no worse than none, or none.

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};

use prost::Message;
use tract_onnx::pb::ModelProto;

use super::graph::GraphError;
use super::qdq;
use super::stats::{ActivationProbe, ProbeError};
use crate::model::{Layout, OutputMap};

/// Why the damage could not be measured.
#[derive(Debug, thiserror::Error)]
pub enum SensitivityError {
    /// A trial model could not be made.
    #[error("making a trial model")]
    Graph(#[from] GraphError),
    /// The FP32 model or a trial model could not be run.
    #[error("running the FP32 model or a trial model")]
    Probe(#[from] ProbeError),
    /// None of the trial images decoded.
    #[error("none of the trial images could be read")]
    NoImages,
    /// The second measuring thread died.
    #[error("a measuring thread stopped")]
    Worker,
    /// tract could not size every Conv's output.
    #[error("the Convs' MACs are unknown, so the float share cannot be capped")]
    UnknownMacs,
}

/// One quantized activation tensor and the Convs that read it.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    /// The tensor.
    pub tensor: String,
    /// The quantized Convs reading it ([`qdq::conv_id`]s).
    pub convs: Vec<String>,
    /// Their multiply-accumulates at batch 1.
    pub macs: u64,
    /// The squared error it alone puts into the outputs, summed over the
    /// images, each value weighted by its part ([`Trials::noise`]).
    pub noise: f64,
}

/// The float model's outputs on the trial images, and what they are
/// compared against.
pub struct Trials<'a> {
    /// The FP32 model at the Q/DQ opset (the quantizer's own graph before
    /// its pairs go in).
    pub model: &'a ModelProto,
    /// The network input's size.
    pub size: (usize, usize),
    /// The graph's outputs.
    pub outputs: Vec<String>,
    /// Preprocessed images.
    pub inputs: Vec<Vec<f32>>,
    /// The FP32 model's outputs per image, every output concatenated.
    pub reference: Vec<Vec<f32>>,
    /// Each value's weight in the measure, by its index in one image's
    /// outputs ([`weights`]).
    weights: Vec<f64>,
    /// Whether `weights` are by part, or all 1 (see [`Trials::by_part`]).
    by_part: bool,
}

impl<'a> Trials<'a> {
    /// Runs the FP32 `model` on `inputs` for the reference, and weighs
    /// its values by what they are to the detector `layout` describes.
    pub fn new(
        model: &'a ModelProto,
        size: (usize, usize),
        inputs: Vec<Vec<f32>>,
        layout: &Layout,
    ) -> Result<Trials<'a>, SensitivityError> {
        if inputs.is_empty() {
            return Err(SensitivityError::NoImages);
        }
        let outputs: Vec<String> = model
            .graph
            .as_ref()
            .map(|g| g.output.iter().map(|o| o.name.clone()).collect())
            .unwrap_or_default();
        let mut trials = Trials {
            model,
            size,
            outputs,
            inputs,
            reference: Vec::new(),
            weights: Vec::new(),
            by_part: true,
        };
        let mut reference = vec![Vec::new(); trials.inputs.len()];
        let mut lengths = Vec::new();
        trials.run(model.encode_to_vec(), &mut |image, values| {
            if image == 0 {
                lengths.push(values.len());
            }
            if let Some(r) = reference.get_mut(image) {
                r.extend_from_slice(values);
            }
        })?;
        match weights(layout, &reference, &lengths) {
            Some(weights) => trials.weights = weights,
            None => {
                log::warn!(
                    "trial models: the outputs do not fit the {} layout, or hold nothing on the trial images; every output value counts the same",
                    layout.kind
                );
                trials.weights = vec![1.0; reference.first().map_or(0, Vec::len)];
                trials.by_part = false;
            }
        }
        trials.reference = reference;
        Ok(trials)
    }

    /// Every output value's power, weighted, summed over the images.
    pub fn signal(&self) -> f64 {
        self.reference
            .iter()
            .flat_map(|image| image.iter().zip(&self.weights))
            .map(|(&v, &w)| w * f64::from(v) * f64::from(v))
            .sum()
    }

    /// The squared error of the model with `convs` quantized, each value
    /// weighted by its part ([`weights`]).
    pub fn noise(
        &self,
        convs: &HashSet<String>,
        scale: &(dyn Fn(&str) -> Option<f32> + Sync),
    ) -> Result<f64, SensitivityError> {
        // The trial's protobuf and bytes go before it runs: with two
        // threads on plus-m_416 they were 20 MB of the peak.
        let bytes = {
            let mut trial = self.model.clone();
            qdq::insert_qdq(&mut trial, convs, scale)?;
            trial.encode_to_vec()
        };
        // Compared as each output comes, not kept: 10 MB a thread on
        // plus-m_416's 6 images.
        let mut error = WeightedError::default();
        self.run(bytes, &mut |image, got| error.add(self, image, got))?;
        Ok(error.noise.min(f64::MAX))
    }

    /// Whether the measure weighs scores and boxes as halves: false where
    /// the outputs did not fit the layout and every value counts the same.
    pub fn by_part(&self) -> bool {
        self.by_part
    }

    /// Runs the model in `bytes` on every image, handing each output's
    /// values to `each` with the image's index, outputs in graph order.
    fn run(
        &self,
        bytes: Vec<u8>,
        each: &mut dyn FnMut(usize, &[f32]),
    ) -> Result<(), SensitivityError> {
        let probe = ActivationProbe::new(&bytes, self.size, &self.outputs)?;
        drop(bytes);
        for (image, input) in self.inputs.iter().enumerate() {
            probe.run(input, &mut |_, _, values| each(image, values))?;
        }
        Ok(())
    }
}

/// A trial model's weighted squared error, summed as its outputs come:
/// each image's outputs in graph order, the images in order.
#[derive(Debug, Default)]
struct WeightedError {
    /// The image being compared, and the offset into its reference.
    at: (usize, usize),
    noise: f64,
}

impl WeightedError {
    /// Adds the error of `got`, the next output of `image`.
    fn add(&mut self, trials: &Trials<'_>, image: usize, got: &[f32]) {
        if image != self.at.0 {
            self.at = (image, 0);
        }
        let offset = self.at.1;
        let want = trials
            .reference
            .get(image)
            .and_then(|r| r.get(offset..))
            .unwrap_or(&[]);
        let weight = trials.weights.get(offset..).unwrap_or(&[]);
        self.at.1 = offset.saturating_add(got.len());
        // One running sum, in the order of the values, so the result is
        // the same to the bit as summing them all at the end.
        for ((&w, &g), &k) in want.iter().zip(got).zip(weight) {
            if k == 0.0 {
                continue; // a value that counts nothing, even overflowed
            }
            let d = f64::from(w) - f64::from(g);
            // Finite even when a trial model overflows, so that the
            // estimate in `choose` never subtracts infinities.
            self.noise += if d.is_finite() { k * d * d } else { f64::MAX };
        }
    }
}

/// What an output value is to the detector.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Part {
    /// A class score.
    Score,
    /// A box value (a distance or a DFL logit).
    Box,
    /// Nothing the decoder reads.
    Unread,
}

/// The part of each value of one image's outputs (`lengths` values each,
/// in graph order), or `None` where they do not fit `layout`.
fn parts(layout: &Layout, lengths: &[usize]) -> Option<Vec<Part>> {
    let classes = layout.num_classes;
    let width = layout.boxes.width();
    let mut outputs: Vec<Vec<Part>> = lengths.iter().map(|&n| vec![Part::Unread; n]).collect();
    match &layout.outputs {
        OutputMap::Single {
            output,
            score_column,
            box_column,
        } => {
            let columns = classes.checked_add(width)?;
            let rows = outputs.get_mut(*output)?;
            if Some(rows.len()) != layout.priors().checked_mul(columns) {
                return None;
            }
            for row in rows.chunks_exact_mut(columns) {
                row.get_mut(*score_column..score_column.checked_add(classes)?)?
                    .fill(Part::Score);
                row.get_mut(*box_column..box_column.checked_add(width)?)?
                    .fill(Part::Box);
            }
            // Overlapping columns would leave some of a row unmarked.
            if rows.contains(&Part::Unread) {
                return None;
            }
        }
        OutputMap::PerLevel { scores, boxes } => {
            for ((level, &s), &b) in layout.levels.iter().zip(scores).zip(boxes) {
                let priors = level.priors();
                for (index, part, per_prior) in [(s, Part::Score, classes), (b, Part::Box, width)] {
                    let values = outputs.get_mut(index)?;
                    // An output read twice is not a layout the decoder takes.
                    if Some(values.len()) != priors.checked_mul(per_prior)
                        || values.iter().any(|&p| p != Part::Unread)
                    {
                        return None;
                    }
                    values.fill(part);
                }
            }
        }
    }
    Some(outputs.concat())
}

/// Each value's weight in the trial measure, by its index in one image's
/// outputs, from the FP32 `reference` outputs, or `None` where they do not
/// fit `layout`.
///
/// Raw squared error would measure the box values alone: on plus-m_320
/// the class scores, sigmoids mostly near 0, held 0.01 % of an INT8
/// model's error, and the DFL logits the rest. So the scores and the
/// boxes count as two halves, each value divided by its half's power
/// over the trial images: the measure's signal is then 2, and its SNR
/// that of the two halves' mean relative error. Values the decoder does
/// not read count nothing.
fn weights(layout: &Layout, reference: &[Vec<f32>], lengths: &[usize]) -> Option<Vec<f64>> {
    let parts = parts(layout, lengths)?;
    let mut power = [0.0f64; 2]; // scores, boxes
    for image in reference {
        if image.len() != parts.len() {
            return None;
        }
        for (&v, part) in image.iter().zip(&parts) {
            let p = f64::from(v) * f64::from(v);
            match part {
                Part::Score => power[0] += p,
                Part::Box => power[1] += p,
                Part::Unread => {}
            }
        }
    }
    // A part with no power, or too little to divide by, counts nothing.
    let [score, boxes] = power.map(|p| {
        let w = 1.0 / p;
        if p > 0.0 && w.is_finite() { w } else { 0.0 }
    });
    if score == 0.0 && boxes == 0.0 {
        return None;
    }
    Some(
        parts
            .iter()
            .map(|part| match part {
                Part::Score => score,
                Part::Box => boxes,
                Part::Unread => 0.0,
            })
            .collect(),
    )
}

/// A trial: the Convs it quantizes, and the scale of each tensor.
pub type Trial<'t> = (
    &'t HashSet<String>,
    &'t (dyn Fn(&str) -> Option<f32> + Sync),
);

/// Each trial's noise, in order, on two threads (tract runs a model on
/// one). The threads take the next trial as they finish one, so that a
/// run of costly trials does not leave one idle.
pub fn measure_all(trials: &Trials<'_>, jobs: &[Trial<'_>]) -> Result<Vec<f64>, SensitivityError> {
    let next = AtomicUsize::new(0);
    let work = || -> Result<Vec<(usize, f64)>, SensitivityError> {
        let mut done = Vec::new();
        loop {
            let i = next.fetch_add(1, Ordering::Relaxed);
            let Some((convs, scale)) = jobs.get(i) else {
                return Ok(done);
            };
            match trials.noise(convs, scale) {
                Ok(noise) => done.push((i, noise)),
                Err(e) => {
                    // The other thread stops at its next trial.
                    next.store(jobs.len(), Ordering::Relaxed);
                    return Err(e);
                }
            }
        }
    };
    let (mine, theirs) = std::thread::scope(|s| {
        let other = s.spawn(work);
        let mine = work();
        (mine, other.join().unwrap_or(Err(SensitivityError::Worker)))
    });
    let mut noise = vec![0.0; jobs.len()];
    for (i, n) in mine?.into_iter().chain(theirs?) {
        noise[i] = n;
    }
    Ok(noise)
}

/// Measures every candidate's noise: each alone quantized, at `scale`.
pub fn measure(
    trials: &Trials<'_>,
    candidates: &mut [Candidate],
    scale: &(dyn Fn(&str) -> Option<f32> + Sync),
) -> Result<(), SensitivityError> {
    let convs: Vec<HashSet<String>> = candidates
        .iter()
        .map(|c| c.convs.iter().cloned().collect())
        .collect();
    let jobs: Vec<Trial<'_>> = convs.iter().map(|c| (c, scale)).collect();
    for (c, noise) in candidates.iter_mut().zip(measure_all(trials, &jobs)?) {
        c.noise = noise;
    }
    Ok(())
}

/// What [`choose`] picked.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Tensors whose Convs stay in float, in the order chosen.
    pub tensors: Vec<String>,
    /// Their Convs.
    pub convs: Vec<String>,
    /// Their MACs.
    pub float_macs: u64,
    /// The estimated SNR (dB) of the model with them in float.
    pub estimated_db: f64,
}

/// SNR in dB of `signal` over `noise` (infinite without noise).
pub fn db(signal: f64, noise: f64) -> f64 {
    if noise <= 0.0 {
        f64::INFINITY
    } else {
        10.0 * (signal / noise).log10()
    }
}

/// Keeps tensors' Convs in float until the estimated SNR reaches
/// `target_db`, with at most `max_float_macs` of MACs in float.
/// `all_noise` is the fully quantized model's noise.
///
/// Two greedy passes, each skipping a tensor that would pass the cap:
/// worst first, and most noise per MAC first (the knapsack's greedy, which
/// takes the cheap depthwise Convs before a costly one). Where both reach
/// the target, the one with fewer tensors wins, as the fewest Convs in
/// float are asked for; otherwise the one with less noise left.
pub fn choose(
    candidates: &[Candidate],
    signal: f64,
    all_noise: f64,
    target_db: f64,
    max_float_macs: u64,
) -> Choice {
    let mut worst_first: Vec<&Candidate> = candidates.iter().collect();
    worst_first.sort_by(|a, b| b.noise.total_cmp(&a.noise).then(a.tensor.cmp(&b.tensor)));
    let per_mac = |c: &Candidate| c.noise / c.macs.max(1) as f64;
    let mut densest_first = worst_first.clone();
    densest_first.sort_by(|a, b| {
        per_mac(b)
            .total_cmp(&per_mac(a))
            .then(a.tensor.cmp(&b.tensor))
    });
    let by_noise = greedy(&worst_first, signal, all_noise, target_db, max_float_macs);
    let by_density = greedy(&densest_first, signal, all_noise, target_db, max_float_macs);
    let reached = |c: &Choice| c.estimated_db >= target_db;
    let density_wins = match (reached(&by_noise), reached(&by_density)) {
        (true, true) => by_density.tensors.len() < by_noise.tensors.len(),
        (true, false) => false,
        (false, true) => true,
        (false, false) => by_density.estimated_db > by_noise.estimated_db,
    };
    if density_wins { by_density } else { by_noise }
}

/// Floats the tensors in `order` until the target, skipping those past
/// the cap.
fn greedy(
    order: &[&Candidate],
    signal: f64,
    all_noise: f64,
    target_db: f64,
    max_float_macs: u64,
) -> Choice {
    let mut choice = Choice {
        tensors: Vec::new(),
        convs: Vec::new(),
        float_macs: 0,
        estimated_db: db(signal, all_noise),
    };
    let mut noise = all_noise;
    for c in order {
        if choice.estimated_db >= target_db {
            break;
        }
        let Some(macs) = choice.float_macs.checked_add(c.macs) else {
            continue;
        };
        if macs > max_float_macs {
            continue;
        }
        choice.float_macs = macs;
        noise = (noise - c.noise).max(0.0);
        choice.estimated_db = db(signal, noise);
        choice.tensors.push(c.tensor.clone());
        choice.convs.extend(c.convs.iter().cloned());
    }
    choice
}

/// The share of the still-quantized tensors' summed noise whose tensors get
/// a trial at the second threshold, worst first: on plus-m_320, with all
/// 85 tensors tried, the worst 29 held 80 % of the damage and 91 % of what
/// switching gained; a trial model takes about half a second of a core on
/// plus-m_416, to build and run on 6 images (docs/INT8.md).
pub const THRESHOLD_TRIAL_SHARE: f64 = 0.8;

/// A second scale within this fraction of the first is not tried: on
/// plus-m_320 the 16 tensors within 5 % held 3 % of the gain.
pub const MIN_SCALE_CHANGE: f32 = 0.05;

/// Which of `candidates` get a trial at their second threshold: among
/// those whose Convs are all still `quantized`, the worst first until they
/// hold [`THRESHOLD_TRIAL_SHARE`] of their summed noise, less those whose
/// `second` scale is within [`MIN_SCALE_CHANGE`] of the `first`.
pub fn threshold_trials(
    candidates: &[Candidate],
    quantized: &HashSet<String>,
    first: &dyn Fn(&str) -> Option<f32>,
    second: &mut dyn FnMut(&str) -> Option<f32>,
) -> Vec<Candidate> {
    let mut left: Vec<&Candidate> = candidates
        .iter()
        .filter(|c| c.convs.iter().all(|conv| quantized.contains(conv)))
        .collect();
    left.sort_by(|a, b| b.noise.total_cmp(&a.noise).then(a.tensor.cmp(&b.tensor)));
    let total: f64 = left.iter().map(|c| c.noise).sum();
    let mut held = 0.0;
    let mut worst = Vec::new();
    for c in left {
        if held >= THRESHOLD_TRIAL_SHARE * total {
            break;
        }
        held += c.noise;
        worst.push(c);
    }
    worst
        .into_iter()
        .filter(|c| match (first(&c.tensor), second(&c.tensor)) {
            (Some(a), Some(b)) => (b / a - 1.0).abs() > MIN_SCALE_CHANGE,
            _ => false,
        })
        .cloned()
        .collect()
}

/// The tensors whose trial at the second threshold (`second`, measured)
/// did less damage than at the first (`first`, the same tensors' noise at
/// the first threshold), the largest gain first (ties by name).
pub fn better_at_second(first: &[Candidate], second: &[Candidate]) -> Vec<String> {
    let mut better: Vec<(f64, &str)> = second
        .iter()
        .filter_map(|s| {
            let f = first.iter().find(|f| f.tensor == s.tensor)?;
            (s.noise < f.noise).then_some((f.noise - s.noise, s.tensor.as_str()))
        })
        .collect();
    better.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(b.1)));
    better.into_iter().map(|(_, t)| t.to_owned()).collect()
}

/// The lengths of the ranked list's prefixes to measure when switching all
/// `n` made the model worse: halving, rounded up, down to 1. ⌈log₂ n⌉
/// trial models instead of a greedy search's n.
pub fn halvings(n: usize) -> Vec<usize> {
    let mut lengths = Vec::new();
    let mut k = n;
    while k > 1 {
        k = k.div_ceil(2);
        lengths.push(k);
    }
    lengths
}

/// Of the prefixes measured, as (length, noise), the one to keep: the
/// lowest noise, if it is no more than `none`'s (nothing switched); ties to
/// the shorter. `(0, none)` where every one measured worse.
pub fn best_prefix(none: f64, measured: &[(usize, f64)]) -> (usize, f64) {
    measured
        .iter()
        .copied()
        .filter(|&(_, noise)| noise <= none)
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))
        .unwrap_or((0, none))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::square_layout as layout;

    fn candidate(tensor: &str, macs: u64, noise: f64) -> Candidate {
        Candidate {
            tensor: tensor.into(),
            convs: vec![format!("conv_{tensor}")],
            macs,
            noise,
        }
    }

    /// Worst first, skipping one too big for the cap, until the target.
    #[test]
    fn the_worst_tensors_that_fit_the_cap_go_float_until_the_target() {
        let candidates = [
            candidate("a", 10, 1.0),
            candidate("b", 50, 4.0),
            candidate("c", 10, 2.0),
            candidate("d", 10, 0.5),
        ];
        // Signal 1000, noise 8: 21.0 dB. Target 24 dB: noise ≤ 3.98.
        let choice = choose(&candidates, 1000.0, 8.0, 24.0, 30);
        // b is worst but past the cap; c, then a bring the noise to 5, then
        // d to 4.5: still short, and nothing is left.
        assert_eq!(choice.tensors, ["c", "a", "d"]);
        assert_eq!(choice.convs, ["conv_c", "conv_a", "conv_d"]);
        assert_eq!(choice.float_macs, 30);
        assert!((choice.estimated_db - db(1000.0, 4.5)).abs() < 1e-12);
        // The same by noise per MAC: c (0.2), a (0.1), b (0.08), d (0.05);
        // b's 50 MACs fit a cap of 100 after c and a, and the target is
        // reached with 3 tensors, against 2 (b, c) worst first.
        let choice = choose(&candidates, 1000.0, 8.0, 24.0, 100);
        assert_eq!(choice.tensors, ["b", "c"]);
        // Looser target stops at the first that reaches it.
        let choice = choose(&candidates, 1000.0, 8.0, 22.0, 100);
        assert_eq!(choice.tensors, ["b"]);
        // Already there: nothing in float.
        let choice = choose(&candidates, 1000.0, 8.0, 20.0, 100);
        assert!(choice.tensors.is_empty());
        assert_eq!(choice.estimated_db, db(1000.0, 8.0));
    }

    /// Under a cap, many cheap noisy tensors beat one costly noisier one.
    #[test]
    fn noise_per_mac_wins_where_the_cap_binds_before_the_target() {
        let candidates = [
            candidate("big", 90, 5.0),
            candidate("dw1", 5, 3.0),
            candidate("dw2", 5, 3.0),
            candidate("dw3", 5, 1.0),
        ];
        // Worst first takes big (90 MACs) and then only one dw: noise 10 −
        // 8 = 2. By noise per MAC: dw1, dw2, dw3 (15 MACs), then big does
        // not fit: noise 10 − 7 = 3. Worst first leaves less noise here.
        let choice = choose(&candidates, 1000.0, 10.0, 40.0, 95);
        assert_eq!(choice.tensors, ["big", "dw1"]);
        // With a cap of 20, worst first can take no big: both orders take
        // the three dw tensors, and the tie goes to worst first's order.
        let choice = choose(&candidates, 1000.0, 10.0, 40.0, 20);
        assert_eq!(choice.tensors, ["dw1", "dw2", "dw3"]);
        // A cap of 94: worst first takes big and nothing else fits (noise
        // 5); by noise per MAC the three dw (noise 3) win.
        let choice = choose(&candidates, 1000.0, 10.0, 40.0, 94);
        assert_eq!(choice.tensors, ["dw1", "dw2", "dw3"]);
        assert_eq!(choice.float_macs, 15);
        assert!((choice.estimated_db - db(1000.0, 3.0)).abs() < 1e-12);
    }

    /// The worst tensors still quantized, to 80 % of their noise, less
    /// those whose second scale barely moves; then the lower damage wins.
    #[test]
    fn the_second_threshold_is_tried_on_the_worst_quantized_tensors_and_kept_where_it_does_less_damage()
     {
        let candidates = [
            candidate("a", 10, 50.0),
            candidate("floated", 10, 100.0),
            candidate("b", 10, 20.0),
            candidate("same", 10, 15.0),
            candidate("c", 10, 10.0),
            candidate("d", 10, 5.0),
        ];
        let quantized: HashSet<String> = ["a", "b", "same", "c", "d"]
            .iter()
            .map(|t| format!("conv_{t}"))
            .collect();
        let first = |_: &str| Some(1.0f32);
        let mut asked = Vec::new();
        let mut second = |t: &str| {
            asked.push(t.to_owned());
            match t {
                "same" => Some(1.04f32),
                "d" => None,
                _ => Some(1.2f32),
            }
        };
        // Quantized noise: 100. Worst first: a (50), b (70), same (85 ≥ 80):
        // stop. "same" moves by 4 %, under 5 %; "floated" is float.
        let tried = threshold_trials(&candidates, &quantized, &first, &mut second);
        let names: Vec<&str> = tried.iter().map(|c| c.tensor.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        // The second threshold (mse's search, the costly one) is worked out
        // for those three only.
        assert_eq!(asked, ["a", "b", "same"]);
        let mut measured = tried.clone();
        measured[0].noise = 40.0; // a: better at the second
        measured[1].noise = 20.0; // b: a tie keeps the first
        assert_eq!(better_at_second(&candidates, &measured), ["a"]);
        // Nothing quantized: nothing to try.
        assert!(
            threshold_trials(&candidates, &HashSet::new(), &first, &mut |_| Some(2.0)).is_empty()
        );
    }

    /// Ranked by gain alone; where all of them together hurt, the halved
    /// prefixes are measured and the best that does not hurt is kept.
    #[test]
    fn the_switch_backs_off_by_halves_to_the_best_prefix_that_does_no_harm() {
        let first = [
            candidate("a", 10, 50.0),
            candidate("b", 10, 20.0),
            candidate("c", 10, 10.0),
        ];
        let second = [
            candidate("a", 10, 49.0), // gains 1
            candidate("b", 10, 12.0), // gains 8
            candidate("c", 10, 7.0),  // gains 3
        ];
        assert_eq!(better_at_second(&first, &second), ["b", "c", "a"]);
        assert_eq!(halvings(9), [5, 3, 2, 1]);
        assert_eq!(halvings(8), [4, 2, 1]);
        assert_eq!(halvings(2), [1]);
        assert!(halvings(1).is_empty() && halvings(0).is_empty());
        // None switched: noise 30. The lowest that is no worse wins, the
        // shorter on a tie; where all are worse, none.
        assert_eq!(
            best_prefix(30.0, &[(5, 31.0), (3, 29.0), (2, 28.0), (1, 29.5)]),
            (2, 28.0)
        );
        assert_eq!(best_prefix(30.0, &[(3, 28.0), (2, 28.0)]), (2, 28.0));
        assert_eq!(best_prefix(30.0, &[(2, 30.0)]), (2, 30.0));
        assert_eq!(best_prefix(30.0, &[(5, 31.0), (1, 30.5)]), (0, 30.0));
        assert_eq!(best_prefix(30.0, &[]), (0, 30.0));
    }

    #[test]
    fn snr_without_noise_is_infinite() {
        assert_eq!(db(1.0, 0.0), f64::INFINITY);
        assert!((db(100.0, 1.0) - 20.0).abs() < 1e-12);
    }

    /// Outputs come one at a time, two per image here: each is compared
    /// with the reference and weighted at its own offset, and the offset
    /// starts again with each image.
    #[test]
    fn each_output_is_weighted_at_its_offset_within_its_image() {
        let model = ModelProto::default();
        let trials = Trials {
            model: &model,
            size: (1, 1),
            outputs: Vec::new(),
            inputs: Vec::new(),
            reference: vec![
                vec![1.0, 2.0, 3.0, 4.0, 5.0],
                vec![10.0, 20.0, 30.0, 40.0, 50.0],
            ],
            weights: vec![1.0, 0.0, 2.0, 3.0, 0.5],
            by_part: true,
        };
        let mut error = WeightedError::default();
        error.add(&trials, 0, &[1.0, 7.0]); // 0, and 25 that counts nothing
        error.add(&trials, 0, &[2.0, 4.0, 6.0]); // 2·1 + 0 + 0.5·1
        error.add(&trials, 1, &[11.0, f32::NAN]); // 1, and a NaN that counts nothing
        error.add(&trials, 1, &[30.0, 40.0, 52.0]); // 0 + 0 + 0.5·4
        assert_eq!(error.noise, 5.5);
        // An overflowed value that counts is the largest finite error.
        error.add(&trials, 0, &[f32::INFINITY]);
        assert_eq!(error.noise, f64::MAX);
    }

    /// NanoDet-Plus at 64×64: 85 priors of 3 scores, then 32 DFL logits.
    #[test]
    fn scores_and_boxes_weigh_as_two_halves() {
        let plus = layout(64, &[&[1, 85, 35]]);
        // Two images; scores near 0 as sigmoids mostly are, logits large.
        let reference: Vec<Vec<f32>> = (0..2)
            .map(|image| {
                (0..85 * 35)
                    .map(|i| {
                        let wobble = ((i * 7 + image * 13) % 11) as f32;
                        if i % 35 < 3 {
                            0.01 * wobble
                        } else {
                            wobble - 5.0
                        }
                    })
                    .collect()
            })
            .collect();
        let weights = weights(&plus, &reference, &[85 * 35]).unwrap();
        let power = |part: fn(usize) -> bool| -> f64 {
            reference
                .iter()
                .flat_map(|image| image.iter().zip(&weights).enumerate())
                .filter(|(i, _)| part(i % 35))
                .map(|(_, (&v, &w))| w * f64::from(v) * f64::from(v))
                .sum()
        };
        // Each half's weighted power is 1, so the whole measure's signal is 2.
        assert!((power(|c| c < 3) - 1.0).abs() < 1e-5);
        assert!((power(|c| c >= 3) - 1.0).abs() < 1e-5);
        // One weight per half, the same in every row.
        assert!(
            weights
                .chunks(35)
                .all(|row| row[..3] == weights[..3] && row[3..] == weights[3..35])
        );
        assert!(weights[0] > 1000.0 * weights[3]);
    }

    /// A legacy export with the DFL integral in the graph, its outputs in
    /// no particular order: the parts follow the layout's map, not the order.
    #[test]
    fn per_level_outputs_take_their_parts_from_the_layout() {
        let shapes: [&[usize]; 6] = [
            &[1, 4, 4],
            &[1, 64, 80],
            &[1, 16, 4],
            &[1, 16, 80],
            &[1, 64, 4],
            &[1, 4, 80],
        ];
        let integral = layout(64, &shapes);
        let lengths: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let found = parts(&integral, &lengths).unwrap();
        let mut expected = Vec::new();
        for (i, &n) in lengths.iter().enumerate() {
            let part = if i % 2 == 1 { Part::Score } else { Part::Box };
            expected.extend(std::iter::repeat_n(part, n));
        }
        assert_eq!(found, expected);
        // An output of the wrong size: no parts. One more output than the
        // layout reads: that one is unread.
        let mut short = lengths.clone();
        short[3] -= 80;
        assert_eq!(parts(&integral, &short), None);
        let mut extra = lengths.clone();
        extra.push(10);
        let with_extra = parts(&integral, &extra).unwrap();
        assert!(
            with_extra[expected.len()..]
                .iter()
                .all(|&p| p == Part::Unread)
        );
    }

    /// nanodet-m_320's outputs as the file declares them (their names say
    /// otherwise): three levels of scores, then three of DFL logits.
    #[test]
    fn the_legacy_dfl_export_scores_first() {
        let shapes: [&[usize]; 6] = [
            &[1600, 80],
            &[400, 80],
            &[100, 80],
            &[1600, 32],
            &[400, 32],
            &[100, 32],
        ];
        let raw = layout(320, &shapes);
        let lengths: Vec<usize> = shapes.iter().map(|s| s.iter().product()).collect();
        let found = parts(&raw, &lengths).unwrap();
        let scores = 2100 * 80;
        assert_eq!(found.len(), scores + 2100 * 32);
        assert!(found[..scores].iter().all(|&p| p == Part::Score));
        assert!(found[scores..].iter().all(|&p| p == Part::Box));
    }

    /// The single-output legacy export: distances first, then scores.
    #[test]
    fn the_fused_export_boxes_first() {
        let fused = layout(320, &[&[1, 2100, 84]]);
        let found = parts(&fused, &[2100 * 84]).unwrap();
        for row in found.chunks(84) {
            assert!(row[..4].iter().all(|&p| p == Part::Box));
            assert!(row[4..].iter().all(|&p| p == Part::Score));
        }
    }

    #[test]
    fn outputs_that_do_not_fit_or_hold_nothing_get_no_weights() {
        let plus = layout(64, &[&[1, 85, 35]]);
        assert_eq!(weights(&plus, &[vec![0.5; 84 * 35]], &[84 * 35]), None);
        assert_eq!(weights(&plus, &[vec![0.5; 85 * 35]], &[85 * 34, 85]), None);
        assert_eq!(weights(&plus, &[vec![0.0; 85 * 35]], &[85 * 35]), None);
        // Scores all zero: the boxes alone count.
        let boxes_only: Vec<f32> = (0..85 * 35)
            .map(|i| if i % 35 < 3 { 0.0 } else { 2.0 })
            .collect();
        let w = weights(&plus, &[boxes_only], &[85 * 35]).unwrap();
        assert_eq!(w[0], 0.0);
        assert!((w[3] - 1.0 / (85.0 * 32.0 * 4.0)).abs() < 1e-9);
    }
}
