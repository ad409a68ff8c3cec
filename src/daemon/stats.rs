//! Per-stage latency samples and their percentiles, for the stats topic.

use std::collections::{BTreeMap, VecDeque};

/// Samples kept per stage: a few minutes at camera rates.
const WINDOW: usize = 2048;

/// The pipeline's stages, in frame order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// From capture until the detector took the frame.
    Queue,
    /// Resize and normalise.
    Preprocess,
    /// The backend.
    Inference,
    /// Decode, NMS, back to image coordinates.
    Postprocess,
    /// Tracking and building the messages.
    Track,
    /// From capture to the messages in the outbox, inference included.
    Total,
}

/// p50/p90/p99 of one stage, milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f32,
    /// 90th percentile.
    pub p90: f32,
    /// 99th percentile.
    pub p99: f32,
    /// Samples behind the figures.
    pub samples: usize,
}

/// The recent latencies of each stage.
#[derive(Debug, Default)]
pub struct Latencies {
    samples: BTreeMap<Stage, VecDeque<f32>>,
}

impl Latencies {
    /// Records one duration.
    pub fn record(&mut self, stage: Stage, seconds: f64) {
        let s = self.samples.entry(stage).or_default();
        if s.len() == WINDOW {
            s.pop_front();
        }
        s.push_back((seconds * 1e3) as f32);
    }

    /// Percentiles per stage (nearest rank).
    pub fn percentiles(&self) -> BTreeMap<Stage, Percentiles> {
        self.samples
            .iter()
            .filter(|(_, s)| !s.is_empty())
            .map(|(&stage, s)| {
                let mut sorted: Vec<f32> = s.iter().copied().collect();
                sorted.sort_by(f32::total_cmp);
                let rank = |p: f32| {
                    let i = ((p * sorted.len() as f32).ceil() as usize).clamp(1, sorted.len());
                    sorted[i - 1]
                };
                (
                    stage,
                    Percentiles {
                        p50: rank(0.5),
                        p90: rank(0.9),
                        p99: rank(0.99),
                        samples: sorted.len(),
                    },
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_percentiles_over_a_sliding_window() {
        let mut l = Latencies::default();
        for i in 1..=100 {
            l.record(Stage::Inference, f64::from(i) / 1e3);
        }
        let p = l.percentiles()[&Stage::Inference];
        assert_eq!((p.p50, p.p90, p.p99, p.samples), (50.0, 90.0, 99.0, 100));
        for _ in 0..WINDOW {
            l.record(Stage::Inference, 0.001);
        }
        assert_eq!(l.percentiles()[&Stage::Inference].p99, 1.0);
    }
}
