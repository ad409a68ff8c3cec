//! The stats topic and systemd's STATUS= line, both built from one gather
//! of the metrics registry, the same one `/metrics` serves: the topic and
//! the endpoint cannot disagree. Also the registry's families whose
//! values other parts of the daemon keep (the outbox, the broker link,
//! the snapshot queue, the heartbeats), read at each gather.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::camera::{CameraState, CameraTask};
use super::pipeline::ModelInService;
use super::snapshot::{SnapshotCounts, SnapshotQueue};
use crate::config::Config;
use crate::metrics::{
    Gathered, HistogramCounts, Metrics, Percentiles, Sample, Sampled, Stage, names, one,
};
use crate::mqtt::{LinkStatus, Outbox, OutboxSnapshot};
use crate::watchdog::Heartbeats;

/// Registers the families read from the outbox, the link, the snapshot
/// queue and the heartbeats; `config` gives `metrics.stale_after`.
pub fn register_sampled(
    metrics: &Metrics,
    outbox: &Outbox,
    link: &Arc<LinkStatus>,
    snapshots: &Arc<SnapshotQueue>,
    heartbeats: &Heartbeats,
    config: watch::Receiver<Arc<Config>>,
) {
    let by = |pairs: &[(&str, u64)]| -> Vec<Sample> {
        pairs
            .iter()
            .map(|(label, n)| (vec![(*label).to_owned()], *n as f64))
            .collect()
    };
    let (o, l) = (outbox.clone(), link.clone());
    let mqtt = Sampled::default()
        .gauge(
            names::MQTT_CONNECTED,
            "1 while connected to the broker.",
            &[],
            move || one(if l.connected() { 1.0 } else { 0.0 }),
        )
        .counter(
            names::MQTT_RECONNECTS,
            "Connections to the broker after the first.",
            &[],
            {
                let l = link.clone();
                move || one(l.reconnects() as f64)
            },
        )
        .gauge(
            names::MQTT_QUEUE,
            "Messages waiting in the outbox, those in doubt after a lost connection included.",
            &[],
            {
                let o = o.clone();
                move || one(o.snapshot().queued as f64)
            },
        )
        .counter(
            names::MQTT_DROPPED,
            "Messages dropped: the outbox was full (queue_full), or larger than mqtt.max_message_bytes (oversized).",
            &["reason"],
            {
                let o = o.clone();
                move || {
                    let s = o.snapshot();
                    by(&[("queue_full", s.dropped), ("oversized", s.oversized)])
                }
            },
        )
        .counter(
            names::MQTT_EVENT_MESSAGES,
            "Event messages queued, delivered to the broker, and dropped from a full outbox.",
            &["outcome"],
            move || {
                let s = o.snapshot();
                by(&[
                    ("queued", s.events_queued),
                    ("delivered", s.events_delivered),
                    ("dropped", s.events_dropped),
                ])
            },
        );
    metrics.register(mqtt);
    let q = snapshots.clone();
    let pictures = Sampled::default()
        .counter(
            names::SNAPSHOTS,
            "Snapshots written, dropped (queue full), failed, and written but too large to publish.",
            &["result"],
            {
                let q = q.clone();
                move || {
                    let c = q.counts();
                    by(&[
                        ("written", c.written),
                        ("dropped", c.dropped),
                        ("failed", c.failed),
                        ("too_large", c.too_large),
                    ])
                }
            },
        )
        .gauge(
            names::SNAPSHOT_QUEUE,
            "Snapshots waiting to be encoded.",
            &[],
            {
                let q = q.clone();
                move || one(q.counts().queued as f64)
            },
        )
        .gauge(
            names::SNAPSHOT_FILES,
            "Snapshot files kept.",
            &[],
            {
                let q = q.clone();
                move || one(q.counts().files as f64)
            },
        )
        .gauge(
            names::SNAPSHOT_BYTES,
            "Bytes of the snapshot files kept.",
            &[],
            move || one(q.counts().bytes as f64),
        );
    metrics.register(pictures);
    let h = heartbeats.clone();
    let beats = Sampled::default()
        .gauge(
            names::HEARTBEAT_AGE,
            "Seconds since each pipeline thread last made progress.",
            &["part"],
            move || {
                h.ages()
                    .into_iter()
                    .map(|(part, age)| (vec![part], age.as_secs_f64()))
                    .collect()
            },
        )
        .gauge(
            names::STALE,
            "Pipeline threads without progress for longer than metrics.stale_after: /healthz answers 503 while this is above 0.",
            &[],
            {
                let h = heartbeats.clone();
                move || {
                    let after = Duration::from_secs_f64(config.borrow().metrics.stale_after.get());
                    one(h.stale(after).len() as f64)
                }
            },
        );
    metrics.register(beats);
}

