//! Issue 20: the Prometheus endpoint, checked by Prometheus' own tools.
//! `promtool check metrics` reads the endpoint's output; a real
//! Prometheus server (Debian's `prometheus`, started here on loopback)
//! scrapes the daemon, evaluates the shipped alert rules and answers the
//! Grafana dashboard's queries. The daemon, its broker and its photos are
//! the real ones, as in `daemon.rs`.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::daemon::{Broker, Daemon, Subscriber, config, photo_folder, replay, setup};
use crate::support::{self, free_port};

/// An HTTP/1.0 GET on loopback: the status and the body; `None` when
/// nothing listens.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((status, body.to_owned()))
}

fn wait_until<T>(what: &str, timeout: Duration, mut found: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = found() {
            return t;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The programs of Debian's `prometheus` package, or a skip (a failure
/// under CI, where scripts/test.sh installs it).
fn prometheus_present(test: &str) -> bool {
    let found = ["prometheus", "promtool"].iter().all(|tool| {
        Command::new(tool)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        support::skip_or_fail(
            test,
            "prometheus and promtool are not installed (scripts/test.sh installs Debian's prometheus)",
        );
    }
    found
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// `promtool` with `args`, `stdin` on its input: success, and what it said.
fn promtool(args: &[&str], stdin: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

/// A Prometheus server of the test's own, scraping the daemon every
/// second and evaluating the shipped alert rules.
struct Prometheus {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: u16) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
                 rule_files:\n  - {rules}\n\
                 scrape_configs:\n  - job_name: nanodetd\n    static_configs:\n      - targets: ['127.0.0.1:{target}']\n",
                rules = repo("etc/prometheus/nanodetd-alerts.yml").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        let prometheus = Prometheus { child, port, dir };
        wait_until("Prometheus to be ready", Duration::from_secs(30), || {
            http_get(port, "/-/ready").filter(|(s, _)| *s == 200)
        });
        prometheus
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// An instant query through the HTTP API: the answer's `data`.
    fn query(&self, promql: &str) -> Value {
        let (status, body) = http_get(
            self.port,
            &format!("/api/v1/query?query={}", percent_encode(promql)),
        )
        .unwrap();
        let answer: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(
            (status, answer["status"].as_str()),
            (200, Some("success")),
            "{promql}: {body}"
        );
        answer["data"].clone()
    }

    /// The samples of an instant vector, by their labels.
    fn vector(&self, promql: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let data = self.query(promql);
        data["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let labels = serde_json::from_value(r["metric"].clone()).unwrap();
                let value = r["value"][1].as_str().unwrap().parse().unwrap();
                (labels, value)
            })
            .collect()
    }

    /// The one sample of `promql`, if there is exactly one.
    fn scalar(&self, promql: &str) -> Option<f64> {
        match self.vector(promql).as_slice() {
            [(_, v)] => Some(*v),
            _ => None,
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The metric families named in `/metrics` output.
fn families(exposition: &str) -> Vec<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split_whitespace().next())
        .map(str::to_owned)
        .collect()
}

/// Every `expr` of the Grafana dashboard, with its variables as a
/// dashboard showing everything would set them.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("etc/grafana/nanodetd-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap();
            queries.push(
                expr.replace("$__rate_interval", "1m")
                    .replace("$instance", ".*")
                    .replace("$camera", ".*"),
            );
        }
    }
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if let Some(q) = variable["query"].as_str()
            && let Some(inner) = q.strip_prefix("label_values(")
        {
            // label_values(<selector>, <label>): the selector is a query.
            let selector = inner.rsplit_once(',').unwrap().0;
            queries.push(selector.replace("$instance", ".*"));
        }
    }
    queries
}

