//! Raw outputs → scored boxes in network-input pixels, for every layout.
//!
//! The candidates are (prior, class) pairs above the score threshold, as in
//! NanoDet's own `multiclass_nms`: a prior that scores 0.6 for "dog" and 0.5
//! for "cat" yields two candidates, and class-aware NMS sorts them out.

use super::layout::{BoxEncoding, Layout, Level, OutputMap};

/// One class's score for one prior, with its box in network pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// `[x1, y1, x2, y2]`, clipped to the network input.
    pub bbox: [f32; 4],
    /// Class score (already sigmoided by the graph).
    pub score: f32,
    /// Model class index.
    pub class_id: u32,
}

/// Decoding settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecodeParams {
    /// Candidates must score strictly above this.
    pub score_threshold: f32,
    /// For legacy layouts: keep only this many priors per level, ranked by
    /// their best class score, as the reference implementation does.
    pub top_k_per_level: Option<usize>,
}

/// Why outputs could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The backend returned fewer outputs than the layout reads.
    #[error("the layout reads output {index} but the backend returned {count} outputs")]
    MissingOutput {
        /// Output index wanted.
        index: usize,
        /// Outputs present.
        count: usize,
    },
    /// An output holds the wrong number of values.
    #[error("output {index} holds {got} values, the layout expects {expected}")]
    OutputSize {
        /// Output index.
        index: usize,
        /// Values present.
        got: usize,
        /// Values expected.
        expected: usize,
    },
    /// Rows were handed over for a layout that is not one output of rows
    /// without a per-level top-k.
    #[error("only a single-output layout without a per-level top-k decodes from kept rows")]
    NotRows,
    /// A kept row names a prior the layout does not have.
    #[error("a kept row is of prior {prior}, the layout has {priors}")]
    PriorOutOfRange {
        /// The row's prior.
        prior: usize,
        /// Priors in the layout.
        priors: usize,
    },
}

/// Where one level's score rows and box rows live.
struct LevelView<'a> {
    scores: &'a [f32],
    score_stride: usize,
    boxes: &'a [f32],
    box_stride: usize,
}

impl LevelView<'_> {
    fn scores_of(&self, prior: usize, classes: usize) -> &[f32] {
        &self.scores[prior * self.score_stride..][..classes]
    }
    fn box_of(&self, prior: usize, width: usize) -> &[f32] {
        &self.boxes[prior * self.box_stride..][..width]
    }
}

fn output<'a>(
    outputs: &[&'a [f32]],
    index: usize,
    expected: usize,
) -> Result<&'a [f32], DecodeError> {
    let data = outputs.get(index).ok_or(DecodeError::MissingOutput {
        index,
        count: outputs.len(),
    })?;
    if data.len() != expected {
        return Err(DecodeError::OutputSize {
            index,
            got: data.len(),
            expected,
        });
    }
    Ok(data)
}

/// Expectation over softmax(bins): the distance in stride units.
fn dfl_distance(logits: &[f32]) -> f32 {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut total = 0.0;
    let mut weighted = 0.0;
    for (i, &l) in logits.iter().enumerate() {
        let e = (l - max).exp();
        total += e;
        weighted += e * i as f32;
    }
    weighted / total
}

