//! Where log lines go, and the level that can change on reload.
//!
//! The logger is installed once, letting everything through; the level is
//! then `log`'s global maximum alone, which [`set_level`] moves on a
//! reload. (env_logger fixes its own filter when built, so a filter set
//! there would make a reload's `[log] level` unable to go above the level
//! the daemon started with.) `RUST_LOG`, when set, pins the filter for the
//! whole run, and reloads leave it alone.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether `RUST_LOG` chose the filter, which reloads then leave alone.
static PINNED_BY_ENV: AtomicBool = AtomicBool::new(false);

/// Journald when systemd started us (it sets JOURNAL_STREAM to our
/// stderr), stderr otherwise, at `level`.
pub fn start(level: log::LevelFilter) {
    if systemd_journal_logger::connected_to_journal()
        && let Ok(journal) = systemd_journal_logger::JournalLog::new()
        && journal.install().is_ok()
    {
        log::set_max_level(level);
        return;
    }
    let mut builder = env_logger::Builder::new();
    builder.filter_level(log::LevelFilter::Trace);
    // The embedded broker (rumqttd) traces every packet, at error level
    // for routine ones; its failures that matter are reported by nanodetd
    // itself. RUST_LOG=rumqttd=info brings its lines back.
    builder
        .filter_module("rumqttd", log::LevelFilter::Off)
        .filter_module("tracing::span", log::LevelFilter::Off);
    let spec = std::env::var("RUST_LOG").ok();
    if let Some(spec) = &spec {
        builder.filter_level(log::LevelFilter::Off);
        builder.parse_filters(spec);
    }
    let logger = builder.build();
    let max = if spec.is_some() {
        logger.filter()
    } else {
        level
    };
    if log::set_boxed_logger(Box::new(logger)).is_ok() {
        PINNED_BY_ENV.store(spec.is_some(), Ordering::Relaxed);
        log::set_max_level(max);
    }
}

/// The config's `[log] level`, on start or reload; a no-op under `RUST_LOG`.
pub fn set_level(level: log::LevelFilter) {
    if !PINNED_BY_ENV.load(Ordering::Relaxed) {
        log::set_max_level(level);
    }
}
