//! The camera task: one thread per camera that opens its source, paces
//! it, hands frames to the [`FrameBoard`], counts bad frames, and re-opens
//! a lost source with capped exponential back-off. Nothing here can stop
//! another camera or the detector.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::board::{CapturedFrame, FrameBoard, wall_time};
use crate::capture::Captured;
use crate::capture::{Miss, Source};
use crate::config::CameraConfig;
use crate::metrics::CameraMetrics;
use crate::watchdog::Heartbeat;

const BACKOFF_FIRST: Duration = Duration::from_millis(500);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// Sleeps are cut into slices this long, so stop requests and heartbeats
/// are never late by more.
const SLICE: Duration = Duration::from_millis(100);

/// What a camera is doing, for the stats topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CameraState {
    /// Opening the source.
    Opening,
    /// Delivering frames.
    Streaming,
    /// Lost; waiting to re-open.
    Reopening,
    /// A replay that has played every file.
    Finished,
}

/// A camera's state and counters, shared with the stats. The counters
/// are the registry's ([`CameraMetrics`]): the stats topic reads them
/// back from it.
#[derive(Debug)]
pub struct CameraCounters {
    /// Frames, drops, re-opens.
    pub metrics: CameraMetrics,
    state: AtomicU8,
    last_error: std::sync::Mutex<Option<String>>,
}

impl CameraCounters {
    /// The current state.
    pub fn state(&self) -> CameraState {
        match self.state.load(Ordering::Relaxed) {
            1 => CameraState::Streaming,
            2 => CameraState::Reopening,
            3 => CameraState::Finished,
            _ => CameraState::Opening,
        }
    }

    /// Counters in `metrics`, the camera opening.
    pub fn new(metrics: CameraMetrics) -> CameraCounters {
        CameraCounters {
            metrics,
            state: AtomicU8::new(CameraState::Opening as u8),
            last_error: std::sync::Mutex::new(None),
        }
    }

