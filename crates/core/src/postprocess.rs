//! Candidates → final detections: class-aware NMS, the detection cap, and
//! mapping from network pixels back to the original image.

use crate::model::Candidate;
use crate::preprocess::Transform;

/// A detected object in original-image pixels.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Detection {
    /// Model class index.
    pub class_id: u32,
    /// Class score in [0, 1].
    pub score: f32,
    /// `[x1, y1, x2, y2]` in image pixels, clipped to the image.
    pub bbox: [f32; 4],
}

/// NMS settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct NmsParams {
    /// A box is suppressed by a higher-scoring box of its class whose IoU
    /// with it is strictly above this.
    pub iou_threshold: f32,
    /// At most this many detections survive, highest scores first.
    pub max_detections: usize,
}

/// Intersection over union of two `[x1, y1, x2, y2]` boxes; 0 when the
/// union is empty, so zero-area boxes never suppress anything.
pub fn iou(a: &[f32; 4], b: &[f32; 4]) -> f32 {
    let w = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let h = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = w * h;
    let area = |r: &[f32; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let union = area(a) + area(b) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

/// Greedy class-aware NMS. Sorts `candidates` by score (stable, so ties keep
/// decode order) and returns the survivors, best first.
pub fn class_aware_nms(candidates: &mut [Candidate], params: &NmsParams) -> Vec<Candidate> {
    candidates.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Candidate> = Vec::with_capacity(params.max_detections.min(candidates.len()));
    for c in candidates.iter() {
        if kept.len() >= params.max_detections {
            break;
        }
        let suppressed = kept
            .iter()
            .any(|k| k.class_id == c.class_id && iou(&k.bbox, &c.bbox) > params.iou_threshold);
        if !suppressed {
            kept.push(*c);
        }
    }
    kept
}

/// Maps NMS survivors to image pixels.
pub fn to_image(kept: &[Candidate], transform: &Transform) -> Vec<Detection> {
    kept.iter()
        .map(|c| Detection {
            class_id: c.class_id,
            score: c.score,
            bbox: transform.box_to_image(c.bbox),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cand(bbox: [f32; 4], score: f32, class_id: u32) -> Candidate {
        Candidate {
            bbox,
            score,
            class_id,
        }
    }

    const NMS: NmsParams = NmsParams {
        iou_threshold: 0.6,
        max_detections: 100,
    };

    #[test]
    fn overlapping_same_class_is_suppressed_other_class_is_not() {
        let mut c = vec![
            cand([0.0, 0.0, 10.0, 10.0], 0.8, 0),
            cand([0.0, 0.0, 10.0, 9.0], 0.9, 0),
            cand([0.0, 0.0, 10.0, 10.0], 0.7, 1),
        ];
        let kept = class_aware_nms(&mut c, &NMS);
        assert_eq!(kept.len(), 2);
        assert_eq!((kept[0].score, kept[0].class_id), (0.9, 0));
        assert_eq!((kept[1].score, kept[1].class_id), (0.7, 1));
    }

    #[test]
    fn iou_exactly_at_threshold_is_kept() {
        // IoU of these two is 60/100 = 0.6 exactly.
        let mut c = vec![
            cand([0.0, 0.0, 10.0, 10.0], 0.9, 0),
            cand([0.0, 0.0, 10.0, 6.0], 0.8, 0),
        ];
        assert_eq!(iou(&c[0].bbox, &c[1].bbox), 0.6);
        assert_eq!(class_aware_nms(&mut c, &NMS).len(), 2);
    }

    #[test]
    fn ties_keep_decode_order() {
        let mut c = vec![
            cand([0.0, 0.0, 10.0, 10.0], 0.5, 3),
            cand([1.0, 0.0, 11.0, 10.0], 0.5, 3),
        ];
        let kept = class_aware_nms(&mut c, &NMS);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].bbox[0], 0.0, "the first of equal scores wins");
    }

    #[test]
    fn zero_area_boxes_neither_suppress_nor_panic() {
        let mut c = vec![
            cand([5.0, 5.0, 5.0, 5.0], 0.9, 0),
            cand([5.0, 5.0, 5.0, 5.0], 0.8, 0),
            cand([0.0, 0.0, 10.0, 10.0], 0.7, 0),
        ];
        assert_eq!(iou(&c[0].bbox, &c[1].bbox), 0.0);
        assert_eq!(class_aware_nms(&mut c, &NMS).len(), 3);
    }

    #[test]
    fn every_class_is_handled_independently_and_capped() {
        let mut c: Vec<Candidate> = (0..80)
            .flat_map(|class| {
                [
                    cand([0.0, 0.0, 10.0, 10.0], 0.5 + class as f32 / 1000.0, class),
                    cand([0.0, 0.0, 10.0, 10.0], 0.4, class),
                ]
            })
            .collect();
        let kept = class_aware_nms(&mut c, &NMS);
        assert_eq!(kept.len(), 80, "one per class survives");
        assert_eq!(kept[0].class_id, 79, "best first");
        let capped = class_aware_nms(
            &mut c,
            &NmsParams {
                iou_threshold: 0.6,
                max_detections: 5,
            },
        );
        assert_eq!(
            capped.iter().map(|k| k.class_id).collect::<Vec<_>>(),
            [79, 78, 77, 76, 75]
        );
    }

    #[test]
    fn empty_input_gives_nothing() {
        assert!(class_aware_nms(&mut [], &NMS).is_empty());
    }

    fn arb_box() -> impl Strategy<Value = [f32; 4]> {
        (0.0f32..100.0, 0.0f32..100.0, 0.0f32..50.0, 0.0f32..50.0)
            .prop_map(|(x, y, w, h)| [x, y, x + w, y + h])
    }

    proptest! {
        #[test]
        fn iou_is_symmetric_and_bounded(a in arb_box(), b in arb_box()) {
            let (ab, ba) = (iou(&a, &b), iou(&b, &a));
            prop_assert_eq!(ab, ba);
            prop_assert!((0.0..=1.0 + 1e-6).contains(&ab));
        }

        #[test]
        fn nms_is_idempotent(boxes in proptest::collection::vec((arb_box(), 0.0f32..1.0, 0u32..3), 0..40)) {
            let mut c: Vec<Candidate> = boxes.into_iter().map(|(b, s, k)| cand(b, s, k)).collect();
            let mut once = class_aware_nms(&mut c, &NMS);
            let twice = class_aware_nms(&mut once, &NMS);
            prop_assert_eq!(once, twice);
        }
    }
}
