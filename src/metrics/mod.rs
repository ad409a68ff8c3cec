//! The daemon's one set of figures (docs/METRICS.md): a Prometheus
//! registry that the `/metrics` endpoint ([`server`]) and the JSON `stats`
//! topic both read, so the two never disagree. Counters the pipeline
//! bumps live here as Prometheus metrics; figures other parts already
//! keep (the outbox, the snapshot queue, the heartbeats) are read when the
//! registry is gathered ([`Sampled`]).
//!
//! Label values are bounded: cameras by `MAX_CAMERAS`, labels by the
//! model's classes, event types and reasons by this module.

pub mod health;
pub mod server;

use std::collections::HashMap;
use std::sync::PoisonError;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{self, MetricFamily, MetricType};
use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry,
};

/// The pipeline's stages, in frame order: the `stage` label of
/// `nanodetd_stage_duration_seconds`, and the keys of the stats topic's
/// `latency_ms`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// From capture until the detector took the frame.
    Queue,
    /// Resize and normalise.
    Preprocess,
    /// The backend.
    Inference,
    /// Decode, NMS, back to image coordinates.
    Postprocess,
    /// Tracking, snapshot decisions, and the messages into the outbox.
    Publish,
}

impl Stage {
    /// Every stage, in frame order.
    pub const ALL: [Stage; 5] = [
        Stage::Queue,
        Stage::Preprocess,
        Stage::Inference,
        Stage::Postprocess,
        Stage::Publish,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Preprocess => "preprocess",
            Stage::Inference => "inference",
            Stage::Postprocess => "postprocess",
            Stage::Publish => "publish",
        }
    }
}

/// Latency buckets, seconds: 1, 1.5, 2, 2.5, 3, 4, 5, 6, 8 per decade
/// from 0.1 ms to 10 s, then on to 5 minutes for events held through a
/// broker outage. Written out, so that each `le` label is the number as
/// written (`0.3`, not `0.30000000000000004`) and a rule can name it.
/// Neighbouring bounds are at most 1.5 times apart (2 past 10 s): a
/// quantile read from them lies within its bucket, so it is off by less
/// than that factor.
pub const LATENCY_BUCKETS: [f64; 52] = [
    0.0001, 0.00015, 0.0002, 0.00025, 0.0003, 0.0004, 0.0005, 0.0006, 0.0008, //
    0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.006, 0.008, //
    0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, //
    0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8, //
    1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, //
    10.0, 20.0, 30.0, 60.0, 120.0, 180.0, 300.0,
];

/// Batch-size buckets: every power of two to 128, and the sizes between
/// the small ones.
pub const BATCH_BUCKETS: [f64; 12] = [
    1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 64.0, 128.0,
];

fn latency_buckets() -> Vec<f64> {
    LATENCY_BUCKETS.to_vec()
}

/// Why a camera frame never reached the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// A newer frame replaced it before the detector took it.
    Replaced,
    /// It would not decode, or was short.
    Broken,
}

impl DropReason {
    fn name(self) -> &'static str {
        match self {
            DropReason::Replaced => "replaced",
            DropReason::Broken => "broken",
        }
    }
}

/// One camera's counters: handles into the registry, so a camera that
/// restarts (a reload changing its source) counts on where it stopped.
#[derive(Debug, Clone)]
pub struct CameraMetrics {
    /// Frames handed to the detector.
    pub frames: IntCounter,
    /// Frames replaced before the detector took them.
    pub replaced: IntCounter,
    /// Frames that would not decode or were short.
    pub broken: IntCounter,
    /// Times the source was lost and re-opened.
    pub reopens: IntCounter,
    /// Frames handed over as the capture buffer itself (USERPTR).
    pub lent: IntCounter,
}

