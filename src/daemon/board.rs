//! The detector thread's one inbox: one slot per camera holding only its
//! newest frame, and, ahead of any frame, the daemon's [`Control`]
//! messages (new settings, a loaded model, stop), in the order sent. A
//! live camera never waits for the detector; a frame replaced before the
//! detector took it is a drop, and counted. Replays without a set rate
//! wait instead, so none is lost.
//!
//! The detector serves cameras in turn: of those with a frame waiting, the
//! one served longest ago, so under overload every camera is served once
//! per round. Keyed on the newest frame's capture time, a camera whose
//! frame kept being replaced was never the oldest, and starved. Keyed on
//! when a slot was first filled, the phases of cameras started together
//! locked: a camera whose next frame came just after its service queued
//! ahead of those served a moment later, and six of 16 got half as many
//! frames again as the rest. Cameras never served, or waiting equally
//! long, go in the order their frames came.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::pipeline::LoadedModel;
use crate::capture::Captured;
use crate::config::Config;

/// Now, in seconds since the Unix epoch: the clock events and frames are
/// stamped with (0 if the clock is before 1970).
pub fn wall_time() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// A frame and where and when it was taken.
#[derive(Debug)]
pub struct CapturedFrame {
    /// The camera's name.
    pub camera: String,
    /// The image, decoded or raw.
    pub image: Captured,
    /// Monotonic capture time, for latency figures.
    pub captured: Instant,
    /// Wall-clock capture time, seconds since the Unix epoch.
    pub wall_time: f64,
}

/// Whether to take a batch: `ready` frames waiting, the oldest since
/// `oldest`, for a batch of `target` at most, waiting up to `wait` for a
/// fuller one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchDue {
    /// No frame waits.
    Nothing,
    /// Take what is there.
    Now,
    /// Wait for more until then.
    At(Instant),
}

/// When the batch is due: at once when full, when `wait` is 0, or when
/// the oldest frame has waited `wait`; otherwise at that moment.
pub fn batch_due(
    ready: usize,
    target: usize,
    oldest: Option<Instant>,
    wait: Duration,
    now: Instant,
) -> BatchDue {
    if ready == 0 {
        return BatchDue::Nothing;
    }
    match oldest.map(|o| o + wait) {
        Some(at) if ready < target && !wait.is_zero() && now < at => BatchDue::At(at),
        _ => BatchDue::Now,
    }
}

/// What the rest of the daemon tells the detector thread.
pub enum Control {
    /// New settings: the hot ones apply from the next frame.
    Config(Arc<Config>),
    /// A model loaded in the background, swapped in if still wanted.
    /// Boxed: it holds its whole `[model]` table, and one arrives per
    /// reload at most.
    Model(Box<LoadedModel>),
    /// Finish the frames waiting, end every object, return.
    Stop,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Control::Config(_) => f.write_str("Config"),
            Control::Model(m) => write!(f, "Model({})", m.config.path.display()),
            Control::Stop => f.write_str("Stop"),
        }
    }
}

/// What the detector gets next.
#[derive(Debug)]
pub enum Work {
    /// A message from the daemon: always before any frame.
    Control(Control),
    /// Frames to detect in one run, at most one per camera, in turn order
    /// ([`FrameBoard::next_batch`]).
    Frames(Vec<CapturedFrame>),
    /// The camera's thread has stopped (source ended, camera removed or
    /// restarting): its objects are over.
    Ended(String),
}

#[derive(Debug, Default)]
struct Slot {
    frame: Option<CapturedFrame>,
    /// When the slot was filled after the detector last emptied it: the
    /// capture time of the first frame put since, kept through
    /// replacements.
    waiting_since: Option<Instant>,
    /// The board's service count when the detector last took from this
    /// slot; 0 if never.
    last_served: u64,
    ended: bool,
}

impl Slot {
    /// Holds `frame`; returns whether it replaced an untaken one.
    fn fill(&mut self, frame: CapturedFrame) -> bool {
        self.ended = false;
        self.waiting_since.get_or_insert(frame.captured);
        self.frame.replace(frame).is_some()
    }
}

/// What the board's lock guards.
#[derive(Debug, Default)]
struct Inbox {
    slots: BTreeMap<String, Slot>,
    control: VecDeque<Control>,
}

