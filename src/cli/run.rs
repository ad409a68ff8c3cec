//! `nanodetd run`: loads the config, starts logging, hands over to the
//! daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::Failure;
use nanodetd::config::Config;

/// Arguments of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The TOML configuration; its directory is watched for edits.
    #[arg(long, short = 'c', default_value = "/etc/nanodetd/nanodetd.toml")]
    config: PathBuf,
}

/// Journald when systemd started us (it sets JOURNAL_STREAM to our
/// stderr), stderr otherwise. RUST_LOG, when set, overrides the config's
/// level for stderr.
fn start_logging(level: log::LevelFilter) {
    if systemd_journal_logger::connected_to_journal()
        && let Ok(journal) = systemd_journal_logger::JournalLog::new()
        && journal.install().is_ok()
    {
        log::set_max_level(level);
        return;
    }
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if let Ok(spec) = std::env::var("RUST_LOG") {
        builder.parse_filters(&spec);
    }
    if builder.try_init().is_ok() {
        log::set_max_level(level.max(log::max_level()));
    }
}

/// Runs the daemon.
pub fn run(args: &RunArgs) -> Result<(), Failure> {
    let config = Config::load(&args.config).map_err(|e| Failure::Config(e.into()))?;
    start_logging(config.log.level);
    // rustls needs one process-wide crypto provider; ring is the one built in.
    let _ = rustls::crypto::ring::default_provider().install_default();
    nanodetd::daemon::run(&args.config, config)
        .context("nanodetd run")
        .map_err(Failure::Runtime)
}
