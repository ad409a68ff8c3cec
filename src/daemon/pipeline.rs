//! The detector task: one thread that takes frames off the board and
//! carries each down the straight line — preprocess, inference,
//! postprocess — then hands the detections to the camera's
//! [`CameraPublisher`] and carries out what it decides: lines printed,
//! messages put in the outbox. A new model arrives ready-built and is swapped
//! in between two frames; new hot settings apply at the next frame. On a
//! GPU the next batch is taken, and its frames uploaded, while the batch
//! before runs ([`Overlap`] says which runs when).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::board::{CapturedFrame, Control, FrameBoard, Work, wall_time};
use super::overlap::Overlap;
use super::publisher::{Action, CameraPublisher, Seen, Settings};
use super::snapshot::SnapshotQueue;
use crate::capture::Captured;
use crate::config::{CameraConfig, Config, ModelConfig, Tracked};
use crate::detector::{Detector, DetectorSession};
use crate::metrics::{Metrics, ModelLabels, Stage};
use crate::mqtt::{self, Outbox, TopicClass};
use crate::track::{LabelFilter, TrackerConfig, Zone};
use crate::watchdog::Heartbeat;

/// How long the detector waits for a frame or a message before doing idle
/// work (ending objects of silent cameras): as long as a camera must be
/// silent before its objects age without frames.
const IDLE: Duration = super::publisher::SILENT_AFTER;

/// The model's class id of a label, if it has one.
fn class_id(detector: &Detector, label: &str) -> Option<u32> {
    (0..detector.layout().num_classes as u32).find(|&c| detector.class_name(c) == label)
}

/// The tracker configuration for one camera from the whole config: label
/// names become the model's class ids.
pub fn tracker_config(
    config: &Config,
    camera: &CameraConfig,
    detector: &Detector,
) -> TrackerConfig {
    let filter = |f: &crate::config::FilterConfig| LabelFilter {
        min_score: f.min_score.get(),
        threshold: f.threshold.get(),
        min_area: f.min_area.get(),
        max_area: f.max_area.get(),
        min_ratio: f.min_ratio.get(),
        max_ratio: f.max_ratio.get(),
    };
    let polygon = |p: &Vec<[f32; 2]>| p.iter().map(|&[x, y]| (x, y)).collect();
    let t = &config.tracker;
    TrackerConfig {
        filters: config
            .filters
            .iter()
            .filter_map(|(label, f)| class_id(detector, label).map(|c| (c, filter(f))))
            .collect(),
        default_filter: LabelFilter {
            min_score: config.model.score.get(),
            ..LabelFilter::default()
        },
        zones: camera
            .zones
            .iter()
            .map(|(name, p)| Zone {
                name: name.as_str().to_owned(),
                polygon: polygon(p),
            })
            .collect(),
        masks: camera.masks.iter().map(polygon).collect(),
        score_history: t.history.get(),
        match_iou: t.match_iou.get(),
        lost_after: t.lost_after.get(),
        moved_iou: t.moved_iou.get(),
        score_step: t.score_step.get(),
        heartbeat: t.heartbeat.get(),
        stationary_frames: t.stationary_frames.get(),
    }
}

/// The classes a camera's `track` list names; None for `all`.
pub fn tracked_classes(camera: &CameraConfig, detector: &Detector) -> Option<BTreeSet<u32>> {
    if camera.track == Tracked::All {
        return None;
    }
    Some(
        (0..detector.layout().num_classes as u32)
            .filter(|&c| camera.track.contains(detector.class_name(c)))
            .collect(),
    )
}

/// Logs each label of `[filters]` and of the cameras' `track` lists that
/// the model does not know, when a config or a model is taken up.
pub fn warn_of_unknown_labels(config: &Config, detector: &Detector) {
    for label in unknown_labels(config, detector) {
        log::warn!("filters.{label}: the model has no class named {label:?}; ignored");
    }
    for (camera, label) in unknown_tracked(config, detector) {
        log::warn!(
            "camera {camera}: track: the model has no class named {label:?}; nothing of it is published"
        );
    }
}

