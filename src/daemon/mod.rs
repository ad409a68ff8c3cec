//! `nanodetd run`: the long-running service, wired in one place
//! ([`serve`]). Capture and inference run on their own threads; one small
//! tokio runtime runs MQTT, signals, the config watch, the watchdog and the
//! stats timer.
//!
//! A frame travels one way: camera thread → [`board`] (newest frame per
//! camera) → detector thread ([`pipeline`]: preprocess, inference,
//! postprocess, then the camera's [`publisher`]) → [`Outbox`] → MQTT task
//! → broker.
//!
//! Decisions are made in state machines and pure functions that take
//! inputs and the time and return what to do, each unit-tested with a
//! fake clock: [`publisher`] (a camera's events, counts and detections),
//! [`plan`] (what a reload restarts or loads), [`board`] (which camera is
//! served next), and in [`crate::mqtt`] the delivery and the count sweep.
//! The threads and tasks here only carry their answers out.

pub mod availability;
pub mod board;
pub mod broker;
pub mod camera;
pub mod console;
pub mod overlap;
pub mod pipeline;
pub mod plan;
pub mod probe;
pub mod publisher;
pub mod report;
pub mod snapshot;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use sd_notify::NotifyState;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::{oneshot, watch};

use crate::config::{CameraConfig, Config, ModelConfig};
use crate::detector::{Detector, DetectorError};
use crate::metrics::server::Endpoint;
use crate::metrics::{Gathered, Metrics};
use crate::mqtt::homeassistant::{self, Discovery};
use crate::mqtt::{self, LinkStatus, MqttTask, Outbox, StatusBoard};
use crate::prepare::{self, LoadError, LoadOptions};
use crate::watchdog::{self, Heartbeats};
use board::{Control, FrameBoard};
use camera::{CameraState, CameraTask};
use pipeline::DetectorTask;
use probe::ProbeRefusal;
use report::Reporter;

/// How long shutdown may take before the rest is abandoned; systemd's
/// default stop timeout is far longer, operators' patience is not.
const SHUTDOWN: Duration = Duration::from_millis(1500);

/// Why the daemon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    /// The model cannot be made ready.
    #[error("{}", path.display())]
    Model {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: LoadError,
    },
    /// A trial load of the model crashed its child process.
    #[error("{}: trial load on {engine}", path.display())]
    TrialLoad {
        /// The model file.
        path: PathBuf,
        /// The engine the child ran.
        engine: String,
        /// What happened to the child.
        source: ProbeRefusal,
    },
    /// The thread loading the model panicked.
    #[error("{}: the model load failed", path.display())]
    LoadPanicked {
        /// The model file.
        path: PathBuf,
        /// The panic.
        source: tokio::task::JoinError,
    },
    /// The loaded model gives no session to run frames on.
    #[error("{}: no session", path.display())]
    Session {
        /// The model file.
        path: PathBuf,
        /// Why.
        source: DetectorError,
    },
    /// A thread, runtime or signal handler cannot be set up.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io_error(what: &'static str) -> impl FnOnce(std::io::Error) -> DaemonError {
    move |source| DaemonError::Io { what, source }
}

/// [`prepare::load_detector`], after a trial load of the model file in a
/// child process ([`probe`]): what could abort the daemon aborts the
/// child.
fn probe_and_load(model: &ModelConfig) -> Result<Arc<Detector>, DaemonError> {
    if let Some(exe) = probe::probe_executable() {
        let library = model.onnxruntime.library.as_deref();
        let provider = prepare::onnxruntime_options(model).provider;
        for engine in probe::engines_to_probe(model.backend, library, provider) {
            match probe::verdict(&probe::run_probe(&exe, &model.path, &engine)) {
                Ok(None) => {}
                Ok(Some(warning)) => log::warn!("{warning}"),
                Err(refusal) => {
                    return Err(DaemonError::TrialLoad {
                        path: model.path.clone(),
                        engine: engine.name(),
                        source: refusal,
                    });
                }
            }
        }
    }
    let options = LoadOptions {
        progress: Arc::new(|status: &str| {
            log::info!("{status}");
            // A first TensorRT build on a Jetson takes minutes: systemd
            // hears each step, and the start timeout is pushed out.
            notify(&[
                NotifyState::Status(status),
                NotifyState::ExtendTimeoutUsec(120_000_000),
            ]);
        }),
        ..LoadOptions::from_config(model)
    };
    prepare::load_detector(model, &options).map_err(|source| DaemonError::Model {
        path: model.path.clone(),
        source,
    })
}

