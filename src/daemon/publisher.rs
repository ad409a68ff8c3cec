//! One camera's publishing decisions, as a state machine: a frame's
//! detections and the time in, the messages its consumers see out.
//!
//! It owns the camera's tracker, the labels it tracks, the counts (per
//! label and per zone) last published, the `seq` of the next event, each
//! object's event id and snapshot, the frame size (a new one is a new
//! scene) and the detections rate limit. It has no thread, no broker and
//! no clock of its own: the detector task ([`super::pipeline`]) feeds it
//! and carries out its [`Action`]s, and the tests drive it with a fake
//! clock and a seeded random source.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::config::EventFormat;
use crate::mqtt::{self, EventContext, FrameTiming, Message, SnapshotRef};
use crate::postprocess::Detection;
use crate::track::{EventKind, TrackEvent, Tracker, TrackerConfig};

/// How long a camera must have sent no frame before its objects are aged
/// without one: while frames come, each frame ages them.
pub const SILENT_AFTER: Duration = Duration::from_millis(200);

/// What the shell does for the publisher.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Print this line on stdout: an event, for a person watching.
    Print(String),
    /// Queue this message for the broker.
    Send(Message),
    /// Queue a snapshot of the frame just processed; the settings' room
    /// said the queue takes it. Comes before the events that name it.
    Snapshot(SnapshotJob),
    /// A snapshot was wanted, but the queue was full: count it.
    SnapshotDropped,
    /// The tracker reported an event of a tracked label: count it
    /// (`nanodetd_events_total`).
    Event {
        /// The camera.
        camera: String,
        /// The object's label.
        label: String,
        /// New, update or end.
        kind: EventKind,
    },
    /// The objects of a label a camera tracks now, when the number
    /// changed (`nanodetd_objects`).
    Objects {
        /// The camera.
        camera: String,
        /// The label.
        label: String,
        /// How many.
        count: usize,
    },
}

/// A snapshot to take of the frame just processed.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotJob {
    /// The camera.
    pub camera: String,
    /// The object's label, drawn beside its box.
    pub label: String,
    /// Its score in this frame.
    pub score: f32,
    /// Its box in the frame, pixels.
    pub bbox: [f32; 4],
    /// The file to write (an object's better snapshot replaces its last).
    pub path: PathBuf,
}

/// The settings a publisher reads at each step; a reload changes them
/// from the next step on.
#[derive(Debug, Clone, Copy)]
pub struct Settings<'a> {
    /// Class names by model class id (the model in service).
    pub labels: &'a [String],
    /// `[mqtt] detections_rate`: detections messages a second at most;
    /// 0 sends none.
    pub detections_rate: f32,
    /// Print each event as a line (`[log] events`).
    pub print_events: bool,
    /// Which event messages go out.
    pub events: EventFormat,
    /// Where snapshots go (`snapshots.dir`), when they are on.
    pub snapshot_dir: Option<&'a Path>,
    /// Snapshots the queue takes now. Only the detector thread fills it,
    /// so what it takes in one step is never refused.
    pub snapshot_room: usize,
}

impl Settings<'_> {
    fn label(&self, class_id: u32) -> &str {
        crate::detector::class_name(self.labels, class_id)
    }
}

/// One processed frame of the camera.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    /// What the detector found, in image pixels.
    pub detections: &'a [Detection],
    /// The frame's width and height.
    pub size: (usize, usize),
    /// When the detector took it.
    pub taken: Instant,
    /// When its detections were ready: the rate limit counts from the
    /// last detections message to this.
    pub ready: Instant,
    /// When it was captured, in Unix seconds: the time its events carry.
    pub wall_time: f64,
    /// Where its time went, for the detections message.
    pub timing: FrameTiming,
}

/// What the publisher keeps of a real object beyond the tracker.
#[derive(Debug, Clone)]
struct Known {
    event_id: String,
    snapshot: Option<SnapshotRef>,
}