/// Every metric the daemon keeps, and the registry that gathers them.
pub struct Metrics {
    registry: Registry,
    camera_frames: IntCounterVec,
    camera_dropped: IntCounterVec,
    camera_reopens: IntCounterVec,
    camera_lent: IntCounterVec,
    camera_up: IntGaugeVec,
    stages: [Histogram; 5],
    detection_latency: Histogram,
    event_latency: Histogram,
    batch_sizes: Histogram,
    objects: IntGaugeVec,
    events: IntCounterVec,
    failures: IntCounterVec,
    model_info: IntGaugeVec,
    /// The labels `model_info` carries now.
    model: std::sync::Mutex<Option<ModelLabels>>,
    reloads: IntCounterVec,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// Names every family, for [`Metrics::new`] and the docs' list.
pub mod names {
    /// Frames handed to the detector, per camera.
    pub const CAMERA_FRAMES: &str = "nanodetd_camera_frames_total";
    /// Frames lost before detection, per camera and reason.
    pub const CAMERA_DROPPED: &str = "nanodetd_camera_frames_dropped_total";
    /// Source re-opens, per camera.
    pub const CAMERA_REOPENS: &str = "nanodetd_camera_reopens_total";
    /// Frames handed over without a copy, per camera.
    pub const CAMERA_LENT: &str = "nanodetd_camera_frames_lent_total";
    /// 1 while a camera streams.
    pub const CAMERA_UP: &str = "nanodetd_camera_up";
    /// Per-stage durations.
    pub const STAGE: &str = "nanodetd_stage_duration_seconds";
    /// Capture to the messages queued.
    pub const DETECTION_LATENCY: &str = "nanodetd_detection_latency_seconds";
    /// Capture to the broker's acknowledgement of an event.
    pub const EVENT_LATENCY: &str = "nanodetd_event_latency_seconds";
    /// Frames per run of the model.
    pub const BATCH_SIZE: &str = "nanodetd_batch_size";
    /// Objects tracked now.
    pub const OBJECTS: &str = "nanodetd_objects";
    /// Tracker events.
    pub const EVENTS: &str = "nanodetd_events_total";
    /// Frames the backend failed on.
    pub const FAILURES: &str = "nanodetd_detection_failures_total";
    /// The model in service.
    pub const MODEL_INFO: &str = "nanodetd_model_info";
    /// The build.
    pub const BUILD_INFO: &str = "nanodetd_build_info";
    /// Config reloads.
    pub const RELOADS: &str = "nanodetd_reloads_total";
    /// 1 while connected to the broker.
    pub const MQTT_CONNECTED: &str = "nanodetd_mqtt_connected";
    /// Connections after the first.
    pub const MQTT_RECONNECTS: &str = "nanodetd_mqtt_reconnects_total";
    /// Messages waiting in the outbox.
    pub const MQTT_QUEUE: &str = "nanodetd_mqtt_queue_messages";
    /// Messages dropped, per reason.
    pub const MQTT_DROPPED: &str = "nanodetd_mqtt_dropped_total";
    /// Event messages queued, delivered, dropped.
    pub const MQTT_EVENT_MESSAGES: &str = "nanodetd_mqtt_event_messages_total";
    /// Snapshots, per outcome.
    pub const SNAPSHOTS: &str = "nanodetd_snapshots_total";
    /// Snapshots waiting to be encoded.
    pub const SNAPSHOT_QUEUE: &str = "nanodetd_snapshot_queue";
    /// Snapshot files kept.
    pub const SNAPSHOT_FILES: &str = "nanodetd_snapshot_files";
    /// Bytes of snapshot files kept.
    pub const SNAPSHOT_BYTES: &str = "nanodetd_snapshot_bytes";
    /// Seconds since each pipeline thread last made progress.
    pub const HEARTBEAT_AGE: &str = "nanodetd_heartbeat_age_seconds";
    /// Threads whose heartbeat is older than `metrics.stale_after`.
    pub const STALE: &str = "nanodetd_heartbeats_stale";
}

/// Registering a family whose name or labels clash with another's is a
/// bug in this module, caught by its tests: the daemon then runs without
/// that family rather than not at all.
fn register(registry: &Registry, collector: Box<dyn Collector>) {
    if let Err(e) = registry.register(collector) {
        log::error!("metrics: {e}");
    }
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    // The name and labels are this module's constants, valid by its tests.
    let family = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric name");
    register(registry, Box::new(family.clone()));
    family
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let family = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric name");
    register(registry, Box::new(family.clone()));
    family
}

fn histogram(registry: &Registry, name: &str, help: &str) -> Histogram {
    let family = Histogram::with_opts(HistogramOpts::new(name, help).buckets(latency_buckets()))
        .expect("valid metric name");
    register(registry, Box::new(family.clone()));
    family
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// The daemon's families, the process collector's, and the build.
    pub fn new() -> Metrics {
        use names::*;
        let r = Registry::new();
        let stage_vec = HistogramVec::new(
            HistogramOpts::new(STAGE, "Time a frame spends in each stage of the pipeline.")
                .buckets(latency_buckets()),
            &["stage"],
        )
        .expect("valid metric name");
        register(&r, Box::new(stage_vec.clone()));
        let stages = Stage::ALL.map(|s| stage_vec.with_label_values(&[s.name()]));
        let build = gauge_vec(
            &r,
            BUILD_INFO,
            "The nanodetd build; always 1.",
            &["version"],
        );
        build.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);
        register(
            &r,
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        );
        let metrics = Metrics {
            camera_frames: counter_vec(
                &r,
                CAMERA_FRAMES,
                "Frames a camera put in its slot for the detector, those a newer one replaced included; broken frames are not.",
                &["camera"],
            ),
            camera_dropped: counter_vec(
                &r,
                CAMERA_DROPPED,
                "Frames never detected: replaced (a newer frame took the slot while the detector was busy; counted in frames_total too) or broken (would not decode; not in frames_total).",
                &["camera", "reason"],
            ),
            camera_reopens: counter_vec(
                &r,
                CAMERA_REOPENS,
                "Times a camera's source was lost and re-opened.",
                &["camera"],
            ),
            camera_lent: counter_vec(
                &r,
                CAMERA_LENT,
                "Frames handed over as the capture buffer itself, with no copy.",
                &["camera"],
            ),
            camera_up: gauge_vec(
                &r,
                CAMERA_UP,
                "1 while the camera delivers frames; 0 while it opens, re-opens, or after a replay finished.",
                &["camera"],
            ),
            stages,
            detection_latency: histogram(
                &r,
                DETECTION_LATENCY,
                "From capture to the frame's messages queued for the broker.",
            ),
            event_latency: histogram(
                &r,
                EVENT_LATENCY,
                "From capture to the broker's acknowledgement of the event message (written, for QoS 0).",
            ),
            batch_sizes: {
                let family = Histogram::with_opts(
                    HistogramOpts::new(
                        BATCH_SIZE,
                        "Frames in each run of the model: batching.max_batch at most.",
                    )
                    .buckets(BATCH_BUCKETS.to_vec()),
                )
                .expect("valid metric name");
                register(&r, Box::new(family.clone()));
                family
            },
            objects: gauge_vec(
                &r,
                OBJECTS,
                "Objects a camera tracks now, per label.",
                &["camera", "label"],
            ),
            events: counter_vec(
                &r,
                EVENTS,
                "Tracker events: new, update, end.",
                &["camera", "label", "type"],
            ),
            failures: counter_vec(
                &r,
                FAILURES,
                "Frames the detector took but could not run through the model (logged).",
                &["camera"],
            ),
            model_info: gauge_vec(
                &r,
                MODEL_INFO,
                "The model in service; always 1.",
                &["model", "backend", "precision", "provider"],
            ),
            model: std::sync::Mutex::new(None),
            reloads: counter_vec(
                &r,
                RELOADS,
                "Config reloads: applied, unchanged, or rejected as invalid.",
                &["result"],
            ),
            registry: r,
        };
        // Every outcome from 0, so that rate() and alerts see the first.
        for result in [
            ReloadResult::Applied,
            ReloadResult::Unchanged,
            ReloadResult::Rejected,
        ] {
            metrics.reloads.with_label_values(&[result.name()]);
        }
        metrics
    }