/// Issue 20: the endpoint passes `promtool check metrics`; a real
/// Prometheus scrapes it and sees the frame counter rise, the person in
/// the replay, and `nanodetd_mqtt_connected` go to 0 while the broker is
/// stopped (with the shipped alert pending) and back to 1 after; every
/// query of the Grafana dashboard runs on that Prometheus and names only
/// families the endpoint serves.
#[test]
fn a_real_prometheus_scrapes_the_daemon_and_sees_the_broker_go_and_come_back_issue_20() {
    let test = "prometheus";
    let Some((_serial, assets)) = setup(test, true) else {
        return;
    };
    if !prometheus_present(test) {
        return;
    }
    let mut broker = Broker::start();
    let photos = photo_folder(&assets, &["hpc203_person.jpg"]);
    let metrics_port = free_port();
    let camera = replay("porch", photos.path(), "looping = true\nfps = 4");
    let daemon = Daemon::start(
        &format!(
            "{}[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n",
            config(&assets, broker.port, "nd", &camera)
        ),
        &[],
    );
    wait_until("/readyz to answer 200", Duration::from_secs(60), || {
        http_get(metrics_port, "/readyz").filter(|(s, _)| *s == 200)
    });
    let (status, health) = http_get(metrics_port, "/healthz").unwrap();
    assert_eq!(status, 200, "{health}");

    // The exposition format, as Prometheus' own linter reads it.
    let exposition = wait_until("frames on /metrics", Duration::from_secs(30), || {
        let (_, text) = http_get(metrics_port, "/metrics")?;
        // Frames counted and the person tracked.
        (text.contains("nanodetd_camera_frames_total{camera=\"porch\"}")
            && text.contains("nanodetd_objects{camera=\"porch\",label=\"person\"}"))
        .then_some(text)
    });
    let (linted, said) = promtool(&["check", "metrics"], &exposition);
    assert!(linted && said.trim().is_empty(), "promtool: {said}");
    let served = families(&exposition);
    for family in [
        "nanodetd_camera_frames_total",
        "nanodetd_camera_frames_dropped_total",
        "nanodetd_camera_up",
        "nanodetd_stage_duration_seconds",
        "nanodetd_event_latency_seconds",
        "nanodetd_objects",
        "nanodetd_events_total",
        "nanodetd_detection_failures_total",
        "nanodetd_mqtt_connected",
        "nanodetd_mqtt_queue_messages",
        "nanodetd_mqtt_dropped_total",
        "nanodetd_model_info",
        "nanodetd_build_info",
        "nanodetd_reloads_total",
        "process_resident_memory_bytes",
        "process_cpu_seconds_total",
        "process_open_fds",
    ] {
        assert!(served.iter().any(|f| f == family), "{family} not served");
    }

    let prometheus = Prometheus::start(metrics_port);
    let frames = "nanodetd_camera_frames_total{camera=\"porch\"}";
    let first = wait_until("a scrape with frames", Duration::from_secs(30), || {
        prometheus.scalar(frames).filter(|v| *v > 0.0)
    });
    let later = wait_until("more frames", Duration::from_secs(30), || {
        prometheus.scalar(frames).filter(|v| *v > first)
    });
    eprintln!("frames scraped: {first} then {later}");
    wait_until(
        "the person in nanodetd_objects",
        Duration::from_secs(30),
        || {
            prometheus
                .scalar("nanodetd_objects{camera=\"porch\",label=\"person\"}")
                .filter(|v| *v >= 1.0)
        },
    );
    assert_eq!(prometheus.scalar("nanodetd_mqtt_connected"), Some(1.0));
    let model = prometheus.vector("nanodetd_model_info");
    assert_eq!(model.len(), 1, "{model:?}");
    assert_eq!(
        (
            model[0].0["model"].as_str(),
            model[0].0["backend"].as_str(),
            model[0].0["precision"].as_str(),
            model[0].0["provider"].as_str()
        ),
        ("nanodet-plus-m_320.onnx", "tract", "fp32", "cpu")
    );

    // Every query of the dashboard is valid PromQL and has data here,
    // except those of things that did not happen (a drop, a reload).
    let mut empty = Vec::new();
    for query in dashboard_queries() {
        for name in query
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|w| w.starts_with("nanodetd_") || w.starts_with("process_"))
        {
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .fold(name, |n, suffix| n.strip_suffix(suffix).unwrap_or(n));
            assert!(
                served.iter().any(|f| f == family),
                "the dashboard's {name} is not served"
            );
        }
        if prometheus.query(&query)["result"]
            .as_array()
            .is_some_and(Vec::is_empty)
        {
            empty.push(query);
        }
    }
    eprintln!("dashboard queries without data yet: {empty:#?}");
    assert!(
        empty.len() <= 4,
        "too many dashboard queries without data: {empty:#?}"
    );

    // The broker goes away: the gauge follows, and the shipped alert's
    // expression holds (pending: its `for` is a minute).
    broker.stop();
    wait_until("nanodetd_mqtt_connected 0", Duration::from_secs(30), || {
        prometheus
            .scalar("nanodetd_mqtt_connected")
            .filter(|v| *v == 0.0)
    });
    wait_until(
        "the NanodetdMqttDisconnected alert",
        Duration::from_secs(30),
        || {
            prometheus
                .scalar("ALERTS{alertname=\"NanodetdMqttDisconnected\"}")
                .filter(|v| *v == 1.0)
        },
    );
    let (_, ready) = http_get(metrics_port, "/readyz").unwrap();
    assert!(ready.contains("\"mqtt\":\"disconnected\""), "{ready}");
    broker.launch();
    wait_until("nanodetd_mqtt_connected 1", Duration::from_secs(30), || {
        prometheus
            .scalar("nanodetd_mqtt_connected")
            .filter(|v| *v == 1.0)
    });
    assert!(
        prometheus
            .scalar("nanodetd_mqtt_reconnects_total")
            .is_some_and(|v| v >= 1.0),
        "{}",
        prometheus.log()
    );
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