/// One camera's publishing state.
pub struct CameraPublisher {
    camera: String,
    /// The camera's name as a folder: its slug.
    folder: String,
    tracker: Tracker,
    /// Classes whose detections reach the tracker; None: all.
    tracked: Option<BTreeSet<u32>>,
    /// Counts as last published, per class; none is 0.
    counts: BTreeMap<u32, usize>,
    /// Zone counts as last published, per zone and class; none is 0.
    zone_counts: BTreeMap<(String, u32), usize>,
    /// Real objects by tracker id.
    known: BTreeMap<u64, Known>,
    /// The random part of event ids.
    rng: fastrand::Rng,
    /// The `seq` of the next event. It goes on counting when the camera
    /// comes back, so consumers never see one reused.
    next_seq: u64,
    /// (0, 0) until a frame comes, and after the camera ended.
    frame_size: (usize, usize),
    last_frame: Instant,
    last_detections: Option<Instant>,
}

impl CameraPublisher {
    /// A camera's first frame arrives at `now`; `tracked` are the classes
    /// it tracks (None: all), `rng` makes event ids.
    pub fn new(
        camera: &str,
        tracker: TrackerConfig,
        tracked: Option<BTreeSet<u32>>,
        now: Instant,
        rng: fastrand::Rng,
    ) -> CameraPublisher {
        CameraPublisher {
            camera: camera.to_owned(),
            folder: crate::config::slug(camera),
            tracker: Tracker::new(tracker),
            tracked,
            counts: BTreeMap::new(),
            zone_counts: BTreeMap::new(),
            known: BTreeMap::new(),
            rng,
            next_seq: 0,
            frame_size: (0, 0),
            last_frame: now,
            last_detections: None,
        }
    }

    /// New tracker settings and tracked classes (a reload, or a new
    /// model's classes).
    pub fn retune(&mut self, tracker: TrackerConfig, tracked: Option<BTreeSet<u32>>) {
        self.tracker.set_config(tracker);
        self.tracked = tracked;
    }

