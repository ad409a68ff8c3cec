//! Clearing the counts that an earlier run left retained.
//!
//! Counts are retained, so a daemon that dies without publishing its counts
//! back down (`kill -9`, a power cut) leaves `person 2` on the broker for
//! good: later runs only publish a label's count when it changes, and those
//! objects never get an `end`. So on every connect the MQTT task subscribes
//! to `<prefix>/+/+` to receive what the broker holds retained there, and
//! answers every non-zero count it has not itself set in this run with `0`,
//! the true count of a run that has seen nothing yet. It unsubscribes as
//! soon as the SUBACK is in: brokers send a subscription's retained
//! messages while handling the SUBSCRIBE, so all of them come before the
//! UNSUBACK, and live traffic is never echoed back for long.
//!
//! A retained message under the prefix that is larger than
//! `mqtt.max_message_bytes` fails the connection when it arrives (MQTT
//! 3.1.1 has no way to tell the broker our limit). Left alone that would
//! repeat on every reconnect, so a connection lost twice running during
//! the sweep turns the sweep off for this run, with a warning.

use super::{Message, TopicClass, TopicRoot};

/// Where the sweep of one connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No sweep under way.
    Idle,
    /// SUBSCRIBE sent; retained messages may be on their way.
    Subscribed,
    /// SUBACK in, UNSUBSCRIBE sent; retained messages may still arrive.
    Unsubscribing,
    /// Turned off for this run.
    Off,
}

/// The sweep's state machine; the MQTT task carries out what it returns.
#[derive(Debug)]
pub(super) struct CountSweep {
    phase: Phase,
    /// Connections lost during a sweep, without a completed one between.
    failures: u8,
}

/// Connections lost in a row during the sweep before it is turned off.
const MAX_FAILURES: u8 = 2;

impl CountSweep {
    pub(super) fn new() -> Self {
        CountSweep {
            phase: Phase::Idle,
            failures: 0,
        }
    }

    /// The topic filter to subscribe to under `prefix`.
    pub(super) fn filter(prefix: &str) -> String {
        format!("{prefix}/+/+")
    }

    /// Connected: whether to subscribe.
    pub(super) fn connected(&mut self) -> bool {
        if self.phase == Phase::Off {
            return false;
        }
        self.phase = Phase::Subscribed;
        true
    }

    /// The SUBSCRIBE was not queued (rumqttc's channel full).
    pub(super) fn not_subscribed(&mut self) {
        if self.phase == Phase::Subscribed {
            self.phase = Phase::Idle;
        }
    }

    /// SUBACK: whether to unsubscribe now.
    pub(super) fn subscribed(&mut self) -> bool {
        if self.phase != Phase::Subscribed {
            return false;
        }
        self.phase = Phase::Unsubscribing;
        true
    }

    /// UNSUBACK: the sweep of this connection is complete.
    pub(super) fn unsubscribed(&mut self) {
        if self.phase == Phase::Unsubscribing {
            self.phase = Phase::Idle;
            self.failures = 0;
        }
    }

    /// The connection was lost: a warning when this turns the sweep off.
    pub(super) fn connection_lost(&mut self) -> Option<String> {
        if !matches!(self.phase, Phase::Subscribed | Phase::Unsubscribing) {
            return None;
        }
        self.failures = self.failures.saturating_add(1);
        if self.failures < MAX_FAILURES {
            self.phase = Phase::Idle;
            return None;
        }
        self.phase = Phase::Off;
        Some(format!(
            "the connection was lost {MAX_FAILURES} times while reading the counts retained under the prefix \
             (a retained message over mqtt.max_message_bytes?); counts left by an earlier run are no longer cleared"
        ))
    }
}

