//! Snapshots of events, off the detector thread.
//!
//! The camera's publisher decides which events get a picture and how many
//! the queue takes ([`super::publisher::Action::Snapshot`]); the detector
//! thread puts the frame (shared, or copied where it is a camera's lent
//! buffer) in the bounded [`SnapshotQueue`] and goes on. The writer thread
//! renders and encodes it ([`render`]), writes it under `snapshots.dir`,
//! publishes it retained, and deletes what [`retention`] says is too many,
//! too large or too old. A full queue drops pictures, counted, and never
//! an event: events carry `has_snapshot` as the queue's room decided.

pub mod render;
pub mod retention;

use std::collections::VecDeque;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::board::wall_time;
use super::publisher::SnapshotJob;
use crate::buffer::RawBytes;
use crate::capture::Captured;
use crate::config::{Config, SnapshotConfig};
use crate::mqtt::{self, Outbox};
use render::{RenderSettings, Subject};
use retention::{Limits, Retention};

/// How often the writer checks the files' ages when no snapshot comes.
const AGE_CHECK: Duration = Duration::from_secs(60);

/// One snapshot waiting: what to draw, the frame, and the settings it
/// was taken under.
pub struct Queued {
    /// What the publisher asked for.
    pub job: SnapshotJob,
    /// The frame; never a camera's lent buffer, which would hold the
    /// camera's ring.
    pub image: Captured,
    /// The settings when it was taken.
    pub config: Arc<Config>,
}

/// Snapshot counters, for the stats topic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotCounts {
    /// Waiting to be encoded.
    pub queued: usize,
    /// Written to disk.
    pub written: u64,
    /// Wanted while the queue was full.
    pub dropped: u64,
    /// Could not be rendered or written.
    pub failed: u64,
    /// Written, but larger than `mqtt.max_message_bytes`: not published.
    pub too_large: u64,
    /// Files kept now, and their bytes.
    pub files: usize,
    /// Bytes of the files kept.
    pub bytes: u64,
}

/// The bounded queue between the detector and the writer.
#[derive(Default)]
pub struct SnapshotQueue {
    jobs: Mutex<VecDeque<Queued>>,
    ready: Condvar,
    stop: AtomicBool,
    written: AtomicU64,
    dropped: AtomicU64,
    failed: AtomicU64,
    too_large: AtomicU64,
    files: AtomicU64,
    bytes: AtomicU64,
}

impl SnapshotQueue {
    fn jobs(&self) -> std::sync::MutexGuard<'_, VecDeque<Queued>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// How many more the queue takes under `config` (0 when snapshots are
    /// off).
    pub fn room(&self, config: &SnapshotConfig) -> usize {
        if !config.enabled {
            return 0;
        }
        config.queue.get().saturating_sub(self.jobs().len())
    }

    /// Queues a snapshot of `image`; the publisher checked the room. A
    /// lent capture buffer is copied: the camera needs it back.
    pub fn push(&self, job: SnapshotJob, image: &Captured, config: Arc<Config>) {
        if self.jobs().len() >= config.snapshots.queue.get() {
            // Only if the room was misjudged; counted like any other.
            self.count_dropped();
            return;
        }
        // Copied outside the lock; only this thread pushes, so the room
        // is still there after.
        let image = match image {
            Captured::Raw {
                layout,
                bytes: RawBytes::Leased(lease),
                origin,
            } => Captured::Raw {
                layout: *layout,
                bytes: RawBytes::Copied(lease.bytes().to_vec()),
                origin: origin.clone(),
            },
            other => other.clone(),
        };
        self.jobs().push_back(Queued { job, image, config });
        self.ready.notify_one();
    }

    /// A snapshot wanted while the queue was full.
    pub fn count_dropped(&self) {
        let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            log::warn!("snapshots: queue full, {n} pictures dropped so far (events still sent)");
        }
    }

    /// The counters.
    pub fn counts(&self) -> SnapshotCounts {
        SnapshotCounts {
            queued: self.jobs().len(),
            written: self.written.load(Ordering::Relaxed),
            dropped: self.dropped.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            too_large: self.too_large.load(Ordering::Relaxed),
            files: usize::try_from(self.files.load(Ordering::Relaxed)).unwrap_or(usize::MAX),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }

    /// The writer finishes what is queued, then ends.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.ready.notify_all();
    }

    /// The next job, waiting up to `timeout`; None on a timeout, or once
    /// stopped and empty.
    fn pop(&self, timeout: Duration) -> Option<Queued> {
        let jobs = self.jobs();
        let (mut jobs, _) = self
            .ready
            .wait_timeout_while(jobs, timeout, |jobs| {
                jobs.is_empty() && !self.stop.load(Ordering::Relaxed)
            })
            .unwrap_or_else(PoisonError::into_inner);
        jobs.pop_front()
    }

    fn stopped(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    fn failed(&self, what: &str, error: &dyn std::fmt::Display) {
        let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
        if n.is_power_of_two() {
            log::warn!("snapshots: {what}: {error} ({n} failed so far)");
        }
    }
}

