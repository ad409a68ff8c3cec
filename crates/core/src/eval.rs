//! COCO bounding-box evaluation with pycocotools' semantics, so numbers
//! from `nanodetd eval` can be set beside any published COCO figure.
//!
//! Mirrors `COCOeval` (iouType "bbox") step by step: per image and
//! category, detections sorted by score (stable) and cut to 100; greedy
//! matching that prefers non-ignored ground truth; crowd boxes matched by
//! intersection over the detection's area; 101-point interpolated
//! precision; area ranges all/small/medium/large; maxDets 1/10/100.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Model class index → COCO category id for the standard 80 classes.
pub const COCO80_TO_91: [u32; 80] = [
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28,
    31, 32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55,
    56, 57, 58, 59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84,
    85, 86, 87, 88, 89, 90,
];

/// The COCO category id `detect --json` reports for a model class: the
/// standard 80→91 mapping for 80-class models, otherwise the 1-based class
/// index.
pub fn default_category_id(class_id: u32, num_classes: usize) -> u64 {
    if num_classes == COCO80_TO_91.len() {
        COCO80_TO_91
            .get(class_id as usize)
            .map_or(u64::from(class_id) + 1, |&id| u64::from(id))
    } else {
        u64::from(class_id) + 1
    }
}

/// `[x1, y1, x2, y2]` → COCO's `[x, y, w, h]`.
pub fn to_coco_bbox(b: [f32; 4]) -> [f64; 4] {
    let [x1, y1, x2, y2] = b.map(f64::from);
    [x1, y1, x2 - x1, y2 - y1]
}

/// A COCO-format annotation file (only the fields evaluation reads).
#[derive(Debug, Clone, Deserialize)]
pub struct CocoDataset {
    /// Images.
    pub images: Vec<CocoImage>,
    /// Ground-truth boxes.
    pub annotations: Vec<CocoAnnotation>,
    /// Categories.
    pub categories: Vec<CocoCategory>,
}

/// One image entry.
#[derive(Debug, Clone, Deserialize)]
pub struct CocoImage {
    /// Image id.
    pub id: u64,
    /// File name relative to the image folder.
    pub file_name: String,
}

/// One ground-truth annotation.
#[derive(Debug, Clone, Deserialize)]
pub struct CocoAnnotation {
    /// Annotation id (positive; pycocotools treats 0 as "unmatched").
    pub id: u64,
    /// Image id.
    pub image_id: u64,
    /// Category id.
    pub category_id: u64,
    /// `[x, y, w, h]`.
    pub bbox: [f64; 4],
    /// Segment area, which decides the area range.
    pub area: f64,
    /// Crowd regions may match many detections and never count as misses.
    #[serde(default)]
    pub iscrowd: u8,
}

/// One category.
#[derive(Debug, Clone, Deserialize)]
pub struct CocoCategory {
    /// Category id.
    pub id: u64,
    /// Name.
    pub name: String,
}

/// One detection in COCO results format.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CocoDetection {
    /// Image id.
    pub image_id: u64,
    /// Category id.
    pub category_id: u64,
    /// `[x, y, w, h]`.
    pub bbox: [f64; 4],
    /// Score.
    pub score: f64,
}

/// Why an annotation file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    /// Unreadable file.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// OS error.
        source: std::io::Error,
    },
    /// Not COCO JSON.
    #[error("{path}: not a COCO annotation file: {source}")]
    Parse {
        /// File.
        path: PathBuf,
        /// Parser error, with line and column.
        source: serde_json::Error,
    },
}

