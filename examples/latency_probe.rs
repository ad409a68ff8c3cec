//! Measures the latency nanodetd adds: subscribes to `<prefix>/+/detections`
//! and, for each message, takes the time from frame capture (`frame_time`)
//! to arrival here, minus the frame's inference time (`timing_ms`). Used by
//! `benches/daemon.sh`; prints p50/p99 in milliseconds.
//!
//! Usage: latency_probe PORT TOPIC_FILTER SAMPLES

#![allow(clippy::unwrap_used)]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let [_, port, filter, samples] = &args[..] else {
        eprintln!("usage: latency_probe PORT TOPIC_FILTER SAMPLES");
        std::process::exit(64);
    };
    let samples: usize = samples.parse().unwrap();
    let mut options =
        rumqttc::MqttOptions::new("latency-probe", "127.0.0.1", port.parse().unwrap());
    options.set_keep_alive(Duration::from_secs(10));
    let (client, mut connection) = rumqttc::Client::new(options, 100);
    client.subscribe(filter, rumqttc::QoS::AtMostOnce).unwrap();
    let (mut added, mut plumbing, mut whole) = (Vec::new(), Vec::new(), Vec::new());
    for event in connection.iter() {
        let Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) = event else {
            continue;
        };
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs_f64();
        let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
        let total_ms = (now - v["frame_time"].as_f64().unwrap()) * 1e3;
        let t = &v["timing_ms"];
        let ms = |k: &str| t[k].as_f64().unwrap();
        whole.push(total_ms);
        added.push(total_ms - ms("inference"));
        // What is left without the model's own work or waiting for it.
        plumbing
            .push(total_ms - ms("queue") - ms("preprocess") - ms("inference") - ms("postprocess"));
        if added.len() == samples {
            break;
        }
    }
    for (name, mut v) in [
        ("total - inference", added),
        (
            "total - (queue + preprocess + inference + postprocess)",
            plumbing,
        ),
        ("total, capture to subscriber", whole),
    ] {
        v.sort_by(f64::total_cmp);
        let rank = |p: f64| v[((p * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1];
        println!(
            "{name}: p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms over {} frames",
            rank(0.5),
            rank(0.99),
            v[v.len() - 1],
            v.len()
        );
    }
}
