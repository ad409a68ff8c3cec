//! The HTTP endpoint on `[metrics] listen`: `/metrics` in Prometheus' text
//! format, `/healthz` and `/readyz` ([`super::health`]). It follows the
//! config: a changed address closes the listener and binds the new one;
//! a bind that fails is logged, put on the `status` topic and tried again
//! every [`RETRY`], while the daemon runs on.
//!
//! Hostile clients are bounded: at most [`MAX_CONNECTIONS`] at once (more
//! are closed on accept), headers within [`HEADER_TIMEOUT`] and 16 KiB,
//! no request body read, and no connection kept past
//! [`CONNECTION_LIFETIME`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus::Encoder;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

use super::{Gathered, Metrics, health};
use crate::config::Config;
use crate::mqtt::{LinkStatus, StatusBoard};
use crate::watchdog::Heartbeats;

/// How long after a failed bind the address is tried again.
pub const RETRY: Duration = Duration::from_secs(30);
/// Scrapers and probes connected at once; a fleet's Prometheus pair and a
/// few probes need far fewer.
pub const MAX_CONNECTIONS: usize = 32;
/// A request's headers must arrive within this.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection is closed after this, kept alive or not: a client
/// holding idle connections cannot fill the slots for good.
pub const CONNECTION_LIFETIME: Duration = Duration::from_secs(120);

/// What the endpoint reads.
pub struct Endpoint {
    /// The registry.
    pub metrics: Arc<Metrics>,
    /// The pipeline threads' heartbeats.
    pub heartbeats: Heartbeats,
    /// The model's file name, once one is in service.
    pub model: Arc<OnceLock<String>>,
    /// The broker link.
    pub link: Arc<LinkStatus>,
    /// Set at SIGTERM: `/readyz` answers 503 through the drain.
    pub stopping: Arc<std::sync::atomic::AtomicBool>,
    /// The last `/metrics` page and when it was made: clients asking
    /// faster than [`PAGE_FOR`] share one gather.
    pub page: std::sync::Mutex<Option<(Instant, Bytes)>>,
}

/// How long one gather serves `/metrics`: a client pipelining requests on
/// every connection gets at most this many gathers a second out of the
/// async thread that also runs MQTT and the watchdog's pings.
pub const PAGE_FOR: Duration = Duration::from_millis(500);

impl Endpoint {
    /// The exposition, gathered anew at most every [`PAGE_FOR`].
    fn page(&self) -> Result<Bytes, prometheus::Error> {
        let mut page = self
            .page
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((made, bytes)) = page.as_ref()
            && made.elapsed() < PAGE_FOR
        {
            return Ok(bytes.clone());
        }
        let gathered = Gathered::from(&self.metrics);
        let mut text = Vec::new();
        prometheus::TextEncoder::new().encode(gathered.families(), &mut text)?;
        let bytes = Bytes::from(text);
        *page = Some((Instant::now(), bytes.clone()));
        Ok(bytes)
    }
}

/// What to do about the listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BindStep {
    /// Nothing now.
    Wait,
    /// Close the listener: the endpoint was turned off.
    Close,
    /// Close any listener and bind this address.
    Bind(SocketAddr),
}

/// Which address is bound, and when a failed one is tried again.
#[derive(Debug, Default)]
pub struct Binding {
    bound: Option<SocketAddr>,
    failed: Option<(SocketAddr, Instant)>,
}

impl Binding {
    /// The step towards `wanted`, the config's address, at `now`.
    pub fn step(&mut self, wanted: Option<SocketAddr>, now: Instant) -> BindStep {
        let Some(addr) = wanted else {
            // Off: close what is bound, and clear a failure being retried.
            let bound = self.bound.take().is_some();
            let failed = self.failed.take().is_some();
            return if bound || failed {
                BindStep::Close
            } else {
                BindStep::Wait
            };
        };
        if self.bound == Some(addr) {
            return BindStep::Wait;
        }
        match self.failed {
            Some((failed, at)) if failed == addr && now < at + RETRY => BindStep::Wait,
            _ => {
                self.bound = None;
                BindStep::Bind(addr)
            }
        }
    }

    /// The config was reloaded: a failed address is tried again at once.
    pub fn reloaded(&mut self) {
        self.failed = None;
    }

    /// `addr` is bound.
    pub fn bound(&mut self, addr: SocketAddr) {
        self.bound = Some(addr);
        self.failed = None;
    }

