//! MQTT publishing: the bounded [`Outbox`] the pipeline writes into, and
//! the task that carries it to the broker with rumqttc (3.1.1 or 5).
//!
//! Delivery is at least once and in order, across reconnects and broker
//! restarts: a message leaves the outbox for rumqttc only while connected,
//! and stays in this task's in-flight list until the broker acknowledges
//! it (QoS 1/2) or it is written (QoS 0). On a connection error everything
//! unacknowledged goes back to the front of the outbox. rumqttc's own
//! replay is not relied on: with a clean session it drops its pending
//! packets on reconnect. Topics in [`Message`] are relative to the prefix,
//! which is applied when the message is sent.

use std::collections::{BTreeMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot, watch};

use crate::config::{Config, MqttConfig, MqttProtocol, QosConfig};
use sweep::CountSweep;

mod payload;
mod sweep;

pub use payload::{
    FrameTiming, SCHEMA, count_message, detections_message, event_message, stats_message,
    status_message,
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

/// One message, its topic relative to the prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct Message {
    /// Topic below the prefix, e.g. `front/events`.
    pub topic: String,
    /// JSON or plain text.
    pub payload: Vec<u8>,
    /// QoS class.
    pub class: TopicClass,
    /// Retained on the broker.
    pub retain: bool,
}

#[derive(Debug)]
struct OutboxState {
    queue: Mutex<VecDeque<Message>>,
    capacity: AtomicUsize,
    dropped: AtomicU64,
    events_dropped: AtomicU64,
    oversized: AtomicU64,
    events_queued: AtomicU64,
    events_delivered: AtomicU64,
    notify: Notify,
}

/// The bounded queue between the pipeline and the broker. When full, the
/// oldest message is dropped and counted, so a long outage costs history,
/// never memory.
#[derive(Debug, Clone)]
pub struct Outbox(Arc<OutboxState>);

