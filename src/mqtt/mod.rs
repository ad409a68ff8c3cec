//! MQTT publishing: the bounded [`Outbox`] the pipeline writes into, and
//! the task that carries it to the broker with rumqttc (3.1.1 or 5).
//!
//! Delivery is at least once and in order, across reconnects and broker
//! restarts: a message leaves the outbox for rumqttc only while connected,
//! and stays in the in-flight list until the broker acknowledges it
//! (QoS 1/2) or it is written (QoS 0). On a connection error everything
//! unacknowledged goes back to the front of the outbox. Those decisions
//! are made in `delivery`, a state machine the task feeds with link
//! events and the time; the task polls rumqttc and sleeps. rumqttc's own
//! replay is not relied on: with a clean session it drops its pending
//! packets on reconnect. Topics in [`Message`] are relative to the prefix,
//! which is applied when the message is sent.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot, watch};

use crate::config::{Config, MqttConfig, MqttProtocol, QosConfig};
use delivery::{Delivery, Requests};

mod delivery;
pub mod homeassistant;
mod payload;
mod sweep;

pub use payload::{
    EventContext, FrameTiming, SCHEMA, SnapshotRef, camera_available_message, count_message,
    detections_message, event_message, frigate_event_message, label_level, snapshot_messages,
    stats_message, status_message, zone_count_message,
};

/// Which QoS setting a message follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicClass {
    /// Object events.
    Events,
    /// Retained state: counts, availability, status.
    State,
    /// Raw per-frame detections.
    Detections,
    /// Periodic statistics.
    Stats,
}

/// What a message's topic is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TopicRoot {
    /// Below the daemon's prefix: `front/events` goes out as
    /// `<prefix>/front/events`.
    Prefix,
    /// The broker's root, as it is: Home Assistant's discovery topics,
    /// which live under its own prefix.
    Broker,
}

/// One message.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Topic, relative to `root`: e.g. `front/events` below the prefix.
    pub topic: String,
    /// What the topic is relative to.
    pub root: TopicRoot,
    /// JSON or plain text.
    pub payload: Vec<u8>,
    /// QoS class.
    pub class: TopicClass,
    /// Retained on the broker.
    pub retain: bool,
    /// When the frame behind an event message was captured: its delivery
    /// is timed from then (`nanodetd_event_latency_seconds`).
    pub captured: Option<Instant>,
}

impl Message {
    /// The topic as it goes to the broker, under `prefix`.
    pub fn full_topic(&self, prefix: &str) -> String {
        match self.root {
            TopicRoot::Prefix => format!("{prefix}/{}", self.topic),
            TopicRoot::Broker => self.topic.clone(),
        }
    }
}

/// An upper bound on the size of the PUBLISH packet carrying `payload` on
/// `topic`, for MQTT 3.1.1 and 5 alike: fixed header (at most 5 bytes),
/// topic length (2), packet id (2), MQTT 5's empty properties (1), with
/// room to spare. What `mqtt.max_message_bytes` is checked against.
pub fn publish_size(topic: &str, payload: &[u8]) -> usize {
    topic.len().saturating_add(payload.len()).saturating_add(16)
}

/// The outbox's two queues, under one lock.
#[derive(Debug, Default)]
struct Queues {
    /// Messages written to an earlier connection and never acknowledged:
    /// the broker may have them. They go out first and are never dropped
    /// for room, or a message the broker passed on would be counted
    /// dropped. Their number is bounded by what a connection can have in
    /// flight ([`IN_FLIGHT_WINDOW`]).
    in_doubt: VecDeque<Message>,
    /// Messages never written: bounded by the capacity, the oldest
    /// dropped first.
    unsent: VecDeque<Message>,
}

/// A message taken from the outbox.
#[derive(Debug)]
pub(crate) struct Taken {
    pub(crate) message: Message,
    /// Written to an earlier connection and never acknowledged.
    pub(crate) in_doubt: bool,
}

#[derive(Debug)]
struct OutboxState {
    queue: Mutex<Queues>,
    capacity: AtomicUsize,
    dropped: AtomicU64,
    events_dropped: AtomicU64,
    oversized: AtomicU64,
    events_queued: AtomicU64,
    events_delivered: AtomicU64,
    /// Capture to delivery of event messages, set by the daemon.
    event_latency: std::sync::OnceLock<prometheus::Histogram>,
    notify: Notify,
}

