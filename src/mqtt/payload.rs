//! The JSON published on each topic (documented in docs/MQTT.md). Every
//! payload carries `schema`; consumers check it before reading fields.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Message, TopicClass, TopicRoot};
use crate::postprocess::Detection;
use crate::track::{ObjectSnapshot, TrackEvent};

/// Version of every JSON payload's layout; raised on breaking changes.
pub const SCHEMA: u32 = 1;

/// This run of the daemon: `<start time, Unix ms>-<pid>`, fixed at the
/// first call. Events carry it beside `seq` and the object ids, which
/// restart from 0 with every start: `(boot, seq)` and `(boot, id)` are
/// unique across restarts, so a consumer that drops repeated `seq`s drops
/// only redeliveries.
pub fn boot_id() -> &'static str {
    static BOOT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    BOOT.get_or_init(|| {
        let ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        format!("{ms}-{}", std::process::id())
    })
}

/// One object as events describe it.
#[derive(Serialize)]
struct ObjectJson<'a> {
    id: u64,
    label: &'a str,
    score: f32,
    median_score: f32,
    top_score: f32,
    /// `[x1, y1, x2, y2]` in pixels.
    #[serde(rename = "box")]
    bbox: [f32; 4],
    /// The same box divided by the frame size.
    box_normalized: [f32; 4],
    zones: &'a [String],
    entered_zones: &'a [String],
    stationary: bool,
    first_seen: f64,
    last_seen: f64,
    frame_time: f64,
}

fn normalized(b: &[f32; 4], (w, h): (usize, usize)) -> [f32; 4] {
    let (w, h) = (w.max(1) as f32, h.max(1) as f32);
    [b[0] / w, b[1] / h, b[2] / w, b[3] / h]
}

fn object<'a>(o: &'a ObjectSnapshot, label: &'a str, size: (usize, usize)) -> ObjectJson<'a> {
    ObjectJson {
        id: o.id,
        label,
        score: o.score,
        median_score: o.median_score,
        top_score: o.top_score,
        bbox: o.bbox,
        box_normalized: normalized(&o.bbox, size),
        zones: &o.zones,
        entered_zones: &o.entered_zones,
        stationary: o.stationary,
        first_seen: o.first_seen,
        last_seen: o.last_seen,
        frame_time: o.frame_time,
    }
}

fn json(topic: String, value: &impl Serialize, class: TopicClass, retain: bool) -> Message {
    Message {
        topic,
        // Serializing these plain structs cannot fail.
        payload: serde_json::to_vec(value).unwrap_or_default(),
        class,
        root: TopicRoot::Prefix,
        retain,
        captured: None,
    }
}

/// What an event says of its object beyond the tracker's view of it.
#[derive(Debug, Clone, Copy)]
pub struct EventContext<'a> {
    /// The camera.
    pub camera: &'a str,
    /// The object's label.
    pub label: &'a str,
    /// The size of the frame its boxes are in.
    pub frame_size: (usize, usize),
    /// Frigate-style `"<unix time>-<random>"`, fixed when the object
    /// becomes real, unique across restarts.
    pub event_id: &'a str,
    /// Its best snapshot so far, if one was taken.
    pub snapshot: Option<&'a SnapshotRef>,
}

/// An object's snapshot: where it is, and what it shows.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotRef {
    /// The file, under `snapshots.dir`.
    pub path: String,
    /// The frame's time, Unix seconds.
    pub frame_time: f64,
    /// The object's box in that frame, pixels.
    pub bbox: [f32; 4],
    /// Its score in that frame.
    pub score: f32,
}

/// `<camera>/events`. `seq` counts the camera's events since start, so a
/// subscriber can spot gaps and QoS 1 duplicates.
pub fn event_message(seq: u64, event: &TrackEvent, context: &EventContext<'_>) -> Message {
    #[derive(Serialize)]
    struct EventJson<'a> {
        schema: u32,
        #[serde(rename = "type")]
        kind: crate::track::EventKind,
        camera: &'a str,
        boot: &'a str,
        seq: u64,
        event_id: &'a str,
        has_snapshot: bool,
        snapshot: Option<&'a str>,
        before: Option<ObjectJson<'a>>,
        after: ObjectJson<'a>,
    }
    let EventContext {
        camera,
        label,
        frame_size,
        ..
    } = *context;
    let value = EventJson {
        schema: SCHEMA,
        kind: event.kind,
        camera,
        boot: boot_id(),
        seq,
        event_id: context.event_id,
        has_snapshot: context.snapshot.is_some(),
        snapshot: context.snapshot.map(|s| s.path.as_str()),
        before: event.before.as_ref().map(|b| object(b, label, frame_size)),
        after: object(&event.after, label, frame_size),
    };
    json(
        format!("{camera}/events"),
        &value,
        TopicClass::Events,
        false,
    )
}

