//! What a reload changes, decided in one pure function: the running
//! cameras, the config before and after, and the model in service in;
//! which cameras stop, which start and what happens to the model out. The
//! daemon's shell carries the plan out ([`super::apply`]).
//!
//! Hot settings (filters, zones, MQTT rates, the log level) need no plan:
//! the detector gets the new config in its inbox, the MQTT task from the
//! config channel.

use crate::config::{CameraConfig, Config, ModelConfig};

/// What a reload does to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelStep {
    /// Nothing: the model settings did not change.
    Keep,
    /// The settings went back to the model in service while another load
    /// was pending: that load is superseded, nothing new loads.
    BackToInService,
    /// Load the new settings in the background. `retry`: they did not
    /// change, but their model is not in service (a load failed, and a
    /// SIGHUP asks again: the file at the same path may have been fixed).
    Load {
        /// Whether this is such a retry.
        retry: bool,
    },
}

/// A reload's effect on the cold parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReloadPlan {
    /// Running cameras to stop: gone from the config, or their source
    /// changed. In the order of their names.
    pub stop: Vec<String>,
    /// Cameras to start: new, or restarted with a new source. In the
    /// config's order.
    pub start: Vec<String>,
    /// The model.
    pub model: ModelStep,
}

/// The plan for going from `old` to `new`, given the cameras running now
/// (each with the config it was started with) and the model in service.
pub fn plan<'a>(
    old: &Config,
    new: &Config,
    running: impl IntoIterator<Item = (&'a str, &'a CameraConfig)>,
    in_service: &ModelConfig,
) -> ReloadPlan {
    let find = |name: &str| new.cameras.iter().find(|c| c.name.as_str() == name);
    let running: Vec<(&str, &CameraConfig)> = running.into_iter().collect();
    let mut stop: Vec<String> = running
        .iter()
        .filter(|(name, config)| find(name).is_none_or(|c| !c.same_source(config)))
        .map(|(name, _)| (*name).to_owned())
        .collect();
    stop.sort();
    let start = new
        .cameras
        .iter()
        .map(|c| c.name.as_str())
        .filter(|name| stop.iter().any(|s| s == name) || !running.iter().any(|(r, _)| r == name))
        .map(str::to_owned)
        .collect();
    ReloadPlan {
        stop,
        start,
        model: model_step(old, new, in_service),
    }
}

fn model_step(old: &Config, new: &Config, in_service: &ModelConfig) -> ModelStep {
    let retry = old == new && new.model != *in_service;
    if new.model == old.model && !retry {
        ModelStep::Keep
    } else if new.model == *in_service {
        ModelStep::BackToInService
    } else {
        ModelStep::Load { retry }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(cameras: &[(&str, &str)], model: &str) -> Config {
        let mut text = format!("[model]\npath = \"{model}\"\n");
        for (name, folder) in cameras {
            text +=
                &format!("[[camera]]\nname = \"{name}\"\nsource = {{ folder = \"{folder}\" }}\n");
        }
        Config::parse(&text, std::path::Path::new("test.toml")).unwrap()
    }

    fn running(config: &Config) -> Vec<(&str, &CameraConfig)> {
        config
            .cameras
            .iter()
            .map(|c| (c.name.as_str(), c))
            .collect()
    }

    #[test]
    fn only_cameras_whose_source_changed_or_that_came_or_went_restart() {
        let old = config(&[("a", "/a"), ("b", "/b"), ("c", "/c")], "m.onnx");
        let new = config(&[("d", "/d"), ("c", "/c2"), ("a", "/a")], "m.onnx");
        let plan = plan(&old, &new, running(&old), &old.model);
        assert_eq!(
            plan,
            ReloadPlan {
                stop: vec!["b".into(), "c".into()],
                start: vec!["d".into(), "c".into()],
                model: ModelStep::Keep,
            }
        );
    }

    #[test]
    fn a_zone_edit_restarts_nothing() {
        let old = config(&[("a", "/a")], "m.onnx");
        let mut new = old.clone();
        new.cameras[0].zones.insert(
            "door".to_owned().try_into().unwrap(),
            vec![[0.0, 0.0], [1.0, 0.0], [1.0, 1.0]],
        );
        assert_ne!(old, new);
        let plan = plan(&old, &new, running(&old), &old.model);
        assert_eq!((plan.stop.len(), plan.start.len()), (0, 0));
        assert_eq!(plan.model, ModelStep::Keep);
    }

    #[test]
    fn a_camera_that_failed_to_start_is_started_by_the_next_reload() {
        let old = config(&[("a", "/a"), ("b", "/b")], "m.onnx");
        let only_a = &old.cameras[..1];
        let plan = plan(
            &old,
            &old,
            only_a.iter().map(|c| (c.name.as_str(), c)),
            &old.model,
        );
        assert_eq!((plan.stop, plan.start), (vec![], vec!["b".to_owned()]));
    }

    #[test]
    fn the_model_loads_when_its_settings_change_or_a_failed_one_is_asked_again() {
        let old = config(&[("a", "/a")], "m.onnx");
        let new = config(&[("a", "/a")], "n.onnx");
        assert_eq!(
            plan(&old, &new, running(&old), &old.model).model,
            ModelStep::Load { retry: false }
        );
        // n.onnx failed to load, so m.onnx is still in service. The same
        // config again (SIGHUP) tries n.onnx again.
        assert_eq!(
            plan(&new, &new, running(&new), &old.model).model,
            ModelStep::Load { retry: true }
        );
        // An edit back to what runs drops the pending load.
        assert_eq!(
            plan(&new, &old, running(&new), &old.model).model,
            ModelStep::BackToInService
        );
        assert_eq!(
            plan(&new, &new, running(&new), &new.model).model,
            ModelStep::Keep
        );
    }
}
