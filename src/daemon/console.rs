//! Events as one readable line each on standard output (`[log] events`),
//! for someone watching the daemon in a terminal. The MQTT event is the
//! record; this is a view of it.

use std::io::Write;

use crate::track::{EventKind, TrackEvent};

/// One event as a line, e.g.
/// `18:20:03Z samples new    person #3 score 0.82 (top 0.82) box [12, 40, 300, 480]`.
/// The time is the frame's, UTC, to the second.
pub fn event_line(camera: &str, event: &TrackEvent, label: &str) -> String {
    let object = &event.after;
    let kind = match event.kind {
        EventKind::New => "new",
        EventKind::Update => "update",
        EventKind::End => "end",
    };
    let [x1, y1, x2, y2] = object.bbox;
    let mut line = format!(
        "{} {camera} {kind:<6} {label} #{} score {:.2} (top {:.2}) box [{x1:.0}, {y1:.0}, {x2:.0}, {y2:.0}]",
        time_of_day(object.frame_time),
        object.id,
        object.score,
        object.top_score,
    );
    if !object.zones.is_empty() {
        line += &format!(" zones {}", object.zones.join(","));
    }
    if event.kind == EventKind::End {
        line += &format!(" seen {:.1} s", object.last_seen - object.first_seen);
    }
    line
}

/// `HH:MM:SSZ` of a Unix time in seconds.
fn time_of_day(unix_seconds: f64) -> String {
    let seconds = if unix_seconds.is_finite() && unix_seconds >= 0.0 {
        // Truncation is the point: the second the frame fell in.
        (unix_seconds as u64) % 86_400
    } else {
        0
    };
    format!(
        "{:02}:{:02}:{:02}Z",
        seconds / 3600,
        seconds / 60 % 60,
        seconds % 60
    )
}

/// Prints `line` on standard output. A closed or full pipe loses the line,
/// never the daemon (`println!` would panic, and a panic aborts).
pub fn print(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::track::ObjectSnapshot;

    fn object() -> ObjectSnapshot {
        ObjectSnapshot {
            id: 3,
            class_id: 0,
            score: 0.8249,
            median_score: 0.8,
            top_score: 0.91,
            bbox: [12.4, 40.0, 300.0, 480.6],
            zones: vec![],
            entered_zones: Vec::new(),
            motionless_frames: 0,
            stationary: false,
            position_changes: 0,
            first_seen: 1_764_872_400.0,
            last_seen: 1_764_872_403.5,
            frame_time: 1_764_872_403.9,
        }
    }

    #[test]
    fn each_kind_reads_as_one_line_with_camera_label_id_and_score() {
        let new = TrackEvent {
            kind: EventKind::New,
            before: None,
            after: object(),
        };
        assert_eq!(
            event_line("samples", &new, "person"),
            "18:20:03Z samples new    person #3 score 0.82 (top 0.91) box [12, 40, 300, 481]"
        );
        let mut zoned = object();
        zoned.zones = vec!["door".into(), "path".into()];
        let end = TrackEvent {
            kind: EventKind::End,
            before: Some(object()),
            after: zoned,
        };
        assert_eq!(
            event_line("front", &end, "cat"),
            "18:20:03Z front end    cat #3 score 0.82 (top 0.91) box [12, 40, 300, 481] zones door,path seen 3.5 s"
        );
    }

    #[test]
    fn a_time_before_1970_or_not_a_number_prints_midnight() {
        assert_eq!(time_of_day(f64::NAN), "00:00:00Z");
        assert_eq!(time_of_day(-5.0), "00:00:00Z");
        assert_eq!(time_of_day(86_399.9), "23:59:59Z");
    }
}
