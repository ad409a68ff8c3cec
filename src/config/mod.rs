//! The daemon's TOML configuration, in two steps: serde structs (a value
//! of the wrong type, or outside its key's base type, fails while parsing,
//! with the key's line and column), then [`Config::check`]: every numeric
//! key within the range its type states (`range.rs`), and the rules across
//! fields, all reported at once.
//!
//! Loading opens no camera, GPU or socket. `check-config`, start-up and
//! hot reload all call [`Config::load`]. Which settings apply live and
//! which restart a part is documented in `etc/nanodetd.toml`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

mod publish;
mod range;

pub use publish::{
    DEFAULT_TRACKED, EventFormat, HomeAssistantConfig, SnapshotConfig, Tracked, slug,
};
pub use range::{
    BatchWait, Bounded, Coordinate, Decibels, FrameRate, HoursUpToAYear, Low, NonNegative,
    NonNegativeOrUnlimited, Ranged, RateUpTo1000, Real, RealRange, UnitInterval, Unsigned,
    UpToADay, UpToAnHour,
};

use crate::backend::BackendChoice;
use crate::backend::onnxruntime::Provider;
use crate::capture::{
    CameraFormat, CaptureIo, IfUnsupported, RtspRequest, RtspTransport, SourceSpec, V4l2Request,
    check_url,
};

/// A score or IoU in [0, 1].
pub type Probability = Real<f32, UnitInterval>;

/// A name that is safe as one MQTT topic level: not empty, at most 64
/// bytes, and free of `/`, `+`, `#` and control characters, so no camera
/// or device name can reach into another topic.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct TopicLevel(String);

impl TryFrom<String> for TopicLevel {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.is_empty() || s.len() > 64 {
            return Err(format!("must be 1 to 64 bytes, got {} bytes", s.len()));
        }
        if let Some(c) = s.chars().find(|&c| !topic_level_char(c)) {
            return Err(format!(
                "{s:?} contains {c:?}, which is not allowed in an MQTT topic level"
            ));
        }
        Ok(TopicLevel(s))
    }
}

/// Whether `c` may stand in an MQTT topic level: not a separator or
/// wildcard, not a control character, and not a Unicode non-character
/// (U+FDD0..U+FDEF, U+xFFFE, U+xFFFF), which MQTT's UTF-8 rules exclude and
/// on which mosquitto drops the connection.
pub fn topic_level_char(c: char) -> bool {
    let code = u32::from(c);
    let noncharacter = (0xFDD0..=0xFDEF).contains(&code) || code & 0xFFFE == 0xFFFE;
    !(matches!(c, '/' | '+' | '#') || c.is_control() || noncharacter)
}

impl TopicLevel {
    /// The name.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Where a camera's frames come from.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "SourceTable")]
pub enum SourceConfig {
    /// A V4L2 device, e.g. `/dev/video0`.
    V4l2(PathBuf),
    /// A folder of JPEG/PNG files, or a glob pattern of them.
    Folder(PathBuf),
    /// One photo handed out as raw camera frames (`format`, default
    /// yuyv; `size`, default the photo's; `fps`, default 30): a camera
    /// for benchmarks that costs no decoding.
    Synthetic(PathBuf),
    /// An H.264 file, raw Annex B or MP4, played at its frame rate.
    Video(PathBuf),
    /// An IP camera: `{ rtsp = "rtsp://host/path", user = "...",
    /// password_file = "...", transport = "tcp" }`.
    Rtsp(RtspSource),
}

/// An IP camera's source table.
#[derive(Debug, Clone, PartialEq)]
pub struct RtspSource {
    /// `rtsp://host[:port]/path`, without credentials.
    pub url: String,
    /// The user name, if the camera asks for one.
    pub user: Option<String>,
    /// The file holding the password.
    pub password_file: Option<PathBuf>,
    /// `tcp` (the default) or `udp`.
    pub transport: RtspTransport,
}

/// `source = { ... }` as written: one kind of source, and an RTSP
/// camera's settings beside it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceTable {
    v4l2: Option<PathBuf>,
    folder: Option<PathBuf>,
    synthetic: Option<PathBuf>,
    video: Option<PathBuf>,
    rtsp: Option<String>,
    user: Option<String>,
    password_file: Option<PathBuf>,
    transport: Option<RtspTransport>,
}

/// Why a `source` table is refused.
#[derive(Debug, thiserror::Error)]
pub enum SourceTableError {
    /// None or several of the kinds.
    #[error("a source is one of v4l2, folder, synthetic, video or rtsp")]
    NotOneKind,
    /// An RTSP key on another kind of source.
    #[error("user, password_file and transport are for rtsp sources")]
    RtspKeyElsewhere,
    /// The URL is refused.
    #[error(transparent)]
    Url(#[from] crate::capture::RtspError),
    /// A password file without a user.
    #[error("password_file needs a user")]
    PasswordWithoutUser,
    /// A user name that cannot go into an authorization header.
    #[error("user must be non-empty and hold no ':'")]
    BadUser,
}

impl TryFrom<SourceTable> for SourceConfig {
    type Error = SourceTableError;

    fn try_from(t: SourceTable) -> Result<SourceConfig, SourceTableError> {
        let kinds = [
            t.v4l2.map(SourceConfig::V4l2),
            t.folder.map(SourceConfig::Folder),
            t.synthetic.map(SourceConfig::Synthetic),
            t.video.map(SourceConfig::Video),
            t.rtsp.map(|url| {
                SourceConfig::Rtsp(RtspSource {
                    url,
                    user: None,
                    password_file: None,
                    transport: RtspTransport::Tcp,
                })
            }),
        ];
        let mut named = kinds.into_iter().flatten();
        let (Some(mut source), None) = (named.next(), named.next()) else {
            return Err(SourceTableError::NotOneKind);
        };
        match &mut source {
            SourceConfig::Rtsp(rtsp) => {
                check_url(&rtsp.url)?;
                if t.password_file.is_some() && t.user.is_none() {
                    return Err(SourceTableError::PasswordWithoutUser);
                }
                if t.user
                    .as_deref()
                    .is_some_and(|u| u.is_empty() || u.contains(':'))
                {
                    return Err(SourceTableError::BadUser);
                }
                rtsp.user = t.user;
                rtsp.password_file = t.password_file;
                rtsp.transport = t.transport.unwrap_or_default();
            }
            _ if t.user.is_some() || t.password_file.is_some() || t.transport.is_some() => {
                return Err(SourceTableError::RtspKeyElsewhere);
            }
            _ => {}
        }
        Ok(source)
    }
}

/// The detector. Cold: a change loads the new model in the background.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    /// NanoDet ONNX file.
    pub path: PathBuf,
    /// Inference backend: one by name, or `auto`, the fastest that runs
    /// here.
    #[serde(default = "default_backend")]
    pub backend: BackendChoice,
    /// Class-name file (default: COCO's 80).
    #[serde(default)]
    pub classes: Option<PathBuf>,
    /// Detector score floor.
    #[serde(default = "default_score")]
    pub score: Probability,
    /// NMS IoU threshold.
    #[serde(default = "default_iou")]
    pub iou: Probability,
    /// Detections kept per frame.
    #[serde(default = "default_max_detections")]
    pub max_detections: Bounded<usize, 1, { MAX_DETECTIONS as u64 }>,
    /// Precision the backend runs at.
    #[serde(default)]
    pub precision: Precision,
    /// How the INT8 model is made, when `precision = "int8"`.
    #[serde(default)]
    pub int8: Int8Config,
    /// Where built models (INT8 Q/DQ ONNX, TensorRT plans) are kept.
    #[serde(default = "default_cache")]
    pub cache: PathBuf,
    /// How the TensorRT engine is built, when `backend = "tensorrt"`.
    #[serde(default)]
    pub tensorrt: TensorRtConfig,
    /// Where ONNX Runtime is, when `backend = "onnxruntime"`.
    #[serde(default)]
    pub onnxruntime: OnnxRuntimeConfig,
}

impl ModelConfig {
    /// `[model]` with `path = path` and every other key at its default:
    /// what a command starts from before its flags.
    pub fn for_file(path: PathBuf) -> ModelConfig {
        ModelConfig {
            path,
            backend: default_backend(),
            classes: None,
            score: default_score(),
            iou: default_iou(),
            max_detections: default_max_detections(),
            precision: Precision::default(),
            int8: Int8Config::default(),
            cache: default_cache(),
            tensorrt: TensorRtConfig::default(),
            onnxruntime: OnnxRuntimeConfig::default(),
        }
    }
}

/// `[model.onnxruntime]`: the ONNX Runtime library, its threads and its
/// execution provider.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OnnxRuntimeConfig {
    /// libonnxruntime.so (`ORT_DYLIB_PATH` wins when set).
    #[serde(default)]
    pub library: Option<PathBuf>,
    /// Threads inside one operator.
    #[serde(default = "default_intra_threads")]
    pub intra_threads: Bounded<usize, 1, 256>,
    /// `cpu`, `cuda` or `tensorrt`. Unset: `cpu` for
    /// `backend = "onnxruntime"`, `cuda` for `auto` where nanodetd was
    /// built with feature `cuda`.
    #[serde(default)]
    pub provider: Option<Provider>,
    /// CUDA device of the GPU providers.
    #[serde(default = "device_zero")]
    pub device: Bounded<usize, 0, 63>,
    /// Replay the GPU provider's run as a CUDA graph (sessions of one
    /// batch size only: see `max_batch`).
    #[serde(default = "default_true")]
    pub cuda_graph: bool,
    /// Largest batch a GPU provider's session takes (cameras inferred
    /// together, up to `[batching] max_batch`): the model is made
    /// batchable and its device buffers sized for this many images. Above
    /// 1 the session runs without CUDA graphs.
    #[serde(default = "default_max_batch")]
    pub max_batch: Bounded<u32, 1, { crate::detector::MAX_BATCH as u64 }>,
}

impl Default for OnnxRuntimeConfig {
    fn default() -> Self {
        OnnxRuntimeConfig {
            library: None,
            intra_threads: default_intra_threads(),
            provider: None,
            device: device_zero(),
            cuda_graph: true,
            max_batch: default_max_batch(),
        }
    }
}

fn default_true() -> bool {
    true
}

fn default_intra_threads<const LO: u64, const HI: u64>() -> Bounded<usize, LO, HI> {
    Bounded::unchecked(1)
}
fn device_zero<const LO: u64, const HI: u64>() -> Bounded<usize, LO, HI> {
    Bounded::unchecked(0)
}

/// How an INT8 TensorRT engine gets its ranges.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Int8Mode {
    /// From the Q/DQ model nanodetd calibrates (every TensorRT version).
    #[default]
    Qdq,
    /// TensorRT's own entropy calibrator (TensorRT < 11 only; 11 falls
    /// back to `qdq`, loudly).
    Calibrator,
}