/// The message that corrects a count found retained on the broker: `0` on
/// the same topic when `topic` is a count under `prefix` (two levels below
/// it, a decimal payload other than 0) that `ours` says this run has not
/// set. `ours` takes the topic relative to the prefix.
pub(super) fn stale_count(
    prefix: &str,
    topic: &str,
    payload: &[u8],
    ours: impl Fn(&str) -> bool,
) -> Option<Message> {
    let relative = topic.strip_prefix(prefix)?.strip_prefix('/')?;
    let (camera, label) = relative.split_once('/')?;
    if camera.is_empty() || label.is_empty() || label.contains('/') {
        return None;
    }
    let is_count = !payload.is_empty() && payload.iter().all(u8::is_ascii_digit);
    if !is_count || payload.iter().all(|&b| b == b'0') || ours(relative) {
        return None;
    }
    Some(Message {
        topic: relative.to_owned(),
        payload: b"0".to_vec(),
        class: TopicClass::State,
        root: TopicRoot::Prefix,
        retain: true,
        captured: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: after a kill -9, `person 2` stayed retained through any
    /// number of clean restarts.
    #[test]
    fn a_count_left_by_an_earlier_run_is_set_to_0_issue_17() {
        let none = |_: &str| false;
        let fix = stale_count("nanodetd/box", "nanodetd/box/front/person", b"2", none).unwrap();
        assert_eq!(fix.topic, "front/person");
        assert_eq!(fix.payload, b"0");
        assert!(fix.retain);
        assert_eq!(fix.class, TopicClass::State);
    }

    #[test]
    fn only_foreign_non_zero_counts_under_the_prefix_are_corrected() {
        let none = |_: &str| false;
        let p = "nanodetd/box";
        // Already 0, or set by this run.
        assert!(stale_count(p, "nanodetd/box/front/person", b"0", none).is_none());
        assert!(stale_count(p, "nanodetd/box/front/person", b"00", none).is_none());
        assert!(
            stale_count(p, "nanodetd/box/front/person", b"3", |t| t
                == "front/person")
            .is_none()
        );
        // Not a count.
        assert!(stale_count(p, "nanodetd/box/front/events", b"{\"schema\":1}", none).is_none());
        assert!(stale_count(p, "nanodetd/box/front/person", b"", none).is_none());
        assert!(stale_count(p, "nanodetd/box/front/person", b"-1", none).is_none());
        assert!(stale_count(p, "nanodetd/box/status", b"2", none).is_none());
        assert!(stale_count(p, "nanodetd/box/a/b/c", b"2", none).is_none());
        assert!(stale_count(p, "nanodetd/box//person", b"2", none).is_none());
        // Another prefix, or one that merely starts the same.
        assert!(stale_count(p, "nanodetd/other/front/person", b"2", none).is_none());
        assert!(stale_count(p, "nanodetd/boxer/front/person", b"2", none).is_none());
    }

    #[test]
    fn the_sweep_subscribes_on_every_connect_and_unsubscribes_at_the_suback() {
        let mut sweep = CountSweep::new();
        assert!(sweep.connected());
        assert!(sweep.subscribed());
        assert!(!sweep.subscribed(), "one UNSUBSCRIBE per SUBACK");
        sweep.unsubscribed();
        assert_eq!(sweep.connection_lost(), None, "lost after the sweep");
        assert!(sweep.connected(), "and again on the next connect");
        assert_eq!(CountSweep::filter("nanodetd/box"), "nanodetd/box/+/+");
    }

    /// A retained message larger than the packet limit fails the
    /// connection each time it is sent; the sweep must not make that a
    /// reconnect loop.
    #[test]
    fn connections_lost_twice_running_during_the_sweep_turn_it_off() {
        let mut sweep = CountSweep::new();
        assert!(sweep.connected());
        assert_eq!(
            sweep.connection_lost(),
            None,
            "one loss may be a broker restart"
        );
        assert!(sweep.connected());
        assert!(sweep.subscribed());
        assert!(
            sweep
                .connection_lost()
                .unwrap()
                .contains("no longer cleared")
        );
        assert!(!sweep.connected(), "off for this run");
        assert!(!sweep.subscribed());

        // A completed sweep between two losses starts the count again.
        let mut sweep = CountSweep::new();
        assert!(sweep.connected());
        assert_eq!(sweep.connection_lost(), None);
        assert!(sweep.connected());
        assert!(sweep.subscribed());
        sweep.unsubscribed();
        assert!(sweep.connected());
        assert_eq!(sweep.connection_lost(), None);
        assert!(sweep.connected());
    }
}