/// Starts the writer thread; `config` follows reloads, so retention
/// limits apply while no picture comes.
pub fn spawn_writer(
    queue: Arc<SnapshotQueue>,
    outbox: Outbox,
    config: watch::Receiver<Arc<Config>>,
) -> std::io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("snapshots".into())
        .spawn(move || Writer::new(queue, outbox, config).run())
}

/// The writer thread's state.
struct Writer {
    queue: Arc<SnapshotQueue>,
    outbox: Outbox,
    /// The running config, for retention.
    latest: watch::Receiver<Arc<Config>>,
    config: Arc<Config>,
    retention: Retention,
    /// The folder `retention` indexes.
    indexed: Option<PathBuf>,
}

impl Writer {
    fn new(
        queue: Arc<SnapshotQueue>,
        outbox: Outbox,
        latest: watch::Receiver<Arc<Config>>,
    ) -> Writer {
        let config = latest.borrow().clone();
        Writer {
            queue,
            outbox,
            latest,
            config,
            retention: Retention::default(),
            indexed: None,
        }
    }

    fn run(mut self) {
        let mut last_check = Instant::now();
        loop {
            let queued = self.queue.pop(AGE_CHECK);
            self.config = self.latest.borrow().clone();
            match queued {
                Some(queued) => self.write(queued),
                None if self.queue.stopped() => break,
                None => {}
            }
            if last_check.elapsed() >= AGE_CHECK && self.config.snapshots.enabled {
                last_check = Instant::now();
                self.expire();
            }
        }
    }

    /// Renders, writes and publishes one snapshot.
    fn write(&mut self, queued: Queued) {
        let Queued { job, image, config } = queued;
        let s = &config.snapshots;
        let frame = match image.into_frame() {
            Ok(frame) => frame,
            Err(e) => return self.queue.failed(&job.camera, &crate::errors::one_line(&e)),
        };
        let caption = format!("{} {:.0}%", job.label, job.score * 100.0);
        let settings = RenderSettings {
            draw: s.draw,
            crop: s.crop,
            margin: s.margin.get(),
            height: s.height.map(|h| h.get()),
            quality: s.quality.get(),
        };
        let subject = Subject {
            bbox: job.bbox,
            caption: &caption,
        };
        let jpeg = match render::render(&frame, &subject, &settings) {
            Ok(jpeg) => jpeg,
            Err(e) => return self.queue.failed(&job.camera, &crate::errors::one_line(&e)),
        };
        if self.indexed.as_deref() != Some(s.dir.as_path()) {
            self.retention = index(&s.dir, &self.config);
            self.indexed = Some(s.dir.clone());
        }
        match write_atomically(&job.path, &jpeg) {
            Ok(()) => {
                self.queue.written.fetch_add(1, Ordering::Relaxed);
                self.retention
                    .add(job.path.clone(), wall_time(), jpeg.len() as u64);
            }
            Err(e) => self.queue.failed(&job.path.display().to_string(), &e),
        }
        self.expire();
        if s.mqtt {
            self.publish(&job, &jpeg, &config);
        }
    }

    /// Both retained messages, where the broker takes them.
    fn publish(&self, job: &SnapshotJob, jpeg: &[u8], config: &Config) {
        let prefix = config.mqtt.prefix_for(&config.device_id);
        let messages = mqtt::snapshot_messages(&job.camera, &job.label, jpeg);
        let limit = config.mqtt.max_message_bytes.get();
        // The size check delivery makes, made here so that the picture is
        // counted as too large rather than as a dropped message.
        let fits = messages
            .iter()
            .all(|m| mqtt::publish_size(&m.full_topic(&prefix), &m.payload) <= limit);
        if !fits {
            let n = self.queue.too_large.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                log::warn!(
                    "snapshots: a {}-byte picture is over mqtt.max_message_bytes = {limit}; written to disk, not published \
                     (lower snapshots.quality or set snapshots.height; {n} so far)",
                    jpeg.len()
                );
            }
            return;
        }
        for message in messages {
            self.outbox.push(message);
        }
    }

    /// Deletes what the limits no longer allow.
    fn expire(&mut self) {
        let s = &self.config.snapshots;
        let limits = Limits {
            count: s.keep_count.get(),
            bytes: s.keep_mib.get().saturating_mul(1 << 20),
            age: s.keep_hours.get() * 3600.0,
        };
        for path in self.retention.expire(wall_time(), &limits) {
            if let Err(e) = std::fs::remove_file(&path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                log::warn!("snapshots: cannot delete {}: {e}", path.display());
            }
        }
        let (files, bytes) = self.retention.totals();
        self.queue.files.store(files as u64, Ordering::Relaxed);
        self.queue.bytes.store(bytes, Ordering::Relaxed);
    }
}

