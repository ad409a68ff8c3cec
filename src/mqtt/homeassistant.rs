//! Home Assistant's MQTT discovery (docs/HOMEASSISTANT.md): the retained
//! configs that make one device per daemon with, per camera, an occupancy
//! `binary_sensor` and a count `sensor` per tracked label, an `image` of
//! the latest snapshot, and diagnostic sensors for its frame rate and
//! dropped frames.
//!
//! [`Discovery`] keeps what is announced and answers a new config or model
//! with the messages that bring the broker in line: new and changed
//! configs, and an empty retained config for each entity that went (a
//! camera or label removed by a reload), which is how Home Assistant
//! deletes an entity. Pure: config and labels in, messages out.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::{Message, TopicClass, TopicRoot, label_level};
use crate::config::{Config, slug};

/// What one daemon announces: discovery topic → config payload.
pub type Configs = BTreeMap<String, Vec<u8>>;

/// The model in service, as the device describes it.
#[derive(Debug, Clone, Copy)]
pub struct ModelInfo<'a> {
    /// Its class names.
    pub labels: &'a [String],
    /// The model file's name, for the device's `model`.
    pub name: &'a str,
}

/// The discovery configs `config` calls for, with the model's labels.
pub fn configs(config: &Config, model: &ModelInfo<'_>) -> Configs {
    let mut out = Configs::new();
    let ha = &config.homeassistant;
    if !ha.enabled {
        return out;
    }
    let prefix = config.mqtt.prefix_for(&config.device_id);
    let device_slug = slug(config.device_id.as_str());
    let node = format!("nanodetd_{device_slug}");
    let device = json!({
        "identifiers": [node],
        "name": config.device_id.as_str(),
        "manufacturer": "nanodetd",
        "model": format!("NanoDet detector ({})", model.name),
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    let origin = json!({
        "name": "nanodetd",
        "sw_version": env!("CARGO_PKG_VERSION"),
    });
    for camera in &config.cameras {
        let name = camera.name.as_str();
        let camera_slug = slug(name);
        let availability = json!([
            { "topic": format!("{prefix}/available") },
            { "topic": format!("{prefix}/{name}/available") },
        ]);
        let mut entity = |component: &str, what: &str, fields: Value| {
            let object_id = format!("{camera_slug}_{what}");
            let mut payload = json!({
                "unique_id": format!("{node}_{object_id}"),
                "object_id": format!("{device_slug}_{object_id}"),
                "device": device,
                "origin": origin,
                "availability": availability,
                "availability_mode": "all",
            });
            if let (Some(payload), Value::Object(fields)) = (payload.as_object_mut(), fields) {
                payload.extend(fields);
            }
            out.insert(
                format!(
                    "{}/{component}/{node}/{object_id}/config",
                    ha.discovery_prefix
                ),
                // A JSON value always serializes; were it ever empty, it
                // would delete the entity, never publish a broken config.
                serde_json::to_vec(&payload).unwrap_or_default(),
            );
        };
        // Each label once, by its topic level: two class names with one
        // slug share their count topic.
        let mut labels: BTreeMap<String, &str> = BTreeMap::new();
        for label in model.labels {
            if camera.track.contains(label) {
                labels.entry(label_level(label)).or_insert(label);
            }
        }
        for (level, label) in &labels {
            let state_topic = format!("{prefix}/{name}/{level}");
            entity(
                "binary_sensor",
                &format!("{level}_occupancy"),
                json!({
                    "name": format!("{name} {label}"),
                    "device_class": "occupancy",
                    "state_topic": state_topic,
                    "value_template": "{{ 'ON' if value | int(0) > 0 else 'OFF' }}",
                }),
            );
            entity(
                "sensor",
                &format!("{level}_count"),
                json!({
                    "name": format!("{name} {label} count"),
                    "state_topic": state_topic,
                    "state_class": "measurement",
                    "unit_of_measurement": "objects",
                    "icon": "mdi:counter",
                }),
            );
        }
        if config.snapshots.enabled && config.snapshots.mqtt {
            entity(
                "image",
                "snapshot",
                json!({
                    "name": format!("{name} snapshot"),
                    "image_topic": format!("{prefix}/{name}/all/snapshot"),
                    "content_type": "image/jpeg",
                }),
            );
        }
        // The camera's key in the stats payload, as a Jinja string.
        let key = serde_json::to_string(name).unwrap_or_default();
        entity(
            "sensor",
            "fps",
            json!({
                "name": format!("{name} frame rate"),
                "state_topic": format!("{prefix}/stats"),
                "value_template": format!("{{{{ value_json.cameras[{key}].fps | round(1) }}}}"),
                "unit_of_measurement": "fps",
                "state_class": "measurement",
                "entity_category": "diagnostic",
            }),
        );
        entity(
            "sensor",
            "dropped",
            json!({
                "name": format!("{name} dropped frames"),
                "state_topic": format!("{prefix}/stats"),
                "value_template": format!("{{{{ value_json.cameras[{key}].dropped }}}}"),
                "state_class": "total_increasing",
                "entity_category": "diagnostic",
            }),
        );
    }
    out
}

/// What is announced, and how to change it.
#[derive(Debug, Default)]
pub struct Discovery {
    announced: Configs,
}

impl Discovery {
    /// The messages that turn what is announced into `wanted`: changed and
    /// new configs, and an empty one for each entity no longer wanted.
    pub fn update(&mut self, wanted: Configs) -> Vec<Message> {
        let message = |topic: &str, payload: Vec<u8>| Message {
            topic: topic.to_owned(),
            root: TopicRoot::Broker,
            payload,
            class: TopicClass::State,
            retain: true,
            captured: None,
        };
        let mut out: Vec<Message> = self
            .announced
            .keys()
            .filter(|topic| !wanted.contains_key(*topic))
            .map(|topic| message(topic, Vec::new()))
            .collect();
        for (topic, payload) in &wanted {
            if self.announced.get(topic) != Some(payload) {
                out.push(message(topic, payload.clone()));
            }
        }
        self.announced = wanted;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Config {
        let text = format!(
            "device_id = \"Edge Box\"\n[model]\npath = \"m.onnx\"\n[homeassistant]\nenabled = true\n{extra}\n\
             [[camera]]\nname = \"front door\"\nsource = {{ folder = \"/x\" }}\ntrack = [\"person\", \"traffic light\"]\n"
        );
        toml::from_str(&text).unwrap()
    }

    fn labels() -> Vec<String> {
        ["person", "bicycle", "traffic light"]
            .map(str::to_owned)
            .to_vec()
    }

    fn parsed(configs: &Configs, topic: &str) -> Value {
        serde_json::from_slice(&configs[topic]).unwrap_or_else(|_| panic!("{topic}: {configs:?}"))
    }

    #[test]
    fn one_device_with_entities_per_tracked_label_and_camera_issue_19() {
        let labels = labels();
        let model = ModelInfo {
            labels: &labels,
            name: "nanodet-plus-m_320.onnx",
        };
        let configs = configs(&config("[snapshots]\nenabled = true"), &model);
        let topics: Vec<&str> = configs.keys().map(String::as_str).collect();
        let node = "homeassistant/{}/nanodetd_edge_box";
        let t = |component: &str, what: &str| {
            format!("{}/front_door_{what}/config", node.replace("{}", component))
        };
        assert_eq!(
            topics,
            [
                t("binary_sensor", "person_occupancy"),
                t("binary_sensor", "traffic_light_occupancy"),
                t("image", "snapshot"),
                t("sensor", "dropped"),
                t("sensor", "fps"),
                t("sensor", "person_count"),
                t("sensor", "traffic_light_count"),
            ]
        );
        let occupancy = parsed(&configs, &t("binary_sensor", "traffic_light_occupancy"));
        assert_eq!(
            occupancy["state_topic"],
            "nanodetd/Edge Box/front door/traffic_light"
        );
        assert_eq!(
            occupancy["unique_id"],
            "nanodetd_edge_box_front_door_traffic_light_occupancy"
        );
        assert_eq!(occupancy["device"]["identifiers"][0], "nanodetd_edge_box");
        assert_eq!(occupancy["availability_mode"], "all");
        assert_eq!(
            occupancy["availability"][1]["topic"],
            "nanodetd/Edge Box/front door/available"
        );
        let image = parsed(&configs, &t("image", "snapshot"));
        assert_eq!(
            image["image_topic"],
            "nanodetd/Edge Box/front door/all/snapshot"
        );
        let fps = parsed(&configs, &t("sensor", "fps"));
        assert_eq!(
            fps["value_template"],
            "{{ value_json.cameras[\"front door\"].fps | round(1) }}"
        );
        assert_eq!(fps["entity_category"], "diagnostic");
    }

    #[test]
    fn a_removed_label_or_camera_gets_an_empty_retained_config_issue_19() {
        let labels = labels();
        let model = ModelInfo {
            labels: &labels,
            name: "m.onnx",
        };
        let mut discovery = Discovery::default();
        let first = discovery.update(configs(&config(""), &model));
        assert_eq!(first.len(), 6);
        assert!(
            first
                .iter()
                .all(|m| m.retain && m.root == TopicRoot::Broker && !m.payload.is_empty())
        );
        assert!(
            discovery.update(configs(&config(""), &model)).is_empty(),
            "unchanged: nothing"
        );
        // The model loses "traffic light": its two entities are deleted.
        let fewer = ["person".to_owned()];
        let model = ModelInfo {
            labels: &fewer,
            name: "m.onnx",
        };
        let removed = discovery.update(configs(&config(""), &model));
        let emptied: Vec<&str> = removed
            .iter()
            .filter(|m| m.payload.is_empty())
            .map(|m| m.topic.as_str())
            .collect();
        assert_eq!(
            emptied,
            [
                "homeassistant/binary_sensor/nanodetd_edge_box/front_door_traffic_light_occupancy/config",
                "homeassistant/sensor/nanodetd_edge_box/front_door_traffic_light_count/config",
            ]
        );
        // Discovery turned off: every entity is deleted.
        let mut off = config("");
        off.homeassistant.enabled = false;
        let all = discovery.update(configs(&off, &model));
        assert_eq!(all.len(), 4);
        assert!(all.iter().all(|m| m.payload.is_empty()));
    }
}
