//! What the daemon publishes beyond its own topics: Home Assistant's
//! discovery, snapshots of events, the event format (native, Frigate's or
//! both) and which labels a camera tracks. All hot.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Bounded, HoursUpToAYear, Probability, Real, TopicLevel};

/// `[homeassistant]`: MQTT discovery (docs/HOMEASSISTANT.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HomeAssistantConfig {
    /// Announce a device and its entities.
    #[serde(default)]
    pub enabled: bool,
    /// Home Assistant's discovery prefix (its MQTT integration's
    /// `discovery_prefix`); `<prefix>/status` is its birth topic.
    #[serde(default = "default_discovery_prefix")]
    pub discovery_prefix: String,
}

impl Default for HomeAssistantConfig {
    fn default() -> Self {
        HomeAssistantConfig {
            enabled: false,
            discovery_prefix: default_discovery_prefix(),
        }
    }
}

fn default_discovery_prefix() -> String {
    "homeassistant".into()
}

/// `[snapshots]`: a JPEG of each event's object (docs/SNAPSHOTS.md).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotConfig {
    /// Take snapshots.
    #[serde(default)]
    pub enabled: bool,
    /// Where they are written, one folder per camera.
    #[serde(default = "default_snapshot_dir")]
    pub dir: PathBuf,
    /// Publish each, retained, on `<camera>/<label>/snapshot` and
    /// `<camera>/snapshot`.
    #[serde(default = "yes")]
    pub mqtt: bool,
    /// Draw the object's box and label.
    #[serde(default = "yes")]
    pub draw: bool,
    /// Crop to the object's box, grown by `margin`.
    #[serde(default)]
    pub crop: bool,
    /// With `crop`: the margin around the box on each side, as a share of
    /// the box's larger side.
    #[serde(default = "default_margin")]
    pub margin: Probability,
    /// Scale a snapshot taller than this down to it (pixels).
    #[serde(default)]
    pub height: Option<Bounded<u32, 16, 8192>>,
    /// JPEG quality.
    #[serde(default = "default_quality")]
    pub quality: Bounded<u8, 1, 100>,
    /// Snapshots waiting to be encoded; when full, new ones are dropped
    /// and counted. Each holds a reference to its frame.
    #[serde(default = "default_snapshot_queue")]
    pub queue: Bounded<usize, 1, 64>,
    /// Keep at most this many files, all cameras together; the oldest go.
    #[serde(default = "default_keep_count")]
    pub keep_count: Bounded<usize, 1, 1_000_000>,
    /// Keep at most this many MiB of files, all cameras together.
    #[serde(default = "default_keep_mib")]
    pub keep_mib: Bounded<u64, 1, { 1 << 24 }>,
    /// Delete files older than this many hours.
    #[serde(default = "default_keep_hours")]
    pub keep_hours: Real<f64, HoursUpToAYear>,
}

impl Default for SnapshotConfig {
    fn default() -> Self {
        toml::from_str("").unwrap_or_else(|_| unreachable!("every snapshot key has a default"))
    }
}

fn yes() -> bool {
    true
}
fn default_snapshot_dir() -> PathBuf {
    PathBuf::from("/var/lib/nanodetd/snapshots")
}
fn default_margin() -> Probability {
    Real::unchecked(0.25)
}
fn default_quality<const LO: u64, const HI: u64>() -> Bounded<u8, LO, HI> {
    Bounded::unchecked(80)
}
fn default_snapshot_queue<const LO: u64, const HI: u64>() -> Bounded<usize, LO, HI> {
    Bounded::unchecked(4)
}
fn default_keep_count<const LO: u64, const HI: u64>() -> Bounded<usize, LO, HI> {
    Bounded::unchecked(1000)
}
fn default_keep_mib<const LO: u64, const HI: u64>() -> Bounded<u64, LO, HI> {
    Bounded::unchecked(500)
}
fn default_keep_hours<R: super::RealRange>() -> Real<f64, R> {
    Real::unchecked(168.0)
}

/// `[mqtt] events`: which event messages go out.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventFormat {
    /// `<camera>/events`, nanodetd's own (docs/MQTT.md).
    #[default]
    Native,
    /// `events`, Frigate's payload (docs/MQTT.md, "Frigate-compatible").
    Frigate,
    /// Both.
    Both,
}

impl EventFormat {
    /// Whether nanodetd's own events go out.
    pub fn native(self) -> bool {
        matches!(self, EventFormat::Native | EventFormat::Both)
    }
    /// Whether Frigate's go out.
    pub fn frigate(self) -> bool {
        matches!(self, EventFormat::Frigate | EventFormat::Both)
    }
}

/// A camera's `track`: the labels whose objects become events, counts
/// and entities. `["all"]` tracks every label of the model.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(from = "Vec<TopicLevel>")]
pub enum Tracked {
    /// No `track` key: [`DEFAULT_TRACKED`], those of them the model has.
    #[default]
    Default,
    /// Every label.
    All,
    /// These labels, as listed: each should be one of the model's.
    Labels(Vec<TopicLevel>),
}

impl From<Vec<TopicLevel>> for Tracked {
    fn from(labels: Vec<TopicLevel>) -> Self {
        if labels.iter().any(|l| l.as_str() == "all") {
            Tracked::All
        } else {
            Tracked::Labels(labels)
        }
    }
}

/// The default `track` list: what Frigate users track most, people,
/// vehicles and pets.
pub const DEFAULT_TRACKED: [&str; 8] = [
    "person",
    "car",
    "dog",
    "cat",
    "bicycle",
    "motorcycle",
    "bus",
    "truck",
];

impl Tracked {
    /// Whether `label` is tracked.
    pub fn contains(&self, label: &str) -> bool {
        match self {
            Tracked::Default => DEFAULT_TRACKED.contains(&label),
            Tracked::All => true,
            Tracked::Labels(labels) => labels.iter().any(|l| l.as_str() == label),
        }
    }

    /// The labels listed in the file (none for `all` or no list).
    pub fn listed(&self) -> &[TopicLevel] {
        match self {
            Tracked::Default | Tracked::All => &[],
            Tracked::Labels(labels) => labels,
        }
    }
}

/// A name as Home Assistant slugifies it for ids: ASCII letters and digits
/// lowercased, every run of anything else one `_`, none at either end
/// ("traffic light" → `traffic_light`). Empty when nothing is left.
pub fn slug(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.is_empty() && !out.ends_with('_') {
            out.push('_');
        }
    }
    while out.ends_with('_') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slugs_are_what_home_assistant_makes_of_a_name_issue_19() {
        assert_eq!(slug("traffic light"), "traffic_light");
        assert_eq!(slug("Front Door"), "front_door");
        assert_eq!(slug("  a -- b  "), "a_b");
        assert_eq!(slug("../.."), "");
        assert_eq!(slug("Café 2"), "caf_2");
    }

    #[test]
    fn all_anywhere_in_track_tracks_every_label() {
        let t: Tracked = toml::from_str::<toml::Table>("t = [\"dog\", \"all\"]")
            .unwrap()
            .remove("t")
            .unwrap()
            .try_into()
            .unwrap();
        assert_eq!(t, Tracked::All);
        assert!(Tracked::default().contains("person"));
        assert!(!Tracked::default().contains("tie"));
    }
}
