//! The embedded MQTT broker (`[mqtt] embedded_broker = true`): rumqttd,
//! on a loopback address, in threads of its own. It exists so that the
//! demo shows events with nothing installed; a production box points
//! `[mqtt]` at its real broker and leaves this off.

use std::net::SocketAddr;

use crate::config::MqttProtocol;

/// Largest message the embedded broker takes, in bytes: far above any
/// message the daemon sends.
#[cfg(feature = "embedded-broker")]
const MAX_PAYLOAD: usize = 1 << 20;

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// Something listens on the address already: most likely a broker,
    /// which the daemon then publishes to.
    #[error("{addr} is already taken (another MQTT broker?); publishing to whatever listens there")]
    AddressInUse {
        /// The configured address.
        addr: SocketAddr,
    },
    /// This build has no embedded broker (cargo feature
    /// `embedded-broker`, left out of the packaged binaries).
    #[error(
        "this nanodetd was built without the embedded broker (cargo feature `embedded-broker`); point [mqtt] at a broker"
    )]
    NotBuilt,
    /// The address cannot be bound for another reason, or the broker's
    /// thread cannot start.
    #[error("cannot start the embedded broker on {addr}: {source}")]
    Io {
        /// The configured address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// Starts a broker on `addr` for clients of `protocol`, and returns once
/// its threads run. It lives as long as the process.
#[cfg(feature = "embedded-broker")]
pub fn start(addr: SocketAddr, protocol: MqttProtocol) -> Result<(), BrokerError> {
    // rumqttd binds in a thread of its own and only logs a failure there,
    // so the address is tried here first: a taken port is reported, not
    // silently left to whoever holds it.
    match std::net::TcpListener::bind(addr) {
        Ok(probe) => drop(probe),
        Err(e) if e.kind() == std::io::ErrorKind::AddrInUse => {
            return Err(BrokerError::AddressInUse { addr });
        }
        Err(source) => return Err(BrokerError::Io { addr, source }),
    }
    let server = rumqttd::ServerSettings {
        name: "nanodetd-embedded".into(),
        listen: addr,
        tls: None,
        next_connection_delay_ms: 1,
        connections: rumqttd::ConnectionSettings {
            connection_timeout_ms: 60_000,
            max_payload_size: MAX_PAYLOAD,
            max_inflight_count: 500,
            auth: None,
            external_auth: None,
            dynamic_filters: true,
        },
    };
    let servers = Some(std::collections::HashMap::from([("1".to_owned(), server)]));
    let (v4, v5) = match protocol {
        MqttProtocol::V311 => (servers, None),
        MqttProtocol::V5 => (None, servers),
    };
    let config = rumqttd::Config {
        router: rumqttd::RouterConfig {
            max_connections: 64,
            max_outgoing_packet_count: 200,
            max_segment_size: 16 << 20,
            max_segment_count: 4,
            ..Default::default()
        },
        v4,
        v5,
        ..Default::default()
    };
    let mut broker = rumqttd::Broker::new(config);
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                log::error!("embedded MQTT broker stopped: {e}");
            }
        })
        .map_err(|source| BrokerError::Io { addr, source })?;
    log::info!("embedded MQTT broker listening on {addr}");
    Ok(())
}

/// Without the feature: says so, and the daemon runs on without a broker.
#[cfg(not(feature = "embedded-broker"))]
pub fn start(_addr: SocketAddr, _protocol: MqttProtocol) -> Result<(), BrokerError> {
    Err(BrokerError::NotBuilt)
}