impl Layout {
    /// Appends the candidates in `outputs` (one slice per model output, in
    /// declared order) to `candidates`.
    pub fn decode(
        &self,
        outputs: &[&[f32]],
        params: &DecodeParams,
        candidates: &mut Vec<Candidate>,
    ) -> Result<(), DecodeError> {
        let classes = self.num_classes;
        let box_width = self.boxes.width();
        let views: Vec<LevelView<'_>> = match &self.outputs {
            OutputMap::Single {
                output: index,
                score_column,
                box_column,
            } => {
                let columns = classes + box_width;
                let data = output(outputs, *index, self.priors() * columns)?;
                let mut first = 0;
                self.levels
                    .iter()
                    .map(|level| {
                        let rows = &data[first * columns..(first + level.priors()) * columns];
                        first += level.priors();
                        LevelView {
                            scores: &rows[*score_column..],
                            score_stride: columns,
                            boxes: &rows[*box_column..],
                            box_stride: columns,
                        }
                    })
                    .collect()
            }
            OutputMap::PerLevel { scores, boxes } => {
                let mut views = Vec::with_capacity(self.levels.len());
                for ((level, &s), &b) in self.levels.iter().zip(scores).zip(boxes) {
                    views.push(LevelView {
                        scores: output(outputs, s, level.priors() * classes)?,
                        score_stride: classes,
                        boxes: output(outputs, b, level.priors() * box_width)?,
                        box_stride: box_width,
                    });
                }
                views
            }
        };

        let top_k = if self.kind.is_legacy() {
            params.top_k_per_level
        } else {
            None
        };
        let mut kept: Vec<(usize, f32)> = Vec::new();
        for (level, view) in self.levels.iter().zip(&views) {
            // Priors whose best class clears the threshold; only those can
            // yield candidates, so the top-k is taken among them, which
            // selects the same pairs as top-k first, threshold second.
            kept.clear();
            for prior in 0..level.priors() {
                let best = best_score(view.scores_of(prior, classes));
                if best > params.score_threshold {
                    kept.push((prior, best));
                }
            }
            if let Some(k) = top_k
                && kept.len() > k
            {
                kept.select_nth_unstable_by(k, |a, b| b.1.total_cmp(&a.1));
                kept.truncate(k);
            }
            for &(prior, _) in &kept {
                self.push_candidates(
                    level,
                    prior,
                    view.scores_of(prior, classes),
                    view.box_of(prior, box_width),
                    params,
                    candidates,
                );
            }
        }
        Ok(())
    }

    /// [`decode`](Self::decode) from only some rows of a single-output
    /// layout: `priors[i]`'s row is `rows[i * width..][..width]`, a row
    /// being the output's classes and box. Given every prior whose best
    /// class is above the threshold, by ascending prior, it appends exactly
    /// what `decode` appends from the whole output; a prior whose best is
    /// not above it adds nothing. Legacy layouts, which keep a top-k per
    /// level, and per-level outputs are refused.
    pub fn decode_rows(
        &self,
        priors: &[u32],
        rows: &[f32],
        params: &DecodeParams,
        candidates: &mut Vec<Candidate>,
    ) -> Result<(), DecodeError> {
        let OutputMap::Single {
            output,
            score_column,
            box_column,
        } = self.outputs
        else {
            return Err(DecodeError::NotRows);
        };
        if self.kind.is_legacy() {
            return Err(DecodeError::NotRows);
        }
        let classes = self.num_classes;
        let box_width = self.boxes.width();
        let width = classes + box_width;
        if Some(rows.len()) != priors.len().checked_mul(width) {
            return Err(DecodeError::OutputSize {
                index: output,
                got: rows.len(),
                expected: priors.len().saturating_mul(width),
            });
        }
        // Where each level's priors start in the output.
        let mut firsts = Vec::with_capacity(self.levels.len());
        let mut first = 0;
        for level in &self.levels {
            firsts.push(first);
            first += level.priors();
        }
        for (&prior, row) in priors.iter().zip(rows.chunks_exact(width)) {
            let prior = prior as usize;
            let level = firsts.partition_point(|&f| f <= prior).saturating_sub(1);
            let (Some(found), Some(&first)) = (self.levels.get(level), firsts.get(level)) else {
                return Err(DecodeError::NotRows);
            };
            if prior >= first + found.priors() {
                return Err(DecodeError::PriorOutOfRange {
                    prior,
                    priors: self.priors(),
                });
            }
            let scores = &row[score_column..][..classes];
            if best_score(scores) > params.score_threshold {
                let raw = &row[box_column..][..box_width];
                self.push_candidates(found, prior - first, scores, raw, params, candidates);
            }
        }
        Ok(())
    }

    /// The candidates of one prior whose best class is above the
    /// threshold: one per class above it, all with the prior's box.
    fn push_candidates(
        &self,
        level: &Level,
        prior: usize,
        scores: &[f32],
        raw: &[f32],
        params: &DecodeParams,
        candidates: &mut Vec<Candidate>,
    ) {
        let (max_x, max_y) = (self.input_width as f32, self.input_height as f32);
        let stride = level.stride as f32;
        let cx = ((prior % level.width) as f32 + self.center_offset) * stride;
        let cy = ((prior / level.width) as f32 + self.center_offset) * stride;
        let distance = |side: usize| match self.boxes {
            BoxEncoding::Dfl { bins } => dfl_distance(&raw[side * bins..][..bins]),
            BoxEncoding::Distances => raw[side],
        } * stride;
        let bbox = [
            (cx - distance(0)).clamp(0.0, max_x),
            (cy - distance(1)).clamp(0.0, max_y),
            (cx + distance(2)).clamp(0.0, max_x),
            (cy + distance(3)).clamp(0.0, max_y),
        ];
        for (class_id, &score) in scores.iter().enumerate() {
            if score > params.score_threshold {
                candidates.push(Candidate {
                    bbox,
                    score,
                    class_id: class_id as u32,
                });
            }
        }
    }
}