/// `[model.tensorrt]`: the TensorRT engine's build. Read by every build
/// of nanodetd, so one config serves CPU and GPU boxes.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorRtConfig {
    /// CUDA device index.
    #[serde(default = "device_zero")]
    pub device: Bounded<usize, 0, 63>,
    /// Builder workspace limit, MiB.
    #[serde(default = "default_workspace_mib")]
    pub workspace_mib: Bounded<u64, 1, { 1 << 20 }>,
    /// Largest batch the engine takes (cameras inferred together).
    #[serde(default = "default_max_batch")]
    pub max_batch: Bounded<u32, 1, 64>,
    /// DLA core (Jetson Xavier/Orin), with GPU fallback for the layers a
    /// DLA cannot run.
    #[serde(default)]
    pub dla_core: Option<Bounded<u32, 0, 15>>,
    /// Where INT8 ranges come from.
    #[serde(default)]
    pub int8_mode: Int8Mode,
    /// Replay each batch size's enqueue from a CUDA graph.
    #[serde(default = "default_true")]
    pub cuda_graph: bool,
    /// Plan directory (default: `engines/` under `[model] cache`).
    #[serde(default)]
    pub engines: Option<PathBuf>,
    /// Size limit of the plan directory, MiB; least recently used plans
    /// go first.
    #[serde(default = "default_engine_cache_mib")]
    pub cache_limit_mib: Bounded<u64, 1, { 1 << 24 }>,
}

impl Default for TensorRtConfig {
    fn default() -> Self {
        TensorRtConfig {
            device: device_zero(),
            workspace_mib: default_workspace_mib(),
            max_batch: default_max_batch(),
            dla_core: None,
            int8_mode: Int8Mode::Qdq,
            cuda_graph: true,
            engines: None,
            cache_limit_mib: default_engine_cache_mib(),
        }
    }
}

fn default_workspace_mib<const LO: u64, const HI: u64>() -> Bounded<u64, LO, HI> {
    Bounded::unchecked(1024)
}
fn default_max_batch<const LO: u64, const HI: u64>() -> Bounded<u32, LO, HI> {
    Bounded::unchecked(1)
}
fn default_engine_cache_mib<const LO: u64, const HI: u64>() -> Bounded<u64, LO, HI> {
    Bounded::unchecked(4096)
}

/// Numeric precision of inference.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    /// The model as exported.
    #[default]
    Fp32,
    /// Half precision, where the backend has it (TensorRT); CPU backends
    /// run FP32.
    Fp16,
    /// INT8 from an explicit Q/DQ model that nanodetd calibrates itself.
    Int8,
}

/// `[model.int8]`: the calibration behind an INT8 model.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Int8Config {
    /// Directory of calibration images (`nanodetd calibrate` fills it).
    #[serde(default = "default_calibration")]
    pub calibration: PathBuf,
    /// percentile (99.99), percentile:P, entropy, mse or minmax.
    #[serde(default = "default_method")]
    pub method: String,
    /// Use at most this many images.
    #[serde(default)]
    pub images: Option<Bounded<usize, 1, 100_000>>,
    /// Convs left in float (names, patterns, @first, @last).
    #[serde(default)]
    pub keep_float: Vec<String>,
    /// Equalize channels in front of depthwise Convs and after the stem.
    #[serde(default = "yes")]
    pub equalize: bool,
    /// Correct each quantized Conv's bias for the mean shift its weights'
    /// rounding causes (measured on the calibration images). On by default.
    #[serde(default = "yes")]
    pub bias_correction: bool,
    /// Round each quantized Conv's weights down or up, whichever keeps its
    /// outputs on the calibration images closest to the float ones. On by
    /// default.
    #[serde(default = "yes")]
    pub adaround: bool,
    /// Per tensor, the method's threshold or a second method's, whichever
    /// does less damage to the outputs on trial models. On by default.
    #[serde(default = "yes")]
    pub threshold_choice: bool,
    /// Automatic partial quantization: keep Convs in float for the outputs
    /// on the calibration images to reach `auto_float_db` against FP32,
    /// within 10 % of the MACs. On by default.
    #[serde(default = "yes")]
    pub auto_float: bool,
    /// Its SNR target (dB).
    #[serde(default = "default_auto_float_db")]
    pub auto_float_db: Option<Real<f64, Decibels>>,
}

fn default_auto_float_db() -> Option<Real<f64, Decibels>> {
    Real::new(crate::quantize::DEFAULT_AUTO_FLOAT_DB)
}

impl Default for Int8Config {
    fn default() -> Self {
        Int8Config {
            calibration: default_calibration(),
            method: default_method(),
            images: None,
            keep_float: Vec::new(),
            equalize: true,
            bias_correction: true,
            adaround: true,
            threshold_choice: true,
            auto_float: true,
            auto_float_db: default_auto_float_db(),
        }
    }
}

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum MqttProtocol {
    /// MQTT 3.1.1.
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.
    #[serde(rename = "5")]
    V5,
}

/// TLS to the broker (rustls). Without `ca`, the system's roots are used.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the CA that signed the broker's certificate.
    pub ca: PathBuf,
    /// PEM client certificate, for brokers that require one.
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
}

/// MQTT quality of service: 0, 1 or 2.
pub type Qos = Bounded<u8, 0, 2>;

/// QoS per class of topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QosConfig {
    /// `<camera>/events`.
    #[serde(default = "qos1")]
    pub events: Qos,
    /// `<camera>/<label>` counts, `available` and `status`.
    #[serde(default = "qos1")]
    pub state: Qos,
    /// `<camera>/detections`.
    #[serde(default = "qos0")]
    pub detections: Qos,
    /// `stats`.
    #[serde(default = "qos0")]
    pub stats: Qos,
}

impl Default for QosConfig {
    fn default() -> Self {
        QosConfig {
            events: qos1(),
            state: qos1(),
            detections: qos0(),
            stats: qos0(),
        }
    }
}

/// The broker and what is published. Connection keys reconnect; the rest
/// is hot.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Broker host.
    #[serde(default = "default_host")]
    pub host: String,
    /// Broker port.
    #[serde(default = "default_port")]
    pub port: Bounded<u16, 1, { u16::MAX as u64 }>,
    /// Protocol version.
    #[serde(default = "default_protocol")]
    pub protocol: MqttProtocol,
    /// Client id (default `nanodetd-<device_id>`).
    #[serde(default)]
    pub client_id: Option<String>,
    /// Topic prefix (default `nanodetd/<device_id>`); `/` separates levels.
    #[serde(default)]
    pub prefix: Option<String>,
    /// User name.
    #[serde(default)]
    pub username: Option<String>,
    /// File holding the password, never the password itself.
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// TLS; plain TCP when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// QoS per topic class.
    #[serde(default)]
    pub qos: QosConfig,
    /// Seconds between keep-alive pings.
    /// MQTT 5's client refuses less than 5 s; the protocol field is 16 bits.
    #[serde(default = "default_keep_alive")]
    pub keep_alive: Bounded<u16, 5, { u16::MAX as u64 }>,
    /// Longest wait between reconnect attempts (seconds); the wait doubles
    /// from 0.5 s up to this.
    #[serde(default = "default_reconnect_max")]
    pub reconnect_max: Real<f32, UpToAnHour>,
    /// Messages held while the broker is unreachable; beyond, the oldest
    /// are dropped and counted.
    /// With max_message_bytes, this bounds the outbox's memory.
    #[serde(default = "default_queue")]
    pub queue: Bounded<usize, 1, { MAX_QUEUE as u64 }>,
    /// Seconds between `stats` messages.
    #[serde(default = "default_stats_interval")]
    pub stats_interval: Real<f32, UpToADay>,
    /// Publish every frame's raw detections on `<camera>/detections`, at
    /// most this many messages per second per camera (0: off).
    #[serde(default = "zero")]
    pub detections_rate: Real<f32, RateUpTo1000>,
    /// Largest MQTT packet the daemon sends or takes, in bytes. A message
    /// that would be larger is dropped and counted, never retried. Keep it
    /// at or below the broker's limit (mosquitto: `message_size_limit`).
    /// MQTT's largest packet is 256 MiB; below 1 KiB not even stats fit.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: Bounded<usize, 1024, 268_435_455>,
    /// Run an MQTT broker inside the daemon, listening on `host:port`
    /// (loopback only), for the demo and for trying nanodetd with nothing
    /// installed. Cold: read at start.
    #[serde(default)]
    pub embedded_broker: bool,
    /// Which events go out: `native` (`<camera>/events`), `frigate`
    /// (`events`, Frigate's payload) or `both`.
    #[serde(default)]
    pub events: EventFormat,
}

impl Default for MqttConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every MQTT key has a default"))
    }
}

/// Why a configured embedded broker cannot run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EmbeddedBrokerError {
    /// The build left the broker out.
    #[error(
        "this nanodetd was built without the embedded broker (cargo feature `embedded-broker`, left out of the packages); point host/port at a broker"
    )]
    NotCompiledIn,
    /// `host` is a name other than `localhost`.
    #[error(
        "the embedded broker listens on loopback only: host must be \"localhost\" or a loopback address, not {0:?}"
    )]
    NotAnAddress(String),
    /// `host` is an address off this machine.
    #[error(
        "the embedded broker listens on loopback only (it has no authentication): {0} is not a loopback address"
    )]
    NotLoopback(std::net::IpAddr),
    /// TLS or credentials were configured for it.
    #[error(
        "the embedded broker is plain and anonymous: leave out [mqtt.tls], username and password_file"
    )]
    Secured,
}

impl MqttConfig {
    /// Where the embedded broker listens, when it is on and `host` is a
    /// loopback address (`localhost` is 127.0.0.1); `Err` says why a
    /// configured one cannot run.
    pub fn embedded_broker_addr(
        &self,
    ) -> Result<Option<std::net::SocketAddr>, EmbeddedBrokerError> {
        if !self.embedded_broker {
            return Ok(None);
        }
        if cfg!(not(feature = "embedded-broker")) {
            return Err(EmbeddedBrokerError::NotCompiledIn);
        }
        let ip: std::net::IpAddr = if self.host == "localhost" {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            self.host
                .parse()
                .map_err(|_| EmbeddedBrokerError::NotAnAddress(self.host.clone()))?
        };
        if !ip.is_loopback() {
            return Err(EmbeddedBrokerError::NotLoopback(ip));
        }
        if self.tls.is_some() || self.username.is_some() || self.password_file.is_some() {
            return Err(EmbeddedBrokerError::Secured);
        }
        Ok(Some(std::net::SocketAddr::new(ip, self.port.get())))
    }

    /// The topic prefix in effect.
    pub fn prefix_for(&self, device_id: &TopicLevel) -> String {
        self.prefix
            .clone()
            .unwrap_or_else(|| format!("nanodetd/{}", device_id.as_str()))
    }

