//! Issue 18: the layering the compiler enforces. The detection core is the
//! `nanodetd-core` crate; what it depends on is what it can name.
#![allow(clippy::unwrap_used)]

use std::process::Command;

/// The daemon's crates: the core must reach none of them, with every
/// feature on.
const DAEMON_CRATES: &[&str] = &[
    "tokio",
    "rumqttc",
    "rumqttd",
    "notify",
    "sd-notify",
    "systemd-journal-logger",
    "toml",
    "clap",
    "prometheus",
    "hyper",
    "v4l",
    "v4l2-sys-mit",
    "nanodetd",
];

#[test]
fn the_core_crate_depends_on_no_daemon_crate_issue_18() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args([
            "tree",
            // Not --offline: a machine that built only the default features
            // (the README's test command on a fresh root) has not
            // downloaded cudarc yet, and cargo tree needs its manifest.
            "--locked",
            "--package",
            "nanodetd-core",
            "--features",
            "cuda,tensorrt",
            "--edges",
            "normal",
            "--prefix",
            "none",
            "--format",
            "{p}",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let names: Vec<&str> = stdout
        .lines()
        .filter_map(|line| line.split_whitespace().next())
        .collect();
    assert_eq!(names.first(), Some(&"nanodetd-core"), "{stdout}");
    // The backends are in it, so it is the whole tree, not an empty one.
    for needed in ["tract-onnx", "ort", "cudarc", "image"] {
        assert!(names.contains(&needed), "{needed} missing:\n{stdout}");
    }
    let reached: Vec<&&str> = DAEMON_CRATES.iter().filter(|c| names.contains(c)).collect();
    assert!(reached.is_empty(), "the core depends on {reached:?}");
}