/// Runs the daemon until SIGTERM or SIGINT. `config` was loaded from
/// `config_path`, which is then watched for changes.
pub fn run(config_path: &Path, config: Config) -> Result<(), DaemonError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(io_error("cannot start the async runtime"))?;
    let served = runtime.block_on(serve(config_path.to_owned(), config));
    // A model still loading on a blocking thread (an INT8 calibration or a
    // TensorRT build on a reload) is left behind: dropping the runtime
    // would wait for it, minutes past the 2 s that SIGTERM promises.
    runtime.shutdown_timeout(Duration::from_millis(100));
    served
}

/// The whole daemon, top to bottom.
async fn serve(config_path: PathBuf, config: Config) -> Result<(), DaemonError> {
    let started = Instant::now();
    let mut signals = Signals::install()?;

    // The embedded broker, where the config runs one (the demo), before
    // anything publishes.
    match config.mqtt.embedded_broker_addr() {
        Ok(Some(addr)) => {
            if let Err(e) = broker::start(addr, config.mqtt.protocol) {
                log::warn!("embedded MQTT broker: {e}");
            }
        }
        Ok(None) => {}
        // Config::check refuses this; a config that skipped it runs
        // without the broker rather than not at all.
        Err(reason) => log::error!("mqtt.embedded_broker: {reason}"),
    }

    // The figures, the outbox and the config channel come first: the
    // metrics endpoint answers probes while the model loads (/readyz 503).
    let metrics = Arc::new(Metrics::new());
    let heartbeats = Heartbeats::default();
    let outbox = Outbox::new(config.mqtt.queue.get());
    outbox.time_events(metrics.event_latency());
    let status = Arc::new(StatusBoard::new(outbox.clone()));
    let link = Arc::new(LinkStatus::default());
    let model_name = Arc::new(OnceLock::new());
    let model_config = config.model.clone();
    let (config_tx, mut config_rx) = watch::channel(Arc::new(config));
    let config = config_rx.borrow_and_update().clone();
    let stopping = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let endpoint = Endpoint {
        metrics: metrics.clone(),
        heartbeats: heartbeats.clone(),
        model: model_name.clone(),
        link: link.clone(),
        stopping: stopping.clone(),
        page: Mutex::new(None),
    };
    tokio::spawn(crate::metrics::server::run(
        Arc::new(endpoint),
        config_rx.clone(),
        status.clone(),
    ));

    // The backend. Building a model can take minutes on an edge box; tell
    // systemd so it does not time the start-up out.
    notify(&[NotifyState::ExtendTimeoutUsec(600_000_000)]);
    // On a blocking thread, so that SIGTERM during a first INT8
    // calibration or TensorRT build ends the daemon at once.
    let loading = tokio::task::spawn_blocking(move || probe_and_load(&model_config));
    let detector = tokio::select! {
        loaded = loading => loaded.map_err(|source| DaemonError::LoadPanicked {
            path: config.model.path.clone(),
            source,
        })??,
        signal = signals.next() => {
            log::info!("{signal} while the model loads: stopped");
            return Ok(());
        }
    };
    let session = detector.session().map_err(|source| DaemonError::Session {
        path: config.model.path.clone(),
        source,
    })?;
    pipeline::warn_of_unknown_labels(&config, &detector);
    log::info!(
        "model {} on {:?}: {:?} layout, {}x{} input, {} classes",
        config.model.path.display(),
        detector.engine().backend(),
        detector.layout().kind,
        detector.layout().input_width,
        detector.layout().input_height,
        detector.layout().num_classes
    );

    let board = Arc::new(FrameBoard::default());
    let snapshots = Arc::new(snapshot::SnapshotQueue::default());
    let snapshot_writer =
        snapshot::spawn_writer(snapshots.clone(), outbox.clone(), config_rx.clone())
            .map_err(io_error("cannot start the snapshot thread"))?;
    report::register_sampled(
        &metrics,
        &outbox,
        &link,
        &snapshots,
        &heartbeats,
        config_rx.clone(),
    );

    // The detector thread, then a thread per camera.
    let in_service = pipeline::ModelInService::new(config.model.clone(), &detector);
    metrics.set_model(&in_service.metric_labels());
    let _ = model_name.set(in_service.file_name());
    let in_service = Arc::new(Mutex::new(in_service));
    let models = ModelLoads {
        results: board.clone(),
        generation: pipeline::ModelGeneration::default(),
        in_service: Arc::clone(&in_service),
    };
    let detector_task = DetectorTask {
        board: board.clone(),
        config: config.clone(),
        in_service: in_service.clone(),
        outbox: outbox.clone(),
        metrics: metrics.clone(),
        heartbeat: heartbeats.register("detector"),
        snapshots: snapshots.clone(),
    };
    let detector_thread = std::thread::Builder::new()
        .name("detector".into())
        .spawn(move || detector_task.run(session))
        .map_err(io_error("cannot start the detector thread"))?;
    let mut cameras = BTreeMap::new();
    let shell = Shell {
        board: board.clone(),
        heartbeats: heartbeats.clone(),
        metrics: metrics.clone(),
    };
    for camera in &config.cameras {
        shell.start_camera(camera, &mut cameras);
    }

    // MQTT, the config watch, the watchdog.
    let (drain_tx, drain_rx) = oneshot::channel();
    let mqtt_task =
        tokio::spawn(MqttTask::new(config_rx.clone(), outbox.clone(), link.clone()).run(drain_rx));
    let reload_path = config_path.clone();
    let (reload_status, reload_metrics) = (status.clone(), metrics.clone());
    // The watcher may fail to start (inotify's instance limit) and drop its
    // sender: this one keeps the channel open, or every receiver would take
    // the closed channel for a shutdown and the daemon would stop.
    let _config_tx = config_tx.clone();
    tokio::spawn(async move {
        if let Err(e) =
            crate::reload::run(reload_path, config_tx, reload_status, reload_metrics).await
        {
            log::error!("{e}; edit-and-reload is off, restart to apply changes");
        }
    });
    tokio::spawn(watchdog::run(heartbeats.clone()));
    notify(&[NotifyState::Ready]);
    log::info!(
        "running: {} camera(s), config {}",
        cameras.len(),
        config_path.display()
    );

    // Until a signal: apply reloads, publish stats.
    let mut current = config;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_stats = Instant::now();
    let mut last_trim = Instant::now();
    let mut reporter = Reporter::new(started);
    let mut discovery = Discovery::default();
    let mut discovered_for: Option<(Arc<Config>, Vec<String>)> = None;
    let mut camera_availability = availability::CameraAvailability::default();
    loop {
        tokio::select! {
            signal = signals.next() => {
                log::info!("{signal}: shutting down");
                break;
            }
            changed = config_rx.changed() => {
                if changed.is_err() { break; }
                let new = config_rx.borrow_and_update().clone();
                board.send(Control::Config(new.clone()));
                apply(&current, &new, &shell, &mut cameras, &models, &status);
                current = new;
            }
            _ = tick.tick() => {
                if last_trim.elapsed() >= crate::allocator::TRIM_EVERY {
                    last_trim = Instant::now();
                    crate::allocator::return_free_memory();
                }
                let streaming = cameras
                    .iter()
                    .map(|(name, task)| (name.as_str(), task.counters.state() == CameraState::Streaming));
                for (name, up) in streaming.clone() {
                    metrics.set_camera_up(name, up);
                }
                for message in camera_availability.update(streaming) {
                    outbox.push(message);
                }
                announce_discovery(&current, &in_service, &mut discovered_for, &mut discovery, &outbox);
                let gathered = Gathered::from(&metrics);
                let mut snapshot = reporter.snapshot(&in_service, &cameras, &gathered);
                notify(&[NotifyState::Status(&reporter.status_line(&snapshot))]);
                if last_stats.elapsed().as_secs_f32() >= current.mqtt.stats_interval.get() {
                    last_stats = Instant::now();
                    snapshot.latency_ms = reporter.latency_window(&gathered);
                    snapshot.batches = reporter.batch_window(&gathered);
                    snapshot.memory = crate::allocator::memory_use();
                    outbox.push(mqtt::stats_message(&snapshot));
                }
            }
        }
    }

    // Drain: capture stops, the detector finishes what it has and ends
    // every object, the MQTT task delivers and says offline.
    notify(&[NotifyState::Stopping]);
    stopping.store(true, std::sync::atomic::Ordering::Relaxed);
    let deadline = Instant::now() + SHUTDOWN;
    for camera in cameras.values() {
        camera.request_stop();
    }
    board.send(Control::Stop);
    let stopping_snapshots = snapshots.clone();
    let joined = tokio::task::spawn_blocking(move || {
        for camera in cameras.values_mut() {
            camera.stop(Duration::from_millis(300));
        }
        // The detector's last events may queue pictures; the writer then
        // finishes what is queued (a few at most), within the deadline.
        for thread in [&detector_thread, &snapshot_writer] {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            stopping_snapshots.stop();
        }
        cameras
    });
    let cameras = joined.await.unwrap_or_default();
    // Final figures, so a consumer can check every event arrived.
    let gathered = Gathered::from(&metrics);
    let mut snapshot = reporter.snapshot(&in_service, &cameras, &gathered);
    snapshot.latency_ms = reporter.latency_window(&gathered);
    snapshot.batches = reporter.batch_window(&gathered);
    snapshot.memory = crate::allocator::memory_use();
    outbox.push(mqtt::stats_message(&snapshot));
    let left = deadline.saturating_duration_since(Instant::now());
    let _ = drain_tx.send(left.max(Duration::from_millis(300)));
    let _ = tokio::time::timeout(left + Duration::from_millis(500), mqtt_task).await;
    log::info!("stopped");
    Ok(())
}

