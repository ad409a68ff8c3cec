//! Per-camera object tracking: detections of successive frames become
//! objects with ids, and the tracker says when an object appears, changes
//! in a way worth telling, and leaves.
//!
//! Pure logic: detections and the frame time come in as values, events come
//! out. The daemon's camera task owns one `Tracker` per camera and hands
//! the events to the MQTT task.

use std::collections::BTreeMap;

use crate::postprocess::{Detection, iou};

/// Which detections of one label count, and when a track of it is real.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LabelFilter {
    /// Detections scoring below this are ignored outright.
    pub min_score: f32,
    /// A track becomes real when the median of its recent scores reaches this.
    pub threshold: f32,
    /// Smallest box area in image pixels.
    pub min_area: f32,
    /// Largest box area in image pixels.
    pub max_area: f32,
    /// Smallest width / height.
    pub min_ratio: f32,
    /// Largest width / height.
    pub max_ratio: f32,
}

impl Default for LabelFilter {
    /// NanoDet's scores sit lower than Frigate's models', so the defaults
    /// are the detector's own 0.35 floor and a 0.5 median to go real.
    fn default() -> Self {
        LabelFilter {
            min_score: 0.35,
            threshold: 0.5,
            min_area: 0.0,
            max_area: f32::INFINITY,
            min_ratio: 0.0,
            max_ratio: f32::INFINITY,
        }
    }
}

impl LabelFilter {
    fn admits(&self, d: &Detection) -> bool {
        let (w, h) = (d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]);
        let area = w * h;
        let ratio = if h > 0.0 { w / h } else { f32::INFINITY };
        d.score >= self.min_score
            && (self.min_area..=self.max_area).contains(&area)
            && (self.min_ratio..=self.max_ratio).contains(&ratio)
    }
}

/// A named polygon in image pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Zone {
    /// Zone name, reported in events.
    pub name: String,
    /// Vertices, in order.
    pub polygon: Vec<(f32, f32)>,
}

/// Ray casting; points on an edge may fall either way.
fn inside(polygon: &[(f32, f32)], (x, y): (f32, f32)) -> bool {
    let mut result = false;
    let mut j = polygon.len().wrapping_sub(1);
    for (i, &(xi, yi)) in polygon.iter().enumerate() {
        let (xj, yj) = polygon[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            result = !result;
        }
        j = i;
    }
    result
}

/// Where an object stands: the middle of its box's bottom edge, as Frigate
/// does, so a person is in the zone their feet are in.
fn anchor(b: &[f32; 4]) -> (f32, f32) {
    ((b[0] + b[2]) / 2.0, b[3])
}

/// Tracker settings; all of them may change on hot reload.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackerConfig {
    /// Filters by class id; classes not listed use `default_filter`.
    pub filters: BTreeMap<u32, LabelFilter>,
    /// Filter for classes without their own.
    pub default_filter: LabelFilter,
    /// Zones reported per object.
    pub zones: Vec<Zone>,
    /// Detections standing inside a mask are ignored.
    pub masks: Vec<Vec<(f32, f32)>>,
    /// Scores remembered per track for the median.
    pub score_history: usize,
    /// A detection continues a track of its class when their IoU is at least this.
    pub match_iou: f32,
    /// A track unseen for this long has ended (seconds).
    pub lost_after: f64,
    /// An object whose box overlaps its last published box by less than
    /// this IoU has "moved a lot".
    pub moved_iou: f32,
    /// A rise in top score of at least this much is worth an update.
    pub score_step: f32,
    /// An unchanged real object is re-published this often (seconds).
    pub heartbeat: f64,
    /// An object that stays put (its box overlapping where it settled by
    /// at least `moved_iou`) for more frames in a row than this is
    /// stationary, as Frigate's `stationary.threshold` counts them.
    pub stationary_frames: u32,
}

impl TrackerConfig {
    /// The filter that applies to a class.
    fn filter(&self, class_id: u32) -> &LabelFilter {
        self.filters.get(&class_id).unwrap_or(&self.default_filter)
    }
}

