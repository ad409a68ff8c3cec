//! IP cameras over RTSP, H.264 only. A thread of the camera's own runs the
//! session (retina, on a one-thread tokio runtime) and queues each access
//! unit; the camera task decodes them in order ([`H264Decoder`]) and hands
//! on every picture as an NV12 buffer, which is converted only if the
//! detector takes it. The queue is bounded: when decoding falls behind,
//! units are dropped (counted) up to the next key frame, so memory stays
//! flat and the newest picture wins, as with every camera.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use retina::client::{
    Credentials, PlayOptions, Session, SessionGroup, SessionOptions, SetupOptions,
    TcpTransportOptions, Transport, UdpTransportOptions,
};
use retina::codec::{CodecItem, FrameFormat};

use super::h264::{DecoderError, H264Decoder, MAX_ACCESS_UNIT};
use super::{Captured, Miss};
use crate::contain::contain;
use crate::frame::FrameError;

/// Connecting, DESCRIBE, SETUP and PLAY together may take this long: a
/// host that drops packets, or a server that accepts and never answers,
/// is an error after it, retried with back-off.
pub const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// A playing stream that sends no video for this long is lost (retina has
/// no timeout of its own, and a server may keep answering keep-alives and
/// sending RTCP reports with no video). Waiting this long for a key frame
/// after a loss is lost too: a camera that never sends one (intra
/// refresh) is reconnected, and says why.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a closing session may take to send its TEARDOWN, so the
/// camera frees the session instead of waiting for it to time out.
const TEARDOWN_WAIT: Duration = Duration::from_secs(1);

/// Access units queued for the decoder: a second at 30 fps. Beyond it,
/// units are dropped up to the next key frame.
pub const QUEUE: usize = 32;

/// Bytes the queue may hold (a 1080p stream at 8 Mbit/s queues 1 MB a
/// second): the bound on a camera that sends huge units.
pub const QUEUE_BYTES: usize = 16 << 20;

/// How long [`RtspCamera::next_capture`] waits before answering
/// [`Miss::Idle`], so the camera task stays responsive to stop requests.
const WAIT: Duration = Duration::from_millis(100);

/// A password file longer than this is not a password.
const MAX_PASSWORD: u64 = 4096;

/// How the RTP packets travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RtspTransport {
    /// Interleaved on the RTSP TCP connection: through NAT and firewalls,
    /// no loss.
    #[default]
    Tcp,
    /// RTP over UDP: less delay on a clean LAN; lost packets cost frames
    /// up to the next key frame.
    Udp,
}

/// What to open.
#[derive(Debug, Clone, PartialEq)]
pub struct RtspRequest {
    /// `rtsp://host[:port]/path`, without credentials.
    pub url: String,
    /// The user name, if the camera asks for one.
    pub user: Option<String>,
    /// A file holding the password (a trailing newline is dropped); read
    /// at each connection, so a changed password needs no restart.
    pub password_file: Option<PathBuf>,
    /// TCP or UDP.
    pub transport: RtspTransport,
    /// Pictures larger than this are broken frames.
    pub max_pixels: u64,
}