/// One camera in the stats.
#[derive(Debug, serde::Serialize)]
pub struct CameraStats {
    state: CameraState,
    fps: f32,
    frames: u64,
    dropped: u64,
    broken: u64,
    reopens: u64,
    lent: u64,
    error: Option<String>,
}

/// The `stats` payload.
#[derive(Debug, serde::Serialize)]
pub struct StatsSnapshot {
    uptime: f64,
    backend: crate::backend::BackendKind,
    model: String,
    /// Fallbacks and plan provenance, from the backend.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    engine_notes: Vec<String>,
    cameras: BTreeMap<String, CameraStats>,
    /// Per stage, `total` (capture to the messages queued) and `event`
    /// (capture to the broker's acknowledgement), over the frames since
    /// the previous stats message ([`Reporter::latency_window`]); filled
    /// for the stats topic only.
    pub latency_ms: BTreeMap<&'static str, Percentiles>,
    /// Runs of the model over the same window, and their mean size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batches: Option<BatchStats>,
    snapshots: SnapshotCounts,
    mqtt: MqttStats,
    /// Filled for the stats topic only: mallinfo walks malloc's free
    /// lists, too much for the once-a-second STATUS= line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub memory: Option<crate::allocator::MemoryUse>,
}

/// Runs of the model and their mean size, over a stats window.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct BatchStats {
    /// Runs.
    pub runs: u64,
    /// Frames per run, on average.
    pub mean_size: f64,
}

#[derive(Debug, serde::Serialize)]
struct MqttStats {
    connected: bool,
    reconnects: u64,
    #[serde(flatten)]
    outbox: OutboxSnapshot,
}

/// Turns counters into rates between snapshots, and histograms into the
/// percentiles of the frames since the previous stats message.
pub struct Reporter {
    started: Instant,
    last: Instant,
    processed: BTreeMap<String, u64>,
    /// The histograms as the previous stats message read them.
    reported: BTreeMap<&'static str, HistogramCounts>,
}

impl Reporter {
    /// Rates from now on; uptime from `started`.
    pub fn new(started: Instant) -> Reporter {
        Reporter {
            started,
            last: Instant::now(),
            processed: BTreeMap::new(),
            reported: BTreeMap::new(),
        }
    }