/// Announces Home Assistant's discovery for the config and the model in
/// service, when either changed since the last announce.
fn announce_discovery(
    config: &Arc<Config>,
    in_service: &Mutex<pipeline::ModelInService>,
    discovered_for: &mut Option<(Arc<Config>, Vec<String>)>,
    discovery: &mut Discovery,
    outbox: &Outbox,
) {
    let model = {
        let model = in_service.lock().unwrap_or_else(PoisonError::into_inner);
        if discovered_for
            .as_ref()
            .is_some_and(|(c, labels)| Arc::ptr_eq(c, config) && *labels == model.labels)
        {
            return;
        }
        model.clone()
    };
    let name = model
        .config
        .path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let info = homeassistant::ModelInfo {
        labels: &model.labels,
        name: &name,
    };
    for message in discovery.update(homeassistant::configs(config, &info)) {
        outbox.push(message);
    }
    *discovered_for = Some((config.clone(), model.labels));
}

fn notify(state: &[NotifyState]) {
    if let Err(e) = sd_notify::notify(state) {
        log::debug!("sd_notify: {e}");
    }
}

/// What starting a camera needs.
struct Shell {
    board: Arc<FrameBoard>,
    heartbeats: Heartbeats,
    metrics: Arc<Metrics>,
}

impl Shell {
    fn start_camera(&self, camera: &CameraConfig, cameras: &mut BTreeMap<String, CameraTask>) {
        let name = camera.name.as_str();
        let heartbeat = self.heartbeats.register(&format!("camera {name}"));
        match CameraTask::spawn(
            camera.clone(),
            self.board.clone(),
            heartbeat,
            self.metrics.camera(name),
        ) {
            Ok(task) => {
                cameras.insert(name.to_owned(), task);
            }
            Err(e) => log::error!("camera {name}: cannot start its thread: {e}"),
        }
    }
}