/// `<camera>/events` in Frigate's payload, on `events` (docs/MQTT.md,
/// "Frigate-compatible events"): the fields Frigate 0.13 and 0.14 send
/// (their `TrackedObject.to_dict`), with their JSON types, filled from the
/// tracker's view of the object.
pub fn frigate_event_message(event: &TrackEvent, context: &EventContext<'_>) -> Message {
    #[derive(Serialize)]
    struct FrigateEvent<'a> {
        before: FrigateObject<'a>,
        after: FrigateObject<'a>,
        #[serde(rename = "type")]
        kind: crate::track::EventKind,
    }
    let ended = event.kind == crate::track::EventKind::End;
    let before = match &event.before {
        Some(before) => frigate_object(before, context, false),
        // Frigate's `new` carries the object's previous state, when it was
        // still a false positive; nanodetd keeps no such state, so it is
        // the object now, marked as Frigate marked it.
        None => FrigateObject {
            false_positive: true,
            has_snapshot: false,
            snapshot: None,
            ..frigate_object(&event.after, context, false)
        },
    };
    let value = FrigateEvent {
        before,
        after: frigate_object(&event.after, context, ended),
        kind: event.kind,
    };
    json("events".into(), &value, TopicClass::Events, false)
}

/// Whole pixels, as Frigate's boxes are. Boxes come clamped to the frame;
/// a NaN a hostile model slipped through becomes 0 (Rust's casts
/// saturate), and the right and bottom edges never come before the left
/// and top ones.
fn whole_box(b: &[f32; 4]) -> [i64; 4] {
    let [x1, y1, x2, y2] = b.map(|v| v.round() as i64);
    [x1, y1, x2.max(x1), y2.max(y1)]
}

fn box_area(b: &[i64; 4]) -> i64 {
    (b[2] - b[0]).saturating_mul(b[3] - b[1])
}

/// The picture Frigate's `snapshot` describes.
#[derive(Serialize)]
struct FrigateSnapshot {
    frame_time: f64,
    #[serde(rename = "box")]
    bbox: [i64; 4],
    area: i64,
    region: [i64; 4],
    score: f32,
    attributes: [(); 0],
}

/// One side of a Frigate event.
#[derive(Serialize)]
struct FrigateObject<'a> {
    id: &'a str,
    camera: &'a str,
    frame_time: f64,
    snapshot: Option<FrigateSnapshot>,
    label: &'a str,
    sub_label: Option<()>,
    top_score: f32,
    false_positive: bool,
    start_time: f64,
    end_time: Option<f64>,
    score: f32,
    #[serde(rename = "box")]
    bbox: [i64; 4],
    area: i64,
    ratio: f64,
    region: [i64; 4],
    stationary: bool,
    motionless_count: u32,
    position_changes: u32,
    current_zones: &'a [String],
    entered_zones: &'a [String],
    has_clip: bool,
    has_snapshot: bool,
    attributes: BTreeMap<String, f32>,
    current_attributes: [(); 0],
}

fn frigate_object<'a>(
    o: &'a ObjectSnapshot,
    context: &EventContext<'a>,
    ended: bool,
) -> FrigateObject<'a> {
    let bbox = whole_box(&o.bbox);
    let (w, h) = (bbox[2] - bbox[0], bbox[3] - bbox[1]);
    let (fw, fh) = context.frame_size;
    // The detector sees the whole frame: its one region.
    let region = [0, 0, fw as i64, fh as i64];
    FrigateObject {
        id: context.event_id,
        camera: context.camera,
        frame_time: o.frame_time,
        snapshot: context.snapshot.map(|s| {
            let bbox = whole_box(&s.bbox);
            FrigateSnapshot {
                frame_time: s.frame_time,
                bbox,
                area: box_area(&bbox),
                region,
                score: s.score,
                attributes: [],
            }
        }),
        label: context.label,
        sub_label: None,
        top_score: o.top_score,
        false_positive: false,
        start_time: o.first_seen,
        end_time: ended.then_some(o.last_seen),
        score: o.score,
        bbox,
        area: box_area(&bbox),
        ratio: if h > 0 { w as f64 / h as f64 } else { 0.0 },
        region,
        stationary: o.stationary,
        motionless_count: o.motionless_frames,
        position_changes: o.position_changes,
        current_zones: &o.zones,
        entered_zones: &o.entered_zones,
        has_clip: false,
        has_snapshot: context.snapshot.is_some(),
        attributes: BTreeMap::new(),
        current_attributes: [],
    }
}