    /// The latency percentiles of the frames since the previous call (the
    /// previous stats message), or since start: per stage, `total` and
    /// `event`. `track` is `publish` under its name before issue 20, kept
    /// for consumers of schema 1.
    pub fn latency_window(&mut self, g: &Gathered) -> BTreeMap<&'static str, Percentiles> {
        let stages = Stage::ALL
            .iter()
            .map(|s| (s.name(), names::STAGE, vec![("stage", s.name())]));
        let whole = [
            ("total", names::DETECTION_LATENCY, vec![]),
            ("event", names::EVENT_LATENCY, vec![]),
        ];
        let mut window = BTreeMap::new();
        for (key, family, labels) in stages.chain(whole) {
            let Some(now) = g.histogram(family, &labels) else {
                continue;
            };
            if let Some(p) = Percentiles::of(&now.since(self.reported.get(key))) {
                window.insert(key, p);
            }
            self.reported.insert(key, now);
        }
        if let Some(publish) = window.get(Stage::Publish.name()).copied() {
            window.insert("track", publish);
        }
        window
    }

    /// The model's runs since the previous call, as
    /// [`latency_window`](Self::latency_window) counts them.
    pub fn batch_window(&mut self, g: &Gathered) -> Option<BatchStats> {
        let now = g.histogram(names::BATCH_SIZE, &[])?;
        let window = now.since(self.reported.get("batch"));
        self.reported.insert("batch", now);
        (window.count > 0).then(|| BatchStats {
            runs: window.count,
            mean_size: window.sum / window.count as f64,
        })
    }

    /// The stats as of `g`, one gather of the registry.
    pub fn snapshot(
        &mut self,
        in_service: &Mutex<ModelInService>,
        cameras: &BTreeMap<String, CameraTask>,
        g: &Gathered,
    ) -> StatsSnapshot {
        let dt = self.last.elapsed().as_secs_f32().max(1e-3);
        self.last = Instant::now();
        let mut per_camera = BTreeMap::new();
        for (name, task) in cameras {
            let camera = [("camera", name.as_str())];
            let dropped = |reason| {
                g.count(
                    names::CAMERA_DROPPED,
                    &[("camera", name.as_str()), ("reason", reason)],
                )
            };
            let frames = g.count(names::CAMERA_FRAMES, &camera);
            let replaced = dropped("replaced");
            let processed = frames.saturating_sub(replaced);
            let before = self.processed.insert(name.clone(), processed).unwrap_or(0);
            per_camera.insert(
                name.clone(),
                CameraStats {
                    state: task.counters.state(),
                    fps: processed.saturating_sub(before) as f32 / dt,
                    frames,
                    dropped: replaced,
                    broken: dropped("broken"),
                    reopens: g.count(names::CAMERA_REOPENS, &camera),
                    lent: g.count(names::CAMERA_LENT, &camera),
                    error: task.counters.last_error(),
                },
            );
        }
        self.processed.retain(|name, _| cameras.contains_key(name));
        let outcome = |o| g.count(names::MQTT_EVENT_MESSAGES, &[("outcome", o)]);
        let snapshot = |r| g.count(names::SNAPSHOTS, &[("result", r)]);
        let model = in_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        StatsSnapshot {
            uptime: self.started.elapsed().as_secs_f64(),
            backend: model.backend,
            model: model.config.path.display().to_string(),
            engine_notes: model.engine_notes,
            cameras: per_camera,
            latency_ms: BTreeMap::new(),
            batches: None,
            snapshots: SnapshotCounts {
                queued: g.count(names::SNAPSHOT_QUEUE, &[]) as usize,
                written: snapshot("written"),
                dropped: snapshot("dropped"),
                failed: snapshot("failed"),
                too_large: snapshot("too_large"),
                files: g.count(names::SNAPSHOT_FILES, &[]) as usize,
                bytes: g.count(names::SNAPSHOT_BYTES, &[]),
            },
            memory: None,
            mqtt: MqttStats {
                connected: g.value(names::MQTT_CONNECTED, &[]) == 1.0,
                reconnects: g.count(names::MQTT_RECONNECTS, &[]),
                outbox: OutboxSnapshot {
                    queued: g.count(names::MQTT_QUEUE, &[]) as usize,
                    dropped: g.count(names::MQTT_DROPPED, &[("reason", "queue_full")]),
                    events_dropped: outcome("dropped"),
                    oversized: g.count(names::MQTT_DROPPED, &[("reason", "oversized")]),
                    events_queued: outcome("queued"),
                    events_delivered: outcome("delivered"),
                },
            },
        }
    }

    /// systemd's one-line STATUS=.
    pub fn status_line(&self, s: &StatsSnapshot) -> String {
        let fps: f32 = s.cameras.values().map(|c| c.fps).sum();
        let streaming = s
            .cameras
            .values()
            .filter(|c| c.state == CameraState::Streaming)
            .count();
        let mut line = format!(
            "{streaming}/{} cameras streaming, {fps:.1} fps, backend {:?}, MQTT {}",
            s.cameras.len(),
            s.backend,
            if s.mqtt.connected {
                "connected"
            } else {
                "disconnected"
            }
        );
        if let Some(trouble) = camera_trouble(&s.cameras) {
            line.push_str("; ");
            line.push_str(&trouble);
        }
        line
    }
}

/// The first camera that is not streaming and why (a refused password, an
/// unreachable host), for `systemctl status`: the stats topic has them
/// all.
fn camera_trouble(cameras: &BTreeMap<String, CameraStats>) -> Option<String> {
    let mut failing = cameras
        .iter()
        .filter(|(_, c)| c.state != CameraState::Streaming && c.state != CameraState::Finished)
        .filter_map(|(name, c)| Some((name, c.error.as_deref()?)));
    let (name, error) = failing.next()?;
    // sd_notify's STATUS= ends at a newline.
    let error: String = error
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    let more = failing.count();
    Some(if more > 0 {
        format!("camera {name}: {error} (and {more} more cameras failing)")
    } else {
        format!("camera {name}: {error}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn camera(state: CameraState, error: Option<&str>) -> CameraStats {
        CameraStats {
            state,
            fps: 0.0,
            frames: 0,
            dropped: 0,
            broken: 0,
            reopens: 1,
            lent: 0,
            error: error.map(str::to_owned),
        }
    }

    #[test]
    fn systemds_status_names_the_first_failing_camera_and_why_issue_23() {
        let refused =
            "rtsp://cam/1: the camera refused user \"viewer\" and its password (401 Unauthorized)";
        let mut cameras = BTreeMap::new();
        cameras.insert(
            "a".into(),
            camera(CameraState::Streaming, Some("old error")),
        );
        assert_eq!(
            camera_trouble(&cameras),
            None,
            "streaming again: no trouble"
        );
        cameras.insert("door".into(), camera(CameraState::Reopening, Some(refused)));
        assert_eq!(
            camera_trouble(&cameras).as_deref(),
            Some(format!("camera door: {refused}").as_str())
        );
        cameras.insert(
            "yard".into(),
            camera(CameraState::Opening, Some("unreachable")),
        );
        cameras.insert("replay".into(), camera(CameraState::Finished, Some("done")));
        assert_eq!(
            camera_trouble(&cameras).as_deref(),
            Some(format!("camera door: {refused} (and 1 more cameras failing)").as_str())
        );
    }
}