/// Newest-frame slots of every camera, and the control messages.
#[derive(Debug, Default)]
pub struct FrameBoard {
    inbox: Mutex<Inbox>,
    /// Frames taken so far; changed only with `inbox` locked.
    services: AtomicU64,
    /// Signalled when a frame or a message arrives (detector) or a frame
    /// is taken (replays).
    changed: Condvar,
    /// Set while the detector runs on a GPU that converts camera buffers
    /// itself: cameras then hand over raw buffers instead of converting.
    raw_wanted: AtomicBool,
}

impl FrameBoard {
    /// Whether cameras should hand over raw buffers.
    pub fn raw_wanted(&self) -> bool {
        self.raw_wanted.load(Ordering::Relaxed)
    }

    /// Set by the detector for the session in service. Frames already
    /// waiting of the other kind are still taken: the detector reads both.
    pub fn set_raw_wanted(&self, raw: bool) {
        self.raw_wanted.store(raw, Ordering::Relaxed);
    }

    fn inbox(&self) -> MutexGuard<'_, Inbox> {
        self.inbox.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Tells the detector something; it hears it before any frame.
    pub fn send(&self, control: Control) {
        self.inbox().control.push_back(control);
        self.changed.notify_all();
    }

    /// Offers a frame, replacing an untaken one. Returns true when a frame
    /// was replaced (dropped).
    pub fn put(&self, frame: CapturedFrame) -> bool {
        let mut inbox = self.inbox();
        let dropped = inbox
            .slots
            .entry(frame.camera.clone())
            .or_default()
            .fill(frame);
        drop(inbox);
        self.changed.notify_all();
        dropped
    }