    /// True when the connection itself differs, so a reload must reconnect.
    /// The prefix counts: the last will names `<prefix>/available`; so does
    /// the packet limit, which the client takes at connect.
    pub fn needs_reconnect(&self, other: &MqttConfig) -> bool {
        (
            &self.host,
            self.port,
            self.protocol,
            &self.client_id,
            &self.prefix,
            &self.username,
            &self.password_file,
            &self.tls,
            self.keep_alive,
            self.max_message_bytes,
        ) != (
            &other.host,
            other.port,
            other.protocol,
            &other.client_id,
            &other.prefix,
            &other.username,
            &other.password_file,
            &other.tls,
            other.keep_alive,
            other.max_message_bytes,
        )
    }
}

/// Tracker settings, for every camera. Hot.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrackerSettings {
    /// Scores remembered per object for the median (frames).
    /// The median sorts `history` scores per object per frame.
    #[serde(default = "default_history")]
    pub history: Bounded<usize, 1, { MAX_HISTORY as u64 }>,
    /// IoU with its last box for a detection to continue an object.
    #[serde(default = "default_match_iou")]
    pub match_iou: Probability,
    /// Seconds unseen before an object ends.
    #[serde(default = "default_lost_after")]
    pub lost_after: Real<f64, UpToAnHour>,
    /// An object whose box overlaps its last published one by less than
    /// this IoU has moved enough for an `update`.
    #[serde(default = "default_moved_iou")]
    pub moved_iou: Probability,
    /// A top-score rise that is worth an `update`.
    #[serde(default = "default_score_step")]
    pub score_step: Probability,
    /// Seconds after which an unchanged object gets an `update` anyway.
    #[serde(default = "default_heartbeat")]
    pub heartbeat: Real<f64, UpToADay>,
    /// Frames in a row an object must stay put to be `stationary`.
    #[serde(default = "default_stationary_frames")]
    pub stationary_frames: Bounded<u32, 1, 1_000_000>,
}

impl Default for TrackerSettings {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every tracker key has a default"))
    }
}

/// Logging.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// error, warn, info, debug or trace.
    #[serde(default = "default_log_level")]
    pub level: log::LevelFilter,
    /// Print each event as one line on standard output.
    #[serde(default)]
    pub events: ConsoleEvents,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: default_log_level(),
            events: ConsoleEvents::default(),
        }
    }
}

/// When events are printed on standard output, one line each.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ConsoleEvents {
    /// When standard output is a terminal: someone is watching.
    #[default]
    Auto,
    /// Always (the demo; piped into another program).
    Always,
    /// Never.
    Never,
}

impl ConsoleEvents {
    /// Whether to print now.
    pub fn enabled(self) -> bool {
        use std::io::IsTerminal;
        match self {
            ConsoleEvents::Auto => std::io::stdout().is_terminal(),
            ConsoleEvents::Always => true,
            ConsoleEvents::Never => false,
        }
    }
}

/// Per-label filters, by class name. Hot.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Detections below this are ignored.
    #[serde(default = "default_score")]
    pub min_score: Probability,
    /// Median score for a track to become real.
    #[serde(default = "default_threshold")]
    pub threshold: Probability,
    /// Smallest box area, pixels.
    #[serde(default = "zero")]
    pub min_area: Real<f32, NonNegative>,
    /// Largest box area, pixels.
    #[serde(default = "infinite")]
    pub max_area: Real<f32, NonNegativeOrUnlimited>,
    /// Smallest width / height.
    #[serde(default = "zero")]
    pub min_ratio: Real<f32, NonNegative>,
    /// Largest width / height.
    #[serde(default = "infinite")]
    pub max_ratio: Real<f32, NonNegativeOrUnlimited>,
}

/// One camera. Its source settings are cold (the camera restarts alone);
/// zones and masks are hot.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CameraConfig {
    /// Name, also its topic level.
    pub name: TopicLevel,
    /// Frame source.
    pub source: SourceConfig,
    /// Frames per second asked of the source (folder: playback rate).
    #[serde(default)]
    pub fps: Option<Real<f32, FrameRate>>,
    /// Replay a folder forever.
    #[serde(default)]
    pub looping: bool,
    /// Folder: frames each image is shown for, so one photo can make a
    /// track real (the tracker needs several frames).
    #[serde(default = "default_repeat")]
    pub repeat: Bounded<u32, 1, 100_000>,
    /// Synthetic: the photo shows for this many frames, then a black frame
    /// as many, over and over, so objects come and go and events keep
    /// coming (a benchmark's capture-to-event latency). Unset: the photo,
    /// always.
    #[serde(default)]
    pub blink: Option<Bounded<u32, 1, 100_000>>,
    /// V4L2 pixel format (mjpeg, yuyv, uyvy, nv12, grey, rgb24, bgr24); chosen
    /// from what the device offers when unset.
    #[serde(default)]
    pub format: Option<CameraFormat>,
    /// V4L2 `[width, height]`; chosen when unset.
    #[serde(default)]
    pub size: Option<[Bounded<u32, 1, { MAX_SIDE as u64 }>; 2]>,
    /// When the device lacks `format` or `size`: `negotiate` (stream what
    /// it offers, with a warning) or `refuse` (an error, retried).
    #[serde(default)]
    pub if_unsupported: IfUnsupported,
    /// V4L2 streaming I/O: `auto` (USERPTR into page-locked buffers while
    /// a GPU detector takes raw frames, where the driver allows; mmap
    /// otherwise), `mmap` or `userptr`.
    #[serde(default)]
    pub io: CaptureIo,
    /// The most pixels one frame of this camera may have; a larger image
    /// file or MJPEG frame is refused before it is decoded, a larger V4L2
    /// format before it streams. Unset: `size`'s pixels for a V4L2 camera
    /// with a `size`, 1920x1080 for one without, 8 Mi for a folder.
    #[serde(default)]
    pub max_pixels: Option<Bounded<u64, 1, { crate::frame::MAX_PIXELS }>>,
    /// Named polygons in image pixels.
    #[serde(default)]
    pub zones: BTreeMap<TopicLevel, Vec<[f32; 2]>>,
    /// Polygons where detections are ignored.
    #[serde(default)]
    pub masks: Vec<Vec<[f32; 2]>>,
    /// Labels whose objects become events, counts and entities; `["all"]`
    /// for every label of the model.
    #[serde(default)]
    pub track: Tracked,
}

impl CameraConfig {
    /// The most pixels one of its frames may have: `max_pixels`, or the
    /// default for its kind of source.
    pub fn frame_budget(&self) -> u64 {
        self.max_pixels.map_or(
            match (&self.source, self.size) {
                (SourceConfig::V4l2(_), Some([w, h])) => u64::from(w.get()) * u64::from(h.get()),
                (SourceConfig::V4l2(_), None) => 1920 * 1080,
                (SourceConfig::Synthetic(_), Some([w, h])) => {
                    u64::from(w.get()) * u64::from(h.get())
                }
                (
                    SourceConfig::Folder(_)
                    | SourceConfig::Synthetic(_)
                    | SourceConfig::Video(_)
                    | SourceConfig::Rtsp(_),
                    _,
                ) => DEFAULT_FOLDER_PIXELS,
            },
            Bounded::get,
        )
    }

    /// What the capture layer opens for this camera.
    pub fn source_spec(&self) -> SourceSpec {
        let max_pixels = self.frame_budget();
        match &self.source {
            SourceConfig::Folder(path) => SourceSpec::Folder {
                path: path.clone(),
                looping: self.looping,
                max_pixels,
            },
            SourceConfig::Synthetic(path) => SourceSpec::Synthetic {
                path: path.clone(),
                format: self.format.unwrap_or(CameraFormat::Yuyv),
                size: self.size.map(|[w, h]| (w.get() as usize, h.get() as usize)),
                max_pixels,
                blink: self.blink.map(Bounded::get),
            },
            SourceConfig::Video(path) => SourceSpec::Video {
                path: path.clone(),
                looping: self.looping,
                max_pixels,
            },
            SourceConfig::Rtsp(rtsp) => SourceSpec::Rtsp(RtspRequest {
                url: rtsp.url.clone(),
                user: rtsp.user.clone(),
                password_file: rtsp.password_file.clone(),
                transport: rtsp.transport,
                max_pixels,
            }),
            SourceConfig::V4l2(path) => SourceSpec::V4l2 {
                path: path.clone(),
                request: V4l2Request {
                    format: self.format,
                    size: self.size.map(|[w, h]| (w.get(), h.get())),
                    fps: self.fps.map(Real::get),
                    if_unsupported: self.if_unsupported,
                    io: self.io,
                    max_pixels,
                },
            },
        }
    }

    /// True when both read the same source the same way, so a reload that
    /// changed only zones or masks leaves the camera running.
    pub fn same_source(&self, other: &CameraConfig) -> bool {
        self.frame_budget() == other.frame_budget()
            && (
                &self.source,
                self.fps,
                self.looping,
                self.repeat,
                self.blink,
                self.format,
                self.size,
                self.if_unsupported,
                self.io,
            ) == (
                &other.source,
                other.fps,
                other.looping,
                other.repeat,
                other.blink,
                other.format,
                other.size,
                other.if_unsupported,
                other.io,
            )
    }
}

/// The whole file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// This box's name, the second topic level.
    #[serde(default = "default_device_id")]
    pub device_id: TopicLevel,
    /// The detector.
    pub model: ModelConfig,
    /// The broker.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Filters by label.
    #[serde(default)]
    pub filters: BTreeMap<String, FilterConfig>,
    /// Tracker settings.
    #[serde(default)]
    pub tracker: TrackerSettings,
    /// Logging.
    #[serde(default)]
    pub log: LogConfig,
    /// Limits across cameras.
    #[serde(default)]
    pub capture: CaptureConfig,
    /// Frames of several cameras in one run.
    #[serde(default)]
    pub batching: BatchingConfig,
    /// Cameras (`[[camera]]` tables).
    #[serde(rename = "camera")]
    pub cameras: Vec<CameraConfig>,
    /// Home Assistant's MQTT discovery.
    #[serde(default)]
    pub homeassistant: HomeAssistantConfig,
    /// Snapshots of events.
    #[serde(default)]
    pub snapshots: SnapshotConfig,
    /// The Prometheus and health endpoint.
    #[serde(default)]
    pub metrics: MetricsConfig,
}

/// `[metrics]`: the HTTP endpoint for Prometheus and health probes
/// (docs/METRICS.md). Hot: a change rebinds.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where to serve `/metrics`, `/healthz` and `/readyz`, as
    /// `address:port` (`[::1]:9464` for IPv6); off when absent.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// Seconds a pipeline thread may go without progress before
    /// `/healthz` answers 503 naming it; the packaged unit's
    /// `WatchdogSec` is 30.
    #[serde(default = "default_stale_after")]
    pub stale_after: Real<f64, UpToAnHour>,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: None,
            stale_after: default_stale_after(),
        }
    }
}