/// Why an RTSP camera cannot stream; each is retried with back-off.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RtspError {
    /// The URL does not parse, or carries credentials.
    #[error("{url}: {reason}")]
    Url {
        /// The URL as configured.
        url: String,
        /// What is wrong.
        reason: String,
    },
    /// The password file cannot be read.
    #[error("{}: cannot read the RTSP password: {reason}", path.display())]
    Password {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
    /// The camera refused the credentials (or asked for some and got none).
    #[error(
        "{url}: the camera refused {} (401 Unauthorized); check user and password_file",
        user.as_deref().map_or("to stream without a user and password".to_owned(), |u| format!("user {u:?} and its password"))
    )]
    Unauthorized {
        /// The URL.
        url: String,
        /// The user tried, if any.
        user: Option<String>,
    },
    /// Connecting, describing, setting up or playing failed.
    #[error("{url}: {reason}")]
    Session {
        /// The URL.
        url: String,
        /// retina's account of it.
        reason: String,
    },
    /// No answer in time.
    #[error("{url}: {what} timed out after {after:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// What was waited for.
        what: &'static str,
        /// How long.
        after: Duration,
    },
    /// The camera offers no H.264 video.
    #[error(
        "{url}: no H.264 video stream (the camera offers {offered}); nanodetd decodes H.264 only: no H.265 decoder builds without system packages. Set the camera's stream to H.264"
    )]
    Codec {
        /// The URL.
        url: String,
        /// The media and encodings it offers.
        offered: String,
    },
    /// The camera streams pictures larger than its budget.
    #[error("{url}: the camera streams {width}x{height}, over max_pixels ({max_pixels})")]
    TooLarge {
        /// The URL.
        url: String,
        /// From the stream's SPS.
        width: u32,
        /// From the stream's SPS.
        height: u32,
        /// The camera's budget.
        max_pixels: u64,
    },
    /// Waiting for a key frame after a loss took too long.
    #[error("{url}: no key frame for {after:?} after a loss; reconnecting")]
    NoKeyFrame {
        /// The URL.
        url: String,
        /// How long.
        after: Duration,
    },
    /// The server ended the stream.
    #[error("{url}: the stream ended")]
    Ended {
        /// The URL.
        url: String,
    },
    /// The session's thread could not start.
    #[error("{url}: cannot start its thread: {reason}")]
    Thread {
        /// The URL.
        url: String,
        /// The OS error.
        reason: String,
    },
    /// The decoder cannot start.
    #[error("{url}: {reason}")]
    Decoder {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
}

/// One access unit, Annex B.
struct Unit {
    data: Vec<u8>,
    /// Units (or packets) were lost just before it.
    after_loss: bool,
}

/// The session thread's side.
struct Feed {
    units: SyncSender<Unit>,
    /// Bytes queued and not yet taken.
    queued: Arc<AtomicUsize>,
    dropped: Arc<AtomicU64>,
    /// A unit was dropped: the next one sent says so.
    owe_loss: bool,
}