    /// Offers a frame once the previous one of its camera has been taken,
    /// waiting at most `timeout`. Gives the frame back on timeout.
    // The frame comes back to the one caller, which offers it again: a
    // move of a few words per retry, not worth a box per frame.
    #[allow(clippy::result_large_err)]
    pub fn put_when_free(
        &self,
        frame: CapturedFrame,
        timeout: Duration,
    ) -> Result<(), CapturedFrame> {
        let mut inbox = self.inbox();
        let deadline = Instant::now() + timeout;
        while inbox
            .slots
            .get(&frame.camera)
            .is_some_and(|s| s.frame.is_some())
        {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(frame);
            }
            inbox = self
                .changed
                .wait_timeout(inbox, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        inbox
            .slots
            .entry(frame.camera.clone())
            .or_default()
            .fill(frame);
        drop(inbox);
        self.changed.notify_all();
        Ok(())
    }

    /// Marks a camera's thread as stopped; the detector hears of it after
    /// taking its last frame.
    pub fn end(&self, camera: &str) {
        self.inbox()
            .slots
            .entry(camera.to_owned())
            .or_default()
            .ended = true;
        self.changed.notify_all();
    }

    /// A control message, else up to `max` frames at once, of as many
    /// cameras, in turn order: the camera whose turn it is first (served
    /// longest ago, so no camera starves); else a camera's end; `None`
    /// after `timeout` with nothing to do. When fewer than `max` frames
    /// are waiting, waits for more until the oldest has waited `wait` (0:
    /// takes what is there), or `None` at `timeout` if that comes first
    /// (0: only a batch due now); a control message ends the wait, and
    /// comes first.
    pub fn next_batch(&self, max: usize, wait: Duration, timeout: Duration) -> Option<Work> {
        let max = max.max(1);
        let mut inbox = self.inbox();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(control) = inbox.control.pop_front() {
                return Some(Work::Control(control));
            }
            // An end whose camera has no frame waiting: its last frame was
            // served already (one detector), so the end goes now rather
            // than after every other camera's frames, which under load
            // never run out.
            let slots = &mut inbox.slots;
            if let Some(name) = slots
                .iter()
                .find(|(_, s)| s.ended && s.frame.is_none())
                .map(|(n, _)| n.clone())
            {
                slots.remove(&name);
                return Some(Work::Ended(name));
            }
            let waiting = || inbox.slots.values().filter(|s| s.frame.is_some());
            let ready = waiting().count();
            let oldest = waiting().filter_map(|s| s.waiting_since).min();
            // One frame per camera: a batch never holds more than the
            // cameras still running.
            let running = inbox.slots.values().filter(|s| !s.ended).count();
            let now = Instant::now();
            match batch_due(ready, max.min(running.max(1)), oldest, wait, now) {
                BatchDue::Nothing => {}
                BatchDue::Now => {
                    let frames = self.take_turns(&mut inbox, max);
                    drop(inbox);
                    self.changed.notify_all();
                    return Some(Work::Frames(frames));
                }
                BatchDue::At(at) if at <= deadline => {
                    inbox = self
                        .changed
                        .wait_timeout(inbox, at.saturating_duration_since(now))
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                    continue;
                }
                // Not due before the timeout: waits for a change until it.
                BatchDue::At(_) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            inbox = self
                .changed
                .wait_timeout(inbox, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Takes up to `max` waiting frames, the cameras served longest ago
    /// first (then those waiting longest, then by name); each take counts
    /// as a service, so turns carry over from batch to batch.
    fn take_turns(&self, inbox: &mut Inbox, max: usize) -> Vec<CapturedFrame> {
        let mut turns: Vec<(u64, Instant, String)> = inbox
            .slots
            .iter()
            .filter(|(_, s)| s.frame.is_some())
            .filter_map(|(name, s)| {
                s.waiting_since
                    .map(|since| (s.last_served, since, name.clone()))
            })
            .collect();
        turns.sort();
        turns
            .into_iter()
            .take(max)
            .filter_map(|(_, _, name)| {
                // Counts frames, one at a time: cannot overflow a u64.
                let service = self.services.fetch_add(1, Ordering::Relaxed) + 1;
                inbox.slots.get_mut(&name).and_then(|s| {
                    s.waiting_since = None;
                    s.last_served = service;
                    s.frame.take()
                })
            })
            .collect()
    }

    /// Whether any frame or message is waiting.
    pub fn has_work(&self) -> bool {
        let inbox = self.inbox();
        !inbox.control.is_empty() || inbox.slots.values().any(|s| s.frame.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{Frame, PixelFormat};

    fn captured(camera: &str, tag: u8) -> CapturedFrame {
        captured_at(camera, tag, Instant::now())
    }

    fn captured_at(camera: &str, tag: u8, at: Instant) -> CapturedFrame {
        CapturedFrame {
            camera: camera.into(),
            image: Captured::Frame(
                Frame::from_packed(1, 1, PixelFormat::Gray8, vec![tag], "test").unwrap(),
            ),
            captured: at,
            wall_time: 0.0,
        }
    }

    /// Issue 17: 16 cameras at 5 fps on a detector that manages 20 frames
    /// a second. Keyed on the newest frame's time, six cameras were served
    /// under 20% of the time. In turn, every camera gets a quarter of its
    /// frames, within one frame of the others.
    /// Time is simulated: capture times are a fake clock's, not the real one.
    #[test]
    fn under_overload_every_camera_is_served_at_the_same_rate_issue_17() {
        let board = FrameBoard::default();
        let start = Instant::now();
        let cameras: Vec<String> = (0..16).map(|i| format!("cam{i:02}")).collect();
        let mut served: BTreeMap<String, u32> = BTreeMap::new();
        // 100 ms steps over 60 s: each camera puts a frame every 200 ms,
        // at its own phase; the detector takes 2 frames per step.
        for step in 0..600u32 {
            let now = start + Duration::from_millis(u64::from(step) * 100);
            for (i, camera) in cameras.iter().enumerate() {
                // Phases spread each camera's frames over the 200 ms.
                if (step + i as u32).is_multiple_of(2) {
                    let at = now + Duration::from_millis(i as u64 * 6);
                    board.put(captured_at(camera, 0, at));
                }
            }
            for _ in 0..2 {
                if let Some(Work::Frames(frames)) = next(&board, Duration::ZERO) {
                    for f in frames {
                        *served.entry(f.camera).or_default() += 1;
                    }
                }
            }
        }
        let counts: Vec<u32> = cameras
            .iter()
            .map(|c| served.get(c).copied().unwrap_or(0))
            .collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert_eq!(counts.iter().sum::<u32>(), 1200, "the detector never idled");
        assert!(max - min <= 1, "served per camera: {counts:?}");
    }

    /// Issue 17, the soak run: 16 cameras at 5 fps on a detector that
    /// takes 31 ms a frame, on a quiet machine, gave processed rates from
    /// 1.66 to 2.48 a second (33% apart). Keyed on when a camera's slot
    /// was filled, a camera whose next frame comes just after it was
    /// served starts waiting early and is served more often: the phases
    /// lock. Serving in turn, the camera served longest ago first, holds
    /// every camera within one frame of the others. Simulated in 1 ms
    /// steps, on a fake clock.
    #[test]
    fn cameras_whose_frames_come_just_after_a_service_are_not_favoured_issue_17() {
        // Every 200 ms, each camera: in turn within 16 ms, as threads
        // started together are (the soak's case), or spread out.
        for spacing_ms in [1, 13] {
            let board = FrameBoard::default();
            let start = Instant::now();
            let cameras: Vec<String> = (0..16).map(|i| format!("cam{i:02}")).collect();
            let mut served: BTreeMap<String, u32> = BTreeMap::new();
            let mut busy_until = 0u64;
            for ms in 0..60_000u64 {
                let now = start + Duration::from_millis(ms);
                for (i, camera) in cameras.iter().enumerate() {
                    if ms % 200 == (i as u64 * spacing_ms) % 200 {
                        board.put(captured_at(camera, 0, now));
                    }
                }
                if ms >= busy_until
                    && let Some(Work::Frames(frames)) = next(&board, Duration::ZERO)
                {
                    for f in frames {
                        *served.entry(f.camera).or_default() += 1;
                    }
                    busy_until = ms + 31;
                }
            }
            let counts: Vec<u32> = cameras
                .iter()
                .map(|c| served.get(c).copied().unwrap_or(0))
                .collect();
            let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
            assert!(counts.iter().sum::<u32>() >= 1930, "{counts:?}");
            assert!(
                max - min <= 1,
                "{spacing_ms} ms apart, served per camera: {counts:?}"
            );
        }
    }

    /// Issue 21: 64 cameras at one frame per step, a detector taking one
    /// batch of up to 32 a step (half the frames): every camera is served
    /// at the same rate, within one frame, and no batch holds a camera
    /// twice.
    /// Time is simulated.
    #[test]
    fn batches_serve_every_camera_in_turn_once_each_issue_21() {
        let board = FrameBoard::default();
        let start = Instant::now();
        let cameras: Vec<String> = (0..64).map(|i| format!("cam{i:02}")).collect();
        let mut served: BTreeMap<String, u32> = BTreeMap::new();
        for step in 0..300u64 {
            for (i, camera) in cameras.iter().enumerate() {
                let at = start + Duration::from_millis(step * 33 + i as u64 % 7);
                board.put(captured_at(camera, 0, at));
            }
            let Some(Work::Frames(frames)) = board.next_batch(32, Duration::ZERO, Duration::ZERO)
            else {
                panic!("no batch");
            };
            assert_eq!(frames.len(), 32);
            let mut in_batch: Vec<&str> = frames.iter().map(|f| f.camera.as_str()).collect();
            in_batch.sort();
            in_batch.dedup();
            assert_eq!(in_batch.len(), 32, "a camera twice in one batch");
            for f in frames {
                *served.entry(f.camera).or_default() += 1;
            }
        }
        let counts: Vec<u32> = cameras.iter().map(|c| served[c]).collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        assert_eq!(counts.iter().sum::<u32>(), 300 * 32);
        assert!(max - min <= 1, "served per camera: {counts:?}");
    }

    /// Issue 21: with fewer frames than the batch holds, the board waits
    /// up to `wait` for more; a full batch, or a control message, ends the
    /// wait early, and the control comes first with the frames kept.
    #[test]
    fn a_batch_waits_for_more_frames_until_full_or_told_issue_21() {
        let board = Arc::new(FrameBoard::default());
        // Four cameras known to the board, then one frame.
        for c in ["a", "b", "c", "d"] {
            board.put(captured(c, 0));
        }
        assert_eq!(
            tag(board.next_batch(4, Duration::ZERO, Duration::ZERO)),
            "4 frames"
        );
        board.put(captured("a", 1));
        let t = Instant::now();
        let Some(Work::Frames(alone)) =
            board.next_batch(4, Duration::from_millis(60), Duration::from_secs(5))
        else {
            panic!("no batch");
        };
        assert_eq!(alone.len(), 1);
        assert!(
            t.elapsed() >= Duration::from_millis(50),
            "{:?}",
            t.elapsed()
        );

        // Three more come 20 ms in: the batch is full, no need to wait on.
        board.put(captured("a", 2));
        let putter = {
            let board = board.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                for c in ["b", "c", "d"] {
                    board.put(captured(c, 1));
                }
            })
        };
        let t = Instant::now();
        let Some(Work::Frames(full)) =
            board.next_batch(4, Duration::from_secs(10), Duration::from_secs(5))
        else {
            panic!("no batch");
        };
        putter.join().unwrap();
        assert_eq!(full.len(), 4);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());

        // A control message ends a wait and comes first; the frame stays.
        board.put(captured("a", 3));
        let sender = {
            let board = board.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(20));
                board.send(Control::Stop);
            })
        };
        let got = tag(board.next_batch(4, Duration::from_secs(10), Duration::from_secs(5)));
        sender.join().unwrap();
        assert_eq!(got, "Stop");
        assert_eq!(tag(next(&board, Duration::ZERO)), "a 3");
    }

