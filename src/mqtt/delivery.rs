//! MQTT delivery as a state machine: link events and the time in, requests
//! to the link and the outbox out.
//!
//! It keeps what makes delivery at least once and in order: the in-flight
//! list (a message stays there from its hand-over to rumqttc until the
//! broker acknowledges it, or it is written for QoS 0), the packet ids
//! matched to it, the retained state re-announced on every connect, the
//! count sweep, and the reconnect back-off. The MQTT task ([`super::MqttTask`])
//! polls rumqttc, sleeps and watches the config; every decision is here.
//! The tests drive it with a fake link and a fake clock.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::sweep::{self, CountSweep};
use super::{Message, Outbox, Taken, TopicClass, TopicRoot, publish_size, qos_of};
use crate::config::QosConfig;

/// How long a connection must last for the reconnect back-off to start
/// over from its first step.
pub(super) const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// The first reconnect delay.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);

/// What delivery asks of the link. Each request may be refused when
/// rumqttc's request channel is full.
pub(super) trait Requests {
    /// Hands a PUBLISH over; false if refused.
    fn publish(&mut self, topic: String, qos: u8, retain: bool, payload: Vec<u8>) -> bool;
    /// Hands a SUBSCRIBE (QoS 0) over; false if refused.
    fn subscribe(&mut self, filter: &str) -> bool;
    /// Hands an UNSUBSCRIBE over, if there is room.
    fn unsubscribe(&mut self, filter: &str);
}

/// A message handed to the link, kept until the broker has it.
#[derive(Debug)]
struct InFlight {
    message: Message,
    qos: u8,
    /// Set when the link wrote it.
    pkid: Option<u16>,
    /// Written to an earlier connection and never acknowledged.
    was_in_doubt: bool,
    /// `online` or a retained republish: sent again on every connect, so
    /// never requeued or counted.
    announce: bool,
}

/// Why the daemon subscribed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Subscription {
    /// Home Assistant's birth topic, for the connection's lifetime.
    Birth,
    /// The count sweep, until its SUBACK.
    Sweep,
}

/// What a lost connection leads to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Lost {
    /// Whether the connection had been made (else connecting failed).
    pub was_connected: bool,
    /// Messages handed over but unacknowledged, now back in the outbox.
    pub requeued: usize,
    /// How long to wait before connecting again.
    pub retry_in: Duration,
}

/// Delivery for the daemon's lifetime, across connections.
#[derive(Debug)]
pub(super) struct Delivery {
    /// Topics go out as `<prefix>/<topic>`.
    prefix: String,
    qos: QosConfig,
    max_message_bytes: usize,
    /// The longest back-off (`mqtt.reconnect_max`).
    backoff_max: Duration,
    /// When the current connection was made; None while not connected.
    connected_at: Option<Instant>,
    in_flight: VecDeque<InFlight>,
    /// Retained messages as the broker last acknowledged them, by topic;
    /// an empty one (a deletion) removes its topic.
    retained: BTreeMap<(TopicRoot, String), Message>,
    sweep: CountSweep,
    /// Home Assistant's birth topic, when discovery is on: its `online`
    /// means it restarted, and the retained state is announced again.
    birth_topic: Option<String>,
    /// What each SUBSCRIBE of this connection was for, in the order sent:
    /// SUBACKs come back in that order.
    awaiting_suback: VecDeque<Subscription>,
    backoff: Duration,
    connections: u64,
}

impl Delivery {
    /// Nothing connected or delivered yet.
    pub(super) fn new(
        prefix: String,
        qos: QosConfig,
        max_message_bytes: usize,
        reconnect_max: f32,
    ) -> Delivery {
        let mut delivery = Delivery {
            prefix: String::new(),
            qos,
            max_message_bytes,
            backoff_max: FIRST_BACKOFF,
            connected_at: None,
            in_flight: VecDeque::new(),
            retained: BTreeMap::new(),
            sweep: CountSweep::new(),
            birth_topic: None,
            awaiting_suback: VecDeque::new(),
            backoff: FIRST_BACKOFF,
            connections: 0,
        };
        delivery.settings(prefix, qos, max_message_bytes, reconnect_max);
        delivery
    }

