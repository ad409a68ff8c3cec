//! What `/healthz` and `/readyz` answer, as pure functions of the
//! heartbeats' ages, the model and the broker link; the server only
//! writes the answer out.
//!
//! Health is the watchdog's view: every pipeline thread (the detector,
//! each camera) has made progress within `metrics.stale_after`. A camera
//! waiting to re-open an unplugged device still beats, so it is healthy;
//! a hung read or a hung inference is not. Readiness is the model being
//! loaded: until then no frame can be detected. The broker is reported
//! but gates neither, since the outbox holds events through an outage.

use std::time::Duration;

/// An answer: its status and a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer {
    /// 200 or 503.
    pub status: u16,
    /// A JSON object saying why.
    pub body: String,
}

impl Answer {
    fn new(ok: bool, body: serde_json::Value) -> Answer {
        Answer {
            status: if ok { 200 } else { 503 },
            body: body.to_string(),
        }
    }
}

/// `/healthz`: 503 naming every part whose heartbeat is older than
/// `stale_after`, with its age in seconds.
pub fn health(ages: &[(String, Duration)], stale_after: Duration) -> Answer {
    let stale: serde_json::Map<String, serde_json::Value> = ages
        .iter()
        .filter(|(_, age)| *age > stale_after)
        .map(|(part, age)| {
            let seconds = (age.as_secs_f64() * 10.0).round() / 10.0;
            (part.clone(), seconds.into())
        })
        .collect();
    Answer::new(
        stale.is_empty(),
        serde_json::json!({
            "status": if stale.is_empty() { "ok" } else { "stale" },
            "stale_after": stale_after.as_secs_f64(),
            "stale": stale,
        }),
    )
}

/// `/readyz`: 200 once a model is in service (`model`, its file name),
/// until the daemon is `stopping`; the broker link is reported beside it.
pub fn readiness(model: Option<&str>, mqtt_connected: bool, stopping: bool) -> Answer {
    let status = match (model, stopping) {
        (_, true) => "stopping",
        (None, false) => "loading model",
        (Some(_), false) => "ready",
    };
    Answer::new(
        status == "ready",
        serde_json::json!({
            "status": status,
            "model": model,
            "mqtt": if mqtt_connected { "connected" } else { "disconnected" },
        }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_names_every_stale_part_and_its_age() {
        let ages = [
            ("camera front".to_owned(), Duration::from_millis(42_140)),
            ("camera yard".to_owned(), Duration::from_secs(1)),
            ("detector".to_owned(), Duration::from_secs(31)),
        ];
        let sick = health(&ages, Duration::from_secs(30));
        assert_eq!(sick.status, 503);
        let body: serde_json::Value = serde_json::from_str(&sick.body).unwrap();
        assert_eq!(
            body["stale"],
            serde_json::json!({"camera front": 42.1, "detector": 31.0})
        );
        assert_eq!(health(&ages, Duration::from_secs(60)).status, 200);
        // Nothing registered (the model still loading): healthy.
        assert_eq!(health(&[], Duration::from_secs(1)).status, 200);
    }

    #[test]
    fn ready_once_the_model_is_in_service_whatever_the_broker_until_stopping() {
        assert_eq!(readiness(None, true, false).status, 503);
        let ready = readiness(Some("nanodet.onnx"), false, false);
        assert_eq!(ready.status, 200);
        assert!(
            ready.body.contains(r#""mqtt":"disconnected""#),
            "{}",
            ready.body
        );
        // Draining after SIGTERM: no longer ready.
        let stopping = readiness(Some("nanodet.onnx"), true, true);
        assert_eq!(stopping.status, 503);
        assert!(
            stopping.body.contains(r#""status":"stopping""#),
            "{}",
            stopping.body
        );
    }
}
