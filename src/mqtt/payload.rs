//! The JSON published on each topic (documented in docs/MQTT.md). Every
//! payload carries `schema`; consumers check it before reading fields.

use serde::Serialize;

use super::{Message, TopicClass};
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
        retain,
    }
}

/// `<camera>/events`. `seq` counts the camera's events since start, so a
/// subscriber can spot gaps and QoS 1 duplicates.
pub fn event_message(
    camera: &str,
    seq: u64,
    event: &TrackEvent,
    label: &str,
    frame_size: (usize, usize),
) -> Message {
    #[derive(Serialize)]
    struct EventJson<'a> {
        schema: u32,
        #[serde(rename = "type")]
        kind: crate::track::EventKind,
        camera: &'a str,
        boot: &'a str,
        seq: u64,
        before: Option<ObjectJson<'a>>,
        after: ObjectJson<'a>,
    }
    let value = EventJson {
        schema: SCHEMA,
        kind: event.kind,
        camera,
        boot: boot_id(),
        seq,
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

/// A class name as one topic level: class files are not checked like the
/// config, so whatever a topic level may not hold (`/`, `+`, `#`, control
/// characters, non-characters: [`topic_level_char`](crate::config::topic_level_char))
/// becomes `_`.
fn label_level(label: &str) -> String {
    let level: String = label
        .chars()
        .map(|c| {
            if crate::config::topic_level_char(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
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
        retain: true,
    }
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
/// the file on disk, and if not, why. Retained.
pub fn status_message(error: Option<&str>) -> Message {
    let value = serde_json::json!({
        "schema": SCHEMA,
        "config": if error.is_some() { "rejected" } else { "ok" },
        "error": error,
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
        let m = event_message("front", 3, &e, "person", (640, 480));
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
        assert_eq!(
            count_message("cam", "traffic light", 2).topic,
            "cam/traffic light"
        );
        assert_eq!(count_message("cam", "a/b+#", 0).topic, "cam/a_b__");
        assert_eq!(count_message("cam", "", 0).topic, "cam/_");
        assert_eq!(count_message("cam", "x", 3).payload, b"3");
        // Issue 17: non-characters, on which mosquitto drops the link.
        assert_eq!(
            count_message("cam", "cat\u{FFFF}\u{FDD0}", 1).topic,
            "cam/cat__"
        );
    }

    #[test]
    fn status_payload_says_why() {
        let m = status_message(Some("line 3: bad"));
        let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
        assert_eq!(v["config"], "rejected");
        assert_eq!(v["error"], "line 3: bad");
        assert_eq!(v["schema"], SCHEMA);
        assert!(m.retain);
    }
}