impl Feed {
    /// Queues `data` unless the queue is full or it is over the limit.
    fn send(&mut self, data: Vec<u8>, packets_lost: bool) -> Result<(), ()> {
        let after_loss = std::mem::take(&mut self.owe_loss) || packets_lost;
        let len = data.len();
        if len > MAX_ACCESS_UNIT || self.queued.load(Ordering::Relaxed) + len > QUEUE_BYTES {
            self.drop_one();
            return Ok(());
        }
        // Counted before it is sent, so the taker never subtracts first.
        self.queued.fetch_add(len, Ordering::Relaxed);
        match self.units.try_send(Unit { data, after_loss }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.queued.fetch_sub(len, Ordering::Relaxed);
                self.drop_one();
                Ok(())
            }
            Err(TrySendError::Disconnected(_)) => Err(()),
        }
    }

    fn drop_one(&mut self) {
        self.owe_loss = true;
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// A streaming RTSP camera.
pub struct RtspCamera {
    url: String,
    units: Receiver<Unit>,
    queued: Arc<AtomicUsize>,
    /// Why the session ended, when it did.
    failure: Arc<Mutex<Option<RtspError>>>,
    dropped: Arc<AtomicU64>,
    dropped_reported: u64,
    decoder: H264Decoder,
    sequence: u64,
    /// Since when units are skipped for want of a key frame.
    waiting_since: Option<std::time::Instant>,
    /// Dropping it ends the session.
    _cancel: tokio::sync::oneshot::Sender<()>,
}

/// `text` with the user and password of every URL in it replaced by
/// `***`: for errors and config lines that quote a URL. A URL runs to the
/// next space or quote, and everything between its `://` and its last `@`
/// goes, since a password may hold `/`, `?`, `#`, `,` or `@`.
pub fn hide_credentials(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find("://") {
        let (head, tail) = rest.split_at(at + 3);
        out.push_str(head);
        let url_end = tail
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(tail.len());
        match tail[..url_end].rfind('@') {
            Some(user_end) => {
                out.push_str("***");
                rest = &tail[user_end..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

/// retina's errors span lines (the connection, the message); the log,
/// the stats and systemd's one-line status want one.
fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// The URL checked: `rtsp://`, a host, no credentials in it.
fn checked_url(url: &str) -> Result<url::Url, RtspError> {
    let bad = |reason: &str| RtspError::Url {
        url: hide_credentials(url),
        reason: reason.to_owned(),
    };
    let parsed = url::Url::parse(url).map_err(|e| bad(&e.to_string()))?;
    if parsed.scheme() != "rtsp" {
        return Err(bad("not an rtsp:// URL"));
    }
    if parsed.host_str().is_none_or(str::is_empty) {
        return Err(bad("no host"));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(bad(
            "credentials in the URL would show in logs and on status: use `user` and `password_file`",
        ));
    }
    Ok(parsed)
}

/// The URL as it may be shown: checked, so it holds no credentials.
pub fn check_url(url: &str) -> Result<(), RtspError> {
    checked_url(url).map(|_| ())
}

fn read_password(path: &PathBuf) -> Result<String, RtspError> {
    use std::io::Read;
    let bad = |reason: String| RtspError::Password {
        path: path.clone(),
        reason,
    };
    let mut raw = Vec::new();
    let file = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    // A FIFO or a device would block the camera's thread for good.
    if !file.metadata().is_ok_and(|m| m.is_file()) {
        return Err(bad("not a regular file".into()));
    }
    file.take(MAX_PASSWORD + 1)
        .read_to_end(&mut raw)
        .map_err(|e| bad(e.to_string()))?;
    if raw.len() as u64 > MAX_PASSWORD {
        return Err(bad(format!("over {MAX_PASSWORD} bytes")));
    }
    let text = String::from_utf8(raw).map_err(|_| bad("not UTF-8".into()))?;
    Ok(text.trim_end_matches(['\n', '\r']).to_owned())
}

impl RtspCamera {
    /// Connects and starts playing; returns once the first PLAY is
    /// answered (at most [`OPEN_TIMEOUT`]), or with why not.
    pub fn open(request: &RtspRequest) -> Result<RtspCamera, RtspError> {
        let url = request.url.clone();
        let parsed = checked_url(&url)?;
        let creds = match (&request.user, &request.password_file) {
            (None, _) => None,
            (Some(user), file) => Some(Credentials {
                username: user.clone(),
                password: file
                    .as_ref()
                    .map(read_password)
                    .transpose()?
                    .unwrap_or_default(),
            }),
        };
        let decoder =
            H264Decoder::new(request.max_pixels).map_err(|e: DecoderError| RtspError::Decoder {
                url: url.clone(),
                reason: e.to_string(),
            })?;
        let (units_in, units) = std::sync::mpsc::sync_channel(QUEUE);
        let (started_in, started) = std::sync::mpsc::sync_channel(1);
        let (cancel, cancelled) = tokio::sync::oneshot::channel();
        let failure = Arc::new(Mutex::new(None));
        let dropped = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let session = SessionTask {
            url: url.clone(),
            parsed,
            group: Arc::new(SessionGroup::default()),
            creds,
            user: request.user.clone(),
            transport: request.transport,
            max_pixels: request.max_pixels,
            feed: Feed {
                units: units_in,
                queued: queued.clone(),
                dropped: dropped.clone(),
                owe_loss: false,
            },
        };
        let failure_out = failure.clone();
        let thread_error = |e: std::io::Error| RtspError::Thread {
            url: url.clone(),
            reason: e.to_string(),
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(thread_error)?;
        let thread = std::thread::Builder::new()
            .name("rtsp".into())
            .spawn(move || {
                let mut session = session;
                let group = session.group.clone();
                // retina parses what the camera sends: a panic in it is
                // this camera's error, not the daemon's end.
                let ran = contain(|| {
                    runtime.block_on(async {
                        let ended = tokio::select! {
                            ended = session.run(started_in) => Some(ended),
                            _ = cancelled => None,
                        };
                        // The dropped session's TEARDOWN runs on this
                        // runtime: let it go out before the runtime ends.
                        let _ = tokio::time::timeout(TEARDOWN_WAIT, group.await_teardown()).await;
                        ended
                    })
                });
                let ended = ran.unwrap_or_else(|panic| {
                    Some(RtspError::Session {
                        url: session.url.clone(),
                        reason: one_line(&format!("the RTSP client failed ({panic})")),
                    })
                });
                if let Some(ended) = ended {
                    *failure_out
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(ended);
                }
                // The units' sender goes last, so the camera finds why.
                drop(session);
            })
            .map_err(thread_error)?;
        match started.recv() {
            Ok(Ok(())) => Ok(RtspCamera {
                url,
                units,
                queued,
                failure,
                dropped,
                dropped_reported: 0,
                decoder,
                sequence: 0,
                waiting_since: None,
                _cancel: cancel,
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => {
                // The thread ended before it said: a panic, recorded.
                let _ = thread.join();
                let failure = failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take();
                Err(failure.unwrap_or(RtspError::Ended { url }))
            }
        }
    }

    /// The next decoded picture: [`Miss::Idle`] when none came within a
    /// tenth of a second, a broken frame for a unit that does not decode
    /// (or dropped units, counted as one), [`Miss::Lost`] when the session
    /// ended.
    pub fn next_capture(&mut self) -> Result<Captured, Miss> {
        let dropped = self.dropped.load(Ordering::Relaxed);
        if dropped > self.dropped_reported {
            let n = dropped - self.dropped_reported;
            self.dropped_reported = dropped;
            return Err(Miss::Broken(FrameError::Decode {
                origin: self.url.clone(),
                reason: format!(
                    "{n} access units dropped: decoding fell behind the stream ({QUEUE} units or {QUEUE_BYTES} bytes queued), or a unit was over {MAX_ACCESS_UNIT} bytes; going on from the next key frame"
                ),
            }));
        }
        match self.units.recv_timeout(WAIT) {
            Ok(unit) => {
                self.queued.fetch_sub(unit.data.len(), Ordering::Relaxed);
                if unit.after_loss {
                    self.decoder.lost();
                }
                self.sequence += 1;
                let origin = format!("{} frame {}", self.url, self.sequence);
                let decoded = self.decoder.decode(&unit.data, &origin);
                if !self.decoder.waiting_for_key() {
                    self.waiting_since = None;
                } else if self
                    .waiting_since
                    .get_or_insert_with(std::time::Instant::now)
                    .elapsed()
                    > STALL_TIMEOUT
                {
                    return Err(Miss::Lost(
                        RtspError::NoKeyFrame {
                            url: self.url.clone(),
                            after: STALL_TIMEOUT,
                        }
                        .into(),
                    ));
                }
                match decoded {
                    Ok(Some(picture)) => Ok(picture),
                    Ok(None) => Err(Miss::Idle),
                    Err(e) => Err(Miss::Broken(e)),
                }
            }
            Err(RecvTimeoutError::Timeout) => Err(Miss::Idle),
            Err(RecvTimeoutError::Disconnected) => {
                let why = self
                    .failure
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    .unwrap_or_else(|| RtspError::Ended {
                        url: self.url.clone(),
                    });
                Err(Miss::Lost(why.into()))
            }
        }
    }
}

/// The session, run on the camera's runtime.
struct SessionTask {
    url: String,
    parsed: url::Url,
    /// Its sessions, to wait for their TEARDOWN.
    group: Arc<SessionGroup>,
    creds: Option<Credentials>,
    user: Option<String>,
    transport: RtspTransport,
    max_pixels: u64,
    feed: Feed,
}

impl SessionTask {
    fn error(&self, e: &retina::Error) -> RtspError {
        if e.status_code() == Some(401) {
            return RtspError::Unauthorized {
                url: self.url.clone(),
                user: self.user.clone(),
            };
        }
        RtspError::Session {
            url: self.url.clone(),
            reason: one_line(&e.to_string()),
        }
    }

    /// Opens the session, says how that went on `started`, then feeds
    /// units until the stream fails: why it ended.
    async fn run(&mut self, started: SyncSender<Result<(), RtspError>>) -> RtspError {
        let opened = tokio::time::timeout(OPEN_TIMEOUT, self.open())
            .await
            .unwrap_or_else(|_| {
                Err(RtspError::Timeout {
                    url: self.url.clone(),
                    what: "connecting and starting the stream",
                    after: OPEN_TIMEOUT,
                })
            });
        let (mut stream, video) = match opened {
            Ok(playing) => {
                let _ = started.send(Ok(()));
                playing
            }
            Err(e) => {
                let _ = started.send(Err(e.clone()));
                return e;
            }
        };
        let mut last_video = tokio::time::Instant::now();
        let mut first = true;
        loop {
            // Only video resets the clock: RTCP reports and other streams'
            // items do not.
            let deadline = last_video + STALL_TIMEOUT;
            let item = match tokio::time::timeout_at(deadline, stream.next()).await {
                Err(_) => {
                    return RtspError::Timeout {
                        url: self.url.clone(),
                        what: "waiting for video",
                        after: STALL_TIMEOUT,
                    };
                }
                Ok(None) => {
                    return RtspError::Ended {
                        url: self.url.clone(),
                    };
                }
                Ok(Some(Err(e))) => return self.error(&e),
                Ok(Some(Ok(item))) => item,
            };
            let CodecItem::VideoFrame(frame) = item else {
                continue;
            };
            if frame.stream_id() != video {
                continue;
            }
            last_video = tokio::time::Instant::now();
            // The size is known from the SDP, or from the first frame's
            // parameter sets; checked then, and whenever they change.
            if (first || frame.has_new_parameters())
                && let Some(too_large) = self.over_budget(&stream, video)
            {
                return too_large;
            }
            first = false;
            let lost = frame.loss() > 0;
            if self.feed.send(frame.into_data(), lost).is_err() {
                // The camera is gone.
                return RtspError::Ended {
                    url: self.url.clone(),
                };
            }
        }
    }

    /// The stream's picture size from its SPS, as retina read it, when it
    /// is over the budget: refused before the decoder allocates its
    /// pictures and references for it.
    fn over_budget(&self, stream: &retina::client::Demuxed, video: usize) -> Option<RtspError> {
        let parameters = stream.streams().get(video)?.parameters()?;
        let retina::codec::ParametersRef::Video(video) = parameters else {
            return None;
        };
        let (width, height) = video.pixel_dimensions();
        (u64::from(width) * u64::from(height) > self.max_pixels).then(|| RtspError::TooLarge {
            url: self.url.clone(),
            width,
            height,
            max_pixels: self.max_pixels,
        })
    }

    async fn open(&mut self) -> Result<(retina::client::Demuxed, usize), RtspError> {
        let options = SessionOptions::default()
            .session_group(self.group.clone())
            .creds(self.creds.clone())
            .user_agent(format!("nanodetd/{}", env!("CARGO_PKG_VERSION")));
        let mut session = Session::describe(self.parsed.clone(), options)
            .await
            .map_err(|e| self.error(&e))?;
        let video = session
            .streams()
            .iter()
            .position(|s| s.media() == "video" && s.encoding_name() == "h264")
            .ok_or_else(|| RtspError::Codec {
                url: self.url.clone(),
                offered: {
                    let offered: Vec<String> = session
                        .streams()
                        .iter()
                        .map(|s| format!("{} {}", s.media(), s.encoding_name()))
                        .collect();
                    if offered.is_empty() {
                        "nothing".into()
                    } else {
                        offered.join(", ")
                    }
                },
            })?;
        let transport = match self.transport {
            RtspTransport::Tcp => Transport::Tcp(TcpTransportOptions::default()),
            RtspTransport::Udp => Transport::Udp(UdpTransportOptions::default()),
        };
        session
            .setup(
                video,
                SetupOptions::default()
                    .transport(transport)
                    // Annex B, with SPS and PPS before each key frame: what
                    // the decoder takes, and where it can start.
                    .frame_format(FrameFormat::SIMPLE),
            )
            .await
            .map_err(|e| self.error(&e))?;
        let playing = session
            .play(PlayOptions::default())
            .await
            .map_err(|e| self.error(&e))?;
        let demuxed = playing.demuxed().map_err(|e| self.error(&e))?;
        Ok((demuxed, video))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_credentials_or_another_scheme_are_refused() {
        assert!(check_url("rtsp://cam.lan:554/stream1").is_ok());
        for (url, why) in [
            (
                "rtsp://admin:secret@cam.lan/s",
                "use `user` and `password_file`",
            ),
            ("rtsp://admin@cam.lan/s", "use `user` and `password_file`"),
            ("http://cam.lan/s", "not an rtsp:// URL"),
            ("rtsp:///s", "no host"),
            ("cam.lan/s", "relative URL"),
        ] {
            let e = check_url(url).unwrap_err().to_string();
            assert!(e.contains(why), "{url}: {e}");
            assert!(!e.contains("secret") && !e.contains("admin"), "{e}");
        }
        // A password may hold anything but a space or a quote.
        assert_eq!(hide_credentials("rtsp://a:b@h:554/p"), "rtsp://***@h:554/p");
        for secret in ["pa/ss", "p@ss/w", "p?s#s", "p,s"] {
            let e = check_url(&format!("rtsp://admin:{secret}@cam/1"))
                .unwrap_err()
                .to_string();
            assert!(!e.contains(secret) && !e.contains("admin"), "{e}");
        }
        assert_eq!(one_line("a\n\nconn: b\nmsg:  c"), "a conn: b msg: c");
        assert_eq!(
            hide_credentials(r#"source = { rtsp = "rtsp://u:p@cam/1", x = "http://v@w" }"#),
            r#"source = { rtsp = "rtsp://***@cam/1", x = "http://***@w" }"#
        );
    }

    #[test]
    fn a_full_queue_drops_units_counts_them_and_flags_the_next_as_after_a_loss() {
        let (tx, rx) = std::sync::mpsc::sync_channel(2);
        let dropped = Arc::new(AtomicU64::new(0));
        let queued = Arc::new(AtomicUsize::new(0));
        let mut feed = Feed {
            units: tx,
            queued: queued.clone(),
            dropped: dropped.clone(),
            owe_loss: false,
        };
        for i in 0..5u8 {
            feed.send(vec![i], false).unwrap();
        }
        feed.send(vec![0; MAX_ACCESS_UNIT + 1], false).unwrap();
        assert_eq!(dropped.load(Ordering::Relaxed), 4);
        assert_eq!(queued.load(Ordering::Relaxed), 2, "two bytes queued");
        // A unit that would take the queue past its bytes is dropped too.
        queued.store(QUEUE_BYTES - 1, Ordering::Relaxed);
        let (tx_big, _rx_big) = std::sync::mpsc::sync_channel(8);
        let mut big = Feed {
            units: tx_big,
            queued: queued.clone(),
            dropped: dropped.clone(),
            owe_loss: false,
        };
        big.send(vec![0; 2], false).unwrap();
        assert_eq!(dropped.load(Ordering::Relaxed), 5);
        queued.store(2, Ordering::Relaxed);
        let got: Vec<(Vec<u8>, bool)> = rx.try_iter().map(|u| (u.data, u.after_loss)).collect();
        assert_eq!(got, [(vec![0], false), (vec![1], false)]);
        feed.send(vec![9], false).unwrap();
        let next = rx.try_recv().unwrap();
        assert!(next.after_loss, "the decoder must wait for a key frame");
        feed.send(vec![10], true).unwrap();
        assert!(rx.try_recv().unwrap().after_loss, "packets lost in transit");
        drop(rx);
        assert!(feed.send(vec![11], false).is_err());
    }

    #[test]
    fn a_password_file_is_read_without_its_newline_and_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "s3cret\n").unwrap();
        assert_eq!(read_password(&path).unwrap(), "s3cret");
        std::fs::write(&path, vec![b'x'; 5000]).unwrap();
        let e = read_password(&path).unwrap_err().to_string();
        assert!(e.contains("over 4096 bytes"), "{e}");
        let e = read_password(&dir.path().join("none"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("cannot read the RTSP password"), "{e}");
    }

    #[test]
    fn an_unreachable_port_is_an_error_not_a_hang() {
        // A port nobody listens on: bound, then closed.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let request = RtspRequest {
            url: format!("rtsp://127.0.0.1:{port}/none"),
            user: None,
            password_file: None,
            transport: RtspTransport::Tcp,
            max_pixels: 1 << 20,
        };
        let e = RtspCamera::open(&request).err().unwrap().to_string();
        assert!(e.contains(&request.url), "{e}");
    }

    #[test]
    fn a_server_that_accepts_and_never_answers_times_out() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let request = RtspRequest {
            url: format!("rtsp://{}/mute", listener.local_addr().unwrap()),
            user: Some("u".into()),
            password_file: None,
            transport: RtspTransport::Tcp,
            max_pixels: 1 << 20,
        };
        let e = RtspCamera::open(&request).err().unwrap().to_string();
        assert!(e.contains("timed out after 10s"), "{e}");
    }
}