    /// Binding `addr` failed at `now`.
    pub fn failed(&mut self, addr: SocketAddr, now: Instant) {
        self.bound = None;
        self.failed = Some((addr, now));
    }

    /// When to try a failed address again.
    pub fn retry_at(&self) -> Option<Instant> {
        self.failed.map(|(_, at)| at + RETRY)
    }
}

/// Serves the endpoint wherever the config says, until the config
/// channel closes (shutdown).
pub async fn run(
    endpoint: Arc<Endpoint>,
    mut config: watch::Receiver<Arc<Config>>,
    status: Arc<StatusBoard>,
) {
    let mut binding = Binding::default();
    let mut serving: Option<JoinHandle<()>> = None;
    let mut last_failure = String::new();
    loop {
        let wanted = config.borrow_and_update().metrics.listen;
        match binding.step(wanted, Instant::now()) {
            BindStep::Wait => {}
            BindStep::Close => {
                stop(serving.take()).await;
                log::info!("metrics: endpoint off");
                last_failure.clear();
                status.set_metrics_error(None);
            }
            BindStep::Bind(addr) => {
                // The old listener must be closed before the new bind:
                // 127.0.0.1:9464 and 0.0.0.0:9464 cannot both listen.
                stop(serving.take()).await;
                match TcpListener::bind(addr).await {
                    Ok(listener) => {
                        let local = listener.local_addr().unwrap_or(addr);
                        log::info!("metrics: serving http://{local}/metrics, /healthz, /readyz");
                        binding.bound(addr);
                        last_failure.clear();
                        status.set_metrics_error(None);
                        serving = Some(tokio::spawn(accept(
                            listener,
                            endpoint.clone(),
                            config.clone(),
                        )));
                    }
                    Err(e) => {
                        let why = format!("metrics.listen = {addr}: cannot listen: {e}");
                        if why != last_failure {
                            log::error!("{why}; trying again every {RETRY:?} and at each reload");
                        }
                        binding.failed(addr, Instant::now());
                        status.set_metrics_error(Some(&why));
                        last_failure = why;
                    }
                }
            }
        }
        let retry = binding.retry_at();
        tokio::select! {
            changed = config.changed() => {
                if changed.is_err() { break }
                binding.reloaded();
            }
            _ = sleep_until(retry), if retry.is_some() => {}
        }
    }
    stop(serving).await;
}

async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

/// Aborts the accept task and waits until it is gone, its listener and
/// connections closed with it.
async fn stop(task: Option<JoinHandle<()>>) {
    if let Some(task) = task {
        task.abort();
        let _ = task.await;
    }
}

/// Accepts connections until aborted; aborting drops the set, which
/// aborts every connection.
async fn accept(
    listener: TcpListener,
    endpoint: Arc<Endpoint>,
    config: watch::Receiver<Arc<Config>>,
) {
    let mut connections = JoinSet::new();
    let mut refused: u64 = 0;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                // Out of descriptors, most likely: wait rather than spin.
                log::warn!("metrics: accept: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        while connections.try_join_next().is_some() {}
        if connections.len() >= MAX_CONNECTIONS {
            refused = refused.saturating_add(1);
            if refused.is_power_of_two() {
                log::warn!(
                    "metrics: {MAX_CONNECTIONS} connections open; closed {refused} new ones so far"
                );
            }
            continue;
        }
        let endpoint = endpoint.clone();
        let config = config.clone();
        connections.spawn(async move {
            let service = service_fn(move |request: Request<hyper::body::Incoming>| {
                let response = respond(&endpoint, &config, &request);
                async move { Ok::<_, Infallible>(response) }
            });
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(stream), service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
        });
    }
}

/// Prometheus' text exposition format, 0.0.4.
const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

fn respond<B>(
    endpoint: &Endpoint,
    config: &watch::Receiver<Arc<Config>>,
    request: &Request<B>,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n")
            .map(|mut r| {
                r.headers_mut()
                    .insert(ALLOW, hyper::header::HeaderValue::from_static("GET, HEAD"));
                r
            })
            .unwrap_or_else(|_| Response::new(Full::default()));
    }
    let response = match request.uri().path() {
        "/metrics" => match endpoint.page() {
            Ok(page) => reply(StatusCode::OK, TEXT_FORMAT, page),
            Err(e) => reply(
                StatusCode::INTERNAL_SERVER_ERROR,
                "text/plain",
                format!("{e}\n"),
            ),
        },
        "/healthz" => {
            let stale_after = config.borrow().metrics.stale_after.get();
            answer(health::health(
                &endpoint.heartbeats.ages(),
                Duration::from_secs_f64(stale_after),
            ))
        }
        "/readyz" => answer(health::readiness(
            endpoint.model.get().map(String::as_str),
            endpoint.link.connected(),
            endpoint.stopping.load(std::sync::atomic::Ordering::Relaxed),
        )),
        "/" => reply(
            StatusCode::OK,
            "text/plain",
            "nanodetd: /metrics /healthz /readyz\n",
        ),
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    };
    response.unwrap_or_else(|_| Response::new(Full::default()))
}