    /// The settings of the next connection. Retained state is kept: a
    /// new prefix gets it too.
    pub(super) fn settings(
        &mut self,
        prefix: String,
        qos: QosConfig,
        max_message_bytes: usize,
        reconnect_max: f32,
    ) {
        self.prefix = prefix;
        self.qos = qos;
        self.max_message_bytes = max_message_bytes;
        // The config keeps reconnect_max within (0, 3600].
        self.backoff_max = Duration::from_secs_f64(f64::from(reconnect_max).max(0.5));
    }

    /// Home Assistant's birth topic, subscribed to from the next
    /// connection on (None: discovery is off).
    pub(super) fn set_birth_topic(&mut self, topic: Option<String>) {
        self.birth_topic = topic;
    }

    /// QoS changes apply to messages handed over from now on.
    pub(super) fn set_qos(&mut self, qos: QosConfig) {
        self.qos = qos;
    }

    /// Whether a connection is up.
    pub(super) fn is_connected(&self) -> bool {
        self.connected_at.is_some()
    }

    /// Messages handed over and not yet acknowledged.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Connections made so far, the first included.
    pub(super) fn connections(&self) -> u64 {
        self.connections
    }

    /// Topics under which this run publishes.
    pub(super) fn prefix(&self) -> &str {
        &self.prefix
    }

    /// CONNACK: subscribe to Home Assistant's birth topic and for the
    /// count sweep, announce `online` and the retained state, then hand
    /// over what waits.
    pub(super) fn connected(&mut self, now: Instant, link: &mut dyn Requests, outbox: &Outbox) {
        self.connected_at = Some(now);
        self.connections += 1;
        self.awaiting_suback.clear();
        // Before the announce fills rumqttc's channel.
        if let Some(birth) = &self.birth_topic
            && link.subscribe(birth)
        {
            self.awaiting_suback.push_back(Subscription::Birth);
        }
        if self.sweep.connected() {
            if link.subscribe(&CountSweep::filter(&self.prefix)) {
                self.awaiting_suback.push_back(Subscription::Sweep);
            } else {
                self.sweep.not_subscribed();
            }
        }
        self.announce(link, outbox);
        self.feed(link, outbox);
    }

    /// A SUBACK: the sweep's ends its subscription.
    pub(super) fn subscribed(&mut self, link: &mut dyn Requests) {
        if self.awaiting_suback.pop_front() == Some(Subscription::Sweep) && self.sweep.subscribed()
        {
            link.unsubscribe(&CountSweep::filter(&self.prefix));
        }
    }

    /// A message on a subscribed topic: a retained count for the sweep, or
    /// Home Assistant's live `online` on its birth topic, after which the
    /// retained state (its discovery configs among them) is announced
    /// again. A birth message the broker held retained is not a restart.
    pub(super) fn received(
        &mut self,
        topic: &str,
        payload: &[u8],
        retained: bool,
        link: &mut dyn Requests,
        outbox: &Outbox,
    ) {
        if self.birth_topic.as_deref() == Some(topic) {
            if !retained && payload == b"online" && self.is_connected() {
                log::info!("MQTT: Home Assistant came online; announcing discovery again");
                self.announce(link, outbox);
            }
        } else if retained {
            self.retained_seen(topic, payload, outbox);
        }
    }

    /// UNSUBACK.
    pub(super) fn unsubscribed(&mut self) {
        self.sweep.unsubscribed();
    }

    /// A retained message the broker sent because of the sweep: a count an
    /// earlier run left, and this run has not set, is set to 0.
    fn retained_seen(&mut self, topic: &str, payload: &[u8], outbox: &Outbox) {
        let ours = |t: &str| {
            self.retained
                .contains_key(&(TopicRoot::Prefix, t.to_owned()))
                || self.in_flight.iter().any(|f| f.message.topic == t)
                || outbox.holds(t)
        };
        if let Some(zero) = sweep::stale_count(&self.prefix, topic, payload, ours) {
            log::info!(
                "MQTT: {topic} was left retained at {} by an earlier run; publishing 0",
                String::from_utf8_lossy(payload)
            );
            outbox.push(zero);
        }
    }