/// A class name as one topic level: its slug (`traffic light` →
/// `traffic_light`), as Home Assistant's ids have it; `_` when nothing is
/// left. Class files are not checked like the config, and a slug holds
/// nothing a topic level may not.
pub fn label_level(label: &str) -> String {
    let level = crate::config::slug(label);
    if level.is_empty() { "_".into() } else { level }
}

/// `<camera>/<label>`: how many real objects of a label are in view;
/// retained, so a new subscriber sees the current count. A bare number,
/// as Frigate publishes it, for the simplest automations.
pub fn count_message(camera: &str, label: &str, count: usize) -> Message {
    Message {
        topic: format!("{camera}/{}", label_level(label)),
        payload: count.to_string().into_bytes(),
        class: TopicClass::State,
        root: TopicRoot::Prefix,
        retain: true,
        captured: None,
    }
}

/// `<camera>/<zone>/<label>`: how many real objects of a label stand in
/// the zone; retained, a bare number, as Frigate's zone counts.
pub fn zone_count_message(camera: &str, zone: &str, label: &str, count: usize) -> Message {
    Message {
        topic: format!("{camera}/{zone}/{}", label_level(label)),
        root: TopicRoot::Prefix,
        payload: count.to_string().into_bytes(),
        class: TopicClass::State,
        retain: true,
        captured: None,
    }
}

/// `<camera>/available`: `online` while the camera streams, `offline`
/// while it opens, re-opens or has finished; retained.
pub fn camera_available_message(camera: &str, online: bool) -> Message {
    Message {
        topic: format!("{camera}/available"),
        root: TopicRoot::Prefix,
        payload: if online { &b"online"[..] } else { b"offline" }.to_vec(),
        class: TopicClass::State,
        retain: true,
        captured: None,
    }
}

/// A snapshot's JPEG, retained on `<camera>/<label>/snapshot` (Frigate's
/// topic) and on `<camera>/all/snapshot` (the camera's latest, which Home
/// Assistant's image entity shows).
pub fn snapshot_messages(camera: &str, label: &str, jpeg: &[u8]) -> [Message; 2] {
    let message = |level: String| Message {
        topic: format!("{camera}/{level}/snapshot"),
        root: TopicRoot::Prefix,
        payload: jpeg.to_vec(),
        class: TopicClass::State,
        retain: true,
        captured: None,
    };
    [message(label_level(label)), message("all".into())]
}

/// Where one frame's time went before its detections were published,
/// in milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct FrameTiming {
    /// From capture until the detector took the frame.
    pub queue: f64,
    /// Resize and normalise.
    pub preprocess: f64,
    /// The backend.
    pub inference: f64,
    /// Decode, NMS, back to image coordinates.
    pub postprocess: f64,
}

/// `<camera>/detections`: one frame's raw detections, and its timing, so
/// a subscriber can tell the daemon's own latency from inference.
pub fn detections_message(
    camera: &str,
    frame_time: f64,
    frame_size: (usize, usize),
    detections: &[Detection],
    label: impl Fn(u32) -> String,
    timing: FrameTiming,
) -> Message {
    #[derive(Serialize)]
    struct DetectionJson {
        label: String,
        score: f32,
        #[serde(rename = "box")]
        bbox: [f32; 4],
        box_normalized: [f32; 4],
    }
    #[derive(Serialize)]
    struct FrameJson<'a> {
        schema: u32,
        camera: &'a str,
        frame_time: f64,
        width: usize,
        height: usize,
        timing_ms: FrameTiming,
        detections: Vec<DetectionJson>,
    }
    let value = FrameJson {
        schema: SCHEMA,
        camera,
        frame_time,
        width: frame_size.0,
        height: frame_size.1,
        timing_ms: timing,
        detections: detections
            .iter()
            .map(|d| DetectionJson {
                label: label(d.class_id),
                score: d.score,
                bbox: d.bbox,
                box_normalized: normalized(&d.bbox, frame_size),
            })
            .collect(),
    };
    json(
        format!("{camera}/detections"),
        &value,
        TopicClass::Detections,
        false,
    )
}

