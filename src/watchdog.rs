//! Liveness for systemd's watchdog: each pipeline thread holds a
//! [`Heartbeat`] and touches it whenever it is not stuck (a frame done, a
//! paced sleep, a back-off wait while re-opening a camera). `WATCHDOG=1` is
//! sent only while every heartbeat is fresh, so a hung read or a hung
//! inference gets the daemon restarted while a camera that is merely
//! unplugged and being re-opened does not.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

#[derive(Debug)]
struct Registry {
    start: Instant,
    beats: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
}

/// The heartbeats of every pipeline thread.
#[derive(Debug, Clone)]
pub struct Heartbeats(Arc<Registry>);

impl Default for Heartbeats {
    fn default() -> Self {
        Heartbeats(Arc::new(Registry {
            start: Instant::now(),
            beats: Mutex::new(BTreeMap::new()),
        }))
    }
}

impl Heartbeats {
    /// Registers a participant, fresh now. It leaves when the handle drops.
    pub fn register(&self, name: &str) -> Heartbeat {
        let beat = Arc::new(AtomicU64::new(self.elapsed_ms()));
        self.0
            .beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_owned(), beat.clone());
        Heartbeat {
            registry: self.clone(),
            name: name.to_owned(),
            beat,
        }
    }

    fn elapsed_ms(&self) -> u64 {
        self.0.start.elapsed().as_millis() as u64
    }

    /// Participants not heard from for longer than `max_age`.
    pub fn stale(&self, max_age: Duration) -> Vec<String> {
        self.ages()
            .into_iter()
            .filter(|(_, age)| *age > max_age)
            .map(|(n, _)| n)
            .collect()
    }

    /// Every participant and how long since it was last heard from, in
    /// name order: for `/healthz` and `nanodetd_heartbeat_age_seconds`.
    pub fn ages(&self) -> Vec<(String, Duration)> {
        let now = self.elapsed_ms();
        self.0
            .beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .map(|(n, b)| {
                let age = now.saturating_sub(b.load(Ordering::Relaxed));
                (n.clone(), Duration::from_millis(age))
            })
            .collect()
    }
}

/// One thread's heartbeat.
#[derive(Debug)]
pub struct Heartbeat {
    registry: Heartbeats,
    name: String,
    beat: Arc<AtomicU64>,
}

impl Heartbeat {
    /// Says "still making progress".
    pub fn touch(&self) {
        self.beat
            .store(self.registry.elapsed_ms(), Ordering::Relaxed);
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        let mut beats = self
            .registry
            .0
            .beats
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // A restarted camera may already have registered the same name.
        if beats
            .get(&self.name)
            .is_some_and(|b| Arc::ptr_eq(b, &self.beat))
        {
            beats.remove(&self.name);
        }
    }
}

/// Pings systemd's watchdog every half interval while all heartbeats are
/// fresh within the interval. Returns at once when no watchdog is set.
pub async fn run(heartbeats: Heartbeats) {
    let Some(interval) = sd_notify::watchdog_enabled() else {
        return;
    };
    let Some(period) = ping_period(interval) else {
        log::info!("systemd watchdog: WATCHDOG_USEC=0, which turns it off");
        return;
    };
    log::info!("systemd watchdog: {interval:?}");
    let mut tick = tokio::time::interval(period);
    let mut reported: Vec<String> = Vec::new();
    loop {
        tick.tick().await;
        let stale = heartbeats.stale(interval);
        if stale.is_empty() {
            if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]) {
                log::warn!("cannot ping the systemd watchdog: {e}");
            }
        } else if stale != reported {
            log::error!(
                "no progress for {interval:?} in {}: withholding the watchdog ping",
                stale.join(", ")
            );
        }
        reported = stale;
    }
}

/// How often to ping for a watchdog of `interval`: every half interval,
/// as sd_watchdog_enabled(3) advises. `None` for 0, which systemd reads as
/// "off" (and a zero period would panic tokio's timer).
fn ping_period(interval: Duration) -> Option<Duration> {
    (!interval.is_zero()).then(|| (interval / 2).max(Duration::from_micros(1)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: `WATCHDOG_USEC=0` aborted the daemon at start.
    #[test]
    fn a_zero_watchdog_is_off_and_a_tiny_one_still_ticks_issue_17() {
        assert_eq!(ping_period(Duration::ZERO), None);
        assert_eq!(
            ping_period(Duration::from_micros(1)),
            Some(Duration::from_micros(1))
        );
        assert_eq!(
            ping_period(Duration::from_secs(10)),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn stale_until_touched_and_gone_when_dropped() {
        let hb = Heartbeats::default();
        let a = hb.register("camera front");
        let b = hb.register("detector");
        std::thread::sleep(Duration::from_millis(30));
        b.touch();
        assert_eq!(hb.stale(Duration::from_millis(20)), ["camera front"]);
        a.touch();
        assert!(hb.stale(Duration::from_millis(20)).is_empty());
        // A replacement registered before the old handle drops survives it.
        let a2 = hb.register("camera front");
        drop(a);
        std::thread::sleep(Duration::from_millis(30));
        assert_eq!(hb.stale(Duration::from_millis(20)).len(), 2);
        drop(a2);
        drop(b);
        assert!(hb.stale(Duration::ZERO).is_empty());
    }
}