/// Applies a new valid config: hot settings reach the detector through
/// its inbox and the MQTT task through the watch channel; here, the cold
/// parts. A changed camera restarts alone; a changed model loads in the
/// background and is swapped in when ready, so detection never pauses.
fn apply(
    old: &Config,
    new: &Arc<Config>,
    shell: &Shell,
    cameras: &mut BTreeMap<String, CameraTask>,
    models: &ModelLoads,
    status: &Arc<StatusBoard>,
) {
    crate::logging::set_level(new.log.level);
    let in_service = models.in_service();
    let plan = plan::plan(
        old,
        new,
        cameras
            .iter()
            .map(|(name, task)| (name.as_str(), &task.config)),
        &in_service,
    );
    for name in &plan.stop {
        if !new.cameras.iter().any(|c| c.name.as_str() == name) {
            shell.metrics.forget_camera(name);
        }
        if let Some(task) = cameras.remove(name) {
            log::info!("camera {name}: source changed or removed, stopping");
            // Joining may take a moment; it must not hold up MQTT.
            tokio::task::spawn_blocking(move || {
                let mut task = task;
                task.stop(Duration::from_secs(2));
            });
        }
    }
    for camera in new
        .cameras
        .iter()
        .filter(|c| plan.start.iter().any(|s| s == c.name.as_str()))
    {
        log::info!("camera {}: starting", camera.name.as_str());
        shell.start_camera(camera, cameras);
    }
    models.follow(plan.model, new, status);
}