/// Labels a camera's `track` list names that the model does not know:
/// `camera.name`, `label` pairs. A typo there silences the label.
fn unknown_tracked(config: &Config, detector: &Detector) -> Vec<(String, String)> {
    config
        .cameras
        .iter()
        .flat_map(|camera| {
            camera
                .track
                .listed()
                .iter()
                .filter(|label| class_id(detector, label.as_str()).is_none())
                .map(|label| (camera.name.as_str().to_owned(), label.as_str().to_owned()))
        })
        .collect()
}

/// Labels in `[filters]` that the model does not know: almost always a
/// typo, so they are reported when a config or model is taken up.
fn unknown_labels(config: &Config, detector: &Detector) -> Vec<String> {
    config
        .filters
        .keys()
        .filter(|label| class_id(detector, label).is_none())
        .cloned()
        .collect()
}

/// The model the detector runs now, for the stats.
#[derive(Debug, Clone)]
pub struct ModelInService {
    /// Its settings.
    pub config: ModelConfig,
    /// The backend running it, after `auto` and any fallback.
    pub backend: crate::backend::BackendKind,
    /// The backend's notes on it: fallbacks, where its plan came from.
    pub engine_notes: Vec<String>,
    /// Its class names.
    pub labels: Vec<String>,
    /// Where it runs: `cpu`, `cuda` or `tensorrt`.
    pub provider: &'static str,
}

impl ModelInService {
    /// `detector`, loaded from `config`.
    pub fn new(config: ModelConfig, detector: &Detector) -> ModelInService {
        let backend = detector.engine().backend();
        let provider = match backend {
            crate::backend::BackendKind::TensorRt => "tensorrt",
            _ if detector.engine().on_gpu() => "cuda",
            _ => "cpu",
        };
        ModelInService {
            config,
            backend,
            engine_notes: detector.engine().notes(),
            labels: detector.class_names().to_vec(),
            provider,
        }
    }