    fn set_state(&self, state: CameraState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    /// The last error that made the camera re-open, if any.
    pub fn last_error(&self) -> Option<String> {
        self.last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn set_error(&self, error: Option<String>) {
        *self
            .last_error
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = error;
    }
}

/// A running camera thread.
pub struct CameraTask {
    /// Its configuration, to tell on reload whether it changed.
    pub config: CameraConfig,
    /// Its counters.
    pub counters: Arc<CameraCounters>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl CameraTask {
    /// Starts the camera's thread.
    pub fn spawn(
        config: CameraConfig,
        board: Arc<FrameBoard>,
        heartbeat: Heartbeat,
        metrics: CameraMetrics,
    ) -> std::io::Result<CameraTask> {
        let counters = Arc::new(CameraCounters::new(metrics));
        let stop = Arc::new(AtomicBool::new(false));
        let runner = CameraRunner {
            config: config.clone(),
            board,
            heartbeat,
            counters: counters.clone(),
            stop: stop.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(format!("camera {}", config.name.as_str()))
            .spawn(move || runner.run())?;
        Ok(CameraTask {
            config,
            counters,
            stop,
            thread: Some(thread),
        })
    }

    /// Asks the thread to stop; it ends within [`SLICE`] unless blocked in
    /// a read.
    pub fn request_stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Stops the thread and waits for it up to `timeout`. A thread stuck in
    /// a device read is left behind (it holds nothing the daemon needs).
    pub fn stop(&mut self, timeout: Duration) {
        self.request_stop();
        let deadline = Instant::now() + timeout;
        if let Some(thread) = self.thread.take() {
            while !thread.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                log::warn!(
                    "camera {}: thread did not stop within {timeout:?}",
                    self.config.name.as_str()
                );
            }
        }
    }
}

struct CameraRunner {
    config: CameraConfig,
    board: Arc<FrameBoard>,
    heartbeat: Heartbeat,
    counters: Arc<CameraCounters>,
    stop: Arc<AtomicBool>,
}

impl CameraRunner {
    fn name(&self) -> &str {
        self.config.name.as_str()
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Sleeps until `until`, in slices, touching the heartbeat. False if
    /// asked to stop meanwhile.
    fn sleep_until(&self, until: Instant) -> bool {
        loop {
            self.heartbeat.touch();
            if self.stopping() {
                return false;
            }
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return true;
            }
            std::thread::sleep(left.min(SLICE));
        }
    }

    fn run(self) {
        let mut backoff = BACKOFF_FIRST;
        let mut reported: Option<String> = None;
        while !self.stopping() {
            self.counters.set_state(CameraState::Opening);
            let miss = match Source::open(&self.config.source_spec()) {
                Ok(source) => {
                    self.counters.set_state(CameraState::Streaming);
                    if reported.take().is_some() {
                        log::info!("camera {}: source is back", self.name());
                    }
                    match self.stream(source, &mut backoff) {
                        Some(miss) => miss,
                        None => break, // asked to stop
                    }
                }
                Err(e) => Miss::Lost(e),
            };
            match miss {
                Miss::Finished => {
                    log::info!("camera {}: replay finished", self.name());
                    self.counters.set_state(CameraState::Finished);
                    break;
                }
                Miss::Lost(error) if !self.stopping() => {
                    self.counters.set_state(CameraState::Reopening);
                    self.counters.metrics.reopens.inc();
                    let error = error.to_string();
                    // Log a new error once, not every back-off round.
                    if reported.as_ref() != Some(&error) {
                        log::error!(
                            "camera {}: {error}; re-opening with back-off (up to {BACKOFF_MAX:?})",
                            self.name()
                        );
                    }
                    self.counters.set_error(Some(error.clone()));
                    reported = Some(error);
                    if !self.sleep_until(Instant::now() + backoff) {
                        break;
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
                Miss::Lost(_) | Miss::Broken(_) | Miss::Idle => {}
            }
        }
        self.board.end(self.name());
    }

    /// Delivers frames until the source is lost or finished (that miss),
    /// or a stop (None).
    fn stream(&self, mut source: Source, backoff: &mut Duration) -> Option<Miss> {
        let replay = source.is_replay();
        let paced = source.paced_by_clock();
        // The config keeps fps within [0.001, 1000], so this is finite.
        let interval = self
            .config
            .fps
            .map(|f| f64::from(f.get()))
            .or_else(|| source.default_fps())
            .map(|f| Duration::from_secs_f64(1.0 / f));
        let repeat = if replay { self.config.repeat.get() } else { 1 };
        let mut due = Instant::now();
        let mut broken_in_a_row = 0;
        while !self.stopping() {
            self.heartbeat.touch();
            let frame = match source.next_capture(self.board.raw_wanted()) {
                Ok(frame) => frame,
                Err(Miss::Idle) => continue,
                Err(Miss::Broken(e)) => {
                    self.counters.metrics.broken.inc();
                    let n = self.counters.metrics.broken.get();
                    if n.is_power_of_two() {
                        log::warn!(
                            "camera {}: {e} (skipped; {n} bad frames so far)",
                            self.name()
                        );
                    }
                    broken_in_a_row += 1;
                    if let Some(why) = source.give_up_after_broken(broken_in_a_row, &e) {
                        return Some(Miss::Lost(why));
                    }
                    continue;
                }
                Err(miss) => return Some(miss),
            };
            broken_in_a_row = 0;
            *backoff = BACKOFF_FIRST;
            let mut frame = Some(frame);
            for shown in 0..repeat {
                if let Some(interval) = interval {
                    // Replays and synthetic cameras are paced by the clock;
                    // a live camera by its driver, so only they sleep.
                    if paced && !self.sleep_until(due) {
                        return None;
                    }
                    // After a stall, pace from now rather than racing to
                    // catch up.
                    let now = Instant::now();
                    due = due.max(now.checked_sub(interval).unwrap_or(now)) + interval;
                }
                let copy = if shown + 1 == repeat {
                    frame.take()
                } else {
                    frame.clone()
                };
                let Some(copy) = copy else { break };
                if !self.deliver(copy, replay && interval.is_none()) {
                    return None;
                }
            }
        }
        None
    }

    /// Hands one frame to the detector. Replays without a rate wait for
    /// it; everything else replaces an untaken frame. False on stop.
    fn deliver(&self, image: Captured, wait: bool) -> bool {
        let mut captured = CapturedFrame {
            camera: self.name().to_owned(),
            image,
            captured: Instant::now(),
            wall_time: wall_time(),
        };
        self.counters.metrics.frames.inc();
        if captured.image.is_lent() {
            self.counters.metrics.lent.inc();
        }
        if !wait {
            if self.board.put(captured) {
                self.counters.metrics.replaced.inc();
            }
            return true;
        }
        loop {
            match self.board.put_when_free(captured, SLICE) {
                Ok(()) => return true,
                Err(back) => captured = back,
            }
            self.heartbeat.touch();
            if self.stopping() {
                return false;
            }
        }
    }
}