    /// Adds figures read at each gather.
    pub fn register(&self, collector: Sampled) {
        register(&self.registry, Box::new(collector));
    }

    /// Every family, as the endpoint and the stats topic see it.
    pub fn gather(&self) -> Vec<MetricFamily> {
        self.registry.gather()
    }

    /// A camera's counters.
    pub fn camera(&self, camera: &str) -> CameraMetrics {
        let dropped = |reason: DropReason| {
            self.camera_dropped
                .with_label_values(&[camera, reason.name()])
        };
        // From 0, so rate() and alerts see the first failure.
        self.failures.with_label_values(&[camera]);
        CameraMetrics {
            frames: self.camera_frames.with_label_values(&[camera]),
            replaced: dropped(DropReason::Replaced),
            broken: dropped(DropReason::Broken),
            reopens: self.camera_reopens.with_label_values(&[camera]),
            lent: self.camera_lent.with_label_values(&[camera]),
        }
    }

    /// Whether a camera streams now. Set from the daemon's tick, which
    /// sees the camera task in service: a replaced task's thread still
    /// winding down never writes it.
    pub fn set_camera_up(&self, camera: &str, up: bool) {
        self.camera_up
            .with_label_values(&[camera])
            .set(i64::from(up));
    }

    /// A frame the detector could not run through the model.
    pub fn count_failure(&self, camera: &str) {
        self.failures.with_label_values(&[camera]).inc();
    }