    /// A processed frame: its events and count changes, and its detections
    /// when the rate limit allows.
    pub fn frame(&mut self, seen: Seen<'_>, settings: &Settings<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        if self.frame_size != seen.size && self.frame_size != (0, 0) {
            // A new resolution is a new scene (a replay's next photo, a
            // renegotiated camera): boxes of the old one mean nothing in
            // it. Those objects end at the old size.
            let events = self.tracker.end_all(seen.wall_time);
            self.publish(events, settings, None, &mut actions);
        }
        self.frame_size = seen.size;
        self.last_frame = seen.taken;
        let tracked: Cow<'_, [Detection]> = match &self.tracked {
            None => Cow::Borrowed(seen.detections),
            Some(classes) => seen
                .detections
                .iter()
                .filter(|d| classes.contains(&d.class_id))
                .copied()
                .collect(),
        };
        let events = self.tracker.update(&tracked, seen.wall_time);
        let mut room = settings.snapshot_room;
        self.publish(events, settings, Some(&mut room), &mut actions);
        let rate = settings.detections_rate;
        let due = self.last_detections.is_none_or(|last| {
            seen.ready.saturating_duration_since(last).as_secs_f32() >= 1.0 / rate
        });
        if rate > 0.0 && due {
            self.last_detections = Some(seen.taken);
            actions.push(Action::Send(mqtt::detections_message(
                &self.camera,
                seen.wall_time,
                seen.size,
                seen.detections,
                |c| settings.label(c).to_owned(),
                seen.timing,
            )));
        }
        actions
    }

    /// No frame from any camera for a while: once this one has been
    /// silent for [`SILENT_AFTER`], objects unseen for the tracker's
    /// `lost_after` end.
    pub fn idle(&mut self, now: Instant, wall_time: f64, settings: &Settings<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        if now.saturating_duration_since(self.last_frame) > SILENT_AFTER {
            let events = self.tracker.expire(wall_time);
            self.publish(events, settings, None, &mut actions);
        }
        actions
    }

    /// The camera ended (a replay finished, the daemon stops): every
    /// object ends, and its next frame starts a new scene.
    pub fn end(&mut self, wall_time: f64, settings: &Settings<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        let events = self.tracker.end_all(wall_time);
        self.publish(events, settings, None, &mut actions);
        self.frame_size = (0, 0);
        actions
    }

    /// Frigate-style: the time the object became real, and six random
    /// letters and digits, so ids stay unique across restarts.
    fn event_id(&mut self, first_seen: f64) -> String {
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let random: String = (0..6)
            .map(|_| char::from(ALPHABET[self.rng.usize(..ALPHABET.len())]))
            .collect();
        format!("{first_seen:.6}-{random}")
    }

    /// A snapshot for this event, when one is wanted: the object is new,
    /// or scores higher in this frame than in its picture. `room` is what the snapshot queue takes in
    /// this step; None where there is no frame (idle, end).
    fn snapshot_for(
        &mut self,
        event: &TrackEvent,
        label: &str,
        settings: &Settings<'_>,
        room: Option<&mut usize>,
        out: &mut Vec<Action>,
    ) {
        let (Some(dir), Some(room)) = (settings.snapshot_dir, room) else {
            return;
        };
        let Some(known) = self.known.get_mut(&event.after.id) else {
            return;
        };
        // The picture is of this frame: it is better only when the object
        // scores higher in it than in the picture taken (an update for a
        // move or a zone may come at a lower score). An object whose first
        // picture was dropped gets one at its next update.
        let better = match event.kind {
            EventKind::New => true,
            EventKind::Update => known
                .snapshot
                .as_ref()
                .is_none_or(|taken| event.after.score > taken.score),
            EventKind::End => false,
        };
        if !better {
            return;
        }
        if *room == 0 {
            out.push(Action::SnapshotDropped);
            return;
        }
        *room -= 1;
        let path = dir
            .join(&self.folder)
            .join(format!("{}.jpg", known.event_id));
        known.snapshot = Some(SnapshotRef {
            path: path.display().to_string(),
            frame_time: event.after.frame_time,
            bbox: event.after.bbox,
            score: event.after.score,
        });
        out.push(Action::Snapshot(SnapshotJob {
            camera: self.camera.clone(),
            label: label.to_owned(),
            score: event.after.score,
            bbox: event.after.bbox,
            path,
        }));
    }

    /// Events (and the snapshots they call for), then any count that
    /// changed, per label and per zone.
    fn publish(
        &mut self,
        events: Vec<TrackEvent>,
        settings: &Settings<'_>,
        mut room: Option<&mut usize>,
        out: &mut Vec<Action>,
    ) {
        for event in &events {
            let label = settings.label(event.after.class_id);
            out.push(Action::Event {
                camera: self.camera.clone(),
                label: label.to_owned(),
                kind: event.kind,
            });
            if event.kind == EventKind::New || !self.known.contains_key(&event.after.id) {
                let event_id = self.event_id(event.after.first_seen);
                self.known.insert(
                    event.after.id,
                    Known {
                        event_id,
                        snapshot: None,
                    },
                );
            }
            self.snapshot_for(event, label, settings, room.as_deref_mut(), out);
            if settings.print_events {
                out.push(Action::Print(super::console::event_line(
                    &self.camera,
                    event,
                    label,
                )));
            }
            let known = if event.kind == EventKind::End {
                self.known.remove(&event.after.id)
            } else {
                self.known.get(&event.after.id).cloned()
            };
            let Some(known) = known else { continue };
            let context = EventContext {
                camera: &self.camera,
                label,
                frame_size: self.frame_size,
                event_id: &known.event_id,
                snapshot: known.snapshot.as_ref(),
            };
            if settings.events.native() {
                out.push(Action::Send(mqtt::event_message(
                    self.next_seq,
                    event,
                    &context,
                )));
            }
            if settings.events.frigate() {
                out.push(Action::Send(mqtt::frigate_event_message(event, &context)));
            }
            self.next_seq += 1;
        }
        for (class, n) in changed(self.tracker.counts(), &mut self.counts) {
            out.push(Action::Send(mqtt::count_message(
                &self.camera,
                settings.label(class),
                n,
            )));
            out.push(Action::Objects {
                camera: self.camera.clone(),
                label: settings.label(class).to_owned(),
                count: n,
            });
        }
        for ((zone, class), n) in changed(self.tracker.zone_counts(), &mut self.zone_counts) {
            out.push(Action::Send(mqtt::zone_count_message(
                &self.camera,
                &zone,
                settings.label(class),
                n,
            )));
        }
    }
}