/// `[batching]`: the detector runs frames of several cameras at once
/// where its session can (a GPU engine whose model batches), as
/// DeepStream's stream muxer does. Hot.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchingConfig {
    /// Frames in one run at most, one per camera; 1 runs each frame
    /// alone. Capped by what the session takes (TensorRT:
    /// `model.tensorrt.max_batch`; ONNX Runtime on a GPU:
    /// `model.onnxruntime.max_batch`); host sessions run one.
    #[serde(default = "default_batch_size")]
    pub max_batch: Bounded<usize, 1, { crate::detector::MAX_BATCH as u64 }>,
    /// Seconds the oldest waiting frame may wait for more to fill the
    /// batch; 0 takes what is there.
    #[serde(default = "default_batch_wait")]
    pub wait: Real<f64, BatchWait>,
}

impl Default for BatchingConfig {
    fn default() -> Self {
        BatchingConfig {
            max_batch: default_batch_size(),
            wait: default_batch_wait(),
        }
    }
}

fn default_batch_size<const LO: u64, const HI: u64>() -> Bounded<usize, LO, HI> {
    Bounded::unchecked(1)
}

fn default_batch_wait<R: RealRange>() -> Real<f64, R> {
    Real::unchecked(0.002)
}

/// The port the docs, the unit's `SocketBindAllow=` and the examples use:
/// the one registered for OpenTelemetry's Prometheus exporter.
pub const DEFAULT_METRICS_PORT: u16 = 9464;

fn default_stale_after<R: RealRange>() -> Real<f64, R> {
    Real::unchecked(30.0)
}

/// `[capture]`: what all cameras together may hold.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaptureConfig {
    /// The cameras' frame budgets (`camera.max_pixels`) may add up to at
    /// most this. A camera holds up to three frames (being captured,
    /// waiting, being detected) of 3 bytes a pixel, so frames take at most
    /// about 9 bytes per pixel of this: 1.1 GiB at the default.
    #[serde(default = "default_max_pixels_total")]
    pub max_pixels_total: Bounded<u64, 1, MAX_PIXELS_TOTAL>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            max_pixels_total: default_max_pixels_total(),
        }
    }
}

fn default_max_pixels_total<const LO: u64, const HI: u64>() -> Bounded<u64, LO, HI> {
    Bounded::unchecked(128 << 20)
}

/// A folder camera's frame budget when `max_pixels` is unset: 8 Mi
/// pixels, room for a 4K UHD frame (3840x2160), and for 16 such cameras
/// within the default `capture.max_pixels_total`.
pub const DEFAULT_FOLDER_PIXELS: u64 = 8 << 20;

fn default_cache() -> PathBuf {
    PathBuf::from("/var/cache/nanodetd")
}
fn default_calibration() -> PathBuf {
    PathBuf::from("/var/lib/nanodetd/calibration")
}
fn default_method() -> String {
    "percentile".into()
}
fn yes() -> bool {
    true
}
fn default_backend() -> BackendChoice {
    BackendChoice::Only(crate::backend::BackendKind::Tract)
}
fn default_score() -> Probability {
    Real::unchecked(0.35)
}
fn default_threshold() -> Probability {
    Real::unchecked(0.5)
}
fn default_iou() -> Probability {
    Real::unchecked(0.6)
}
fn default_max_detections<const LO: u64, const HI: u64>() -> Bounded<usize, LO, HI> {
    Bounded::unchecked(100)
}
fn default_max_message_bytes<const LO: u64, const HI: u64>() -> Bounded<usize, LO, HI> {
    Bounded::unchecked(256 * 1024)
}
fn default_host() -> String {
    "localhost".into()
}
fn default_port<const LO: u64, const HI: u64>() -> Bounded<u16, LO, HI> {
    Bounded::unchecked(1883)
}
fn default_device_id() -> TopicLevel {
    TopicLevel("nanodetd".into())
}
fn infinite<R: RealRange>() -> Real<f32, R> {
    Real::unchecked(f32::INFINITY)
}
fn zero<R: RealRange>() -> Real<f32, R> {
    Real::unchecked(0.0)
}
fn default_repeat<const LO: u64, const HI: u64>() -> Bounded<u32, LO, HI> {
    Bounded::unchecked(1)
}
fn qos0() -> Qos {
    Bounded::unchecked(0)
}
fn qos1() -> Qos {
    Bounded::unchecked(1)
}
fn default_protocol() -> MqttProtocol {
    MqttProtocol::V311
}
fn default_keep_alive<const LO: u64, const HI: u64>() -> Bounded<u16, LO, HI> {
    Bounded::unchecked(30)
}
fn default_reconnect_max<R: RealRange>() -> Real<f32, R> {
    Real::unchecked(30.0)
}
fn default_queue<const LO: u64, const HI: u64>() -> Bounded<usize, LO, HI> {
    Bounded::unchecked(10_000)
}
fn default_stats_interval<R: RealRange>() -> Real<f32, R> {
    Real::unchecked(60.0)
}
fn default_history<const LO: u64, const HI: u64>() -> Bounded<usize, LO, HI> {
    Bounded::unchecked(5)
}
fn default_match_iou() -> Probability {
    Real::unchecked(0.3)
}
fn default_lost_after<R: RealRange>() -> Real<f64, R> {
    Real::unchecked(2.0)
}
fn default_moved_iou() -> Probability {
    Real::unchecked(0.5)
}
fn default_score_step() -> Probability {
    Real::unchecked(0.05)
}
fn default_stationary_frames<const LO: u64, const HI: u64>() -> Bounded<u32, LO, HI> {
    Bounded::unchecked(50)
}
fn default_heartbeat<R: RealRange>() -> Real<f64, R> {
    Real::unchecked(60.0)
}
fn default_log_level() -> log::LevelFilter {
    log::LevelFilter::Info
}

/// Why a configuration was rejected.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file cannot be read.
    #[error("{path}: cannot read: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Not valid TOML, an unknown key, or a bad value; the message gives the
    /// key, line and column.
    #[error("{path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message, one line.
        message: String,
    },
    /// Larger than any real configuration: refused before parsing, which
    /// would take the reload watcher seconds and memory in proportion.
    #[error("{path}: {size} bytes; a configuration file may be at most {MAX_CONFIG_BYTES} bytes")]
    TooLarge {
        /// The file.
        path: PathBuf,
        /// Its size, or the bytes read before giving up.
        size: u64,
    },
    /// Values out of range or that do not fit together: every one found
    /// (the rules across fields first, then the ranges), so one edit can
    /// fix them all.
    #[error("{path}: {}", problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, at least one.
        problems: Vec<Problem>,
    },
}

/// One value that is out of range or does not fit with another.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {reason}")]
pub struct Problem {
    /// The key, as a dotted path.
    pub key: String,
    /// What is wrong.
    pub reason: String,
}