    /// A camera removed from the config: its series go.
    pub fn forget_camera(&self, camera: &str) {
        let _ = self.camera_frames.remove_label_values(&[camera]);
        let _ = self.camera_reopens.remove_label_values(&[camera]);
        let _ = self.camera_lent.remove_label_values(&[camera]);
        let _ = self.camera_up.remove_label_values(&[camera]);
        let _ = self.failures.remove_label_values(&[camera]);
        for reason in [DropReason::Replaced, DropReason::Broken] {
            let _ = self
                .camera_dropped
                .remove_label_values(&[camera, reason.name()]);
        }
    }

    /// One frame's time in a stage.
    pub fn observe_stage(&self, stage: Stage, seconds: f64) {
        self.stages[stage as usize].observe(seconds);
    }

    /// One frame's time from capture to its messages queued.
    pub fn observe_detection(&self, seconds: f64) {
        self.detection_latency.observe(seconds);
    }

    /// One run of the model over `frames` frames.
    pub fn observe_batch(&self, frames: usize) {
        self.batch_sizes.observe(frames as f64);
    }

    /// The histogram of capture to acknowledgement, which the outbox
    /// feeds.
    pub fn event_latency(&self) -> Histogram {
        self.event_latency.clone()
    }

    /// The objects a camera tracks now of one label.
    pub fn set_objects(&self, camera: &str, label: &str, count: usize) {
        self.objects
            .with_label_values(&[camera, label])
            .set(i64::try_from(count).unwrap_or(i64::MAX));
    }

    /// One tracker event.
    pub fn count_event(&self, camera: &str, label: &str, kind: &str) {
        self.events.with_label_values(&[camera, label, kind]).inc();
    }

    /// The model now in service, replacing the one before: the new
    /// series first, so a gather in between never finds none.
    pub fn set_model(&self, model: &ModelLabels) {
        let values = |m: &ModelLabels| {
            [
                m.model.clone(),
                m.backend.clone(),
                m.precision.clone(),
                m.provider.clone(),
            ]
        };
        self.model_info.with_label_values(&values(model)).set(1);
        let mut current = self.model.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(old) = current.replace(model.clone())
            && old != *model
        {
            let _ = self.model_info.remove_label_values(&values(&old));
        }
    }

    /// One config reload's outcome.
    pub fn count_reload(&self, result: ReloadResult) {
        self.reloads.with_label_values(&[result.name()]).inc();
    }
}

/// `nanodetd_model_info`'s labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelLabels {
    /// The model file's name.
    pub model: String,
    /// The backend running it.
    pub backend: String,
    /// fp32, fp16 or int8, as configured.
    pub precision: String,
    /// Where it runs: cpu, cuda or tensorrt.
    pub provider: String,
}

/// What became of a config reload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReloadResult {
    /// A changed, valid config went into service.
    Applied,
    /// The file changed but its settings did not.
    Unchanged,
    /// The file is invalid; the running config stays.
    Rejected,
}