/// The best of a prior's class scores (NaN ignored, as `f32::max` does).
fn best_score(scores: &[f32]) -> f32 {
    scores.iter().copied().fold(f32::NEG_INFINITY, f32::max)
}

#[cfg(test)]
mod tests {
    use super::super::layout::square_layout as layout;
    use super::*;

    const PARAMS: DecodeParams = DecodeParams {
        score_threshold: 0.3,
        top_k_per_level: Some(1000),
    };

    /// DFL logits that put all mass on one bin per side.
    fn one_hot_dfl(bins_per_side: [usize; 4]) -> Vec<f32> {
        let mut v = vec![-30.0; 32];
        for (side, bin) in bins_per_side.iter().enumerate() {
            v[side * 8 + bin] = 30.0;
        }
        v
    }

    #[test]
    fn dfl_expectation() {
        assert!((dfl_distance(&[0.0; 8]) - 3.5).abs() < 1e-6);
        let mut peaked = [-50.0; 8];
        peaked[5] = 50.0;
        assert!((dfl_distance(&peaked) - 5.0).abs() < 1e-5);
    }

    #[test]
    fn plus_decodes_known_box_at_cell_corner_centre() {
        // 64x64 input: levels 8x8, 4x4, 2x2, 1x1 = 85 priors, 3 classes.
        let l = layout(64, &[&[1, 85, 3 + 32]]);
        let mut out = vec![0.0; 85 * 35];
        // Level 1 (stride 16), cell (x=2, y=1): prior 64 + 1*4 + 2.
        let prior = 64 + 4 + 2;
        out[prior * 35 + 1] = 0.9;
        out[prior * 35 + 3..prior * 35 + 35].copy_from_slice(&one_hot_dfl([1, 2, 3, 0]));
        let mut c = Vec::new();
        l.decode(&[&out], &PARAMS, &mut c).unwrap();
        assert_eq!(c.len(), 1);
        // Centre (32, 16); distances 16, 32, 48, 0.
        let b = c[0].bbox;
        let want = [16.0, 0.0, 64.0, 16.0]; // y1 clipped at 0, x2 clipped at 64
        for (a, w) in b.iter().zip(want) {
            assert!((a - w).abs() < 1e-3, "{b:?}");
        }
        assert_eq!((c[0].class_id, c[0].score), (1, 0.9));
    }