    /// Issue 21: a timeout shorter than the wait ends it: with a batch
    /// waiting for its run, the detector takes only a batch due now, and
    /// runs the one waiting rather than wait for a fuller next one.
    #[test]
    fn a_timeout_before_the_batch_is_due_gives_nothing_and_keeps_the_frames_issue_21() {
        let board = FrameBoard::default();
        for c in ["a", "b"] {
            board.put(captured(c, 0));
        }
        let t = Instant::now();
        assert!(
            board
                .next_batch(2, Duration::from_secs(10), Duration::ZERO)
                .is_some(),
            "full: due now"
        );
        board.put(captured("a", 1));
        assert!(
            board
                .next_batch(2, Duration::from_secs(10), Duration::ZERO)
                .is_none()
        );
        assert!(
            board
                .next_batch(2, Duration::from_secs(10), Duration::from_millis(30))
                .is_none()
        );
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert_eq!(tag(next(&board, Duration::ZERO)), "a 1", "the frame stays");
    }

    /// Issue 21: a camera that ends while its frame waits: the frame goes
    /// in a batch first, then the end.
    #[test]
    fn a_camera_ending_mid_batch_has_its_frame_served_before_its_end_issue_21() {
        let board = FrameBoard::default();
        board.put(captured("a", 1));
        board.put(captured("b", 1));
        board.end("a");
        let Some(Work::Frames(frames)) = board.next_batch(8, Duration::ZERO, Duration::ZERO) else {
            panic!("no batch");
        };
        let names: Vec<&str> = frames.iter().map(|f| f.camera.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(
            tag(board.next_batch(8, Duration::ZERO, Duration::ZERO)),
            "a ended"
        );
        assert_eq!(
            tag(board.next_batch(8, Duration::ZERO, Duration::ZERO)),
            "none"
        );
    }

    /// Issue 21, on a fake clock: a batch is due at once when full, when
    /// the wait is 0, or once the oldest frame has waited; else at that
    /// moment.
    #[test]
    fn a_batch_is_due_when_full_or_when_its_oldest_frame_has_waited_issue_21() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let oldest = Some(t0);
        assert_eq!(batch_due(0, 4, None, ms(2), t0), BatchDue::Nothing);
        assert_eq!(batch_due(4, 4, oldest, ms(2), t0), BatchDue::Now);
        assert_eq!(batch_due(1, 4, oldest, ms(2), t0), BatchDue::At(t0 + ms(2)));
        assert_eq!(
            batch_due(1, 4, oldest, ms(2), t0 + ms(1)),
            BatchDue::At(t0 + ms(2))
        );
        assert_eq!(batch_due(1, 4, oldest, ms(2), t0 + ms(2)), BatchDue::Now);
        // A frame stamped after now (a fake clock's) with no wait: now.
        assert_eq!(
            batch_due(1, 4, Some(t0 + ms(9)), Duration::ZERO, t0),
            BatchDue::Now
        );
    }