/// Most files indexed from earlier runs: the largest `keep_count`.
const MAX_INDEXED: usize = 1_000_000;

/// The snapshots earlier runs left under `dir`, so that the limits count
/// them too: only files named as nanodetd names them
/// (`<camera slug>/<event id>.jpg`), of cameras in `config`, and no
/// symbolic links, so that a `dir` pointed at a folder of other pictures
/// never has them deleted. At most [`MAX_INDEXED`].
fn index(dir: &Path, config: &Config) -> Retention {
    let mut retention = Retention::default();
    let mut indexed = 0;
    for camera in &config.cameras {
        let folder = dir.join(crate::config::slug(camera.name.as_str()));
        let Ok(files) = std::fs::read_dir(&folder) else {
            continue;
        };
        for file in files.flatten() {
            if indexed >= MAX_INDEXED {
                return retention;
            }
            let name = file.file_name();
            // DirEntry::file_type does not follow links.
            let plain = file.file_type().is_ok_and(|t| t.is_file());
            if !plain || !name.to_str().is_some_and(is_snapshot_name) {
                continue;
            }
            let Ok(meta) = file.metadata() else { continue };
            let written = meta
                .modified()
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0.0, |d| d.as_secs_f64());
            retention.add(file.path(), written, meta.len());
            indexed += 1;
        }
    }
    retention
}

/// Whether `name` is a snapshot's file name: an event id, digits, a dot,
/// six digits, a dash and six lowercase letters or digits, then `.jpg`.
fn is_snapshot_name(name: &str) -> bool {
    let Some(id) = name.strip_suffix(".jpg") else {
        return false;
    };
    let Some((time, random)) = id.split_once('-') else {
        return false;
    };
    let Some((seconds, micros)) = time.split_once('.') else {
        return false;
    };
    !seconds.is_empty()
        && seconds.bytes().all(|b| b.is_ascii_digit())
        && micros.len() == 6
        && micros.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 6
        && random
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
}

/// Writes `bytes` to `path` through a temporary file in its folder, so a
/// reader never sees half a picture.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let folder = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder)?;
    let mut file = tempfile::NamedTempFile::new_in(folder)?;
    file.write_all(bytes)?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 19 (review): the limits count what earlier runs left, and
    /// only that: other pictures, other folders and links are never
    /// indexed, so never deleted.
    #[test]
    fn only_snapshots_of_configured_cameras_are_indexed_for_retention_issue_19() {
        let dir = tempfile::tempdir().unwrap();
        let config: Config = toml::from_str(
            "[model]\npath = \"m.onnx\"\n[[camera]]\nname = \"Front Door\"\nsource = { folder = \"/x\" }\n",
        )
        .unwrap();
        let ours = dir.path().join("front_door");
        let other = dir.path().join("holidays");
        std::fs::create_dir_all(&ours).unwrap();
        std::fs::create_dir_all(&other).unwrap();
        for name in [
            "1796083200.120000-k3x9qa.jpg",
            "1796083201.000001-aaaaaa.jpg",
        ] {
            std::fs::write(ours.join(name), b"12345").unwrap();
        }
        for name in [
            "beach.jpg",
            "1796083200.12-k3x9qa.jpg",
            "1796083200.120000-K3X9QA.jpg",
        ] {
            std::fs::write(ours.join(name), b"x").unwrap();
        }
        std::fs::write(other.join("1796083200.120000-k3x9qa.jpg"), b"x").unwrap();
        std::os::unix::fs::symlink(
            other.join("1796083200.120000-k3x9qa.jpg"),
            ours.join("1796083202.000000-bbbbbb.jpg"),
        )
        .unwrap();
        let mut retention = index(dir.path(), &config);
        assert_eq!(retention.totals(), (2, 10));
        let limits = Limits {
            count: 0,
            bytes: 0,
            age: 1.0,
        };
        let doomed = retention.expire(f64::MAX, &limits);
        assert!(doomed.iter().all(|p| p.starts_with(&ours)), "{doomed:?}");
        assert_eq!(doomed.len(), 2);
    }
}
