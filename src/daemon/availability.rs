//! Each camera's `<camera>/available`: `online` while it streams,
//! `offline` while it opens, re-opens after a loss, or has finished its
//! replay. Home Assistant's entities of the camera follow it. A camera
//! removed by a reload has its topic cleared (an empty retained message).

use std::collections::BTreeMap;

use crate::mqtt::{self, Message};

/// What each camera's topic says now.
#[derive(Debug, Default)]
pub struct CameraAvailability {
    published: BTreeMap<String, bool>,
}

impl CameraAvailability {
    /// The messages that bring the topics in line with `cameras`: each
    /// camera's name and whether it streams now.
    pub fn update<'a>(
        &mut self,
        cameras: impl IntoIterator<Item = (&'a str, bool)>,
    ) -> Vec<Message> {
        let now: BTreeMap<String, bool> = cameras
            .into_iter()
            .map(|(name, online)| (name.to_owned(), online))
            .collect();
        let mut out = Vec::new();
        for name in self.published.keys().filter(|n| !now.contains_key(*n)) {
            let mut clear = mqtt::camera_available_message(name, false);
            clear.payload.clear();
            out.push(clear);
        }
        for (name, &online) in &now {
            if self.published.get(name) != Some(&online) {
                out.push(mqtt::camera_available_message(name, online));
            }
        }
        self.published = now;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn said(messages: &[Message]) -> Vec<String> {
        messages
            .iter()
            .map(|m| format!("{} {}", m.topic, String::from_utf8_lossy(&m.payload)))
            .collect()
    }

    #[test]
    fn a_camera_is_online_while_it_streams_and_cleared_when_removed_issue_19() {
        let mut a = CameraAvailability::default();
        assert_eq!(
            said(&a.update([("door", false), ("yard", true)])),
            ["door/available offline", "yard/available online"]
        );
        assert!(a.update([("door", false), ("yard", true)]).is_empty());
        // The door streams; the yard is lost and re-opening.
        assert_eq!(
            said(&a.update([("door", true), ("yard", false)])),
            ["door/available online", "yard/available offline"]
        );
        // A reload removes the yard.
        let removed = a.update([("door", true)]);
        assert_eq!(said(&removed), ["yard/available "]);
        assert!(removed[0].retain);
    }
}