impl ReloadResult {
    fn name(self) -> &'static str {
        match self {
            ReloadResult::Applied => "applied",
            ReloadResult::Unchanged => "unchanged",
            ReloadResult::Rejected => "rejected",
        }
    }
}

/// A value read at each gather: its labels' values and the number.
pub type Sample = (Vec<String>, f64);

type Reader = Box<dyn Fn() -> Vec<Sample> + Send + Sync>;

/// Families whose values other parts of the daemon keep (the outbox's
/// counters, the heartbeats), read when the registry is gathered.
#[derive(Default)]
pub struct Sampled {
    families: Vec<(Desc, MetricType, Reader)>,
}

impl Sampled {
    /// A gauge with these labels, read by `read`.
    pub fn gauge(
        self,
        name: &str,
        help: &str,
        labels: &[&str],
        read: impl Fn() -> Vec<Sample> + Send + Sync + 'static,
    ) -> Sampled {
        self.family(name, help, labels, MetricType::GAUGE, Box::new(read))
    }

    /// A counter with these labels, read by `read`.
    pub fn counter(
        self,
        name: &str,
        help: &str,
        labels: &[&str],
        read: impl Fn() -> Vec<Sample> + Send + Sync + 'static,
    ) -> Sampled {
        self.family(name, help, labels, MetricType::COUNTER, Box::new(read))
    }

    fn family(
        mut self,
        name: &str,
        help: &str,
        labels: &[&str],
        kind: MetricType,
        read: Reader,
    ) -> Sampled {
        let labels = labels.iter().map(|l| (*l).to_owned()).collect();
        match Desc::new(name.into(), help.into(), labels, HashMap::new()) {
            Ok(desc) => self.families.push((desc, kind, read)),
            Err(e) => log::error!("metrics: {name}: {e}"),
        }
        self
    }
}

/// A single unlabelled value.
pub fn one(value: f64) -> Vec<Sample> {
    vec![(Vec::new(), value)]
}

impl Collector for Sampled {
    fn desc(&self) -> Vec<&Desc> {
        self.families.iter().map(|(d, _, _)| d).collect()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.families
            .iter()
            .map(|(desc, kind, read)| {
                let mut family = MetricFamily::default();
                family.set_name(desc.fq_name.clone());
                family.set_help(desc.help.clone());
                family.set_field_type(*kind);
                let metrics = read()
                    .into_iter()
                    .filter(|(values, _)| values.len() == desc.variable_labels.len())
                    .map(|(values, value)| {
                        let labels = desc
                            .variable_labels
                            .iter()
                            .zip(values)
                            .map(|(name, value)| {
                                let mut pair = proto::LabelPair::default();
                                pair.set_name(name.clone());
                                pair.set_value(value);
                                pair
                            })
                            .collect();
                        let mut metric = proto::Metric::from_label(labels);
                        if *kind == MetricType::COUNTER {
                            let mut c = proto::Counter::default();
                            c.set_value(value);
                            metric.set_counter(c);
                        } else {
                            let mut g = proto::Gauge::default();
                            g.set_value(value);
                            metric.set_gauge(g);
                        }
                        metric
                    })
                    .collect();
                family.set_metric(metrics);
                family
            })
            .collect()
    }
}

/// One gather, read back by name and labels: what the stats topic is
/// built from.
#[derive(Debug)]
pub struct Gathered(Vec<MetricFamily>);

impl Gathered {
    /// Gathers `metrics` now.
    pub fn from(metrics: &Metrics) -> Gathered {
        Gathered(metrics.gather())
    }