/// Issue 20: `/healthz` names a hung camera; `[metrics] listen` follows
/// reloads (the old port closes, the new one serves); a port already
/// taken is reported on `status` while the daemon runs on, and the next
/// reload, once it is free, binds it; loopback to 0.0.0.0 on one port
/// works. And the stats topic agrees exactly with `/metrics`, read once
/// nothing changes any more.
#[test]
fn the_endpoint_follows_reloads_reports_a_failed_bind_and_agrees_with_stats_issue_20() {
    let Some((_serial, assets)) = setup("metrics reload", true) else {
        return;
    };
    let broker = Broker::start();
    let sub = Subscriber::new(broker.port, "nd/#", false);
    // A replay that plays once, and a camera stuck in a read (a FIFO
    // nobody writes).
    let photos = photo_folder(&assets, &["hpc203_person.jpg", "hpc203_bus.jpg"]);
    let stuck = tempfile::tempdir().unwrap();
    let fifo = stuck.path().join("a.jpg");
    assert!(
        Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .unwrap()
            .success()
    );
    let cameras = format!(
        "{}{}",
        replay("once", photos.path(), "fps = 4\nrepeat = 3"),
        replay("stuck", stuck.path(), "")
    );
    let with_listen = |port: u16| {
        format!(
            "{}[metrics]\nlisten = \"127.0.0.1:{port}\"\nstale_after = 1.0\n",
            config(&assets, broker.port, "nd", &cameras)
        )
    };
    let first = free_port();
    let second = loop {
        let p = free_port();
        if p != first {
            break p;
        }
    };
    let mut daemon = Daemon::start(&with_listen(first), &[]);

    // The stuck camera: /healthz says 503 and names it.
    let body = wait_until("/healthz 503", Duration::from_secs(60), || {
        http_get(first, "/healthz").filter(|(s, _)| *s == 503)
    })
    .1;
    let health: Value = serde_json::from_str(&body).unwrap();
    assert!(
        health["stale"]["camera stuck"]
            .as_f64()
            .is_some_and(|age| age >= 1.0),
        "{body}"
    );
    assert!(health["stale"].get("camera once").is_none(), "{body}");

    // Agreement: once the replay has played and its objects ended, the
    // counters stand still; the next stats message says what /metrics
    // says.
    sub.wait_for("the replay finished", Duration::from_secs(60), |m| {
        m.iter()
            .any(|m| m.topic == "nd/stats" && m.json()["cameras"]["once"]["state"] == "finished")
    });
    std::thread::sleep(Duration::from_secs(2));
    let (_, exposition) = http_get(first, "/metrics").unwrap();
    let seen = sub.all().len();
    sub.wait_for(
        "a stats message after the scrape",
        Duration::from_secs(5),
        |m| m[seen..].iter().any(|m| m.topic == "nd/stats"),
    );
    let stats = sub.all()[seen..]
        .iter()
        .find(|m| m.topic == "nd/stats")
        .unwrap()
        .json();
    let sample = |line_start: &str| -> f64 {
        exposition
            .lines()
            .find(|l| l.starts_with(line_start))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_else(|| panic!("no {line_start} in\n{exposition}"))
            .parse()
            .unwrap()
    };
    let pairs = [
        (
            "nanodetd_camera_frames_total{camera=\"once\"}",
            &stats["cameras"]["once"]["frames"],
        ),
        (
            "nanodetd_camera_frames_dropped_total{camera=\"once\",reason=\"replaced\"}",
            &stats["cameras"]["once"]["dropped"],
        ),
        (
            "nanodetd_mqtt_event_messages_total{outcome=\"queued\"}",
            &stats["mqtt"]["events_queued"],
        ),
        (
            "nanodetd_mqtt_event_messages_total{outcome=\"delivered\"}",
            &stats["mqtt"]["events_delivered"],
        ),
    ];
    for (line, json) in pairs {
        assert_eq!(
            Some(sample(line)),
            json.as_f64(),
            "{line} vs stats: {stats}"
        );
    }
    // Each stats message's percentiles cover the frames since the one
    // before: their samples add up to the histogram's count.
    let all_stats: Vec<Value> = sub
        .all()
        .iter()
        .filter(|m| m.topic == "nd/stats")
        .map(|m| m.json())
        .collect();
    for (key, line) in [
        (
            "inference",
            "nanodetd_stage_duration_seconds_count{stage=\"inference\"}",
        ),
        ("total", "nanodetd_detection_latency_seconds_count"),
        ("event", "nanodetd_event_latency_seconds_count"),
    ] {
        let summed: f64 = all_stats
            .iter()
            .take_while(|m| m["uptime"].as_f64() <= stats["uptime"].as_f64())
            .filter_map(|m| m["latency_ms"][key]["samples"].as_f64())
            .sum();
        assert_eq!(summed, sample(line), "{key}: {all_stats:?}");
    }
    assert_eq!(sample("nanodetd_camera_frames_total{camera=\"once\"}"), 6.0);

    // A new port: the old one closes, the new one serves.
    daemon.edit(&with_listen(second));
    wait_until("the new port", Duration::from_secs(10), || {
        http_get(second, "/metrics").filter(|(s, _)| *s == 200)
    });
    assert!(
        http_get(first, "/metrics").is_none(),
        "the old port still answers"
    );

    // A port someone else holds: said on status; the daemon runs on.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_port = taken.local_addr().unwrap().port();
    daemon.edit(&with_listen(taken_port));
    sub.wait_for("the bind failure on status", Duration::from_secs(10), |m| {
        m.iter().any(|m| {
            m.topic == "nd/status"
                && m.json()["metrics_error"].as_str().is_some_and(|e| {
                    e.contains(&format!("{taken_port}")) && e.contains("cannot listen")
                })
        })
    });
    assert!(daemon.alive(), "{}", daemon.log());
    assert!(daemon.log().contains("cannot listen"), "{}", daemon.log());
    // The port is freed; a reload of anything retries it at once, well
    // before the 30 s retry, and status clears.
    drop(taken);
    daemon.edit(&with_listen(taken_port).replace("stale_after = 1.0", "stale_after = 2.0"));
    wait_until("the freed port", Duration::from_secs(10), || {
        http_get(taken_port, "/readyz").filter(|(s, _)| *s == 200)
    });
    sub.wait_for("status cleared", Duration::from_secs(10), |m| {
        m.iter()
            .rev()
            .find(|m| m.topic == "nd/status")
            .is_some_and(|m| m.json()["metrics_error"].is_null())
    });
    // Loopback to every address on the same port, as docs/METRICS.md
    // says to let a LAN scraper in: the old listener is closed first.
    daemon.edit(
        &with_listen(taken_port)
            .replace("127.0.0.1:", "0.0.0.0:")
            .replace("stale_after = 1.0", "stale_after = 2.0"),
    );
    wait_until(
        "the log of the new address",
        Duration::from_secs(10),
        || {
            daemon
                .log()
                .contains(&format!("serving http://0.0.0.0:{taken_port}/metrics"))
                .then_some(())
        },
    );
    let (status, exposition) = http_get(taken_port, "/metrics").unwrap();
    assert_eq!(status, 200);
    assert!(
        !daemon
            .log()
            .contains(&format!("0.0.0.0:{taken_port}: cannot listen")),
        "{}",
        daemon.log()
    );
    assert!(
        exposition.contains("nanodetd_reloads_total{result=\"applied\"} 4"),
        "{exposition}"
    );
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

/// Issue 20: the shipped alert rules load (`promtool check rules`) and
/// each fires on the made-up series meant for it, and only then
/// (`promtool test rules`, etc/prometheus/nanodetd-alerts.test.yml).
#[test]
fn the_alert_rules_load_and_fire_on_their_series_issue_20() {
    if !prometheus_present("alert rules") {
        return;
    }
    let rules = repo("etc/prometheus/nanodetd-alerts.yml");
    let (ok, said) = promtool(&["check", "rules", rules.to_str().unwrap()], "");
    assert!(ok && said.contains("SUCCESS: 8 rules found"), "{said}");
    let tests = repo("etc/prometheus/nanodetd-alerts.test.yml");
    let (ok, said) = promtool(&["test", "rules", tests.to_str().unwrap()], "");
    assert!(ok && said.contains("SUCCESS"), "{said}");
    // The tests cover every alert the rules define.
    let rules = std::fs::read_to_string(&rules).unwrap();
    let tests = std::fs::read_to_string(&tests).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            tests.contains(&format!("alertname: {alert}")),
            "{alert} untested"
        );
    }
}