fn answer(answer: health::Answer) -> Result<Response<Full<Bytes>>, hyper::http::Error> {
    let status = StatusCode::from_u16(answer.status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
    reply(status, "application/json", answer.body)
}

fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Result<Response<Full<Bytes>>, hyper::http::Error> {
    Response::builder()
        .status(status)
        .header(CONTENT_TYPE, content_type)
        .body(Full::new(body.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> Option<SocketAddr> {
        Some(SocketAddr::from(([127, 0, 0, 1], port)))
    }

    /// One gather serves every `/metrics` request for [`PAGE_FOR`]: a
    /// client asking in a loop cannot make the async thread gather more.
    #[test]
    fn the_page_is_gathered_at_most_once_per_page_for() {
        let endpoint = Endpoint {
            metrics: Arc::new(Metrics::new()),
            heartbeats: Heartbeats::default(),
            model: Arc::new(OnceLock::new()),
            link: Arc::new(LinkStatus::default()),
            stopping: Arc::default(),
            page: std::sync::Mutex::new(None),
        };
        let camera = endpoint.metrics.camera("front");
        let first = endpoint.page().unwrap();
        camera.frames.inc();
        let again = endpoint.page().unwrap();
        assert_eq!(
            first.as_ptr(),
            again.as_ptr(),
            "gathered again within PAGE_FOR"
        );
        std::thread::sleep(PAGE_FOR);
        let later = endpoint.page().unwrap();
        let text = String::from_utf8_lossy(&later);
        assert!(
            text.contains("nanodetd_camera_frames_total{camera=\"front\"} 1"),
            "{text}"
        );
    }

    /// A fake clock: binds what the config names, rebinds on a change,
    /// retries a failed address after [`RETRY`] only, and closes when
    /// turned off.
    #[test]
    fn binds_follows_the_config_and_retries_a_failed_address() {
        let t0 = Instant::now();
        let mut b = Binding::default();
        assert_eq!(b.step(None, t0), BindStep::Wait);
        assert_eq!(b.step(addr(9464), t0), BindStep::Bind(addr(9464).unwrap()));
        b.failed(addr(9464).unwrap(), t0);
        assert_eq!(b.retry_at(), Some(t0 + RETRY));
        assert_eq!(b.step(addr(9464), t0 + RETRY / 2), BindStep::Wait);
        assert_eq!(
            b.step(addr(9464), t0 + RETRY),
            BindStep::Bind(addr(9464).unwrap())
        );
        // A new address is tried at once, failure or not.
        b.failed(addr(9464).unwrap(), t0 + RETRY);
        assert_eq!(
            b.step(addr(9465), t0 + RETRY),
            BindStep::Bind(addr(9465).unwrap())
        );
        b.bound(addr(9465).unwrap());
        assert_eq!(b.retry_at(), None);
        assert_eq!(b.step(addr(9465), t0 + RETRY * 9), BindStep::Wait);
        assert_eq!(b.step(None, t0 + RETRY * 9), BindStep::Close);
        assert_eq!(b.step(None, t0 + RETRY * 9), BindStep::Wait);
        // Turned off while failing: the failure is cleared (Close), and
        // no more retries.
        assert_eq!(b.step(addr(1), t0), BindStep::Bind(addr(1).unwrap()));
        b.failed(addr(1).unwrap(), t0);
        assert_eq!(b.step(None, t0), BindStep::Close);
        assert_eq!(b.retry_at(), None);
        assert_eq!(b.step(None, t0), BindStep::Wait);
        // A reload retries a failed address at once.
        assert_eq!(b.step(addr(2), t0), BindStep::Bind(addr(2).unwrap()));
        b.failed(addr(2).unwrap(), t0);
        assert_eq!(b.step(addr(2), t0), BindStep::Wait);
        b.reloaded();
        assert_eq!(b.step(addr(2), t0), BindStep::Bind(addr(2).unwrap()));
    }
}