    /// The families, for the text format.
    pub fn families(&self) -> &[MetricFamily] {
        &self.0
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<(MetricType, &proto::Metric)> {
        let family = self.0.iter().find(|f| f.name() == name)?;
        let metric = family.get_metric().iter().find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|p| p.name() == *k && p.value() == *v)
            })
        })?;
        Some((family.get_field_type(), metric))
    }

    /// A counter's or gauge's value; 0 when absent.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        match self.metric(name, labels) {
            Some((MetricType::COUNTER, m)) => m.get_counter().get_value(),
            Some((MetricType::GAUGE, m)) => m.get_gauge().get_value(),
            _ => 0.0,
        }
    }

    /// A counter's value as a whole number.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        // Counters here count events one by one: whole and below 2^53.
        self.value(name, labels).max(0.0) as u64
    }

    /// A histogram's counts, when the registry has it.
    pub fn histogram(&self, name: &str, labels: &[(&str, &str)]) -> Option<HistogramCounts> {
        let h = self.metric(name, labels)?.1.get_histogram();
        Some(HistogramCounts {
            buckets: h
                .get_bucket()
                .iter()
                .map(|b| (b.upper_bound(), b.cumulative_count()))
                .collect(),
            count: h.get_sample_count(),
            sum: h.get_sample_sum(),
        })
    }
}

/// A histogram as gathered: cumulative buckets (upper bound in seconds,
/// count at or under it), the count and the sum.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct HistogramCounts {
    /// Cumulative buckets, `+Inf` left out.
    pub buckets: Vec<(f64, u64)>,
    /// Samples.
    pub count: u64,
    /// Their sum, seconds.
    pub sum: f64,
}

impl HistogramCounts {
    /// The samples since `earlier`, a gather of the same histogram: the
    /// window the stats topic reports. Without `earlier`, all of them.
    pub fn since(&self, earlier: Option<&HistogramCounts>) -> HistogramCounts {
        let Some(earlier) = earlier.filter(|e| e.buckets.len() == self.buckets.len()) else {
            return self.clone();
        };
        HistogramCounts {
            buckets: self
                .buckets
                .iter()
                .zip(&earlier.buckets)
                .map(|(&(bound, now), &(_, before))| (bound, now.saturating_sub(before)))
                .collect(),
            count: self.count.saturating_sub(earlier.count),
            sum: (self.sum - earlier.sum).max(0.0),
        }
    }
}

/// p50/p90/p99 and the mean of a histogram, milliseconds, for the stats
/// topic.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50: f32,
    /// 90th percentile.
    pub p90: f32,
    /// 99th percentile.
    pub p99: f32,
    /// The mean: exact, from the histogram's sum and count.
    pub mean: f32,
    /// Samples behind the figures.
    pub samples: u64,
}

impl Percentiles {
    /// Of `h`; `None` without samples.
    pub fn of(h: &HistogramCounts) -> Option<Percentiles> {
        (h.count > 0).then(|| {
            let ms = |q| (quantile(q, &h.buckets, h.count) * 1e3) as f32;
            Percentiles {
                p50: ms(0.5),
                p90: ms(0.9),
                p99: ms(0.99),
                mean: (h.sum / h.count as f64 * 1e3) as f32,
                samples: h.count,
            }
        })
    }
}