/// The bounded queue between the pipeline and the broker. When full, the
/// oldest message never written to the broker is dropped and counted, so a
/// long outage costs history, never memory. Messages written and not
/// acknowledged when a connection failed are kept and sent again: the
/// broker may have passed them on, and QoS 1 promises at least once.
#[derive(Debug, Clone)]
pub struct Outbox(Arc<OutboxState>);

/// Outbox counters, for the stats topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OutboxSnapshot {
    /// Messages waiting, those in doubt included.
    pub queued: usize,
    /// Messages dropped because the queue was full; never one that was
    /// written to the broker.
    pub dropped: u64,
    /// Of those, event messages: with `events_delivered`, what accounts
    /// for every event queued.
    pub events_dropped: u64,
    /// Messages dropped because they were larger than
    /// `mqtt.max_message_bytes`: no broker would take them.
    pub oversized: u64,
    /// Event messages accepted since start.
    pub events_queued: u64,
    /// Event messages the broker acknowledged since start.
    pub events_delivered: u64,
}

impl Outbox {
    /// An empty outbox holding at most `capacity` messages.
    pub fn new(capacity: usize) -> Outbox {
        Outbox(Arc::new(OutboxState {
            queue: Mutex::new(Queues::default()),
            capacity: AtomicUsize::new(capacity.max(1)),
            dropped: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            oversized: AtomicU64::new(0),
            events_queued: AtomicU64::new(0),
            events_delivered: AtomicU64::new(0),
            event_latency: std::sync::OnceLock::new(),
            notify: Notify::new(),
        }))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queues> {
        self.0.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a message, dropping the oldest unsent one if full. A
    /// retained message replaces an unsent one on its topic: only the
    /// newest state matters, and a long outage then holds one snapshot
    /// per topic, not one per picture taken.
    pub fn push(&self, message: Message) {
        if message.class == TopicClass::Events {
            self.0.events_queued.fetch_add(1, Ordering::Relaxed);
        }
        let dropped = {
            let unsent = &mut self.queue().unsent;
            if message.retain
                && let Some(i) = unsent
                    .iter()
                    .position(|m| m.retain && m.root == message.root && m.topic == message.topic)
            {
                unsent.remove(i);
            }
            let dropped = unsent.len() >= self.0.capacity.load(Ordering::Relaxed);
            if dropped
                && unsent
                    .pop_front()
                    .is_some_and(|m| m.class == TopicClass::Events)
            {
                self.0.events_dropped.fetch_add(1, Ordering::Relaxed);
            }
            unsent.push_back(message);
            dropped
        };
        if dropped {
            let n = self.0.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            // One line per power of two keeps the journal readable through
            // a day-long outage.
            if n.is_power_of_two() {
                log::warn!("MQTT outbox full: {n} oldest messages dropped so far");
            }
        }
        self.0.notify.notify_one();
    }

    /// Times each delivered event message from its frame's capture into
    /// `histogram`; set once.
    pub fn time_events(&self, histogram: prometheus::Histogram) {
        let _ = self.0.event_latency.set(histogram);
    }

    /// An event message reached the broker (acknowledged, or written for
    /// QoS 0).
    fn event_delivered(&self, message: &Message) {
        self.0.events_delivered.fetch_add(1, Ordering::Relaxed);
        if let (Some(captured), Some(histogram)) = (message.captured, self.0.event_latency.get()) {
            histogram.observe(captured.elapsed().as_secs_f64());
        }
    }

    /// Changes the capacity (hot reload); a smaller one drops the oldest.
    pub fn set_capacity(&self, capacity: usize) {
        self.0.capacity.store(capacity.max(1), Ordering::Relaxed);
    }

    /// Current counters.
    pub fn snapshot(&self) -> OutboxSnapshot {
        let queued = {
            let queue = self.queue();
            queue.in_doubt.len() + queue.unsent.len()
        };
        OutboxSnapshot {
            queued,
            dropped: self.0.dropped.load(Ordering::Relaxed),
            events_dropped: self.0.events_dropped.load(Ordering::Relaxed),
            oversized: self.0.oversized.load(Ordering::Relaxed),
            events_queued: self.0.events_queued.load(Ordering::Relaxed),
            events_delivered: self.0.events_delivered.load(Ordering::Relaxed),
        }
    }

    /// The next message to send: those in doubt first.
    fn pop(&self) -> Option<Taken> {
        let mut queue = self.queue();
        if let Some(message) = queue.in_doubt.pop_front() {
            return Some(Taken {
                message,
                in_doubt: true,
            });
        }
        let message = queue.unsent.pop_front()?;
        Some(Taken {
            message,
            in_doubt: false,
        })
    }

    /// Puts taken messages back at the front, in their order. Those in
    /// doubt go before the others whatever the order given: they were
    /// taken first.
    fn unpop(&self, taken: impl DoubleEndedIterator<Item = Taken>) {
        let mut queue = self.queue();
        for t in taken.rev() {
            if t.in_doubt {
                queue.in_doubt.push_front(t.message);
            } else {
                queue.unsent.push_front(t.message);
            }
        }
    }

    /// Whether a message on `topic`, below the prefix, is waiting.
    fn holds(&self, topic: &str) -> bool {
        self.holds_on(TopicRoot::Prefix, topic)
    }

    /// Whether a message on `topic`, relative to `root`, is waiting.
    fn holds_on(&self, root: TopicRoot, topic: &str) -> bool {
        let queue = self.queue();
        queue
            .in_doubt
            .iter()
            .chain(&queue.unsent)
            .any(|m| m.root == root && m.topic == topic)
    }

    fn is_empty(&self) -> bool {
        let queue = self.queue();
        queue.in_doubt.is_empty() && queue.unsent.is_empty()
    }
}

/// Why the MQTT client cannot be set up. Reported, then retried.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// A password, certificate or key file cannot be read.
    #[error("{path}: cannot read {what}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// Which setting it is.
        what: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
}

fn qos_of(class: TopicClass, qos: &QosConfig) -> u8 {
    match class {
        TopicClass::Events => qos.events,
        TopicClass::State => qos.state,
        TopicClass::Detections => qos.detections,
        TopicClass::Stats => qos.stats,
    }
    .get()
}

/// What the task needs to know from a link's event.
enum LinkEvent {
    Connected,
    /// A publish was written, with its packet id (0 for QoS 0).
    Sent(u16),
    /// The broker acknowledged a packet id.
    Acked(u16),
    /// Our DISCONNECT was written.
    Closed,
    /// A message on a topic we subscribed to: `retained` when the broker
    /// held it (sent because we subscribed), not when it is live.
    Received {
        topic: String,
        payload: Vec<u8>,
        retained: bool,
    },
    /// The broker acknowledged our SUBSCRIBE.
    Subscribed,
    /// The broker acknowledged our UNSUBSCRIBE.
    Unsubscribed,
    Other,
}

/// One connection, MQTT 3.1.1 or 5.
enum Link {
    V4(rumqttc::AsyncClient, Box<rumqttc::EventLoop>),
    V5(rumqttc::v5::AsyncClient, Box<rumqttc::v5::EventLoop>),
}

fn read_file(path: &PathBuf, what: &'static str) -> Result<Vec<u8>, MqttError> {
    std::fs::read(path).map_err(|source| MqttError::File {
        path: path.clone(),
        what,
        source,
    })
}

/// rumqttc's request channel; beyond it messages wait in the outbox.
const CHANNEL: usize = 64;

/// Publishes written and not yet acknowledged, at most (rumqttc's 3.1.1
/// default; MQTT 5 would otherwise take the broker's receive maximum, up
/// to 65535). It also bounds the messages kept in doubt after a lost
/// connection, which the outbox's capacity does not count.
const IN_FLIGHT_WINDOW: u16 = 100;

impl Link {
    fn open(config: &MqttConfig, client_id: &str, prefix: &str) -> Result<Link, MqttError> {
        let password = match &config.password_file {
            Some(p) => {
                let raw = read_file(p, "mqtt.password_file")?;
                Some(
                    String::from_utf8_lossy(&raw)
                        .trim_end_matches(['\n', '\r'])
                        .to_owned(),
                )
            }
            None => None,
        };
        let transport = match &config.tls {
            None => rumqttc::Transport::Tcp,
            Some(tls) => {
                let ca = read_file(&tls.ca, "mqtt.tls.ca")?;
                let client_auth = match (&tls.cert, &tls.key) {
                    (Some(c), Some(k)) => Some((
                        read_file(c, "mqtt.tls.cert")?,
                        read_file(k, "mqtt.tls.key")?,
                    )),
                    _ => None,
                };
                rumqttc::Transport::tls(ca, client_auth, None)
            }
        };
        let will_topic = format!("{prefix}/available");
        let keep_alive = Duration::from_secs(u64::from(config.keep_alive.get()));
        let qos = qos_level(config.qos.state.get());
        Ok(match config.protocol {
            MqttProtocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, &config.host, config.port.get());
                // rumqttc's default limit is 10 KiB each way; feed() keeps
                // every message within max_message_bytes.
                o.set_keep_alive(keep_alive)
                    .set_max_packet_size(
                        config.max_message_bytes.get(),
                        config.max_message_bytes.get(),
                    )
                    .set_inflight(IN_FLIGHT_WINDOW)
                    .set_clean_session(true)
                    .set_transport(transport)
                    .set_last_will(rumqttc::LastWill::new(will_topic, "offline", qos, true));
                if let Some(user) = &config.username {
                    o.set_credentials(user, password.as_deref().unwrap_or(""));
                }
                let (c, e) = rumqttc::AsyncClient::new(o, CHANNEL);
                Link::V4(c, Box::new(e))
            }
            MqttProtocol::V5 => {
                use rumqttc::v5::mqttbytes::v5::LastWill;
                let mut o =
                    rumqttc::v5::MqttOptions::new(client_id, &config.host, config.port.get());
                o.set_keep_alive(keep_alive)
                    .set_max_packet_size(u32::try_from(config.max_message_bytes.get()).ok())
                    .set_outgoing_inflight_upper_limit(IN_FLIGHT_WINDOW)
                    .set_clean_start(true)
                    .set_transport(transport)
                    .set_last_will(LastWill::new(will_topic, "offline", qos5(qos), true, None));
                if let Some(user) = &config.username {
                    o.set_credentials(user, password.as_deref().unwrap_or(""));
                }
                let (c, e) = rumqttc::v5::AsyncClient::new(o, CHANNEL);
                Link::V5(c, Box::new(e))
            }
        })
    }

    /// The two arms look alike, but rumqttc's 3.1.1 and 5 packets are
    /// distinct types.
    async fn poll(&mut self) -> Result<LinkEvent, String> {
        use rumqttc::Outgoing;
        let outgoing = |o: Outgoing| match o {
            Outgoing::Publish(pkid) => LinkEvent::Sent(pkid),
            Outgoing::Disconnect => LinkEvent::Closed,
            _ => LinkEvent::Other,
        };
        match self {
            Link::V4(_, e) => {
                use rumqttc::{Event, Packet};
                Ok(match e.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected,
                    Event::Incoming(Packet::PubAck(a)) => LinkEvent::Acked(a.pkid),
                    Event::Incoming(Packet::PubComp(a)) => LinkEvent::Acked(a.pkid),
                    Event::Incoming(Packet::SubAck(_)) => LinkEvent::Subscribed,
                    Event::Incoming(Packet::UnsubAck(_)) => LinkEvent::Unsubscribed,
                    Event::Incoming(Packet::Publish(p)) => LinkEvent::Received {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
                        retained: p.retain,
                    },
                    Event::Incoming(_) => LinkEvent::Other,
                    Event::Outgoing(o) => outgoing(o),
                })
            }
            Link::V5(_, e) => {
                use rumqttc::v5::Event;
                use rumqttc::v5::mqttbytes::v5::Packet;
                Ok(match e.poll().await.map_err(|e| e.to_string())? {
                    Event::Incoming(Packet::ConnAck(_)) => LinkEvent::Connected,
                    Event::Incoming(Packet::PubAck(a)) => LinkEvent::Acked(a.pkid),
                    Event::Incoming(Packet::PubComp(a)) => LinkEvent::Acked(a.pkid),
                    Event::Incoming(Packet::SubAck(_)) => LinkEvent::Subscribed,
                    Event::Incoming(Packet::UnsubAck(_)) => LinkEvent::Unsubscribed,
                    Event::Incoming(Packet::Publish(p)) => {
                        match String::from_utf8(p.topic.to_vec()) {
                            Ok(topic) => LinkEvent::Received {
                                topic,
                                payload: p.payload.to_vec(),
                                retained: p.retain,
                            },
                            Err(_) => LinkEvent::Other,
                        }
                    }
                    Event::Incoming(_) => LinkEvent::Other,
                    Event::Outgoing(o) => outgoing(o),
                })
            }
        }
    }

    fn try_disconnect(&self) {
        let _ = match self {
            Link::V4(c, _) => c.try_disconnect().map_err(|e| e.to_string()),
            Link::V5(c, _) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

impl Requests for Link {
    fn publish(&mut self, topic: String, qos: u8, retain: bool, payload: Vec<u8>) -> bool {
        match self {
            Link::V4(c, _) => c
                .try_publish(topic, qos_level(qos), retain, payload)
                .is_ok(),
            Link::V5(c, _) => c
                .try_publish(topic, qos5(qos_level(qos)), retain, payload)
                .is_ok(),
        }
    }

    /// QoS 0: the sweep is best effort, and a lost SUBSCRIBE is retried on
    /// the next connect.
    fn subscribe(&mut self, filter: &str) -> bool {
        match self {
            Link::V4(c, _) => c.try_subscribe(filter, rumqttc::QoS::AtMostOnce).is_ok(),
            Link::V5(c, _) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtMostOnce)
                .is_ok(),
        }
    }

    fn unsubscribe(&mut self, filter: &str) {
        let _ = match self {
            Link::V4(c, _) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
            Link::V5(c, _) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
        };
    }
}

fn qos_level(q: u8) -> rumqttc::QoS {
    match q {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(q: rumqttc::QoS) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        rumqttc::QoS::AtMostOnce => QoS::AtMostOnce,
        rumqttc::QoS::AtLeastOnce => QoS::AtLeastOnce,
        rumqttc::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

/// Connection state shared with the stats and status code.
#[derive(Debug, Default)]
pub struct LinkStatus {
    connected: std::sync::atomic::AtomicBool,
    reconnects: AtomicU64,
}

impl LinkStatus {
    /// Whether the broker is connected now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
    /// Connections made after the first.
    pub fn reconnects(&self) -> u64 {
        self.reconnects.load(Ordering::Relaxed)
    }
}

/// The retained `status` message's two parts, kept together: the config
/// reload and the metrics endpoint each change their own, and every change
/// publishes both, so neither clears the other's error.
#[derive(Debug)]
pub struct StatusBoard {
    outbox: Outbox,
    /// The config error, then the metrics endpoint's.
    errors: std::sync::Mutex<(Option<String>, Option<String>)>,
}

impl StatusBoard {
    /// A board publishing on `outbox`.
    pub fn new(outbox: Outbox) -> StatusBoard {
        StatusBoard {
            outbox,
            errors: std::sync::Mutex::new((None, None)),
        }
    }

    /// The running config is the file on disk (`None`), or why not.
    /// Always publishes: a reload's answer is awaited.
    pub fn set_config_error(&self, error: Option<&str>) {
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        errors.0 = error.map(str::to_owned);
        self.outbox
            .push(status_message(errors.0.as_deref(), errors.1.as_deref()));
    }

    /// The metrics endpoint listens as configured (`None`), or why not.
    /// Publishes only a change.
    pub fn set_metrics_error(&self, error: Option<&str>) {
        let mut errors = self.errors.lock().unwrap_or_else(PoisonError::into_inner);
        if errors.1.as_deref() == error {
            return;
        }
        errors.1 = error.map(str::to_owned);
        self.outbox
            .push(status_message(errors.0.as_deref(), errors.1.as_deref()));
    }
}

/// The MQTT task: the shell around [`Delivery`]. It owns the connection,
/// polls it, sleeps the back-off and follows config changes.
pub struct MqttTask {
    config: watch::Receiver<Arc<Config>>,
    outbox: Outbox,
    status: Arc<LinkStatus>,
}

impl MqttTask {
    /// A task publishing `outbox` under the MQTT settings of `config`.
    pub fn new(
        config: watch::Receiver<Arc<Config>>,
        outbox: Outbox,
        status: Arc<LinkStatus>,
    ) -> Self {
        MqttTask {
            config,
            outbox,
            status,
        }
    }

    /// Runs until `drain` fires, then delivers what is queued (bounded by
    /// `deadline`), publishes `offline` and disconnects.
    pub async fn run(mut self, mut drain: oneshot::Receiver<Duration>) {
        let mut delivery: Option<Delivery> = None;
        let mut checked: Option<MqttConfig> = None;
        loop {
            let config = self.config.borrow_and_update().clone();
            // Once per configuration, not per connection attempt.
            if checked.as_ref() != Some(&config.mqtt) {
                for warning in secret_warnings(&config.mqtt) {
                    log::warn!("MQTT: {warning}");
                }
                checked = Some(config.mqtt.clone());
            }
            let prefix = config.mqtt.prefix_for(&config.device_id);
            let m = &config.mqtt;
            let delivery = match &mut delivery {
                Some(d) => {
                    d.settings(
                        prefix,
                        m.qos,
                        m.max_message_bytes.get(),
                        m.reconnect_max.get(),
                    );
                    d
                }
                None => delivery.insert(Delivery::new(
                    prefix,
                    m.qos,
                    m.max_message_bytes.get(),
                    m.reconnect_max.get(),
                )),
            };
            delivery.set_birth_topic(birth_topic(&config));
            let client_id = m
                .client_id
                .clone()
                .unwrap_or_else(|| format!("nanodetd-{}", config.device_id.as_str()));
            log::info!(
                "MQTT: connecting to {}:{} as {client_id}, topics under {}/",
                m.host,
                m.port,
                delivery.prefix()
            );
            let mut link = match Link::open(m, &client_id, delivery.prefix()) {
                Ok(link) => link,
                Err(e) => {
                    let retry_in = delivery.cannot_open();
                    log::error!("MQTT: {e}; retrying in {retry_in:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(retry_in) => {}
                        _ = self.config.changed() => {}
                        d = &mut drain => { let _ = d; return; }
                    }
                    continue;
                }
            };
            loop {
                tokio::select! {
                    event = link.poll() => match event {
                        Ok(LinkEvent::Connected) => {
                            log::info!("MQTT: connected to {}:{}", m.host, m.port);
                            delivery.connected(Instant::now(), &mut link, &self.outbox);
                            self.status.connected.store(true, Ordering::Relaxed);
                            self.status
                                .reconnects
                                .store(delivery.connections().saturating_sub(1), Ordering::Relaxed);
                        }
                        Ok(LinkEvent::Subscribed) => delivery.subscribed(&mut link),
                        Ok(LinkEvent::Unsubscribed) => delivery.unsubscribed(),
                        Ok(LinkEvent::Received { topic, payload, retained }) => {
                            delivery.received(&topic, &payload, retained, &mut link, &self.outbox);
                        }
                        Ok(LinkEvent::Sent(pkid)) => {
                            delivery.sent(pkid, &self.outbox);
                            delivery.feed(&mut link, &self.outbox);
                        }
                        Ok(LinkEvent::Acked(pkid)) => {
                            delivery.acked(pkid, &self.outbox);
                            delivery.feed(&mut link, &self.outbox);
                        }
                        Ok(LinkEvent::Closed | LinkEvent::Other) => delivery.feed(&mut link, &self.outbox),
                        Err(e) => {
                            let lost = delivery.lost(Instant::now(), &self.outbox);
                            self.status.connected.store(false, Ordering::Relaxed);
                            if lost.was_connected {
                                log::warn!("MQTT: connection lost: {e}; {} unacknowledged messages requeued", lost.requeued);
                            } else {
                                log::warn!("MQTT: cannot connect to {}:{}: {e}; retrying in {:?}", m.host, m.port, lost.retry_in);
                            }
                            tokio::time::sleep(lost.retry_in).await;
                            // A new client for the next connection: rumqttc's
                            // request channel may still hold publishes handed
                            // over before the loss, which it would write after
                            // reconnecting, ahead of the requeued copies. Their
                            // packet ids would then number the wrong in-flight
                            // messages, and the last ones would wait for ever.
                            break;
                        }
                    },
                    _ = self.outbox.0.notify.notified(), if delivery.is_connected() => {
                        delivery.feed(&mut link, &self.outbox);
                    }
                    changed = self.config.changed() => {
                        if changed.is_err() { return; }
                        let new = self.config.borrow().clone();
                        self.outbox.set_capacity(new.mqtt.queue.get());
                        delivery.set_qos(new.mqtt.qos);
                        if birth_topic(&new) != birth_topic(&config) {
                            log::info!("MQTT: Home Assistant settings changed, reconnecting");
                            self.close(delivery, &mut link, Duration::from_secs(1), false).await;
                            break;
                        }
                        if new.mqtt.needs_reconnect(m) || new.device_id != config.device_id {
                            log::info!("MQTT: settings changed, reconnecting");
                            // No flush: what is queued belongs under the
                            // new prefix, which may be on a new broker.
                            self.close(delivery, &mut link, Duration::from_secs(1), false).await;
                            break;
                        }
                    }
                    d = &mut drain => {
                        let deadline = d.unwrap_or(Duration::from_secs(1));
                        self.close(delivery, &mut link, deadline, true).await;
                        return;
                    }
                }
            }
        }
    }

    /// Delivers what is queued within `deadline` (with `flush`), then says
    /// `offline` and disconnects, so the last will is not needed.
    async fn close(
        &self,
        delivery: &mut Delivery,
        link: &mut Link,
        deadline: Duration,
        flush: bool,
    ) {
        let outbox = &self.outbox;
        let flush = async {
            while flush
                && delivery.is_connected()
                && !(outbox.is_empty() && delivery.in_flight() == 0)
            {
                delivery.feed(link, outbox);
                match link.poll().await {
                    Ok(LinkEvent::Sent(p)) => delivery.sent(p, outbox),
                    Ok(LinkEvent::Acked(p)) => delivery.acked(p, outbox),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            if !delivery.say_offline(link) {
                return;
            }
            link.try_disconnect();
            // Poll until rumqttc has written the disconnect.
            while let Ok(e) = link.poll().await {
                if matches!(e, LinkEvent::Closed) {
                    break;
                }
            }
        };
        if tokio::time::timeout(deadline, flush).await.is_err() {
            log::warn!(
                "MQTT: gave up flushing after {deadline:?}; {} messages undelivered",
                outbox.snapshot().queued + delivery.in_flight()
            );
        }
        delivery.closed(outbox);
        self.status.connected.store(false, Ordering::Relaxed);
    }
}

/// Home Assistant's birth topic, where it says `online` when it starts
/// and the discovery configs must be announced again; None when
/// discovery is off.
fn birth_topic(config: &Config) -> Option<String> {
    let ha = &config.homeassistant;
    ha.enabled
        .then(|| format!("{}/status", ha.discovery_prefix))
}

/// What is unsafe about how the password travels or is stored: sent over
/// plain TCP to another machine, or kept in a file others can read (as
/// ssh warns of a readable key).
fn secret_warnings(config: &MqttConfig) -> Vec<String> {
    let mut warnings = Vec::new();
    let Some(path) = &config.password_file else {
        return warnings;
    };
    let loopback = config.host == "localhost"
        || config
            .host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if config.tls.is_none() && !loopback {
        warnings.push(format!(
            "the password is sent to {} over plain TCP, readable by anyone on the network; add [mqtt.tls]",
            config.host
        ));
    }
    if let Ok(meta) = std::fs::metadata(path) {
        use std::os::unix::fs::PermissionsExt;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            warnings.push(format!(
                "{}: mode {mode:04o} lets other users read the password; chmod 600 it (or 640 with group nanodetd)",
                path.display()
            ));
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 20: the config's and the metrics endpoint's errors share the
    /// retained `status`; each change publishes both, so neither clears
    /// the other's, and an unchanged metrics error is not sent again.
    #[test]
    fn the_status_board_keeps_both_errors() {
        let outbox = Outbox::new(16);
        let board = StatusBoard::new(outbox.clone());
        let published = |outbox: &Outbox| -> Vec<(serde_json::Value, serde_json::Value)> {
            std::iter::from_fn(|| outbox.pop())
                .map(|t| {
                    let v: serde_json::Value = serde_json::from_slice(&t.message.payload).unwrap();
                    assert_eq!(t.message.topic, "status");
                    (v["error"].clone(), v["metrics_error"].clone())
                })
                .collect()
        };
        // The outbox keeps only the newest unsent retained message of a
        // topic: each step is read before the next.
        let null = serde_json::Value::Null;
        let said = |s: &str| serde_json::Value::from(s);
        let mut seen = Vec::new();
        board.set_config_error(Some("bad key"));
        seen.extend(published(&outbox));
        board.set_metrics_error(Some("cannot listen"));
        seen.extend(published(&outbox));
        board.set_metrics_error(Some("cannot listen"));
        seen.extend(published(&outbox));
        board.set_config_error(None);
        seen.extend(published(&outbox));
        board.set_config_error(Some("worse"));
        seen.extend(published(&outbox));
        board.set_metrics_error(None);
        seen.extend(published(&outbox));
        assert_eq!(
            seen,
            [
                (said("bad key"), null.clone()),
                (said("bad key"), said("cannot listen")),
                (null.clone(), said("cannot listen")),
                (said("worse"), said("cannot listen")),
                (said("worse"), null.clone()),
            ]
        );
    }

    /// Issue 17: a password went over plain TCP, and a 0644 password file
    /// was taken, both without a word.
    #[test]
    fn a_password_in_the_clear_or_in_a_readable_file_is_warned_of_issue_17() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("password");
        std::fs::write(&file, "secret").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut config: MqttConfig = toml::from_str(&format!(
            "host = \"broker.lan\"\nusername = \"u\"\npassword_file = {:?}",
            file
        ))
        .unwrap();
        let warnings = secret_warnings(&config);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("over plain TCP"), "{warnings:?}");
        assert!(warnings[1].contains("mode 0644"), "{warnings:?}");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        config.host = "127.0.0.1".into();
        assert!(secret_warnings(&config).is_empty());
        config.password_file = None;
        config.host = "broker.lan".into();
        assert!(
            secret_warnings(&config).is_empty(),
            "no password, nothing to warn of"
        );
    }

    fn msg(n: usize) -> Message {
        Message {
            topic: format!("cam/{n}"),
            payload: Vec::new(),
            class: TopicClass::Events,
            root: TopicRoot::Prefix,
            retain: false,
            captured: None,
        }
    }

    fn taken(n: usize, in_doubt: bool) -> Taken {
        Taken {
            message: msg(n),
            in_doubt,
        }
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_and_counts() {
        let outbox = Outbox::new(3);
        for n in 0..5 {
            outbox.push(msg(n));
        }
        let s = outbox.snapshot();
        assert_eq!(
            (s.queued, s.dropped, s.events_dropped, s.events_queued),
            (3, 2, 2, 5)
        );
        assert_eq!(outbox.pop().unwrap().message.topic, "cam/2");
        outbox.unpop([taken(0, false), taken(1, false)].into_iter());
        let order: Vec<String> = std::iter::from_fn(|| outbox.pop())
            .map(|t| t.message.topic)
            .collect();
        assert_eq!(order, ["cam/0", "cam/1", "cam/3", "cam/4"]);
    }

    /// The fresh root once received an event counted dropped: written,
    /// its ack lost with the connection, requeued, then dropped for room
    /// while the broker was down.
    #[test]
    fn messages_in_doubt_go_first_and_are_never_dropped_for_room() {
        let outbox = Outbox::new(2);
        outbox.unpop((0..3).map(|n| taken(n, true)));
        for n in 3..8 {
            outbox.push(msg(n));
        }
        let s = outbox.snapshot();
        assert_eq!(
            (s.queued, s.dropped, s.events_dropped, s.events_queued),
            (5, 3, 3, 5)
        );
        let order: Vec<(String, bool)> = std::iter::from_fn(|| outbox.pop())
            .map(|t| (t.message.topic, t.in_doubt))
            .collect();
        let expected = [(0, true), (1, true), (2, true), (6, false), (7, false)]
            .map(|(n, doubt)| (format!("cam/{n}"), doubt));
        assert_eq!(order, expected);
    }

    /// Issue 19: a retained message replaces the unsent one on its topic,
    /// so an outage holds one snapshot per topic; events are never merged.
    #[test]
    fn a_retained_message_replaces_the_unsent_one_on_its_topic_issue_19() {
        let outbox = Outbox::new(100);
        let state = |topic: &str, payload: &[u8]| Message {
            topic: topic.into(),
            root: TopicRoot::Prefix,
            payload: payload.to_vec(),
            class: TopicClass::State,
            retain: true,
            captured: None,
        };
        outbox.push(state("cam/person", b"1"));
        outbox.push(msg(0));
        outbox.push(state("cam/all/snapshot", b"jpeg 1"));
        outbox.push(msg(0));
        outbox.push(state("cam/person", b"0"));
        outbox.push(state("cam/all/snapshot", b"jpeg 2"));
        let order: Vec<(String, Vec<u8>)> = std::iter::from_fn(|| outbox.pop())
            .map(|t| (t.message.topic, t.message.payload))
            .collect();
        let expected = [
            ("cam/0", &b""[..]),
            ("cam/0", b""),
            ("cam/person", b"0"),
            ("cam/all/snapshot", b"jpeg 2"),
        ]
        .map(|(t, p)| (t.to_owned(), p.to_vec()));
        assert_eq!(order, expected);
        assert_eq!(outbox.snapshot().dropped, 0, "superseded, not dropped");
    }
}