/// Outbox counters, for the stats topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OutboxSnapshot {
    /// Messages waiting.
    pub queued: usize,
    /// Messages dropped because the queue was full.
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
            queue: Mutex::new(VecDeque::new()),
            capacity: AtomicUsize::new(capacity.max(1)),
            dropped: AtomicU64::new(0),
            events_dropped: AtomicU64::new(0),
            oversized: AtomicU64::new(0),
            events_queued: AtomicU64::new(0),
            events_delivered: AtomicU64::new(0),
            notify: Notify::new(),
        }))
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Message>> {
        self.0.queue.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a message, dropping the oldest if full.
    pub fn push(&self, message: Message) {
        if message.class == TopicClass::Events {
            self.0.events_queued.fetch_add(1, Ordering::Relaxed);
        }
        let dropped = {
            let mut queue = self.queue();
            let dropped = queue.len() >= self.0.capacity.load(Ordering::Relaxed);
            if dropped
                && queue
                    .pop_front()
                    .is_some_and(|m| m.class == TopicClass::Events)
            {
                self.0.events_dropped.fetch_add(1, Ordering::Relaxed);
            }
            queue.push_back(message);
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

    /// Changes the capacity (hot reload); a smaller one drops the oldest.
    pub fn set_capacity(&self, capacity: usize) {
        self.0.capacity.store(capacity.max(1), Ordering::Relaxed);
    }

    /// Current counters.
    pub fn snapshot(&self) -> OutboxSnapshot {
        OutboxSnapshot {
            queued: self.queue().len(),
            dropped: self.0.dropped.load(Ordering::Relaxed),
            events_dropped: self.0.events_dropped.load(Ordering::Relaxed),
            oversized: self.0.oversized.load(Ordering::Relaxed),
            events_queued: self.0.events_queued.load(Ordering::Relaxed),
            events_delivered: self.0.events_delivered.load(Ordering::Relaxed),
        }
    }

    fn pop(&self) -> Option<Message> {
        self.queue().pop_front()
    }

    fn unpop(&self, messages: impl DoubleEndedIterator<Item = Message>) {
        let mut queue = self.queue();
        for m in messages.rev() {
            queue.push_front(m);
        }
    }

    /// Whether a message on `topic` is waiting.
    fn holds(&self, topic: &str) -> bool {
        self.queue().iter().any(|m| m.topic == topic)
    }

    fn is_empty(&self) -> bool {
        self.queue().is_empty()
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
    /// A message the broker held retained, sent because we subscribed.
    Retained {
        topic: String,
        payload: Vec<u8>,
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

/// How long a connection must last for the reconnect back-off to start
/// over from its first step.
const STABLE_CONNECTION: Duration = Duration::from_secs(10);

/// rumqttc's request channel; beyond it messages wait in the outbox.
const CHANNEL: usize = 64;

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
        let keep_alive = Duration::from_secs(u64::from(config.keep_alive.max(5)));
        let qos = qos_level(config.qos.state.get());
        Ok(match config.protocol {
            MqttProtocol::V311 => {
                let mut o = rumqttc::MqttOptions::new(client_id, &config.host, config.port);
                // rumqttc's default limit is 10 KiB each way; feed() keeps
                // every message within max_message_bytes.
                o.set_keep_alive(keep_alive)
                    .set_max_packet_size(config.max_message_bytes, config.max_message_bytes)
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
                let mut o = rumqttc::v5::MqttOptions::new(client_id, &config.host, config.port);
                o.set_keep_alive(keep_alive)
                    .set_max_packet_size(u32::try_from(config.max_message_bytes).ok())
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
                    Event::Incoming(Packet::Publish(p)) if p.retain => LinkEvent::Retained {
                        topic: p.topic,
                        payload: p.payload.to_vec(),
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
                    Event::Incoming(Packet::Publish(p)) if p.retain => {
                        match String::from_utf8(p.topic.to_vec()) {
                            Ok(topic) => LinkEvent::Retained {
                                topic,
                                payload: p.payload.to_vec(),
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

    /// QoS 0: the sweep is best effort, and a lost SUBSCRIBE is retried on
    /// the next connect.
    fn try_subscribe(&self, filter: &str) -> bool {
        match self {
            Link::V4(c, _) => c.try_subscribe(filter, rumqttc::QoS::AtMostOnce).is_ok(),
            Link::V5(c, _) => c
                .try_subscribe(filter, rumqttc::v5::mqttbytes::QoS::AtMostOnce)
                .is_ok(),
        }
    }

    fn try_unsubscribe(&self, filter: &str) {
        let _ = match self {
            Link::V4(c, _) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
            Link::V5(c, _) => c.try_unsubscribe(filter).map_err(|e| e.to_string()),
        };
    }

    /// False when rumqttc's channel is full.
    fn try_publish(&self, topic: String, qos: u8, retain: bool, payload: Vec<u8>) -> bool {
        match self {
            Link::V4(c, _) => c
                .try_publish(topic, qos_level(qos), retain, payload)
                .is_ok(),
            Link::V5(c, _) => c
                .try_publish(topic, qos5(qos_level(qos)), retain, payload)
                .is_ok(),
        }
    }

    fn try_disconnect(&self) {
        let _ = match self {
            Link::V4(c, _) => c.try_disconnect().map_err(|e| e.to_string()),
            Link::V5(c, _) => c.try_disconnect().map_err(|e| e.to_string()),
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

/// A message handed to rumqttc, kept until the broker has it.
struct InFlight {
    message: Message,
    qos: u8,
    pkid: Option<u16>,
    /// `online` or a retained republish: sent again on every connect, so
    /// never requeued or counted.
    announce: bool,
}

/// One session's publishing state.
struct Session {
    link: Link,
    prefix: String,
    qos: QosConfig,
    max_message_bytes: usize,
    connected: bool,
    in_flight: VecDeque<InFlight>,
}

/// The MQTT task: owns the connection, reconnects with back-off, and
/// republishes `online` and the retained state on every connect.
pub struct MqttTask {
    config: watch::Receiver<Arc<Config>>,
    outbox: Outbox,
    status: Arc<LinkStatus>,
    /// Retained messages as the broker last acknowledged them, by topic.
    retained: BTreeMap<String, Message>,
    /// Clears counts an earlier run left retained.
    sweep: CountSweep,
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
            retained: BTreeMap::new(),
            sweep: CountSweep::new(),
        }
    }

    fn open_session(&self, config: &Config) -> Result<Session, MqttError> {
        let prefix = config.mqtt.prefix_for(&config.device_id);
        let client_id = config
            .mqtt
            .client_id
            .clone()
            .unwrap_or_else(|| format!("nanodetd-{}", config.device_id.as_str()));
        log::info!(
            "MQTT: connecting to {}:{} as {client_id}, topics under {prefix}/",
            config.mqtt.host,
            config.mqtt.port
        );
        Ok(Session {
            link: Link::open(&config.mqtt, &client_id, &prefix)?,
            prefix,
            qos: config.mqtt.qos,
            max_message_bytes: config.mqtt.max_message_bytes,
            connected: false,
            in_flight: VecDeque::new(),
        })
    }

    /// Runs until `drain` fires, then delivers what is queued (bounded by
    /// `deadline`), publishes `offline` and disconnects.
    pub async fn run(mut self, mut drain: oneshot::Receiver<Duration>) {
        let mut backoff = Duration::from_millis(500);
        let mut connected_at = Instant::now();
        let mut first = true;
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
            let mut session = match self.open_session(&config) {
                Ok(s) => s,
                Err(e) => {
                    log::error!("MQTT: {e}; retrying in {backoff:?}");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = self.config.changed() => {}
                        d = &mut drain => { let _ = d; return; }
                    }
                    backoff = next_backoff(backoff, &config.mqtt);
                    continue;
                }
            };
            loop {
                tokio::select! {
                    event = session.link.poll() => match event {
                        Ok(LinkEvent::Connected) => {
                            log::info!("MQTT: connected to {}:{}", config.mqtt.host, config.mqtt.port);
                            if !first {
                                self.status.reconnects.fetch_add(1, Ordering::Relaxed);
                            }
                            first = false;
                            connected_at = Instant::now();
                            session.connected = true;
                            self.status.connected.store(true, Ordering::Relaxed);
                            // Before the announce fills rumqttc's channel.
                            if self.sweep.connected()
                                && !session.link.try_subscribe(&CountSweep::filter(&session.prefix))
                            {
                                self.sweep.not_subscribed();
                            }
                            self.announce(&mut session);
                            self.feed(&mut session);
                        }
                        Ok(LinkEvent::Subscribed) => {
                            if self.sweep.subscribed() {
                                session.link.try_unsubscribe(&CountSweep::filter(&session.prefix));
                            }
                        }
                        Ok(LinkEvent::Unsubscribed) => self.sweep.unsubscribed(),
                        Ok(LinkEvent::Retained { topic, payload }) => {
                            let ours = |t: &str| self.sets(&session, t);
                            if let Some(zero) = sweep::stale_count(&session.prefix, &topic, &payload, ours) {
                                log::info!(
                                    "MQTT: {topic} was left retained at {} by an earlier run; publishing 0",
                                    String::from_utf8_lossy(&payload)
                                );
                                self.outbox.push(zero);
                            }
                        }
                        Ok(LinkEvent::Sent(pkid)) => { self.handle_sent(&mut session, pkid); self.feed(&mut session); }
                        Ok(LinkEvent::Acked(pkid)) => { self.handle_acked(&mut session, pkid); self.feed(&mut session); }
                        Ok(LinkEvent::Closed | LinkEvent::Other) => self.feed(&mut session),
                        Err(e) => {
                            // Back-off starts over only after a connection
                            // that lasted: a broker that closes each one
                            // right after its CONNACK is not retried at
                            // the first step's rate for ever.
                            if session.connected && connected_at.elapsed() >= STABLE_CONNECTION {
                                backoff = Duration::from_millis(500);
                            }
                            if let Some(warning) = self.sweep.connection_lost() {
                                log::warn!("MQTT: {warning}");
                            }
                            if session.connected {
                                log::warn!("MQTT: connection lost: {e}; {} unacknowledged messages requeued", session.in_flight.len());
                            } else {
                                log::warn!("MQTT: cannot connect to {}:{}: {e}; retrying in {backoff:?}", config.mqtt.host, config.mqtt.port);
                            }
                            self.requeue(&mut session);
                            tokio::time::sleep(backoff).await;
                            backoff = next_backoff(backoff, &config.mqtt);
                        }
                    },
                    _ = self.outbox.0.notify.notified(), if session.connected => self.feed(&mut session),
                    changed = self.config.changed() => {
                        if changed.is_err() { return; }
                        let new = self.config.borrow().clone();
                        self.outbox.set_capacity(new.mqtt.queue);
                        session.qos = new.mqtt.qos;
                        if new.mqtt.needs_reconnect(&config.mqtt) || new.device_id != config.device_id {
                            log::info!("MQTT: settings changed, reconnecting");
                            // No flush: what is queued belongs under the
                            // new prefix, which may be on a new broker.
                            self.close(&mut session, Duration::from_secs(1), false).await;
                            break;
                        }
                    }
                    d = &mut drain => {
                        let deadline = d.unwrap_or(Duration::from_secs(1));
                        self.close(&mut session, deadline, true).await;
                        return;
                    }
                }
            }
        }
    }

    /// Whether this run has set the retained `topic` (relative to the
    /// prefix): acknowledged, in flight or queued.
    fn sets(&self, session: &Session, topic: &str) -> bool {
        self.retained.contains_key(topic)
            || session.in_flight.iter().any(|f| f.message.topic == topic)
            || self.outbox.holds(topic)
    }

    /// `online` and the last acknowledged retained state, on every connect.
    fn announce(&self, session: &mut Session) {
        let online = Message {
            topic: "available".into(),
            payload: b"online".to_vec(),
            class: TopicClass::State,
            retain: true,
        };
        for message in std::iter::once(&online).chain(self.retained.values()) {
            let qos = qos_of(message.class, &session.qos);
            let topic = format!("{}/{}", session.prefix, message.topic);
            if session
                .link
                .try_publish(topic, qos, true, message.payload.clone())
            {
                session.in_flight.push_back(InFlight {
                    message: message.clone(),
                    qos,
                    pkid: None,
                    announce: true,
                });
            }
        }
    }

    /// Moves messages from the outbox to rumqttc while it has room. One
    /// that could never be sent, being larger than the packet limit, is
    /// dropped and counted here: given to rumqttc it would fail the
    /// connection, come back to the head of the queue, and block
    /// everything behind it for good.
    fn feed(&self, session: &mut Session) {
        if !session.connected {
            return;
        }
        while let Some(message) = self.outbox.pop() {
            let qos = qos_of(message.class, &session.qos);
            let topic = format!("{}/{}", session.prefix, message.topic);
            let size = publish_size(&topic, &message.payload);
            if size > session.max_message_bytes {
                let n = self.outbox.0.oversized.fetch_add(1, Ordering::Relaxed) + 1;
                if n.is_power_of_two() {
                    log::warn!(
                        "MQTT: dropped a {size}-byte message on {topic}, over mqtt.max_message_bytes = {} ({n} so far)",
                        session.max_message_bytes
                    );
                }
                continue;
            }
            if !session
                .link
                .try_publish(topic, qos, message.retain, message.payload.clone())
            {
                self.outbox.unpop(std::iter::once(message));
                return;
            }
            session.in_flight.push_back(InFlight {
                message,
                qos,
                pkid: None,
                announce: false,
            });
        }
    }

    /// rumqttc sends in channel order, so the oldest unnumbered message is
    /// the one just written.
    fn handle_sent(&mut self, session: &mut Session, pkid: u16) {
        let Some(i) = session.in_flight.iter().position(|f| f.pkid.is_none()) else {
            return; // `offline` at shutdown
        };
        if session.in_flight[i].qos == 0 {
            if let Some(done) = session.in_flight.remove(i) {
                self.delivered(done);
            }
        } else {
            session.in_flight[i].pkid = Some(pkid);
        }
    }

    fn handle_acked(&mut self, session: &mut Session, pkid: u16) {
        if let Some(i) = session.in_flight.iter().position(|f| f.pkid == Some(pkid))
            && let Some(done) = session.in_flight.remove(i)
        {
            self.delivered(done);
        }
    }

    fn delivered(&mut self, done: InFlight) {
        if done.announce {
            return;
        }
        let message = done.message;
        if message.class == TopicClass::Events {
            self.outbox
                .0
                .events_delivered
                .fetch_add(1, Ordering::Relaxed);
        }
        if message.retain {
            self.retained.insert(message.topic.clone(), message);
        }
    }

    fn requeue(&self, session: &mut Session) {
        session.connected = false;
        self.status.connected.store(false, Ordering::Relaxed);
        let pending: Vec<Message> = session
            .in_flight
            .drain(..)
            .filter(|f| !f.announce)
            .map(|f| f.message)
            .collect();
        self.outbox.unpop(pending.into_iter());
    }

    /// Delivers what is queued within `deadline` (with `flush`), then says
    /// `offline` and disconnects, so the last will is not needed.
    async fn close(&mut self, session: &mut Session, deadline: Duration, flush: bool) {
        let flush = async {
            while flush
                && session.connected
                && !(self.outbox.is_empty() && session.in_flight.is_empty())
            {
                self.feed(session);
                match session.link.poll().await {
                    Ok(LinkEvent::Sent(p)) => self.handle_sent(session, p),
                    Ok(LinkEvent::Acked(p)) => self.handle_acked(session, p),
                    Ok(_) => {}
                    Err(_) => break,
                }
            }
            if !session.connected {
                return;
            }
            let topic = format!("{}/available", session.prefix);
            session
                .link
                .try_publish(topic, session.qos.state.get(), true, b"offline".to_vec());
            session.link.try_disconnect();
            // Poll until rumqttc has written the disconnect.
            while let Ok(e) = session.link.poll().await {
                if matches!(e, LinkEvent::Closed) {
                    break;
                }
            }
        };
        if tokio::time::timeout(deadline, flush).await.is_err() {
            log::warn!(
                "MQTT: gave up flushing after {deadline:?}; {} messages undelivered",
                self.outbox.snapshot().queued + session.in_flight.len()
            );
        }
        self.requeue(session);
    }
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

/// An upper bound on the size of the PUBLISH packet carrying `payload` on
/// `topic`, for MQTT 3.1.1 and 5 alike: fixed header (at most 5 bytes),
/// topic length (2), packet id (2), MQTT 5's empty properties (1), with
/// room to spare.
fn publish_size(topic: &str, payload: &[u8]) -> usize {
    topic.len().saturating_add(payload.len()).saturating_add(16)
}

fn next_backoff(current: Duration, config: &MqttConfig) -> Duration {
    // The config keeps reconnect_max within (0, 3600].
    (current * 2).min(Duration::from_secs_f64(
        f64::from(config.reconnect_max).max(0.5),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

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
            retain: false,
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
        assert_eq!(outbox.pop().unwrap().topic, "cam/2");
        outbox.unpop([msg(0), msg(1)].into_iter());
        let order: Vec<String> = std::iter::from_fn(|| outbox.pop())
            .map(|m| m.topic)
            .collect();
        assert_eq!(order, ["cam/0", "cam/1", "cam/3", "cam/4"]);
    }
}