/// The `q` quantile of a cumulative histogram, as Prometheus'
/// `histogram_quantile` reads it: linear within the bucket holding the
/// rank, the first bucket starting at 0, and the highest finite bound for
/// a rank beyond every bucket.
pub fn quantile(q: f64, buckets: &[(f64, u64)], count: u64) -> f64 {
    let rank = q * count as f64;
    let mut lower = (0.0, 0u64);
    for &(upper, cumulative) in buckets {
        if cumulative as f64 >= rank && cumulative > lower.1 {
            let within = (rank - lower.1 as f64) / (cumulative - lower.1) as f64;
            return lower.0 + (upper - lower.0) * within.clamp(0.0, 1.0);
        }
        lower = (upper, cumulative);
    }
    lower.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_the_bucket_as_prometheus_does() {
        // 100 samples: 50 at or under 1 ms, 40 more under 2 ms, 10 under 4.
        let buckets = [(0.001, 50), (0.002, 90), (0.004, 100)];
        assert_eq!(quantile(0.5, &buckets, 100), 0.001);
        assert!((quantile(0.75, &buckets, 100) - 0.001625).abs() < 1e-12);
        assert!((quantile(0.99, &buckets, 100) - 0.0038).abs() < 1e-12);
        // A rank past every finite bucket reads as the highest bound.
        assert_eq!(quantile(0.99, &[(0.001, 50)], 100), 0.001);
        let h = HistogramCounts {
            buckets: buckets.to_vec(),
            count: 100,
            sum: 0.15,
        };
        assert_eq!(Percentiles::of(&HistogramCounts::default()), None);
        let p = Percentiles::of(&h).unwrap();
        assert_eq!((p.p50, p.mean, p.samples), (1.0, 1.5, 100));
    }

    /// The stats topic's window: what came since the previous message.
    #[test]
    fn a_window_is_the_difference_of_two_gathers() {
        let before = HistogramCounts {
            buckets: vec![(0.001, 10), (0.002, 10), (0.004, 10)],
            count: 10,
            sum: 0.005,
        };
        let now = HistogramCounts {
            buckets: vec![(0.001, 10), (0.002, 10), (0.004, 30)],
            count: 30,
            sum: 0.065,
        };
        let window = now.since(Some(&before));
        assert_eq!(window.buckets, [(0.001, 0), (0.002, 0), (0.004, 20)]);
        assert_eq!(window.count, 20);
        let p = Percentiles::of(&window).unwrap();
        assert!((p.mean - 3.0).abs() < 1e-4, "{p:?}");
        assert!(p.p50 > 2.0 && p.p99 <= 4.0, "{p:?}");
        assert_eq!(now.since(None), now);
    }

    #[test]
    fn buckets_rise_from_a_tenth_of_a_millisecond_to_five_minutes_as_written() {
        let b = LATENCY_BUCKETS;
        assert_eq!((b[0], b[51]), (1e-4, 300.0));
        let below_10 = b.iter().position(|&x| x == 10.0).unwrap();
        for (i, w) in b.windows(2).enumerate() {
            let limit = if i < below_10 { 1.5 } else { 2.0 };
            assert!(w[1] > w[0] && w[1] / w[0] <= limit + 1e-9, "{w:?}");
        }
        // Each bound is written as its shortest decimal: what `le` shows.
        for x in b {
            let shown = format!("{x}");
            assert!(shown.len() <= 7, "{shown}");
        }
    }

    /// Every family registers (no clashing name or label set), and the
    /// stats read back what was counted.
    #[test]
    fn every_family_registers_and_reads_back() {
        let m = Metrics::new();
        let cam = m.camera("front door");
        cam.frames.inc_by(3);
        cam.replaced.inc();
        m.observe_stage(Stage::Inference, 0.020);
        m.set_objects("front door", "person", 2);
        m.count_event("front door", "person", "new");
        m.count_reload(ReloadResult::Rejected);
        m.register(Sampled::default().gauge(names::MQTT_CONNECTED, "help", &[], || one(1.0)));
        let g = Gathered::from(&m);
        let front = [("camera", "front door")];
        assert_eq!(g.count(names::CAMERA_FRAMES, &front), 3);
        assert_eq!(
            g.count(
                names::CAMERA_DROPPED,
                &[("camera", "front door"), ("reason", "replaced")]
            ),
            1
        );
        assert_eq!(g.value(names::MQTT_CONNECTED, &[]), 1.0);
        assert_eq!(
            g.value(
                names::OBJECTS,
                &[("camera", "front door"), ("label", "person")]
            ),
            2.0
        );
        let p = Percentiles::of(
            &g.histogram(names::STAGE, &[("stage", "inference")])
                .unwrap(),
        )
        .unwrap();
        assert_eq!(p.samples, 1);
        assert!((16.0..=20.0).contains(&p.p50), "{p:?}");
        let names: Vec<&str> = g.families().iter().map(|f| f.name()).collect();
        for name in [
            names::BUILD_INFO,
            names::RELOADS,
            "process_resident_memory_bytes",
            "process_cpu_seconds_total",
            "process_open_fds",
        ] {
            assert!(names.contains(&name), "{name} missing from {names:?}");
        }
        m.forget_camera("front door");
        assert_eq!(Gathered::from(&m).count(names::CAMERA_FRAMES, &front), 0);
    }
}