impl Default for TrackerConfig {
    fn default() -> Self {
        TrackerConfig {
            filters: BTreeMap::new(),
            default_filter: LabelFilter::default(),
            zones: Vec::new(),
            masks: Vec::new(),
            score_history: 5,
            match_iou: 0.3,
            lost_after: 2.0,
            moved_iou: 0.5,
            score_step: 0.05,
            heartbeat: 60.0,
            stationary_frames: 50,
        }
    }
}

/// What an event tells about one object at one moment.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ObjectSnapshot {
    /// Track id, unique per camera for the daemon's lifetime.
    pub id: u64,
    /// Model class index.
    pub class_id: u32,
    /// Score in the latest frame it was seen in.
    pub score: f32,
    /// Median of recent scores, the figure `threshold` is checked against.
    pub median_score: f32,
    /// Best score so far.
    pub top_score: f32,
    /// `[x1, y1, x2, y2]` in image pixels.
    pub bbox: [f32; 4],
    /// Zones the object stands in, in configuration order.
    pub zones: Vec<String>,
    /// Every zone it has stood in since it appeared, in the order entered.
    pub entered_zones: Vec<String>,
    /// Frames in a row it has stayed put.
    pub motionless_frames: u32,
    /// Whether it has stayed put for more than `stationary_frames`.
    pub stationary: bool,
    /// Times it moved off after having been stationary.
    pub position_changes: u32,
    /// When it was first detected (seconds).
    pub first_seen: f64,
    /// When it was last detected (seconds).
    pub last_seen: f64,
    /// Time of the frame that produced this event (seconds).
    pub frame_time: f64,
}

/// The lifecycle of a tracked object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EventKind {
    /// The track just became real.
    New,
    /// A real object changed: zones, a better score, a big move, or the heartbeat.
    Update,
    /// The object is gone.
    End,
}

/// One event, with the object as last published and as it is now.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct TrackEvent {
    /// What happened.
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The object as last published (`None` for `new`).
    pub before: Option<ObjectSnapshot>,
    /// The object now.
    pub after: ObjectSnapshot,
}

struct Track {
    state: ObjectSnapshot,
    /// The box it settled at: moving off it (IoU below `moved_iou`)
    /// starts the motionless count over from the new box.
    settled: [f32; 4],
    scores: Vec<f32>,
    published: Option<(ObjectSnapshot, f64)>,
}

impl Track {
    /// Median of the last `n` frames' scores, where frames that missed the
    /// track and frames before it began count as 0: a track must be seen in
    /// more than half of `n` frames before it can be real, so one confident
    /// flicker never is.
    fn median(&self, n: usize) -> f32 {
        let mut s = self.scores.clone();
        s.resize(n.max(s.len()), 0.0);
        s.sort_by(f32::total_cmp);
        let n = s.len();
        if n % 2 == 1 {
            s[n / 2]
        } else {
            (s[n / 2 - 1] + s[n / 2]) / 2.0
        }
    }
}

/// The tracker of one camera.
pub struct Tracker {
    config: TrackerConfig,
    tracks: Vec<Track>,
    next_id: u64,
}

impl Tracker {
    /// A tracker with no objects yet.
    pub fn new(config: TrackerConfig) -> Tracker {
        Tracker {
            config,
            tracks: Vec::new(),
            next_id: 1,
        }
    }

    /// Swaps in new settings (hot reload); tracks and ids carry on.
    pub fn set_config(&mut self, config: TrackerConfig) {
        self.config = config;
    }

    fn zones_of(&self, b: &[f32; 4]) -> Vec<String> {
        let at = anchor(b);
        self.config
            .zones
            .iter()
            .filter(|z| inside(&z.polygon, at))
            .map(|z| z.name.clone())
            .collect()
    }

    /// Feeds one frame's detections, taken at `now` (seconds), and returns
    /// the events it causes. An object this frame missed scores 0 in it.
    pub fn update(&mut self, detections: &[Detection], now: f64) -> Vec<TrackEvent> {
        self.step(detections, now, true)
    }

    /// With no frame coming: ends the objects unseen for `lost_after` and
    /// sends heartbeats, at `now`, without counting a missed frame.
    pub fn expire(&mut self, now: f64) -> Vec<TrackEvent> {
        self.step(&[], now, false)
    }