/// `stats`: the daemon's figures, whatever the caller gathered, with the
/// schema added.
pub fn stats_message(stats: &impl Serialize) -> Message {
    #[derive(Serialize)]
    struct StatsJson<'a, S> {
        schema: u32,
        #[serde(flatten)]
        stats: &'a S,
    }
    json(
        "stats".into(),
        &StatsJson {
            schema: SCHEMA,
            stats,
        },
        TopicClass::Stats,
        false,
    )
}

/// `status`, `available`'s sibling: whether the running configuration is
/// the file on disk, and if not, why (`error`); and whether the metrics
/// endpoint could listen where `[metrics] listen` says (`metrics_error`).
/// Retained. Built by [`super::StatusBoard`], which keeps both.
pub fn status_message(error: Option<&str>, metrics_error: Option<&str>) -> Message {
    let value = serde_json::json!({
        "schema": SCHEMA,
        "config": if error.is_some() { "rejected" } else { "ok" },
        "error": error,
        "metrics_error": metrics_error,
    });
    json("status".into(), &value, TopicClass::State, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::EventKind;

    fn snapshot() -> ObjectSnapshot {
        ObjectSnapshot {
            id: 7,
            class_id: 0,
            score: 0.8,
            median_score: 0.75,
            top_score: 0.9,
            bbox: [64.0, 48.0, 320.0, 480.0],
            zones: vec!["door".into()],
            entered_zones: Vec::new(),
            motionless_frames: 0,
            stationary: false,
            position_changes: 0,
            first_seen: 10.0,
            last_seen: 12.5,
            frame_time: 12.5,
        }
    }

    #[test]
    fn event_json_has_every_documented_field() {
        let e = TrackEvent {
            kind: EventKind::Update,
            before: Some(snapshot()),
            after: snapshot(),
        };
        let context = EventContext {
            camera: "front",
            label: "person",
            frame_size: (640, 480),
            event_id: "12.500000-abc123",
            snapshot: None,
        };
        let m = event_message(3, &e, &context);
        assert_eq!(m.topic, "front/events");
        assert!(!m.retain);
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["schema"], SCHEMA);
        assert_eq!(v["type"], "update");
        assert_eq!(v["seq"], 3);
        // Issue 17: ids and seq restart at 0; the boot tells runs apart.
        let boot = v["boot"].as_str().unwrap();
        assert_eq!(boot, boot_id());
        let (ms, pid) = boot.split_once('-').unwrap();
        assert!(ms.parse::<u64>().unwrap() > 1_700_000_000_000, "{boot}");
        assert_eq!(pid.parse::<u32>().unwrap(), std::process::id());
        let after = &v["after"];
        for key in [
            "id",
            "label",
            "score",
            "median_score",
            "top_score",
            "box",
            "box_normalized",
            "zones",
            "first_seen",
            "last_seen",
            "frame_time",
        ] {
            assert!(!after[key].is_null(), "{key} missing: {after}");
        }
        assert_eq!(after["box_normalized"][0], 0.1);
        assert_eq!(after["box_normalized"][3], 1.0);
        assert_eq!(after["label"], "person");
    }

    #[test]
    fn labels_cannot_inject_topic_levels() {
        // Issue 19: the label's slug, as Home Assistant's ids have it.
        assert_eq!(
            count_message("cam", "traffic light", 2).topic,
            "cam/traffic_light"
        );
        assert_eq!(count_message("cam", "a/b+#", 0).topic, "cam/a_b");
        assert_eq!(count_message("cam", "", 0).topic, "cam/_");
        assert_eq!(count_message("cam", "x", 3).payload, b"3");
        // Issue 17: non-characters, on which mosquitto drops the link.
        assert_eq!(
            count_message("cam", "cat\u{FFFF}\u{FDD0}", 1).topic,
            "cam/cat"
        );
        assert_eq!(
            zone_count_message("cam", "porch", "Traffic Light", 1).topic,
            "cam/porch/traffic_light"
        );
    }

    #[test]
    fn status_payload_says_why() {
        let m = status_message(Some("line 3: bad"), None);
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["config"], "rejected");
        assert_eq!(v["error"], "line 3: bad");
        assert_eq!(v["schema"], SCHEMA);
        assert!(m.retain);
    }

    /// A JSON value's type, telling integers from other numbers.
    fn kind(v: &serde_json::Value) -> &'static str {
        match v {
            serde_json::Value::Null => "null",
            serde_json::Value::Bool(_) => "bool",
            serde_json::Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
            serde_json::Value::Number(_) => "real",
            serde_json::Value::String(_) => "string",
            serde_json::Value::Array(_) => "array",
            serde_json::Value::Object(_) => "object",
        }
    }

    /// Issue 19: a Frigate consumer reads our events as Frigate's. Every
    /// field of a recorded Frigate event (tests/fixtures/frigate) is on
    /// both sides, under the same name, with the recording's JSON type
    /// (null only where Frigate's code may send null), the snapshot's
    /// fields too; nothing extra.
    #[test]
    fn frigate_events_match_a_recorded_frigate_event_field_for_field_issue_19() {
        let recorded: serde_json::Value = serde_json::from_str(include_str!(
            "../../tests/fixtures/frigate/event-0.13-before.json"
        ))
        .unwrap();
        let mut after = snapshot();
        after.zones = vec!["driveway".into()];
        after.entered_zones = vec!["yard".into(), "driveway".into()];
        let event = TrackEvent {
            kind: EventKind::Update,
            before: Some(snapshot()),
            after,
        };
        let snap = SnapshotRef {
            path: "/var/lib/nanodetd/snapshots/front/10.000000-abc123.jpg".into(),
            frame_time: 11.0,
            bbox: [60.0, 40.0, 300.0, 470.0],
            score: 0.9,
        };
        let context = EventContext {
            camera: "front",
            label: "person",
            frame_size: (640, 480),
            event_id: "10.000000-abc123",
            snapshot: Some(&snap),
        };
        let m = frigate_event_message(&event, &context);
        assert_eq!((m.topic.as_str(), m.retain), ("events", false));
        let ours: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        let fields = |v: &serde_json::Value| -> Vec<String> {
            let mut keys: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(fields(&ours), ["after", "before", "type"]);
        assert_eq!(ours["type"], "update");
        // Frigate's to_dict: what may be None.
        let nullable = ["sub_label", "end_time", "snapshot"];
        let same_kinds = |side: &str, ours: &serde_json::Value, recorded: &serde_json::Value| {
            assert_eq!(fields(ours), fields(recorded), "{side}");
            for key in fields(recorded) {
                let (got, want) = (kind(&ours[&key]), kind(&recorded[&key]));
                let null_ok = got == "null" && nullable.contains(&key.as_str());
                assert!(
                    got == want || null_ok,
                    "{side}.{key}: {got}, recorded {want}"
                );
                if let (Some(a), Some(r)) = (ours[&key].as_array(), recorded[&key].as_array())
                    && let (Some(a), Some(r)) = (a.first(), r.first())
                {
                    assert_eq!(kind(a), kind(r), "{side}.{key}[0]");
                }
            }
        };
        for side in ["before", "after"] {
            same_kinds(side, &ours[side], &recorded);
            same_kinds(side, &ours[side]["snapshot"], &recorded["snapshot"]);
        }
        let after = &ours["after"];
        assert_eq!(after["id"], "10.000000-abc123");
        assert_eq!(after["box"], serde_json::json!([64, 48, 320, 480]));
        assert_eq!(after["area"], 256 * 432);
        assert_eq!(after["region"], serde_json::json!([0, 0, 640, 480]));
        assert_eq!(
            after["entered_zones"],
            serde_json::json!(["yard", "driveway"])
        );
        assert_eq!(after["has_snapshot"], true);
        assert_eq!(
            after["snapshot"]["box"],
            serde_json::json!([60, 40, 300, 470])
        );
        assert_eq!(after["snapshot"]["frame_time"], 11.0);
        assert_eq!(after["end_time"], serde_json::Value::Null);
        // The end: end_time is the last sighting.
        let end = TrackEvent {
            kind: EventKind::End,
            ..event.clone()
        };
        let ended: serde_json::Value =
            serde_json::from_slice(&frigate_event_message(&end, &context).payload).unwrap();
        assert_eq!(ended["after"]["end_time"], 12.5);
        // New: `before` is the object as a false positive, as Frigate's is.
        let new = TrackEvent {
            kind: EventKind::New,
            before: None,
            ..event
        };
        let new: serde_json::Value =
            serde_json::from_slice(&frigate_event_message(&new, &context).payload).unwrap();
        assert_eq!(
            (&new["type"], &new["before"]["false_positive"]),
            (&"new".into(), &true.into())
        );
        assert_eq!(new["after"]["false_positive"], false);
        same_kinds("new.before", &new["before"], &recorded);
    }
}