impl Config {
    /// Reads, parses and checks a configuration file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        use std::io::Read;
        let read_error = |source| ConfigError::Read {
            path: path.to_owned(),
            source,
        };
        let mut text = String::new();
        std::fs::File::open(path)
            .map_err(read_error)?
            .take(MAX_CONFIG_BYTES + 1)
            .read_to_string(&mut text)
            .map_err(read_error)?;
        if text.len() as u64 > MAX_CONFIG_BYTES {
            return Err(ConfigError::TooLarge {
                path: path.to_owned(),
                size: text.len() as u64,
            });
        }
        Config::parse(&text, path)
    }

    /// Parses and checks configuration text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: one_line(&e, text),
        })?;
        config.check(path)?;
        Ok(config)
    }

    /// Every numeric key within a range that keeps the daemon's memory,
    /// time and arithmetic bounded: each key outside its range, and why,
    /// the range taken from the key's type. A value that parses is not enough (`history = 2^64 - 1` once
    /// aborted the daemon on its first frame).
    fn check_ranges(&self) -> Vec<Problem> {
        let mut ranges = RangeCheck::default();
        let m = &self.model;
        ranges.key("model.score", m.score);
        ranges.key("model.iou", m.iou);
        ranges.key("model.max_detections", m.max_detections);
        ranges.key(
            "model.onnxruntime.intra_threads",
            m.onnxruntime.intra_threads,
        );
        ranges.key("model.onnxruntime.device", m.onnxruntime.device);
        ranges.key("model.onnxruntime.max_batch", m.onnxruntime.max_batch);
        let trt = &m.tensorrt;
        ranges.key("model.tensorrt.device", trt.device);
        ranges.key("model.tensorrt.workspace_mib", trt.workspace_mib);
        ranges.key("model.tensorrt.max_batch", trt.max_batch);
        ranges.key("model.tensorrt.dla_core", trt.dla_core);
        ranges.key("model.tensorrt.cache_limit_mib", trt.cache_limit_mib);
        ranges.key("model.int8.images", m.int8.images);
        ranges.key("model.int8.auto_float_db", m.int8.auto_float_db);
        let mqtt = &self.mqtt;
        ranges.key("mqtt.port", mqtt.port);
        ranges.key("mqtt.keep_alive", mqtt.keep_alive);
        ranges.key("mqtt.queue", mqtt.queue);
        ranges.key("mqtt.max_message_bytes", mqtt.max_message_bytes);
        ranges.key("mqtt.reconnect_max", mqtt.reconnect_max);
        ranges.key("mqtt.stats_interval", mqtt.stats_interval);
        ranges.key("mqtt.detections_rate", mqtt.detections_rate);
        let qos = &mqtt.qos;
        ranges.key("mqtt.qos.events", qos.events);
        ranges.key("mqtt.qos.state", qos.state);
        ranges.key("mqtt.qos.detections", qos.detections);
        ranges.key("mqtt.qos.stats", qos.stats);
        let t = &self.tracker;
        ranges.key("tracker.history", t.history);
        ranges.key("tracker.lost_after", t.lost_after);
        ranges.key("tracker.heartbeat", t.heartbeat);
        ranges.key("tracker.match_iou", t.match_iou);
        ranges.key("tracker.moved_iou", t.moved_iou);
        ranges.key("tracker.score_step", t.score_step);
        ranges.key("tracker.stationary_frames", t.stationary_frames);
        let s = &self.snapshots;
        ranges.key("snapshots.margin", s.margin);
        ranges.key("snapshots.height", s.height);
        ranges.key("snapshots.quality", s.quality);
        ranges.key("snapshots.queue", s.queue);
        ranges.key("snapshots.keep_count", s.keep_count);
        ranges.key("snapshots.keep_mib", s.keep_mib);
        ranges.key("snapshots.keep_hours", s.keep_hours);
        ranges.key("metrics.stale_after", self.metrics.stale_after);
        for (label, f) in &self.filters {
            let key = |k: &str| format!("filters.{label}.{k}");
            ranges.key(&key("min_score"), f.min_score);
            ranges.key(&key("threshold"), f.threshold);
            ranges.key(&key("min_area"), f.min_area);
            ranges.key(&key("min_ratio"), f.min_ratio);
            ranges.key(&key("max_area"), f.max_area);
            ranges.key(&key("max_ratio"), f.max_ratio);
        }
        ranges.count::<1, { MAX_CAMERAS as u64 }>("camera", self.cameras.len());
        for (i, cam) in self.cameras.iter().enumerate() {
            let key = |k: &str| format!("camera[{i}].{k}");
            ranges.key(&key("max_pixels"), cam.max_pixels);
            ranges.key(&key("fps"), cam.fps);
            ranges.key(&key("repeat"), cam.repeat);
            ranges.key(&key("blink"), cam.blink);
            if let Some([w, h]) = cam.size {
                ranges.key(&key("size[0]"), w);
                ranges.key(&key("size[1]"), h);
            }
            ranges.count::<0, { MAX_POLYGONS as u64 }>(&key("zones"), cam.zones.len());
            ranges.count::<0, { MAX_POLYGONS as u64 }>(&key("masks"), cam.masks.len());
            ranges.count::<0, 1000>(&key("track"), cam.track.listed().len());
            let polygons = cam
                .zones
                .iter()
                .map(|(z, p)| (key(&format!("zones.{}", z.as_str())), p))
                .chain(
                    cam.masks
                        .iter()
                        .enumerate()
                        .map(|(m, p)| (key(&format!("masks[{m}]")), p)),
                );
            for (key, polygon) in polygons {
                if !(3..=MAX_POLYGON_POINTS).contains(&polygon.len()) {
                    ranges.fail(
                        &key,
                        format!(
                            "a polygon needs 3 to {MAX_POLYGON_POINTS} points, got {}",
                            polygon.len()
                        ),
                    );
                }
                for (p, [x, y]) in polygon.iter().enumerate() {
                    let point = format!("{key}[{p}]");
                    ranges.key(&point, Real::<f32, Coordinate>::unchecked(*x));
                    ranges.key(&point, Real::<f32, Coordinate>::unchecked(*y));
                }
            }
        }
        // After the cameras' own ranges, which name the key at fault.
        let total = self.capture.max_pixels_total;
        ranges.key("capture.max_pixels_total", total);
        ranges.key("batching.max_batch", self.batching.max_batch);
        ranges.key("batching.wait", self.batching.wait);
        let total = total.get();
        let budgets = self
            .cameras
            .iter()
            .map(CameraConfig::frame_budget)
            .fold(0u64, u64::saturating_add);
        if budgets > total {
            ranges.fail(
                "capture.max_pixels_total",
                format!(
                    "the cameras' frame budgets (camera.max_pixels, or their defaults) add up to {budgets} pixels, over {total}; \
                     lower camera.max_pixels or raise capture.max_pixels_total"
                ),
            );
        }
        ranges.count::<0, 10_000>("filters", self.filters.len());
        ranges.problems
    }

    /// Rules that span fields.
    pub fn check(&self, path: &Path) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut invalid = |key: String, reason: String| problems.push(Problem { key, reason });
        if self.cameras.is_empty() {
            invalid("camera".into(), "at least one [[camera]] is needed".into());
        }
        let mut names = BTreeSet::new();
        let mut slugs = BTreeMap::new();
        for (i, cam) in self.cameras.iter().enumerate() {
            let name = cam.name.as_str();
            if !names.insert(name) {
                invalid(
                    format!("camera[{i}].name"),
                    format!("{name:?} is used by an earlier camera"),
                );
                continue;
            }
            if matches!(cam.source, SourceConfig::Synthetic(_))
                && cam.format == Some(CameraFormat::Mjpeg)
            {
                invalid(
                    format!("camera[{i}].format"),
                    "a synthetic source hands out raw frames: yuyv, uyvy, nv12, grey, rgb24 or bgr24"
                        .into(),
                );
            }
            if matches!(cam.source, SourceConfig::Video(_) | SourceConfig::Rtsp(_)) {
                let decoded = "a video or RTSP source is H.264, decoded at the size it was encoded";
                if cam.format.is_some() {
                    invalid(format!("camera[{i}].format"), decoded.into());
                }
                if cam.size.is_some() {
                    invalid(format!("camera[{i}].size"), decoded.into());
                }
            }
            if matches!(cam.source, SourceConfig::Rtsp(_)) {
                if cam.fps.is_some() {
                    invalid(
                        format!("camera[{i}].fps"),
                        "an RTSP camera streams at the rate set on the camera; the newest frame is detected"
                            .into(),
                    );
                }
                if cam.looping {
                    invalid(
                        format!("camera[{i}].looping"),
                        "is for folders and video files".into(),
                    );
                }
            }
            if matches!(cam.source, SourceConfig::Video(_) | SourceConfig::Rtsp(_))
                && cam.repeat.get() != 1
            {
                invalid(
                    format!("camera[{i}].repeat"),
                    "is for image folders: a video's frames each show once".into(),
                );
            }
            // Snapshot folders and Home Assistant's ids are the slug.
            let slug = slug(name);
            if slug.is_empty() {
                invalid(
                    format!("camera[{i}].name"),
                    format!("{name:?} needs at least one ASCII letter or digit"),
                );
            } else if let Some(other) = slugs.insert(slug.clone(), name) {
                invalid(
                    format!("camera[{i}].name"),
                    format!(
                        "{name:?} and {other:?} both become {slug:?} in snapshot folders and Home Assistant ids"
                    ),
                );
            }
        }
        // Home Assistant's device and unique ids are the device's slug.
        if slug(self.device_id.as_str()).is_empty() {
            invalid(
                "device_id".into(),
                format!(
                    "{:?} needs at least one ASCII letter or digit",
                    self.device_id.as_str()
                ),
            );
        }
        let ha = &self.homeassistant.discovery_prefix;
        if ha
            .split('/')
            .any(|l| TopicLevel::try_from(l.to_owned()).is_err())
        {
            invalid(
                "homeassistant.discovery_prefix".into(),
                format!("{ha:?} has an empty level, or one with +, # or a control character"),
            );
        }
        for (label, f) in &self.filters {
            if f.min_area.get() > f.max_area.get() || f.min_ratio.get() > f.max_ratio.get() {
                invalid(
                    format!("filters.{label}"),
                    "min_area/min_ratio must not exceed max_area/max_ratio".into(),
                );
            }
        }
        if let Err(reason) = self.mqtt.embedded_broker_addr() {
            invalid("mqtt.embedded_broker".into(), reason.to_string());
        }
        if let Err(reason) = crate::quantize::parse_method(&self.model.int8.method) {
            invalid("model.int8.method".into(), reason.to_string());
        }
        let mqtt = &self.mqtt;
        if let Some(prefix) = &mqtt.prefix
            && let Some(level) = prefix
                .split('/')
                .find(|l| TopicLevel::try_from(l.to_string()).is_err())
        {
            invalid(
                "mqtt.prefix".into(),
                format!("level {level:?} is empty or holds +, # or a control character"),
            );
        }
        if let Some(tls) = &mqtt.tls
            && tls.cert.is_some() != tls.key.is_some()
        {
            invalid(
                "mqtt.tls".into(),
                "cert and key go together: give both or neither".into(),
            );
        }
        if mqtt.password_file.is_some() && mqtt.username.is_none() {
            invalid(
                "mqtt.password_file".into(),
                "a password needs mqtt.username".into(),
            );
        }
        problems.extend(self.check_ranges());
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                path: path.to_owned(),
                problems,
            })
        }
    }
}

/// Largest configuration file, in bytes: a generous config with 256
/// cameras and their zones is under 200 KB.
pub const MAX_CONFIG_BYTES: u64 = 1 << 20;

/// Largest `model.max_detections`: more boxes than any scene holds, and a
/// bound on the tracker's per-frame work.
pub const MAX_DETECTIONS: usize = 1000;
/// Largest `mqtt.queue`, in messages.
pub const MAX_QUEUE: usize = 100_000;
/// Largest `tracker.history`, in frames.
pub const MAX_HISTORY: usize = 100;
/// Most cameras one daemon runs.
pub const MAX_CAMERAS: usize = 256;
/// Largest camera side in pixels (V4L2 `size`).
pub const MAX_SIDE: u32 = 16_384;
/// Largest `capture.max_pixels_total`: 64 Gi pixels, beyond any box.
pub const MAX_PIXELS_TOTAL: u64 = 1 << 36;
/// Most zones, and most masks, per camera.
pub const MAX_POLYGONS: usize = 64;
/// Most points per zone or mask polygon.
pub const MAX_POLYGON_POINTS: usize = 1000;
/// Largest polygon coordinate magnitude, in pixels.
pub const MAX_COORDINATE: f32 = 1.0e6;

/// Collects every key outside its range, so one check reports them all.
#[derive(Default)]
struct RangeCheck {
    problems: Vec<Problem>,
}

impl RangeCheck {
    fn fail(&mut self, key: &str, reason: String) {
        self.problems.push(Problem {
            key: key.to_owned(),
            reason,
        });
    }

    /// A key whose type states its range.
    fn key(&mut self, key: &str, value: impl Ranged) {
        if let Some(reason) = value.problem() {
            self.fail(key, reason);
        }
    }

    /// How many of something a list holds, within `LO..=HI`.
    fn count<const LO: u64, const HI: u64>(&mut self, key: &str, n: usize) {
        self.key(key, Bounded::<usize, LO, HI>::unchecked(n));
    }
}

/// A config line as it may be quoted in the journal: no URL's user and
/// password, and no quoted value at all on a line that names a password
/// (`password = "..."` is a mistake one key away from `password_file`).
/// Before the line is cut short, so the cut cannot split what is hidden.
fn secrets_hidden(line: &str) -> String {
    let line = crate::capture::hide_credentials(line);
    if !line.to_ascii_lowercase().contains("password") {
        return line;
    }
    let mut out = String::with_capacity(line.len());
    let mut quoted = None;
    for c in line.chars() {
        match quoted {
            None => {
                out.push(c);
                if c == '"' || c == '\'' {
                    quoted = Some(c);
                    out.push_str("***");
                }
            }
            Some(q) if c == q => {
                out.push(c);
                quoted = None;
            }
            Some(_) => {}
        }
    }
    out
}

/// toml's messages quote the source line over several lines; operators
/// read them in the journal, one line per event, so give line and column.
fn one_line(e: &toml::de::Error, text: &str) -> String {
    let message = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
            // The offending line names the key, which toml's message for a
            // rejected value does not.
            let source = secrets_hidden(text.lines().nth(line - 1).unwrap_or("").trim());
            let source: String = source.chars().take(80).collect();
            format!("line {line}, column {column} (`{source}`): {message}")
        }
        None => message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