impl CocoDataset {
    /// Reads an `instances_*.json` file.
    pub fn from_file(path: &Path) -> Result<CocoDataset, EvalError> {
        let text = std::fs::read(path).map_err(|source| EvalError::Read {
            path: path.to_owned(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| EvalError::Parse {
            path: path.to_owned(),
            source,
        })
    }

    /// Category ids in ascending order: model class `i` is the `i`-th.
    pub fn sorted_category_ids(&self) -> Vec<u64> {
        let mut ids: Vec<u64> = self.categories.iter().map(|c| c.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }
}

/// The 12 standard COCO numbers, in pycocotools' `stats` order.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct CocoStats(pub [f64; 12]);

impl CocoStats {
    /// Labels as pycocotools prints them.
    pub const LABELS: [&'static str; 12] = [
        "Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
        "Average Precision  (AP) @[ IoU=0.50      | area=   all | maxDets=100 ]",
        "Average Precision  (AP) @[ IoU=0.75      | area=   all | maxDets=100 ]",
        "Average Precision  (AP) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
        "Average Precision  (AP) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
        "Average Precision  (AP) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
        "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=  1 ]",
        "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets= 10 ]",
        "Average Recall     (AR) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ]",
        "Average Recall     (AR) @[ IoU=0.50:0.95 | area= small | maxDets=100 ]",
        "Average Recall     (AR) @[ IoU=0.50:0.95 | area=medium | maxDets=100 ]",
        "Average Recall     (AR) @[ IoU=0.50:0.95 | area= large | maxDets=100 ]",
    ];

    /// mAP@[.5:.95].
    pub fn map(&self) -> f64 {
        self.0[0]
    }
}

const IOU_STEPS: usize = 10;
const RECALL_STEPS: usize = 101;
const MAX_DETS: [usize; 3] = [1, 10, 100];
const AREA_RANGES: [[f64; 2]; 4] = [[0.0, 1e10], [0.0, 1024.0], [1024.0, 9216.0], [9216.0, 1e10]];

/// `numpy.linspace(start, stop, num)`, value for value: the thresholds
/// must be the same doubles or matches at exactly 0.75 IoU can flip.
fn linspace<const N: usize>(start: f64, stop: f64) -> [f64; N] {
    let step = (stop - start) / (N - 1) as f64;
    let mut v: [f64; N] = std::array::from_fn(|i| i as f64 * step + start);
    v[N - 1] = stop;
    v
}

/// pycocotools' `bbIou` for `[x, y, w, h]` boxes.
fn coco_iou(d: &[f64; 4], g: &[f64; 4], crowd: bool) -> f64 {
    let w = (d[0] + d[2]).min(g[0] + g[2]) - d[0].max(g[0]);
    if w <= 0.0 {
        return 0.0;
    }
    let h = (d[1] + d[3]).min(g[1] + g[3]) - d[1].max(g[1]);
    if h <= 0.0 {
        return 0.0;
    }
    let inter = w * h;
    let da = d[2] * d[3];
    let union = if crowd { da } else { da + g[2] * g[3] - inter };
    inter / union
}

/// `evaluateImg`'s result for one image, category and area range.
struct ImageEval {
    /// Detections, best first, at most 100: (score, matched per IoU step,
    /// ignored per IoU step).
    detections: Vec<(f64, [bool; IOU_STEPS], [bool; IOU_STEPS])>,
    /// Ground truths that count (not crowd, inside the area range).
    counted_truths: usize,
}

fn evaluate_image(
    truths: &[&CocoAnnotation],
    dets: &[&CocoDetection],
    area: [f64; 2],
    iou_thresholds: &[f64; IOU_STEPS],
) -> Option<ImageEval> {
    if truths.is_empty() && dets.is_empty() {
        return None;
    }
    let outside = |a: f64| a < area[0] || a > area[1];
    // Stable sort: counted ground truths first.
    let mut truths: Vec<(&CocoAnnotation, bool)> = truths
        .iter()
        .map(|g| (*g, g.iscrowd != 0 || outside(g.area)))
        .collect();
    truths.sort_by_key(|(_, ignored)| *ignored);
    let mut dets: Vec<&CocoDetection> = dets.to_vec();
    dets.sort_by(|a, b| b.score.total_cmp(&a.score));
    dets.truncate(MAX_DETS[2]);

    let ious: Vec<Vec<f64>> = dets
        .iter()
        .map(|d| {
            truths
                .iter()
                .map(|(g, _)| coco_iou(&d.bbox, &g.bbox, g.iscrowd != 0))
                .collect()
        })
        .collect();
    let mut det_matched = vec![[false; IOU_STEPS]; dets.len()];
    let mut det_ignored = vec![[false; IOU_STEPS]; dets.len()];
    for (t, &threshold) in iou_thresholds.iter().enumerate() {
        let mut truth_taken = vec![false; truths.len()];
        for (di, row) in ious.iter().enumerate() {
            let mut best_iou = threshold.min(1.0 - 1e-10);
            let mut best: Option<usize> = None;
            for (gi, (g, g_ignored)) in truths.iter().enumerate() {
                if truth_taken[gi] && g.iscrowd == 0 {
                    continue;
                }
                // Once matched to a counted truth, ignored ones come after
                // it in the order and are never preferred.
                if let Some(m) = best
                    && !truths[m].1
                    && *g_ignored
                {
                    break;
                }
                if row[gi] < best_iou {
                    continue;
                }
                best_iou = row[gi];
                best = Some(gi);
            }
            if let Some(m) = best {
                det_ignored[di][t] = truths[m].1;
                det_matched[di][t] = true;
                truth_taken[m] = true;
            }
        }
    }
    let detections = dets
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let det_area = d.bbox[2] * d.bbox[3];
            let mut ignored = det_ignored[i];
            for t in 0..IOU_STEPS {
                ignored[t] |= !det_matched[i][t] && outside(det_area);
            }
            (d.score, det_matched[i], ignored)
        })
        .collect();
    Some(ImageEval {
        detections,
        counted_truths: truths.iter().filter(|(_, ig)| !ig).count(),
    })
}

/// Scores `detections` against `truth` and returns the 12 COCO numbers.
/// Detections for images or categories not in `truth` are ignored, as in
/// pycocotools.
pub fn evaluate(truth: &CocoDataset, detections: &[CocoDetection]) -> CocoStats {
    let iou_thresholds: [f64; IOU_STEPS] = linspace(0.5, 0.95);
    let recall_thresholds: [f64; RECALL_STEPS] = linspace(0.0, 1.0);
    let mut image_ids: Vec<u64> = truth.images.iter().map(|i| i.id).collect();
    image_ids.sort_unstable();
    image_ids.dedup();
    let category_ids = truth.sorted_category_ids();

    let mut truths_by: HashMap<(u64, u64), Vec<&CocoAnnotation>> = HashMap::new();
    for a in &truth.annotations {
        truths_by
            .entry((a.image_id, a.category_id))
            .or_default()
            .push(a);
    }
    let mut dets_by: HashMap<(u64, u64), Vec<&CocoDetection>> = HashMap::new();
    for d in detections {
        dets_by
            .entry((d.image_id, d.category_id))
            .or_default()
            .push(d);
    }

    // precision[t][r][k][a][m] and recall[t][k][a][m], -1 where undefined.
    let (k_n, a_n, m_n) = (category_ids.len(), AREA_RANGES.len(), MAX_DETS.len());
    let p_index = |t: usize, r: usize, k: usize, a: usize, m: usize| {
        ((((t * RECALL_STEPS + r) * k_n + k) * a_n + a) * m_n) + m
    };
    let r_index = |t: usize, k: usize, a: usize, m: usize| (((t * k_n + k) * a_n + a) * m_n) + m;
    let mut precision = vec![-1.0f64; IOU_STEPS * RECALL_STEPS * k_n * a_n * m_n];
    let mut recall = vec![-1.0f64; IOU_STEPS * k_n * a_n * m_n];

    let empty_truths: Vec<&CocoAnnotation> = Vec::new();
    let empty_dets: Vec<&CocoDetection> = Vec::new();
    for (k, &cat) in category_ids.iter().enumerate() {
        for (a, &area) in AREA_RANGES.iter().enumerate() {
            let evals: Vec<ImageEval> = image_ids
                .iter()
                .filter_map(|&img| {
                    evaluate_image(
                        truths_by.get(&(img, cat)).unwrap_or(&empty_truths),
                        dets_by.get(&(img, cat)).unwrap_or(&empty_dets),
                        area,
                        &iou_thresholds,
                    )
                })
                .collect();
            let counted: usize = evals.iter().map(|e| e.counted_truths).sum();
            if counted == 0 {
                continue;
            }
            for (m, &max_dets) in MAX_DETS.iter().enumerate() {
                let mut pooled: Vec<&(f64, [bool; IOU_STEPS], [bool; IOU_STEPS])> = evals
                    .iter()
                    .flat_map(|e| e.detections.iter().take(max_dets))
                    .collect();
                // numpy's mergesort on -score is stable, like sort_by.
                pooled.sort_by(|x, y| y.0.total_cmp(&x.0));
                for t in 0..IOU_STEPS {
                    let (mut tp, mut fp) = (0.0f64, 0.0f64);
                    let mut rc = Vec::with_capacity(pooled.len());
                    let mut pr = Vec::with_capacity(pooled.len());
                    for (_, matched, ignored) in &pooled {
                        if !ignored[t] {
                            if matched[t] {
                                tp += 1.0;
                            } else {
                                fp += 1.0;
                            }
                        }
                        rc.push(tp / counted as f64);
                        pr.push(tp / (fp + tp + f64::EPSILON));
                    }
                    recall[r_index(t, k, a, m)] = rc.last().copied().unwrap_or(0.0);
                    for i in (1..pr.len()).rev() {
                        if pr[i] > pr[i - 1] {
                            pr[i - 1] = pr[i];
                        }
                    }
                    for (r, &threshold) in recall_thresholds.iter().enumerate() {
                        // searchsorted(side="left"): first rc >= threshold.
                        let i = rc.partition_point(|&x| x < threshold);
                        precision[p_index(t, r, k, a, m)] = pr.get(i).copied().unwrap_or(0.0);
                    }
                }
            }
        }
    }

    let mean_defined = |values: &mut dyn Iterator<Item = f64>| {
        let (sum, n) = values
            .filter(|v| *v > -1.0)
            .fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
        if n == 0 { -1.0 } else { sum / n as f64 }
    };
    let ap = |t: Option<usize>, a: usize| {
        let ts: Vec<usize> = t.map_or_else(|| (0..IOU_STEPS).collect(), |t| vec![t]);
        mean_defined(
            &mut ts
                .iter()
                .flat_map(|&t| {
                    (0..RECALL_STEPS).flat_map(move |r| (0..k_n).map(move |k| (t, r, k)))
                })
                .map(|(t, r, k)| precision[p_index(t, r, k, a, 2)]),
        )
    };
    let ar = |a: usize, m: usize| {
        mean_defined(
            &mut (0..IOU_STEPS)
                .flat_map(|t| (0..k_n).map(move |k| (t, k)))
                .map(|(t, k)| recall[r_index(t, k, a, m)]),
        )
    };
    CocoStats([
        ap(None, 0),
        ap(Some(0), 0),
        ap(Some(5), 0),
        ap(None, 1),
        ap(None, 2),
        ap(None, 3),
        ar(0, 0),
        ar(0, 1),
        ar(0, 2),
        ar(1, 2),
        ar(2, 2),
        ar(3, 2),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dataset(anns: Vec<CocoAnnotation>) -> CocoDataset {
        CocoDataset {
            images: vec![
                CocoImage {
                    id: 1,
                    file_name: "a.jpg".into(),
                },
                CocoImage {
                    id: 2,
                    file_name: "b.jpg".into(),
                },
            ],
            annotations: anns,
            categories: vec![CocoCategory {
                id: 7,
                name: "thing".into(),
            }],
        }
    }

    fn ann(id: u64, image_id: u64, bbox: [f64; 4], iscrowd: u8) -> CocoAnnotation {
        CocoAnnotation {
            id,
            image_id,
            category_id: 7,
            bbox,
            area: bbox[2] * bbox[3],
            iscrowd,
        }
    }

    fn det(image_id: u64, bbox: [f64; 4], score: f64) -> CocoDetection {
        CocoDetection {
            image_id,
            category_id: 7,
            bbox,
            score,
        }
    }

    #[test]
    fn linspace_matches_numpy_doubles() {
        let t: [f64; 10] = linspace(0.5, 0.95);
        assert_eq!(t[0], 0.5);
        assert_eq!(t[5], 0.75);
        assert_eq!(t[9], 0.95);
        // numpy: np.linspace(.5, .95, 10)[1] == 0.55
        assert_eq!(t[1], 0.55);
        let r: [f64; 101] = linspace(0.0, 1.0);
        assert_eq!(r[1], 0.01);
        assert_eq!(r[100], 1.0);
    }

    #[test]
    fn perfect_detections_score_one() {
        let gt = dataset(vec![
            ann(1, 1, [10.0, 10.0, 100.0, 100.0], 0),
            ann(2, 2, [0.0, 0.0, 50.0, 40.0], 0),
        ]);
        let dets = vec![
            det(1, [10.0, 10.0, 100.0, 100.0], 0.9),
            det(2, [0.0, 0.0, 50.0, 40.0], 0.8),
        ];
        let s = evaluate(&gt, &dets);
        // Precision is tp / (tp + fp + eps), as in pycocotools.
        assert!((s.0[0] - 1.0).abs() < 1e-12);
        assert_eq!(s.0[8], 1.0);
        // No small objects at all: -1, as pycocotools prints.
        assert_eq!(s.0[3], -1.0);
    }

    #[test]
    fn missed_object_halves_recall_and_false_positive_costs_precision() {
        let gt = dataset(vec![
            ann(1, 1, [10.0, 10.0, 100.0, 100.0], 0),
            ann(2, 2, [0.0, 0.0, 200.0, 200.0], 0),
        ]);
        let s = evaluate(&gt, &[det(1, [10.0, 10.0, 100.0, 100.0], 0.9)]);
        assert_eq!(s.0[8], 0.5);
        // Precision 1 up to recall 0.5, 0 beyond: 51 of 101 points.
        assert!((s.0[1] - 51.0 / 101.0).abs() < 1e-12);
    }

    #[test]
    fn crowd_truth_absorbs_detections_without_counting() {
        let gt = dataset(vec![
            ann(1, 1, [0.0, 0.0, 100.0, 100.0], 1),
            ann(2, 1, [200.0, 200.0, 50.0, 50.0], 0),
        ]);
        let dets = vec![
            det(1, [200.0, 200.0, 50.0, 50.0], 0.5),
            // Inside the crowd region: intersection / detection area = 1.
            det(1, [10.0, 10.0, 20.0, 20.0], 0.9),
            det(1, [50.0, 50.0, 20.0, 20.0], 0.8),
        ];
        let s = evaluate(&gt, &dets);
        assert!(
            (s.0[0] - 1.0).abs() < 1e-12,
            "crowd matches are ignored, not false positives"
        );
    }

    #[test]
    fn max_dets_one_keeps_only_the_best_per_image() {
        let gt = dataset(vec![
            ann(1, 1, [0.0, 0.0, 100.0, 100.0], 0),
            ann(2, 1, [300.0, 300.0, 100.0, 100.0], 0),
        ]);
        let dets = vec![
            det(1, [0.0, 0.0, 100.0, 100.0], 0.9),
            det(1, [300.0, 300.0, 100.0, 100.0], 0.8),
        ];
        let s = evaluate(&gt, &dets);
        assert_eq!(s.0[6], 0.5, "AR@1");
        assert_eq!(s.0[7], 1.0, "AR@10");
    }

    #[test]
    fn crowd_iou_uses_detection_area() {
        assert_eq!(
            coco_iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 100.0, 100.0], true),
            1.0
        );
        assert_eq!(
            coco_iou(&[0.0, 0.0, 10.0, 10.0], &[0.0, 0.0, 100.0, 100.0], false),
            0.01
        );
        assert_eq!(
            coco_iou(&[0.0, 0.0, 10.0, 10.0], &[10.0, 0.0, 10.0, 10.0], false),
            0.0
        );
    }
}