    fn step(&mut self, detections: &[Detection], now: f64, frame: bool) -> Vec<TrackEvent> {
        let admitted: Vec<&Detection> = detections
            .iter()
            .filter(|d| self.config.filter(d.class_id).admits(d))
            .filter(|d| !self.config.masks.iter().any(|m| inside(m, anchor(&d.bbox))))
            .collect();

        // Greedy matching, best overlap first, within a class.
        let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
        for (t, track) in self.tracks.iter().enumerate() {
            for (d, det) in admitted.iter().enumerate() {
                if det.class_id == track.state.class_id {
                    let overlap = iou(&track.state.bbox, &det.bbox);
                    if overlap >= self.config.match_iou {
                        pairs.push((overlap, t, d));
                    }
                }
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut track_taken = vec![false; self.tracks.len()];
        let mut det_taken = vec![false; admitted.len()];
        let mut matches = Vec::new();
        for (_, t, d) in pairs {
            if !track_taken[t] && !det_taken[d] {
                track_taken[t] = true;
                det_taken[d] = true;
                matches.push((t, d));
            }
        }

        let history = self.config.score_history.max(1);
        if frame {
            // docs/MQTT.md's rule: the median runs over the last `history`
            // frames, and a frame that missed the object counts as 0. (Only
            // matched frames were counted, so an object seen once in five
            // frames became real after three sightings.)
            for (track, _) in self
                .tracks
                .iter_mut()
                .zip(&track_taken)
                .filter(|(_, taken)| !**taken)
            {
                track.scores.push(0.0);
                if track.scores.len() > history {
                    track.scores.remove(0);
                }
            }
        }
        for (t, d) in matches {
            let det = admitted[d];
            let zones = self.zones_of(&det.bbox);
            let track = &mut self.tracks[t];
            track.scores.push(det.score);
            if track.scores.len() > history {
                track.scores.remove(0);
            }
            track.state.score = det.score;
            track.state.top_score = track.state.top_score.max(det.score);
            track.state.bbox = det.bbox;
            for zone in &zones {
                if !track.state.entered_zones.contains(zone) {
                    track.state.entered_zones.push(zone.clone());
                }
            }
            track.state.zones = zones;
            track.state.last_seen = now;
            if iou(&track.settled, &det.bbox) >= self.config.moved_iou {
                track.state.motionless_frames = track.state.motionless_frames.saturating_add(1);
            } else {
                if track.state.stationary {
                    track.state.position_changes = track.state.position_changes.saturating_add(1);
                }
                track.state.motionless_frames = 0;
                track.settled = det.bbox;
            }
            // Frigate's rule: more frames than the threshold.
            track.state.stationary = track.state.motionless_frames > self.config.stationary_frames;
        }
        for (d, det) in admitted.iter().enumerate() {
            if det_taken[d] {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            let zones = self.zones_of(&det.bbox);
            self.tracks.push(Track {
                state: ObjectSnapshot {
                    id,
                    class_id: det.class_id,
                    score: det.score,
                    median_score: det.score,
                    top_score: det.score,
                    bbox: det.bbox,
                    entered_zones: zones.clone(),
                    zones,
                    motionless_frames: 0,
                    stationary: false,
                    position_changes: 0,
                    first_seen: now,
                    last_seen: now,
                    frame_time: now,
                },
                scores: vec![det.score],
                settled: det.bbox,
                published: None,
            });
        }

        let mut events = Vec::new();
        let config = &self.config;
        self.tracks.retain_mut(|track| {
            track.state.frame_time = now;
            track.state.median_score = track.median(history);
            if now - track.state.last_seen > config.lost_after {
                if let Some((before, _)) = track.published.take() {
                    events.push(TrackEvent {
                        kind: EventKind::End,
                        before: Some(before),
                        after: track.state.clone(),
                    });
                }
                return false;
            }
            let threshold = config.filter(track.state.class_id).threshold;
            match &track.published {
                None if track.state.median_score >= threshold => {
                    events.push(TrackEvent {
                        kind: EventKind::New,
                        before: None,
                        after: track.state.clone(),
                    });
                    track.published = Some((track.state.clone(), now));
                }
                None => {}
                Some((last, at)) => {
                    let changed = last.zones != track.state.zones
                        || track.state.top_score >= last.top_score + config.score_step
                        || iou(&last.bbox, &track.state.bbox) < config.moved_iou
                        || now - at >= config.heartbeat;
                    if changed {
                        events.push(TrackEvent {
                            kind: EventKind::Update,
                            before: Some(last.clone()),
                            after: track.state.clone(),
                        });
                        track.published = Some((track.state.clone(), now));
                    }
                }
            }
            true
        });
        events
    }

    /// Ends every real object (shutdown, or a camera going away).
    pub fn end_all(&mut self, now: f64) -> Vec<TrackEvent> {
        self.tracks
            .drain(..)
            .filter_map(|mut t| {
                t.state.frame_time = now;
                t.published.map(|(before, _)| TrackEvent {
                    kind: EventKind::End,
                    before: Some(before),
                    after: t.state,
                })
            })
            .collect()
    }

    /// Real objects in view, per class.
    pub fn counts(&self) -> BTreeMap<u32, usize> {
        let mut counts = BTreeMap::new();
        for t in self.tracks.iter().filter(|t| t.published.is_some()) {
            *counts.entry(t.state.class_id).or_insert(0) += 1;
        }
        counts
    }

    /// Real objects standing in each zone, per class: `(zone, class)`.
    pub fn zone_counts(&self) -> BTreeMap<(String, u32), usize> {
        let mut counts = BTreeMap::new();
        for t in self.tracks.iter().filter(|t| t.published.is_some()) {
            for zone in &t.state.zones {
                *counts.entry((zone.clone(), t.state.class_id)).or_insert(0) += 1;
            }
        }
        counts
    }

    /// The real objects in view now.
    pub fn objects(&self) -> impl Iterator<Item = &ObjectSnapshot> {
        self.tracks
            .iter()
            .filter(|t| t.published.is_some())
            .map(|t| &t.state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(class_id: u32, score: f32, bbox: [f32; 4]) -> Detection {
        Detection {
            class_id,
            score,
            bbox,
        }
    }

    fn kinds(events: &[TrackEvent]) -> Vec<EventKind> {
        events.iter().map(|e| e.kind).collect()
    }

    const PERSON: [f32; 4] = [100.0, 100.0, 200.0, 400.0];

    /// Feeds the same detections until the first event; returns it.
    fn until_event(t: &mut Tracker, dets: &[Detection], from: f64) -> (Vec<TrackEvent>, f64) {
        for i in 0..10 {
            let now = from + 0.1 * f64::from(i);
            let e = t.update(dets, now);
            if !e.is_empty() {
                return (e, now);
            }
        }
        panic!("no event in 10 frames");
    }

    /// Issue 17: docs/MQTT.md says frames that missed an object count as 0
    /// in its median; only frames it was seen in were counted, so an object
    /// seen in one frame of five became real after three sightings.
    #[test]
    fn missed_frames_count_as_zero_in_the_median_issue_17() {
        let mut t = Tracker::new(TrackerConfig::default());
        // Seen in frame 0, 5, 10, ... at 0.9; missed in the frames between.
        for frame in 0..40 {
            let now = 0.1 * f64::from(frame);
            let dets = if frame % 5 == 0 {
                vec![det(0, 0.9, PERSON)]
            } else {
                vec![]
            };
            let events = t.update(&dets, now);
            assert!(events.is_empty(), "frame {frame}: {events:?}");
        }
        // Seen in three frames of five: real.
        let mut t = Tracker::new(TrackerConfig::default());
        let mut news = 0;
        for frame in 0..10 {
            let dets = if frame % 5 < 3 {
                vec![det(0, 0.9, PERSON)]
            } else {
                vec![]
            };
            news += t.update(&dets, 0.1 * f64::from(frame)).len();
        }
        assert_eq!(news, 1);
        // Ticks without a frame are not missed frames.
        let mut t = Tracker::new(TrackerConfig::default());
        for frame in 0..3 {
            t.update(&[det(0, 0.9, PERSON)], 0.1 * f64::from(frame));
            assert!(t.expire(0.1 * f64::from(frame) + 0.05).is_empty());
        }
        assert_eq!(t.tracks[0].scores, vec![0.9, 0.9, 0.9]);
    }

    #[test]
    fn a_track_goes_real_on_its_median_and_ends_when_lost() {
        let mut t = Tracker::new(TrackerConfig::default());
        // Last 5 scores, missing ones as 0: [.4 .45 .7 .8 0] has median .45.
        for (i, s) in [0.4, 0.45, 0.7, 0.8].into_iter().enumerate() {
            assert!(
                t.update(&[det(0, s, PERSON)], 0.1 * i as f64).is_empty(),
                "frame {i}"
            );
        }
        // [.4 .45 .7 .8 .8]: median .7 reaches the 0.5 threshold.
        let e = t.update(&[det(0, 0.8, PERSON)], 0.4);
        assert_eq!(kinds(&e), [EventKind::New]);
        assert_eq!(e[0].after.id, 1);
        assert_eq!((e[0].after.median_score, e[0].after.top_score), (0.7, 0.8));
        assert_eq!(e[0].after.first_seen, 0.0);
        assert_eq!(t.counts().get(&0), Some(&1));
        // Unchanged: no update per frame.
        assert!(t.update(&[det(0, 0.8, PERSON)], 0.5).is_empty());
        // Gone for longer than lost_after: end.
        assert!(t.update(&[], 1.0).is_empty());
        let e = t.update(&[], 2.6);
        assert_eq!(kinds(&e), [EventKind::End]);
        assert_eq!(e[0].after.last_seen, 0.5);
        assert!(t.counts().is_empty());
    }

    #[test]
    fn one_confident_frame_is_not_enough_and_low_scores_never_count() {
        let mut t = Tracker::new(TrackerConfig {
            score_history: 3,
            ..Default::default()
        });
        let noise = det(0, 0.2, [0.0, 0.0, 10.0, 10.0]);
        // [.9 0 0]: median 0. [.9 .9 0]: median .9, real.
        assert!(t.update(&[det(0, 0.9, PERSON), noise], 0.0).is_empty());
        let e = t.update(&[det(0, 0.9, PERSON), noise], 0.1);
        assert_eq!(kinds(&e), [EventKind::New]);
        assert_eq!(e[0].after.id, 1, "the 0.2 detections never made a track");
        // A flicker of 0.9 amid 0.36s never makes a second object real.
        let other = [300.0, 100.0, 400.0, 400.0];
        for (i, s) in [0.36, 0.9, 0.36, 0.36].into_iter().enumerate() {
            let e = t.update(
                &[det(0, 0.9, PERSON), det(0, s, other)],
                0.2 + 0.1 * i as f64,
            );
            assert!(e.is_empty(), "frame {i}: {e:?}");
        }
    }

    #[test]
    fn updates_only_on_real_change() {
        let mut t = Tracker::new(TrackerConfig {
            zones: vec![Zone {
                name: "door".into(),
                polygon: vec![(0.0, 300.0), (250.0, 300.0), (250.0, 500.0), (0.0, 500.0)],
            }],
            ..Default::default()
        });
        let (e, now) = until_event(&mut t, &[det(0, 0.8, PERSON)], 0.0);
        assert_eq!(kinds(&e), [EventKind::New]);
        assert_eq!(
            e[0].after.zones,
            ["door"],
            "feet at (150, 400) are in the door"
        );
        // Small score rise: no update. Rise of 0.05: update.
        assert!(t.update(&[det(0, 0.82, PERSON)], now + 0.1).is_empty());
        let e = t.update(&[det(0, 0.86, PERSON)], now + 0.2);
        assert_eq!(kinds(&e), [EventKind::Update]);
        assert_eq!(e[0].before.as_ref().map(|b| b.top_score), Some(0.8));
        // Walking out of the zone, in steps that keep the track matched.
        let step = [100.0, 50.0, 200.0, 345.0];
        let out = [100.0, 0.0, 200.0, 290.0];
        let e = t.update(&[det(0, 0.8, step)], now + 0.3);
        assert!(e.iter().all(|e| e.after.zones == ["door"]), "{e:?}");
        let e = t.update(&[det(0, 0.8, out)], now + 0.4);
        assert_eq!(kinds(&e), [EventKind::Update]);
        assert!(e[0].after.zones.is_empty());
        // Then only the heartbeat, a minute later.
        let mut seen = Vec::new();
        for i in 1..=61 {
            let e = t.update(&[det(0, 0.8, out)], now + 0.4 + f64::from(i));
            if !e.is_empty() {
                seen.push((i, e));
            }
        }
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].0, 60);
        assert_eq!(kinds(&seen[0].1), [EventKind::Update]);
    }

    #[test]
    fn classes_do_not_match_each_other_and_filters_and_masks_apply() {
        let mut filters = BTreeMap::new();
        filters.insert(
            2,
            LabelFilter {
                min_area: 5000.0,
                ..Default::default()
            },
        );
        let mut t = Tracker::new(TrackerConfig {
            score_history: 1,
            filters,
            masks: vec![vec![
                (500.0, 0.0),
                (600.0, 0.0),
                (600.0, 600.0),
                (500.0, 600.0),
            ]],
            ..Default::default()
        });
        let e = t.update(
            &[
                det(0, 0.8, PERSON),
                det(15, 0.8, PERSON),
                det(2, 0.9, [0.0, 0.0, 50.0, 50.0]),
                det(0, 0.9, [520.0, 10.0, 580.0, 100.0]),
            ],
            0.0,
        );
        let ids: Vec<(u64, u32)> = e.iter().map(|e| (e.after.id, e.after.class_id)).collect();
        assert_eq!(
            ids,
            [(1, 0), (2, 15)],
            "small car filtered, masked person ignored"
        );
    }

    #[test]
    fn end_all_ends_only_real_objects() {
        let mut t = Tracker::new(TrackerConfig {
            score_history: 1,
            ..Default::default()
        });
        t.update(
            &[det(0, 0.8, PERSON), det(1, 0.4, [0.0, 0.0, 9.0, 9.0])],
            0.0,
        );
        let e = t.end_all(5.0);
        assert_eq!(kinds(&e), [EventKind::End]);
        assert_eq!(e[0].after.frame_time, 5.0);
        assert!(t.end_all(6.0).is_empty());
    }

    #[test]
    fn polygon_test() {
        let square = [(0.0, 0.0), (10.0, 0.0), (10.0, 10.0), (0.0, 10.0)];
        assert!(inside(&square, (5.0, 5.0)));
        assert!(!inside(&square, (15.0, 5.0)));
        assert!(!inside(&[], (0.0, 0.0)));
    }

    /// Issue 19: Frigate's fields. A person walks from the yard into the
    /// driveway and stops there: both zones entered, counted per zone,
    /// stationary after `stationary_frames` still frames, and one position
    /// change when they walk off again.
    #[test]
    fn zones_entered_zone_counts_and_stationary_follow_the_object_issue_19() {
        let square = |x0: f32, x1: f32| vec![(x0, 0.0), (x1, 0.0), (x1, 1000.0), (x0, 1000.0)];
        let mut t = Tracker::new(TrackerConfig {
            zones: vec![
                Zone {
                    name: "yard".into(),
                    polygon: square(0.0, 300.0),
                },
                Zone {
                    name: "driveway".into(),
                    polygon: square(300.0, 1000.0),
                },
            ],
            stationary_frames: 3,
            ..TrackerConfig::default()
        });
        let at = |x: f32| det(0, 0.9, [x, 100.0, x + 100.0, 400.0]);
        let (events, mut now) = until_event(&mut t, &[at(100.0)], 0.0);
        assert_eq!(events[0].after.entered_zones, ["yard"]);
        assert_eq!(t.zone_counts(), BTreeMap::from([(("yard".into(), 0), 1)]));
        // Into the driveway in steps the matching follows, then standing.
        let mut last = None;
        for x in [150.0, 200.0, 250.0, 300.0, 350.0, 400.0, 450.0, 500.0]
            .into_iter()
            .chain([500.0; 4])
        {
            now += 0.1;
            t.update(&[at(x)], now);
            last = t.objects().next().cloned();
        }
        let person = last.unwrap();
        assert_eq!(person.zones, ["driveway"]);
        assert_eq!(person.entered_zones, ["yard", "driveway"]);
        assert_eq!(
            t.zone_counts(),
            BTreeMap::from([(("driveway".into(), 0), 1)])
        );
        assert_eq!((person.motionless_frames, person.stationary), (4, true));
        assert_eq!(person.position_changes, 0);
        now += 0.1;
        t.update(&[at(550.0)], now);
        let person = t.objects().next().unwrap();
        assert_eq!(
            (
                person.motionless_frames,
                person.stationary,
                person.position_changes
            ),
            (0, false, 1)
        );
    }
}