    /// Its file name, for `/readyz` and the metrics.
    pub fn file_name(&self) -> String {
        self.config
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// `nanodetd_model_info`'s labels.
    pub fn metric_labels(&self) -> ModelLabels {
        let lower = |v: &dyn std::fmt::Debug| format!("{v:?}").to_lowercase();
        ModelLabels {
            model: self.file_name(),
            backend: lower(&self.backend),
            precision: lower(&self.config.precision),
            provider: self.provider.to_owned(),
        }
    }
}

/// The generation of the model load the config wants now: every load the
/// daemon starts takes the next number, and a config that takes back a
/// pending change takes one too. A finished load whose number is not the
/// current one was superseded.
#[derive(Debug, Clone, Default)]
pub struct ModelGeneration(Arc<std::sync::atomic::AtomicU64>);

impl ModelGeneration {
    /// Supersedes every load started so far; returns the new number.
    pub fn advance(&self) -> u64 {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The number the config wants.
    pub fn current(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

/// A model loaded in the background.
pub struct LoadedModel {
    /// The load's number ([`ModelGeneration::advance`] at its start).
    pub generation: u64,
    /// Which generation is wanted now.
    pub wanted: ModelGeneration,
    /// Its settings.
    pub config: ModelConfig,
    /// The model.
    pub detector: Arc<Detector>,
}

impl LoadedModel {
    /// False once a later load started or the change was taken back; such
    /// a model is dropped, and logged.
    pub fn is_wanted(&self) -> bool {
        let wanted = self.generation == self.wanted.current();
        if !wanted {
            log::info!(
                "detector: {} loaded, but a later config superseded it; not put in service",
                self.config.path.display()
            );
        }
        wanted
    }
}

/// The detector thread's state.
pub struct DetectorTask {
    /// Frames and control messages in: new settings, models loaded in the
    /// background (swapped in if still wanted), stop.
    pub board: Arc<FrameBoard>,
    /// The settings at start.
    pub config: Arc<Config>,
    /// The settings of the model in service, for the stats: after a failed
    /// or pending reload they differ from the config's.
    pub in_service: Arc<Mutex<ModelInService>>,
    /// Messages out.
    pub outbox: Outbox,
    /// Stage timings, events and object counts.
    pub metrics: Arc<Metrics>,
    /// Liveness for the watchdog.
    pub heartbeat: Heartbeat,
    /// Snapshots to encode, off this thread.
    pub snapshots: Arc<SnapshotQueue>,
}

impl DetectorTask {
    /// Runs until told to stop, starting with `session`.
    pub fn run(self, mut session: DetectorSession) {
        let mut config = self.config.clone();
        let mut cameras: BTreeMap<String, CameraPublisher> = BTreeMap::new();
        // A GPU session converts camera buffers in its kernel: cameras
        // skip their own conversion.
        self.board.set_raw_wanted(session.on_gpu());
        let mut stopping = false;
        let mut said_batch: (usize, Option<String>) = (1, None);
        // On a GPU, the batch taken while the one before still waits to
        // run: its uploads are queued, and overlap that run.
        let mut overlap: Overlap<TakenBatch> = Overlap::default();
        loop {
            self.heartbeat.touch();
            if stopping && !self.board.has_work() {
                break;
            }
            let (batch, why) = batch_size(
                config.batching.max_batch.get(),
                session.on_gpu(),
                session.max_batch(),
            );
            if (batch, &why) != (said_batch.0, &said_batch.1) {
                if let Some(why) = &why {
                    log::info!("batching: {batch} frame(s) a run: {why}");
                } else if batch > 1 {
                    log::info!("batching: up to {batch} frames a run");
                }
                said_batch = (batch, why);
            }
            let wait = Duration::from_secs_f64(config.batching.wait.get());
            // A batch waiting runs as soon as no batch is due behind it:
            // its frames are not held back for the next.
            let work = self.board.next_batch(
                batch,
                if stopping { Duration::ZERO } else { wait },
                if stopping {
                    Duration::ZERO
                } else {
                    overlap.timeout(IDLE)
                },
            );
            if let Some(Work::Frames(frames)) = work {
                let overlapping = session.on_gpu();
                let first = overlap.first_upload_slot(overlapping);
                let taken = self.take_batch(frames, first, &mut session);
                // The batch before runs while this one's frames go up.
                for run in overlap.taken(taken, overlapping) {
                    self.run_batch(run, &config, &mut session, &mut cameras);
                }
                continue;
            }
            // Anything else comes after the frames taken before it.
            if let Some(before) = overlap.before_other_work() {
                self.run_batch(before, &config, &mut session, &mut cameras);
                if work.is_none() {
                    continue;
                }
            }
            match work {
                Some(Work::Control(Control::Config(new))) => {
                    config = new;
                    self.retune(&config, &session, &mut cameras);
                }
                // A load that a later config superseded (a slow INT8 build
                // finishing after a quick one) never goes into service.
                Some(Work::Control(Control::Model(loaded))) if loaded.is_wanted() => {
                    let LoadedModel {
                        config: model,
                        detector,
                        ..
                    } = *loaded;
                    match detector.session() {
                        Ok(s) => {
                            log::info!("detector: new model in service: {}", model.path.display());
                            let in_service = ModelInService::new(model, &detector);
                            self.metrics.set_model(&in_service.metric_labels());
                            *self
                                .in_service
                                .lock()
                                .unwrap_or_else(PoisonError::into_inner) = in_service;
                            session = s;
                            self.board.set_raw_wanted(session.on_gpu());
                            self.retune(&config, &session, &mut cameras);
                        }
                        Err(e) => log::error!(
                            "detector: new model unusable, keeping the old: {}",
                            crate::errors::one_line(&e)
                        ),
                    }
                }
                Some(Work::Control(Control::Model(_))) => {}
                // Finish the frames waiting, then end every object.
                Some(Work::Control(Control::Stop)) => stopping = true,
                Some(Work::Frames(_)) => {} // taken above
                Some(Work::Ended(name)) => {
                    // The entry stays: ids and `seq` go on counting when the
                    // camera comes back, so consumers never see them reused.
                    if let Some(cam) = cameras.get_mut(&name) {
                        let settings = settings(&config, session.detector(), 0);
                        self.carry_out(cam.end(wall_time(), &settings), None);
                    }
                }
                None => self.handle_idle(&config, &session, &mut cameras),
            }
        }
        if let Some(before) = overlap.before_other_work() {
            self.run_batch(before, &config, &mut session, &mut cameras);
        }
        let now = wall_time();
        let settings = settings(&config, session.detector(), 0);
        for cam in cameras.values_mut() {
            self.carry_out(cam.end(now, &settings), None);
        }
        self.snapshots.stop();
    }

    /// New settings or a new model: every tracker gets its new config.
    fn retune(
        &self,
        config: &Config,
        session: &DetectorSession,
        cameras: &mut BTreeMap<String, CameraPublisher>,
    ) {
        warn_of_unknown_labels(config, session.detector());
        for camera in &config.cameras {
            if let Some(cam) = cameras.get_mut(camera.name.as_str()) {
                let detector = session.detector();
                cam.retune(
                    tracker_config(config, camera, detector),
                    tracked_classes(camera, detector),
                );
            }
        }
    }

    /// Frames just taken from the board. With `ahead` (the first of the
    /// upload slots this batch may use), each lent camera buffer's upload
    /// to the GPU is queued now, to overlap the run before; everything
    /// else about the batch waits for [`run_batch`](Self::run_batch).
    fn take_batch(
        &self,
        frames: Vec<CapturedFrame>,
        ahead: Option<usize>,
        session: &mut DetectorSession,
    ) -> TakenBatch {
        let mut uploaded = 0;
        let frames = frames
            .into_iter()
            .map(|captured| {
                let Some(first) = ahead else {
                    return (captured, None);
                };
                let Captured::Raw {
                    layout,
                    bytes,
                    origin,
                } = &captured.image
                else {
                    return (captured, None);
                };
                let slot = first + uploaded;
                match session.upload_ahead(slot, *layout, bytes, origin) {
                    Ok(true) => {
                        uploaded += 1;
                        (captured, Some(slot))
                    }
                    Ok(false) => (captured, None),
                    // The run preprocesses it the usual way, and fails it
                    // there if that fails too.
                    Err(e) => {
                        // Once as a warning: every batch may go the slower
                        // way after it (a device out of memory).
                        static WARNED: std::sync::atomic::AtomicBool =
                            std::sync::atomic::AtomicBool::new(false);
                        let level = if WARNED.swap(true, Ordering::Relaxed) {
                            log::Level::Debug
                        } else {
                            log::Level::Warn
                        };
                        log::log!(
                            level,
                            "camera {}: an upload ahead of the run failed, so the frame uploads in its run: {}",
                            captured.camera,
                            crate::errors::one_line(&e)
                        );
                        (captured, None)
                    }
                }
            })
            .collect();
        TakenBatch { frames }
    }

    /// Frames of different cameras, in one run of the model: each is
    /// preprocessed into its slot, the batch runs once, and each slot's
    /// detections go to its camera's publisher. A batch of one is the
    /// plain path. A frame that fails to preprocess is counted and left
    /// out; a failed run fails every frame of the batch.
    fn run_batch(
        &self,
        batch: TakenBatch,
        config: &Arc<Config>,
        session: &mut DetectorSession,
        cameras: &mut BTreeMap<String, CameraPublisher>,
    ) {
        let TakenBatch { frames } = batch;
        // Queue time runs to here, the wait behind the batch before
        // included, so the stages add up to capture → detections.
        let taken = Instant::now();
        // (frame, its camera's config, the way back, preprocess seconds)
        let mut slots = Vec::with_capacity(frames.len());
        // Frames left out are kept to the end too: an upload of a lent
        // buffer may have been queued for them.
        let mut failed = Vec::new();
        for (captured, uploaded) in frames {
            let Some(camera) = config
                .cameras
                .iter()
                .find(|c| c.name.as_str() == captured.camera)
            else {
                // Removed by a reload while its last frame waited.
                failed.push(captured);
                continue;
            };
            let slot = slots.len();
            let started = Instant::now();
            let preprocessed = match (&captured.image, uploaded) {
                (_, Some(ahead)) => session.preprocess_uploaded_into(ahead, slot),
                (Captured::Frame(frame), None) => session.preprocess_into(slot, frame),
                (
                    Captured::Raw {
                        layout,
                        bytes,
                        origin,
                    },
                    None,
                ) => session.preprocess_raw_into(slot, *layout, bytes, origin),
            };
            match preprocessed {
                Ok(transform) => {
                    let seconds = started.elapsed().as_secs_f64();
                    slots.push((captured, camera, transform, seconds));
                }
                Err(e) => {
                    self.failed(&captured.camera, &e);
                    failed.push(captured);
                }
            }
        }
        // Uploads queued for the frames left out end before their lent
        // buffers go back to the cameras: a run waits for its own frames'
        // uploads only.
        let wait_for_uploads = |session: &DetectorSession| {
            if !failed.is_empty()
                && let Err(e) = session.wait_for_uploads()
            {
                log::warn!("detector: {}", crate::errors::one_line(&e));
            }
        };
        if slots.is_empty() {
            wait_for_uploads(session);
            return;
        }
        let preprocessed = Instant::now();
        if let Err(e) = session.infer_batch(slots.len()) {
            for (captured, ..) in &slots {
                self.failed(&captured.camera, &e);
            }
            wait_for_uploads(session);
            return;
        }
        let inferred = Instant::now();
        self.metrics.observe_batch(slots.len());
        let secs = |a: Instant, b: Instant| b.duration_since(a).as_secs_f64();
        for (slot, (captured, camera, transform, preprocess)) in slots.iter().enumerate() {
            let started = Instant::now();
            let detections = match session.postprocess_slot(slot, transform) {
                Ok(d) => d,
                Err(e) => {
                    self.failed(&captured.camera, &e);
                    continue;
                }
            };
            let postprocessed = Instant::now();
            let detector = session.detector();
            let cam = cameras.entry(captured.camera.clone()).or_insert_with(|| {
                let tracker = tracker_config(config, camera, detector);
                let tracked = tracked_classes(camera, detector);
                CameraPublisher::new(
                    &captured.camera,
                    tracker,
                    tracked,
                    taken,
                    fastrand::Rng::new(),
                )
            });
            // Each frame carries its own preprocessing and decoding, and
            // the run it shared with the batch.
            let timing = mqtt::FrameTiming {
                queue: secs(captured.captured, taken) * 1e3,
                preprocess: preprocess * 1e3,
                inference: secs(preprocessed, inferred) * 1e3,
                postprocess: secs(started, postprocessed) * 1e3,
            };
            let seen = Seen {
                detections: &detections,
                size: captured.image.size(),
                taken,
                ready: postprocessed,
                wall_time: captured.wall_time,
                timing,
            };
            let room = self.snapshots.room(&config.snapshots);
            let actions = cam.frame(seen, &settings(config, detector, room));
            self.carry_out(actions, Some((captured, config)));
            let done = Instant::now();
            let m = &self.metrics;
            m.observe_stage(Stage::Queue, timing.queue / 1e3);
            m.observe_stage(Stage::Preprocess, timing.preprocess / 1e3);
            m.observe_stage(Stage::Inference, timing.inference / 1e3);
            m.observe_stage(Stage::Postprocess, timing.postprocess / 1e3);
            m.observe_stage(Stage::Publish, secs(postprocessed, done));
            m.observe_detection(secs(captured.captured, done));
        }
        wait_for_uploads(session);
        drop(failed);
    }

    /// A frame the model could not run on: counted and logged.
    fn failed(&self, camera: &str, error: &crate::detector::DetectorError) {
        self.metrics.count_failure(camera);
        log::error!(
            "camera {camera}: detection failed: {}",
            crate::errors::one_line(error)
        );
    }

    /// With no frames coming, a camera's objects still have to end once
    /// unseen for `lost_after`.
    fn handle_idle(
        &self,
        config: &Config,
        session: &DetectorSession,
        cameras: &mut BTreeMap<String, CameraPublisher>,
    ) {
        let (now, wall) = (Instant::now(), wall_time());
        let settings = settings(config, session.detector(), 0);
        for cam in cameras.values_mut() {
            self.carry_out(cam.idle(now, wall, &settings), None);
        }
    }

    /// What a camera's publisher decided; `frame` is the frame just
    /// processed and its settings, for snapshots and event timing.
    fn carry_out(&self, actions: Vec<Action>, frame: Option<(&CapturedFrame, &Arc<Config>)>) {
        for action in actions {
            match action {
                Action::Print(line) => super::console::print(&line),
                Action::Send(mut message) => {
                    if message.class == TopicClass::Events {
                        message.captured = frame.map(|(f, _)| f.captured);
                    }
                    self.outbox.push(message);
                }
                Action::Snapshot(job) => match frame {
                    Some((f, config)) => self.snapshots.push(job, &f.image, config.clone()),
                    None => self.snapshots.count_dropped(),
                },
                Action::SnapshotDropped => self.snapshots.count_dropped(),
                Action::Event {
                    camera,
                    label,
                    kind,
                } => self.metrics.count_event(&camera, &label, kind_name(kind)),
                Action::Objects {
                    camera,
                    label,
                    count,
                } => self.metrics.set_objects(&camera, &label, count),
            }
        }
    }
}

/// A batch taken from the board, not yet run.
struct TakenBatch {
    /// Its frames, each with the upload slot its upload went into ahead of
    /// the run, if it did.
    frames: Vec<(CapturedFrame, Option<usize>)>,
}

/// How many frames the detector takes a run for `wanted`
/// (`batching.max_batch`), and why fewer, if fewer. Only a GPU session
/// batches: a host backend runs a batch image by image, so a batch there
/// would only add the wait. A GPU session takes what it was built for.
pub fn batch_size(wanted: usize, on_gpu: bool, session_max: usize) -> (usize, Option<String>) {
    if wanted <= 1 {
        return (1, None);
    }
    if !on_gpu {
        return (
            1,
            Some("the model runs on the CPU, where a batch would run image by image".into()),
        );
    }
    if session_max < wanted {
        let max = session_max.max(1);
        return (
            max,
            Some(format!(
                "the GPU session takes {max} (model.tensorrt.max_batch or model.onnxruntime.max_batch; 1 for an export that cannot batch)"
            )),
        );
    }
    (wanted, None)
}

/// `nanodetd_events_total`'s `type`, as events name it.
fn kind_name(kind: crate::track::EventKind) -> &'static str {
    match kind {
        crate::track::EventKind::New => "new",
        crate::track::EventKind::Update => "update",
        crate::track::EventKind::End => "end",
    }
}

/// What the publishers read from the config and the model in service;
/// `snapshot_room` is what the snapshot queue takes now.
fn settings<'a>(config: &'a Config, detector: &'a Detector, snapshot_room: usize) -> Settings<'a> {
    let snapshots = &config.snapshots;
    Settings {
        labels: detector.class_names(),
        detections_rate: config.mqtt.detections_rate.get(),
        print_events: config.log.events.enabled(),
        events: config.mqtt.events,
        snapshot_dir: snapshots.enabled.then_some(snapshots.dir.as_path()),
        snapshot_room,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 21: only a GPU session batches, at most what it takes; each
    /// shortfall says why.
    #[test]
    fn batches_run_on_a_gpu_session_up_to_what_it_takes_issue_21() {
        assert_eq!(batch_size(1, true, 64), (1, None));
        assert_eq!(batch_size(32, true, 64), (32, None));
        let (n, why) = batch_size(32, false, 128);
        assert_eq!(n, 1);
        assert!(why.unwrap().contains("CPU"));
        let (n, why) = batch_size(32, true, 8);
        assert_eq!(n, 8);
        assert!(why.unwrap().contains("takes 8"));
        assert_eq!(batch_size(32, true, 0).0, 1);
    }
}