    /// Issue 21: three cameras and batches of 8: the batch cannot fill,
    /// so it goes without waiting out the 10 s.
    #[test]
    fn a_batch_larger_than_the_cameras_does_not_wait_issue_21() {
        let board = FrameBoard::default();
        for c in ["a", "b", "c"] {
            board.put(captured(c, 1));
        }
        let t = Instant::now();
        let Some(Work::Frames(frames)) =
            board.next_batch(8, Duration::from_secs(10), Duration::from_secs(10))
        else {
            panic!("no batch");
        };
        assert_eq!(frames.len(), 3);
        assert!(t.elapsed() < Duration::from_secs(1), "{:?}", t.elapsed());
    }

    /// Issue 21: under load other cameras' frames never run out; a camera
    /// that ended with no frame waiting gets its end at once, and a
    /// restart of the same name cannot swallow it.
    #[test]
    fn an_end_is_not_held_behind_other_cameras_frames_issue_21() {
        let board = FrameBoard::default();
        board.put(captured("a", 1));
        board.put(captured("b", 1));
        assert_eq!(tag(next(&board, Duration::ZERO)), "a 1");
        board.end("a");
        board.put(captured("b", 2));
        assert_eq!(
            tag(board.next_batch(1, Duration::ZERO, Duration::ZERO)),
            "a ended"
        );
    }