[model]
path = "/var/lib/nanodetd/nanodet-plus-m_320.onnx"

[[camera]]
name = "front"
source = { v4l2 = "/dev/video0" }
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/etc/nanodetd/nanodetd.toml"))
    }

    /// One edit should fix every problem: check reports them all.
    #[test]
    fn every_problem_is_reported_at_once() {
        let text = format!(
            "{MINIMAL}\n[tracker]\nhistory = 0\nmatch_iou = 2.0\n[mqtt]\nusername_is_missing_but = 1\n"
        );
        // An unknown key stops the parser: the file is not read further.
        assert!(parse(&text).is_err());
        let text = format!(
            "{MINIMAL}\n[mqtt]\npassword_file = \"/p\"\nqueue = 0\n[tracker]\nhistory = 0\n"
        );
        let err = parse(&text).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}");
        };
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            ["mqtt.password_file", "mqtt.queue", "tracker.history"]
        );
        let line = err.to_string();
        assert!(
            line.ends_with("; tracker.history: must be within 1..=100, got 0"),
            "{line}"
        );
        assert!(!line.contains('\n'), "one line for the journal: {line}");
    }

    /// Issue 21: a synthetic camera's spec takes the camera's format
    /// (yuyv by default), size and budget; MJPEG is refused, naming the
    /// key.
    #[test]
    fn a_synthetic_camera_takes_a_raw_format_and_its_size_issue_21() {
        let camera = |rest: &str| {
            format!(
                "[model]\npath = \"/m.onnx\"\n[[camera]]\nname = \"s\"\nsource = {{ synthetic = \"/p.jpg\" }}\n{rest}\n"
            )
        };
        let config = parse(&camera(
            "format = \"nv12\"\nsize = [1920, 1080]\nblink = 90",
        ))
        .unwrap();
        assert_eq!(
            config.cameras[0].source_spec(),
            SourceSpec::Synthetic {
                path: "/p.jpg".into(),
                format: CameraFormat::Nv12,
                size: Some((1920, 1080)),
                max_pixels: 1920 * 1080,
                blink: Some(90),
            }
        );
        let config = parse(&camera("")).unwrap();
        assert!(matches!(
            config.cameras[0].source_spec(),
            SourceSpec::Synthetic {
                format: CameraFormat::Yuyv,
                size: None,
                max_pixels: DEFAULT_FOLDER_PIXELS,
                blink: None,
                ..
            }
        ));
        let err = parse(&camera("blink = 0")).unwrap_err().to_string();
        assert!(err.contains("camera[0].blink"), "{err}");
        let err = parse(&camera("format = \"mjpeg\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("camera[0].format: a synthetic source hands out raw frames"),
            "{err}"
        );
    }

    /// Issue 23: an IP camera's table, a video file, and what each refuses.
    #[test]
    fn rtsp_and_video_sources_take_their_own_keys_and_refuse_the_rest_issue_23() {
        let camera = |source: &str, rest: &str| {
            format!(
                "[model]\npath = \"/m.onnx\"\n[[camera]]\nname = \"s\"\nsource = {{ {source} }}\n{rest}\n"
            )
        };
        let config = parse(&camera(
            r#"rtsp = "rtsp://cam.lan:8554/live", user = "viewer", password_file = "/etc/nanodetd/cam.pw", transport = "udp""#,
            "",
        ))
        .unwrap();
        assert_eq!(
            config.cameras[0].source_spec(),
            SourceSpec::Rtsp(RtspRequest {
                url: "rtsp://cam.lan:8554/live".into(),
                user: Some("viewer".into()),
                password_file: Some("/etc/nanodetd/cam.pw".into()),
                transport: RtspTransport::Udp,
                max_pixels: DEFAULT_FOLDER_PIXELS,
            })
        );
        let config = parse(&camera(r#"rtsp = "rtsp://cam/1""#, "")).unwrap();
        assert!(matches!(
            config.cameras[0].source_spec(),
            SourceSpec::Rtsp(RtspRequest {
                user: None,
                transport: RtspTransport::Tcp,
                ..
            })
        ));
        let config = parse(&camera(r#"video = "/srv/door.mp4""#, "looping = true")).unwrap();
        assert_eq!(
            config.cameras[0].source_spec(),
            SourceSpec::Video {
                path: "/srv/door.mp4".into(),
                looping: true,
                max_pixels: DEFAULT_FOLDER_PIXELS,
            }
        );
        for (source, rest, want) in [
            (
                r#"rtsp = "rtsp://admin:hunter2@cam/1""#,
                "",
                "use `user` and `password_file`",
            ),
            (r#"rtsp = "http://cam/1""#, "", "not an rtsp:// URL"),
            (
                r#"rtsp = "rtsp://cam/1", password_file = "/p""#,
                "",
                "password_file needs a user",
            ),
            (r#"rtsp = "rtsp://cam/1", user = "a:b""#, "", "hold no ':'"),
            (
                r#"rtsp = "rtsp://cam/1", transport = "sctp""#,
                "",
                "unknown variant",
            ),
            (
                r#"rtsp = "rtsp://cam/1", pasword_file = "/p""#,
                "",
                "unknown field",
            ),
            (r#"folder = "/x", user = "a""#, "", "are for rtsp sources"),
            (r#"folder = "/x", video = "/y""#, "", "a source is one of"),
            (
                r#"rtsp = "rtsp://cam/1""#,
                "fps = 5",
                "camera[0].fps: an RTSP camera streams",
            ),
            (
                r#"video = "/v.h264""#,
                "format = \"nv12\"",
                "camera[0].format: a video or RTSP",
            ),
            (
                r#"rtsp = "rtsp://cam/1""#,
                "size = [640, 480]",
                "camera[0].size: a video or RTSP",
            ),
            (
                r#"rtsp = "rtsp://cam/1""#,
                "looping = true",
                "camera[0].looping: is for folders",
            ),
            (
                r#"video = "/v.mp4""#,
                "repeat = 3",
                "camera[0].repeat: is for image folders",
            ),
            // The password in the quoted line, hidden, however it is written.
            (
                r#"user = "viewer", password = "hunter2", rtsp = "rtsp://cam/1""#,
                "",
                "unknown field",
            ),
            (
                r#"transport = "tcp", user = "viewer", rtsp = "rtsp://admin:hunter2hunter2hunter2hunter2@cam/1""#,
                "",
                "use `user`",
            ),
            (
                r#"rtsp = "rtsp://admin:hun/ter2@cam/1""#,
                "",
                "rtsp://***@cam/1",
            ),
        ] {
            let err = parse(&camera(source, rest)).unwrap_err().to_string();
            assert!(err.contains(want), "{source} {rest}: {err}");
            assert!(
                !err.contains("hunter2") && !err.contains("ter2"),
                "the password is in the error: {err}"
            );
        }
    }

    /// Issue 18: every numeric key's range is in its type, and the check
    /// names every key at once: one file with every numeric key out of
    /// range gets one problem per key. A key whose type has a range but
    /// that the check forgets to name fails here.
    #[test]
    fn one_check_names_every_numeric_key_outside_its_range_issue_18() {
        let text = r#"
[model]
path = "/m.onnx"
score = 2.0
iou = -0.5
max_detections = 0
[model.onnxruntime]
intra_threads = 0
device = 64
max_batch = 129
[model.tensorrt]
device = 64
workspace_mib = 0
max_batch = 65
dla_core = 16
cache_limit_mib = 0
[model.int8]
images = 0
auto_float_db = 0.0
[mqtt]
port = 0
keep_alive = 4
queue = 0
max_message_bytes = 1023
reconnect_max = 0.0
stats_interval = inf
detections_rate = -1.0
[mqtt.qos]
events = 3
state = 3
detections = 3
stats = 3
[tracker]
history = 0
lost_after = -1.0
heartbeat = nan
match_iou = 1.5
moved_iou = 1.5
score_step = -0.1
stationary_frames = 0
[snapshots]
margin = 1.5
height = 15
quality = 0
queue = 65
keep_count = 0
keep_mib = 0
keep_hours = 0.0
[metrics]
stale_after = 0.0
[filters.person]
min_score = 1.5
threshold = 1.5
min_area = -1.0
min_ratio = nan
max_area = -1.0
max_ratio = -1.0
[capture]
max_pixels_total = 0
[batching]
max_batch = 129
wait = 0.5
[[camera]]
name = "front"
source = { v4l2 = "/dev/video0" }
max_pixels = 0
fps = 0.0
repeat = 0
size = [0, 16385]
"#;
        let err = parse(text).unwrap_err();
        let ConfigError::Invalid { problems, .. } = &err else {
            panic!("{err}");
        };
        let named: BTreeSet<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        let every = [
            "model.score",
            "model.iou",
            "model.max_detections",
            "model.onnxruntime.intra_threads",
            "model.onnxruntime.device",
            "model.onnxruntime.max_batch",
            "model.tensorrt.device",
            "model.tensorrt.workspace_mib",
            "model.tensorrt.max_batch",
            "model.tensorrt.dla_core",
            "model.tensorrt.cache_limit_mib",
            "model.int8.images",
            "model.int8.auto_float_db",
            "mqtt.port",
            "mqtt.keep_alive",
            "mqtt.queue",
            "mqtt.max_message_bytes",
            "mqtt.reconnect_max",
            "mqtt.stats_interval",
            "mqtt.detections_rate",
            "mqtt.qos.events",
            "mqtt.qos.state",
            "mqtt.qos.detections",
            "mqtt.qos.stats",
            "tracker.history",
            "tracker.lost_after",
            "tracker.heartbeat",
            "tracker.match_iou",
            "tracker.moved_iou",
            "tracker.score_step",
            "tracker.stationary_frames",
            "snapshots.margin",
            "snapshots.height",
            "snapshots.quality",
            "snapshots.queue",
            "snapshots.keep_count",
            "snapshots.keep_mib",
            "snapshots.keep_hours",
            "metrics.stale_after",
            "filters.person.min_score",
            "filters.person.threshold",
            "filters.person.min_area",
            "filters.person.min_ratio",
            "filters.person.max_area",
            "filters.person.max_ratio",
            "capture.max_pixels_total",
            "batching.max_batch",
            "batching.wait",
            "camera[0].max_pixels",
            "camera[0].fps",
            "camera[0].repeat",
            "camera[0].size[0]",
            "camera[0].size[1]",
        ];
        let missing: Vec<&str> = every.into_iter().filter(|k| !named.contains(k)).collect();
        assert!(missing.is_empty(), "not named: {missing:?}; {err}");
        // Each once; the ranges in the order the check names the keys.
        assert_eq!(
            problems
                .iter()
                .filter(|p| p.key == "mqtt.qos.state")
                .count(),
            1
        );
        assert_eq!(problems[0].key, "model.score");
    }

    /// daemon (`history = 2^64 - 1`: "capacity overflow" on the first
    /// frame) are refused by check-config, naming the key.
    #[test]
    fn every_numeric_key_has_a_range_issue_17() {
        let max = "18446744073709551615";
        let square = "[[0.0, 0.0], [10.0, 0.0], [10.0, 10.0]]";
        let cases = [
            (format!("[tracker]\nhistory = {max}"), "tracker.history"),
            (
                "[tracker]\nhistory = 100000000".to_owned(),
                "tracker.history",
            ),
            (
                "[tracker]\nlost_after = nan".to_owned(),
                "tracker.lost_after",
            ),
            ("[tracker]\nheartbeat = inf".to_owned(), "tracker.heartbeat"),
            (
                "[filters.person]\nmin_area = nan".to_owned(),
                "filters.person.min_area",
            ),
            (
                "[filters.person]\nmin_area = inf".to_owned(),
                "filters.person.min_area",
            ),
            (
                "[filters.person]\nmax_ratio = nan".to_owned(),
                "filters.person.max_ratio",
            ),
            (
                "[filters.person]\nmin_ratio = -1.0".to_owned(),
                "filters.person.min_ratio",
            ),
            (format!("[mqtt]\nqueue = {max}"), "mqtt.queue"),
            ("[mqtt]\nkeep_alive = 1".to_owned(), "mqtt.keep_alive"),
            ("[mqtt]\nport = 0".to_owned(), "mqtt.port"),
            (
                "[mqtt]\ndetections_rate = inf".to_owned(),
                "mqtt.detections_rate",
            ),
            (
                "[mqtt]\nreconnect_max = nan".to_owned(),
                "mqtt.reconnect_max",
            ),
        ];
        for (table, key) in cases {
            let err = parse(&format!("{MINIMAL}{table}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(&format!(": {key}: must be")), "{table}: {err}");
        }
        let model_cases = [
            (format!("max_detections = {max}"), "model.max_detections"),
            (
                "[model.tensorrt]\nworkspace_mib = 0".to_owned(),
                "model.tensorrt.workspace_mib",
            ),
            ("[model.int8]\nimages = 0".to_owned(), "model.int8.images"),
        ];
        for (table, key) in model_cases {
            // A key of [model] goes under its path; a sub-table at the end.
            let text = if table.starts_with('[') {
                format!("{MINIMAL}{table}\n")
            } else {
                MINIMAL.replace("[model]\n", &format!("[model]\n{table}\n"))
            };
            let err = parse(&text).unwrap_err().to_string();
            assert!(err.contains(&format!(": {key}: must be")), "{table}: {err}");
        }
        let camera = |rest: &str| {
            format!(
                "{MINIMAL}\n[[camera]]\nname = \"second\"\nsource = {{ folder = \"/x\" }}\n{rest}\n"
            )
        };
        let camera_cases = [
            ("fps = nan".to_owned(), "camera[1].fps"),
            ("repeat = 0".to_owned(), "camera[1].repeat"),
            ("size = [0, 480]".to_owned(), "camera[1].size[0]"),
            (
                "zones = { door = [[0.0, 0.0], [nan, 0.0], [1.0, 1.0]] }".to_owned(),
                "camera[1].zones.door[1]",
            ),
            (
                "masks = [[[0.0, 0.0], [1e9, 0.0], [1.0, 1.0]]]".to_owned(),
                "camera[1].masks[0][1]",
            ),
            (
                format!(
                    "zones = {{ big = [{}] }}",
                    vec!["[1.0, 2.0]"; MAX_POLYGON_POINTS + 1].join(", ")
                ),
                "camera[1].zones.big",
            ),
            (
                "zones = { line = [[0.0, 0.0], [1.0, 1.0]] }".to_owned(),
                "camera[1].zones.line",
            ),
            ("max_pixels = 0".to_owned(), "camera[1].max_pixels"),
            (format!("max_pixels = {max}"), "camera[1].max_pixels"),
        ];
        for (rest, key) in camera_cases {
            let err = parse(&camera(&rest)).unwrap_err().to_string();
            let short: String = rest.chars().take(60).collect();
            assert!(
                err.contains(&format!(": {key}: must be"))
                    || err.contains(&format!(": {key}: a polygon needs 3 to 1000 points")),
                "{short}: {}",
                err.chars().take(300).collect::<String>()
            );
        }
        // The limits themselves are accepted.
        parse(&format!(
            "{MINIMAL}[tracker]\nhistory = {MAX_HISTORY}\n[mqtt]\nqueue = {MAX_QUEUE}\n[filters.cat]\nmax_area = inf\n"
        ))
        .unwrap();
        parse(&camera(&format!("zones = {{ ok = {square} }}"))).unwrap();
    }

    /// A command's `[model]` starts where the daemon's does.
    #[test]
    fn a_model_table_for_a_file_has_the_file_s_defaults() {
        let parsed: ModelConfig = toml::from_str("path = \"/m.onnx\"").unwrap();
        assert_eq!(ModelConfig::for_file("/m.onnx".into()), parsed);
    }

    /// Issue 17: four folder cameras on one 11000x11000 PNG reached
    /// 3.3 GB. Each camera has a frame budget, and together they have one.
    #[test]
    fn frame_budgets_have_defaults_and_a_total_issue_17() {
        let folder = |name: &str, rest: &str| {
            format!("[[camera]]\nname = \"{name}\"\nsource = {{ folder = \"/x\" }}\n{rest}\n")
        };
        let v4l2 = |name: &str, rest: &str| {
            format!(
                "[[camera]]\nname = \"{name}\"\nsource = {{ v4l2 = \"/dev/video0\" }}\n{rest}\n"
            )
        };
        let config = parse(&format!(
            "{MINIMAL}{}{}{}",
            folder("b", "max_pixels = 1000"),
            v4l2("c", "size = [640, 480]"),
            v4l2("d", "")
        ))
        .unwrap();
        let budgets: Vec<u64> = config
            .cameras
            .iter()
            .map(CameraConfig::frame_budget)
            .collect();
        assert_eq!(budgets, [1920 * 1080, 1000, 640 * 480, 1920 * 1080]);
        assert_eq!(config.capture.max_pixels_total.get(), 128 << 20);

        // The 1080p camera and fifteen folders at the default fit in the
        // default total; a sixteenth folder is one too many, refused with
        // what to change.
        let fifteen: String = (1..16).map(|i| folder(&format!("f{i}"), "")).collect();
        parse(&format!("{MINIMAL}{fifteen}")).unwrap();
        let err = parse(&format!("{MINIMAL}{fifteen}{}", folder("f16", "")))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("capture.max_pixels_total: the cameras' frame budgets (camera.max_pixels, or their defaults) add up to 136291328 pixels, over 134217728"),
            "{err}"
        );
        parse(&format!(
            "{MINIMAL}{fifteen}{}[capture]\nmax_pixels_total = 136291328\n",
            folder("f16", "")
        ))
        .unwrap();
        let err = parse(&format!("{MINIMAL}[capture]\nmax_pixels_total = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("capture.max_pixels_total: must be within"),
            "{err}"
        );

        // A changed budget restarts the camera; zones alone do not.
        let a = &config.cameras[1];
        let mut b = a.clone();
        b.max_pixels = Bounded::new(2000);
        assert!(!a.same_source(&b));
    }

    #[test]
    fn a_config_file_over_1_mib_is_refused_unread() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("huge.toml");
        let mut text = MINIMAL.to_owned();
        while (text.len() as u64) <= MAX_CONFIG_BYTES {
            text.push_str("# padding padding padding padding padding padding padding\n");
        }
        std::fs::write(&path, &text).unwrap();
        let err = Config::load(&path).unwrap_err();
        assert!(matches!(err, ConfigError::TooLarge { .. }), "{err}");
        std::fs::write(&path, MINIMAL).unwrap();
        Config::load(&path).unwrap();
    }

    /// Issue 17: a camera named with a non-character was accepted, and
    /// mosquitto then dropped the connection on every topic of it.
    #[test]
    fn topic_levels_refuse_what_mqtt_brokers_refuse_issue_17() {
        for bad in [
            "a/b",
            "a+",
            "#",
            "tab\there",
            "cam\u{FFFF}",
            "x\u{FDD0}",
            "\u{1FFFE}",
            "\u{85}",
        ] {
            assert!(TopicLevel::try_from(bad.to_owned()).is_err(), "{bad:?}");
        }
        for good in ["front door", "café", "カメラ", "cam-1_\u{FDCF}"] {
            assert!(TopicLevel::try_from(good.to_owned()).is_ok(), "{good:?}");
        }
        let err = parse(&MINIMAL.replace("name = \"front\"", "name = \"cam\u{FFFF}\""))
            .unwrap_err()
            .to_string();
        assert!(err.contains("not allowed in an MQTT topic level"), "{err}");
    }

    #[test]
    fn the_embedded_broker_listens_on_loopback_only_and_plain() {
        let with = |mqtt: &str| {
            parse(&format!(
                "{MINIMAL}\n[mqtt]\nembedded_broker = true\n{mqtt}"
            ))
        };
        if cfg!(not(feature = "embedded-broker")) {
            let err = with("").unwrap_err().to_string();
            assert!(err.contains("built without the embedded broker"), "{err}");
            return;
        }
        let addr = |c: Config| c.mqtt.embedded_broker_addr().unwrap().unwrap();
        assert_eq!(addr(with("").unwrap()).to_string(), "127.0.0.1:1883");
        assert_eq!(
            addr(with("host = \"::1\"\nport = 1999").unwrap()).to_string(),
            "[::1]:1999"
        );
        for (mqtt, why) in [
            ("host = \"0.0.0.0\"", "is not a loopback address"),
            ("host = \"192.168.1.5\"", "is not a loopback address"),
            (
                "host = \"broker.lan\"",
                "must be \"localhost\" or a loopback address",
            ),
            ("username = \"u\"", "plain and anonymous"),
        ] {
            let err = with(mqtt).unwrap_err().to_string();
            assert!(
                err.contains("mqtt.embedded_broker") && err.contains(why),
                "{mqtt}: {err}"
            );
        }
        assert_eq!(
            parse(MINIMAL).unwrap().mqtt.embedded_broker_addr().unwrap(),
            None
        );
    }

    #[test]
    fn minimal_config_gets_defaults() {
        let c = parse(MINIMAL).unwrap();
        assert_eq!(c.device_id.as_str(), "nanodetd");
        assert_eq!(c.model.score.get(), 0.35);
        assert_eq!(c.mqtt.port.get(), 1883);
        assert_eq!(
            c.cameras[0].source,
            SourceConfig::V4l2("/dev/video0".into())
        );
        assert_eq!(c.cameras[0].io, CaptureIo::Auto);
    }

    #[test]
    fn camera_io_is_read_and_a_change_restarts_the_camera() {
        let userptr = parse(&format!("{MINIMAL}io = \"userptr\"\n")).unwrap();
        assert_eq!(userptr.cameras[0].io, CaptureIo::Userptr);
        let default = parse(MINIMAL).unwrap();
        assert!(!userptr.cameras[0].same_source(&default.cameras[0]));
        let err = parse(&format!("{MINIMAL}io = \"dmabuf\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("`io = \"dmabuf\"`") && err.contains("userptr"),
            "{err}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors_naming_the_key() {
        let err = parse(&format!("{MINIMAL}\nthreshhold = 0.5\n"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `threshhold`"), "{err}");
        // A value of the wrong type stops the parser, which names the
        // line: `score` is on line 3 (MINIMAL starts with a newline).
        let err = parse(&MINIMAL.replace("[model]", "[model]\nscore = \"high\""))
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/etc/nanodetd/nanodetd.toml: line 3, column 9 (`score = \"high\"`):"),
            "{err}"
        );
        assert_eq!(err.lines().count(), 1, "{err}");
        // A number outside its range is the check's, which names the key.
        let err = parse(&MINIMAL.replace("[model]", "[model]\nscore = 1.5"))
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "/etc/nanodetd/nanodetd.toml: model.score: must be at least 0 and at most 1, got 1.5"
        );
    }

    #[test]
    fn onnxruntime_table_names_the_library_and_threads() {
        let c = parse(&format!(
            "{MINIMAL}\n[model.onnxruntime]\nlibrary = \"/opt/ort/libonnxruntime.so\"\nintra_threads = 2\n"
        ))
        .unwrap();
        assert_eq!(
            c.model.onnxruntime.library.as_deref(),
            Some(Path::new("/opt/ort/libonnxruntime.so"))
        );
        assert_eq!(c.model.onnxruntime.intra_threads.get(), 2);
        let err = parse(&format!(
            "{MINIMAL}\n[model.onnxruntime]\nintra_threads = 0\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("model.onnxruntime.intra_threads"), "{err}");
    }

    #[test]
    fn backend_auto_and_the_onnxruntime_provider_are_read() {
        let c = parse(&MINIMAL.replace("[model]\n", "[model]\nbackend = \"auto\"\n")).unwrap();
        assert_eq!(c.model.backend, BackendChoice::Auto);
        assert_eq!(c.model.onnxruntime.provider, None);
        assert!(c.model.onnxruntime.cuda_graph);
        let c = parse(&format!(
            "{MINIMAL}\n[model.onnxruntime]\nprovider = \"cuda\"\ndevice = 1\ncuda_graph = false\nmax_batch = 32\n"
        ))
        .unwrap();
        assert_eq!(c.model.onnxruntime.max_batch.get(), 32);
        assert_eq!(c.model.onnxruntime.provider, Some(Provider::Cuda));
        assert_eq!(c.model.onnxruntime.device.get(), 1);
        assert!(!c.model.onnxruntime.cuda_graph);
        assert!(c.model.tensorrt.cuda_graph, "on unless turned off");
        let c = parse(&format!(
            "{MINIMAL}\n[model.tensorrt]\ncuda_graph = false\n"
        ))
        .unwrap();
        assert!(!c.model.tensorrt.cuda_graph);
        let err = parse(&MINIMAL.replace("[model]\n", "[model]\nbackend = \"fastest\"\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("or auto") && err.contains("backend = \"fastest\""),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}\n[model.onnxruntime]\nprovider = \"rocm\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(err.contains("provider") && err.contains("cuda"), "{err}");
    }

    #[test]
    fn tensorrt_table_is_read_by_every_build_and_checked() {
        let c = parse(&format!(
            "{MINIMAL}\n[model.tensorrt]\nmax_batch = 4\ndla_core = 1\nint8_mode = \"calibrator\"\nworkspace_mib = 512\n"
        ))
        .unwrap();
        assert_eq!(c.model.tensorrt.max_batch.get(), 4);
        assert_eq!(c.model.tensorrt.dla_core.map(Bounded::get), Some(1));
        assert_eq!(c.model.tensorrt.int8_mode, Int8Mode::Calibrator);
        assert_eq!(c.model.tensorrt.workspace_mib.get(), 512);
        assert_eq!(
            parse(MINIMAL).unwrap().model.tensorrt,
            TensorRtConfig::default()
        );
        let err = parse(&format!("{MINIMAL}\n[model.tensorrt]\nmax_batch = 0\n"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("model.tensorrt.max_batch") && err.contains("1..=64"),
            "{err}"
        );
        let err = parse(&format!(
            "{MINIMAL}\n[model.tensorrt]\nint8_mode = \"implicit\"\n"
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("int8_mode") || err.contains("implicit"),
            "{err}"
        );
    }

    #[test]
    fn topic_injection_is_rejected() {
        for bad in ["a/b", "cam+", "#", ""] {
            let err = parse(&MINIMAL.replace("\"front\"", &format!("{bad:?}")))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("not allowed in an MQTT topic level") || err.contains("1 to 64 bytes"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn cross_field_rules() {
        let twice = format!(
            "{MINIMAL}\n[[camera]]\nname = \"front\"\nsource = {{ folder = \"/srv/replay\" }}\n"
        );
        let err = parse(&twice).unwrap_err().to_string();
        assert!(
            err.contains("camera[1].name: \"front\" is used by an earlier camera"),
            "{err}"
        );
        let zone = MINIMAL.replace(
            "source = { v4l2 = \"/dev/video0\" }",
            "source = { v4l2 = \"/dev/video0\" }\nzones.door = [[0, 0], [10, 0]]",
        );
        let err = parse(&zone).unwrap_err().to_string();
        assert!(
            err.contains("camera[0].zones.door: a polygon needs 3 to 1000 points, got 2"),
            "{err}"
        );
        let slow = MINIMAL.replace("source = {", "fps = 0.0\nsource = {");
        let err = parse(&slow).unwrap_err().to_string();
        assert!(
            err.contains("camera[0].fps: must be at least 0.001 and at most 1000, got 0"),
            "{err}"
        );
        let forever = MINIMAL.replace("[model]", "[mqtt]\nreconnect_max = 1e30\n[model]");
        let err = parse(&forever).unwrap_err().to_string();
        assert!(
            err.contains("mqtt.reconnect_max: must be more than 0 and at most 3600"),
            "{err}"
        );
        let err = parse("camera = []\n[model]\npath = \"m.onnx\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least one [[camera]]"), "{err}");
    }

    #[test]
    fn the_shipped_example_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/nanodetd.toml");
        let c = Config::load(&path).unwrap();
        assert!(c.cameras.len() >= 2);
        // The example spells out the defaults; they must be the real ones.
        assert_eq!(c.tracker, TrackerSettings::default());
        assert_eq!(c.mqtt.qos, QosConfig::default());
        assert_eq!(c.log, LogConfig::default());
        assert_eq!(c.model.int8, Int8Config::default());
        assert_eq!(c.model.precision, Precision::default());
        assert_eq!(c.model.cache, default_cache());
        let defaults = MqttConfig::default();
        let m = &c.mqtt;
        assert_eq!(
            (
                m.protocol,
                m.keep_alive,
                m.reconnect_max,
                m.queue,
                m.stats_interval,
                m.detections_rate
            ),
            (
                defaults.protocol,
                defaults.keep_alive,
                defaults.reconnect_max,
                defaults.queue,
                defaults.stats_interval,
                defaults.detections_rate
            )
        );
        // The demo runs the embedded broker, which a build without the
        // feature (the packages, the arm64 tests) refuses by name.
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/demo.toml");
        if cfg!(feature = "embedded-broker") {
            assert_eq!(Config::load(&demo).unwrap().cameras.len(), 1);
        } else {
            let err = Config::load(&demo).unwrap_err().to_string();
            assert!(err.contains("built without the embedded broker"), "{err}");
        }
    }

    #[test]
    fn mqtt_rules() {
        let with = |extra: &str| parse(&MINIMAL.replace("[model]", &format!("{extra}\n[model]")));
        let err = with("[mqtt]\nprefix = \"a//b\"").unwrap_err().to_string();
        assert!(err.contains("mqtt.prefix"), "{err}");
        let err = with("[mqtt]\npassword_file = \"/etc/pw\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("a password needs mqtt.username"), "{err}");
        let err = with("[mqtt.tls]\nca = \"/ca\"\ncert = \"/c\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("cert and key go together"), "{err}");
        let err = with("[mqtt.qos]\nevents = 3").unwrap_err().to_string();
        assert!(
            err.ends_with("mqtt.qos.events: must be within 0..=2, got 3"),
            "{err}"
        );
        let err = with("[mqtt]\nprotocol = \"4\"").unwrap_err().to_string();
        assert!(err.contains("protocol"), "{err}");
        let v5 = with("[mqtt]\nprotocol = \"5\"\nprefix = \"site/shed\"").unwrap();
        assert_eq!(v5.mqtt.protocol, MqttProtocol::V5);
        assert_eq!(v5.mqtt.prefix_for(&v5.device_id), "site/shed");
        let mut other = v5.mqtt.clone();
        other.qos.events = Bounded::unchecked(0);
        assert!(!v5.mqtt.needs_reconnect(&other), "QoS is hot");
        other.port = Bounded::new(8883).unwrap();
        assert!(v5.mqtt.needs_reconnect(&other));
    }

    /// Issue 19: snapshot folders and Home Assistant's ids are slugs, so
    /// names whose slugs clash or are empty are refused, and so is a
    /// discovery prefix that is no topic.
    #[test]
    fn names_that_make_clashing_or_empty_slugs_are_refused_issue_19() {
        let camera =
            |name: &str| format!("[[camera]]\nname = {name:?}\nsource = {{ folder = \"/x\" }}\n");
        let text = format!(
            "device_id = \"\u{e9}\u{e9}\"\n[model]\npath = \"/m.onnx\"\n[homeassistant]\ndiscovery_prefix = \"home//assistant\"\n{}{}{}",
            camera("Front Door"),
            camera("front_door"),
            camera("..")
        );
        let err = parse(&text).unwrap_err().to_string();
        for expected in [
            "device_id: \"\u{e9}\u{e9}\" needs at least one ASCII letter or digit",
            "camera[1].name: \"front_door\" and \"Front Door\" both become \"front_door\"",
            "camera[2].name: \"..\" needs at least one ASCII letter or digit",
            "homeassistant.discovery_prefix: \"home//assistant\" has an empty level",
        ] {
            assert!(err.contains(expected), "{expected}\nnot in: {err}");
        }
    }
}