/// Issue 20: a client cannot hold the endpoint: past 32 connections new
/// ones are closed at once, a connection that sends nothing or half its
/// headers is closed after 5 s, headers over 16 KiB are refused, and once
/// they are gone a scrape is served.
#[test]
fn idle_slow_and_oversized_clients_cannot_hold_the_endpoint_issue_20() {
    let Some((_serial, assets)) = setup("metrics clients", false) else {
        return;
    };
    let photos = photo_folder(&assets, &["hpc203_bus.jpg"]);
    let port = free_port();
    // No broker: the endpoint does not need one.
    let camera = replay("street", photos.path(), "looping = true\nfps = 2");
    let daemon = Daemon::start(
        &format!(
            "{}[metrics]\nlisten = \"127.0.0.1:{port}\"\n",
            config(&assets, free_port(), "nd", &camera)
        ),
        &[],
    );
    wait_until("/readyz", Duration::from_secs(60), || {
        http_get(port, "/readyz").filter(|(s, _)| *s == 200)
    });
    let opened = Instant::now();
    let mut held: Vec<TcpStream> = (0..40)
        .map(|_| TcpStream::connect(("127.0.0.1", port)).unwrap())
        .collect();
    // Half a request on one of the first 32.
    held[1]
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let closed_now = |s: &mut TcpStream| {
        s.set_nonblocking(true).unwrap();
        let mut byte = [0u8; 1];
        let closed = matches!(s.read(&mut byte), Ok(0));
        s.set_nonblocking(false).unwrap();
        closed
    };
    let refused: Vec<usize> = (0..held.len())
        .filter(|&i| closed_now(&mut held[i]))
        .collect();
    assert_eq!(refused, (32..40).collect::<Vec<_>>());
    // The silent one and the half-sent one end at the header timeout.
    for i in [0, 1] {
        held[i]
            .set_read_timeout(Some(Duration::from_secs(15)))
            .unwrap();
        let mut rest = Vec::new();
        held[i].read_to_end(&mut rest).unwrap();
        let after = opened.elapsed();
        assert!(
            after >= Duration::from_secs(3) && after <= Duration::from_secs(12),
            "connection {i} closed after {after:?}"
        );
    }
    drop(held);
    // Headers over the 16 KiB buffer: refused, not served.
    let mut big = TcpStream::connect(("127.0.0.1", port)).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let request = format!(
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: {}\r\n\r\n",
        "a".repeat(20_000)
    );
    let _ = big.write_all(request.as_bytes());
    let mut answer = String::new();
    let _ = big.read_to_string(&mut answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "oversized headers: {}",
        answer.lines().next().unwrap_or_default()
    );
    let (status, body) = wait_until("a scrape", Duration::from_secs(5), || {
        http_get(port, "/metrics")
    });
    assert_eq!(status, 200);
    assert!(body.contains("nanodetd_camera_frames_total"));
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}