/// The counts that differ from those `published`, in key order, a key
/// gone from `now` as 0; `published` then holds `now`.
fn changed<K: Ord + Clone>(
    now: BTreeMap<K, usize>,
    published: &mut BTreeMap<K, usize>,
) -> Vec<(K, usize)> {
    let keys: BTreeSet<&K> = now.keys().chain(published.keys()).collect();
    let out = keys
        .into_iter()
        .filter_map(|key| {
            let n = now.get(key).copied().unwrap_or(0);
            (published.get(key).copied().unwrap_or(0) != n).then(|| (key.clone(), n))
        })
        .collect();
    *published = now;
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const PERSON: [f32; 4] = [100.0, 100.0, 200.0, 400.0];
    const CAT: [f32; 4] = [300.0, 300.0, 380.0, 360.0];

    fn labels() -> Vec<String> {
        ["person", "cat"].map(str::to_owned).to_vec()
    }

    /// A fake clock: the camera's frames at `t` seconds after `start`.
    struct Camera {
        start: Instant,
        publisher: CameraPublisher,
        labels: Vec<String>,
        rate: f32,
        print: bool,
        events: EventFormat,
        snapshot_dir: Option<PathBuf>,
        room: usize,
    }

    impl Camera {
        fn new() -> Camera {
            let start = Instant::now();
            Camera {
                start,
                publisher: CameraPublisher::new(
                    "Front Door",
                    TrackerConfig::default(),
                    None,
                    start,
                    fastrand::Rng::with_seed(19),
                ),
                labels: labels(),
                rate: 0.0,
                print: false,
                events: EventFormat::Native,
                snapshot_dir: None,
                room: 0,
            }
        }

        /// One step of the publisher, under the camera's settings.
        fn step<R>(&mut self, step: impl FnOnce(&mut CameraPublisher, &Settings<'_>) -> R) -> R {
            let settings = Settings {
                labels: &self.labels,
                detections_rate: self.rate,
                print_events: self.print,
                events: self.events,
                snapshot_dir: self.snapshot_dir.as_deref(),
                snapshot_room: self.room,
            };
            step(&mut self.publisher, &settings)
        }

        fn at(&self, t: f64) -> Instant {
            self.start + Duration::from_secs_f64(t)
        }

        fn frame(
            &mut self,
            t: f64,
            size: (usize, usize),
            found: &[(u32, [f32; 4])],
        ) -> Vec<Action> {
            let detections: Vec<Detection> = found
                .iter()
                .map(|&(class_id, bbox)| Detection {
                    class_id,
                    score: 0.8,
                    bbox,
                })
                .collect();
            let seen = Seen {
                detections: &detections,
                size,
                taken: self.at(t),
                // 30 ms of detection: the rate limit counts to here.
                ready: self.at(t) + Duration::from_millis(30),
                wall_time: 1000.0 + t,
                timing: FrameTiming::default(),
            };
            self.step(|publisher, settings| publisher.frame(seen, settings))
        }

        /// Frames `ticks` (tenths of a second), all of one size and
        /// content: what they sent, as [`sent`] gives it.
        fn frames(
            &mut self,
            ticks: std::ops::Range<i32>,
            size: (usize, usize),
            found: &[(u32, [f32; 4])],
        ) -> Vec<String> {
            ticks
                .flat_map(|i| sent(&self.frame(f64::from(i) * 0.1, size, found)))
                .collect()
        }

        fn idle(&mut self, t: f64) -> Vec<Action> {
            let now = self.at(t);
            self.step(|publisher, settings| publisher.idle(now, 1000.0 + t, settings))
        }

        fn end(&mut self, t: f64) -> Vec<Action> {
            self.step(|publisher, settings| publisher.end(1000.0 + t, settings))
        }
    }

    /// Each sent message as `topic payload-summary`: the event's type,
    /// label and seq, or the whole payload of a count.
    fn sent(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(m) if m.topic.ends_with("/events") => {
                    let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
                    Some(format!(
                        "{} {} {} seq {}",
                        m.topic, v["type"], v["after"]["label"], v["seq"]
                    ))
                }
                Action::Send(m) => Some(format!(
                    "{} {}",
                    m.topic,
                    String::from_utf8_lossy(&m.payload)
                )),
                Action::Print(_) | Action::Event { .. } | Action::Objects { .. } => None,
                Action::Snapshot(job) => Some(format!("snapshot {}", job.path.display())),
                Action::SnapshotDropped => Some("snapshot dropped".into()),
            })
            .collect()
    }

    #[test]
    fn an_object_seen_in_a_row_is_announced_once_with_its_count() {
        let mut cam = Camera::new();
        let all = cam.frames(0..5, (640, 480), &[(0, PERSON)]);
        assert_eq!(
            all,
            [
                r#"Front Door/events "new" "person" seq 0"#,
                "Front Door/person 1"
            ]
        );
    }

    #[test]
    fn a_new_frame_size_ends_the_old_scene_before_the_new_one_starts() {
        let mut cam = Camera::new();
        cam.frames(0..3, (640, 480), &[(0, PERSON)]);
        let all = cam.frames(3..6, (800, 600), &[(1, CAT)]);
        assert_eq!(
            all,
            [
                r#"Front Door/events "end" "person" seq 1"#,
                "Front Door/person 0",
                r#"Front Door/events "new" "cat" seq 2"#,
                "Front Door/cat 1",
            ]
        );
    }

    #[test]
    fn the_old_scene_ends_at_its_own_size() {
        let mut cam = Camera::new();
        cam.frames(0..3, (640, 480), &[(0, PERSON)]);
        let actions = cam.frame(0.3, (800, 600), &[]);
        let Some(Action::Send(end)) = actions.iter().find(|a| matches!(a, Action::Send(_))) else {
            panic!("no end event: {actions:?}");
        };
        let v: serde_json::Value = serde_json::from_slice(&end.payload).unwrap();
        // The person's x1 of 100 pixels, over 640 (not 800).
        assert_eq!(
            (&v["type"], &v["after"]["box_normalized"][0]),
            (&"end".into(), &0.15625.into())
        );
    }

    #[test]
    fn detections_go_out_at_most_at_the_configured_rate() {
        let mut cam = Camera::new();
        cam.rate = 2.0;
        let mut at = Vec::new();
        for i in 0..20 {
            let t = f64::from(i) * 0.1;
            let detections = cam
                .frame(t, (640, 480), &[])
                .iter()
                .filter(|a| matches!(a, Action::Send(m) if m.topic == "Front Door/detections"))
                .count();
            if detections > 0 {
                at.push(i);
            }
        }
        // Frames every 100 ms, at most two a second: every fifth frame.
        assert_eq!(at, [0, 5, 10, 15]);
        cam.rate = 0.0;
        assert!(sent(&cam.frame(2.5, (640, 480), &[])).is_empty());
    }

    #[test]
    fn a_silent_cameras_objects_end_once_unseen_for_lost_after() {
        let mut cam = Camera::new();
        cam.frames(0..3, (640, 480), &[(0, PERSON)]);
        // lost_after is 2 s after the last sighting, at 0.2 s.
        assert!(sent(&cam.idle(0.3)).is_empty(), "not silent long enough");
        assert!(sent(&cam.idle(2.1)).is_empty(), "not lost yet");
        assert_eq!(
            sent(&cam.idle(2.3)),
            [
                r#"Front Door/events "end" "person" seq 1"#,
                "Front Door/person 0"
            ]
        );
        assert!(sent(&cam.idle(5.0)).is_empty(), "ended once");
    }

    #[test]
    fn a_camera_that_ends_and_comes_back_goes_on_counting_seq() {
        let mut cam = Camera::new();
        cam.frames(0..3, (640, 480), &[(0, PERSON)]);
        assert_eq!(
            sent(&cam.end(0.5)),
            [
                r#"Front Door/events "end" "person" seq 1"#,
                "Front Door/person 0"
            ]
        );
        // Back at the same size: a new scene all the same, no second end.
        let all = cam.frames(10..13, (640, 480), &[(0, PERSON)]);
        assert_eq!(
            all,
            [
                r#"Front Door/events "new" "person" seq 2"#,
                "Front Door/person 1"
            ]
        );
    }

    #[test]
    fn events_are_printed_only_when_asked_each_before_its_message() {
        let mut cam = Camera::new();
        cam.print = true;
        let mut actions = Vec::new();
        for i in 0..3 {
            actions.extend(cam.frame(f64::from(i) * 0.1, (640, 480), &[(1, CAT)]));
        }
        let kinds: Vec<&str> = actions
            .iter()
            .map(|a| match a {
                Action::Print(line) => {
                    assert!(
                        line.contains("Front Door") && line.contains("new") && line.contains("cat"),
                        "{line}"
                    );
                    "print"
                }
                Action::Send(m) => m.topic.as_str(),
                Action::Snapshot(_) | Action::SnapshotDropped => "snapshot",
                Action::Event {
                    camera,
                    label,
                    kind,
                } => {
                    assert_eq!(
                        (camera.as_str(), label.as_str(), *kind),
                        ("Front Door", "cat", EventKind::New)
                    );
                    "count event"
                }
                Action::Objects {
                    camera,
                    label,
                    count,
                } => {
                    assert_eq!(
                        (camera.as_str(), label.as_str(), *count),
                        ("Front Door", "cat", 1)
                    );
                    "count objects"
                }
            })
            .collect();
        // The metrics hear of the event and the count beside the messages.
        assert_eq!(
            kinds,
            [
                "count event",
                "print",
                "Front Door/events",
                "Front Door/cat",
                "count objects"
            ]
        );
    }

    #[test]
    fn a_class_the_model_does_not_name_is_published_as_a_question_mark() {
        // Its count's topic level is the slug of `?`, which is empty: `_`.
        let mut cam = Camera::new();
        let all = cam.frames(0..3, (640, 480), &[(7, CAT)]);
        assert_eq!(
            all,
            [r#"Front Door/events "new" "?" seq 0"#, "Front Door/_ 1"]
        );
    }

    /// The events of `actions` as JSON.
    fn events(actions: &[Action]) -> Vec<serde_json::Value> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Send(m) if m.topic.ends_with("events") => {
                    Some(serde_json::from_slice(&m.payload).unwrap())
                }
                _ => None,
            })
            .collect()
    }

    /// Issue 19: a new object gets a snapshot, queued before the event
    /// that names it; a better score gets another into the same file; a
    /// full queue drops the picture, counted, and never the event.
    #[test]
    fn snapshots_come_with_new_objects_and_better_scores_and_never_cost_an_event_issue_19() {
        let mut cam = Camera::new();
        cam.snapshot_dir = Some(PathBuf::from("/var/lib/nanodetd/snapshots"));
        cam.room = 1;
        let mut all = Vec::new();
        for i in 0..3 {
            all.extend(cam.frame(f64::from(i) * 0.1, (640, 480), &[(0, PERSON)]));
        }
        let said = sent(&all);
        let new = &events(&all)[0];
        let id = new["event_id"].as_str().unwrap();
        // Frigate's form: the unix time it became real, a dash, 6 letters
        // or digits.
        let (time, random) = id.split_once('-').unwrap();
        assert_eq!(time, "1000.000000");
        assert!(
            random.len() == 6
                && random
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "{id}"
        );
        let path = format!("/var/lib/nanodetd/snapshots/front_door/{id}.jpg");
        assert_eq!(said[0], format!("snapshot {path}"));
        assert_eq!(said[1], r#"Front Door/events "new" "person" seq 0"#);
        assert_eq!(
            (&new["has_snapshot"], &new["snapshot"]),
            (&true.into(), &path.clone().into())
        );
        // A better score: a new picture, same file, same id.
        let better = cam.step(|p, s| {
            p.frame(
                Seen {
                    detections: &[Detection {
                        class_id: 0,
                        score: 0.95,
                        bbox: PERSON,
                    }],
                    size: (640, 480),
                    taken: Instant::now(),
                    ready: Instant::now(),
                    wall_time: 1000.3,
                    timing: FrameTiming::default(),
                },
                s,
            )
        });
        assert_eq!(sent(&better)[0], format!("snapshot {path}"));
        assert_eq!(events(&better)[0]["event_id"], id);
        // A second person while the queue is full: the event goes out
        // without a picture.
        cam.room = 0;
        let mut more = Vec::new();
        for i in 4..7 {
            more.extend(cam.frame(f64::from(i) * 0.1, (640, 480), &[(0, PERSON), (1, CAT)]));
        }
        let said = sent(&more);
        assert_eq!(said[0], "snapshot dropped");
        assert_eq!(said[1], r#"Front Door/events "new" "cat" seq 2"#);
        let cat = &events(&more)[0];
        assert_eq!(
            (&cat["has_snapshot"], &cat["snapshot"]),
            (&false.into(), &serde_json::Value::Null)
        );
        assert_ne!(cat["event_id"], id, "each object its own id");
    }

    #[test]
    fn only_tracked_labels_become_events_and_counts_issue_19() {
        let mut cam = Camera::new();
        cam.publisher
            .retune(TrackerConfig::default(), Some(BTreeSet::from([1])));
        let all = cam.frames(0..5, (640, 480), &[(0, PERSON), (1, CAT)]);
        assert_eq!(
            all,
            [r#"Front Door/events "new" "cat" seq 0"#, "Front Door/cat 1"]
        );
    }

    #[test]
    fn frigate_events_go_to_the_prefix_events_topic_with_or_without_native_ones_issue_19() {
        for (format, topics) in [
            (EventFormat::Frigate, vec!["events", "Front Door/person"]),
            (
                EventFormat::Both,
                vec!["Front Door/events", "events", "Front Door/person"],
            ),
        ] {
            let mut cam = Camera::new();
            cam.events = format;
            let mut all = Vec::new();
            for i in 0..3 {
                all.extend(cam.frame(f64::from(i) * 0.1, (640, 480), &[(0, PERSON)]));
            }
            let sent_topics: Vec<&str> = all
                .iter()
                .filter_map(|a| match a {
                    Action::Send(m) => Some(m.topic.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(sent_topics, topics);
            let frigate = events(&all)
                .into_iter()
                .find(|e| e.get("before").is_some_and(|b| b.get("camera").is_some()))
                .unwrap();
            assert_eq!(frigate["type"], "new");
            assert_eq!(frigate["after"]["camera"], "Front Door");
            assert_eq!(
                frigate["after"]["box"],
                serde_json::json!([100, 100, 200, 400])
            );
            assert_eq!(frigate["after"]["area"], 30000);
        }
    }

    #[test]
    fn zone_counts_follow_the_objects_in_each_zone_issue_19() {
        let mut cam = Camera::new();
        let tracker = TrackerConfig {
            zones: vec![crate::track::Zone {
                name: "porch".into(),
                polygon: vec![(0.0, 0.0), (640.0, 0.0), (640.0, 480.0), (0.0, 480.0)],
            }],
            ..TrackerConfig::default()
        };
        cam.publisher.retune(tracker, None);
        let all = cam.frames(0..5, (640, 480), &[(0, PERSON)]);
        assert_eq!(
            all,
            [
                r#"Front Door/events "new" "person" seq 0"#,
                "Front Door/person 1",
                "Front Door/porch/person 1",
            ]
        );
        assert_eq!(
            sent(&cam.end(1.0)),
            [
                r#"Front Door/events "end" "person" seq 1"#,
                "Front Door/person 0",
                "Front Door/porch/person 0",
            ]
        );
    }
}