    /// The link wrote a PUBLISH with this packet id (0 for QoS 0).
    /// rumqttc writes in channel order, so it is the oldest one not yet
    /// numbered.
    pub(super) fn sent(&mut self, pkid: u16, outbox: &Outbox) {
        let Some(i) = self.in_flight.iter().position(|f| f.pkid.is_none()) else {
            return; // `offline` at shutdown
        };
        if self.in_flight[i].qos == 0 {
            if let Some(done) = self.in_flight.remove(i) {
                self.delivered(done, outbox);
            }
        } else {
            self.in_flight[i].pkid = Some(pkid);
        }
    }

    /// The broker acknowledged this packet id (PUBACK, or PUBCOMP).
    pub(super) fn acked(&mut self, pkid: u16, outbox: &Outbox) {
        if let Some(i) = self.in_flight.iter().position(|f| f.pkid == Some(pkid))
            && let Some(done) = self.in_flight.remove(i)
        {
            self.delivered(done, outbox);
        }
    }

    /// Hands messages from the outbox to the link while it takes them. A
    /// message that could never be sent, being larger than the packet
    /// limit, is dropped and counted: handed over it would fail the
    /// connection, come back to the head of the queue, and block
    /// everything behind it for good.
    pub(super) fn feed(&mut self, link: &mut dyn Requests, outbox: &Outbox) {
        if !self.is_connected() {
            return;
        }
        while let Some(Taken { message, in_doubt }) = outbox.pop() {
            let qos = qos_of(message.class, &self.qos);
            let topic = message.full_topic(&self.prefix);
            let size = publish_size(&topic, &message.payload);
            if size > self.max_message_bytes {
                let n = outbox.0.oversized.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!(
                        "MQTT: dropped a {size}-byte message on {topic}, over mqtt.max_message_bytes = {} ({n} so far)",
                        self.max_message_bytes
                    );
                }
                continue;
            }
            if !link.publish(topic, qos, message.retain, message.payload.clone()) {
                outbox.unpop(std::iter::once(Taken { message, in_doubt }));
                return;
            }
            self.in_flight.push_back(InFlight {
                message,
                qos,
                pkid: None,
                was_in_doubt: in_doubt,
                announce: false,
            });
        }
    }

    /// The connection failed, or could not be made: what was handed over
    /// goes back to the front of the outbox, in order, and the back-off
    /// says when to try again. It starts over only after a connection
    /// that lasted [`STABLE_CONNECTION`]: a broker that closes each
    /// connection right after its CONNACK is not retried at the first
    /// step's rate for ever.
    pub(super) fn lost(&mut self, now: Instant, outbox: &Outbox) -> Lost {
        let was_connected = self.is_connected();
        if self
            .connected_at
            .is_some_and(|at| now.saturating_duration_since(at) >= STABLE_CONNECTION)
        {
            self.backoff = FIRST_BACKOFF;
        }
        if let Some(warning) = self.sweep.connection_lost() {
            log::warn!("MQTT: {warning}");
        }
        let requeued = self.requeue(outbox);
        let retry_in = self.next_backoff();
        Lost {
            was_connected,
            requeued,
            retry_in,
        }
    }

    /// The link is closed on purpose (a reconnect for new settings, or
    /// shutdown): what was handed over goes back to the outbox.
    pub(super) fn closed(&mut self, outbox: &Outbox) {
        self.requeue(outbox);
    }

    /// Connecting could not even start (a certificate unreadable): how
    /// long to wait.
    pub(super) fn cannot_open(&mut self) -> Duration {
        self.next_backoff()
    }

    /// This retry's wait; the next one's doubles, up to the maximum.
    fn next_backoff(&mut self) -> Duration {
        let retry_in = self.backoff;
        self.backoff = (self.backoff * 2).min(self.backoff_max);
        retry_in
    }

    /// Before a clean disconnect: `offline`, retained, so the last will is
    /// not needed. False when not connected.
    pub(super) fn say_offline(&mut self, link: &mut dyn Requests) -> bool {
        if !self.is_connected() {
            return false;
        }
        let topic = format!("{}/available", self.prefix);
        link.publish(topic, self.qos.state.get(), true, b"offline".to_vec());
        true
    }

    /// `online` and the last acknowledged retained state.
    /// `online`, and the retained state as the broker last acknowledged
    /// it. A topic with a newer message waiting or in flight is left to
    /// that message: announcing the older one after it would roll the
    /// broker back (a count, or a deleted discovery config brought back).
    /// One that no longer fits `max_message_bytes` (lowered by a reload)
    /// is forgotten: handed over, it would fail every connection.
    fn announce(&mut self, link: &mut dyn Requests, outbox: &Outbox) {
        let online = Message {
            topic: "available".into(),
            payload: b"online".to_vec(),
            class: TopicClass::State,
            root: TopicRoot::Prefix,
            retain: true,
            captured: None,
        };
        let prefix = self.prefix.clone();
        let limit = self.max_message_bytes;
        self.retained.retain(|(_, _), m| {
            let size = publish_size(&m.full_topic(&prefix), &m.payload);
            if size > limit {
                log::warn!(
                    "MQTT: no longer announcing {} ({size} bytes): over mqtt.max_message_bytes = {limit}",
                    m.full_topic(&prefix)
                );
            }
            size <= limit
        });
        let pending = |m: &Message| {
            self.in_flight
                .iter()
                .any(|f| !f.announce && f.message.root == m.root && f.message.topic == m.topic)
                || outbox.holds_on(m.root, &m.topic)
        };
        let due: Vec<Message> = std::iter::once(online)
            .chain(self.retained.values().filter(|m| !pending(m)).cloned())
            .collect();
        for message in due {
            let qos = qos_of(message.class, &self.qos);
            let topic = message.full_topic(&self.prefix);
            if link.publish(topic, qos, true, message.payload.clone()) {
                self.in_flight.push_back(InFlight {
                    message,
                    qos,
                    pkid: None,
                    was_in_doubt: false,
                    announce: true,
                });
            }
        }
    }

    fn delivered(&mut self, done: InFlight, outbox: &Outbox) {
        if done.announce {
            return;
        }
        let message = done.message;
        if message.class == TopicClass::Events {
            outbox.event_delivered(&message);
        }
        if message.retain {
            let key = (message.root, message.topic.clone());
            if message.payload.is_empty() {
                self.retained.remove(&key);
            } else {
                self.retained.insert(key, message);
            }
        }
    }

    fn requeue(&mut self, outbox: &Outbox) -> usize {
        self.connected_at = None;
        // Written (numbered) means the broker may have it; so may a message
        // in doubt from before that this connection never wrote.
        let pending: Vec<Taken> = self
            .in_flight
            .drain(..)
            .filter(|f| !f.announce)
            .map(|f| Taken {
                in_doubt: f.was_in_doubt || f.pkid.is_some(),
                message: f.message,
            })
            .collect();
        let n = pending.len();
        outbox.unpop(pending.into_iter());
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rumqttc's request channel, as far as delivery sees it: what was
    /// handed over, and how much room is left.
    #[derive(Default)]
    struct FakeLink {
        room: usize,
        published: Vec<(String, u8, bool, Vec<u8>)>,
        subscribed: Vec<String>,
        unsubscribed: Vec<String>,
    }

    impl FakeLink {
        fn with_room(room: usize) -> FakeLink {
            FakeLink {
                room,
                ..FakeLink::default()
            }
        }

        fn topics(&self) -> Vec<&str> {
            self.published.iter().map(|p| p.0.as_str()).collect()
        }
    }

    impl Requests for FakeLink {
        fn publish(&mut self, topic: String, qos: u8, retain: bool, payload: Vec<u8>) -> bool {
            if self.room == 0 {
                return false;
            }
            self.room -= 1;
            self.published.push((topic, qos, retain, payload));
            true
        }
        fn subscribe(&mut self, filter: &str) -> bool {
            self.subscribed.push(filter.to_owned());
            true
        }
        fn unsubscribe(&mut self, filter: &str) {
            self.unsubscribed.push(filter.to_owned());
        }
    }

    fn qos(events: u8) -> QosConfig {
        toml::from_str(&format!(
            "events = {events}\nstate = 1\ndetections = 0\nstats = 0"
        ))
        .unwrap()
    }

    fn delivery(events_qos: u8) -> Delivery {
        Delivery::new("home/cam".into(), qos(events_qos), 1000, 8.0)
    }

    fn event(n: usize) -> Message {
        Message {
            topic: format!("door/events/{n}"),
            payload: n.to_string().into_bytes(),
            class: TopicClass::Events,
            root: TopicRoot::Prefix,
            retain: false,
            captured: None,
        }
    }

    fn count(label: &str, n: usize) -> Message {
        super::super::count_message("door", label, n)
    }

    fn queued(outbox: &Outbox) -> Vec<String> {
        std::iter::from_fn(|| outbox.pop())
            .map(|t| t.message.topic)
            .collect()
    }

    #[test]
    fn nothing_is_handed_over_before_the_connack_then_online_comes_first() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(10);
        outbox.push(event(0));
        d.feed(&mut link, &outbox);
        assert!(link.published.is_empty());
        d.connected(Instant::now(), &mut link, &outbox);
        assert_eq!(link.subscribed, ["home/cam/+/+"]);
        assert_eq!(
            link.topics(),
            ["home/cam/available", "home/cam/door/events/0"]
        );
        assert_eq!(link.published[0].3, b"online");
        assert_eq!(d.in_flight(), 2);
    }

    #[test]
    fn a_qos_1_message_is_delivered_when_its_packet_id_is_acknowledged() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(10);
        d.connected(Instant::now(), &mut link, &outbox);
        for n in 0..2 {
            outbox.push(event(n));
        }
        d.feed(&mut link, &outbox);
        // online, then the two events, each numbered as it is written.
        d.sent(1, &outbox);
        d.sent(2, &outbox);
        d.sent(3, &outbox);
        d.acked(3, &outbox);
        assert_eq!(outbox.snapshot().events_delivered, 1);
        d.acked(7, &outbox); // no such packet
        d.acked(2, &outbox);
        d.acked(1, &outbox);
        assert_eq!((outbox.snapshot().events_delivered, d.in_flight()), (2, 0));
    }

    #[test]
    fn a_qos_0_message_is_delivered_once_written() {
        let outbox = Outbox::new(10);
        let mut d = delivery(0);
        let mut link = FakeLink::with_room(10);
        d.connected(Instant::now(), &mut link, &outbox);
        d.sent(1, &outbox); // online, QoS 1: numbered, waits for its ack
        outbox.push(event(0));
        d.feed(&mut link, &outbox);
        d.sent(0, &outbox);
        assert_eq!((outbox.snapshot().events_delivered, d.in_flight()), (1, 1));
    }

    #[test]
    fn a_full_link_leaves_the_rest_queued_in_order() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(3);
        for n in 0..5 {
            outbox.push(event(n));
        }
        d.connected(Instant::now(), &mut link, &outbox);
        assert_eq!(
            link.topics(),
            [
                "home/cam/available",
                "home/cam/door/events/0",
                "home/cam/door/events/1"
            ]
        );
        assert_eq!(
            queued(&outbox),
            ["door/events/2", "door/events/3", "door/events/4"]
        );
    }

    #[test]
    fn a_message_over_the_packet_limit_is_dropped_and_counted_and_the_rest_go() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(10);
        d.connected(Instant::now(), &mut link, &outbox);
        outbox.push(event(0));
        outbox.push(Message {
            payload: vec![b'x'; 1000],
            ..event(1)
        });
        outbox.push(event(2));
        d.feed(&mut link, &outbox);
        assert_eq!(
            link.topics(),
            [
                "home/cam/available",
                "home/cam/door/events/0",
                "home/cam/door/events/2"
            ]
        );
        assert_eq!(outbox.snapshot().oversized, 1);
    }

    #[test]
    fn a_lost_connection_requeues_what_was_unacknowledged_in_order_but_not_the_announce() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(10);
        let t0 = Instant::now();
        d.connected(t0, &mut link, &outbox);
        for n in 0..3 {
            outbox.push(event(n));
        }
        d.feed(&mut link, &outbox);
        for pkid in 1..=4 {
            d.sent(pkid, &outbox);
        }
        d.acked(2, &outbox); // event 0
        outbox.push(event(3)); // queued behind the rest
        let lost = d.lost(t0 + Duration::from_secs(1), &outbox);
        assert_eq!(
            lost,
            Lost {
                was_connected: true,
                requeued: 2,
                retry_in: FIRST_BACKOFF
            }
        );
        assert!(!d.is_connected());
        assert_eq!(
            queued(&outbox),
            ["door/events/1", "door/events/2", "door/events/3"]
        );
    }

    /// Issue 17: the fresh root received an event counted dropped. It had
    /// been written, its ack was lost with the connection, and the full
    /// outbox dropped it during the outage.
    #[test]
    fn what_was_written_stays_in_doubt_across_connections_and_is_never_dropped() {
        let outbox = Outbox::new(2);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(10);
        let t0 = Instant::now();
        d.connected(t0, &mut link, &outbox);
        for n in 0..2 {
            outbox.push(event(n));
        }
        d.feed(&mut link, &outbox);
        // online and event 0 written; event 1 still in the channel.
        d.sent(1, &outbox);
        d.sent(2, &outbox);
        d.lost(t0 + Duration::from_secs(1), &outbox);
        // The outage: three new events into an outbox of two.
        for n in 2..5 {
            outbox.push(event(n));
        }
        let s = outbox.snapshot();
        assert_eq!((s.queued, s.events_dropped), (3, 2), "{s:?}");
        // The next connection fails before writing anything: event 0 is
        // still in doubt, and survives the next overflow too.
        let mut again = FakeLink::with_room(10);
        d.connected(t0 + Duration::from_secs(2), &mut again, &outbox);
        assert_eq!(again.topics()[1], "home/cam/door/events/0");
        d.lost(t0 + Duration::from_secs(3), &outbox);
        outbox.push(event(5));
        outbox.push(event(6));
        assert_eq!(
            queued(&outbox),
            ["door/events/0", "door/events/5", "door/events/6"]
        );
        let s = outbox.snapshot();
        assert_eq!((s.events_queued, s.events_dropped), (7, 4), "{s:?}");
    }

    #[test]
    fn acknowledged_retained_state_is_announced_again_on_every_connect() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(10);
        let t0 = Instant::now();
        d.connected(t0, &mut link, &outbox);
        outbox.push(count("person", 2));
        outbox.push(count("cat", 1));
        d.feed(&mut link, &outbox);
        for pkid in 1..=3 {
            d.sent(pkid, &outbox);
        }
        d.acked(2, &outbox); // person 2; cat 1 is never acknowledged
        d.lost(t0 + Duration::from_secs(1), &outbox);
        assert_eq!(queued(&outbox), ["door/cat"]);
        let mut again = FakeLink::with_room(10);
        d.connected(t0 + Duration::from_secs(2), &mut again, &outbox);
        let announced: Vec<(&str, &[u8], bool)> = again
            .published
            .iter()
            .map(|p| (p.0.as_str(), p.3.as_slice(), p.2))
            .collect();
        assert_eq!(
            announced,
            [
                ("home/cam/available", &b"online"[..], true),
                ("home/cam/door/person", &b"2"[..], true)
            ]
        );
        assert_eq!(d.connections(), 2);
    }

    #[test]
    fn the_back_off_doubles_to_its_maximum_and_starts_over_after_a_stable_connection() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(100);
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..6 {
            let lost = d.lost(now, &outbox);
            assert!(!lost.was_connected);
            waits.push(lost.retry_in.as_secs_f32());
            now += lost.retry_in;
        }
        assert_eq!(waits, [0.5, 1.0, 2.0, 4.0, 8.0, 8.0]);
        // A broker that closes each connection right after its CONNACK
        // does not reset the back-off...
        d.connected(now, &mut link, &outbox);
        let lost = d.lost(now + Duration::from_secs(1), &outbox);
        assert_eq!(
            (lost.was_connected, lost.retry_in.as_secs_f32()),
            (true, 8.0)
        );
        // ...one that lasted 10 s does.
        now += Duration::from_secs(20);
        d.connected(now, &mut link, &outbox);
        let lost = d.lost(now + STABLE_CONNECTION, &outbox);
        assert_eq!(lost.retry_in, FIRST_BACKOFF);
    }

    #[test]
    fn offline_is_said_only_on_a_connection() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(10);
        assert!(!d.say_offline(&mut link));
        d.connected(Instant::now(), &mut link, &outbox);
        assert!(d.say_offline(&mut link));
        let last = link.published.last().unwrap();
        assert_eq!(
            (last.0.as_str(), last.1, last.2, last.3.as_slice()),
            ("home/cam/available", 1, true, &b"offline"[..])
        );
    }

    #[test]
    fn a_count_an_earlier_run_left_is_set_to_0_unless_this_run_set_it() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(10);
        d.connected(Instant::now(), &mut link, &outbox);
        d.subscribed(&mut link);
        assert_eq!(link.unsubscribed, ["home/cam/+/+"]);
        outbox.push(count("cat", 1));
        d.retained_seen("home/cam/door/person", b"2", &outbox);
        d.retained_seen("home/cam/door/cat", b"3", &outbox);
        d.retained_seen("home/cam/door/dog", b"0", &outbox);
        let zeros: Vec<(String, Vec<u8>)> = std::iter::from_fn(|| outbox.pop())
            .map(|t| (t.message.topic, t.message.payload))
            .collect();
        assert_eq!(
            zeros,
            [
                ("door/cat".to_owned(), b"1".to_vec()),
                ("door/person".to_owned(), b"0".to_vec())
            ]
        );
    }

    /// Issue 19: Home Assistant's `online` (live, not a retained copy)
    /// gets the retained state announced again, discovery configs among
    /// them; the birth topic's SUBACK, which comes first, does not end the
    /// sweep, and an emptied (deleted) config is not announced again.
    #[test]
    fn home_assistants_birth_announces_the_retained_state_again_issue_19() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        d.set_birth_topic(Some("homeassistant/status".into()));
        let mut link = FakeLink::with_room(20);
        d.connected(Instant::now(), &mut link, &outbox);
        assert_eq!(link.subscribed, ["homeassistant/status", "home/cam/+/+"]);
        d.subscribed(&mut link);
        assert!(link.unsubscribed.is_empty(), "the birth topic's SUBACK");
        d.subscribed(&mut link);
        assert_eq!(link.unsubscribed, ["home/cam/+/+"]);
        let config = |topic: &str, payload: &[u8]| Message {
            topic: topic.into(),
            root: TopicRoot::Broker,
            payload: payload.to_vec(),
            class: TopicClass::State,
            retain: true,
            captured: None,
        };
        outbox.push(config("homeassistant/sensor/n/a/config", b"{}"));
        outbox.push(config("homeassistant/sensor/n/b/config", b"{}"));
        outbox.push(count("person", 1));
        outbox.push(config("homeassistant/sensor/n/b/config", b""));
        d.feed(&mut link, &outbox);
        for pkid in 1..=5 {
            d.sent(pkid, &outbox);
            d.acked(pkid, &outbox);
        }
        let before = link.published.len();
        d.received("homeassistant/status", b"online", true, &mut link, &outbox);
        assert_eq!(
            link.published.len(),
            before,
            "a retained birth is no restart"
        );
        d.received(
            "homeassistant/status",
            b"offline",
            false,
            &mut link,
            &outbox,
        );
        assert_eq!(link.published.len(), before);
        d.received("homeassistant/status", b"online", false, &mut link, &outbox);
        let again: Vec<&str> = link.topics()[before..].to_vec();
        assert_eq!(
            again,
            [
                "home/cam/available",
                "home/cam/door/person",
                "homeassistant/sensor/n/a/config",
            ]
        );
    }

    /// Issue 19 (review): announcing the acknowledged state must not roll
    /// back a newer message waiting on the same topic, and a retained
    /// message over a lowered size limit is no longer announced (it would
    /// fail every connection).
    #[test]
    fn the_announce_skips_topics_with_newer_messages_and_what_no_longer_fits_issue_19() {
        let outbox = Outbox::new(10);
        let mut d = delivery(1);
        let mut link = FakeLink::with_room(20);
        let t0 = Instant::now();
        d.connected(t0, &mut link, &outbox);
        outbox.push(count("person", 2));
        outbox.push(count("cat", 1));
        outbox.push(Message {
            payload: vec![b'j'; 900],
            ..count("snapshot", 0)
        });
        d.feed(&mut link, &outbox);
        for pkid in 1..=4 {
            d.sent(pkid, &outbox);
            d.acked(pkid, &outbox);
        }
        d.lost(t0 + Duration::from_secs(1), &outbox);
        // While down: the person count changes, and the limit drops below
        // the picture's size.
        outbox.push(count("person", 0));
        d.settings("home/cam".into(), qos(1), 500, 8.0);
        let mut again = FakeLink::with_room(20);
        d.connected(t0 + Duration::from_secs(2), &mut again, &outbox);
        assert_eq!(
            again.topics(),
            [
                "home/cam/available",
                "home/cam/door/cat",
                "home/cam/door/person"
            ]
        );
        assert_eq!(again.published[2].3, b"0", "the newer count, not the old 2");
    }
}