    /// One frame a run: what the detector asks for at `max_batch = 1`.
    fn next(board: &FrameBoard, timeout: Duration) -> Option<Work> {
        board.next_batch(1, Duration::ZERO, timeout)
    }

    fn tag(work: Option<Work>) -> String {
        match work {
            Some(Work::Frames(mut frames)) if frames.len() == 1 => {
                let f = frames.remove(0);
                match f.image {
                    Captured::Frame(frame) => format!("{} {}", f.camera, frame.data()[0]),
                    Captured::Raw { .. } => format!("{} raw", f.camera),
                }
            }
            Some(Work::Frames(frames)) => format!("{} frames", frames.len()),
            Some(Work::Ended(c)) => format!("{c} ended"),
            Some(Work::Control(c)) => format!("{c:?}"),
            None => "none".into(),
        }
    }

    #[test]
    fn control_messages_come_before_any_frame_in_the_order_sent() {
        let board = FrameBoard::default();
        board.put(captured("a", 1));
        assert!(board.has_work());
        board.send(Control::Stop);
        let config = Config::parse(
            "[model]\npath = \"m.onnx\"\n[[camera]]\nname = \"a\"\nsource = { folder = \"/a\" }\n",
            std::path::Path::new("test.toml"),
        )
        .unwrap();
        board.send(Control::Config(Arc::new(config)));
        let order: Vec<String> = (0..4).map(|_| tag(next(&board, Duration::ZERO))).collect();
        assert_eq!(order, ["Stop", "Config", "a 1", "none"]);
        assert!(!board.has_work());
    }

    #[test]
    fn a_message_wakes_a_detector_waiting_for_frames() {
        let board = Arc::new(FrameBoard::default());
        let sender = Arc::clone(&board);
        let waiter = std::thread::spawn(move || tag(next(&board, Duration::from_secs(60))));
        std::thread::sleep(Duration::from_millis(20));
        sender.send(Control::Stop);
        assert_eq!(waiter.join().unwrap(), "Stop");
    }

    #[test]
    fn keeps_the_newest_frame_longest_waiting_camera_first_then_the_end() {
        let board = FrameBoard::default();
        assert!(!board.put(captured("a", 1)));
        assert!(!board.put(captured("b", 1)));
        assert!(board.put(captured("a", 2)), "replacing counts as a drop");
        board.end("b");
        // `a` has waited since its first frame, before `b`'s.
        assert_eq!(tag(next(&board, Duration::ZERO)), "a 2");
        assert_eq!(tag(next(&board, Duration::ZERO)), "b 1");
        assert_eq!(tag(next(&board, Duration::ZERO)), "b ended");
        assert_eq!(tag(next(&board, Duration::from_millis(10))), "none");
    }

    #[test]
    fn replays_wait_for_the_detector() {
        let board = std::sync::Arc::new(FrameBoard::default());
        board.put(captured("r", 1));
        let refused = board.put_when_free(captured("r", 2), Duration::from_millis(10));
        assert!(refused.is_err());
        let b = board.clone();
        let taker = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            tag(next(&b, Duration::ZERO))
        });
        board
            .put_when_free(captured("r", 3), Duration::from_secs(5))
            .unwrap();
        assert_eq!(taker.join().unwrap(), "r 1");
        assert_eq!(tag(next(&board, Duration::ZERO)), "r 3");
    }
}
