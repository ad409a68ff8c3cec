//! The README's first command, as a new user runs it: etc/demo.toml on the
//! bundled model and photos (demo/), events printed on the terminal and
//! published by the embedded broker to a real `mosquitto_sub`. Nothing
//! here reads the shared assets: a bare clone must pass it.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// What nanodet-plus-m_320 finds in each bundled photo at score 0.5 (the
/// daemon's default threshold for reporting an object), exactly as
/// demo/README.md states it.
#[test]
fn the_bundled_model_finds_exactly_what_demo_readme_says() {
    let photos = ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"];
    let paths: Vec<String> = photos
        .iter()
        .map(|p| repo().join("demo/photos").join(p).display().to_string())
        .collect();
    let model = repo().join("demo/models/nanodet-plus-m_320.onnx");
    let mut args = vec![
        "detect",
        "--json",
        "--score",
        "0.5",
        "--model",
        model.to_str().unwrap(),
    ];
    args.extend(paths.iter().map(String::as_str));
    let out = crate::support::nanodetd(&args);
    assert!(out.status.success(), "{}", crate::support::stderr(&out));
    let detections: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap();
    let found = |photo: &str| -> BTreeSet<u64> {
        detections
            .iter()
            .filter(|d| d["file_name"].as_str().unwrap().ends_with(photo))
            .map(|d| d["category_id"].as_u64().unwrap())
            .collect()
    };
    // COCO category ids: person 1, cat 17, cup 47, dining table 67.
    assert_eq!(found("astronaut.png"), BTreeSet::from([1]));
    assert_eq!(found("chelsea.png"), BTreeSet::from([17]));
    assert_eq!(found("coffee.png"), BTreeSet::from([47, 67]));
    assert_eq!(found("rocket.jpg"), BTreeSet::new());
}

/// The packaged build (`--no-default-features`, cross/build.sh) has no
/// embedded broker, so this half of the demo exists only with it.
#[cfg(feature = "embedded-broker")]
mod through_the_embedded_broker {
    use std::io::Read;
    use std::process::{Child, Command, Stdio};
    use std::time::{Duration, Instant};

    use super::repo;
    use crate::support::{free_port, terminate};

    /// A child process killed when the test ends, however it ends.
    struct Reaped(Child);

    impl Drop for Reaped {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn the_demo_prints_events_and_serves_them_to_mosquitto_sub() {
        if Command::new("mosquitto_sub")
            .arg("--help")
            .output()
            .is_err()
        {
            let why =
                "mosquitto_sub is missing (Debian: mosquitto-clients; scripts/test.sh installs it)";
            crate::support::skip_or_fail(
                "the_demo_prints_events_and_serves_them_to_mosquitto_sub",
                why,
            );
            return;
        }
        // The demo config as shipped, on a free port instead of 1883.
        let port = free_port();
        let demo = std::fs::read_to_string(repo().join("etc/demo.toml")).unwrap();
        assert!(demo.contains("\nport = 1883\n") && demo.contains("embedded_broker = true"));
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("demo.toml");
        std::fs::write(
            &config,
            demo.replace("\nport = 1883\n", &format!("\nport = {port}\n")),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
        // Relative paths in the demo config are the repository root's.
        let mut daemon = Reaped(
            Command::new(env!("CARGO_BIN_EXE_nanodetd"))
                .args(["run", "--config"])
                .arg(&config)
                .current_dir(repo())
                .env("RUST_LOG", "info")
                .stdout(Stdio::piped())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
        let daemon_log = || std::fs::read_to_string(dir.path().join("daemon.log")).unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the embedded broker never listened on {port}:\n{}",
                daemon_log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let sub_out = std::fs::File::create(dir.path().join("sub.log")).unwrap();
        let subscriber = Reaped(
            Command::new("mosquitto_sub")
                .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                .args(["-t", "nanodetd/#", "-v"])
                .stdout(sub_out)
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let received = || std::fs::read_to_string(dir.path().join("sub.log")).unwrap();
        // Every label of the photos, new, through the broker.
        let wanted = ["person", "cat", "cup", "dining table"];
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let sub = received();
            let new_events: Vec<&str> = sub
                .lines()
                .filter(|l| {
                    l.starts_with("nanodetd/demo/demo/events ") && l.contains("\"type\":\"new\"")
                })
                .collect();
            if wanted.iter().all(|label| {
                new_events
                    .iter()
                    .any(|l| l.contains(&format!("\"label\":\"{label}\"")))
            }) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "not every label reached mosquitto_sub in 60 s; received:\n{sub}\ndaemon:\n{}",
                daemon_log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        // Retained state from the embedded broker: availability.
        assert!(
            received().contains("nanodetd/demo/available online"),
            "{}",
            received()
        );
        terminate(&daemon.0);
        let status = daemon.0.wait().unwrap();
        assert!(status.success(), "{status}:\n{}", daemon_log());
        drop(subscriber);
        let mut printed = String::new();
        daemon
            .0
            .stdout
            .take()
            .unwrap()
            .read_to_string(&mut printed)
            .unwrap();
        // One line per event on standard output, naming camera, kind, label, id.
        for label in wanted {
            assert!(
                printed
                    .lines()
                    .any(|l| l.contains(" demo new    ") && l.contains(&format!(" {label} #"))),
                "no `new {label}` line printed:\n{printed}"
            );
        }
        assert!(
            printed
                .lines()
                .all(|l| l.contains(" demo ") && l.contains(" score ")),
            "{printed}"
        );
    }
}
