//! `nanodetd run`: loads the config, starts logging, hands over to the
//! daemon.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::{Failure, start_logging};
use nanodetd::config::Config;

/// Arguments of `run`.
#[derive(Args, Debug)]
pub struct RunArgs {
    /// The TOML configuration; its directory is watched for edits.
    #[arg(long, short = 'c', default_value = "/etc/nanodetd/nanodetd.toml")]
    config: PathBuf,
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
