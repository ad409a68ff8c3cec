//! One camera's publishing decisions, as a state machine: a frame's
//! detections and the time in, the messages its consumers see out.
//!
//! It owns the camera's tracker, the counts last published, the `seq` of
//! the next event, the frame size (a new one is a new scene) and the
//! detections rate limit. It has no thread, no broker and no clock of its
//! own: the detector task ([`super::pipeline`]) feeds it and carries out
//! its [`Action`]s, and the tests drive it with a fake clock.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use crate::mqtt::{self, FrameTiming, Message};
use crate::postprocess::Detection;
use crate::track::{TrackEvent, Tracker, TrackerConfig};

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

/// One camera's publishing state.
pub struct CameraPublisher {
    camera: String,
    tracker: Tracker,
    /// Counts as last published, per class.
    counts: BTreeMap<u32, usize>,
    /// The `seq` of the next event. It goes on counting when the camera
    /// comes back, so consumers never see one reused.
    next_seq: u64,
    /// (0, 0) until a frame comes, and after the camera ended.
    frame_size: (usize, usize),
    last_frame: Instant,
    last_detections: Option<Instant>,
}

impl CameraPublisher {
    /// A camera's first frame arrives at `now`.
    pub fn new(camera: &str, tracker: TrackerConfig, now: Instant) -> CameraPublisher {
        CameraPublisher {
            camera: camera.to_owned(),
            tracker: Tracker::new(tracker),
            counts: BTreeMap::new(),
            next_seq: 0,
            frame_size: (0, 0),
            last_frame: now,
            last_detections: None,
        }
    }

    /// New tracker settings (a reload, or a new model's classes).
    pub fn retune(&mut self, tracker: TrackerConfig) {
        self.tracker.set_config(tracker);
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
            self.publish(events, settings, &mut actions);
        }
        self.frame_size = seen.size;
        self.last_frame = seen.taken;
        let events = self.tracker.update(seen.detections, seen.wall_time);
        self.publish(events, settings, &mut actions);
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
            self.publish(events, settings, &mut actions);
        }
        actions
    }

    /// The camera ended (a replay finished, the daemon stops): every
    /// object ends, and its next frame starts a new scene.
    pub fn end(&mut self, wall_time: f64, settings: &Settings<'_>) -> Vec<Action> {
        let mut actions = Vec::new();
        let events = self.tracker.end_all(wall_time);
        self.publish(events, settings, &mut actions);
        self.frame_size = (0, 0);
        actions
    }

    /// Events, then any count that changed.
    fn publish(&mut self, events: Vec<TrackEvent>, settings: &Settings<'_>, out: &mut Vec<Action>) {
        for event in &events {
            let label = settings.label(event.after.class_id);
            if settings.print_events {
                out.push(Action::Print(super::console::event_line(
                    &self.camera,
                    event,
                    label,
                )));
            }
            out.push(Action::Send(mqtt::event_message(
                &self.camera,
                self.next_seq,
                event,
                label,
                self.frame_size,
            )));
            self.next_seq += 1;
        }
        let counts = self.tracker.counts();
        let classes: Vec<u32> = counts.keys().chain(self.counts.keys()).copied().collect();
        for class in classes {
            let now = counts.get(&class).copied().unwrap_or(0);
            if self.counts.get(&class) != Some(&now) {
                self.counts.insert(class, now);
                out.push(Action::Send(mqtt::count_message(
                    &self.camera,
                    settings.label(class),
                    now,
                )));
            }
        }
    }
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
    }

    impl Camera {
        fn new() -> Camera {
            let start = Instant::now();
            Camera {
                start,
                publisher: CameraPublisher::new("door", TrackerConfig::default(), start),
                labels: labels(),
                rate: 0.0,
                print: false,
            }
        }

        /// One step of the publisher, under the camera's settings.
        fn step<R>(&mut self, step: impl FnOnce(&mut CameraPublisher, &Settings<'_>) -> R) -> R {
            let settings = Settings {
                labels: &self.labels,
                detections_rate: self.rate,
                print_events: self.print,
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
                Action::Print(_) => None,
            })
            .collect()
    }

    #[test]
    fn an_object_seen_in_a_row_is_announced_once_with_its_count() {
        let mut cam = Camera::new();
        let all = cam.frames(0..5, (640, 480), &[(0, PERSON)]);
        assert_eq!(
            all,
            [r#"door/events "new" "person" seq 0"#, "door/person 1"]
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
                r#"door/events "end" "person" seq 1"#,
                "door/person 0",
                r#"door/events "new" "cat" seq 2"#,
                "door/cat 1",
            ]
        );
    }

    #[test]
    fn the_old_scene_ends_at_its_own_size() {
        let mut cam = Camera::new();
        cam.frames(0..3, (640, 480), &[(0, PERSON)]);
        let actions = cam.frame(0.3, (800, 600), &[]);
        let Some(Action::Send(end)) = actions.first() else {
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
                .filter(|a| matches!(a, Action::Send(m) if m.topic == "door/detections"))
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
            [r#"door/events "end" "person" seq 1"#, "door/person 0"]
        );
        assert!(sent(&cam.idle(5.0)).is_empty(), "ended once");
    }

    #[test]
    fn a_camera_that_ends_and_comes_back_goes_on_counting_seq() {
        let mut cam = Camera::new();
        cam.frames(0..3, (640, 480), &[(0, PERSON)]);
        assert_eq!(
            sent(&cam.end(0.5)),
            [r#"door/events "end" "person" seq 1"#, "door/person 0"]
        );
        // Back at the same size: a new scene all the same, no second end.
        let all = cam.frames(10..13, (640, 480), &[(0, PERSON)]);
        assert_eq!(
            all,
            [r#"door/events "new" "person" seq 2"#, "door/person 1"]
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
                        line.contains("door") && line.contains("new") && line.contains("cat"),
                        "{line}"
                    );
                    "print"
                }
                Action::Send(m) => m.topic.as_str(),
            })
            .collect();
        assert_eq!(kinds, ["print", "door/events", "door/cat"]);
    }

    #[test]
    fn a_class_the_model_does_not_name_is_published_as_a_question_mark() {
        // `?` is a valid topic level: only `+`, `#` and `/` are not.
        let mut cam = Camera::new();
        let all = cam.frames(0..3, (640, 480), &[(7, CAT)]);
        assert_eq!(all, [r#"door/events "new" "?" seq 0"#, "door/? 1"]);
    }
}
