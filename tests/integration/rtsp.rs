//! Issue 23: IP cameras over RTSP, against GStreamer's RTSP server
//! (tests/rtsp/server.py on Debian's gst-rtsp-server), and H.264 video
//! files. The clips are made by ffmpeg (libx264) from the sample photos:
//! one second per photo at 10 fps, a key frame each second.

#![allow(clippy::unwrap_used)]

use crate::daemon::{Broker, Daemon, NotifySocket, Subscriber, config, events, last_json, setup};
use crate::support::{self, free_port};

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::MutexGuard;
use std::time::Duration;

use serde_json::Value;

/// The photos in each clip, and what the model finds in them.
const PHOTOS: [&str; 3] = ["hpc203_bus.jpg", "hpc203_dog.jpg", "hpc203_zidane.jpg"];

/// ffmpeg and GStreamer's RTSP server, or a skip (a failure under CI,
/// where scripts/test.sh installs them).
fn tools_present(test: &str) -> bool {
    let ffmpeg = Command::new("ffmpeg")
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let server = Command::new("/usr/bin/python3")
        .args([
            "-c",
            "import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import GstRtspServer",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !(ffmpeg && server) {
        support::skip_or_fail(
            test,
            "ffmpeg or GStreamer's RTSP server (gir1.2-gst-rtsp-server-1.0, python3-gst-1.0) is not installed; scripts/test.sh installs them",
        );
    }
    ffmpeg && server
}

/// The start of every test here: [`setup`]'s (one daemon test at a time,
/// the assets, mosquitto), the tools, and a folder for the clips. `None`
/// means skip (a failure under CI).
fn start(test: &str) -> Option<(MutexGuard<'static, ()>, PathBuf, tempfile::TempDir)> {
    let (serial, assets) = setup(test, true)?;
    tools_present(test).then(|| (serial, assets, tempfile::tempdir().unwrap()))
}

/// The photos as a 640x480 clip in `dir`: `codec` is `libx264` or
/// `libx265`, `profile` `baseline` (no B-frames, as most IP cameras send)
/// or `high` (B-frames), `ext` `h264`, `h265` or `mp4`.
fn clip(assets: &Path, dir: &Path, codec: &str, profile: &str, ext: &str) -> PathBuf {
    let frames = dir.join("frames");
    std::fs::create_dir_all(&frames).unwrap();
    for (i, name) in PHOTOS.iter().enumerate() {
        for r in 0..10 {
            let link = frames.join(format!("f{:04}.jpg", i * 10 + r));
            if !link.exists() {
                std::os::unix::fs::symlink(support::sample(assets, name), link).unwrap();
            }
        }
    }
    let out = dir.join(format!("{codec}-{profile}.{ext}"));
    let mut args: Vec<String> = ["-loglevel", "error", "-y", "-framerate", "10", "-i"]
        .map(String::from)
        .to_vec();
    args.push(frames.join("f%04d.jpg").to_string_lossy().into_owned());
    args.extend(
        [
            "-vf",
            "scale=640:480:force_original_aspect_ratio=decrease,pad=640:480:(ow-iw)/2:(oh-ih)/2,setsar=1,format=yuv420p",
            "-c:v",
            codec,
            "-g",
            "10",
        ]
        .map(String::from),
    );
    if codec == "libx264" {
        args.extend(["-profile:v".into(), profile.into()]);
    } else {
        args.extend(["-x265-params".into(), "log-level=error".into()]);
    }
    args.push(out.to_string_lossy().into_owned());
    let made = Command::new("ffmpeg").args(&args).output().unwrap();
    assert!(made.status.success(), "{}", support::stderr(&made));
    out
}

/// tests/rtsp/server.py on a port of its own, restartable.
struct RtspServer {
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

impl RtspServer {
    /// Serves `file` at rtsp://127.0.0.1:PORT/cam; `auth` is user,
    /// password and whether to ask for digest (else basic).
    fn start(file: &Path, auth: Option<(&str, &str, bool)>) -> RtspServer {
        let port = free_port();
        let mut args = vec![
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/rtsp/server.py").to_owned(),
            port.to_string(),
            "cam".into(),
            file.to_string_lossy().into_owned(),
        ];
        if let Some((user, password, digest)) = auth {
            args.extend([
                "--user".into(),
                user.into(),
                "--password".into(),
                password.into(),
            ]);
            if digest {
                args.push("--digest".into());
            }
        }
        let mut server = RtspServer {
            port,
            args,
            child: None,
        };
        server.launch();
        server
    }

    fn url(&self) -> String {
        format!("rtsp://127.0.0.1:{}/cam", self.port)
    }

    fn launch(&mut self) {
        let mut child = Command::new("/usr/bin/python3")
            .args(&self.args)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut ready = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut ready)
            .unwrap();
        assert_eq!(ready.trim(), "ready", "the RTSP server did not start");
        self.child = Some(child);
    }

    /// SIGSTOP: the connection stays open and nothing comes, as from a
    /// hung camera.
    fn freeze(&self) {
        if let Some(child) = &self.child {
            support::signal(child, nix::sys::signal::Signal::SIGSTOP);
        }
    }

    /// SIGKILL: the connection drops as on a power cut.
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for RtspServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A `[[camera]]` for `source`, the inside of `source = { ... }`.
fn camera(name: &str, source: &str) -> String {
    format!("[[camera]]\nname = \"{name}\"\nsource = {{ {source} }}\n")
}

/// Labels of the `new` events on `camera` among `messages`.
fn new_labels(messages: &[crate::daemon::Received], prefix: &str, camera: &str) -> Vec<String> {
    events(messages, &format!("{prefix}/{camera}/events"))
        .iter()
        .filter(|e| e["type"] == "new")
        .filter_map(|e| e["after"]["label"].as_str().map(str::to_owned))
        .collect()
}

fn names_the_photos(labels: &[String]) -> bool {
    ["bus", "dog", "person"]
        .iter()
        .all(|want| labels.iter().any(|l| l == want))
}

/// A camera's entry in the last stats message.
fn camera_stats(sub: &Subscriber, prefix: &str, camera: &str) -> Option<Value> {
    last_json(&sub.all(), &format!("{prefix}/stats")).map(|s| s["cameras"][camera].clone())
}

#[test]
fn an_ip_camera_gives_events_naming_the_photos_and_reconnects_after_a_server_restart_issue_23() {
    let test = "rtsp restart";
    let Some((_serial, assets, dir)) = start(test) else {
        return;
    };
    let file = clip(&assets, dir.path(), "libx264", "baseline", "h264");
    let mut server = RtspServer::start(&file, Some(("viewer", "s3cret", true)));
    std::fs::write(dir.path().join("pw"), "s3cret\n").unwrap();
    let broker = Broker::start();
    let sub = Subscriber::new(broker.port, "ip/#", false);
    let source = format!(
        "rtsp = \"{}\", user = \"viewer\", password_file = \"{}\"",
        server.url(),
        dir.path().join("pw").display()
    );
    let daemon = Daemon::start(
        &config(&assets, broker.port, "ip", &camera("door", &source)),
        &[],
    );
    sub.wait_for(
        "events naming the photos' objects",
        Duration::from_secs(60),
        |m| names_the_photos(&new_labels(m, "ip", "door")),
    );

    // The server hangs: the connection stays open and no video comes. The
    // stall is found after 10 s, counted, and retried with back-off.
    server.freeze();
    sub.wait_for("the stall found", Duration::from_secs(30), |m| {
        last_json(m, "ip/stats").is_some_and(|s| {
            let c = &s["cameras"]["door"];
            c["reopens"].as_u64() >= Some(1)
                && c["state"] != "streaming"
                && c["error"].as_str().is_some_and(|e| {
                    e.contains(&server.url()) && e.contains("waiting for video timed out after 10s")
                })
        })
    });
    // Then it dies.
    server.kill();

    // It comes back on the same port: events again.
    let seen = sub.all().len();
    server.launch();
    sub.wait_for(
        "events after the restart, and the camera streaming",
        Duration::from_secs(60),
        |m| {
            m.len() > seen
                && new_labels(&m[seen..], "ip", "door").len() >= 2
                && last_json(m, "ip/stats")
                    .is_some_and(|s| s["cameras"]["door"]["state"] == "streaming")
        },
    );
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(log.contains("camera door: source is back"), "{log}");
    assert!(!log.contains("s3cret"), "the password is in the log");
}

#[test]
fn a_wrong_password_is_one_line_on_status_and_the_log_and_the_right_one_needs_no_restart_issue_23()
{
    let test = "rtsp password";
    let Some((_serial, assets, dir)) = start(test) else {
        return;
    };
    let file = clip(&assets, dir.path(), "libx264", "baseline", "h264");
    // Basic authentication, and RTP over UDP.
    let server = RtspServer::start(&file, Some(("viewer", "right-2291", false)));
    let password = dir.path().join("pw");
    std::fs::write(&password, "wrong-8137\n").unwrap();
    let broker = Broker::start();
    let sub = Subscriber::new(broker.port, "pw/#", false);
    let source = format!(
        "rtsp = \"{}\", user = \"viewer\", password_file = \"{}\", transport = \"udp\"",
        server.url(),
        password.display()
    );
    let socket = NotifySocket::new();
    let daemon = Daemon::start(
        &config(&assets, broker.port, "pw", &camera("gate", &source)),
        &[("NOTIFY_SOCKET", socket.path.to_str().unwrap())],
    );
    let refused = format!(
        "{}: the camera refused user \"viewer\" and its password (401 Unauthorized)",
        server.url()
    );
    sub.wait_for("the refusal on stats", Duration::from_secs(30), |m| {
        last_json(m, "pw/stats").is_some_and(|s| {
            s["cameras"]["gate"]["error"]
                .as_str()
                .is_some_and(|e| e.contains(&refused))
        })
    });
    // Back-off: 0.5, 1, 2 s between tries.
    sub.wait_for("three tries", Duration::from_secs(30), |m| {
        last_json(m, "pw/stats")
            .is_some_and(|s| s["cameras"]["gate"]["reopens"].as_u64() >= Some(3))
    });
    let stats = camera_stats(&sub, "pw", "gate").unwrap();
    assert_ne!(stats["state"], "streaming");
    let status = socket.lines_starting("STATUS=");
    assert!(
        status
            .iter()
            .any(|l| l.contains(&format!("camera gate: {refused}"))),
        "{status:?}"
    );
    let log = daemon.log();
    assert_eq!(
        log.matches(&refused).count(),
        1,
        "one line for the same error, not one per try:\n{log}"
    );

    // The right password, read at the next try.
    std::fs::write(&password, "right-2291\n").unwrap();
    sub.wait_for(
        "events once the password is right",
        Duration::from_secs(60),
        |m| names_the_photos(&new_labels(m, "pw", "gate")),
    );
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(
        !log.contains("right-2291") && !log.contains("wrong-8137"),
        "a password is in the log:\n{log}"
    );
}

#[test]
fn an_h265_camera_and_one_over_max_pixels_are_refused_with_errors_naming_why_issue_23() {
    let test = "rtsp h265";
    let Some((_serial, assets, dir)) = start(test) else {
        return;
    };
    let file = clip(&assets, dir.path(), "libx265", "main", "h265");
    let server = RtspServer::start(&file, None);
    // And an H.264 camera whose 640x480 is over its max_pixels.
    let h264 = clip(&assets, dir.path(), "libx264", "baseline", "h264");
    let large = RtspServer::start(&h264, None);
    let broker = Broker::start();
    let sub = Subscriber::new(broker.port, "hv/stats", false);
    let cameras = camera("hevc", &format!("rtsp = \"{}\"", server.url()))
        + &camera("large", &format!("rtsp = \"{}\"", large.url()))
        + "max_pixels = 300000\n";
    let daemon = Daemon::start(&config(&assets, broker.port, "hv", &cameras), &[]);
    sub.wait_for(
        "the codec and the size named on stats",
        Duration::from_secs(30),
        |m| {
            last_json(m, "hv/stats").is_some_and(|s| {
                s["cameras"]["hevc"]["error"].as_str().is_some_and(|e| {
                    e.contains("offers video h265") && e.contains("nanodetd decodes H.264 only")
                }) && s["cameras"]["large"]["error"].as_str().is_some_and(|e| {
                    e.contains("the camera streams 640x480, over max_pixels (300000)")
                })
            })
        },
    );
    let large_stats = camera_stats(&sub, "hv", "large").unwrap();
    assert_eq!(
        large_stats["frames"], 0,
        "refused before any frame: {large_stats}"
    );
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
}

#[test]
fn video_files_decode_every_frame_b_frames_too_and_a_corrupt_unit_is_a_counted_broken_frame_issue_23()
 {
    let test = "video files";
    let Some((_serial, assets, dir)) = start(test) else {
        return;
    };
    // High profile: B-frames, reordered by the decoder.
    let annex_b = clip(&assets, dir.path(), "libx264", "high", "h264");
    let mp4 = clip(&assets, dir.path(), "libx264", "high", "mp4");
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=has_b_frames",
            "-of",
            "csv=p=0",
        ])
        .arg(&mp4)
        .output()
        .unwrap();
    let reorder: u32 = support::stdout(&probe).trim().parse().unwrap();
    assert!(reorder >= 1, "the High profile clip has no B-frames");
    // A baseline stream with a slice of garbage after its 15th unit.
    let clean = std::fs::read(clip(&assets, dir.path(), "libx264", "baseline", "h264")).unwrap();
    let slices: Vec<usize> = clean
        .windows(4)
        .enumerate()
        .filter(|(_, w)| w[..3] == [0, 0, 1] && w[3] & 0x1f == 1)
        .map(|(i, _)| i)
        .collect();
    let mut corrupt = clean[..slices[13]].to_vec();
    corrupt.extend_from_slice(&[0, 0, 1, 0x41, 0x9a]);
    corrupt.extend((0..3000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 1));
    corrupt.extend_from_slice(&clean[slices[13]..]);
    let corrupt_file = dir.path().join("corrupt.h264");
    std::fs::write(&corrupt_file, corrupt).unwrap();

    let broker = Broker::start();
    let sub = Subscriber::new(broker.port, "vf/#", false);
    let cameras = [
        camera("annexb", &format!("video = \"{}\"", annex_b.display())),
        // 10 fps, as the MP4 says: the detector keeps up at that rate.
        camera("mp4", &format!("video = \"{}\"", mp4.display())),
        camera(
            "corrupt",
            &format!("video = \"{}\"", corrupt_file.display()),
        ),
        camera("loop", &format!("video = \"{}\"", mp4.display())) + "looping = true\n",
    ]
    .concat()
    // The raw stream carries no rate: 10 fps, as made.
    .replacen("}\n", "}\nfps = 10\n", 1);
    let daemon = Daemon::start(&config(&assets, broker.port, "vf", &cameras), &[]);
    sub.wait_for(
        "every file played to its end, and the looping one past it",
        Duration::from_secs(60),
        |m| {
            last_json(m, "vf/stats").is_some_and(|s| {
                ["annexb", "mp4", "corrupt"]
                    .iter()
                    .all(|c| s["cameras"][c]["state"] == "finished")
                    && s["cameras"]["loop"]["frames"].as_u64() >= Some(45)
            })
        },
    );
    let looping = &last_json(&sub.all(), "vf/stats").unwrap()["cameras"]["loop"];
    assert_eq!(looping["state"], "streaming", "{looping}");
    assert_eq!(looping["broken"], 0, "{looping}");
    // Paced at the MP4's 10 fps: unpaced, a 640x480 file decodes at
    // hundreds of frames a second here.
    let fps = looping["fps"].as_f64().unwrap();
    assert!(fps > 0.0 && fps <= 12.5, "{looping}");
    let stats = last_json(&sub.all(), "vf/stats").unwrap();
    for name in ["annexb", "mp4"] {
        let c = &stats["cameras"][name];
        assert_eq!(c["frames"], 30, "every frame decoded: {c}");
        assert_eq!(c["broken"], 0, "{c}");
        assert!(
            names_the_photos(&new_labels(&sub.all(), "vf", name)),
            "{name}"
        );
    }
    let c = &stats["cameras"]["corrupt"];
    let (frames, broken) = (c["frames"].as_u64().unwrap(), c["broken"].as_u64().unwrap());
    assert!(broken >= 1, "the garbage slice is counted: {c}");
    assert_eq!(
        frames + broken,
        31,
        "each unit is a frame or a broken one: {c}"
    );
    assert!(
        frames >= 20,
        "decoding went on from the next key frame: {c}"
    );
    let (status, _, log) = daemon.terminate();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("corrupt.h264 frame 16: cannot decode image: H.264"),
        "{log}"
    );
}