/// Background model loads, and which of them is wanted.
struct ModelLoads {
    /// Where finished loads go: the detector thread's inbox.
    results: Arc<FrameBoard>,
    /// The load the config wants now.
    generation: pipeline::ModelGeneration,
    /// The model the detector runs.
    in_service: Arc<Mutex<pipeline::ModelInService>>,
}

impl ModelLoads {
    /// The settings of the model the detector runs.
    fn in_service(&self) -> ModelConfig {
        self.in_service
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .config
            .clone()
    }

    /// Carries out a reload plan's model step. Every step but `Keep`
    /// supersedes the loads before it, so the model that goes into service
    /// is the one the latest config names.
    fn follow(&self, step: plan::ModelStep, new: &Arc<Config>, status: &Arc<StatusBoard>) {
        let retry = match step {
            plan::ModelStep::Keep => return,
            plan::ModelStep::BackToInService => {
                self.generation.advance();
                log::info!("model settings back to the model in service: pending loads dropped");
                return;
            }
            plan::ModelStep::Load { retry } => retry,
        };
        let generation = self.generation.advance();
        log::info!(
            "model settings {}: loading in the background",
            if retry {
                "not in service yet"
            } else {
                "changed"
            }
        );
        let model = new.model.clone();
        let results = self.results.clone();
        let wanted = self.generation.clone();
        let status = status.clone();
        tokio::task::spawn_blocking(move || match probe_and_load(&model) {
            Ok(detector) => {
                results.send(Control::Model(Box::new(pipeline::LoadedModel {
                    generation,
                    wanted,
                    config: model,
                    detector,
                })));
            }
            Err(e) => {
                let why = prepare::one_line(&e);
                log::error!("{why}; keeping the running model");
                status.set_config_error(Some(&why));
            }
        });
    }
}

/// SIGTERM and SIGINT.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> Result<Signals, DaemonError> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).map_err(io_error("cannot handle SIGTERM"))?,
            int: signal(SignalKind::interrupt()).map_err(io_error("cannot handle SIGINT"))?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