    #[test]
    fn raw_uses_half_cell_centres_and_separate_outputs() {
        let l = layout(
            32,
            &[&[16, 2], &[4, 2], &[1, 2], &[16, 32], &[4, 32], &[1, 32]],
        );
        let mut scores0 = vec![0.0; 16 * 2];
        let mut boxes0 = vec![0.0; 16 * 32];
        // Stride 8, cell (1, 2): centre (12, 20).
        let prior = 2 * 4 + 1;
        scores0[prior * 2] = 0.8;
        boxes0[prior * 32..prior * 32 + 32].copy_from_slice(&one_hot_dfl([1, 1, 0, 1]));
        let (s1, b1, s2, b2) = (vec![0.0; 8], vec![0.0; 128], vec![0.0; 2], vec![0.0; 32]);
        let mut c = Vec::new();
        l.decode(&[&scores0, &s1, &s2, &boxes0, &b1, &b2], &PARAMS, &mut c)
            .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].bbox, [4.0, 12.0, 12.0, 28.0]);
    }

    #[test]
    fn integral_and_fused_use_stride_unit_distances() {
        let l = layout(
            32,
            &[
                &[1, 16, 2],
                &[1, 4, 2],
                &[1, 1, 2],
                &[1, 16, 4],
                &[1, 4, 4],
                &[1, 1, 4],
            ],
        );
        // Stride 32, the single cell: centre (16, 16).
        let (s0, b0, s1, b1) = (vec![0.0; 32], vec![0.0; 64], vec![0.0; 8], vec![0.0; 16]);
        let s2 = vec![0.1, 0.7];
        let b2 = vec![0.25, 0.25, 0.5, 0.125];
        let mut c = Vec::new();
        l.decode(&[&s0, &s1, &s2, &b0, &b1, &b2], &PARAMS, &mut c)
            .unwrap();
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].bbox, [8.0, 8.0, 32.0, 20.0]);
        assert_eq!(c[0].class_id, 1);

        // The same prediction through a fused [1, 21, 4 + 2] output.
        let f = layout(32, &[&[1, 21, 6]]);
        assert_eq!(f.kind, super::super::LayoutKind::Fused);
        let mut fused = vec![0.0; 21 * 6];
        fused[20 * 6..].copy_from_slice(&[0.25, 0.25, 0.5, 0.125, 0.1, 0.7]);
        let mut c2 = Vec::new();
        f.decode(&[&fused], &PARAMS, &mut c2).unwrap();
        assert_eq!(c, c2);
    }

    #[test]
    fn every_class_above_threshold_is_a_candidate() {
        let l = layout(64, &[&[1, 85, 3 + 32]]);
        let mut out = vec![0.0; 85 * 35];
        out[0..3].copy_from_slice(&[0.5, 0.31, 0.3]);
        let mut c = Vec::new();
        l.decode(&[&out], &PARAMS, &mut c).unwrap();
        let classes: Vec<u32> = c.iter().map(|c| c.class_id).collect();
        assert_eq!(classes, [0, 1], "0.3 is not strictly above the threshold");
    }

    #[test]
    fn legacy_top_k_keeps_best_priors_per_level() {
        let l = layout(
            32,
            &[
                &[1, 16, 1],
                &[1, 4, 1],
                &[1, 1, 1],
                &[1, 16, 4],
                &[1, 4, 4],
                &[1, 1, 4],
            ],
        );
        let s0: Vec<f32> = (0..16).map(|i| 0.4 + i as f32 * 0.01).collect();
        let (b0, s1, b1, s2, b2) = (
            vec![0.0; 64],
            vec![0.9; 4],
            vec![0.0; 16],
            vec![0.0],
            vec![0.0; 4],
        );
        let params = DecodeParams {
            score_threshold: 0.3,
            top_k_per_level: Some(3),
        };
        let mut c = Vec::new();
        l.decode(&[&s0, &s1, &s2, &b0, &b1, &b2], &params, &mut c)
            .unwrap();
        let mut level0: Vec<f32> = c
            .iter()
            .filter(|c| c.score < 0.85)
            .map(|c| c.score)
            .collect();
        level0.sort_by(f32::total_cmp);
        assert_eq!(level0, [0.53, 0.54, 0.55]);
        assert_eq!(c.len(), 3 + 3, "level 1 is also cut to its top 3");
    }

    /// The rows a GPU would keep: each prior whose best class is above
    /// the threshold, with its whole row.
    fn kept_rows(output: &[f32], width: usize, threshold: f32) -> (Vec<u32>, Vec<f32>) {
        let mut priors = Vec::new();
        let mut rows = Vec::new();
        for (prior, row) in output.chunks_exact(width).enumerate() {
            if best_score(&row[..3]) > threshold {
                priors.push(prior as u32);
                rows.extend_from_slice(row);
            }
        }
        (priors, rows)
    }

    #[test]
    fn kept_rows_decode_exactly_as_the_whole_output() {
        let l = layout(64, &[&[1, 85, 3 + 32]]);
        // Deterministic pseudo-random scores and logits: about a third of
        // the priors clear the threshold, some for two classes.
        let mut state = 0x2545_f491_u32;
        let out: Vec<f32> = (0..85 * 35)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 17;
                state ^= state << 5;
                (state % 1000) as f32 / 1000.0 * if state.is_multiple_of(7) { -4.0 } else { 0.45 }
            })
            .collect();
        let mut whole = Vec::new();
        l.decode(&[&out], &PARAMS, &mut whole).unwrap();
        let (priors, rows) = kept_rows(&out, 35, PARAMS.score_threshold);
        assert!(
            !whole.is_empty() && priors.len() < 85,
            "{} kept",
            priors.len()
        );
        let mut from_rows = Vec::new();
        l.decode_rows(&priors, &rows, &PARAMS, &mut from_rows)
            .unwrap();
        assert_eq!(from_rows, whole);

        // A row whose best is not above the threshold adds nothing.
        let mut with_extra = (priors.clone(), rows.clone());
        let below = (0..85u32).find(|p| !priors.contains(p)).unwrap();
        with_extra.0.insert(0, below);
        let row = &out[below as usize * 35..][..35];
        with_extra.1.splice(0..0, row.iter().copied());
        let mut again = Vec::new();
        l.decode_rows(&with_extra.0, &with_extra.1, &PARAMS, &mut again)
            .unwrap();
        assert_eq!(again, whole);
    }

    #[test]
    fn kept_rows_are_checked() {
        let l = layout(64, &[&[1, 85, 35]]);
        let row = [0.9f32; 35];
        let short = l.decode_rows(&[0, 1], &row, &PARAMS, &mut Vec::new());
        assert!(
            matches!(short, Err(DecodeError::OutputSize { .. })),
            "{short:?}"
        );
        let past = l.decode_rows(&[85], &row, &PARAMS, &mut Vec::new());
        assert!(
            matches!(
                past,
                Err(DecodeError::PriorOutOfRange {
                    prior: 85,
                    priors: 85
                })
            ),
            "{past:?}"
        );
        let per_level = layout(
            32,
            &[&[16, 2], &[4, 2], &[1, 2], &[16, 32], &[4, 32], &[1, 32]],
        );
        let refused = per_level.decode_rows(&[], &[], &PARAMS, &mut Vec::new());
        assert!(matches!(refused, Err(DecodeError::NotRows)), "{refused:?}");
    }

    #[test]
    fn wrong_output_sizes_are_errors() {
        let l = layout(64, &[&[1, 85, 35]]);
        let err = l
            .decode(&[&[0.0; 10]], &PARAMS, &mut Vec::new())
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "output 0 holds 10 values, the layout expects 2975"
        );
        let err = l.decode(&[], &PARAMS, &mut Vec::new()).unwrap_err();
        assert!(matches!(err, DecodeError::MissingOutput { .. }));
    }
}
